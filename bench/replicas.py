"""Replicas on Ray Serve against one plain server, in one run: scaling, the proxy's cost, balance.

    python -m bench.replicas                       # toy pair: direct, 1 and 2 replicas
    python -m bench.replicas --repeats 2           # A B C C B A order, to see the drift
    python -m bench.replicas --simulate 20,0.05 --max-batch-size 16 --clients 64 --kill
        # simulated device steps (no weights): direct, 1, 2 and 4 replicas, then one of the 4
        # replicas killed under load

Configurations on the same machine, same seeded request sequence (bench.load's closed-loop
clients): `direct` (one `batchserve serve` process, no Ray), `ray-1` (one replica behind Serve's
proxy: against `direct`, the proxy's overhead) and `ray-N` (N replicas: against `ray-1`, the
scaling). Before each load run, one client sends requests one at a time (`--probe-requests`),
so the proxy's added latency is seen without queueing. Every server and replica uses one torch
thread. Needs the ray extra. A local Ray cluster is started here (node address 127.0.0.1, no
dashboard, usage stats off) and stopped at the end.

With `--simulate STEP_MS,PER_ROW_MS`, servers and replicas run the simulated runner
(batchserve/worker/simulated.py): a step waits like a device without using the CPU, so what
this machine's CPUs limit is the serving layer alone (HTTP, scheduler, proxy) and the load
client. Each replica then reserves 0.25 of a Ray CPU.

Tokens/s, requests/s and latencies come from the client side, so they count every replica; rows
per replica come from each response's x-batchserve-replica header. `--kill` ends the run by
killing the busiest replica of the largest deployment under load, with the bundled client
(batchserve_client/api.py, which retries 503 + Retry-After), and counts what came back.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from batchserve.worker.simulated import SimulatedCost, simulated_cost_option
from bench.load import (
    IntRange,
    Mix,
    Workload,
    host_description,
    int_range_option,
    log,
    run_level,
    warm_up,
)
from bench.report import RESULTS_DIR, bench_parser, percentile, ratio, table, write_report
from bench.servers import free_port, start_servers

# Targets of issue 13 (toy pair) and issue 24 (simulated steps).
TOY_TARGETS = {"ray-2": 1.6}
SIMULATED_TARGETS = {"ray-2": 1.8, "ray-4": 3.4}
MAX_PROXY_OVERHEAD = 0.10  # of tokens/s, 1 replica behind Ray vs the plain server
MAX_REPLICA_SPREAD = 0.15  # most / fewest rows served, minus 1


def _loadavg() -> float:
    return round(os.getloadavg()[0], 2)


def _busy_processes() -> list[str]:
    """The machine's busiest processes right now: other people's work shows up here."""
    out = subprocess.run(
        ["ps", "-eo", "pcpu,comm", "--sort=-pcpu", "--no-headers"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.splitlines()
    return [line.strip() for line in out[:6]]


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_seconds_by_role(direct_pid: int) -> dict[str, float]:
    """CPU time so far of the serving processes: where the run's CPU went, and how much of the
    machine they got while others' work competed for it."""
    roles: dict[str, float] = {"replicas": 0.0, "proxy": 0.0, "direct": 0.0}
    processes: dict[int, tuple[int, bytes, float]] = {}  # pid -> parent, command line, CPU s
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        seconds = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime
        processes[int(entry.name)] = (int(fields[1]), cmdline, seconds)
    # Only this benchmark's own processes (its Ray cluster and its direct server are all
    # descendants of it): other people's Ray clusters run on the same machine.
    mine = {os.getpid()}
    while True:
        more = {pid for pid, (parent, _, _) in processes.items() if parent in mine} - mine
        if not more:
            break
        mine |= more
    for pid in mine - {os.getpid()}:
        _, cmdline, seconds = processes[pid]
        if b"ServeReplica" in cmdline:
            roles["replicas"] += seconds
        elif b"ProxyActor" in cmdline:
            roles["proxy"] += seconds
        elif pid == direct_pid:
            roles["direct"] += seconds
    roles["bench_client"] = time.process_time()
    return roles


