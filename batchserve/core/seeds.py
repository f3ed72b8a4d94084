"""Every seed rule in one place: bounds, random seeds, per-sample and per-prompt derivation.

A row's random draws depend only on (seed, step) (see sampling.py), so a reported seed replays
its sample exactly. The rules here decide which seed each row gets.
"""

from __future__ import annotations

import dataclasses
import secrets

from batchserve.core.types import SamplingParams

MASK64 = (1 << 64) - 1
SEED_MAX = (1 << 63) - 1  # seeds are int64 on the device and in every JSON parser we target
RANDOM_SEED_BITS = 31  # reported back to clients; stays exact in JavaScript


def splitmix64(x: int) -> int:
    """The SplitMix64 finaliser: a cheap, well-mixed 64-bit hash (Steele et al., 2014)."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def random_seed() -> int:
    return secrets.randbelow(1 << RANDOM_SEED_BITS)


def derive_seed(seed: int, index: int) -> int:
    """Seed number `index` derived from `seed`: index 0 keeps it, others are distinct, < 2**63."""
    if index == 0:
        return seed
    return splitmix64(splitmix64(seed & MASK64) + index) >> 1


def sample_seeds(seed: int | None, n: int) -> list[int]:
    """Seeds of a prompt's n samples: sample 0 keeps a given seed, sample j derives its own."""
    if seed is None:
        return [random_seed() for _ in range(n)]
    return [derive_seed(seed, j) for j in range(n)]


def prompt_seed(params: SamplingParams, first_row: int) -> SamplingParams:
    """Seed of a prompt whose first row is row `first_row` of a seeded multi-prompt request.

    One shared seed would give every prompt the same random draws, correlating their outcomes
    and making a study's intervals too narrow; so the prompt starting at row r samples from
    derive_seed(seed, r) (row 0 keeps the seed), and its samples j > 0 derive from that in turn.
    """
    if params.seed is None or first_row == 0:
        return params
    return dataclasses.replace(params, seed=derive_seed(params.seed, first_row))
