"""Replicas on Ray Serve: 1 vs 2 replicas of the toy pair, and the proxy's cost, in one run.

    python -m bench.replicas                       # 32 clients, 64 tokens, 20 s per config
    python -m bench.replicas --repeats 2           # A B C C B A order, to see the drift

Three configurations on the same machine, same seeded request sequence (bench.load's closed-loop
clients): `direct` (one `batchserve serve` process, no Ray), `ray-1` (one replica behind Serve's
proxy: against `direct`, the proxy's overhead) and `ray-2` (two replicas: against `ray-1`, the
scaling). Every server and replica uses one torch thread. Needs the ray extra. A local Ray
cluster is started here (node address 127.0.0.1, no dashboard, usage stats off) and stopped
at the end.

Tokens/s, requests/s and latencies come from the client side, so they count every replica; the
server-side columns of bench.load (mean batch, engine steps) come from whichever replica
answered /metrics and are left out of the tables here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

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
from bench.report import ratio, table
from bench.servers import free_port, start_servers

RESULTS_DIR = Path(__file__).parent / "results"


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


def _measure(url: str, name: str, workload: Workload, runs: list[dict], direct_pid: int) -> None:
    load_before = _loadavg()
    cpu_before, busy_before = _cpu_seconds_by_role(direct_pid), _machine_busy()
    run = asyncio.run(run_level(url, name, workload, workload.concurrency[0], 120.0))
    cpu_after, busy_after = _cpu_seconds_by_role(direct_pid), _machine_busy()
    cores_used = {
        role: round((cpu_after[role] - cpu_before[role]) / run["wall_s"], 3) for role in cpu_after
    }
    run["cores_used"] = cores_used
    run["machine_busy_fraction"] = round(
        (busy_after[0] - busy_before[0]) / max(1, busy_after[1] - busy_before[1]), 3
    )
    _add_cpu_metrics(run)
    for key in ("mean_batch_size", "engine_steps", "server_decode_tokens_per_s", "step_ms_mean"):
        run.pop(key, None)
    run.pop("latencies_s", None)
    run |= {"loadavg_1m_before": load_before, "loadavg_1m_after": _loadavg()}
    run["busy_processes_after"] = _busy_processes()
    runs.append(run)
    log(
        f"{name}: {run['tokens_per_s']:,.1f} tokens/s, p50 {run['latency_p50_s']:.3f} s, "
        f"errors {run['num_errors']}, load {load_before} -> {run['loadavg_1m_after']}"
    )


def _mean(runs: list[dict], name: str, key: str) -> float | None:
    values = [r[key] for r in runs if r["mode"] == name and r[key] is not None]
    return sum(values) / len(values) if values else None


def summarize(runs: list[dict]) -> dict:
    tps = {name: _mean(runs, name, "tokens_per_s") for name in ("direct", "ray-1", "ray-2")}
    p50 = {name: _mean(runs, name, "latency_p50_s") for name in ("direct", "ray-1", "ray-2")}
    cpu = {name: _mean(runs, name, "serving_cpu_ms_per_token") for name in ("direct", "ray-1")}
    return {
        "serving_cpu_ms_per_token": cpu,
        "proxy_cpu_ms_per_request": _mean(runs, "ray-1", "proxy_cpu_ms_per_request"),
        "ray1_over_direct_cpu_per_token": ratio(cpu["ray-1"], cpu["direct"]),
        "tokens_per_s": tps,
        "latency_p50_s": p50,
        "ray2_over_ray1_tokens_per_s": ratio(tps["ray-2"], tps["ray-1"]),
        "ray2_over_direct_tokens_per_s": ratio(tps["ray-2"], tps["direct"]),
        "proxy_overhead_tokens_per_s": 1 - (ratio(tps["ray-1"], tps["direct"]) or 0),
        "proxy_overhead_latency_p50_s": (p50["ray-1"] or 0) - (p50["direct"] or 0),
        "target_ray2_over_ray1": 1.6,
    }


def markdown(report: dict) -> str:
    s = report["summary"]
    lines = [
        f"# Ray Serve replicas ({report['started']})",
        "",
        f"- host: {report['host']}; pair: the embedded toy pair; one torch thread per server",
        f"- workload: {report['workload']['concurrency'][0]} closed-loop clients, "
        f"max_new_tokens {report['workload']['max_new_tokens']}, single prompts, "
        f"{report['workload']['duration_s']:g} s per run; order {' '.join(report['order'])}",
        f"- ray {report['ray_version']}; the bench client, Serve's proxy and the replicas share "
        "the machine's 2 cores",
        "",
        "Cores used = CPU seconds per wall second of the server (direct) or all replicas, of "
        "Serve's proxy and of the bench client; machine busy = both cores, everyone's work.",
        "",
    ]
    rows = []
    for r in report["runs"]:
        cores = r["cores_used"]
        server = cores["direct"] if r["mode"] == "direct" else cores["replicas"]
        rows.append(
            [
                r["mode"],
                f"{r['tokens_per_s']:,.1f}",
                f"{r['requests_per_s']:.2f}",
                f"{r['latency_p50_s']:.3f}",
                f"{r['latency_p95_s']:.3f}",
                str(r["num_errors"]),
                f"{server:.2f} / {cores['proxy']:.2f} / {cores['bench_client']:.2f}",
                f"{r['tokens_per_serving_cpu_s'] or 0:,.0f}",
                f"{r['machine_busy_fraction']:.0%}",
                f"{r['loadavg_1m_before']} -> {r['loadavg_1m_after']}",
            ]
        )
    header = [
        "config", "tokens/s", "req/s", "lat p50 s", "lat p95 s", "errors",
        "cores: server(s) / proxy / client", "tokens per server CPU s", "machine busy",
        "load 1m before -> after",
    ]  # fmt: skip
    align = ["---", "---:", "---:", "---:", "---:", "---:", "---", "---:", "---:", "---"]
    lines.append(table(header, rows, align))
    lines += [
        "",
        f"- 2 replicas / 1 replica, tokens/s: **{s['ray2_over_ray1_tokens_per_s']:.2f}x** "
        f"(target >= {s['target_ray2_over_ray1']}x)",
        f"- 2 replicas / direct server, tokens/s: {s['ray2_over_direct_tokens_per_s']:.2f}x",
        f"- proxy overhead (1 replica vs direct): {s['proxy_overhead_tokens_per_s']:.1%} "
        f"tokens/s, {s['proxy_overhead_latency_p50_s'] * 1000:+.0f} ms p50 latency; in CPU: "
        f"{s['serving_cpu_ms_per_token']['ray-1']:.3f} vs "
        f"{s['serving_cpu_ms_per_token']['direct']:.3f} ms per token "
        f"({s['ray1_over_direct_cpu_per_token']:.2f}x), of which the proxy "
        f"{s['proxy_cpu_ms_per_request']:.1f} ms per request",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.replicas", description=__doc__)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument(
        "--max-new-tokens", type=int_range_option, default=IntRange(64, 64), help="N or LOW-HIGH"
    )
    parser.add_argument("--duration-s", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=1, help="2 runs A B C C B A")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "replicas-toy-cpu.json")
    parser.add_argument(
        "--render", type=Path, default=None, help="rewrite the .md of a saved JSON, run nothing"
    )
    args = parser.parse_args(argv)
    if args.render:
        report = json.loads(args.render.read_text())
        for run in report["runs"]:
            _add_cpu_metrics(run)
        report["summary"] = summarize(report["runs"])
        args.render.write_text(json.dumps(report, indent=2) + "\n")
        args.render.with_suffix(".md").write_text(markdown(report))
        print(markdown(report))
        return 0

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only (see cli)
    import ray
    from ray import serve

    from batchserve.api.app import ServerConfig
    from batchserve.api.ray_serve import (
        APP_NAME,
        PROXY_CALLBACK,
        DeploymentOptions,
        ReplicaSpec,
        build_application,
    )

    os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", PROXY_CALLBACK)
    workload = Workload(
        name="single",
        concurrency=(args.clients,),
        max_new_tokens=args.max_new_tokens,
        mix=Mix(0.0, IntRange(1, 1)),
        duration_s=args.duration_s,
    )
    order = ["direct", "ray-1", "ray-2"]
    if args.repeats > 1:
        order += order[::-1]
    spec = ReplicaSpec(config=ServerConfig(), after="toy:after", threads="1", log_level="warning")
    runs: list[dict] = []
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
        with start_servers(["continuous"], ["--after", "toy"], server_args=["--threads", "1"]) as s:
            direct_url, direct_pid = s["continuous"].url, s["continuous"].pid
            asyncio.run(warm_up(direct_url))
            deployed = 0
            for name in order:
                if name == "direct":
                    _measure(direct_url, name, workload, runs, direct_pid)
                    continue
                replicas = int(name.split("-")[1])
                if replicas != deployed:
                    log(f"deploying {replicas} replica(s)")
                    app = build_application(spec, DeploymentOptions(replicas=replicas))
                    serve.run(app, name=APP_NAME, route_prefix="/")
                    deployed = replicas
                    asyncio.run(warm_up(ray_url))
                _measure(ray_url, name, workload, runs, direct_pid)
    finally:
        serve.shutdown()
        ray.shutdown()
    report = {
        "started": started,
        "host": host_description(),
        "ray_version": ray.__version__,
        "workload": workload.describe(),
        "order": order,
        "runs": runs,
        "summary": summarize(runs),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    args.output.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