def _machine_busy() -> tuple[int, int]:
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def _add_cpu_metrics(run: dict) -> None:
    cores = run["cores_used"]
    serving = cores["direct"] if run["mode"] == "direct" else cores["replicas"]
    run["tokens_per_serving_cpu_s"] = run["tokens_per_s"] / serving if serving else None
    # CPU the serving side spends per generated token, proxy included: unlike tokens/s, this
    # does not depend on how much of the machine other people's work left us.
    run["serving_cpu_ms_per_token"] = (serving + cores["proxy"]) / run["tokens_per_s"] * 1e3
    run["proxy_cpu_ms_per_request"] = cores["proxy"] / run["requests_per_s"] * 1e3


def _replica_spread(rows_by_replica: dict[str, int], num_replicas: int) -> float | None:
    """Most rows one replica served over the fewest, minus 1 (0 = perfectly even); a replica
    that served nothing counts as 0 rows."""
    if num_replicas < 2:
        return None
    counts = sorted(rows_by_replica.values(), reverse=True)[:num_replicas]
    counts += [0] * (num_replicas - len(counts))
    return counts[0] / counts[-1] - 1 if counts[-1] else float("inf")


# --- measuring one configuration ------------------------------------------------------------------


async def probe_latency(url: str, workload: Workload, num_requests: int, max_new_tokens: int):
    """One client, one request at a time: the latency of the path with no queue in it."""
    latencies: list[float] = []
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        for index in range(num_requests):
            body = workload.request(index).body | {"max_new_tokens": max_new_tokens}
            started = time.perf_counter()
            response = await client.post("/generate_lda", json=body)
            if response.status_code == 200:
                latencies.append(time.perf_counter() - started)
    return {
        "num_requests": num_requests,
        "max_new_tokens": max_new_tokens,
        "num_ok": len(latencies),
        "latency_p50_s": percentile(latencies, 50),
        "latency_mean_s": sum(latencies) / len(latencies) if latencies else None,
    }


def _measure(
    url: str,
    name: str,
    workload: Workload,
    runs: list[dict],
    direct_pid: int,
    *,
    num_replicas: int,
    probe: dict,
) -> None:
    load_before = _loadavg()
    cpu_before, busy_before = _cpu_seconds_by_role(direct_pid), _machine_busy()
    run = asyncio.run(run_level(url, name, workload, workload.concurrency[0], 120.0))
    cpu_after, busy_after = _cpu_seconds_by_role(direct_pid), _machine_busy()
    cores_used = {
        role: round((cpu_after[role] - cpu_before[role]) / run["wall_s"], 3) for role in cpu_after
    }
    run["num_replicas"] = num_replicas
    run["cores_used"] = cores_used
    run["machine_busy_fraction"] = round(
        (busy_after[0] - busy_before[0]) / max(1, busy_after[1] - busy_before[1]), 3
    )
    _add_cpu_metrics(run)
    if num_replicas > 1:
        # /metrics through the proxy is one replica's, whichever answered: meaningless here.
        for key in ("mean_batch_size", "engine_steps", "server_decode_tokens_per_s"):
            run.pop(key, None)
        run.pop("step_ms_mean", None)
    run.pop("latencies_s", None)
    run["replica_spread"] = _replica_spread(run["rows_by_replica"], num_replicas)
    run["probe"] = probe
    run |= {"loadavg_1m_before": load_before, "loadavg_1m_after": _loadavg()}
    run["busy_processes_after"] = _busy_processes()
    runs.append(run)
    log(
        f"{name}: {run['tokens_per_s']:,.1f} tokens/s, p50 {run['latency_p50_s']:.3f} s, "
        f"errors {run['num_errors']}, rows by replica {sorted(run['rows_by_replica'].values())}, "
        f"mean batch {run.get('mean_batch_size')}, step {run.get('step_ms_mean')} ms, "
        f"load {load_before} -> {run['loadavg_1m_after']}"
    )


# --- a replica killed under load ------------------------------------------------------------------


def _replica_actors() -> list[dict[str, str]]:
    import ray

    return [
        a for a in ray.util.list_named_actors(all_namespaces=True) if "SERVE_REPLICA" in a["name"]
    ]


