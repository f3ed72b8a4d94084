"""Prefill and decode over the running batch: both models step in lockstep, one forward each.

No asyncio and no HTTP here: the scheduler drives `admit` / `step` / `cancel` from its worker
thread, and `generate` runs a list of requests to completion for library and offline use.
"""

from __future__ import annotations

import itertools
import logging
import math
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence

import torch
from tqdm import tqdm

from batchserve.core.seeds import SEED_MAX
from batchserve.core.types import (
    Capacity,
    EngineRow,
    GenerationRequest,
    GenerationResult,
    Row,
    RowError,
    RunnerConfig,
    SamplingParams,
    TokenLogprobs,
    find_stop,
)
from batchserve.frontend import format_prompt
from batchserve.scheduler import SchedulerConfig, SchedulerCore, engine_rows, prepare_prompt
from batchserve.worker.logprobs import pad_score_alphas, step_logprobs
from batchserve.worker.models import ModelPair
from batchserve.worker.runner import INVALID_TOKEN, ModelRunner, SlotParams
from batchserve.worker.sampling import SamplingPlan

__all__ = [
    "EngineRow",
    "GenerationRequest",
    "GenerationResult",
    "LDAEngine",
    "RowError",
    "RunnerConfig",
    "SamplingParams",
    "generate",
    "iter_generate",
]

log = logging.getLogger(__name__)


