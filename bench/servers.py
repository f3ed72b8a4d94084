"""Start `batchserve serve` processes on free loopback ports and always tear them down.

Each server is its own session (process group), so a Ctrl-C in the terminal reaches only the
benchmark, which then stops every server itself; SIGTERM to the benchmark does the same.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import httpx


def add_server_options(parser: argparse.ArgumentParser, threads_help: str) -> None:
    """`--threads` (torch threads per server, 1 by default) and `--server-arg` (repeatable),
    the options of a benchmark that starts servers itself; `server_args` turns them back into
    the servers' command line."""
    parser.add_argument("--threads", type=int, default=1, help=threads_help)
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra `batchserve serve` option, repeatable (e.g. --server-arg=--no-compile)",
    )


def server_args(args: argparse.Namespace, *extra: str) -> list[str]:
    """The `batchserve serve` options of `add_server_options`' parsed `args`: --threads, then
    `extra`, then every --server-arg (last, so they can override the two before)."""
    return ["--threads", str(args.threads), *extra, *args.server_arg]


# The request bench.lone and bench.threads time alone: one short prompt, whatever the pair.
LONE_PROMPT = "Tell me about the history of the river and the town beside it."


REPO_ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def git_worktree(rev: str) -> Iterator[Path]:
    """Revision `rev` of this repository, checked out in a temporary worktree for the
    duration: a baseline to run side by side with this code."""
    with tempfile.TemporaryDirectory(prefix="bench-baseline-") as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(
            ["git", "-C", str(REPO_ROOT), "worktree", "add", "--detach", "-q", str(tree), rev],
            check=True,
        )
        try:
            yield tree
        finally:
            subprocess.run(
                ["git", "-C", str(REPO_ROOT), "worktree", "remove", "--force", str(tree)],
                check=False,
            )


def cli_module(tree: Path) -> str:
    """The server's CLI module in `tree`: batchserve.cli before the package took its layers."""
    return "batchserve.api.cli" if (tree / "batchserve/api/cli.py").exists() else "batchserve.cli"


@dataclass(frozen=True)
class ServerProcess:
    mode: str
    url: str
    pid: int
    log_path: Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def log_tail(path: Path, num_chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-num_chars:]
    except OSError:
        return ""


def _stop(proc: subprocess.Popen, timeout_s: float = 15.0) -> None:
    """SIGTERM (the server drains and exits 0), then SIGKILL its whole group if it hangs."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _wait_healthy(
    urls: dict[str, str],
    procs: dict[str, subprocess.Popen],
    logs: dict[str, Path],
    timeout_s: float,
) -> None:
    deadline = time.monotonic() + timeout_s
    pending = dict(procs)
    while pending:
        for mode, proc in list(pending.items()):
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{mode} server exited with {proc.returncode}:\n{log_tail(logs[mode])}"
                )
            try:
                if httpx.get(urls[mode] + "/health", timeout=2).status_code == 200:
                    del pending[mode]
            except httpx.TransportError:
                pass
        if pending and time.monotonic() > deadline:
            names = ", ".join(pending)
            raise RuntimeError(f"server(s) {names} not healthy after {timeout_s:.0f} s")
        time.sleep(0.2)


@contextmanager
def start_servers(
    modes: Sequence[str],
    model_args: Sequence[str],
    *,
    server_args: Sequence[str] = (),
    torch_threads: int | None = None,
    extra_env: dict[str, str] | None = None,
    startup_timeout_s: float = 300.0,
    tree: Path | None = None,
    name_suffix: str = "",
) -> Iterator[dict[str, ServerProcess]]:
    """One server per scheduler mode, all started together (loading overlaps), all stopped on
    exit; keyed by mode + `name_suffix`. With `tree` (a checkout of another revision), the
    servers run that tree's code."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    if torch_threads:
        # Read by torch at import: the intra-op pool size of the server's worker thread.
        env |= {"OMP_NUM_THREADS": str(torch_threads), "MKL_NUM_THREADS": str(torch_threads)}
    env |= extra_env or {}
    with ExitStack() as stack:
        log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-servers-")))
        procs: dict[str, subprocess.Popen] = {}
        logs: dict[str, Path] = {}
        ports: dict[str, int] = {}
        for mode in modes:
            ports[mode] = free_port()
            logs[mode] = log_dir / f"{mode}.log"
            cmd = [
                sys.executable,
                "-m",
                cli_module(tree or REPO_ROOT),
                "serve",
                *model_args,
                "--scheduler",
                mode,
                "--host",
                "127.0.0.1",
                "--port",
                str(ports[mode]),
                "--log-level",
                "warning",
                *server_args,
            ]
            # A file, not a pipe: nobody reads a pipe during the run, and a full one blocks the server.
            log_file = stack.enter_context(logs[mode].open("w"))
            procs[mode] = subprocess.Popen(
                cmd,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=tree,
                start_new_session=True,
            )
            stack.callback(_stop, procs[mode])
        urls = {mode: f"http://127.0.0.1:{ports[mode]}" for mode in modes}
        _wait_healthy(urls, procs, logs, startup_timeout_s)
        yield {
            mode + name_suffix: ServerProcess(
                mode + name_suffix, urls[mode], procs[mode].pid, logs[mode]
            )
            for mode in modes
        }
