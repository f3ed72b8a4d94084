"""Thread settings on a quiet and on a busy machine: which ones keep the speed and do not collapse.

    python -m bench.threads                              # toy pair, the default grid
    python -m bench.threads --neighbours 2 --clients-s 15

Each setting is one `batchserve serve` process (continuous scheduler), all started before the
first measurement. For each condition (quiet, then busy: `--neighbours` processes that spin on
the CPU beside the server, as another user's job would), every setting is measured back to
back: the median latency of a lone 64-token request, then tokens/s from 32 closed-loop clients.
The busy / quiet ratio says how much of its speed a setting keeps when the machine is shared.

The knobs are those issue 20 names: the worker's torch threads (`--threads`), OpenMP's wait
policy (a spinning thread steals the core the event loop and the neighbour need) and where
the event loop runs (always the main thread, beside the one worker thread: not a knob here).
torch's inter-op pool is not used by a forward that runs op after op, so it is not varied.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import httpx

from bench.load import IntRange, Mix, Workload, host_description, log, run_level, wait_idle
from bench.report import (
    add_output_option,
    bench_parser,
    command_line,
    fmt,
    ratio,
    table,
    write_report,
)
from bench.servers import LONE_PROMPT, start_servers

LONE_BODY = {
    "prompt": LONE_PROMPT,
    "max_new_tokens": 64,
    "ignore_eos": True,
    "alpha": 1.0,
}


@dataclass(frozen=True)
class Setting:
    name: str
    server_args: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)


def default_settings(num_cpus: int) -> list[Setting]:
    """auto (the default), one thread, every core with OpenMP's own wait policy (an empty
    OMP_WAIT_POLICY: the server then leaves it alone, and libgomp spins before it sleeps),
    every core with passive waits (what the server sets when the variable is unset)."""
    settings = [
        Setting("auto (default)", ("--threads", "auto")),
        Setting("threads 1", ("--threads", "1")),
    ]
    if num_cpus > 1:
        settings += [
            Setting(f"threads {num_cpus}", ("--threads", str(num_cpus)), {"OMP_WAIT_POLICY": ""}),
            Setting(
                f"threads {num_cpus}, OMP_WAIT_POLICY=PASSIVE",
                ("--threads", str(num_cpus)),
                {"OMP_WAIT_POLICY": "PASSIVE"},
            ),
        ]
    return settings


def _spin() -> None:
    while True:
        pass


@contextmanager
def neighbours(count: int) -> Iterator[None]:
    """`count` processes that each keep one core busy, as another user's job would."""
    procs = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(count)]
    for proc in procs:
        proc.start()
    try:
        yield
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.join()


def lone_latency_s(url: str, num_requests: int) -> float:
    """Median seconds of one request at a time (after one warm-up request)."""
    with httpx.Client(base_url=url, timeout=300) as client:
        client.post("/generate_lda", json=LONE_BODY | {"seed": 0}).raise_for_status()
        latencies = []
        for seed in range(num_requests):
            started = time.perf_counter()
            client.post("/generate_lda", json=LONE_BODY | {"seed": seed}).raise_for_status()
            latencies.append(time.perf_counter() - started)
    return statistics.median(latencies)


def measure(url: str, workload: Workload, num_lone: int) -> dict:
    async def idle() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            await wait_idle(client)

    asyncio.run(idle())
    lone_s = lone_latency_s(url, num_lone)
    run = asyncio.run(run_level(url, "continuous", workload, 32, 600))
    return {
        "lone_p50_s": lone_s,
        "tokens_per_s": run["tokens_per_s"],
        "latency_p50_s": run["latency_p50_s"],
        "mean_batch_size": run["mean_batch_size"],
    }


def markdown(report: dict) -> str:
    lines = [
        f"# Thread settings, quiet vs busy ({report['created_at']})",
        "",
        f"- host: {report['host']}",
        f"- pair: toy; continuous scheduler; busy = {report['neighbours']} spinning neighbour "
        f"process(es); lone = median of {report['num_lone']} single 64-token requests; "
        f"32 clients = closed loop, 64 tokens, {report['clients_s']:g} s",
        f"- command: `{report['command']}`",
        "",
    ]
    header = ["setting", "lone ms quiet", "lone ms busy", "busy/quiet",
              "32 clients tok/s quiet", "tok/s busy", "busy/quiet"]  # fmt: skip
    rows = []
    for name, by_condition in report["results"].items():
        quiet, busy = by_condition["quiet"], by_condition["busy"]
        rows.append([
            name, f"{quiet['lone_p50_s'] * 1e3:.0f}", f"{busy['lone_p50_s'] * 1e3:.0f}",
            fmt(ratio(busy["lone_p50_s"], quiet["lone_p50_s"]), ".2f"),
            f"{quiet['tokens_per_s']:,.0f}", f"{busy['tokens_per_s']:,.0f}",
            fmt(ratio(busy["tokens_per_s"], quiet["tokens_per_s"]), ".2f"),
        ])  # fmt: skip
    lines.append(table(header, rows))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(
        "threads",
        "Thread settings side by side, on a quiet machine and beside a CPU-bound "
        "neighbour: a lone request's latency and 32 clients' tokens/s.",
    )
    parser.add_argument(
        "--neighbours", type=int, default=1, help="spinning processes in the busy condition (1)"
    )
    parser.add_argument(
        "--clients-s", type=float, default=15.0, help="seconds of 32-client load per setting (15)"
    )
    parser.add_argument(
        "--lone", type=int, default=7, help="lone requests per setting; the median counts (7)"
    )
    add_output_option(parser, "threads-toy-cpu.json")
    args = parser.parse_args(argv)
    if args.neighbours < 1 or args.clients_s <= 0 or args.lone < 1:
        parser.error("--neighbours and --lone must be >= 1 and --clients-s > 0")
    num_cpus = os.cpu_count() or 1
    settings = default_settings(num_cpus)
    workload = Workload(
        name="threads", concurrency=(32,), max_new_tokens=IntRange(64, 64),
        mix=Mix(0.0, IntRange(1, 1)), duration_s=args.clients_s,
    )  # fmt: skip
    results: dict[str, dict] = {s.name: {} for s in settings}
    with ExitStack() as stack:
        urls = {}
        for setting in settings:
            servers = stack.enter_context(
                start_servers(
                    ["continuous"],
                    ["--after", "toy"],
                    server_args=setting.server_args,
                    extra_env=setting.env,
                )  # fmt: skip
            )
            urls[setting.name] = servers["continuous"].url
        for condition, busy in (("quiet", 0), ("busy", args.neighbours)):
            with neighbours(busy):
                for setting in settings:
                    log(f"[threads] {condition}: {setting.name}")
                    result = measure(urls[setting.name], workload, args.lone)
                    results[setting.name][condition] = result
                    log(f"  lone {result['lone_p50_s'] * 1e3:.0f} ms, "
                        f"{result['tokens_per_s']:,.0f} tokens/s")  # fmt: skip
    report = {
        "benchmark": "threads",
        "command": command_line("threads", argv),
        "host": host_description(),
        "neighbours": args.neighbours,
        "num_lone": args.lone,
        "clients_s": args.clients_s,
        "settings": {s.name: {"server_args": list(s.server_args), "env": s.env} for s in settings},
        "results": results,
        "created_at": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }
    text = markdown(report)
    print(text)
    write_report(args.output, report, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
