"""TEMPORARY (issue 24): today's scheduler engine surface over any `Runner` (core/types.py).

Main's scheduler (`batchserve.scheduler.Scheduler`) drives an engine through `capacity` /
`admit` / `step` / `cancel`; the runner interface of this round is `execute(StepPlan)`. Until
the step engine that plans `StepPlan`s itself lands, this bridge lets `serve --simulate` run a
`SimulatedRunner` under the real scheduler, HTTP, streaming and Ray Serve. It follows the new
engine's shape, not the old one's: `admit` only places rows, and their whole prompts ride in the
next `step` together with the running rows' decode tokens (one `execute` per step).

Delete this module once `create_app` builds the new engine with a runner argument: that engine
then takes `SimulatedRunner.for_pair(pair, config.simulate)` directly.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from batchserve.core.seeds import SEED_MAX
from batchserve.core.types import (
    INVALID_TOKEN,
    Capacity,
    EngineRow,
    GenerationResult,
    Row,
    RowError,
    Runner,
    ScheduledRow,
    StepPlan,
    TokenLogprobs,
    find_stop,
    kv_blocks,
)
from batchserve.frontend import format_prompt

if TYPE_CHECKING:
    from batchserve.worker.models import ModelPair


class _Slot:
    """A running row and what the bridge keeps for it: prompt, blocks, prefilled or not."""

    __slots__ = ("block_ids", "is_prefilled", "prompt_ids", "row")

    def __init__(self, row: Row, prompt_ids: tuple[int, ...], block_ids: tuple[int, ...]) -> None:
        self.row, self.prompt_ids, self.block_ids = row, prompt_ids, block_ids
        self.is_prefilled = False

    def scheduled(self) -> ScheduledRow:
        row = self.row
        if self.is_prefilled:
            start = len(self.prompt_ids) + len(row.token_ids) - 1
            tokens: tuple[int, ...] = (row.token_ids[-1],)
        else:
            start, tokens = 0, self.prompt_ids
        return ScheduledRow(
            row.row_id,
            tokens,
            start,
            self.block_ids,
            row.params,
            row.seed,
            samples=True,
            step=len(row.token_ids),
        )


class RunnerBridge:
    """Rows, blocks, finish rules and results over a `Runner`; one thread only (the worker)."""

    def __init__(
        self, pair: ModelPair, runner: Runner, *, max_slots: int, prompt_format: str = "alpaca"
    ) -> None:
        self.pair = pair
        self.tokenizer = pair.tokenizer
        self.runner = runner
        self.max_slots = max_slots
        self.prompt_format = prompt_format
        self._slots: dict[int, _Slot] = {}  # row id -> slot, in admission order
        self._free_blocks = list(range(runner.num_kv_blocks - 1, 0, -1))  # block 0 is reserved
        self.num_steps = 0
        self._tokenizer_lock = threading.Lock()  # the event loop encodes while the worker decodes

    # --- prompts (as LDAEngine) ---------------------------------------------------------------

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
        add_special = (prompt_format or self.prompt_format) != "chat"
        with self._tokenizer_lock:
            return self.tokenizer.encode(formatted_prompt, add_special_tokens=add_special)

    def decode(self, token_ids: Sequence[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    # --- capacity and batch control (the scheduler's engine surface) --------------------------

    @property
    def max_row_tokens(self) -> int:
        return self.runner.max_row_tokens

    def capacity(self) -> Capacity:
        return Capacity(
            num_running=len(self._slots),
            num_free_slots=self.max_slots - len(self._slots),
            num_free_blocks=len(self._free_blocks),
            block_size=self.runner.block_size,
            step=self.num_steps,
        )

    def info(self) -> dict[str, object]:
        return {"engine": "runner_bridge", "max_slots": self.max_slots, **self.runner.info()}

    @property
    def num_running(self) -> int:
        return len(self._slots)

    @property
    def running_rows(self) -> list[Row]:
        return [slot.row for slot in self._slots.values()]

    @property
    def running_row_ids(self) -> list[int]:
        return list(self._slots)

    def admit(self, rows: Sequence[EngineRow]) -> list[Row]:
        """Place rows; their prompts run in the next step. Nothing changes when this raises."""
        for row in rows:
            self._validate(row)
        if len(rows) > self.max_slots - len(self._slots):
            raise ValueError(f"{len(rows)} rows asked, {self.max_slots - len(self._slots)} free")
        size = self.runner.block_size
        needed = [kv_blocks(len(r.prompt_ids) + r.params.max_new_tokens, size) for r in rows]
        if sum(needed) > len(self._free_blocks):
            raise ValueError(f"{sum(needed)} KV blocks asked, {len(self._free_blocks)} free")
        for row, count in zip(rows, needed, strict=True):
            blocks = tuple(self._free_blocks.pop() for _ in range(count))
            state = Row(row_id=row.row_id, params=row.params, seed=row.seed)
            self._slots[row.row_id] = _Slot(state, row.prompt_ids, blocks)
        return []

    def step(self) -> list[Row]:
        """One `execute` over every running row: prompts of new rows, one token of the others.
        A step that raises changed nothing and can be retried."""
        if not self._slots:
            return []
        slots = list(self._slots.values())
        out = self.runner.execute(StepPlan(tuple(slot.scheduled() for slot in slots)))
        self.num_steps += 1
        logprobs = out.logprobs or (None,) * len(out.row_ids)
        for row_id, token, values in zip(out.row_ids, out.token_ids, logprobs, strict=True):
            slot = self._slots[row_id]
            slot.is_prefilled = True
            self._append(slot.row, token, values)
        return self._remove([s.row.row_id for s in slots if s.row.is_finished])

    def cancel(self, row_ids: Iterable[int]) -> list[Row]:
        return self._remove([r for r in row_ids if r in self._slots])

    # --- internals -----------------------------------------------------------------------------

    def _validate(self, row: EngineRow) -> None:
        problems = []
        if not row.prompt_ids:
            problems.append("the prompt encodes to no tokens")
        if row.params.max_new_tokens < 1:
            problems.append(f"max_new_tokens {row.params.max_new_tokens} is below 1")
        if len(row.prompt_ids) + row.params.max_new_tokens > self.max_row_tokens:
            problems.append(f"prompt + max_new_tokens exceed {self.max_row_tokens} tokens")
        if not 0 <= row.seed <= SEED_MAX:
            problems.append(f"seed {row.seed} outside [0, {SEED_MAX}]")
        if problems:
            raise RowError([row.row_id], f"row {row.row_id}: " + "; ".join(problems))

    def _append(self, row: Row, token: int, logprobs: tuple[float, ...] | None) -> None:
        if token == INVALID_TOKEN:
            row.finish_reason, row.error = "error", "the runner drew no valid token for this row"
            return
        row.token_ids.append(token)
        if logprobs is not None:
            row.logprob_steps.append(logprobs)
        if token in self.pair.eos_token_ids and not row.params.ignore_eos:
            row.finish_reason = "eos"
        elif row.params.stop and (
            (cut := find_stop(self.decode(row.token_ids), row.params.stop)) is not None
        ):
            row.finish_reason, row.text_limit = "stop", cut
        elif len(row.token_ids) >= row.params.max_new_tokens:
            row.finish_reason = "length"

    def _remove(self, row_ids: list[int]) -> list[Row]:
        removed = []
        for row_id in row_ids:
            slot = self._slots.pop(row_id)
            self._free_blocks.extend(slot.block_ids)
            removed.append(slot.row)
        return removed

    def build_result(self, prompt: str, formatted_prompt: str, row: Row) -> GenerationResult:
        logprobs = None
        if row.params.wants_logprobs and row.logprob_steps:
            table = row.logprob_steps
            alphas = row.params.score_alphas
            logprobs = TokenLogprobs(
                after=tuple(t[0] for t in table),
                before=tuple(t[1] for t in table),
                sampled=tuple(t[2] for t in table),
                score_alphas=alphas,
                score_sums=tuple(sum(t[3 + j] for t in table) for j in range(len(alphas))),
            )
        completion = self.decode(row.token_ids)[: row.text_limit]
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
