"""Engine micro-benchmark: decode tokens/s and step time by batch size, no HTTP, no scheduler.

    python -m bench.engine                                   # CPU: random-init `tiny` pair
    python -m bench.engine --after toy --threads 1 --output engine-toy-cpu.json   # the CPU report
    python -m bench.engine --shape llama-7b --device cuda --dtype bfloat16 \\
        --output bench/results/engine-llama-7b-h200.json      # the GPU reference run
    python -m bench.engine --after DIR --before DIR           # a real pair

For each batch size B it admits B distinct prompts of --prompt-len tokens into one LDAEngine
(its KV store allocated once, sized for the largest batch), runs --warmup-steps, then times
--new-tokens decode steps (both models, amplify, top-p 0.95 sampling at mixed alphas: exactly
what the server's worker does per step), and counts the device-to-host copies per step. On CUDA it also measures the
device-copy bandwidth and reports the memory-bandwidth floor of a step: both models' weights
must be read once per step, so no decode step can be faster than weight bytes / bandwidth.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from batchserve.core.types import EngineRow, SamplingParams
from batchserve.engine import LDAEngine, RunnerConfig
from batchserve.worker.models import ModelPair, load_pair, resolve_device, resolve_dtype
from bench.report import table
from bench.shapes import SHAPES, random_pair, weight_bytes

DEFAULT_BATCH_SIZES = (1, 8, 32, 64, 128)
MIXED_ALPHAS = (0.0, 0.5, 1.0, 2.0, 4.0)
RESULTS_DIR = Path(__file__).parent / "results"


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
    batch_size: int, prompt_len: int, vocab_limit: int, max_new_tokens: int, seed: int
) -> list[EngineRow]:
    """Distinct random prompts (so the engine's shared-prefill shortcut does not apply), at the
    mixed alphas of a sweep."""
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
        rows.append(EngineRow(i, ids, params, seed=seed * 100_003 + i))
    return rows


def bench_batch(
    engine: LDAEngine,
    batch_size: int,
    *,
    prompt_len: int,
    new_tokens: int,
    warmup_steps: int,
    seed: int,
) -> tuple[float, list[float], float]:
    """Admit batch_size rows, warm up, time new_tokens decode steps, then drop the rows.

    Returns (prefill s, step times s, device-to-host copies per timed step)."""
    pair = engine.pair
    rows = make_rows(batch_size, prompt_len, pair.vocab_limit, warmup_steps + new_tokens + 2, seed)
    device = pair.device
    synchronize(device)
    start = time.perf_counter()
    engine.admit(rows)
    synchronize(device)
    prefill_s = time.perf_counter() - start
    for _ in range(warmup_steps):
        engine.step()
    step_s = []
    transfers = engine.runner.num_host_transfers
    for _ in range(new_tokens):
        synchronize(device)
        start = time.perf_counter()
        finished = engine.step()
        synchronize(device)
        step_s.append(time.perf_counter() - start)
        if finished:
            raise RuntimeError("a row finished early; the timed batch must stay full")
    syncs = (engine.runner.num_host_transfers - transfers) / new_tokens
    engine.cancel(engine.running_row_ids)
    return prefill_s, step_s, syncs


def run(
    pair: ModelPair,
    batch_sizes: list[int],
    *,
    prompt_len: int,
    new_tokens: int,
    warmup_steps: int,
    seed: int,
    floor_step_ms: float | None,
) -> list[BatchResult]:
    results = []
    row_tokens = prompt_len + warmup_steps + new_tokens + 2
    engine = LDAEngine(
        pair,
        runner_config=RunnerConfig(
            max_slots=max(batch_sizes), kv_cache_tokens=max(batch_sizes) * (row_tokens + 16)
        ),
    )
    log(f"engine ready: {engine.info()}")
    for batch_size in batch_sizes:
        log(f"batch {batch_size}: prefill {prompt_len} tokens/row, then {new_tokens} steps")
        prefill_s, step_s, syncs = bench_batch(
            engine,
            batch_size,
            prompt_len=prompt_len,
            new_tokens=new_tokens,
            warmup_steps=warmup_steps,
            seed=seed,
        )
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
    return results


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
    parser = argparse.ArgumentParser(
        prog="python -m bench.engine",
        description="Decode tokens/s and step time of the LDA engine by batch size "
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
        "--output",
        type=Path,
        default=None,
        help=f"JSON file (a bare name goes to {RESULTS_DIR}); nothing is written without it",
    )
    return parser


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
    results = run(
        pair,
        batch_sizes,
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        warmup_steps=args.warmup_steps,
        seed=args.seed,
        floor_step_ms=floor_step_ms,
    )
    title = (
        f"{shape or source['after']} on {device_name(device)}, {str(dtype).removeprefix('torch.')}"
    )
    print(f"## engine: {title}\n")
    print(format_table(results))
    report = {
        "benchmark": "engine",
        "pair": source,
        "device": str(device),
        "device_name": device_name(device),
        "dtype": str(dtype).removeprefix("torch."),
        "attn_implementation": "batchserve runner (slot store)",
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
        path = args.output if args.output.parent != Path() else RESULTS_DIR / args.output
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
        log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
