"""Open loop: requests arrive at random (Poisson) at a share of capacity; continuous vs static.

    python -m bench.openloop                         # toy pair, 16-128 tokens, 40% of capacity
    python -m bench.openloop --load 0.6 --duration-s 90 --rounds 4

A closed loop (bench.load) sends a request when the last one returns, so a slow server slows
its own clients down; real users do not wait for each other. Here arrivals follow a Poisson
process at `--load` x capacity, capacity being the continuous server's closed-loop requests/s
at 32 clients on the same workload, measured first in the same run. Both modes get the same
arrival times and the same requests (a function of the seed and the index). Reported: median
and p95 latency of every request and of the short ones (max_new_tokens <= --short-tokens),
per mode, and continuous / static (issue 20's target: short requests' median <= 0.25x).
The modes run one after the other, so with `--rounds` each round draws its own arrivals and
every other round runs static first: the host's drift over minutes then favours neither mode.
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
from bench.report import (
    add_output_option,
    bench_parser,
    command_line,
    ratio,
    round_order,
    table,
    write_report,
)
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


async def one_at_a_time(url: str, workload: Workload, indices: list[int]) -> list[RequestRecord]:
    """These requests sent one after another to the idle server: each alone in its steps, the
    fastest the server serves them, so the floor of their latency under any load."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await wait_idle(client)
        return [await send(client, workload.request(i)) for i in indices]


def short_indices(workload: Workload, count: int, short: int, search: int = 100_000) -> list[int]:
    """The first `count` requests of the workload with max_new_tokens <= short (fewer where
    the first `search` requests hold fewer)."""
    return [i for i in range(search) if workload.request(i).body["max_new_tokens"] <= short][:count]


def latencies_by_kind(
    records: list[RequestRecord], workload: Workload, short: int
) -> dict[str, list[float]]:
    """The successful requests' latencies, all and short ones (max_new_tokens <= short)."""
    ok = [r for r in records if r.status == 200]
    tokens = {r.index: workload.request(r.index).body["max_new_tokens"] for r in ok}
    return {
        "all": [r.latency_s for r in ok],
        "short": [r.latency_s for r in ok if tokens[r.index] <= short],
        "errors": [r.latency_s for r in records if r.status != 200],
    }


def latency_stats(latencies: list[float]) -> dict:
    ordered = sorted(latencies)
    if not ordered:
        return {"n": 0, "p50_s": None, "p95_s": None}
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    return {"n": len(ordered), "p50_s": statistics.median(ordered), "p95_s": p95}


ROUND_HEADER = [
    "round", "order", "arrivals", "short p50 continuous s", "short p50 static s",
    "continuous / static",
]  # fmt: skip


