"""Device sampling matches a full-sort one-row reference, draws are batch-invariant, and the
capped top-k/top-p pre-pass falls back exactly when a nucleus is larger than its cap."""

from __future__ import annotations

import random

import pytest
import torch

from batchserve.core.seeds import SEED_MAX, derive_seed
from batchserve.worker.sampling import (
    SamplingPlan,
    amplify,
    capped_keep_mask,
    exact_keep_mask,
    row_uniform,
    sample,
    sample_reference,
    seeded_uniforms,
)


def reference_keep(row: torch.Tensor, top_p: float, top_k: int) -> set[int]:
    """The kept set by the order-free rule, one token at a time in float64."""
    probs = row.double().softmax(-1).tolist()
    vocab = len(probs)
    in_k = [top_k <= 0 or sum(q > p for q in probs) < top_k for p in probs]
    mass = sum(p for p, i in zip(probs, in_k, strict=True) if i) if 0 < top_k < vocab else 1.0
    return {
        t
        for t, (p, i) in enumerate(zip(probs, in_k, strict=True))
        if i and sum(q for q, j in zip(probs, in_k, strict=True) if j and q > p) < top_p * mass
    }


def seeds_and_steps(seeds: list[int], steps: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(seeds), torch.tensor(steps)


def test_device_uniforms_equal_the_host_hash_for_any_seed() -> None:
    seeds = [0, 1, 5, 2**31 - 1, 2**62 + 12345, SEED_MAX, 987654321]
    steps = [0, 1, 7, 1000, 3, 150, 2**20]
    got = seeded_uniforms(*seeds_and_steps(seeds, steps)).tolist()
    assert got == [row_uniform(s, t) for s, t in zip(seeds, steps, strict=True)]
    assert all(0.0 <= u < 1.0 for u in got)


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("top_k", [0, 3, 20])
def test_capped_and_exact_keep_sets_match_the_full_sort(top_p: float, top_k: int) -> None:
    torch.manual_seed(0)
    logits = torch.randn(8, 50) * 2
    probs = logits.softmax(-1)
    k = torch.full((8,), top_k if top_k else 50)
    exact = exact_keep_mask(probs, torch.full((8,), top_p), k)
    capped, is_exact = capped_keep_mask(probs, torch.full((8,), top_p), k, cap=50)
    assert bool(is_exact.all())  # a cap as wide as the vocabulary is always exact
    for b in range(8):
        expected = reference_keep(logits[b], top_p, top_k)
        assert set(exact[b].nonzero().flatten().tolist()) == expected
        assert set(capped[b].nonzero().flatten().tolist()) == expected


def test_a_nucleus_larger_than_the_cap_is_flagged_for_the_fallback() -> None:
    probs = torch.linspace(1, 2, 100).softmax(-1).unsqueeze(0)  # nearly flat, no ties
    _, is_exact = capped_keep_mask(probs, torch.tensor([0.9]), torch.tensor([100]), cap=8)
    assert not bool(is_exact[0])
    _, is_exact = capped_keep_mask(probs, torch.tensor([0.05]), torch.tensor([100]), cap=8)
    assert bool(is_exact[0])


@pytest.mark.parametrize("sync_free", [True, False])
@pytest.mark.parametrize(
    ("logits", "top_p", "top_k", "kept"),
    [
        ([2.0, 1.0, 1.0, 1.0, -5.0], 0.6, 0, {0, 1, 2, 3}),  # a tie at the nucleus' edge
        ([5.0, 4.0, 3.0, 3.0, 1.0], 1.0, 3, {0, 1, 2, 3}),  # a tie at the k-th place
        ([1.0] * 6, 0.1, 0, set(range(6))),  # all tied: nothing can be cut
    ],
)
def test_ties_at_the_cut_are_kept_together_on_every_path(
    logits: list[float], top_p: float, top_k: int, kept: set[int], sync_free: bool
) -> None:
    """Kernels order equal values differently; the kept set must not depend on that."""
    row = torch.tensor([logits])
    assert reference_keep(row[0], top_p, top_k) == kept
    k = torch.tensor([top_k if top_k else len(logits)])
    probs = row.softmax(-1)
    assert (
        set(exact_keep_mask(probs, torch.tensor([top_p]), k)[0].nonzero().flatten().tolist())
        == kept
    )
    for cap in (1, 2, len(logits)):
        keep, is_exact = capped_keep_mask(probs, torch.tensor([top_p]), k, cap)
        if bool(is_exact[0]):
            assert set(keep[0].nonzero().flatten().tolist()) == kept
        plan = SamplingPlan.for_rows([1.0], [top_p], [top_k], len(logits), cap, sync_free)
        rows = row.repeat(64, 1)
        tokens = sample(
            rows,
            torch.ones(64),
            torch.full((64,), top_p),
            torch.full((64,), top_k),
            torch.arange(64),
            torch.zeros(64, dtype=torch.long),
            plan,
        ).tolist()
        assert tokens == [sample_reference(row[0], 1.0, top_p, top_k, s, 0) for s in range(64)]
        assert set(tokens) <= kept


@pytest.mark.parametrize("bf16_ties", [False, True], ids=["float32", "bf16-rounded"])
@pytest.mark.parametrize("sync_free", [True, False], ids=["radix-fallback", "sorted-fallback"])
@pytest.mark.parametrize("cap", [4, 32, 200])
def test_capped_sampling_draws_exactly_the_full_sort_references_tokens(
    cap: int, sync_free: bool, bf16_ties: bool
) -> None:
    """Mixed rows, small caps: many rows take the exact fallback; every draw must match."""
    rng = random.Random(cap)
    torch.manual_seed(cap)
    vocab, rows = 200, 24
    fallbacks = 0
    for _ in range(6):
        logits = torch.randn(rows, vocab) * rng.choice([0.3, 1.0, 3.0])
        if bf16_ties:  # bf16 logits: many exact ties, as on a GPU
            logits = logits.bfloat16().float()
        temperature = [rng.choice([0.0, 0.5, 1.0, 1.3, 1e-45]) for _ in range(rows)]
        top_p = [rng.choice([1.0, 0.99, 0.95, 0.9, 0.5]) for _ in range(rows)]
        top_k = [rng.choice([0, 0, 5, 50, 150, 199, 200]) for _ in range(rows)]
        seeds = [rng.randrange(SEED_MAX) for _ in range(rows)]
        steps = [rng.randrange(500) for _ in range(rows)]
        plan = SamplingPlan.for_rows(temperature, top_p, top_k, vocab, cap, sync_free)
        tokens = sample(
            logits,
            torch.tensor(temperature),
            torch.tensor(top_p),
            torch.tensor(top_k),
            *seeds_and_steps(seeds, steps),
            plan,
        ).tolist()
        k = torch.tensor([t if 0 < t < vocab else vocab for t in top_k])
        scaled = logits / torch.tensor([t if t >= 1e-5 else 1.0 for t in temperature])[:, None]
        _, is_exact = capped_keep_mask(scaled.softmax(-1), torch.tensor(top_p), k, plan.cap)
        fallbacks += int((~is_exact).sum())
        for b in range(rows):
            expected = sample_reference(
                logits[b], temperature[b], top_p[b], top_k[b], seeds[b], steps[b]
            )
            assert tokens[b] == expected, (b, temperature[b], top_p[b], top_k[b])
    if cap < vocab:
        assert fallbacks > 0  # the exact fallback really ran


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
        tokens = sample(logits, temperature, top_p, top_k, *seeds_and_steps(seeds, [step] * 6))
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
    seeds, steps = seeds_and_steps([1, 2, 3, 4, 5], [7] * 5)
    together = sample(logits, ones, ones * 0.9, zeros, seeds, steps)
    for b in range(5):
        one = slice(b, b + 1)
        alone = sample(logits[one], ones[one], ones[one] * 0.9, zeros[one], seeds[one], steps[one])
        assert int(alone[0]) == int(together[b])


def test_sampling_follows_the_distribution() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).repeat(4000, 1)
    ones = torch.ones(4000)
    tokens = sample(
        logits,
        ones,
        ones,
        torch.zeros(4000, dtype=torch.long),
        *seeds_and_steps(list(range(4000)), [0] * 4000),
    )
    freq = torch.bincount(tokens, minlength=3).float() / 4000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.03)


