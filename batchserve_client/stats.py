"""Statistics for activation rates.

Activation is rare (often 0 or a handful in hundreds of samples), where the normal-approximation
interval collapses to [0, 0] or dips below zero. The Wilson score interval stays inside [0, 1]
and keeps honest width at 0 successes (Brown, Cai & DasGupta 2001, "Interval Estimation for a
Binomial Proportion").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Z_95 = 1.959963984540054


def wilson_interval(successes: int, total: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; (0, 1) when there is no data."""
    if total < 0 or not 0 <= successes <= total:
        raise ValueError(f"need 0 <= successes <= total, got {successes}/{total}")
    if total == 0:
        return 0.0, 1.0
    p = successes / total
    z2 = z * z
    denom = 1 + z2 / total
    centre = (p + z2 / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z2 / (4 * total * total)) / denom
    # Exact at the edges: floating error would otherwise give e.g. 1e-17 instead of 0.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == total else min(1.0, centre + half)
    return low, high


@dataclass(frozen=True)
class RateSummary:
    """One cell of the results table: a prompt set at one alpha.

    `total` counts trials with a completion; errored trials are counted in `errors` and left
    out of the rate, because a failed request says nothing about the model.
    """

    activated: int
    total: int
    errors: int

    @property
    def rate(self) -> float:
        return self.activated / self.total if self.total else 0.0

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.activated, self.total)


def rate_ratio(rate: float, baseline_rate: float | None) -> float | None:
    """Rate relative to the alpha-0 baseline; None when there is no baseline or it is 0
    (an infinite ratio is not JSON and not a useful number)."""
    if baseline_rate is None or baseline_rate == 0:
        return None
    return rate / baseline_rate