def kill_replica_with_fresh_requests(
    min_ongoing: int, *, is_running: Callable[[], bool], timeout_s: float = 60.0
) -> tuple[str, int]:
    """Kills (no restart by Ray) a replica the moment its requests in flight rose to at least
    `min_ongoing`; returns its name and that count.

    A count read a moment before the kill can be stale: a batch's requests end together, so a
    replica with 4 in flight may have none by the time the kill lands, and the kill then cuts
    nothing off (seen in CI). Requests that arrived since the previous poll have just started
    and cannot have finished within the few milliseconds to the kill. The handles are kept,
    the replicas polled together, and the kill sent straight after the poll that saw the rise.
    """
    import ray

    actors = {
        a["name"]: ray.get_actor(a["name"], namespace=a["namespace"]) for a in _replica_actors()
    }
    names = list(actors)
    previous: list[int] | None = None  # the first poll is only the baseline: its counts are old
    deadline = time.monotonic() + timeout_s
    while True:
        if not is_running():
            raise RuntimeError("the load ended before a replica could be killed")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no replica reached {min_ongoing} new requests in {timeout_s} s")
        counts = ray.get([actors[n].get_num_ongoing_requests.remote() for n in names])
        for name, count, before in zip(names, counts, previous or counts, strict=True):
            if count >= min_ongoing and count > before:
                ray.kill(actors[name], no_restart=True)
                return name, count
        previous = counts


async def kill_under_load(
    url: str, workload: Workload, *, duration_s: float, kill_after_s: float
) -> dict:
    """Closed-loop clients of the bundled client for duration_s; from kill_after_s on, the
    first replica whose requests in flight rise is killed (no restart by Ray: Serve starts a
    replacement). Every request started is waited for, so each is counted as answered, or
    failed after the client's retries."""
    from batchserve_client.api import AsyncLDAClient
    from batchserve_client.models import RetryPolicy

    retries: Counter[str] = Counter()
    retried_requests = 0
    outcomes: Counter[str] = Counter()
    tokens = 0
    started = time.perf_counter()
    deadline = started + duration_s
    indices = iter(range(1_000_000))
    kill: dict[str, Any] = {}

    def on_retry(route: str, reason: str, delay_s: float, attempt: int) -> None:
        nonlocal retried_requests
        retries[reason] += 1
        retried_requests += attempt == 1

    # Enough retries, 1 s apart (the proxy's Retry-After), to outlast Serve noticing the death.
    policy = RetryPolicy(max_retries=10, backoff_s=0.5, max_backoff_s=4.0)
    async with AsyncLDAClient(
        url, retry=policy, on_retry=on_retry, timeout_s=120, max_connections=256
    ) as client:

        async def client_loop() -> None:
            nonlocal tokens
            while time.perf_counter() < deadline:
                body = dict(workload.request(next(indices)).body)  # single prompts only
                prompt = body.pop("prompt")
                try:
                    response = await client.generate_lda(prompt, **body)
                except Exception as err:  # noqa: BLE001 - counted: the thing being measured
                    outcomes[f"failed: {type(err).__name__}: {str(err)[:80]}"] += 1
                else:
                    outcomes["ok"] += 1
                    tokens += response.tokens_generated

        async def killer() -> None:
            await asyncio.sleep(kill_after_s)
            victim, ongoing = await asyncio.to_thread(
                kill_replica_with_fresh_requests,
                1,
                is_running=lambda: time.perf_counter() < deadline,
            )
            kill.update(
                at_s=round(time.perf_counter() - started, 2),
                replica=victim,
                ongoing_requests=ongoing,
            )
            log(f"killed {victim} with {ongoing} requests in flight")

        await asyncio.gather(killer(), *(client_loop() for _ in range(workload.concurrency[0])))
    wall_s = time.perf_counter() - started
    num_failed = sum(n for key, n in outcomes.items() if key != "ok")
    return {
        "duration_s": duration_s,
        "wall_s": round(wall_s, 2),
        "kill": kill,
        "num_requests": sum(outcomes.values()),
        "num_ok": outcomes["ok"],
        "num_failed": num_failed,
        "outcomes": dict(outcomes),
        "num_retried_requests": retried_requests,
        "retries_by_reason": dict(retries),
        "tokens_per_s": tokens / wall_s,
        "replicas_after": len(_replica_actors()),
    }


