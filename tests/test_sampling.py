"""Per-row sampling matches a plain one-row reference, and seeded draws are batch-invariant."""

from __future__ import annotations

import pytest
import torch

from batchserve.sampling import (
    amplify,
    row_uniform,
    sample,
    sample_reference,
    top_k_top_p_filter,
)
from batchserve.seeds import derive_seed


def reference_top_p(row: torch.Tensor, top_p: float) -> torch.Tensor:
    """Straightforward nucleus filter of one row: keep the smallest head with mass >= top_p."""
    probs = row.softmax(-1)
    order = torch.argsort(row, descending=True).tolist()
    kept, mass = [], 0.0
    for i in order:
        kept.append(i)
        mass += float(probs[i])
        if mass >= top_p:
            break
    out = torch.full_like(row, float("-inf"))
    out[kept] = row[kept]
    return out


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 0.99])
def test_top_p_matches_one_row_reference(top_p: float) -> None:
    torch.manual_seed(0)
    logits = torch.randn(8, 50) * 3
    filtered = top_k_top_p_filter(logits, torch.full((8,), top_p), torch.zeros(8, dtype=torch.long))
    for b in range(8):
        assert torch.equal(filtered[b], reference_top_p(logits[b], top_p))


def test_top_p_keeps_at_least_one_token() -> None:
    logits = torch.tensor([[5.0, 1.0, 0.0]])
    filtered = top_k_top_p_filter(logits, torch.tensor([1e-9]), torch.tensor([0]))
    assert torch.isfinite(filtered).tolist() == [[True, False, False]]


def test_top_k_keeps_the_k_best() -> None:
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0], [1.0, 4.0, 3.0, 2.0]])
    filtered = top_k_top_p_filter(logits, torch.ones(2), torch.tensor([2, 0]))
    assert torch.isfinite(filtered).tolist() == [[False, True, True, False], [True] * 4]


def test_no_filter_when_every_row_keeps_everything() -> None:
    logits = torch.randn(4, 10)
    assert top_k_top_p_filter(logits, torch.ones(4), torch.zeros(4, dtype=torch.long)) is logits


def test_mixed_rows_each_match_their_own_reference() -> None:
    torch.manual_seed(1)
    after, before = torch.randn(6, 40), torch.randn(6, 40)
    alpha = torch.tensor([0.0, 1.0, 2.0, -1.0, 4.0, 0.5])
    temperature = torch.tensor([1.0, 0.7, 0.0, 1.3, 1.0, 0.5])
    top_p = torch.tensor([1.0, 0.9, 0.5, 0.95, 0.3, 1.0])
    top_k = torch.tensor([0, 0, 0, 5, 0, 3])
    seeds = [11, 12, 13, 14, 15, 16]
    for step in range(20):
        logits = amplify(after, before, alpha)
        tokens = sample(logits, temperature, top_p, top_k, seeds, [step] * 6)
        for b in range(6):
            ref_logits = after[b] + float(alpha[b]) * (after[b] - before[b])
            expected = sample_reference(
                ref_logits, float(temperature[b]), float(top_p[b]), int(top_k[b]), seeds[b], step
            )
            assert int(tokens[b]) == expected, (b, step)


def test_seeded_draw_does_not_depend_on_the_batch() -> None:
    torch.manual_seed(2)
    logits = torch.randn(5, 30)
    ones, zeros = torch.ones(5), torch.zeros(5, dtype=torch.long)
    together = sample(logits, ones, ones * 0.9, zeros, [1, 2, 3, 4, 5], [7, 7, 7, 7, 7])
    for b in range(5):
        alone = sample(logits[b : b + 1], ones[:1], ones[:1] * 0.9, zeros[:1], [b + 1], [7])
        assert int(alone[0]) == int(together[b])


def test_sampling_follows_the_distribution() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).repeat(4000, 1)
    ones = torch.ones(4000)
    tokens = sample(
        logits, ones, ones, torch.zeros(4000, dtype=torch.long), list(range(4000)), [0] * 4000
    )
    freq = torch.bincount(tokens, minlength=3).float() / 4000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.03)


def test_greedy_rows_take_the_argmax() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]])
    tokens = sample(
        logits,
        torch.tensor([0.0, 1.0]),
        torch.ones(2),
        torch.zeros(2, dtype=torch.long),
        [1, 2],
        [0, 0],
    )
    assert int(tokens[0]) == 1


def test_uniforms_and_derived_seeds_are_stable_and_distinct() -> None:
    assert row_uniform(5, 3) == row_uniform(5, 3)
    assert row_uniform(5, 3) != row_uniform(5, 4) != row_uniform(6, 3)
    assert all(0.0 <= row_uniform(s, t) < 1.0 for s in range(50) for t in range(50))
    assert derive_seed(9, 0) == 9
    assert len({derive_seed(9, j) for j in range(100)}) == 100
    assert all(0 <= derive_seed(2**63 - 1, j) < 2**63 for j in range(10))
