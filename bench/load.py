"""Load benchmark: serial vs static vs continuous batching, side by side, from many HTTP clients.

    python -m bench.load                                  # toy pair, 3 modes x 1/8/32/64 clients
    python -m bench.load --targets --plot                 # the issue-6 target workloads + verdicts
    python -m bench.load --url http://127.0.0.1:8000      # drive a server that is already running

One server process per scheduler mode is started on the same pair (127.0.0.1, free ports) and
stopped at the end, also on Ctrl-C. For each concurrency level, every mode gets the same seeded
request sequence from N closed-loop async clients (each sends its next request when the last
one returns). Levels run in the outer loop and modes in the inner one, so the modes of one
level see the same background load on a shared machine.

Measured per mode and level: generated tokens/s and requests/s (completed responses over the
window), latency p50/p95/p99, queue wait p50/p95 (the server's x-batchserve-queue-wait-ms),
mean running batch size (batch_size_sum / batch_size_count deltas of /metrics), errors. With
--duration, clients stop at the deadline and requests still in flight are cancelled and
counted as `unfinished`; with --requests, every request runs to completion and the window
ends at the last response.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

from batchserve.argconfig import config_from_args
from bench.report import (
    RESULTS_DIR,
    baseline_comparison,
    baseline_table,
    bench_parser,
    command_line,
    markdown,
    parse_prometheus,
    percentile,
    plot,
    ratios,
    ratios_table,
    results_path,
    round_order,
    runs_table,
    targets_table,
)
from bench.servers import git_worktree, start_servers
from bench.shapes import SHAPES, WORDS, save_random_pair

MODES = ("serial", "static", "continuous")
TOY_AFTER_CONFIG = Path(__file__).resolve().parent.parent / "batchserve/toy/after/config.json"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- workload -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class IntRange:
    """`64` or `16-128` (inclusive); a fixed value when low == high."""

    low: int
    high: int

    def __post_init__(self) -> None:
        if self.low < 1 or self.high < self.low:
            raise ValueError(f"expected N or LOW-HIGH with 1 <= LOW <= HIGH, not {self}")

    @classmethod
    def parse(cls, text: str) -> IntRange:
        low, _, high = text.partition("-")
        return cls(int(low), int(high or low))

    def draw(self, rng: random.Random) -> int:
        return rng.randint(self.low, self.high)

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}-{self.high}"


@dataclass(frozen=True)
class Mix:
    """A fraction of requests go to /generate_lda_batch with batch_size prompts; the rest single."""

    batch_fraction: float
    batch_size: IntRange

    def __post_init__(self) -> None:
        if not 0 <= self.batch_fraction <= 1:
            raise ValueError(f"batch fraction must be in [0, 1], not {self.batch_fraction}")

    @classmethod
    def parse(cls, text: str) -> Mix:
        fraction, _, size = text.partition(":")
        return cls(float(fraction), IntRange.parse(size or "4"))

    def as_dict(self) -> dict:
        return {"batch_fraction": self.batch_fraction, "batch_size": str(self.batch_size)}


@dataclass(frozen=True)
class RequestSpec:
    """Request `index` of a workload; its route and row count follow from its body alone."""

    index: int
    body: dict

    @property
    def route(self) -> str:
        return "/generate_lda_batch" if "prompts" in self.body else "/generate_lda"

    @property
    def num_rows(self) -> int:
        return len(self.body["prompts"]) if "prompts" in self.body else 1


@dataclass(frozen=True)
class Workload:
    name: str
    concurrency: tuple[int, ...]
    max_new_tokens: IntRange
    mix: Mix
    prompt_words: IntRange = IntRange(4, 24)
    duration_s: float = 20.0
    requests_per_level: int | None = None
    seed: int = 0
    alpha: float = 1.0
    temperature: float = 0.8
    top_p: float = 0.95
    ignore_eos: bool = True

    def _prompt(self, rng: random.Random) -> str:
        words = [rng.choice(WORDS) for _ in range(self.prompt_words.draw(rng))]
        return " ".join(words).capitalize() + "."

    def request(self, index: int) -> RequestSpec:
        """Request `index` of the sequence: a function of (seed, index) alone, same for every mode."""
        rng = random.Random(f"{self.seed}:{index}")
        body: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens.draw(rng),
            "alpha": self.alpha,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "ignore_eos": self.ignore_eos,
            "seed": rng.randrange(1 << 31),
        }
        if rng.random() < self.mix.batch_fraction:
            prompts = [self._prompt(rng) for _ in range(self.mix.batch_size.draw(rng))]
            return RequestSpec(index, body | {"prompts": prompts})
        return RequestSpec(index, body | {"prompt": self._prompt(rng)})

    def describe(self) -> dict:
        return {
            "name": self.name,
            "concurrency": list(self.concurrency),
            "max_new_tokens": str(self.max_new_tokens),
            "mix": self.mix.as_dict(),
            "prompt_words": str(self.prompt_words),
            "duration_s": self.duration_s,
            "requests_per_level": self.requests_per_level,
            "seed": self.seed,
            "alpha": self.alpha,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "ignore_eos": self.ignore_eos,
        }


# --- one run: a mode at a concurrency level --------------------------------------------------------


@dataclass
class RequestRecord:
    index: int
    num_rows: int
    latency_s: float
    status: int | None
    tokens: int = 0
    queue_wait_ms: float | None = None
    error: str | None = None
    replica: str | None = None  # x-batchserve-replica: which Ray Serve replica answered


@dataclass
class RunState:
    records: list[RequestRecord] = field(default_factory=list)
    num_in_flight: int = 0


async def scrape_metrics(client: httpx.AsyncClient) -> dict[str, float]:
    response = await client.get("/metrics", timeout=30)
    response.raise_for_status()
    return parse_prometheus(response.text)


async def wait_idle(client: httpx.AsyncClient, timeout_s: float = 120.0) -> None:
    """Let a previous run's cancelled rows leave the batch, so runs do not overlap."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        values = await scrape_metrics(client)
        if not values.get("batchserve_running_rows") and not values.get("batchserve_queue_rows"):
            return
        await asyncio.sleep(0.1)
    log("warning: the server is still busy from the previous run")