@pytest.mark.parametrize("temperature", [0.0, 1e-45, 1e-38, 1e-6])
def test_temperatures_below_the_epsilon_are_greedy(temperature: float) -> None:
    torch.manual_seed(3)
    logits = torch.randn(16, 64) * 5
    tokens = sample(
        logits,
        torch.full((16,), temperature),
        torch.full((16,), 0.95),
        torch.zeros(16, dtype=torch.long),
        *seeds_and_steps(list(range(16)), [0] * 16),
    )
    assert tokens.tolist() == logits.argmax(-1).tolist()


def test_greedy_and_sampled_rows_mix() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]])
    tokens = sample(
        logits,
        torch.tensor([0.0, 1.0]),
        torch.ones(2),
        torch.zeros(2, dtype=torch.long),
        *seeds_and_steps([1, 2], [0, 0]),
    )
    assert int(tokens[0]) == 1
    assert int(tokens[1]) == sample_reference(logits[1], 1.0, 1.0, 0, 2, 0)


def test_uniforms_and_derived_seeds_are_stable_and_distinct() -> None:
    assert row_uniform(5, 3) == row_uniform(5, 3)
    assert row_uniform(5, 3) != row_uniform(5, 4) != row_uniform(6, 3)
    assert all(0.0 <= row_uniform(s, t) < 1.0 for s in range(50) for t in range(50))
    assert derive_seed(9, 0) == 9
    assert len({derive_seed(9, j) for j in range(100)}) == 100
    assert all(0 <= derive_seed(2**63 - 1, j) < 2**63 for j in range(10))
