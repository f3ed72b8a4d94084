"""Estimators of the alpha-0 rate on synthetic data whose answer is known exactly.

The synthetic "model": sequences of LENGTH tokens from a 4-token vocabulary, each token drawn
independently from softmax(after + alpha * (after - before)); a sequence is "activated" when it
contains token 3. So p_after(activated) = 1 - (1 - p3)^LENGTH, and every log-probability is a sum
of per-token terms, exactly what the server returns.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from batchserve_client.estimators import (
    control_variate_estimate,
    effective_sample_size,
    importance_estimates,
    logit_path_estimate,
    mixture_estimate,
    mixture_log_density,
    naive_equivalent_samples,
    naive_estimate,
    path_curve,
    prompt_path_estimate,
    validate_forms,
)

AFTER = np.array([1.0, 0.5, 0.0, -3.0])
BEFORE = np.array([1.0, 0.3, 0.2, -6.0])
LENGTH = 4


def token_log_probs(alpha: float) -> np.ndarray:
    z = AFTER + alpha * (AFTER - BEFORE)
    return z - np.log(np.exp(z).sum())


def true_rate(alpha: float = 0.0) -> float:
    return 1.0 - (1.0 - math.exp(token_log_probs(alpha)[3])) ** LENGTH


def draw(alpha: float, n: int, rng: np.random.Generator, score_alphas=(0.0,)):
    """n sequences from q_alpha: activated flags and log q_a(x) for each a in score_alphas."""
    tokens = rng.choice(4, size=(n, LENGTH), p=np.exp(token_log_probs(alpha)))
    activated = (tokens == 3).any(axis=1)
    scores = np.stack([token_log_probs(a)[tokens].sum(axis=1) for a in score_alphas], axis=1)
    return activated, scores


def test_truth_is_rare_at_zero_and_common_when_amplified() -> None:
    assert 0.01 < true_rate(0.0) < 0.1
    assert true_rate(2.0) > 5 * true_rate(0.0)


def test_importance_weights_with_the_target_as_proposal_are_naive() -> None:
    rng = np.random.default_rng(0)
    activated, scores = draw(0.0, 500, rng)
    unbiased, sn = importance_estimates(activated, scores[:, 0], scores[:, 0])
    assert unbiased.rate == pytest.approx(activated.mean())
    assert sn.rate == pytest.approx(activated.mean())
    assert unbiased.ess == pytest.approx(500)


def test_importance_estimate_by_hand() -> None:
    activated = [True, False, True]
    log_p = np.log([0.2, 0.5, 0.1])
    log_q = np.log([0.4, 0.25, 0.4])
    unbiased, sn = importance_estimates(activated, log_p, log_q, alpha=1.0)
    w = np.array([0.5, 2.0, 0.25])
    assert unbiased.rate == pytest.approx((0.5 + 0.25) / 3)
    assert sn.rate == pytest.approx(0.75 / w.sum())
    assert unbiased.ess == pytest.approx(w.sum() ** 2 / (w**2).sum())
    assert unbiased.alpha == 1.0


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_importance_estimates_are_unbiased_and_consistent(alpha: float) -> None:
    rng = np.random.default_rng(1)
    unbiased, sn = [], []
    for _ in range(300):
        activated, scores = draw(alpha, 400, rng, score_alphas=(0.0, alpha))
        u, s = importance_estimates(activated, scores[:, 0], scores[:, 1], alpha)
        unbiased.append(u.rate)
        sn.append(s.rate)
    truth = true_rate()
    # 300 replicates: the mean's standard error is std/sqrt(300); 4 of them is a safe margin.
    assert abs(np.mean(unbiased) - truth) < 4 * np.std(unbiased) / math.sqrt(300)
    assert abs(np.mean(sn) - truth) < 0.1 * truth  # O(1/n) bias only


def test_effective_sample_size_bounds() -> None:
    assert effective_sample_size(np.ones(10)) == pytest.approx(10)
    assert effective_sample_size(np.array([1.0, 0.0, 0.0])) == pytest.approx(1)


def test_mixture_log_density_is_the_weighted_average() -> None:
    log_q = np.log([[0.1, 0.3], [0.5, 0.05]])
    got = mixture_log_density(log_q, [100, 300])
    want = np.log([0.25 * 0.1 + 0.75 * 0.3, 0.25 * 0.5 + 0.75 * 0.05])
    assert got == pytest.approx(want)


def test_mixture_with_one_alpha_is_plain_importance_weighting() -> None:
    rng = np.random.default_rng(2)
    activated, scores = draw(1.0, 300, rng, score_alphas=(0.0, 1.0))
    mix = mixture_estimate(activated, scores[:, 0], scores[:, 1:], [0] * 300, [1.0])
    unbiased, _ = importance_estimates(activated, scores[:, 0], scores[:, 1])
    assert mix.rate == pytest.approx(unbiased.rate)


def _sweep(rng, alphas, n):
    flags, log_target, log_q, index = [], [], [], []
    for j, alpha in enumerate(alphas):
        activated, scores = draw(alpha, n, rng, score_alphas=(0.0, *alphas))
        flags.append(activated)
        log_target.append(scores[:, 0])
        log_q.append(scores[:, 1:])
        index += [j] * n
    return np.concatenate(flags), np.concatenate(log_target), np.concatenate(log_q), index


@pytest.mark.parametrize(
    ("estimate", "method", "seed", "lowest_coverage"),
    [(mixture_estimate, "mixture", 3, 0.90), (control_variate_estimate, "mixture_cv", 7, 0.88)],
)
def test_mixture_estimates_are_unbiased_and_cover(
    estimate, method: str, seed: int, lowest_coverage: float
) -> None:
    rng = np.random.default_rng(seed)
    alphas = (0.25, 0.5, 1.0, 2.0)
    truth = true_rate()
    rates, covered = [], 0
    for _ in range(200):
        est = estimate(*_sweep(rng, alphas, 100), alphas)
        rates.append(est.rate)
        covered += est.covers(truth)
    assert est.method == method and est.detail["alphas"] == list(alphas)
    if method == "mixture_cv":  # the weight and one ratio per alpha but the redundant last
        assert len(est.detail["beta"]) == len(alphas)
    assert abs(np.mean(rates) - truth) < 4 * np.std(rates) / math.sqrt(200)
    assert lowest_coverage <= covered / 200 <= 0.99


@pytest.mark.parametrize("method", ["importance", "self_normalised"])
def test_importance_interval_coverage(method: str) -> None:
    rng = np.random.default_rng(4)
    truth, covered, runs = true_rate(), 0, 300
    for _ in range(runs):
        activated, scores = draw(0.5, 500, rng, score_alphas=(0.0, 0.5))
        estimates = importance_estimates(activated, scores[:, 0], scores[:, 1])
        covered += {e.method: e for e in estimates}[method].covers(truth)
    assert 0.90 <= covered / runs <= 0.99


def test_no_hit_keeps_an_upper_bound() -> None:
    unbiased, sn = importance_estimates([False] * 50, np.zeros(50), np.zeros(50))
    assert unbiased.rate == 0 and unbiased.ci_high > 0.03 and sn.ci_high == unbiased.ci_high


def logistic(eta):
    return 1 / (1 + np.exp(-np.asarray(eta, float)))


def test_logit_path_recovers_a_linear_path() -> None:
    alphas = [0.5, 1.0, 1.5, 2.0]
    rates = logistic([-4 + 1.5 * a for a in alphas])
    totals = [10**6] * 4
    successes = [int(round(r * t)) for r, t in zip(rates, totals, strict=True)]
    est = logit_path_estimate(alphas, successes, totals, num_bootstrap=50)
    assert est.rate == pytest.approx(float(logistic(-4)), rel=0.02)
    assert est.covers(float(logistic(-4)))
    assert path_curve(est, [1.0])[0] == pytest.approx(float(rates[1]), rel=1e-3)


def test_validation_picks_quadratic_for_a_curved_path() -> None:
    alphas = [0.25, 0.5, 1.0, 1.5, 2.0]
    rates = logistic([-4 + 0.5 * a + 1.0 * a * a for a in alphas])
    totals = [10**5] * 5
    successes = [int(round(r * t)) for r, t in zip(rates, totals, strict=True)]
    scores = validate_forms(alphas, successes, totals)
    assert scores["quadratic"] < scores["linear"]
    est = logit_path_estimate(alphas, successes, totals, num_bootstrap=50, form=None)
    assert est.detail["form"] == "quadratic"
    assert est.rate == pytest.approx(float(logistic(-4)), rel=0.05)


def test_logit_path_bootstrap_coverage() -> None:
    rng = np.random.default_rng(5)
    alphas = np.array([0.5, 1.0, 1.5, 2.0])
    truth = float(logistic(-3))
    covered, runs = 0, 100
    for i in range(runs):
        successes = rng.binomial(300, logistic(-3 + 1.2 * alphas))
        est = logit_path_estimate(
            alphas, successes, [300] * 4, num_bootstrap=200, seed=i, form="linear"
        )
        covered += est.covers(truth)
    assert 0.85 <= covered / runs <= 1.0


def test_naive_helpers() -> None:
    est = naive_estimate([True] * 2 + [False] * 998)
    assert est.rate == pytest.approx(0.002) and est.ci_low < 0.002 < est.ci_high
    assert naive_equivalent_samples(0.01, 0.01) == pytest.approx(
        4 * 1.96**2 * 0.0099 / 1e-4, rel=1e-3
    )


def test_validated_path_extrapolates_a_heterogeneous_population_better_than_a_line() -> None:
    # Per-prompt log-odds linear in alpha with spread intercepts: the pooled rate's log-odds
    # bend, and a line through every alpha (saturated ones included) overshoots at alpha 0.
    intercepts = np.random.default_rng(0).normal(-5, 1.5, size=2000)
    alphas = [0.125, 0.25, 0.5, 1.0]

    def pooled(a: float) -> float:
        return float(np.mean(logistic(intercepts + 8 * a)))

    successes = [int(pooled(a) * 10**5) for a in alphas]
    totals = [10**5] * 4
    chosen = logit_path_estimate(alphas, successes, totals, num_bootstrap=20, form=None)
    line = logit_path_estimate(
        alphas, successes, totals, num_bootstrap=20, form="linear", max_rate=1.0
    )
    assert abs(chosen.rate - pooled(0)) < abs(line.rate - pooled(0))
    assert set(chosen.detail["validation_deviance"]) >= {"linear", "linear, rates <= 0.5"}
    # The default leaves the saturated alphas out too, and so also beats the line through all.
    default = logit_path_estimate(alphas, successes, totals, num_bootstrap=20)
    assert default.detail["form"] == "linear, rates <= 0.5"
    assert default.detail["fit_alphas"] == [
        a for a, k in zip(alphas, successes, strict=True) if k <= 0.5 * 10**5
    ]
    assert abs(default.rate - pooled(0)) < abs(line.rate - pooled(0))


# --- control variates and per-prompt paths ---------------------------------------------------


def test_control_variate_with_the_target_as_proposal_is_naive() -> None:
    rng = np.random.default_rng(5)
    activated, scores = draw(0.0, 500, rng)
    est = control_variate_estimate(activated, scores[:, 0], scores[:, :1], [0] * 500, [0.0])
    assert est.method == "importance_cv" and est.alpha == 0.0
    assert est.rate == pytest.approx(activated.mean())


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_control_variate_is_unbiased_covers_and_beats_plain_weights(alpha: float) -> None:
    rng = np.random.default_rng(6)
    truth, runs = true_rate(), 300
    plain, cv, covered = [], [], 0
    for _ in range(runs):
        activated, scores = draw(alpha, 400, rng, score_alphas=(0.0, alpha))
        plain.append(importance_estimates(activated, scores[:, 0], scores[:, 1])[0].rate)
        est = control_variate_estimate(activated, scores[:, 0], scores[:, 1:], [0] * 400, [alpha])
        cv.append(est.rate)
        covered += est.covers(truth)
    assert abs(np.mean(cv) - truth) < 4 * np.std(cv) / math.sqrt(runs)
    assert 0.88 <= covered / runs <= 0.99
    rmse = lambda xs: math.sqrt(np.mean((np.array(xs) - truth) ** 2))  # noqa: E731
    assert rmse(cv) < rmse(plain)


def _prompt_sweep(rng, intercepts, slope, alphas, samples):
    """Per-prompt hits and samples at each alpha, prompts drawn uniformly (the bench's design)."""
    k = np.zeros((len(intercepts), len(alphas)), int)
    n = np.zeros_like(k)
    for j, alpha in enumerate(alphas):
        picks = rng.integers(len(intercepts), size=samples)
        hits = rng.random(samples) < logistic(intercepts[picks] + slope * alpha)
        np.add.at(n[:, j], picks, 1)
        np.add.at(k[:, j], picks, hits)
    return k, n


def test_prompt_path_recovers_a_heterogeneous_population() -> None:
    # Rare at alpha 0 (about 0.3%), the prompts' log-odds spread by sigma 1.5, a shared slope.
    rng = np.random.default_rng(8)
    intercepts = rng.normal(-7.0, 1.5, size=300)
    truth = float(np.mean(logistic(intercepts)))
    alphas = [0.5, 1.0, 2.0]
    covered, errors = 0, []
    for rep in range(12):
        k, n = _prompt_sweep(rng, intercepts, 1.5, alphas, 4000)
        est = prompt_path_estimate(alphas, k, n, seed=rep, num_draws=500)
        covered += est.covers(truth)
        errors.append(est.rate / truth - 1)
    assert covered >= 10
    assert abs(float(np.mean(errors))) < 0.25
    assert est.detail["sigma"] == pytest.approx(1.5, abs=0.6)
    assert est.detail["slope"] == pytest.approx(1.5, abs=0.3)


def test_prompt_path_on_identical_prompts_matches_the_pooled_line() -> None:
    rng = np.random.default_rng(9)
    alphas = [0.5, 1.0, 2.0]
    k, n = _prompt_sweep(rng, np.full(200, -4.0), 1.0, alphas, 5000)
    per_prompt = prompt_path_estimate(alphas, k, n, num_draws=200)
    pooled = logit_path_estimate(alphas, k.sum(axis=0), n.sum(axis=0), num_bootstrap=50)
    assert per_prompt.detail["sigma"] < 0.3
    assert per_prompt.rate == pytest.approx(pooled.rate, rel=0.1)
    assert per_prompt.rate == pytest.approx(float(logistic(-4.0)), rel=0.2)


@pytest.mark.parametrize("log_q", [[], np.zeros((0, 2))])
def test_weighted_estimates_of_no_samples_are_the_whole_interval(log_q):
    """No samples say nothing: [0, 1]. (The control-variate form raised on a flat empty list.)"""
    for estimate in (mixture_estimate, control_variate_estimate):
        est = estimate([], [], log_q, [], [1.0, 2.0])
        assert (est.rate, est.ci_low, est.ci_high, est.num_samples) == (0.0, 0.0, 1.0, 0)
