"""LDA sampling as one tensor program over all slots: amplify, temperature, top-k/top-p, draw.

Nothing here reads a tensor back to the host: every branch is decided by `SamplingPlan`, which
the engine derives from the rows' parameters (known on the host since admission). That keeps a
decode step at one device-to-host copy and makes the whole program capturable in a CUDA graph.

Seeded draws are batch-invariant: a row's uniform at a step is a hash of (row seed, step)
(the runner computes it on the host, one SplitMix64 per row; `seeded_uniforms` is the same with
int64 tensor ops), so a seeded row samples the same tokens alone, inside any batch and whenever
it was admitted. The draw is an inverse CDF in vocabulary order over the kept
tokens' probabilities, the same arithmetic whatever filter chose the kept set.

Filtering avoids sorting the vocabulary: `torch.topk` with a fixed cap finds each row's top-k
set and nucleus when they fit in the cap; a row whose nucleus (or top-k) is larger than the cap
takes an exact fallback that finds the cut-off probability by a radix search over float32 bit
patterns (a few passes over the row, no sort).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from batchserve.core.seeds import MASK64, splitmix64
from batchserve.core.types import GREEDY_TEMPERATURE, INVALID_TOKEN

DEFAULT_TOP_K_CAP = 128

_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_MAX_FLOAT_BITS = 0x7F7FFFFF  # the largest finite float32


def _signed(x: int) -> int:
    """A 64-bit pattern as the int64 value that has it (tensor constants must fit int64)."""
    return x - (1 << 64) if x >= 1 << 63 else x


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic: mask off the sign copies)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64_tensor(x: torch.Tensor) -> torch.Tensor:
    """seeds.splitmix64 on int64 tensors; multiplication wraps modulo 2**64 as in C."""
    x = x + _signed(_GOLDEN)
    x = (x ^ _shr(x, 30)) * _signed(_MIX1)
    x = (x ^ _shr(x, 27)) * _signed(_MIX2)
    return x ^ _shr(x, 31)


def seeded_uniforms(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """Uniforms in [0, 1) (float64), one per row, each a function of (seed, step) alone."""
    bits = _shr(splitmix64_tensor(splitmix64_tensor(seeds) ^ steps), 11)
    return bits.double() * (1.0 / (1 << 53))


def row_uniform(seed: int, step: int) -> float:
    """`seeded_uniforms` for one row, on the host."""
    return uniform_of_hash(seed_hash(seed), step)


def seed_hash(seed: int) -> int:
    """The part of a row's uniforms that depends on its seed alone (kept per row)."""
    return splitmix64(seed & MASK64)


def uniform_of_hash(hashed_seed: int, step: int) -> float:
    """A row's uniform at `step` from its `seed_hash`: one SplitMix64 on the host, where the
    same on the device costs ~20 small tensor operations a step."""
    return (splitmix64(hashed_seed ^ step) >> 11) * (1.0 / (1 << 53))


def amplify(
    logits_after: torch.Tensor, logits_before: torch.Tensor, alpha: torch.Tensor
) -> torch.Tensor:
    """after + alpha * (after - before), in float32, alpha per row ([B])."""
    after = logits_after.float()
    before = logits_before.float()
    return after + alpha.float().unsqueeze(-1) * (after - before)


