"""From amplified samples to the deployed model's (alpha 0) rate: five estimators.

- **Importance weights, per alpha.** A sample x drawn from q_alpha has weight
  w(x) = p_after(x) / q_alpha(x) = exp(sum_t log p_after(x_t|x_<t) - log q_alpha(x_t|x_<t)),
  and mean(w * activated) is an unbiased estimate of the alpha-0 rate (`importance`). Dividing
  by sum(w) instead of n gives the self-normalised estimate (`self_normalised`): biased by
  O(1/n), usually of lower variance. Exact only when q_alpha covers everything p_after can
  draw: temperature 1 and no top-k / top-p truncation, which the callers enforce.
- **Multiple importance sampling over the sweep** (Veach & Guibas 1995, the balance
  heuristic): pool the n_j samples of every alpha_j and weight each by
  p_after(x) / sum_j (n_j / N) q_alpha_j(x). Needs log q_alpha_j(x) of every sample under
  every alpha of the sweep (the server's `score_alphas`). Unbiased; never worse than the worst
  single-alpha estimate by more than the mixture's own spread, and much better than large-alpha
  weights alone, because a sample likely under small alphas keeps a bounded weight.
- **Control variates for the weights** (Owen & Zhou 2000, `control_variate_estimate`): the
  weight w and, over a sweep, each ratio q_alpha_j / q_mix have known mean 1 under the proposal,
  so mean(w * activated) is corrected by its regression on them. Same data as the two above.
- **Logit-path extrapolation** (Pernice & Aranguri 2026): fit the activation rate against alpha
  where it is common, as log-odds linear or quadratic in alpha (binomial maximum likelihood),
  on all alphas or only those below saturation, and read the fit at alpha 0. The default is a
  line through the alphas with rate <= 50% (`DEFAULT_PATH_FORM`, chosen by validation on the toy
  pairs); `form=None` chooses per sweep by how well each candidate, fitted without the smallest
  alpha, predicts it (the extrapolation it will be trusted with).
  A parametric bootstrap (refit on counts redrawn per alpha) gives the interval. Its error is a
  modelling error as much as a sampling one: the interval covers the truth only if the form holds
  down to alpha 0.
- **Per-prompt logit paths, aggregated** (`prompt_path_estimate`): each prompt's log-odds are a
  line in alpha with its own intercept (drawn from a normal) and a shared slope, fitted to the
  per-prompt counts by marginal likelihood, and the population's mean rate is read at alpha 0.
  Uses the structure the pooled path ignores: a few prompts carry most hits.

Effective sample size, ESS = (sum w)^2 / sum w^2, is how many samples of the target the weighted
sample is worth for a generic quantity: near n when weights are even, near 1 when one sample
carries all the weight (then the interval, however narrow it looks, is not to be trusted).

numpy only (the client never imports torch).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from batchserve_client.stats import Z_95, wilson_interval

# Below this ESS an importance-weighted interval is flagged as unreliable.
MIN_RELIABLE_ESS = 30.0


@dataclass(frozen=True)
class Estimate:
    """One estimate of the alpha-0 rate with its 95% interval."""

    method: str  # naive | importance | self_normalised | mixture | logit_path
    rate: float
    ci_low: float
    ci_high: float
    num_samples: int
    alpha: float | None = None  # the proposal's alpha (importance weights per alpha)
    ess: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def width(self) -> float:
        return self.ci_high - self.ci_low

    def covers(self, value: float) -> bool:
        return self.ci_low <= value <= self.ci_high

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def naive_estimate(activated: Sequence[bool]) -> Estimate:
    k, n = int(sum(map(bool, activated))), len(activated)
    low, high = wilson_interval(k, n)
    return Estimate("naive", k / n if n else 0.0, low, high, n, alpha=0.0)


def _weights(log_target: np.ndarray, log_proposal: np.ndarray) -> np.ndarray:
    return np.exp(np.asarray(log_target, float) - np.asarray(log_proposal, float))


def effective_sample_size(weights: np.ndarray) -> float:
    total, squares = float(np.sum(weights)), float(np.sum(np.square(weights)))
    return total * total / squares if squares > 0 else 0.0


def _weighted_interval(rate: float, se: float, ess: float, any_hit: bool) -> tuple[float, float]:
    """rate +- 1.96 se, clipped to [0, 1]. With no weighted hit that collapses to [0, 0]; the
    exact binomial upper bound at n = ESS keeps it honest (a heuristic: ESS stands in for the
    sample size)."""
    high = min(1.0, rate + Z_95 * se) if any_hit else 1.0 - 0.05 ** (1.0 / max(ess, 1.0))
    return max(0.0, rate - Z_95 * se), high


def importance_estimates(
    activated: Sequence[bool],
    log_target: Sequence[float],
    log_proposal: Sequence[float],
    alpha: float | None = None,
) -> tuple[Estimate, Estimate]:
    """Unbiased and self-normalised importance-weighted estimates of the target's rate.

    `log_target` is each sample's log p_after(x), `log_proposal` its log q_alpha(x) (sums over
    the completion's tokens). Intervals: mean +- 1.96 standard errors (the delta method for the
    self-normalised ratio).
    """
    f = np.asarray(activated, dtype=float)
    n = len(f)
    if n == 0:
        empty = Estimate("importance", 0.0, 0.0, 1.0, 0, alpha=alpha, ess=0.0)
        return empty, Estimate("self_normalised", 0.0, 0.0, 1.0, 0, alpha=alpha, ess=0.0)
    w = _weights(np.asarray(log_target, float), np.asarray(log_proposal, float))
    ess = effective_sample_size(w)
    detail = {
        "num_activated": int(f.sum()),
        "max_weight_share": float(w.max() / w.sum()) if w.sum() > 0 else 1.0,
        "mean_weight": float(w.mean()),  # E[w] = 1 under q: far from 1 warns of missed mass
        "is_reliable": ess >= MIN_RELIABLE_ESS,
    }
    wf = w * f
    unbiased = float(wf.mean())
    se = float(wf.std(ddof=1) / math.sqrt(n)) if n > 1 else math.inf
    low, high = _weighted_interval(unbiased, se, ess, bool(f.any()))
    est = Estimate("importance", unbiased, low, high, n, alpha=alpha, ess=ess, detail=detail)
    total = float(w.sum())
    ratio = float(wf.sum() / total) if total > 0 else 0.0
    se_sn = float(np.sqrt(np.sum(np.square(w * (f - ratio)))) / total) if total > 0 else math.inf
    low, high = _weighted_interval(ratio, se_sn, ess, bool(f.any()))
    sn = Estimate("self_normalised", ratio, low, high, n, alpha=alpha, ess=ess, detail=detail)
    return est, sn


def mixture_log_density(log_q: np.ndarray, counts: Sequence[int]) -> np.ndarray:
    """log sum_j (n_j / N) q_j(x) per sample, from log_q [num_samples, num_alphas]."""
    fractions = np.asarray(counts, float) / float(np.sum(counts))
    with np.errstate(divide="ignore"):
        scaled = np.asarray(log_q, float) + np.log(fractions)[None, :]
    top = scaled.max(axis=1, keepdims=True)
    return (top + np.log(np.exp(scaled - top).sum(axis=1, keepdims=True)))[:, 0]


@dataclass(frozen=True)
class _MixtureSweep:
    """A sweep's samples weighted against the balance-heuristic mixture of the alphas that drew
    them: what the mixture estimate and its control-variate form both start from."""

    activated: np.ndarray  # [N] 0/1
    index: np.ndarray  # [N] which alpha drew each sample
    counts: list[int]  # samples per alpha
    used: list[int]  # the alphas that drew any
    log_q: np.ndarray  # [N, num_alphas]
    log_mix: np.ndarray  # [N] log of the mixture density
    weights: np.ndarray  # [N] p_after(x) / mixture(x)

    @classmethod
    def of(
        cls,
        activated: Sequence[bool],
        log_target: Sequence[float],
        log_q: np.ndarray | Sequence[Sequence[float]],
        proposal_index: Sequence[int],
        num_alphas: int,
    ) -> _MixtureSweep:
        f = np.asarray(activated, dtype=float)
        log_q = np.asarray(log_q, float).reshape(len(f), -1)
        index = np.asarray(proposal_index, int)
        counts = [int(np.sum(index == j)) for j in range(num_alphas)]
        used = [j for j, c in enumerate(counts) if c > 0]
        log_mix = mixture_log_density(log_q[:, used], [counts[j] for j in used])
        weights = _weights(np.asarray(log_target, float), log_mix)
        return cls(f, index, counts, used, log_q, log_mix, weights)

    def detail(self, alphas: Sequence[float], ess: float) -> dict[str, Any]:
        return {
            "alphas": [float(alphas[j]) for j in self.used],
            "counts": [self.counts[j] for j in self.used],
            "num_activated": int(self.activated.sum()),
            "mean_weight": float(self.weights.mean()),
            "is_reliable": ess >= MIN_RELIABLE_ESS,
        }


# What an estimator over a sweep is called with: activated, log_target [N], log_q [N, num_alphas],
# proposal_index [N] and the sweep's alphas.
SweepEstimator = Callable[
    [
        Sequence[bool],
        Sequence[float],
        np.ndarray | Sequence[Sequence[float]],
        Sequence[int],
        Sequence[float],
    ],
    Estimate,
]


def _sweep_estimator(
    empty_method: str,
) -> Callable[[Callable[[_MixtureSweep, Sequence[float]], Estimate]], SweepEstimator]:
    """An estimator of a `_MixtureSweep` as the public function of the sweep's arguments: the
    estimators over a sweep share their arguments, their weighting and their answer to no
    samples ([0, 1] under `empty_method`), so those are written here once."""

    def wrap(estimate: Callable[[_MixtureSweep, Sequence[float]], Estimate]) -> SweepEstimator:
        def estimator(
            activated: Sequence[bool],
            log_target: Sequence[float],
            log_q: np.ndarray | Sequence[Sequence[float]],
            proposal_index: Sequence[int],
            alphas: Sequence[float],
        ) -> Estimate:
            if len(activated) == 0:
                return Estimate(empty_method, 0.0, 0.0, 1.0, 0, ess=0.0)
            sweep = _MixtureSweep.of(activated, log_target, log_q, proposal_index, len(alphas))
            return estimate(sweep, alphas)

        estimator.__name__ = estimator.__qualname__ = estimate.__name__
        estimator.__doc__ = estimate.__doc__
        return estimator

    return wrap


@_sweep_estimator("mixture")
def mixture_estimate(sweep: _MixtureSweep, alphas: Sequence[float]) -> Estimate:
    """Balance-heuristic multiple importance sampling over a sweep.

    Sample i was drawn from alpha[proposal_index[i]]; log_q[i, j] is its log q_alpha_j(x).
    The samples of each alpha are a fixed-size stratum, so the standard error combines the
    per-stratum variances: se^2 = sum_j n_j s_j^2 / N^2.
    """
    f, w, total = sweep.activated, sweep.weights, len(sweep.activated)
    wf = w * f
    rate = float(wf.sum() / total)
    variance = 0.0
    for j in sweep.used:
        stratum = wf[sweep.index == j]
        if len(stratum) > 1:
            variance += len(stratum) * float(stratum.var(ddof=1))
    se = math.sqrt(variance) / total
    ess = effective_sample_size(w)
    low, high = _weighted_interval(rate, se, ess, bool(f.any()))
    detail = sweep.detail(alphas, ess)
    return Estimate("mixture", rate, low, high, total, ess=ess, detail=detail)


# --- importance weights with control variates --------------------------------------------------


@_sweep_estimator("mixture_cv")
def control_variate_estimate(sweep: _MixtureSweep, alphas: Sequence[float]) -> Estimate:
    """Importance weights with control variates (Owen & Zhou 2000): unbiased up to O(1/n).

    Sample i was drawn from alpha[proposal_index[i]] (one alpha: plain importance weights; more:
    the balance-heuristic mixture), log_q[i, j] is its log q_alpha_j(x). Under the mixture q,
    every ratio c_j = q_j(x) / q(x) and w = p_after(x) / q(x) has mean exactly 1, so
    y = w * activated is regressed on them and the estimate is mean(y) - beta . (mean(c) - 1).
    A weight that came out large by chance is corrected where it also inflated the controls;
    the interval is +- 1.96 standard errors of the residuals (n - controls - 1 degrees).
    """
    f, w, n = sweep.activated, sweep.weights, len(sweep.activated)
    method = "importance_cv" if len(sweep.used) == 1 else "mixture_cv"
    alpha = float(alphas[sweep.used[0]]) if method == "importance_cv" else None
    # sum_j (n_j / N) c_j = 1 for every sample, so one ratio is redundant: drop the last.
    ratios = [_weights(sweep.log_q[:, j], sweep.log_mix) for j in sweep.used[:-1]]
    controls = np.stack([w, *ratios], axis=1)
    y = w * f
    centred = controls - controls.mean(axis=0)
    ess = effective_sample_size(w)
    # With a few weights carrying everything the fitted beta is noise that the correction
    # multiplies (measured: 36% for a 3.6% truth at ESS 3): plain weights then, flagged.
    beta = np.zeros(controls.shape[1])
    if f.any() and ess >= MIN_RELIABLE_ESS:
        beta = np.linalg.lstsq(centred, y - y.mean(), rcond=None)[0]
    rate = min(float(y.mean() - beta @ (controls.mean(axis=0) - 1.0)), 1.0)
    residual = y - centred @ beta
    dof = max(n - controls.shape[1] - 1, 1)
    se = float(np.sqrt(np.sum(np.square(residual - residual.mean())) / dof / n))
    low, high = _weighted_interval(max(rate, 0.0), se, ess, bool(f.any()))
    detail = {**sweep.detail(alphas, ess), "beta": [float(b) for b in beta]}
    return Estimate(method, max(rate, 0.0), low, high, n, alpha=alpha, ess=ess, detail=detail)


# --- logit-path extrapolation -----------------------------------------------------------------


def _design(alphas: np.ndarray, form: str) -> np.ndarray:
    columns = [np.ones_like(alphas), alphas]
    if form == "quadratic":
        columns.append(alphas * alphas)
    return np.stack(columns, axis=1)


def fit_logit_path(
    alphas: Sequence[float], successes: Sequence[float], totals: Sequence[float], form: str
) -> np.ndarray:
    """Binomial maximum likelihood of logit(rate) = polynomial(alpha), by Newton steps.

    Counts get +0.5 / +1 (Haldane-Anscombe), so a cell at 0% or 100% keeps a finite logit.
    A tiny ridge keeps the Newton system solvable when points are few.
    """
    x = _design(np.asarray(alphas, float), form)
    k = np.asarray(successes, float) + 0.5
    n = np.asarray(totals, float) + 1.0
    beta = np.zeros(x.shape[1])
    beta[0] = math.log(k.sum() / (n.sum() - k.sum()))
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-(x @ beta)))
        gradient = x.T @ (k - n * p)
        hessian = (x * (n * p * (1 - p))[:, None]).T @ x + 1e-9 * np.eye(x.shape[1])
        step = np.linalg.solve(hessian, gradient)
        beta = beta + step
        if float(np.max(np.abs(step))) < 1e-10:
            break
    return beta


def predict_rate(beta: np.ndarray, alpha: float, form: str) -> float:
    eta = float((_design(np.asarray([float(alpha)]), form) @ beta)[0])
    return 1.0 / (1.0 + math.exp(-eta)) if eta > -700 else 0.0


def _binomial_deviance(k: float, n: float, p: float) -> float:
    p = min(max(p, 1e-12), 1 - 1e-12)
    return -2.0 * (k * math.log(p) + (n - k) * math.log(1 - p))


# Candidate fits: a form, and the highest observed rate a point may have to take part. Near
# saturation the pooled rate is an average of per-prompt curves that have flattened at different
# alphas, so its log-odds bend away from the low-alpha trend that extrapolation needs.
PATH_CANDIDATES = (("linear", 1.0), ("quadratic", 1.0), ("linear", 0.5), ("quadratic", 0.5))


# The default fit: a line in log-odds through the alphas whose rate is at most 50%. Chosen by
# validation where the truth is known (bench/results/estimate-toy*.md): on both toy pairs, the
# steep one and the gradual one, it was the most accurate candidate and covered the truth in
# every replicate (7/7 and 5/5), while choosing per sweep by the held-out deviance below picked
# a quadratic often enough to cost 3-5x in accuracy. Pass form=None for that per-sweep choice.
DEFAULT_PATH_FORM = ("linear", 0.5)


def _candidate_name(form: str, max_rate: float) -> str:
    return form if max_rate >= 1.0 else f"{form}, rates <= {max_rate:g}"


def validate_forms(
    alphas: Sequence[float], successes: Sequence[int], totals: Sequence[int]
) -> dict[str, float]:
    """Extrapolation check of each candidate fit (lower is better): fit it without the smallest
    alpha, predict that alpha's count, score the binomial deviance of the prediction.

    The held-out point is the one nearest the target (alpha 0), so this measures what the
    estimate does: extrapolate downwards. A candidate takes part only when its points without
    the held-out one are at least as many as its parameters.
    """
    order = sorted(range(len(alphas)), key=lambda i: alphas[i])
    held = order[0]
    scores: dict[str, float] = {}
    for form, max_rate in PATH_CANDIDATES:
        num_params = 2 if form == "linear" else 3
        keep = [i for i in order[1:] if successes[i] <= max_rate * totals[i]]
        if len(keep) < num_params or successes[held] > max_rate * totals[held]:
            continue
        beta = fit_logit_path(
            [alphas[i] for i in keep], [successes[i] for i in keep], [totals[i] for i in keep], form
        )
        p = predict_rate(beta, alphas[held], form)
        scores[_candidate_name(form, max_rate)] = _binomial_deviance(
            successes[held], totals[held], p
        )
    return scores


def logit_path_estimate(
    alphas: Sequence[float],
    successes: Sequence[int],
    totals: Sequence[int],
    *,
    target_alpha: float = 0.0,
    num_bootstrap: int = 1000,
    seed: int = 0,
    form: str | None = DEFAULT_PATH_FORM[0],
    max_rate: float = DEFAULT_PATH_FORM[1],
) -> Estimate:
    """Extrapolate the rate to `target_alpha` along the fitted logit path (see the module doc).

    `form` ("linear" or "quadratic") is fitted to the points with rates <= `max_rate` (all of
    them when fewer than two qualify); the default is DEFAULT_PATH_FORM. With `form=None` the
    candidate is chosen per sweep by `validate_forms`; with too few points for that check, the
    line through all of them. The bootstrap redraws each used alpha's count from Binomial(n_j, k_j / n_j), refits
    and reads the fit at the target; the interval is the 2.5 and 97.5 percentiles.
    """
    alphas = [float(a) for a in alphas]
    if len(alphas) < 2:
        raise ValueError("logit-path extrapolation needs rates at two alphas at least")
    scores = validate_forms(alphas, successes, totals)
    if form is not None:
        candidate = (form, max_rate)
    elif scores:
        best = min(scores, key=lambda name: scores[name])
        candidate = next(c for c in PATH_CANDIDATES if _candidate_name(*c) == best)
    else:
        candidate = ("linear", 1.0)
    chosen, max_rate = candidate
    used = [i for i in range(len(alphas)) if successes[i] <= max_rate * totals[i]]
    if len(used) < 2:
        used = list(range(len(alphas)))
    fit_alphas = [alphas[i] for i in used]
    n = np.asarray([totals[i] for i in used], int)
    k = np.asarray([successes[i] for i in used], int)
    beta = fit_logit_path(fit_alphas, k, n, chosen)
    rate = predict_rate(beta, target_alpha, chosen)
    rng = np.random.default_rng(seed)
    p = k / np.maximum(n, 1)
    draws = [
        predict_rate(
            fit_logit_path(fit_alphas, rng.binomial(n, p), n, chosen), target_alpha, chosen
        )
        for _ in range(num_bootstrap)
    ]
    low, high = (float(v) for v in np.percentile(draws, [2.5, 97.5]))
    detail = {
        "form": _candidate_name(chosen, max_rate),
        "fit_form": chosen,
        "validation_deviance": scores,
        "coefficients": [float(b) for b in beta],
        "alphas": alphas,
        "fit_alphas": fit_alphas,
        "successes": [int(v) for v in successes],
        "totals": [int(t) for t in totals],
        "num_bootstrap": num_bootstrap,
    }
    return Estimate(
        "logit_path", rate, min(low, rate), max(high, rate), int(np.sum(totals)), detail=detail
    )


# Gauss-Hermite nodes for integrals over a standard normal (probabilists' weights sum to 1).
_GH_NODES, _GH_WEIGHTS = np.polynomial.hermite_e.hermegauss(32)
_GH_WEIGHTS = _GH_WEIGHTS / _GH_WEIGHTS.sum()


def _prompt_path_terms(theta: np.ndarray, alphas: np.ndarray, k: np.ndarray, n: np.ndarray):
    """Log-likelihood and its gradient of the random-intercept path; k, n: [prompts, alphas]."""
    # sigma enters only through sigma * z with z symmetric: a negative sigma is the same model,
    # so the fit runs unconstrained and the normal approximation has no boundary at 0.
    mu, sigma, slope = theta
    eta = mu + sigma * _GH_NODES[None, :, None] + slope * alphas[None, None, :]  # [1, m, a]
    log_s = -np.logaddexp(0.0, -eta)
    log_1s = -np.logaddexp(0.0, eta)
    per_node = (k[:, None, :] * log_s + (n - k)[:, None, :] * log_1s).sum(axis=2)  # [i, m]
    joint = per_node + np.log(_GH_WEIGHTS)[None, :]
    top = joint.max(axis=1, keepdims=True)
    log_lik = float((top[:, 0] + np.log(np.exp(joint - top).sum(axis=1))).sum())
    post = np.exp(joint - top)
    post /= post.sum(axis=1, keepdims=True)  # posterior over nodes, per prompt
    resid = k[:, None, :] - n[:, None, :] * np.exp(log_s)  # [i, m, a]
    by_node = resid.sum(axis=2)
    gradient = np.array(
        [
            float((post * by_node).sum()),
            float((post * by_node * _GH_NODES[None, :]).sum()),
            float((post[:, :, None] * resid * alphas[None, None, :]).sum()),
        ]
    )
    return log_lik, gradient


def _fit_prompt_path(
    alphas: np.ndarray, k: np.ndarray, n: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Maximum marginal likelihood by damped Newton steps; the Hessian from central differences
    of the exact gradient. Returns the estimate and the observed information matrix."""
    pooled = fit_logit_path(alphas, k.sum(axis=0), n.sum(axis=0), "linear")
    theta = np.array([pooled[0] - 0.5, 1.0, pooled[1]])

    def information(t: np.ndarray) -> np.ndarray:
        h = 1e-4
        columns = [
            (
                _prompt_path_terms(t - h * e, alphas, k, n)[1]
                - _prompt_path_terms(t + h * e, alphas, k, n)[1]
            )
            / (2 * h)
            for e in np.eye(3)
        ]
        info = np.stack(columns, axis=1)
        return 0.5 * (info + info.T)

    value, gradient = _prompt_path_terms(theta, alphas, k, n)
    for _ in range(100):
        info = information(theta)
        try:
            step = np.linalg.solve(info + 1e-6 * np.eye(3), gradient)
        except np.linalg.LinAlgError:
            step = gradient * 1e-3
        if float(gradient @ step) <= 0:  # not an ascent direction: plain gradient ascent
            step = gradient / max(1.0, float(np.abs(gradient).max()))
        # At most 3 logit units per step: far out the log-likelihood is flat.
        step = step * min(1.0, 3.0 / max(float(np.abs(step).max()), 1e-12))
        for _ in range(30):
            candidate = theta + step
            new_value, new_gradient = _prompt_path_terms(candidate, alphas, k, n)
            if new_value >= value - 1e-9:
                break
            step = step / 2
        theta, moved = candidate, float(np.abs(candidate - theta).max())
        value, gradient = new_value, new_gradient
        if moved < 1e-8 or float(np.abs(gradient).max()) < 1e-7:
            break
    return theta, information(theta)


