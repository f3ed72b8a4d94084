"""The step's sampling rows: their parameters on the device, the draw, the log-probabilities.

The runner hands it both models' logits of the rows that sample; it amplifies and draws (in C
on the CPU where that builds, else the torch program of `sampling.py`) and, where a row asks,
computes the log-probabilities from the very tensors the draw used. The rows' parameters are
turned into tensors only when the set of rows changes (most steps reuse them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from batchserve.core.types import GREEDY_TEMPERATURE, INVALID_TOKEN, ScheduledRow
from batchserve.worker import native
from batchserve.worker.host import upload
from batchserve.worker.logprobs import logprobs_of, pad_score_alphas
from batchserve.worker.sampling import SamplingPlan, sample_step, seed_hash, uniform_of_hash


@dataclass(frozen=True)
class SamplingRows:
    """The sampling rows' parameters on the device, rebuilt only when the rows change."""

    row_ids: tuple[int, ...]
    alpha: torch.Tensor
    temperature: torch.Tensor
    top_p: torch.Tensor
    top_k: torch.Tensor
    seed_hashes: tuple[int, ...]  # sampling.seed_hash of each row's seed
    plan: SamplingPlan
    scores: tuple[torch.Tensor, torch.Tensor] | None  # padded score alphas + mask, if any asks
    # With CUDA graphs: alpha, temperature, top_p, top_k padded to the graph's sampled rows
    # with a plain row's values (the padding rows' draws are dropped).
    padded: dict[str, torch.Tensor] | None = None


class StepSampler:
    """Draws the step's tokens and computes the log-probabilities rows asked for."""

    def __init__(
        self, device: torch.device, vocab: int, top_k_cap: int, *, sync_free: bool,
        native: bool, graph_padding: Callable[[int], int] | None = None,
    ) -> None:  # fmt: skip
        """`native`: the C sampler; `graph_padding`: with CUDA graphs, the padded count of n
        sampled rows (the graphs take the rows' parameters padded alike)."""
        self.device = device
        self.vocab = vocab
        self.top_k_cap = top_k_cap
        self.sync_free = sync_free
        self.native = native
        self.graph_padding = graph_padding
        self._rows: SamplingRows | None = None

    def rows(self, rows: list[ScheduledRow]) -> SamplingRows:
        row_ids = tuple(r.row_id for r in rows)
        if self._rows is not None and self._rows.row_ids == row_ids:
            return self._rows
        dev = self.device
        params = [r.params for r in rows]
        top_ks = [min(p.top_k, self.vocab) for p in params]
        scores = None
        if any(p.wants_logprobs for p in params):
            scores = pad_score_alphas([p.score_alphas for p in params], dev)
        # Greedy is decided here, once, in float64 as the plan decides it: a temperature just
        # under the threshold may round up to it in float32, where the samplers' own test
        # would then draw the row (and its draw would depend on the batch).
        temperatures = [
            0.0 if p.temperature < GREEDY_TEMPERATURE else p.temperature for p in params
        ]
        columns = {
            "alpha": ([p.alpha for p in params], 0.0, torch.float32),
            "temperature": (temperatures, 1.0, torch.float32),
            "top_p": ([p.top_p for p in params], 1.0, torch.float32),
            "top_k": (top_ks, 0, torch.long),
        }  # each: the rows' values, a plain row's (padding), the dtype
        # One copy up per column, padded for the graphs (which read the whole); the samplers
        # read the rows' part, a view of it.
        num_rows = len(rows)
        width = num_rows if self.graph_padding is None else self.graph_padding(num_rows)
        padded = {
            name: upload(values + [plain] * (width - num_rows), dtype, dev)
            for name, (values, plain, dtype) in columns.items()
        }
        tensors = {name: tensor[:num_rows] for name, tensor in padded.items()}
        self._rows = SamplingRows(
            row_ids=row_ids,
            **tensors,
            seed_hashes=tuple(seed_hash(r.seed) for r in rows),
            plan=SamplingPlan.for_rows(
                [p.temperature for p in params],
                [p.top_p for p in params],
                top_ks,
                vocab=self.vocab,
                cap=self.top_k_cap,
                sync_free=self.sync_free,
            ),  # fmt: skip
            scores=scores,
            padded=None if self.graph_padding is None else padded,
        )
        return self._rows

    def graph_inputs(self, s: SamplingRows, rows: list[ScheduledRow]) -> dict[str, torch.Tensor]:
        """What a graph that samples reads: the padded parameters and this step's uniforms."""
        assert s.padded is not None
        uniforms = self.uniforms(s, rows)
        uniforms += [0.0] * (s.padded["alpha"].shape[0] - len(uniforms))
        tensor = upload(uniforms, torch.float64, self.device)
        return {**s.padded, "uniforms": tensor}

    def sample(
        self, after: torch.Tensor, before: torch.Tensor, rows: list[ScheduledRow]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tokens [S] (INVALID_TOKEN for a row whose logits are not finite) and, when a row
        asks, [S, 3 + A] log-probabilities computed from the sampler's own tensors."""
        s = self.rows(rows)
        if self.native:
            return self._sample_in_c(after, before, rows, s)
        uniforms = None
        if not s.plan.all_greedy:
            uniforms = upload(self.uniforms(s, rows), torch.float64, self.device)
        tokens, logits, kept = sample_step(
            after, before, s.alpha, s.temperature, s.top_p, s.top_k, uniforms, s.plan
        )
        return tokens, self._logprobs(after, before, logits, kept, tokens, s)

    def _sample_in_c(
        self, after: torch.Tensor, before: torch.Tensor, rows: list[ScheduledRow],
        s: SamplingRows,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        """`sample` by the C sampler: the same rules, one pass per row."""
        uniforms = [0.0] * len(rows) if s.plan.all_greedy else self.uniforms(s, rows)
        wants_kept = s.scores is not None and s.plan.needs_filter
        out = native.sample_rows(
            after.float(), before.float(), s.alpha, s.temperature, s.top_p, s.top_k, uniforms,
            GREEDY_TEMPERATURE, INVALID_TOKEN, wants_kept,
        )  # fmt: skip
        return out.tokens, self._logprobs(after, before, out.amplified, out.kept, out.tokens, s)

    @staticmethod
    def uniforms(s: SamplingRows, rows: list[ScheduledRow]) -> list[float]:
        """Each row's uniform for this step's draw (its seed's hash and its output index)."""
        return [uniform_of_hash(h, r.step) for h, r in zip(s.seed_hashes, rows, strict=True)]

    @staticmethod
    def _logprobs(
        after: torch.Tensor, before: torch.Tensor, amplified: torch.Tensor,
        kept: torch.Tensor | None, tokens: torch.Tensor, s: SamplingRows,
    ) -> torch.Tensor | None:  # fmt: skip
        """[S, 3 + A] log-probabilities from the sampler's own tensors, when a row asks."""
        if s.scores is None:
            return None
        out = logprobs_of(
            after, before, amplified, kept if s.plan.needs_filter else None, s.temperature,
            tokens, *s.scores,
        )  # fmt: skip
        return torch.cat(
            [out.after[:, None], out.before[:, None], out.sampled[:, None], out.scored], dim=1
        )