@dataclass(frozen=True)
class SamplingPlan:
    """Which parts of the program the current rows need; decided on the host, never read back.

    `any_greedy`: some row is greedy; `all_greedy`: every row is (argmax only); `needs_filter`:
    some row has top_p < 1 or a top-k; `needs_fallback`: some row's top-k or nucleus may exceed
    the cap (top_p < 1 without a top-k within the cap, or a top-k above the cap);
    `needs_top_k_search`: some row's top-k is above the cap (its cut-off must be searched too).

    `sync_free`: the fallback runs for every row whenever it may be needed (a radix search, no
    sort, nothing read back), as a GPU step must. Without it (on the CPU, where reading a flag
    costs nothing and sorting a small vocabulary is cheap) the fallback runs only when some row
    needs it, and only on those rows, by a full sort.
    """

    any_greedy: bool = False
    all_greedy: bool = False
    needs_filter: bool = True
    needs_fallback: bool = True
    needs_top_k_search: bool = True
    cap: int = DEFAULT_TOP_K_CAP
    sync_free: bool = True

    @classmethod
    def for_rows(
        cls,
        temperatures: list[float],
        top_ps: list[float],
        top_ks: list[int],
        vocab: int,
        cap: int = DEFAULT_TOP_K_CAP,
        sync_free: bool = True,
    ) -> SamplingPlan:
        cap = max(1, min(cap, vocab))
        greedy = [t < GREEDY_TEMPERATURE for t in temperatures]
        filtering = [
            not g and (p < 1.0 or 0 < k < vocab)
            for g, p, k in zip(greedy, top_ps, top_ks, strict=True)
        ]
        fallback = [
            f and ((cap < k < vocab) or (p < 1.0 and not 0 < k <= cap))
            for f, p, k in zip(filtering, top_ps, top_ks, strict=True)
        ]
        return cls(
            any_greedy=any(greedy),
            all_greedy=bool(greedy) and all(greedy),
            needs_filter=any(filtering),
            needs_fallback=any(fallback),
            needs_top_k_search=any(
                f and cap < k < vocab for f, k in zip(filtering, top_ks, strict=True)
            ),
            cap=cap,
            sync_free=sync_free,
        )


def _smallest_true(
    probs: torch.Tensor, predicate: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Per row, the smallest float32 t >= 0 where predicate(t) holds (false below, true above).

    A radix-4 search over the bit patterns of non-negative float32s, which order like the
    floats: each pass tries 3 cut-offs per row at once ([B, 3] candidates), 16 passes decide
    all 32 bits. `predicate` maps [B, 3] candidates to [B, 3] booleans.
    """
    lo = torch.full((probs.shape[0],), -1, dtype=torch.int64, device=probs.device)
    offsets = torch.arange(1, 4, dtype=torch.int64, device=probs.device)
    width = 1 << 32
    for _ in range(16):
        width //= 4
        candidates = (lo.unsqueeze(-1) + offsets * width).clamp_(0, _MAX_FLOAT_BITS)
        holds = predicate(candidates.to(torch.int32).view(torch.float32))
        lo = lo + (~holds).sum(-1) * width
    return (lo + 1).clamp_(0, _MAX_FLOAT_BITS).to(torch.int32).view(torch.float32)


def exact_keep_mask(
    probs: torch.Tensor, top_p: torch.Tensor, k: torch.Tensor, search_top_k: bool = True
) -> torch.Tensor:
    """The kept set of the full-sort definition for any row, without a sort or a cap.

    Top-k keeps the tokens with p >= the k-th largest p (the smallest t with fewer than k
    tokens above it). The nucleus keeps a token iff the mass of strictly more likely tokens in
    the top-k set is below top_p of that set's mass: again a threshold, found the same way.
    `search_top_k=False` when no row's top-k is above the cap (rows within it are exact already).
    """
    rows = probs.unsqueeze(1)  # [B, 1, V] against [B, 3, 1] candidates

    def fewer_than_k_above(t: torch.Tensor) -> torch.Tensor:
        return (rows > t.unsqueeze(-1)).sum(-1) < k.unsqueeze(-1)

    if search_top_k:
        in_k = probs >= _smallest_true(probs, fewer_than_k_above).unsqueeze(-1)
    else:
        in_k = torch.ones_like(probs, dtype=torch.bool)
    in_k_probs = (probs * in_k).unsqueeze(1)
    mass = torch.where(k < probs.shape[-1], (probs * in_k).sum(-1), torch.ones_like(top_p))
    target = (top_p * mass).unsqueeze(-1)  # [B, 1]

    def mass_above_below_target(t: torch.Tensor) -> torch.Tensor:
        above = torch.where(in_k_probs > t.unsqueeze(-1), in_k_probs, 0.0).sum(-1)
        return above < target

    return in_k & (probs >= _smallest_true(probs, mass_above_below_target).unsqueeze(-1))


def capped_keep_mask(
    probs: torch.Tensor, top_p: torch.Tensor, k: torch.Tensor, cap: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept set decided from the `cap` most likely tokens, and whether that is exact.

    Ties are decided together, so the set does not depend on how a kernel orders equal values:
    a token is in the top-k iff fewer than k tokens are strictly more likely, and in the
    nucleus iff the top-k mass strictly more likely than it is below top_p of the top-k mass.
    Exact when everything beyond the cap is certainly out: the last capped rank is out and the
    top-k set, if any, closed inside the cap.
    """
    vocab = probs.shape[-1]
    values, index = probs.topk(cap, dim=-1)  # descending
    ranks = torch.arange(cap, device=probs.device)
    is_run_start = torch.ones_like(values, dtype=torch.bool)
    is_run_start[:, 1:] = values[:, 1:] != values[:, :-1]
    run_start = torch.cummax(torch.where(is_run_start, ranks, 0), dim=-1).values
    in_k = run_start < k.unsqueeze(-1)
    in_k_values = values * in_k
    mass = torch.where(k < vocab, in_k_values.sum(-1), torch.ones_like(top_p))
    mass_above = (in_k_values.cumsum(-1) - in_k_values).gather(-1, run_start)
    keep_ranks = in_k & (mass_above < (top_p * mass).unsqueeze(-1))
    closed = (k >= vocab) | ~in_k[:, -1]
    is_exact = torch.full_like(closed, cap >= vocab) | (closed & ~keep_ranks[:, -1])
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, index, keep_ranks)
    return keep, is_exact