async def send(client: httpx.AsyncClient, spec: RequestSpec) -> RequestRecord:
    started = time.perf_counter()
    try:
        response = await client.post(spec.route, json=spec.body)
    except httpx.HTTPError as err:
        return RequestRecord(
            spec.index, spec.num_rows, time.perf_counter() - started, None, error=type(err).__name__
        )
    latency_s = time.perf_counter() - started
    if response.status_code != 200:
        return RequestRecord(
            spec.index,
            spec.num_rows,
            latency_s,
            response.status_code,
            error=str(response.status_code),
        )
    payload = response.json()
    if spec.route == "/generate_lda_batch":
        tokens = sum(r["tokens_generated"] for r in payload["results"])
    else:
        tokens = payload["tokens_generated"]
    wait = response.headers.get("x-batchserve-queue-wait-ms")
    return RequestRecord(
        spec.index,
        spec.num_rows,
        latency_s,
        200,
        tokens,
        float(wait) if wait else None,
        replica=response.headers.get("x-batchserve-replica"),
    )


async def run_level(
    url: str, mode: str, workload: Workload, concurrency: int, request_timeout_s: float
) -> dict:
    """Drive one server with `concurrency` closed-loop clients; return the run's summary."""
    limits = httpx.Limits(
        max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4
    )
    timeout = httpx.Timeout(request_timeout_s, connect=30)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:
        await wait_idle(client)
        before = await scrape_metrics(client)
        state = RunState()
        indices = itertools.count()
        bounded = workload.requests_per_level is not None
        started = time.perf_counter()
        deadline = float("inf") if bounded else started + workload.duration_s

        async def client_loop() -> None:
            while True:
                index = next(indices)
                if bounded and index >= workload.requests_per_level:
                    return
                if time.perf_counter() >= deadline:
                    return
                state.num_in_flight += 1
                record = await send(client, workload.request(index))
                state.num_in_flight -= 1
                state.records.append(record)

        async def progress() -> None:
            while True:
                await asyncio.sleep(5)
                elapsed = time.perf_counter() - started
                tokens = sum(r.tokens for r in state.records)
                log(
                    f"  {mode:>10} x{concurrency}: {elapsed:5.1f} s, {len(state.records)} done, "
                    f"{tokens / elapsed:,.0f} tokens/s"
                )

        reporter = asyncio.create_task(progress())
        tasks = [asyncio.create_task(client_loop()) for _ in range(concurrency)]
        try:
            if bounded:
                await asyncio.gather(*tasks)
                wall_s = time.perf_counter() - started
                after = await scrape_metrics(client)
                num_unfinished = 0
            else:
                _, pending = await asyncio.wait(tasks, timeout=workload.duration_s)
                after = await scrape_metrics(client)  # at the deadline, before cancelling
                wall_s = time.perf_counter() - started
                num_unfinished = state.num_in_flight
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
        finally:
            reporter.cancel()
            for task in tasks:
                task.cancel()
    return summarize(mode, concurrency, state.records, wall_s, before, after, num_unfinished)


