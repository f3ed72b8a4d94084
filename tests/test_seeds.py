"""Seed rules: bounds, random seeds, per-sample and per-prompt derivation."""

from __future__ import annotations

from batchserve.core.seeds import SEED_MAX, derive_seed, prompt_seed, sample_seeds
from batchserve.core.types import SamplingParams


def test_seed_rules() -> None:
    assert sample_seeds(7, 3)[0] == 7 and len(set(sample_seeds(7, 3))) == 3
    assert all(0 <= s < 2**31 for s in sample_seeds(None, 5))
    assert all(0 <= derive_seed(SEED_MAX, j) <= SEED_MAX for j in range(20))
    params = SamplingParams(seed=5)
    assert prompt_seed(params, 0) is params
    assert prompt_seed(params, 3).seed == derive_seed(5, 3)
    assert prompt_seed(SamplingParams(), 3).seed is None