def sorted_keep_mask(probs: torch.Tensor, top_p: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The kept set by a full sort of each row (the CPU fallback, for the rows that need it)."""
    return capped_keep_mask(probs, top_p, k, probs.shape[-1])[0]


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    seeds: torch.Tensor,
    steps: torch.Tensor,
    plan: SamplingPlan | None = None,
) -> torch.Tensor:
    """Draw one token per row of float32 logits [B, V]; every parameter is a [B] tensor."""
    if plan is None:  # library use: decide on the host from the tensors themselves
        plan = SamplingPlan.for_rows(
            temperature.tolist(), top_p.tolist(), top_k.tolist(), vocab=logits.shape[-1]
        )
    if plan.all_greedy:
        return logits.argmax(dim=-1)
    probs = kept_probs(logits, temperature, top_p, top_k, plan)
    return draw(logits, probs, temperature, seeded_uniforms(seeds, steps), plan)


def sample_step(
    after: torch.Tensor,
    before: torch.Tensor,
    alpha: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    uniforms: torch.Tensor | None,
    plan: SamplingPlan,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The runner's sampler on both models' logits [S, V]: tokens [S] (INVALID_TOKEN where a
    row's logits are not finite), the amplified logits and the kept probabilities (None when
    every row is greedy), which the log-probabilities read. `uniforms` may be None only for an
    all-greedy plan. Nothing is read back, so a CUDA graph can hold it (worker/cuda_graphs.py)."""
    logits = amplify(after, before, alpha)
    # -inf in both models (a masked token) is -inf amplified, not -inf - -inf = NaN.
    logits = logits.nan_to_num_(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    kept = None
    if plan.all_greedy:
        tokens = logits.argmax(dim=-1)
    else:
        assert uniforms is not None
        kept = kept_probs(logits, temperature, top_p, top_k, plan)
        tokens = draw(logits, kept, temperature, uniforms, plan)
    # A row whose models gave NaN, +inf or nothing finite is flagged with token -1 (it rides
    # the step's one copy to the host); the scheduler fails that row alone.
    broken = (
        torch.isnan(after).any(-1)
        | torch.isnan(before).any(-1)
        | ~torch.isfinite(logits.max(-1).values)
    )
    return tokens.masked_fill_(broken, INVALID_TOKEN), logits, kept


def draw(
    logits: torch.Tensor,
    probs: torch.Tensor,
    temperature: torch.Tensor,
    uniforms: torch.Tensor,
    plan: SamplingPlan,
) -> torch.Tensor:
    """One token per row from `kept_probs`' distribution at the rows' float64 uniforms
    (`seeded_uniforms`); greedy rows: the argmax of logits."""
    # float64 CDF so the last bucket's edge does not round below the uniform draw.
    cdf = probs.double().cumsum(dim=-1)
    targets = (uniforms * cdf[:, -1]).unsqueeze(-1)
    tokens = torch.searchsorted(cdf, targets, right=True).squeeze(-1)
    tokens = tokens.clamp_(max=logits.shape[-1] - 1)
    if plan.any_greedy:
        tokens = torch.where(temperature < GREEDY_TEMPERATURE, logits.argmax(dim=-1), tokens)
    return tokens


def scoring_temperature(temperature: torch.Tensor) -> torch.Tensor:
    """Each row's temperature, greedy rows at 1: a softmax at temperature 0 does not exist, so
    a greedy row's probabilities are scored at the models' own temperature."""
    greedy = temperature < GREEDY_TEMPERATURE
    return torch.where(greedy, torch.ones_like(temperature), temperature)


def kept_probs(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    plan: SamplingPlan,
) -> torch.Tensor:
    """Softmax at each row's temperature with the tokens outside its top-k / nucleus zeroed
    (not renormalised): the distribution `sample` draws from, up to its row sum. Greedy rows
    are scored at temperature 1 (their draw is the argmax, whatever this says)."""
    vocab = logits.shape[-1]
    probs = (logits / scoring_temperature(temperature).unsqueeze(-1)).softmax(dim=-1)
    if plan.needs_filter:
        k = torch.where((top_k > 0) & (top_k < vocab), top_k, torch.full_like(top_k, vocab))
        keep, is_exact = capped_keep_mask(probs, top_p, k, plan.cap)
        if plan.needs_fallback and plan.sync_free:
            exact = exact_keep_mask(probs, top_p, k, plan.needs_top_k_search)
            keep = torch.where(is_exact.unsqueeze(-1), keep, exact)
        elif plan.needs_fallback and not bool(is_exact.all()):
            rows = (~is_exact).nonzero().squeeze(-1)
            keep[rows] = sorted_keep_mask(probs[rows], top_p[rows], k[rows])
        keeps_all = (top_p >= 1.0) & (k >= vocab)
        probs = torch.where(keep | keeps_all.unsqueeze(-1), probs, torch.zeros_like(probs))
    return probs


def sample_reference(
    logits: torch.Tensor, temperature: float, top_p: float, top_k: int, seed: int, step: int
) -> int:
    """A plain one-row implementation in float64, for tests and readers.

    Top-k keeps a token iff fewer than top_k tokens are strictly more likely; the nucleus keeps
    it iff the top-k mass strictly more likely than it is below top_p of the top-k mass. Ties
    are therefore kept or dropped together, whatever order a sort would give them.
    """
    row = logits.double()
    if temperature < GREEDY_TEMPERATURE:
        return int(row.argmax())
    probs = torch.softmax(row / temperature, dim=0).tolist()
    vocab = len(probs)
    in_k = [top_k <= 0 or top_k >= vocab or sum(q > p for q in probs) < top_k for p in probs]
    mass = sum(p for p, i in zip(probs, in_k, strict=True) if i) if 0 < top_k < vocab else 1.0
    keep = [
        i and sum(q for q, j in zip(probs, in_k, strict=True) if j and q > p) < top_p * mass
        for p, i in zip(probs, in_k, strict=True)
    ]
    kept = [p if k else 0.0 for p, k in zip(probs, keep, strict=True)]
    u = row_uniform(seed, step) * sum(kept)
    acc = 0.0
    for i, p in enumerate(kept):
        acc += p
        if u < acc:
            return i
    return max(i for i, k in enumerate(keep) if k)