def summarize(
    mode: str,
    concurrency: int,
    records: list[RequestRecord],
    wall_s: float,
    before: dict[str, float],
    after: dict[str, float],
    num_unfinished: int,
) -> dict:
    ok = [r for r in records if r.error is None]
    latencies_s = [r.latency_s for r in ok]
    waits_ms = [r.queue_wait_ms for r in ok if r.queue_wait_ms is not None]
    tokens = sum(r.tokens for r in ok)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    num_steps = delta("batchserve_batch_size_count")
    rows_by_replica: Counter[str] = Counter()
    for r in ok:
        if r.replica:
            rows_by_replica[r.replica] += r.num_rows
    return {
        "mode": mode,
        "concurrency": concurrency,
        "wall_s": wall_s,
        "num_requests": len(ok),
        "num_rows": sum(r.num_rows for r in ok),
        "num_errors": len(records) - len(ok),
        "errors": dict(Counter(r.error for r in records if r.error)),
        "num_unfinished": num_unfinished,
        "tokens": tokens,
        "tokens_per_s": tokens / wall_s,
        "requests_per_s": len(ok) / wall_s,
        "latency_mean_s": sum(latencies_s) / len(latencies_s) if latencies_s else None,
        "latency_p50_s": percentile(latencies_s, 50),
        "latency_p95_s": percentile(latencies_s, 95),
        "latency_p99_s": percentile(latencies_s, 99),
        "queue_wait_p50_ms": percentile(waits_ms, 50),
        "queue_wait_p95_ms": percentile(waits_ms, 95),
        "mean_batch_size": delta("batchserve_batch_size_sum") / num_steps if num_steps else None,
        "engine_steps": int(num_steps),
        # Tokens decoded during the window, finished or not (one per running row per step).
        "server_decode_tokens_per_s": delta("batchserve_batch_size_sum") / wall_s,
        "step_ms_mean": wall_s / num_steps * 1e3 if num_steps else None,
        "latencies_s": [round(x, 4) for x in latencies_s],
        # Behind Ray Serve: rows each replica answered (empty from a plain server).
        "rows_by_replica": dict(rows_by_replica),
    }


async def warm_up(url: str) -> None:
    """First calls pay for lazy init and allocator growth; keep that out of the first run."""
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        body = {"max_new_tokens": 8, "ignore_eos": True, "seed": 1}
        await asyncio.gather(
            client.post("/generate_lda", json=body | {"prompt": "Write a poem about the river."}),
            client.post(
                "/generate_lda_batch",
                json=body | {"prompts": [f"Tell me a story number {i}." for i in range(16)]},
            ),
        )


async def run_workload(
    workload: Workload,
    urls: dict[str, str],
    request_timeout_s: float,
    runs: list[dict],
    rounds: int = 1,
) -> None:
    """Levels outer, then rounds, modes inner (every other round in reverse order, so drift
    on a shared machine does not favour the mode that runs first); appends each run's summary
    to `runs` as soon as it is done."""
    for level in workload.concurrency:
        for round_index in range(rounds):
            for mode, url in round_order(list(urls.items()), round_index):
                log(f"[{workload.name}] {mode} x{level} clients: {describe_bound(workload)}")
                run = await run_level(url, mode, workload, level, request_timeout_s)
                run["round"] = round_index
                runs.append(run)
                log_run(workload, mode, level, run)