# --- the report -----------------------------------------------------------------------------------


def _mean(runs: list[dict], name: str, key: str) -> float | None:
    values = [r[key] for r in runs if r["mode"] == name and r.get(key) is not None]
    return sum(values) / len(values) if values else None


def summarize(runs: list[dict], targets: dict[str, float]) -> dict:
    names = list(dict.fromkeys(r["mode"] for r in runs))
    tps = {name: _mean(runs, name, "tokens_per_s") for name in names}
    p50 = {name: _mean(runs, name, "latency_p50_s") for name in names}
    cpu = {name: _mean(runs, name, "serving_cpu_ms_per_token") for name in names}
    probes = [{"mode": r["mode"], **r["probe"]} for r in runs if r.get("probe")]
    probe = {name: _mean(probes, name, "latency_p50_s") for name in names}
    spread = {
        name: max(values)
        for name in names
        if (values := [r.get("replica_spread") for r in runs if r["mode"] == name])
        and None not in values
    }
    return {
        "serving_cpu_ms_per_token": cpu,
        "proxy_cpu_ms_per_request": _mean(runs, "ray-1", "proxy_cpu_ms_per_request"),
        "ray1_over_direct_cpu_per_token": ratio(cpu.get("ray-1"), cpu.get("direct")),
        "tokens_per_s": tps,
        "latency_p50_s": p50,
        "unloaded_latency_p50_s": probe,
        "over_ray1_tokens_per_s": {name: ratio(tps[name], tps.get("ray-1")) for name in names},
        "over_direct_tokens_per_s": {name: ratio(tps[name], tps.get("direct")) for name in names},
        "proxy_overhead_tokens_per_s": 1 - (ratio(tps.get("ray-1"), tps.get("direct")) or 0),
        "proxy_overhead_latency_p50_s": (p50.get("ray-1") or 0) - (p50.get("direct") or 0),
        "proxy_added_unloaded_latency_s": (
            None
            if None in (probe.get("ray-1"), probe.get("direct"))
            else probe["ray-1"] - probe["direct"]
        ),
        "replica_spread": spread,
        "targets_over_ray1": targets,
    }


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:+.1f} ms"


def _verdict(holds: bool | None) -> str:
    return "n/a" if holds is None else ("yes" if holds else "**no**")


def targets_rows(report: dict) -> list[list[str]]:
    s = report["summary"]
    rows = []
    tps = s["tokens_per_s"]
    for name, needed in s["targets_over_ray1"].items():
        got = s["over_ray1_tokens_per_s"].get(name)
        measured = (
            "not run" if got is None else f"{got:.2f}x ({tps[name]:,.0f} vs {tps['ray-1']:,.0f})"
        )
        rows.append(
            [f"{name} / ray-1 tokens/s", measured, f">= {needed}x", _verdict(got and got >= needed)]
        )
    overhead = s["proxy_overhead_tokens_per_s"]
    rows.append(
        [
            "Ray's overhead at 1 replica (tokens/s lost vs direct)",
            f"{overhead:.1%} ({tps.get('ray-1') or 0:,.0f} vs {tps.get('direct') or 0:,.0f})",
            f"< {MAX_PROXY_OVERHEAD:.0%}",
            _verdict(overhead < MAX_PROXY_OVERHEAD),
        ]
    )
    for name, spread in s["replica_spread"].items():
        rows.append(
            [
                f"{name}: most / fewest rows per replica - 1",
                f"{spread:.1%}",
                f"<= {MAX_REPLICA_SPREAD:.0%}",
                _verdict(spread <= MAX_REPLICA_SPREAD),
            ]
        )
    return rows


