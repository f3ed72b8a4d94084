"""Batched LDA sampling: pure tensor functions over [B, V] logits with per-row parameters.

Seeded draws are batch-invariant: a row's random number at a step comes from a hash of
(row seed, step index) alone, so a seeded request samples the same tokens alone, inside any
batch, and whenever it was admitted. Sampling uses the inverse CDF in vocabulary order, which
needs one uniform per row and no sort unless top-p or top-k filtering is asked for.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from batchserve.seeds import MASK64, splitmix64


def amplify(
    logits_after: torch.Tensor, logits_before: torch.Tensor, alpha: torch.Tensor
) -> torch.Tensor:
    """after + alpha * (after - before), in float32, alpha per row ([B])."""
    after = logits_after.float()
    before = logits_before.float()
    return after + alpha.float().unsqueeze(-1) * (after - before)


def top_k_top_p_filter(
    logits: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor
) -> torch.Tensor:
    """Set to -inf every token outside a row's top-k and its nucleus; the best token always stays.

    The nucleus is the smallest set of most likely tokens whose mass reaches top_p. Rows with
    top_p = 1 and top_k = 0 are unchanged; when every row is like that, nothing is sorted.
    """
    vocab = logits.shape[-1]
    k = torch.where((top_k > 0) & (top_k < vocab), top_k, torch.full_like(top_k, vocab))
    needs_filter = (top_p < 1.0) | (k < vocab)
    if not bool(needs_filter.any()):
        return logits
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
    # top-k first, then the nucleus of what is left, as HF and vLLM order them.
    sorted_logits = sorted_logits.masked_fill(ranks >= k.unsqueeze(-1), float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    remove = mass_before >= top_p.unsqueeze(-1)
    remove[:, 0] = False
    remove &= needs_filter.unsqueeze(-1)
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, sorted_idx, sorted_logits)


def row_uniform(seed: int, step: int) -> float:
    """A uniform in [0, 1) that depends only on (seed, step): the batch-invariance guarantee."""
    return (splitmix64(splitmix64(seed & MASK64) ^ step) >> 11) * (1.0 / (1 << 53))


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    seeds: Sequence[int],
    steps: Sequence[int],
) -> torch.Tensor:
    """Draw one token per row of float32 logits [B, V]; temperature 0 means greedy."""
    greedy = temperature <= 0
    if bool(greedy.all()):
        return logits.argmax(dim=-1)
    safe_temperature = torch.where(greedy, torch.ones_like(temperature), temperature)
    scaled = logits / safe_temperature.unsqueeze(-1)
    filtered = top_k_top_p_filter(scaled, top_p, top_k)
    probs = filtered.softmax(dim=-1)
    # float64 CDF so the last bucket's edge does not round below the uniform draw.
    cdf = probs.double().cumsum(dim=-1)
    uniforms = torch.tensor(
        [row_uniform(s, t) for s, t in zip(seeds, steps, strict=True)],
        dtype=torch.float64,
        device=logits.device,
    )
    targets = (uniforms * cdf[:, -1]).unsqueeze(-1)
    tokens = torch.searchsorted(cdf, targets, right=True).squeeze(-1)
    tokens = tokens.clamp_(max=logits.shape[-1] - 1)
    if bool(greedy.any()):
        tokens = torch.where(greedy, logits.argmax(dim=-1), tokens)
    return tokens


def sample_reference(
    logits: torch.Tensor, temperature: float, top_p: float, top_k: int, seed: int, step: int
) -> int:
    """A plain one-row implementation of the same draw, for tests and readers."""
    row = logits.double()
    if temperature <= 0:
        return int(row.argmax())
    row = row / temperature
    order = sorted(range(row.shape[0]), key=lambda i: -float(row[i]))
    top = order[: top_k if top_k > 0 else len(order)]
    top_probs = torch.softmax(row[top], dim=0)
    mass = 0.0
    keep = set()
    for rank, i in enumerate(top):
        if mass >= top_p and keep:
            break
        keep.add(i)
        mass += float(top_probs[rank])
    masked = torch.full_like(row, float("-inf"))
    for i in keep:
        masked[i] = row[i]
    p = torch.softmax(masked, dim=0)
    u = row_uniform(seed, step) * float(p.sum())
    acc = 0.0
    for i in range(p.shape[0]):
        acc += float(p[i])
        if u < acc:
            return i
    return int(max(keep))