def log_run(workload: Workload, mode: str, level: int, run: dict) -> None:
    log(
        f"[{workload.name}] {mode} x{level}: {run['tokens_per_s']:,.1f} tokens/s, "
        f"p50 {fmt_s(run['latency_p50_s'])}, p95 {fmt_s(run['latency_p95_s'])}, "
        f"mean batch {run['mean_batch_size'] or 0:.1f}, errors {run['num_errors']}"
    )


def describe_bound(workload: Workload) -> str:
    if workload.requests_per_level is not None:
        return f"{workload.requests_per_level} requests"
    return f"{workload.duration_s:g} s"


def fmt_s(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


# --- targets --------------------------------------------------------------------------------


def target_workloads(base: Workload) -> list[Workload]:
    """Issue 6's targets: 32 single-prompt clients at 64 tokens (and one lone client), then mixed
    lengths 16..128 at 32 clients, where static batching waits for each window's longest row."""
    fixed = replace(
        base,
        name="single-64",
        concurrency=(1, 32),
        max_new_tokens=IntRange(64, 64),
        mix=Mix(0.0, IntRange(1, 1)),
    )
    mixed = replace(
        base,
        name="mixed-16-128",
        concurrency=(32,),
        max_new_tokens=IntRange(16, 128),
        mix=Mix(0.0, IntRange(1, 1)),
    )
    return [fixed, mixed]


def evaluate_targets(workloads: list[dict]) -> list[dict]:
    def find(name: str, level: int) -> dict:
        w = next((w for w in workloads if w["name"] == name), None)
        return next((r for r in (w or {}).get("ratios", []) if r["concurrency"] == level), {})

    def target(name: str, value: float | None, op: str, threshold: float) -> dict:
        holds = None
        if value is not None:
            holds = (
                value >= threshold
                if op == ">="
                else (value <= threshold if op == "<=" else value < threshold)
            )
        return {"name": name, "value": value, "op": op, "threshold": threshold, "holds": holds}

    single32, single1, mixed32 = (
        find("single-64", 32),
        find("single-64", 1),
        find("mixed-16-128", 32),
    )
    return [
        target(
            "32 clients, 64 tokens: continuous / serial tokens/s",
            single32.get("tokens_per_s_vs_serial"),
            ">=",
            8,
        ),
        target(
            "32 clients, 16-128 tokens: continuous / static tokens/s",
            mixed32.get("tokens_per_s_vs_static"),
            ">=",
            1.5,
        ),
        target(
            "32 clients, 16-128 tokens: continuous / static p95 latency",
            mixed32.get("latency_p95_s_vs_static"),
            "<",
            1,
        ),
        target(
            "1 client, 64 tokens: continuous / serial p50 latency",
            single1.get("latency_p50_s_vs_serial"),
            "<=",
            1.2,
        ),
    ]


# --- servers: this code's, and a baseline revision's --------------------------------------------


def start_mode_servers(
    stack: ExitStack,
    args: argparse.Namespace,
    model_args: list[str],
    server_args: list[str],
    server_env: dict[str, str],
    tree: Path | None = None,
    name_suffix: str = "",
) -> dict[str, str]:
    """A server per --modes on the pair and settings given (with `tree`, that checkout's
    code), stopped with `stack`: their URLs by mode + `name_suffix`."""
    procs = stack.enter_context(
        start_servers(
            args.modes,
            model_args,
            server_args=server_args,
            torch_threads=args.server_threads,
            extra_env=server_env,
            tree=tree,
            name_suffix=name_suffix,
        )
    )
    return {name: proc.url for name, proc in procs.items()}


def beside_baseline(urls: dict[str, str], theirs: dict[str, str], suffix: str) -> dict[str, str]:
    """Each mode's URL, then its baseline's: the two run one after the other at every level,
    so they see the same background load."""
    return {
        name: url
        for mode in urls
        for name, url in ((mode, urls[mode]), (mode + suffix, theirs[mode + suffix]))
    }


# --- CLI -------------------------------------------------------------------------------------------


def parse_levels(text: str) -> tuple[int, ...]:
    levels = tuple(int(x) for x in text.split(",") if x.strip())
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("concurrency levels must be positive integers")
    return levels


def parse_modes(text: str) -> tuple[str, ...]:
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in modes if m not in MODES]
    if not modes or unknown:
        raise argparse.ArgumentTypeError(f"modes must be among {', '.join(MODES)}")
    return modes


