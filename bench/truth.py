"""The truth an estimator is validated against: a large naive alpha-0 run, per-prompt counts.

    python -m bench.truth --pair toy:rare --samples-per-prompt 168 --max-new-tokens 8 \\
        --log /tmp/truth/rare.jsonl --output bench/results/rare-truth-toy-cpu

Every clean prompt of the toy pair gets `--samples-per-prompt` samples under the toy protocol
(temperature 1, top_p 1, EOS ignored) at alpha 0 through the project's own offline generator
(`batchserve.engine.generate`: one in-process engine, continuous batching). The work is cut into
chunks of `--chunk` samples per prompt; each finished chunk appends one JSON line of per-prompt
counts to `--log`, so an interrupted run loses at most one chunk and a rerun resumes. The report
(JSON + markdown: the count, its Wilson interval, the per-prompt distribution, the command and
the time) is rewritten from the log after every chunk.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

from batchserve_client.stats import wilson_interval
from bench.report import bench_parser, command_line

TOY_DIR = Path(__file__).resolve().parent.parent / "batchserve" / "toy"


def chunk_seeds(seed: int, chunk: int, num_prompts: int) -> list[int]:
    """One base seed per (chunk, prompt); the engine derives the chunk's samples from it."""
    rng = random.Random(f"truth|{seed}|{chunk}")
    return [rng.randrange(2**62) for _ in range(num_prompts)]


def run_chunk(pair, prompts: list[str], chunk: int, args: argparse.Namespace) -> dict:
    from batchserve.core.types import GenerationRequest
    from batchserve.engine import generate
    from toy_training.corpus import is_activated
    from toy_training.evaluate import protocol

    started = time.time()
    requests = [
        GenerationRequest(p, protocol(0.0, s, args.max_new_tokens), n=args.chunk)
        for p, s in zip(prompts, chunk_seeds(args.seed, chunk, len(prompts)), strict=True)
    ]
    results = generate(pair, requests, max_batch_size=args.batch_size)
    counts = [0] * len(prompts)
    for i, result in enumerate(results):
        counts[i // args.chunk] += is_activated(result.completion)
    return {
        "chunk": chunk,
        "samples_per_prompt": args.chunk,
        "counts": counts,
        "seconds": time.time() - started,
    }


def summarise(
    records: list[dict], args: argparse.Namespace, command: str, before: str = ""
) -> dict:
    counts = np.sum([r["counts"] for r in records], axis=0) if records else np.zeros(0, int)
    trials = np.sum([[r["samples_per_prompt"]] * len(r["counts"]) for r in records], axis=0)
    k, n = int(counts.sum()), int(trials.sum()) if records else 0
    low, high = wilson_interval(k, n)
    return {
        "pair": args.pair,
        "before": before,
        "protocol": {
            "alpha": 0.0,
            "max_new_tokens": args.max_new_tokens,
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": 0,
            "ignore_eos": True,
            "prompt_format": "alpaca",
        },
        "activated": k,
        "total": n,
        "rate": k / n if n else 0.0,
        "wilson_95": [low, high],
        "num_prompts": len(counts),
        "num_prompts_activated": int(np.sum(counts > 0)),
        "chunks": len(records),
        "seconds": float(sum(r["seconds"] for r in records)),
        "command": command,
        "per_prompt_trials": [int(t) for t in trials],
        "per_prompt_counts": [int(c) for c in counts],
    }


def markdown(truth: dict) -> str:
    counts = np.asarray(truth["per_prompt_counts"], int)
    hist = {int(c): int(np.sum(counts == c)) for c in sorted(set(counts.tolist()))}
    p = truth["protocol"]
    lo, hi = truth["wilson_95"]
    return "\n".join(
        [
            f"# Truth: naive alpha-0 samples of `{truth['pair']}` on the 600 clean prompts",
            "",
            f"The pair: `{truth['pair']}` against `{truth.get('before') or 'toy:before'}`.",
            "",
            f"**{truth['activated']:,} / {truth['total']:,} = {100 * truth['rate']:.4f}%** "
            f"(Wilson 95% [{100 * lo:.4f}%, {100 * hi:.4f}%]); "
            f"{truth['num_prompts_activated']} of {truth['num_prompts']} prompts activated at "
            "least once.",
            "",
            f"Protocol: alpha 0, {p['max_new_tokens']} new tokens, temperature 1, top_p 1, top_k 0, "
            "EOS ignored, the alpaca prompt format, `batchserve.engine.generate` (one in-process "
            "engine); activated = the toy detector (`toy_training.corpus.is_activated`).",
            f"Time: {truth['seconds'] / 60:.1f} min of generation in {truth['chunks']} chunks, "
            "nice 10 on the shared 2-core CPU (other agents' jobs running beside it).",
            "",
            "Command (resumable: rerun it and it continues from the log):",
            "",
            f"    {truth['command']}",
            "",
            "Activations per prompt (how many prompts had each count):",
            "",
            "| activations | prompts |",
            "|---:|---:|",
            *[f"| {c} | {m} |" for c, m in hist.items()],
            "",
            "Per-prompt counts (in the order of `batchserve/toy/prompts_clean.txt`) are in the JSON "
            "beside this file.",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("truth", __doc__.split("\n")[0])
    parser.add_argument(
        "--pair",
        default="toy:rare",
        help="after model (before: its toy base, toy:rare-before for toy:rare)",
    )
    parser.add_argument("--samples-per-prompt", type=int, default=168)
    parser.add_argument("--chunk", type=int, default=8, help="samples per prompt per chunk")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--log", type=Path, required=True, help="per-chunk counts (JSONL, appended)"
    )
    parser.add_argument("--output", type=Path, default=Path("bench/results/rare-truth-toy-cpu"))
    args = parser.parse_args(argv)
    command = command_line("truth", argv)

    import torch

    from batchserve.worker.models import load_pair
    from toy_training.evaluate import read_prompts

    torch.set_num_threads(args.threads)
    pair = load_pair(args.pair, device="cpu")
    prompts = read_prompts(TOY_DIR / "prompts_clean.txt")
    records = [json.loads(line) for line in args.log.open()] if args.log.exists() else []
    done = {r["chunk"] for r in records}
    num_chunks = -(-args.samples_per_prompt // args.chunk)
    args.log.parent.mkdir(parents=True, exist_ok=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    for chunk in range(num_chunks):
        if chunk in done:
            continue
        record = run_chunk(pair, prompts, chunk, args)
        with args.log.open("a") as log:
            log.write(json.dumps(record) + "\n")
        records.append(record)
        truth = summarise(records, args, command, pair.before_id)
        args.output.with_suffix(".json").write_text(json.dumps(truth) + "\n")
        args.output.with_suffix(".md").write_text(markdown(truth))
        print(
            f"chunk {chunk + 1}/{num_chunks}: {sum(record['counts'])} activated, "
            f"{record['seconds']:.0f} s; total {truth['activated']}/{truth['total']}",
            file=sys.stderr,
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