def run_rounds(
    urls: dict[str, str], workload: Workload, rate_per_s: float, duration_s: float,
    rounds: int, short: int, alone: int = 0,
) -> tuple[dict[str, dict[str, list[float]]], list[dict], list[float]]:  # fmt: skip
    """Each round draws its own arrivals and requests (the seed plus the round) and runs every
    mode on them, then sends `alone` of its short requests one at a time to the first mode's
    server. Returns each mode's latencies pooled over the rounds, per round the arrivals and
    the short requests' median ratio (the first mode over the second), and the latencies of
    the short requests sent alone."""
    pooled: dict[str, dict[str, list[float]]] = {
        mode: {"all": [], "short": [], "errors": []} for mode in urls
    }
    per_round = []
    alone_latencies: list[float] = []
    for round_index in range(rounds):
        arrivals = arrival_times(rate_per_s, duration_s, workload.seed + round_index)
        round_workload = replace(workload, seed=workload.seed + round_index)
        medians = {}
        for mode in round_order(list(urls), round_index):
            print(f"round {round_index + 1} of {rounds}, open loop: {mode} "
                  f"({len(arrivals)} arrivals)", file=sys.stderr)  # fmt: skip
            records = asyncio.run(open_loop(urls[mode], round_workload, arrivals))
            found = latencies_by_kind(records, round_workload, short)
            for kind, values in found.items():
                pooled[mode][kind] += values
            medians[mode] = latency_stats(found["short"])["p50_s"]
        first, second = list(urls)[:2]
        if alone:
            # Fresh requests: the round's own would hit the prefix cache they just filled.
            alone_workload = replace(round_workload, seed=round_workload.seed + 500_000)
            print(f"round {round_index + 1} of {rounds}: {alone} short requests alone on "
                  f"{first}", file=sys.stderr)  # fmt: skip
            records = asyncio.run(
                one_at_a_time(
                    urls[first], alone_workload, short_indices(alone_workload, alone, short)
                )
            )
            alone_latencies += [r.latency_s for r in records if r.status == 200]
        per_round.append({
            "round": round_index,
            "order": round_order(list(urls), round_index),
            "num_arrivals": len(arrivals),
            "short_p50_s": medians,
            "short_p50_ratio": ratio(medians[first], medians[second]),
        })  # fmt: skip
    return pooled, per_round, alone_latencies


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
    parser.add_argument(
        "--alone", type=int, default=20,
        help="short requests per round also sent one at a time to the idle continuous "
        "server: the floor of their latency, and so of the ratio (20; 0: none)",
    )  # fmt: skip
    parser.add_argument(
        "--rounds", type=int, default=2,
        help="rounds of --duration-s, each with its own arrivals; every other round runs "
        "static first, so a drifting host favours neither mode; latencies are pooled (2)",
    )  # fmt: skip
    add_server_options(parser, "torch threads per server")
    add_output_option(parser, "openloop-toy-cpu.json")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.alone < 0:
        parser.error("--rounds must be >= 1 and --alone >= 0")
    low, _, high = args.max_new_tokens.partition("-")
    if args.short_tokens < int(low):
        parser.error(f"no request is short: --short-tokens {args.short_tokens} is under "
                     f"--max-new-tokens {args.max_new_tokens}")  # fmt: skip
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
        print(f"capacity {capacity_rps:.2f} req/s; arrivals at {rate:.2f}/s", file=sys.stderr)
        offset = 1_000_000  # fresh request indices, after the capacity run's
        open_workload = replace(workload, seed=args.seed + offset)
        urls = {mode: servers[mode].url for mode in modes}
        pooled, per_round, alone = run_rounds(
            urls, open_workload, rate, args.duration_s, args.rounds, args.short_tokens,
            args.alone,
        )  # fmt: skip
    results = {
        mode: {
            "errors": len(found["errors"]),
            "all": latency_stats(found["all"]),
            "short": latency_stats(found["short"]),
        }
        for mode, found in pooled.items()
    }
    rows = []
    for kind in ("short", "all"):
        cont, stat = results["continuous"][kind], results["static"][kind]
        rows.append([
            f"{kind} (n={cont['n']})", fmt_s(cont["p50_s"]), fmt_s(stat["p50_s"]),
            fmt_s(cont["p95_s"]), fmt_s(stat["p95_s"]),
            fmt_ratio(ratio(cont["p50_s"], stat["p50_s"])),
        ])  # fmt: skip
    header = ["requests", "continuous p50 s", "static p50 s", "continuous p95 s",
              "static p95 s", "p50 continuous / static"]  # fmt: skip
    short_ratio = ratio(
        results["continuous"]["short"]["p50_s"], results["static"]["short"]["p50_s"]
    )
    num_arrivals = sum(r["num_arrivals"] for r in per_round)
    alone_stats = latency_stats(alone)
    static_short = results["static"]["short"]["p50_s"]
    floor = ratio(alone_stats["p50_s"], static_short)
    floor_text = (
        f"\n\nOther short requests of the same kind, sent one at a time to the idle continuous "
        f"server after each round (n={alone_stats['n']}): p50 {fmt_s(alone_stats['p50_s'])} s. "
        "No load makes a request faster than alone in its steps, so against static's median "
        f"above the ratio's floor is about {fmt_ratio(floor)} (an estimate: a sample, measured "
        "between the rounds)."
        if alone_stats["n"]
        else ""
    )
    errors = {mode: results[mode]["errors"] for mode in modes}
    round_rows = [
        [str(r["round"] + 1), " then ".join(r["order"]), str(r["num_arrivals"]),
         fmt_s(r["short_p50_s"]["continuous"]), fmt_s(r["short_p50_s"]["static"]),
         fmt_ratio(r["short_p50_ratio"])]
        for r in per_round
    ]  # fmt: skip
    command = command_line("openloop", argv)
    text = (
        f"# Open loop: Poisson arrivals at {args.load:.0%} of capacity "
        f"({time.strftime('%Y-%m-%d %H:%M:%S %z')})\n\n"
        f"- host: {host_description()}; toy pair; torch threads {args.threads} per server\n"
        f"- capacity {capacity_rps:.2f} req/s (continuous, 32 closed-loop clients); "
        f"{args.rounds} round(s) of {args.duration_s:g} s at {rate:.2f} arrivals/s "
        f"({num_arrivals} in all); max_new_tokens {args.max_new_tokens}; "
        f"short = <= {args.short_tokens} tokens; errors {errors}\n"
        f"- command: `{command}`\n\n"
        + f"Latencies pooled over the rounds:\n\n{table(header, rows)}\n\n"
        + "Per round (each its own arrivals; every other round static first):\n\n"
        + table(ROUND_HEADER, round_rows)
        + f"\n\nshort requests' median latency, continuous / static: {fmt_ratio(short_ratio)} "
        "(issue 20's target: <= 0.25)" + floor_text + "\n"
    )
    print(text)
    report = {
        "benchmark": "openloop",
        "command": command,
        "load": args.load,
        "rounds": args.rounds,
        "capacity_requests_per_s": capacity_rps,
        "arrivals_per_s": rate,
        "num_arrivals": num_arrivals,
        "workload": open_workload.describe(),
        "short_tokens": args.short_tokens,
        "server_args": serve_args,
        "results": results,
        "per_round": per_round,
        "short_p50_ratio": short_ratio,
        "alone": alone_stats,
        "short_p50_ratio_floor": floor,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_report(args.output, report, text)
    return 0


def fmt_s(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    sys.exit(main())