class LDAEngine:
    """Rows in slots, stop checks and results; drives the runner. One thread only (the worker).

    The occupied slots are always the prefix 0..B-1: a finished row's slot takes the last row,
    so the runner steps `slots[:B]` and never sees a gap.
    """

    def __init__(
        self,
        pair: ModelPair,
        *,
        prompt_format: str = "alpaca",
        runner_config: RunnerConfig | None = None,
    ) -> None:
        self.pair = pair
        self.tokenizer = pair.tokenizer
        self.prompt_format = prompt_format
        self.runner = ModelRunner(pair, runner_config)
        self.slots: list[Row] = []  # slots[i] is the row in slot i
        self._lengths: list[int] = []  # tokens in the KV store per slot (the next position)
        self._blocks: list[list[int]] = []  # KV blocks per slot
        self._plan: SamplingPlan | None = None  # of the rows in slots; None after a change
        # The slots' padded score alphas and mask, rebuilt with the plan; None: no row asks.
        self._scores: tuple[torch.Tensor, torch.Tensor] | None = None
        self.num_steps = 0  # decode steps run so far (admission order evidence for tests)
        # The server encodes on the event loop while the worker decodes; a Rust tokenizer
        # borrowed by two threads at once can raise "Already borrowed".
        self._tokenizer_lock = threading.Lock()

    # --- prompts ---------------------------------------------------------------------------

    def format(
        self, prompt: str, system_prompt: str | None = None, prompt_format: str | None = None
    ) -> str:
        return format_prompt(
            prompt,
            prompt_format or self.prompt_format,
            system_prompt=system_prompt,
            tokenizer=self.tokenizer,
        )

    def encode(self, formatted_prompt: str, prompt_format: str | None = None) -> list[int]:
        # A chat template already writes BOS; adding it again would shift the distribution.
        add_special = (prompt_format or self.prompt_format) != "chat"
        with self._tokenizer_lock:
            return self.tokenizer.encode(formatted_prompt, add_special_tokens=add_special)

    def decode(self, token_ids: Sequence[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    # --- capacity (the scheduler plans admissions with these) --------------------------------

    @property
    def max_slots(self) -> int:
        return self.runner.config.max_slots

    @property
    def num_free_slots(self) -> int:
        return self.max_slots - len(self.slots)

    @property
    def num_free_blocks(self) -> int:
        return self.runner.blocks.num_free

    @property
    def max_row_tokens(self) -> int:
        """Prompt + max_new_tokens of one row can never exceed this (context and KV store)."""
        return self.runner.max_row_tokens

    def capacity(self) -> Capacity:
        return Capacity(
            num_running=len(self.slots),
            num_free_slots=self.num_free_slots,
            num_free_blocks=self.num_free_blocks,
            block_size=self.runner.blocks.block_size,
            step=self.num_steps,
        )

    def blocks_needed(self, num_prompt_tokens: int, max_new_tokens: int) -> int:
        return self.capacity().blocks_needed(num_prompt_tokens, max_new_tokens)

    def info(self) -> dict[str, object]:
        return self.runner.info()

    # --- batch control -----------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self.slots)

    @property
    def running_rows(self) -> list[Row]:
        """The rows in the batch now; their `token_ids` grow by one per step (for streaming)."""
        return list(self.slots)

    @property
    def running_row_ids(self) -> list[int]:
        return [r.row_id for r in self.slots]

    def admit(self, rows: Sequence[EngineRow]) -> list[Row]:
        """Prefill newcomers together into free slots and sample their first token.

        Returns rows already finished by that first token (max_new_tokens 1, EOS, a stop
        string). A row that cannot be admitted raises `RowError` naming it, before anything
        changes; any other failure leaves the engine as it was.
        """
        if not rows:
            return []
        for row in rows:
            self._validate(row)
        if len(rows) > self.num_free_slots:
            raise ValueError(f"{len(rows)} rows asked, {self.num_free_slots} slots free")
        needed = [self.blocks_needed(len(r.prompt_ids), r.params.max_new_tokens) for r in rows]
        if sum(needed) > self.num_free_blocks:
            raise ValueError(f"{sum(needed)} KV blocks asked, {self.num_free_blocks} free")
        first = len(self.slots)
        slots = list(range(first, first + len(rows)))
        blocks = [self.runner.blocks.allocate(n) for n in needed]
        params = [r.params for r in rows]
        try:
            self.runner.write_slots(slots, [self._slot_params(r) for r in rows], blocks)
            plan = self._plan_for(params)
            tokens = self.runner.prefill(slots, [r.prompt_ids for r in rows], plan)
            logprobs = self._logprobs(self._score_table(params), slots, tokens, plan)
            host_tokens = self.runner.to_host(tokens)
        except BaseException:
            for row_blocks in blocks:
                self.runner.blocks.free(row_blocks)
            raise
        for row, row_blocks, token in zip(rows, blocks, host_tokens, strict=True):
            state = Row(row_id=row.row_id, params=row.params, seed=row.seed)
            self.slots.append(state)
            self._lengths.append(len(row.prompt_ids))
            self._blocks.append(row_blocks)
            self._append(state, token, logprobs, len(self.slots) - 1 - first)
        self._plan = None
        return self._retire()

    def step(self) -> list[Row]:
        """One decode step for every running row; returns the rows that finished on it.

        A row whose host-side checks fail finishes with reason "error" (and `Row.error`); the
        others are unaffected. A step that raises changed nothing and can be retried.
        """
        if not self.slots:
            return []
        if self._plan is None:
            params = [r.params for r in self.slots]
            self._plan, self._scores = self._plan_for(params), self._score_table(params)
        tokens = self.runner.decode(len(self.slots), max(self._lengths) + 1, self._plan)
        logprobs = self._logprobs(self._scores, slice(0, len(self.slots)), tokens, self._plan)
        host_tokens = self.runner.to_host(tokens)
        self.num_steps += 1
        for i, (row, token) in enumerate(zip(self.slots, host_tokens, strict=True)):
            self._lengths[i] += 1
            self._append(row, token, logprobs, i)
        return self._retire()

    def cancel(self, row_ids: Iterable[int]) -> list[Row]:
        """Drop rows now; nothing more is computed for them."""
        ids = set(row_ids)
        return self._remove([i for i, r in enumerate(self.slots) if r.row_id in ids])

    # --- internals --------------------------------------------------------------------------

    def _validate(self, row: EngineRow) -> None:
        p = row.params
        problems = []
        if not row.prompt_ids:
            problems.append("the prompt encodes to no tokens")
        if p.max_new_tokens < 1:
            problems.append(f"max_new_tokens {p.max_new_tokens} is below 1")
        if len(row.prompt_ids) + p.max_new_tokens > self.max_row_tokens:
            problems.append(
                f"prompt ({len(row.prompt_ids)} tokens) + max_new_tokens ({p.max_new_tokens}) "
                f"exceeds {self.max_row_tokens} tokens (context and KV store)"
            )
        if not 0 <= row.seed <= SEED_MAX:
            problems.append(f"seed {row.seed} outside [0, {SEED_MAX}]")
        if p.top_k < 0:
            problems.append(f"top_k {p.top_k} is negative")
        if not (math.isfinite(p.temperature) and p.temperature >= 0):
            problems.append(f"temperature {p.temperature} is not a finite value >= 0")
        if not 0 < p.top_p <= 1:
            problems.append(f"top_p {p.top_p} outside (0, 1]")
        if not math.isfinite(p.alpha):
            problems.append(f"alpha {p.alpha} is not finite")
        if problems:
            raise RowError([row.row_id], f"row {row.row_id}: " + "; ".join(problems))

    def _top_k(self, params: SamplingParams) -> int:
        """A top-k at or beyond the vocabulary keeps everything: it is the vocabulary."""
        return min(params.top_k, self.pair.vocab_limit)

    def _slot_params(self, row: EngineRow) -> SlotParams:
        p = row.params
        return SlotParams(p.alpha, p.temperature, p.top_p, self._top_k(p), row.seed)

    def _plan_for(self, params: Sequence[SamplingParams]) -> SamplingPlan:
        return SamplingPlan.for_rows(
            [p.temperature for p in params],
            [p.top_p for p in params],
            [self._top_k(p) for p in params],
            vocab=self.pair.vocab_limit,
            cap=self.runner.config.top_k_cap,
            sync_free=self.runner.sync_free,
        )

    def _score_table(
        self, params: Sequence[SamplingParams]
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The rows' padded score alphas and mask on the device; None when no row asks for
        log-probabilities. Built when rows join or leave, never per step."""
        if not any(p.wants_logprobs for p in params):
            return None
        return pad_score_alphas([p.score_alphas for p in params], self.runner.device)

    def _logprobs(
        self,
        scores: tuple[torch.Tensor, torch.Tensor] | None,
        index: Sequence[int] | slice,
        tokens: torch.Tensor,
        plan: SamplingPlan,
    ) -> torch.Tensor | None:
        """[B, 3 + A] log-probabilities of the tokens just sampled (after, before, sampled,
        then the score alphas), on the device; None when no row asks, which costs nothing.
        No host-to-device copy and no synchronisation in a step."""
        if scores is None:
            return None
        r = self.runner
        if not isinstance(index, slice):
            index = torch.tensor(list(index), dtype=torch.long, device=r.device)
        after, before = r.last_logits
        out = step_logprobs(
            after, before, r.alpha[index], r.temperature[index], r.top_p[index],
            r.top_k[index], tokens, *scores, plan,
        )  # fmt: skip
        return torch.cat(
            [out.after[:, None], out.before[:, None], out.sampled[:, None], out.scored], dim=1
        )

    def _append(
        self, row: Row, token: int, logprobs: torch.Tensor | None = None, i: int = 0
    ) -> None:
        if token == INVALID_TOKEN:
            row.finish_reason = "error"
            row.error = "the models' logits for this row were not finite (NaN or inf)"
            return
        if logprobs is not None and row.params.wants_logprobs:
            row.logprob_steps.append(logprobs[i, : 3 + len(row.params.score_alphas)])
        row.token_ids.append(token)
        try:
            self._check_finished(row, self.pair.eos_token_ids)
        except Exception as err:  # noqa: BLE001 - one row's failure must not reach the others
            log.exception("row %d failed its stop checks", row.row_id)
            row.finish_reason, row.error = "error", f"{type(err).__name__}: {err}"

    def _check_finished(self, row: Row, eos: frozenset[int]) -> None:
        """EOS, then stop strings, then length: the host-side stop checks after each token."""
        if row.token_ids[-1] in eos and not row.params.ignore_eos:
            row.finish_reason = "eos"
            return
        if row.params.stop:
            cut = find_stop(self.decode(row.token_ids), row.params.stop)
            if cut is not None:
                row.finish_reason, row.text_limit = "stop", cut
                return
        if len(row.token_ids) >= row.params.max_new_tokens:
            row.finish_reason = "length"

    def _retire(self) -> list[Row]:
        return self._remove([i for i, r in enumerate(self.slots) if r.is_finished])

    def _remove(self, indices: list[int]) -> list[Row]:
        """Free these slots; the last rows move into the gaps so the occupied slots stay 0..B-1."""
        if not indices:
            return []
        gone = set(indices)
        removed = [self.slots[i] for i in indices]
        for i in indices:
            self.runner.blocks.free(self._blocks[i])
        size = len(self.slots) - len(gone)
        holes = [i for i in indices if i < size]
        movers = [i for i in range(size, len(self.slots)) if i not in gone]
        self.runner.move_slots(movers, holes)
        for src, dst in zip(movers, holes, strict=True):
            self.slots[dst], self._lengths[dst], self._blocks[dst] = (
                self.slots[src],
                self._lengths[src],
                self._blocks[src],
            )
        self.runner.clear_slots(size, len(self.slots))
        del self.slots[size:], self._lengths[size:], self._blocks[size:]
        self._plan = None
        return removed

    # --- results ----------------------------------------------------------------------------

    def build_result(self, prompt: str, formatted_prompt: str, row: Row) -> GenerationResult:
        completion = self.decode(row.token_ids)[: row.text_limit]
        logprobs = None
        if row.params.wants_logprobs and row.logprob_steps:
            # The row's one device-to-host copy of its log-probabilities: [tokens, 3 + A].
            table = torch.stack(row.logprob_steps).double().tolist()
            logprobs = TokenLogprobs(
                after=tuple(t[0] for t in table),
                before=tuple(t[1] for t in table),
                sampled=tuple(t[2] for t in table),
                score_alphas=row.params.score_alphas,
                score_sums=tuple(
                    sum(t[3 + j] for t in table) for j in range(len(row.params.score_alphas))
                ),
            )
        return GenerationResult(
            prompt=prompt,
            formatted_prompt=formatted_prompt,
            completion=completion,
            text=formatted_prompt + completion,
            tokens_generated=len(row.token_ids),
            stopped_early=row.finish_reason in ("eos", "stop"),
            finish_reason=row.finish_reason or "length",
            seed=row.seed,
            alpha=row.params.alpha,
            token_ids=tuple(row.token_ids),
            logprobs=logprobs,
        )


def iter_generate(
    pair: ModelPair,
    requests: Sequence[GenerationRequest],
    *,
    max_batch_size: int = 64,
    prompt_format: str = "alpaca",
    runner_config: RunnerConfig | None = None,
    max_prefill_tokens: int = 8192,
) -> Iterator[tuple[int, GenerationResult]]:
    """Run requests with continuous batching; yield (row index, result) as rows finish.

    Row indices count the n samples of each request in order, so a caller can write results
    as they arrive and still restore input order. The server's scheduler core plans the
    admissions (slots, KV blocks, prefill cap, first in first admitted), and a prompt that
    could never fit raises `PromptTooLongError` (a ValueError) before anything runs.
    """
    config = runner_config or RunnerConfig(max_slots=max_batch_size)
    engine = LDAEngine(pair, prompt_format=prompt_format, runner_config=config)
    core = SchedulerCore(
        SchedulerConfig(
            max_batch_size=config.max_slots,
            max_wait_ms=0,
            max_queue_rows=max(1, sum(r.n for r in requests)),
            max_prefill_tokens=max_prefill_tokens,
        )
    )
    row_ids = itertools.count()
    meta: dict[int, tuple[str, str]] = {}
    for index, request in enumerate(requests):
        prompt = prepare_prompt(engine, request, index)
        rows, _ = engine_rows([request], [prompt], row_ids)
        core.add(index, rows, now=0.0)
        meta.update((row.row_id, (prompt.prompt, prompt.formatted_prompt)) for row in rows)
    while core.has_requests:
        plan = core.schedule(engine.capacity(), now=0.0)
        finished = engine.admit(plan.admit)
        finished += engine.step()
        for row in finished:
            if row.error:
                raise RuntimeError(f"row {row.row_id} failed: {row.error}")
        for done in core.update(finished):
            for row in done.rows:
                prompt, formatted = meta[row.row_id]
                yield row.row_id, engine.build_result(prompt, formatted, row)


def generate(
    pair: ModelPair,
    requests: Sequence[GenerationRequest],
    *,
    max_batch_size: int = 64,
    prompt_format: str = "alpaca",
    progress: bool = False,
    runner_config: RunnerConfig | None = None,
) -> list[GenerationResult]:
    """Run requests to completion; n results per request, in input order."""
    num_rows = sum(r.n for r in requests)
    results: dict[int, GenerationResult] = {}
    with tqdm(
        total=num_rows, desc="rows", unit="row", file=sys.stderr, disable=not progress
    ) as bar:
        for index, result in iter_generate(
            pair,
            requests,
            max_batch_size=max_batch_size,
            prompt_format=prompt_format,
            runner_config=runner_config,
        ):
            results[index] = result
            bar.update(1)
    return [results[i] for i in range(num_rows)]