def _population_rate(theta: np.ndarray, alpha: float) -> np.ndarray:
    """Mean over the prompt population of sigmoid(intercept + slope * alpha); theta [..., 3]."""
    theta = np.asarray(theta, float)
    eta = theta[..., 0:1] + np.abs(theta[..., 1:2]) * _GH_NODES + theta[..., 2:3] * alpha
    return np.exp(-np.logaddexp(0.0, -eta)) @ _GH_WEIGHTS


def prompt_path_estimate(
    alphas: Sequence[float],
    successes: np.ndarray | Sequence[Sequence[int]],
    totals: np.ndarray | Sequence[Sequence[int]],
    *,
    target_alpha: float = 0.0,
    num_draws: int = 2000,
    seed: int = 0,
) -> Estimate:
    """Per-prompt logit paths, aggregated: logit p_i(alpha) = mu + sigma z_i + slope * alpha.

    successes[i][j] / totals[i][j]: prompt i's hits / samples at alphas[j] (a prompt may have
    none at some alphas). The prompts' intercepts are drawn from N(mu, sigma^2) (a random
    intercept, fitted by marginal likelihood over Gauss-Hermite nodes), the slope is shared.
    The rate at `target_alpha` is the population mean of sigmoid(intercept + slope * alpha),
    not sigmoid of the mean: when a few prompts carry most hits, the pooled log-odds bend (a
    mixture of sigmoids is not a sigmoid), which biases the pooled line. Interval: the 2.5 and
    97.5 percentiles of the rate over parameter draws from the normal approximation.
    """
    a = np.asarray([float(x) for x in alphas])
    k = np.asarray(successes, float)
    n = np.asarray(totals, float)
    keep = n.sum(axis=1) > 0
    k, n = k[keep], n[keep]
    if len(a) < 2:
        raise ValueError("a per-prompt path needs samples at two alphas at least")
    theta, info = _fit_prompt_path(a, k, n)
    rate = float(_population_rate(theta, target_alpha))
    rng = np.random.default_rng(seed)
    try:
        # A direction without curvature (sigma at 0 with few hits) gets a huge variance, not a
        # negative one: the interval then says how little the data pin it down.
        values, vectors = np.linalg.eigh(info)
        cov = (vectors / np.maximum(values, 1e-6)) @ vectors.T
        draws = rng.multivariate_normal(theta, cov, size=num_draws)
        rates = _population_rate(draws, target_alpha)
        low, high = (float(v) for v in np.percentile(rates, [2.5, 97.5]))
    except (np.linalg.LinAlgError, ValueError):
        low, high = 0.0, 1.0
    detail = {
        "form": "random intercept, shared slope",
        "mu": float(theta[0]),
        "sigma": abs(float(theta[1])),
        "slope": float(theta[2]),
        "alphas": [float(x) for x in a],
        "num_prompts": int(keep.sum()),
        "successes": [int(v) for v in k.sum(axis=0)],
        "totals": [int(v) for v in n.sum(axis=0)],
    }
    return Estimate(
        "prompt_path", rate, min(low, rate), max(high, rate), int(n.sum()), detail=detail
    )


def path_curve(estimate: Estimate, alphas: Sequence[float]) -> list[float]:
    """The fitted path of a logit_path estimate at `alphas` (for plots)."""
    beta = np.asarray(estimate.detail["coefficients"], float)
    return [predict_rate(beta, a, estimate.detail["fit_form"]) for a in alphas]


# --- sample counts: the budget at which an estimator matches naive sampling -----------------


def naive_width(rate: float, num_samples: int) -> float:
    """Wilson 95% interval width of naive sampling with `num_samples` at `rate` (expected k)."""
    k = int(round(rate * num_samples))
    low, high = wilson_interval(k, num_samples)
    return high - low


def naive_equivalent_samples(rate: float, width: float) -> float:
    """Naive samples whose normal-approximation 95% interval is `width` wide at `rate`."""
    if width <= 0:
        return math.inf
    return (2 * Z_95) ** 2 * rate * (1 - rate) / (width * width)
