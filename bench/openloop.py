"""Open loop: requests arrive at random (Poisson) at a share of capacity; continuous vs static.

    python -m bench.openloop                         # toy pair, 16-128 tokens, 40% of capacity
    python -m bench.openloop --load 0.6 --duration-s 90

A closed loop (bench.load) sends a request when the last one returns, so a slow server slows
its own clients down; real users do not wait for each other. Here arrivals follow a Poisson
process at `--load` x capacity, capacity being the continuous server's closed-loop requests/s
at 32 clients on the same workload, measured first in the same run. Both modes get the same
arrival times and the same requests (a function of the seed and the index). Reported: median
and p95 latency of every request and of the short ones (max_new_tokens <= --short-tokens),
per mode, and continuous / static (issue 20's target: short requests' median <= 0.25x).
"""

from __future__ import annotations

import asyncio
import random
import statistics
import sys
import time
from dataclasses import replace

import httpx

from bench.load import (
    IntRange,
    Mix,
    RequestRecord,
    Workload,
    host_description,
    run_level,
    send,
    wait_idle,
)
from bench.report import add_output_option, bench_parser, command_line, table, write_report
from bench.servers import add_server_options, server_args, start_servers


def arrival_times(rate_per_s: float, duration_s: float, seed: int) -> list[float]:
    """Seconds from the start of each arrival of a Poisson process (the same for every mode)."""
    rng = random.Random(f"arrivals:{seed}")
    times, now = [], 0.0
    while True:
        now += rng.expovariate(rate_per_s)
        if now >= duration_s:
            return times
        times.append(now)


async def open_loop(url: str, workload: Workload, arrivals: list[float]) -> list[RequestRecord]:
    """Fire request i at arrivals[i] whatever is still in flight; wait for all of them."""
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=256)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=600) as client:
        await wait_idle(client)
        started = time.perf_counter()

        async def one(index: int, at: float) -> RequestRecord:
            await asyncio.sleep(max(0.0, started + at - time.perf_counter()))
            return await send(client, workload.request(index))

        return await asyncio.gather(*(one(i, at) for i, at in enumerate(arrivals)))


def latency_summary(records: list[RequestRecord], workload: Workload, short: int) -> dict:
    def stats(chosen: list[RequestRecord]) -> dict:
        latencies = sorted(r.latency_s for r in chosen)
        if not latencies:
            return {"n": 0, "p50_s": None, "p95_s": None}
        p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]
        return {"n": len(latencies), "p50_s": statistics.median(latencies), "p95_s": p95}

    ok = [r for r in records if r.status == 200]
    tokens = {r.index: workload.request(r.index).body["max_new_tokens"] for r in ok}
    return {
        "errors": len(records) - len(ok),
        "all": stats(ok),
        "short": stats([r for r in ok if tokens[r.index] <= short]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(
        "openloop",
        "Poisson arrivals at a share of capacity, continuous vs static batching, "
        "side by side on the same arrivals.",
    )
    parser.add_argument("--load", type=float, default=0.4, help="share of capacity (0.4)")
    parser.add_argument("--duration-s", type=float, default=60.0, help="seconds of arrivals (60)")
    parser.add_argument("--max-new-tokens", default="16-128", help="N or LOW-HIGH (16-128)")
    parser.add_argument("--short-tokens", type=int, default=32, help="short: <= this (32)")
    parser.add_argument(
        "--capacity-s", type=float, default=20.0,
        help="seconds of the closed-loop capacity run (20)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="arrivals and requests (0)")
    add_server_options(parser, "torch threads per server")
    add_output_option(parser, "openloop-toy-cpu.json")
    args = parser.parse_args(argv)
    low, _, high = args.max_new_tokens.partition("-")
    workload = Workload(
        name="open-loop",
        concurrency=(32,),
        max_new_tokens=IntRange(int(low), int(high or low)),
        mix=Mix(0.0, IntRange(1, 1)),
        duration_s=args.capacity_s,
        seed=args.seed,
    )
    serve_args = server_args(args, "--max-wait-ms", "10")
    modes = ["continuous", "static"]
    with start_servers(modes, ["--after", "toy"], server_args=serve_args) as servers:
        print("measuring capacity: continuous, 32 closed-loop clients", file=sys.stderr)
        closed = asyncio.run(run_level(servers["continuous"].url, "continuous", workload, 32, 600))
        capacity_rps = closed["requests_per_s"]
        rate = args.load * capacity_rps
        arrivals = arrival_times(rate, args.duration_s, args.seed)
        print(f"capacity {capacity_rps:.2f} req/s; {len(arrivals)} arrivals at {rate:.2f}/s",
              file=sys.stderr)  # fmt: skip
        offset = 1_000_000  # fresh request indices, after the capacity run's
        open_workload = replace(workload, seed=args.seed + offset)
        results = {}
        for mode in modes:
            print(f"open loop: {mode}", file=sys.stderr)
            records = asyncio.run(open_loop(servers[mode].url, open_workload, arrivals))
            results[mode] = latency_summary(records, open_workload, args.short_tokens)
    rows = []
    for kind in ("short", "all"):
        cont, stat = results["continuous"][kind], results["static"][kind]
        ratio = cont["p50_s"] / stat["p50_s"] if cont["p50_s"] and stat["p50_s"] else None
        rows.append([
            f"{kind} (n={cont['n']})", f"{cont['p50_s']:.3f}", f"{stat['p50_s']:.3f}",
            f"{cont['p95_s']:.3f}", f"{stat['p95_s']:.3f}", f"{ratio:.2f}",
        ])  # fmt: skip
    header = ["requests", "continuous p50 s", "static p50 s", "continuous p95 s",
              "static p95 s", "p50 continuous / static"]  # fmt: skip
    short_ratio = results["continuous"]["short"]["p50_s"] / results["static"]["short"]["p50_s"]
    command = command_line("openloop", argv)
    text = (
        f"# Open loop: Poisson arrivals at {args.load:.0%} of capacity "
        f"({time.strftime('%Y-%m-%d %H:%M:%S %z')})\n\n"
        f"- host: {host_description()}; toy pair; torch threads {args.threads} per server\n"
        f"- capacity {capacity_rps:.2f} req/s (continuous, 32 closed-loop clients); "
        f"{len(arrivals)} arrivals at {rate:.2f}/s for {args.duration_s:g} s; "
        f"max_new_tokens {args.max_new_tokens}; short = <= {args.short_tokens} tokens\n"
        f"- command: `{command}`\n\n"
        + table(header, rows)
        + f"\n\nshort requests' median latency, continuous / static: {short_ratio:.2f} "
        "(issue 20's target: <= 0.25)\n"
    )
    print(text)
    report = {
        "benchmark": "openloop",
        "command": command,
        "load": args.load,
        "capacity_requests_per_s": capacity_rps,
        "num_arrivals": len(arrivals),
        "workload": open_workload.describe(),
        "short_tokens": args.short_tokens,
        "server_args": serve_args,
        "results": results,
        "short_p50_ratio": short_ratio,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_report(args.output, report, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