def int_range_option(text: str) -> IntRange:
    """IntRange.parse for argparse: its message reaches the user (argparse hides a ValueError's)."""
    try:
        return IntRange.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def mix_option(text: str) -> Mix:
    try:
        return Mix.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = bench_parser(
        "load",
        __doc__.split("\n\n", 2)[2] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Results: JSON + markdown (and PNGs with --plot) in bench/results/ unless --output "
        "names another place. Progress goes to stderr, the tables to stdout.",
    )
    pair = parser.add_argument_group("what to drive")
    pair.add_argument("--after", help="after model (path or hub id); default: the toy pair")
    pair.add_argument("--before", help="before model (optional with the toy pair)")
    pair.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        help="serve a random-init pair at this shape instead (written to a temp dir); the "
        "default when the toy pair is not trained yet is `tiny`, the toy pair's shape",
    )
    pair.add_argument(
        "--url",
        help="drive this running server instead of starting any (its mode comes from /info)",
    )
    pair.add_argument(
        "--modes",
        type=parse_modes,
        default=MODES,
        help="scheduler modes to start, comma-separated (default: serial,static,continuous)",
    )
    pair.add_argument(
        "--baseline",
        metavar="REV",
        help="also start each mode's server at this git revision (from a temporary worktree) "
        "and run it beside this code's, level by level, then print this code's tokens/s and "
        "latency over the revision's (e.g. --baseline 4cec898: main before issue 20)",
    )
    servers = parser.add_argument_group("servers (ignored with --url)")
    servers.add_argument("--max-batch-size", type=int, default=64, help="(default: %(default)s)")
    servers.add_argument("--max-wait-ms", type=float, default=10.0, help="(default: %(default)s)")
    servers.add_argument(
        "--server-threads",
        type=int,
        default=None,
        help="torch threads per server (OMP_NUM_THREADS); default: torch's own choice",
    )
    servers.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment variable for the servers, repeatable (e.g. OMP_WAIT_POLICY=PASSIVE: "
        "OpenMP threads sleep instead of spinning when they wait, which matters on a shared CPU)",
    )
    servers.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for `batchserve serve`, repeatable (e.g. --server-arg=--dtype=float32)",
    )
    load = parser.add_argument_group("workload")
    load.add_argument(
        "--concurrency",
        type=parse_levels,
        default=(1, 8, 32, 64),
        help="concurrent clients per level, comma-separated (default: 1,8,32,64)",
    )
    load.add_argument(
        "--mix",
        type=mix_option,
        default=Mix(0.2, IntRange(4, 4)),
        help="FRACTION[:SIZE]: that fraction of requests are /generate_lda_batch with SIZE "
        "prompts (N or LOW-HIGH), the rest single /generate_lda; 0 = single only (default: 0.2:4)",
    )
    load.add_argument(
        "--max-new-tokens",
        type=int_range_option,
        default=IntRange(64, 64),
        help="N, or LOW-HIGH drawn per request (seeded) (default: 64)",
    )
    load.add_argument(
        "--prompt-words",
        type=int_range_option,
        default=Workload.prompt_words,
        help="prompt length in words (default: 4-24)",
    )
    bound = load.add_mutually_exclusive_group()
    bound.add_argument(
        "--duration",
        type=float,
        default=Workload.duration_s,
        help="seconds per mode and level (default: %(default)s)",
    )
    bound.add_argument(
        "--requests",
        type=int,
        default=None,
        help="requests per mode and level instead of a duration; all run to completion",
    )
    load.add_argument(
        "--seed", type=int, default=Workload.seed, help="workload seed (default: %(default)s)"
    )
    # The sampling every request asks for; by default the Workload's, so the two cannot drift.
    for name in ("alpha", "temperature", "top_p"):
        load.add_argument(
            "--" + name.replace("_", "-"), type=float, default=getattr(Workload, name)
        )
    load.add_argument(
        "--no-ignore-eos",
        dest="ignore_eos",
        action="store_false",
        help="let rows stop at EOS (by default every row generates its max_new_tokens, so the "
        "work per request is the same in every mode)",
    )
    load.add_argument(
        "--request-timeout-s", type=float, default=600.0, help="client timeout per request"
    )
    load.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="runs of each mode per level; every other round runs the modes in reverse order, "
        "and the ratios compare each mode's mean over its rounds (default: %(default)s)",
    )
    load.add_argument(
        "--targets",
        action="store_true",
        help="run issue 6's target workloads instead (single-64 at 1 and 32 clients, "
        "mixed-16-128 at 32 clients; --mix, --max-new-tokens and --concurrency are then fixed) "
        "and report whether each target holds",
    )
    out = parser.add_argument_group("output")
    out.add_argument(
        "--output",
        type=Path,
        default=None,
        help="JSON path (a bare name goes to bench/results/, with --url to the current "
        "directory); the markdown goes next to it as "
        ".md (default: bench/results/load-{targets,sweep}-<pair>-<device>.json, e.g. "
        "load-targets-toy-cpu.json: a rerun replaces the current report; with --url, "
        "./load-{targets,sweep}-server.json in the current directory: a server of yours is "
        "none of the project's committed reports)",
    )
    out.add_argument("--plot", action="store_true", help="also write PNGs next to the JSON")
    return parser


