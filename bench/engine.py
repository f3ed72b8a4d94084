"""Engine micro-benchmark: decode tokens/s and step time by batch size, no HTTP, no scheduler.

    python -m bench.engine                                   # CPU: random-init `tiny` pair
    python -m bench.engine --after toy --threads 1 --output engine-toy-cpu.json   # the CPU report
    python -m bench.engine --shape llama-7b --device cuda --dtype bfloat16 \\
        --output bench/results/engine-llama-7b-h200.json      # the GPU reference run
    python -m bench.engine --after DIR --before DIR           # a real pair

For each batch size B it queues B distinct prompts of --prompt-len tokens on one EngineCore
(its KV store allocated once, sized for the largest batch), runs --warmup-steps, then times
--new-tokens decode steps (both models, amplify, top-p 0.95 sampling at mixed alphas: exactly
what the server's worker does per step), and counts the device-to-host copies per step. On CUDA it also measures the
device-copy bandwidth and reports the memory-bandwidth floor of a step: both models' weights
must be read once per step, so no decode step can be faster than weight bytes / bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from batchserve.argconfig import config_from_args
from batchserve.core.scheduler import SchedulerConfig
from batchserve.core.types import EngineRow, SamplingParams
from batchserve.engine import EngineCore, RunnerConfig, build_engine_core
from batchserve.worker.models import ModelPair, load_pair, resolve_device, resolve_dtype
from bench.report import (
    RESULTS_DIR,
    bench_parser,
    command_line,
    results_path,
    table,
    write_report,
)
from bench.servers import git_worktree
from bench.shapes import SHAPES, random_pair, weight_bytes

DEFAULT_BATCH_SIZES = (1, 8, 32, 64, 128)
MIXED_ALPHAS = (0.0, 0.5, 1.0, 2.0, 4.0)


@dataclass(frozen=True)
class BatchResult:
    batch_size: int
    prefill_s: float
    step_ms_mean: float
    step_ms_p50: float
    step_ms_min: float
    tokens_per_s: float  # batch_size / mean step time: decode throughput of the running batch
    floor_step_ms: float | None = None  # CUDA only: weight bytes / device-copy bandwidth
    floor_fraction: float | None = None  # floor_step_ms / step_ms_mean (1.0 = at the floor)
    host_syncs_per_step: float | None = None  # device-to-host copies per decode step


@dataclass(frozen=True)
class StepWorkload:
    """What every batch size is timed on, from the options of the same names: prompts of
    `prompt_len` random tokens drawn from `seed`, `warmup_steps` untimed decode steps, then
    `new_tokens` timed ones."""

    prompt_len: int
    new_tokens: int
    warmup_steps: int
    seed: int

    @property
    def max_new_tokens(self) -> int:
        """Each row's: two more than it is stepped, so that no row finishes inside the timing."""
        return self.warmup_steps + self.new_tokens + 2


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth_bytes_per_s(device: torch.device, num_bytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth (read + write bytes per second), best of a few runs."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    synchronize(device)
    best_s = float("inf")
    for _ in range(10):
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        best_s = min(best_s, time.perf_counter() - start)
    del src, dst
    return 2 * num_bytes / best_s


def make_rows(
    batch_size: int, prompt_len: int, vocab_limit: int, max_new_tokens: int, seed: int,
    first_id: int = 0,
) -> list[EngineRow]:  # fmt: skip
    """Distinct random prompts (so the prefix cache does not apply), at the mixed alphas of a
    sweep."""
    rng = random.Random(seed)
    rows = []
    for i in range(batch_size):
        params = SamplingParams(
            alpha=MIXED_ALPHAS[i % len(MIXED_ALPHAS)],
            temperature=0.8,
            top_p=0.95,
            max_new_tokens=max_new_tokens,
            ignore_eos=True,
        )
        ids = tuple(rng.randrange(4, vocab_limit) for _ in range(prompt_len))
        rows.append(EngineRow(first_id + i, ids, params, seed=seed * 100_003 + i))
    return rows


def bench_batch(
    core: EngineCore,
    request_id: int,
    batch_size: int,
    workload: StepWorkload,
) -> tuple[float, list[float], float]:
    """Queue batch_size rows, step until every row has its first token (the prefill), warm
    up, time new_tokens decode steps, then drop the rows.

    Returns (prefill s, step times s, device-to-host copies per timed step)."""
    runner = core.runner
    device = runner.device
    rows = make_rows(
        batch_size,
        workload.prompt_len,
        runner.vocab,
        workload.max_new_tokens,
        workload.seed,
        request_id * 10_000,
    )
    synchronize(device)
    start = time.perf_counter()
    core.add_request(request_id, rows, now=0.0)
    first_tokens = 0
    while first_tokens < batch_size:
        result = core.step(now=0.0)
        first_tokens += sum(len(u.token_ids) for e in result.events for u in e.updates)
    synchronize(device)
    prefill_s = time.perf_counter() - start
    for _ in range(workload.warmup_steps):
        core.step(now=0.0)
    step_s = []
    transfers = runner.num_host_transfers
    for _ in range(workload.new_tokens):
        synchronize(device)
        start = time.perf_counter()
        result = core.step(now=0.0)
        synchronize(device)
        step_s.append(time.perf_counter() - start)
        if any(u.finish_reason for e in result.events for u in e.updates):
            raise RuntimeError("a row finished early; the timed batch must stay full")
    syncs = (runner.num_host_transfers - transfers) / workload.new_tokens
    core.abort_request(request_id)
    return prefill_s, step_s, syncs


def run(
    pair: ModelPair,
    batch_sizes: list[int],
    workload: StepWorkload,
    *,
    floor_step_ms: float | None,
    compile: bool | None = None,
    cuda_graphs: bool | None = None,
) -> tuple[list[BatchResult], dict]:
    results = []
    prompt_len, new_tokens = workload.prompt_len, workload.new_tokens
    row_tokens = prompt_len + workload.max_new_tokens
    largest = max(batch_sizes)
    core = build_engine_core(
        pair,
        RunnerConfig(
            max_batch_size=largest,
            kv_cache_tokens=largest * (row_tokens + 16),
            compile=compile,
            cuda_graphs=cuda_graphs,
        ),
        SchedulerConfig(
            max_batch_size=largest,
            max_num_batched_tokens=max(2048, largest * prompt_len),  # one prefill step
            enable_prefix_cache=False,
        ),
    )
    info = core.runner.info()
    log(f"engine ready: {info}")
    for request_id, batch_size in enumerate(batch_sizes):
        log(f"batch {batch_size}: prefill {prompt_len} tokens/row, then {new_tokens} steps")
        prefill_s, step_s, syncs = bench_batch(core, request_id, batch_size, workload)
        mean_s = statistics.fmean(step_s)
        results.append(
            BatchResult(
                batch_size=batch_size,
                prefill_s=prefill_s,
                step_ms_mean=mean_s * 1e3,
                step_ms_p50=statistics.median(step_s) * 1e3,
                step_ms_min=min(step_s) * 1e3,
                tokens_per_s=batch_size / mean_s,
                floor_step_ms=floor_step_ms,
                floor_fraction=floor_step_ms / (mean_s * 1e3) if floor_step_ms else None,
                host_syncs_per_step=syncs,
            )
        )
        if pair.device.type == "cuda":
            torch.cuda.empty_cache()
    return results, info


def format_table(results: list[BatchResult]) -> str:
    has_floor = any(r.floor_step_ms for r in results)
    header = [
        "batch", "tokens/s", "step ms mean", "step ms p50", "step ms min", "prefill s",
        "host syncs/step",
    ]  # fmt: skip
    if has_floor:
        header += ["floor ms", "of floor"]
    rows = []
    for r in results:
        cells = [
            str(r.batch_size),
            f"{r.tokens_per_s:,.1f}",
            f"{r.step_ms_mean:.2f}",
            f"{r.step_ms_p50:.2f}",
            f"{r.step_ms_min:.2f}",
            f"{r.prefill_s:.3f}",
            f"{r.host_syncs_per_step:.2f}",
        ]
        if has_floor:
            cells += [f"{r.floor_step_ms:.2f}", f"{r.floor_fraction:.0%}"]
        rows.append(cells)
    return table(header, rows)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def build_parser() -> argparse.ArgumentParser:
    parser = bench_parser(
        "engine",
        "Decode tokens/s and step time of the LDA engine by batch size "
        "(both models + amplification + sampling per step), on a random-init pair at a named "
        "shape or on a real pair. Table on stdout, progress on stderr.",
        epilog="GPU reference: python -m bench.engine --shape llama-7b --device cuda "
        "--dtype bfloat16 --output bench/results/engine-llama-7b-h200.json (named for the card)",
    )
    parser.add_argument(
        "--shape",
        default=None,
        choices=sorted(SHAPES),
        help="random-init Llama pair at this shape, built on the device (default: tiny on CPU, "
        "llama-7b on CUDA; tiny is the toy pair's shape)",
    )
    parser.add_argument("--after", default=None, help="a real after model (path or hub id)")
    parser.add_argument("--before", default=None, help="its before model (toy: optional)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto = bfloat16 on CUDA, float32 on CPU",
    )
    parser.add_argument(
        "--batch-sizes",
        default=",".join(map(str, DEFAULT_BATCH_SIZES)),
        help="comma-separated (default: %(default)s)",
    )
    parser.add_argument(
        "--new-tokens", type=int, default=32, help="timed decode steps per batch size"
    )
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed steps first")
    parser.add_argument(
        "--prompt-len", type=int, default=32, help="prompt tokens per row (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's own)"
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compile the step (default: the runner's own choice, compiled on the CPU)",
    )
    parser.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="replay decode steps as CUDA graphs (default: the runner's own choice, on CUDA)",
    )
    parser.add_argument(
        "--graphs-ab",
        action="store_true",
        help="also run this code without CUDA graphs, alternating with it in this process "
        "(--rounds), and print the speed-up the graphs give per batch size",
    )
    parser.add_argument(
        "--baseline",
        metavar="REV",
        default=None,
        help="also run this git revision's own bench.engine (from a temporary worktree) with "
        "the same workload, alternating with this code, and print the speed-up per batch size",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="with --baseline or --graphs-ab: alternations (default: 2)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help=f"JSON file (a bare name goes to {RESULTS_DIR}); nothing is written without it",
    )
    return parser


WORKLOAD_OPTIONS = (
    "shape", "after", "before", "device", "dtype", "batch_sizes", "new_tokens", "warmup_steps",
    "prompt_len", "seed",
    "threads",
)  # fmt: skip


def run_baseline(rev: str, args: argparse.Namespace) -> dict:
    """This benchmark as revision `rev` has it, on the same workload: its JSON report."""
    argv: list[str] = []
    for name in WORKLOAD_OPTIONS:
        value = getattr(args, name)
        if value is not None:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    with git_worktree(rev) as tree, tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "baseline.json"
        log(f"baseline {rev}: python -m bench.engine {' '.join(argv)}")
        env = os.environ | {"PYTHONPATH": str(tree)}
        subprocess.run(
            [sys.executable, "-m", "bench.engine", *argv, "--output", str(out)],
            cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        return json.loads(out.read_text())


def compare(baseline: list[list[dict]], current: list[list[BatchResult]]) -> tuple[str, list]:
    """Mean step time per batch size over the rounds, each side, and the speed-up."""
    rows, summary = [], []
    for i, first in enumerate(current[0]):
        base_ms = statistics.fmean(r[i]["step_ms_mean"] for r in baseline)
        this_ms = statistics.fmean(r[i].step_ms_mean for r in current)
        summary.append(
            {"batch_size": first.batch_size, "baseline_step_ms": base_ms, "step_ms": this_ms,
             "speedup": base_ms / this_ms}
        )  # fmt: skip
        rows.append(
            [str(first.batch_size), f"{base_ms:.2f}", f"{this_ms:.2f}", f"{base_ms / this_ms:.2f}x"]
        )
    header = ["batch", "baseline step ms", "this step ms", "speed-up"]
    return table(header, rows), summary


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    if not batch_sizes or min(batch_sizes) < 1:
        raise SystemExit("error: --batch-sizes must be positive integers")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    started = time.perf_counter()
    if args.after:
        if args.shape:
            raise SystemExit("error: give --shape or --after/--before, not both")
        log(f"loading {args.after} / {args.before} on {device} in {dtype}")
        pair = load_pair(args.after, args.before, device=str(device), dtype=args.dtype)
        source = {"after": pair.after_id, "before": pair.before_id}
        shape = None
    else:
        shape = args.shape or ("llama-7b" if device.type == "cuda" else "tiny")
        log(f"building a random-init {shape} pair on {device} in {dtype}")
        pair = random_pair(shape, device, dtype)
        source = {"shape": shape, **SHAPES[shape]}
    pair_bytes = weight_bytes(pair.after) + weight_bytes(pair.before)
    log(f"pair ready in {time.perf_counter() - started:.1f} s: {pair_bytes / 2**30:.2f} GiB")
    floor_step_ms = bandwidth = None
    if device.type == "cuda":
        bandwidth = copy_bandwidth_bytes_per_s(device)
        floor_step_ms = pair_bytes / bandwidth * 1e3
        log(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s: floor {floor_step_ms:.2f} ms/step")
    workload = config_from_args(StepWorkload, args)
    if args.baseline and args.graphs_ab:
        raise SystemExit("error: give --baseline or --graphs-ab, not both")
    if args.graphs_ab and device.type != "cuda":
        raise SystemExit("error: --graphs-ab compares CUDA graphs: it needs --device cuda")
    rounds = args.rounds if args.baseline or args.graphs_ab else 1
    baseline_reports: list[dict] = []
    all_results: list[list[BatchResult]] = []
    for round_index in range(rounds):
        if args.baseline:
            log(f"round {round_index + 1} of {rounds}")
            baseline_reports.append(run_baseline(args.baseline, args))
        if args.graphs_ab:
            log(f"round {round_index + 1} of {rounds}: without CUDA graphs")
            plain, _ = run(
                pair, batch_sizes, workload, floor_step_ms=floor_step_ms, compile=args.compile,
                cuda_graphs=False,
            )  # fmt: skip
            baseline_reports.append({"results": [asdict(r) for r in plain]})
        results, runner_info = run(
            pair, batch_sizes, workload, floor_step_ms=floor_step_ms, compile=args.compile,
            cuda_graphs=True if args.graphs_ab else args.cuda_graphs,
        )  # fmt: skip
        all_results.append(results)
    title = (
        f"{shape or source['after']} on {device_name(device)}, {str(dtype).removeprefix('torch.')}"
    )
    command = command_line("engine", argv)
    markdown = (
        f"## engine: {title} ({time.strftime('%Y-%m-%d %H:%M:%S %z')})\n\n"
        f"- host: {platform.machine()}, {os.cpu_count()} CPUs; command: `{command}`\n\n"
        + format_table(results) + "\n"
    )  # fmt: skip
    comparison = None
    if baseline_reports:
        text, comparison = compare([r["results"] for r in baseline_reports], all_results)
        against = args.baseline or "this code without CUDA graphs"
        markdown += f"\n### against {against} (mean of {rounds} alternating rounds)\n\n{text}\n"
    print(markdown)
    report = {
        "benchmark": "engine",
        "command": command,
        "pair": source,
        "device": str(device),
        "device_name": device_name(device),
        "dtype": str(dtype).removeprefix("torch."),
        "attn_implementation": "batchserve runner (paged, packed steps)",
        "runner": runner_info,
        "baseline": args.baseline or ("no-cuda-graphs" if args.graphs_ab else None),
        "comparison": comparison,
        "mixed_alphas": list(MIXED_ALPHAS),
        "top_p": 0.95,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "weight_bytes": pair_bytes,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "warmup_steps": args.warmup_steps,
        "results": [asdict(r) for r in results],
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if args.output:
        write_report(results_path(args.output), report, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
