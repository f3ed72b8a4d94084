"""Per-token log-probabilities match a direct one-row recomputation, and never sync the host."""

from __future__ import annotations

import pytest
import torch

from batchserve.worker.logprobs import pad_score_alphas, step_logprobs
from batchserve.worker.sampling import SamplingPlan


def reference_keep(amplified: torch.Tensor, top_p: float, top_k: int) -> list[int]:
    """Top-k, then the nucleus of the top-k set (renormalised), by a plain sort."""
    order = torch.argsort(amplified, descending=True).tolist()
    kept = order[: top_k if top_k > 0 else len(order)]
    probs = torch.softmax(amplified[kept], -1)
    nucleus, mass = [], 0.0
    for rank, i in enumerate(kept):
        if mass >= top_p and nucleus:
            break
        nucleus.append(i)
        mass += float(probs[rank])
    return nucleus


def reference_row(after, before, alpha, temperature, top_p, top_k, token, score_alphas):
    """One row in float64, written out from the definitions."""
    after, before = after.double(), before.double()
    lp_after = torch.log_softmax(after, -1)[token]
    lp_before = torch.log_softmax(before, -1)[token]
    t = temperature if temperature > 0 else 1.0
    amplified = (after + alpha * (after - before)) / t
    nucleus = reference_keep(amplified, top_p, top_k)
    masked = torch.full_like(amplified, float("-inf"))
    masked[nucleus] = amplified[nucleus]
    sampled = 0.0 if temperature <= 0 else float(torch.log_softmax(masked, -1)[token])
    scored = [
        float(torch.log_softmax((after + a * (after - before)) / t, -1)[token])
        for a in score_alphas
    ]
    return float(lp_after), float(lp_before), sampled, scored


def _batch(seed: int, vocab: int = 64):
    g = torch.Generator().manual_seed(seed)
    rows = 6
    after = torch.randn(rows, vocab, generator=g) * 3
    before = after + torch.randn(rows, vocab, generator=g)
    alpha = torch.tensor([0.0, 0.5, 1.0, 2.0, -1.0, 4.0])
    temperature = torch.tensor([1.0, 1.0, 0.7, 1.3, 0.0, 1.0])
    top_p = torch.tensor([1.0, 0.9, 1.0, 0.5, 1.0, 0.95])
    top_k = torch.tensor([0, 0, 5, 0, 0, 10])
    score_lists = [(0.0, 0.5), (), (0.0, 1.0, 2.0), (0.25,), (1.0,), (4.0, 0.0)]
    return after, before, alpha, temperature, top_p, top_k, score_lists


def _sampled_tokens(after, before, alpha, temperature, top_p, top_k) -> torch.Tensor:
    """A token from each row's kept set (any kept token will do for the check)."""
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    scaled = (after + alpha[:, None] * (after - before)) / t[:, None]
    tokens = []
    for i, row in enumerate(scaled.double()):
        kept = reference_keep(row, float(top_p[i]), int(top_k[i]))
        tokens.append(
            kept[torch.randint(len(kept), (1,), generator=torch.Generator().manual_seed(i))]
        )
    return torch.tensor(tokens)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("cap", [3, 128])  # a small cap sends rows to the exact fallback
@pytest.mark.parametrize("sync_free", [True, False])
def test_logprobs_match_one_row_recomputation(seed: int, cap: int, sync_free: bool) -> None:
    after, before, alpha, temperature, top_p, top_k, score_lists = _batch(seed)
    tokens = _sampled_tokens(after, before, alpha, temperature, top_p, top_k)
    score_alphas, mask = pad_score_alphas(score_lists, "cpu")
    plan = SamplingPlan.for_rows(
        temperature.tolist(),
        top_p.tolist(),
        top_k.tolist(),
        vocab=after.shape[-1],
        cap=cap,
        sync_free=sync_free,
    )
    out = step_logprobs(
        after, before, alpha, temperature, top_p, top_k, tokens, score_alphas, mask, plan
    )
    for b in range(after.shape[0]):
        ref = reference_row(
            after[b],
            before[b],
            float(alpha[b]),
            float(temperature[b]),
            float(top_p[b]),
            int(top_k[b]),
            int(tokens[b]),
            score_lists[b],
        )
        assert out.after[b].item() == pytest.approx(ref[0], abs=1e-4)
        assert out.before[b].item() == pytest.approx(ref[1], abs=1e-4)
        assert out.sampled[b].item() == pytest.approx(ref[2], abs=1e-4)
        n = len(score_lists[b])
        assert out.scored[b, :n].tolist() == pytest.approx(ref[3], abs=1e-4)
        assert out.scored[b, n:].tolist() == [0.0] * (out.scored.shape[1] - n)


def test_untruncated_temperature_one_sampled_equals_own_alpha_score() -> None:
    after, before, *_ = _batch(3)
    alpha = torch.tensor([0.0, 0.25, 0.5, 1.0, 2.0, 3.0])
    ones = torch.ones(6)
    tokens = torch.arange(6) * 7
    out = step_logprobs(
        after,
        before,
        alpha,
        ones,
        ones,
        torch.zeros(6, dtype=torch.long),
        tokens,
        alpha[:, None],
        torch.ones(6, 1, dtype=torch.bool),
        SamplingPlan.for_rows([1.0] * 6, [1.0] * 6, [0] * 6, vocab=64),
    )
    assert torch.allclose(out.sampled, out.scored[:, 0], atol=1e-5)
    assert torch.allclose(out.sampled[0], out.after[0], atol=1e-5)


def test_no_host_synchronisation() -> None:
    # Tensors on the meta device have no values: any .item(), bool(tensor) or nonzero raises.
    after, before, alpha, temperature, top_p, top_k, score_lists = _batch(5)
    score_alphas, mask = pad_score_alphas(score_lists, "cpu")
    meta = [t.to("meta") for t in (after, before, alpha, temperature, top_p, top_k)]
    out = step_logprobs(
        *meta,
        torch.zeros(6, dtype=torch.long, device="meta"),
        score_alphas.to("meta"),
        mask.to("meta"),
        SamplingPlan(cap=8, sync_free=True),
    )
    assert out.scored.shape == (6, 3) and out.sampled.shape == (6,)


def test_pad_score_alphas_with_no_lists() -> None:
    values, mask = pad_score_alphas([(), ()], "cpu")
    assert values.shape == (2, 0) and mask.shape == (2, 0)