def markdown(report: dict) -> str:
    s = report["summary"]
    workload = report["workload"]
    simulate = report.get("simulate")
    pair = (
        f"the simulated runner, {SimulatedCost(**simulate).describe()} (no weights; toy tokenizer)"
        if simulate
        else "the embedded toy pair, one torch thread per server"
    )
    lines = [
        f"# Ray Serve replicas ({report['started']})",
        "",
        "```",
        report.get("command", "python -m bench.replicas"),
        "```",
        "",
        f"- host: {report['host']}; runner: {pair}",
        f"- workload: {workload['concurrency'][0]} closed-loop clients, "
        f"max_new_tokens {workload['max_new_tokens']}, single prompts, "
        f"{workload['duration_s']:g} s per run; max batch size per server / replica "
        f"{report.get('max_batch_size') or 'default'}, max ongoing requests per replica "
        f"{report.get('max_ongoing_requests') or 'default'}; order {' '.join(report['order'])}",
        f"- ray {report['ray_version']}; the bench client, Serve's proxy and the replicas share "
        "the machine's cores with everyone else's work",
    ]
    if report.get("ideal_tokens_per_s_per_replica"):
        lines.append(
            f"- ceiling from the cost model: {report['ideal_tokens_per_s_per_replica']:,.0f} "
            "tokens/s per full replica (max batch rows per decode step), x replicas"
        )
    lines += [
        "",
        "Cores used = CPU seconds per wall second of the server (direct) or all replicas, of "
        "Serve's proxy and of the bench client; machine busy = all cores, everyone's work. "
        "Unloaded p50 = one client, one request at a time, before the load run.",
        "",
    ]
    rows = []
    for r in report["runs"]:
        cores = r["cores_used"]
        server = cores["direct"] if r["mode"] == "direct" else cores["replicas"]
        probe = r.get("probe") or {}
        by_replica = sorted(r.get("rows_by_replica", {}).values(), reverse=True)
        rows.append(
            [
                r["mode"],
                f"{r['tokens_per_s']:,.1f}",
                f"{r['requests_per_s']:.2f}",
                f"{r['latency_p50_s']:.3f}",
                f"{r['latency_p95_s']:.3f}",
                f"{probe['latency_p50_s']:.3f}" if probe.get("latency_p50_s") else "-",
                str(r["num_errors"]),
                f"{server:.2f} / {cores['proxy']:.2f} / {cores['bench_client']:.2f}",
                f"{r['proxy_cpu_ms_per_request']:.1f}" if r["mode"] != "direct" else "-",
                " / ".join(map(str, by_replica)) or "-",
                f"{r['machine_busy_fraction']:.0%}",
                f"{r['loadavg_1m_before']} -> {r['loadavg_1m_after']}",
            ]
        )
    header = [
        "config", "tokens/s", "req/s", "lat p50 s", "lat p95 s", "unloaded p50 s", "errors",
        "cores: server(s) / proxy / client", "proxy CPU ms / req", "rows per replica",
        "machine busy", "load 1m before -> after",
    ]  # fmt: skip
    align = ["---", *["---:"] * 6, "---", "---:", "---", "---:", "---"]
    lines.append(table(header, rows, align))
    lines += ["", "## Targets", ""]
    lines.append(
        table(
            ["target", "measured", "needed", "holds"],
            targets_rows(report),
            ["---", "---:", "---:", ":---:"],
        )
    )
    lines += [
        "",
        f"- proxy overhead (1 replica vs direct): "
        f"{s['proxy_overhead_latency_p50_s'] * 1000:+.0f} ms p50 latency under load, "
        f"{_ms(s['proxy_added_unloaded_latency_s'])} unloaded; CPU "
        f"{s['proxy_cpu_ms_per_request'] or 0:.1f} ms in the proxy per request; serving CPU "
        f"{s['serving_cpu_ms_per_token'].get('ray-1') or 0:.3f} vs "
        f"{s['serving_cpu_ms_per_token'].get('direct') or 0:.3f} ms per token "
        f"({s['ray1_over_direct_cpu_per_token'] or 0:.2f}x)",
        "",
    ]
    kill = report.get("kill")
    if kill:
        lines += [
            "## A replica killed under load",
            "",
            f"{kill['num_replicas']} replicas, {workload['concurrency'][0]} clients of the "
            f"bundled client (batchserve_client/api.py: retries 503 after Retry-After, and connection "
            f"errors), {kill['duration_s']:g} s; the busiest replica killed at "
            f"{kill['kill'].get('at_s')} s with {kill['kill'].get('ongoing_requests')} requests "
            "in flight (ray.kill, no restart: Serve starts a replacement).",
            "",
            table(
                [
                    "requests",
                    "answered",
                    "failed after retries",
                    "requests retried",
                    "retries by reason",
                    "tokens/s",
                    "replicas after",
                ],
                [
                    [
                        str(kill["num_requests"]),
                        str(kill["num_ok"]),
                        str(kill["num_failed"]),
                        str(kill["num_retried_requests"]),
                        ", ".join(f"{k}: {v}" for k, v in kill["retries_by_reason"].items()) or "-",
                        f"{kill['tokens_per_s']:,.0f}",
                        str(kill["replicas_after"]),
                    ]
                ],
            ),
            "",
        ]
        if kill["num_failed"]:
            lines += [f"Failures: {kill['outcomes']}", ""]
    return "\n".join(lines)