def parse_env(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: --server-env takes KEY=VALUE, not {item!r}")
        env[key] = value
    return env


def host_description() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}"


def resolve_pair(args: argparse.Namespace, stack: ExitStack) -> tuple[list[str], str]:
    """Server arguments naming the pair, and a line saying which pair it is."""
    if args.after:
        model_args = ["--after", args.after] + (["--before", args.before] if args.before else [])
        return model_args, f"{args.after} / {args.before or '(default before)'}"
    if not args.shape and TOY_AFTER_CONFIG.exists():
        return ["--after", "toy"], "the embedded toy pair (batchserve/toy)"
    shape = args.shape or "tiny"
    root = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-pair-"))
    import torch

    on_gpu = torch.cuda.is_available()
    log(f"writing a random-init {shape} pair to {root} ({'cuda, bfloat16' if on_gpu else 'cpu'})")
    if on_gpu:
        after, before = save_random_pair(root, shape, "cuda", torch.bfloat16)
    else:
        after, before = save_random_pair(root, shape)
    reason = "" if args.shape else " (the toy pair is not trained yet)"
    return ["--after", after, "--before", before], f"random-init `{shape}` Llama pair{reason}"


def default_output_name(args: argparse.Namespace) -> str:
    """`load-<kind>-<pair>-<device>.json`: what was measured and where, one current report
    each (git keeps the earlier ones)."""
    kind = "targets" if args.targets else "sweep"
    if args.baseline:
        kind += "-vs-" + args.baseline.replace("/", "_")
    if args.url:
        return f"load-{kind}-server.json"
    if args.after:
        pair = Path(args.after.rstrip("/")).name or "pair"
    elif not args.shape and TOY_AFTER_CONFIG.exists():
        pair = "toy"
    else:
        pair = args.shape or "tiny"
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return f"load-{kind}-{pair}-{device}.json"


def output_path(args: argparse.Namespace) -> Path:
    if args.url:
        # A running server's numbers are the user's, not a report bench/results/ keeps.
        return args.output or Path.cwd() / default_output_name(args)
    if args.output is None:
        return RESULTS_DIR / default_output_name(args)
    return results_path(args.output)


