"""Per-token log-probabilities of sampled tokens: tensor functions, no host synchronisation.

For each row of a decode step this gives, for the token the row just sampled:

- `after`, `before`: log p(x_t) under each model alone, at temperature 1 (the models' own
  distributions, whatever the row's sampling parameters);
- `sampled`: log q(x_t) under the distribution the token was actually drawn from: amplified,
  divided by the row's temperature, then top-k and top-p filtered by the sampler's own kept set
  (`sampling.kept_probs`). A greedy row (temperature 0) draws from a point mass, so its
  `sampled` is 0;
- `scored`: log q_alpha'(x_t) for each alpha' the row lists in `score_alphas`: the full softmax
  of after + alpha' * (after - before) at the row's temperature (1 for a greedy row), with no
  top-k or top-p truncation. No truncation on purpose: these feed importance and mixture
  weights, which are only unbiased when every distribution covers the whole vocabulary; a
  truncated q would put -inf on tokens another alpha can draw. At temperature 1 with no
  truncation, `scored` at the row's own alpha equals `sampled`.

Summed over a row's tokens these give sequence log-probabilities: log p_after(x) - log q(x) is
the log importance weight of a sample drawn from q for the after model's (alpha 0) rate.

No `.item()`, `bool(tensor)` or `nonzero` here when the plan is sync-free (always on CUDA):
everything stays on the device, so an engine can call this inside its step and copy the per-row
results once, when the row finishes. (On the CPU the sampler's plan may sort the few rows whose
nucleus exceeds its cap, reading a flag back; a read-back costs nothing there.)
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from batchserve.worker.host import upload
from batchserve.worker.sampling import (
    GREEDY_TEMPERATURE,
    SamplingPlan,
    amplify,
    kept_probs,
    scoring_temperature,
)


class StepLogprobs(NamedTuple):
    after: torch.Tensor  # [B] float32
    before: torch.Tensor  # [B]
    sampled: torch.Tensor  # [B]
    scored: torch.Tensor  # [B, A]; 0 where the mask is False


def _token_logprob(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] per row, without materialising the [B, V] log-softmax."""
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def step_logprobs(
    logits_after: torch.Tensor,
    logits_before: torch.Tensor,
    alpha: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    tokens: torch.Tensor,
    score_alphas: torch.Tensor,
    score_mask: torch.Tensor,
    plan: SamplingPlan | None = None,
) -> StepLogprobs:
    """Log-probabilities of `tokens` [B] under each distribution (see the module docstring).

    `score_alphas` [B, A] float with `score_mask` [B, A] bool: each row's listed alphas, padded.
    `plan` is the sampler's host-side plan for these rows (sampling.SamplingPlan): the kept set
    comes from `sampling.kept_probs`, the very function the draw uses. Without a plan this
    derives one from the tensors, which reads them back (library use only).
    """
    if plan is None:
        plan = SamplingPlan.for_rows(
            temperature.tolist(), top_p.tolist(), top_k.tolist(), vocab=logits_after.shape[-1]
        )
    amplified = amplify(logits_after, logits_before, alpha)
    kept = kept_probs(amplified, temperature, top_p, top_k, plan) if plan.needs_filter else None
    return logprobs_of(
        logits_after, logits_before, amplified, kept, temperature, tokens, score_alphas,
        score_mask,
    )  # fmt: skip


def logprobs_of(
    logits_after: torch.Tensor,
    logits_before: torch.Tensor,
    amplified: torch.Tensor,
    kept: torch.Tensor | None,
    temperature: torch.Tensor,
    tokens: torch.Tensor,
    score_alphas: torch.Tensor,
    score_mask: torch.Tensor,
) -> StepLogprobs:
    """`step_logprobs` from what the sampler computed already: the amplified logits and, when
    a row filters, `sampling.kept_probs` (None when no row does). Nothing is amplified twice."""
    after = logits_after.float()
    before = logits_before.float()
    tokens = tokens.long().clamp(min=0)  # a broken row's -1 (INVALID_TOKEN) scores token 0
    greedy = temperature < GREEDY_TEMPERATURE
    # A greedy row's `sampled` is 0 (a point mass); its scores use temperature 1, the choice
    # documented above (a softmax at temperature 0 does not exist).
    safe_t = scoring_temperature(temperature).float().unsqueeze(-1)
    sampled = _token_logprob(amplified / safe_t, tokens)
    if kept is not None:
        # log q = log softmax(token) - log(mass of the kept set): exact for the kept tokens,
        # without taking the log of a float32 probability.
        # Rounding in the kept mass can lift a near-certain token a hair above 0 (6e-8 seen).
        sampled = (sampled - kept.sum(-1).log()).clamp(max=0.0)
    sampled = torch.where(greedy, torch.zeros_like(sampled), sampled)
    num_scores = score_alphas.shape[-1]
    scored = torch.zeros((after.shape[0], num_scores), dtype=torch.float32, device=after.device)
    diff = after - before
    picked_after = after.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    picked_diff = diff.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    # One [B, V] logsumexp per listed alpha; A is small (bounded by the request schema), and a
    # loop keeps peak memory at [B, V] instead of [B, A, V].
    for j in range(num_scores):
        a = score_alphas[:, j].float().unsqueeze(-1)
        z = (after + a * diff) / safe_t
        token_z = (picked_after + a[:, 0] * picked_diff) / safe_t[:, 0]
        scored[:, j] = token_z - torch.logsumexp(z, dim=-1)
    scored = torch.where(score_mask, scored, torch.zeros_like(scored))
    return StepLogprobs(
        after=_token_logprob(after, tokens),
        before=_token_logprob(before, tokens),
        sampled=sampled,
        scored=scored,
    )


def pad_score_alphas(
    rows_alphas: list[tuple[float, ...]], device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows' score_alphas lists as a padded [B, A] tensor and its mask (one host-to-device copy)."""
    width = max((len(a) for a in rows_alphas), default=0)
    values = [list(a) + [0.0] * (width - len(a)) for a in rows_alphas]
    mask = [[True] * len(a) + [False] * (width - len(a)) for a in rows_alphas]
    return (
        upload(values, torch.float32, device),
        upload(mask, torch.bool, device),
    )