# --- the run --------------------------------------------------------------------------------------


def _wait_for_replicas(count: int, timeout_s: float = 180.0) -> None:
    from ray import serve

    from batchserve.api.ray_serve import APP_NAME

    deadline = time.monotonic() + timeout_s
    while True:
        app = serve.status().applications.get(APP_NAME)
        states = app.deployments["BatchServe"].replica_states if app else {}
        if states.get("RUNNING", 0) == count and sum(states.values()) == count:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"not {count} replicas running after {timeout_s:.0f} s: {states}")
        time.sleep(0.2)


def build_parser() -> argparse.ArgumentParser:
    parser = bench_parser(
        "replicas",
        __doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--clients", type=int, default=None, help="(default: 32; 64 simulated)")
    parser.add_argument(
        "--max-new-tokens", type=int_range_option, default=IntRange(64, 64), help="N or LOW-HIGH"
    )
    parser.add_argument("--duration-s", type=float, default=20.0)
    parser.add_argument(
        "--replicas",
        type=lambda text: tuple(int(x) for x in text.split(",")),
        default=None,
        help="replica counts to run, e.g. 1,2,4 (default: 1,2; 1,2,4 simulated)",
    )
    parser.add_argument(
        "--simulate",
        type=simulated_cost_option,
        default=None,
        metavar="STEP_MS,PER_ROW_MS[,PREFILL_MS_PER_TOKEN]",
        help="simulated runner in every server and replica (see batchserve serve --simulate)",
    )
    parser.add_argument(
        "--max-batch-size", type=int, default=None, help="per server and replica (default: 64)"
    )
    parser.add_argument(
        "--max-ongoing-requests",
        type=int,
        default=None,
        help="per replica, as `serve --max-ongoing-requests` (default: the server's default)",
    )
    parser.add_argument("--probe-requests", type=int, default=20, help="unloaded latency probe")
    parser.add_argument(
        "--kill", action="store_true", help="end by killing a replica of the largest deployment"
    )
    parser.add_argument("--kill-duration-s", type=float, default=20.0)
    parser.add_argument("--kill-after-s", type=float, default=6.0)
    parser.add_argument("--repeats", type=int, default=1, help="2 runs A B C C B A")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument(
        "--render", type=Path, default=None, help="rewrite the .md of a saved JSON, run nothing"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.render:
        report = json.loads(args.render.read_text())
        for run in report["runs"]:
            _add_cpu_metrics(run)
        targets = report["summary"].get("targets_over_ray1", TOY_TARGETS)
        report["summary"] = summarize(report["runs"], targets)
        write_report(args.render, report, markdown(report))
        print(markdown(report))
        return 0

    simulate: SimulatedCost | None = args.simulate
    replica_counts = args.replicas or ((1, 2, 4) if simulate else (1, 2))
    clients = args.clients or (64 if simulate else 32)
    default_name = "replicas-simulated-cpu.json" if simulate else "ray-replicas-toy.json"
    output = args.output or RESULTS_DIR / default_name
    targets = SIMULATED_TARGETS if simulate else TOY_TARGETS
    targets = {name: v for name, v in targets.items() if int(name[4:]) in replica_counts}

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only (see cli)
    import ray
    from ray import serve

    from batchserve.api.app import ServerConfig
    from batchserve.api.ray_serve import (
        APP_NAME,
        PROXY_CALLBACK,
        SIMULATED_REPLICA_CPUS,
        DeploymentOptions,
        ReplicaSpec,
        build_application,
        default_max_ongoing_requests,
    )
    from batchserve.core.scheduler import SchedulerConfig

    os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", PROXY_CALLBACK)
    workload = Workload(
        name="single",
        concurrency=(clients,),
        max_new_tokens=args.max_new_tokens,
        mix=Mix(0.0, IntRange(1, 1)),
        duration_s=args.duration_s,
    )
    order = ["direct", *(f"ray-{n}" for n in replica_counts)]
    if args.repeats > 1:
        order += order[::-1]
    scheduler = SchedulerConfig(
        **({"max_batch_size": args.max_batch_size} if args.max_batch_size else {})
    )
    spec = ReplicaSpec(
        config=ServerConfig(scheduler=scheduler, simulate=simulate),
        after="toy:after",
        threads="1",
        log_level="warning",
    )
    num_cpus = SIMULATED_REPLICA_CPUS if simulate else 1.0
    server_args = ["--threads", "1"]
    if args.max_batch_size:
        server_args += ["--max-batch-size", str(args.max_batch_size)]
    if simulate:
        cost = f"{simulate.step_ms:g},{simulate.per_row_ms:g},{simulate.prefill_ms_per_token:g}"
        server_args += ["--simulate", cost]

    def deployment(replicas: int) -> DeploymentOptions:
        return DeploymentOptions(
            replicas=replicas, num_cpus=num_cpus, max_ongoing_requests=args.max_ongoing_requests
        )

    runs: list[dict] = []
    kill: dict | None = None
    started = time.strftime("%Y-%m-%d %H:%M:%S %z")
    port = free_port()
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        object_store_memory=100 * 1024 * 1024,
        logging_level="WARNING",
        log_to_driver=False,
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        ray_url = f"http://127.0.0.1:{port}"
        with start_servers(["continuous"], ["--after", "toy"], server_args=server_args) as s:
            direct_url, direct_pid = s["continuous"].url, s["continuous"].pid
            asyncio.run(warm_up(direct_url))
            deployed = 0
            for name in order:
                replicas = 0 if name == "direct" else int(name.split("-")[1])
                if replicas and replicas != deployed:
                    log(f"deploying {replicas} replica(s)")
                    options = deployment(replicas)
                    serve.run(build_application(spec, options), name=APP_NAME, route_prefix="/")
                    _wait_for_replicas(replicas)
                    deployed = replicas
                    asyncio.run(warm_up(ray_url))
                url = ray_url if replicas else direct_url
                probe = asyncio.run(probe_latency(url, workload, args.probe_requests, 8))
                _measure(url, name, workload, runs, direct_pid, num_replicas=replicas, probe=probe)
            if args.kill:
                largest = max(replica_counts)
                if deployed != largest:
                    options = deployment(largest)
                    serve.run(build_application(spec, options), name=APP_NAME, route_prefix="/")
                    _wait_for_replicas(largest)
                log(f"killing one of {largest} replicas under load")
                kill = asyncio.run(
                    kill_under_load(
                        ray_url,
                        workload,
                        duration_s=args.kill_duration_s,
                        kill_after_s=args.kill_after_s,
                    )
                )
                kill["num_replicas"] = largest
                log(
                    f"kill: {kill['num_ok']} ok, {kill['num_failed']} failed, {kill['retries_by_reason']}"
                )
    finally:
        serve.shutdown()
        ray.shutdown()
    report = {
        "command": shlex.join(["python", "-m", "bench.replicas", *argv]),
        "started": started,
        "host": host_description(),
        "ray_version": ray.__version__,
        "simulate": None if simulate is None else dataclasses.asdict(simulate),
        "max_batch_size": scheduler.max_batch_size,
        "max_ongoing_requests": args.max_ongoing_requests
        or default_max_ongoing_requests(scheduler),
        "ideal_tokens_per_s_per_replica": (
            None
            if simulate is None
            else scheduler.max_batch_size / simulate.step_s(scheduler.max_batch_size, 0)
        ),
        "workload": workload.describe(),
        "order": order,
        "runs": runs,
        "kill": kill,
        "summary": summarize(runs, targets),
    }
    write_report(output, report, markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