async def fetch_info(url: str) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        response = await client.get("/info")
        response.raise_for_status()
        return response.json()


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.requests is not None and args.requests < 1:
        raise SystemExit("error: --requests must be >= 1")
    if args.rounds < 1:
        raise SystemExit("error: --rounds must be >= 1")
    if args.baseline and args.url:
        raise SystemExit("error: --baseline starts its own servers; it cannot drive --url")
    base = config_from_args(
        Workload, args, name="load", duration_s=args.duration, requests_per_level=args.requests
    )
    workloads = target_workloads(base) if args.targets else [base]
    # Servers are stopped on Ctrl-C and SIGTERM alike; SIGINT explicitly, since a shell starts
    # background jobs with it ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    path = output_path(args)
    report: dict[str, Any] = {
        "benchmark": "load",
        "created_at": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": command_line("load", argv),
        "interrupted": False,
        "workloads": [],
    }
    collected: list[tuple[Workload, list[dict]]] = []
    exit_code = 0
    try:
        with ExitStack() as stack:
            server_line = f"max_batch_size {args.max_batch_size}, max_wait_ms {args.max_wait_ms:g}"
            if args.url:
                info = asyncio.run(fetch_info(args.url))
                urls = {info["scheduler"]["mode"]: args.url.rstrip("/")}
                pair_line = (
                    f"{info['models']['after']} / {info['models']['before']} (running server)"
                )
                server_line = f"running server at {args.url}: {info['scheduler']}"
            else:
                model_args, pair_line = resolve_pair(args, stack)
                server_args = [
                    "--max-batch-size",
                    str(args.max_batch_size),
                    "--max-wait-ms",
                    str(args.max_wait_ms),
                    *args.server_arg,
                ]
                server_env = parse_env(args.server_env)
                log(f"starting {', '.join(args.modes)} servers on {pair_line}")
                urls = start_mode_servers(stack, args, model_args, server_args, server_env)
                info = asyncio.run(fetch_info(next(iter(urls.values()))))
                if args.baseline:
                    tree = stack.enter_context(git_worktree(args.baseline))
                    log(f"starting the same servers at {args.baseline} ({tree})")
                    suffix = "@" + args.baseline
                    theirs = start_mode_servers(
                        stack, args, model_args, server_args, server_env, tree, suffix
                    )
                    urls = beside_baseline(urls, theirs, suffix)
                    report["baseline"] = args.baseline
                server_line += f", torch threads {args.server_threads or 'default'}"
                if server_env:
                    server_line += ", env " + " ".join(f"{k}={v}" for k, v in server_env.items())
                if args.server_arg:
                    server_line += f", extra {' '.join(args.server_arg)}"
            report["setup"] = {
                "pair": pair_line,
                "host": host_description(),
                "server": f"{server_line}; device {info['device']}, {info['dtype']}",
                "info": info,
            }
            for url in urls.values():
                asyncio.run(warm_up(url))
            for workload in workloads:
                runs: list[dict] = []
                collected.append((workload, runs))
                asyncio.run(run_workload(workload, urls, args.request_timeout_s, runs, args.rounds))
    except KeyboardInterrupt:
        log("interrupted: servers stopped; writing what was measured")
        report["interrupted"] = True
        exit_code = 130
    if "setup" not in report:
        return exit_code or 1
    for workload, runs in collected:
        entry = workload.describe() | {"runs": runs, "ratios": ratios(runs)}
        if args.baseline:
            entry |= baseline_comparison(runs, args.baseline)
        report["workloads"].append(entry)
    if args.targets:
        report["targets"] = evaluate_targets(report["workloads"])
    for w in report["workloads"]:
        print(f"\n## {w['name']}\n\n{runs_table(w['runs'])}")
        if w["ratios"]:
            print(f"\n{ratios_table(w['ratios'])}")
        if w.get("vs_baseline"):
            print(f"\n{baseline_table(w['vs_baseline'], report['baseline'])}")
    if report.get("targets"):
        print(f"\n## targets\n\n{targets_table(report['targets'])}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    path.with_suffix(".md").write_text(markdown(report) + "\n")
    log(f"wrote {path} and {path.with_suffix('.md')}")
    if args.plot and report["workloads"]:
        for png in plot(report, path.with_suffix("")):
            log(f"wrote {png}")
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
