"""The scheduler owns a request's life: queues, KV blocks, the per-step token budget, finish rules.

Plain data in and out, as vLLM's scheduler: `add_request` queues a request's rows,
`schedule(now)` returns the plan of one step (which rows decode, which prompts or prompt chunks
prefill, and each row's block table), and `update(plan, output)` takes the runner's tokens back,
applies the finish rules (EOS, length, a broken row) and says what changed. No tensors, no
threads, no clock of its own: tests drive it with hand-made outputs, and the engine loop
(batchserve/engine.py) runs it for the server and for offline generation alike.

Every step is one forward per model: the running rows' decode tokens and the newcomers' prompt
tokens are packed together, up to `max_num_batched_tokens`. A prompt longer than what is left
of the budget is prefilled in chunks over several steps, so a newcomer never waits for the batch
in flight to drain, and the running rows never stall for more than one budget.

A row reserves blocks for its whole length (prompt + max_new_tokens) when it is admitted, so it
can never run out of KV mid-generation and nothing is ever preempted; rows that do not fit wait
in order (first in, first admitted). With the prefix cache, a prompt's blocks already in the
store are shared, not reserved again (core/kv_blocks.py).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from batchserve.core.kv_blocks import Allocation, BlockManager, cache_extra_key
from batchserve.core.seeds import SEED_MAX
from batchserve.core.types import (
    INVALID_TOKEN,
    EngineRow,
    SamplingParams,
    ScheduledRow,
    StepOutput,
    StepPlan,
)

SchedulerMode = Literal["continuous", "static", "serial"]
SCHEDULER_MODES: tuple[str, ...] = ("continuous", "static", "serial")
IDLE_POLL_S = 0.1  # how long an idle engine sleeps before looking again (new work wakes it)


class QueueFullError(RuntimeError):
    """More rows are waiting than `max_queue_rows` allows; the client should retry later."""

    def __init__(self, queued: int, asked: int, limit: int) -> None:
        super().__init__(f"queue full: {queued} rows waiting, {asked} more asked, limit {limit}")
        self.retry_after_s = 1


class PromptTooLongError(ValueError):
    def __init__(self, index: int, num_tokens: int, max_new_tokens: int, limit: int) -> None:
        super().__init__(
            f"prompt {index} has {num_tokens} tokens; with max_new_tokens={max_new_tokens} that is "
            f"{num_tokens + max_new_tokens}, beyond the {limit} tokens a row can hold "
            "(the models' context and the KV store)"
        )
        self.index = index


@dataclass(frozen=True)
class SchedulerConfig:
    mode: SchedulerMode = "continuous"
    max_batch_size: int = 64  # running rows at most
    # Tokens in one step's forward (prompt chunks + one per decoding row): the longest a running
    # row can stall for a newcomer's prefill.
    max_num_batched_tokens: int = 2048
    max_wait_ms: float = 10.0  # static mode: how long an idle server gathers a first group
    max_queue_rows: int = 4096
    enable_prefix_cache: bool = True

    def __post_init__(self) -> None:
        if self.mode not in SCHEDULER_MODES:
            raise ValueError(f"scheduler mode must be one of {SCHEDULER_MODES}, not {self.mode!r}")
        if self.max_batch_size < 1 or self.max_queue_rows < 1:
            raise ValueError("max_batch_size and max_queue_rows must be >= 1")
        if self.max_num_batched_tokens < self.max_batch_size:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                f"max_batch_size ({self.max_batch_size}): every running row decodes each step"
            )


@dataclass
class RowState:
    """One row as the scheduler tracks it; `output_ids` are exactly its generated tokens."""

    row_id: int
    request_id: int
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    seed: int
    keys: list[bytes]
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose KV is in the store
    allocation: Allocation | None = None
    finish_reason: str | None = None

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed < len(self.prompt_ids)


@dataclass
class RequestState:
    request_id: int
    rows: list[RowState]
    enqueued_at: float
    num_open: int  # rows neither finished nor aborted
    admitted_step: int | None = None


@dataclass(frozen=True)
class RowUpdate:
    """What one step did to one row: the token it drew (if any), and whether it is done."""

    row_id: int
    request_id: int
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[float, ...] | None = None
    finish_reason: str | None = None  # "eos" | "length" | "error"
    error: str | None = None


@dataclass(frozen=True)
class Admission:
    """A request's first row entered the running batch (timing-free scheduling evidence)."""

    request_id: int
    step: int
    queue_wait_s: float


@dataclass(frozen=True)
class Schedule:
    """One step's plan, or (plan empty) how long to wait before planning again."""

    plan: StepPlan
    wait_s: float | None = None
    admissions: tuple[Admission, ...] = ()  # requests whose first row was admitted now
    num_admitted: int = 0  # rows admitted now


class Scheduler:
    """Waiting and running rows, their KV blocks, and the step plan. One thread only."""

    def __init__(
        self,
        config: SchedulerConfig,
        *,
        num_kv_blocks: int,
        block_size: int,
        max_row_tokens: int,
        eos_token_ids: Iterable[int] = (),
        model_ids: Sequence[str] = (),
    ) -> None:
        self.config = config
        self.blocks = BlockManager(num_kv_blocks, block_size, config.enable_prefix_cache)
        self.model_ids = tuple(model_ids)  # the pair: part of every prefix-cache key
        self.max_row_tokens = max_row_tokens
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[RowState] = deque()
        self.running: list[RowState] = []
        self.requests: dict[int, RequestState] = {}
        self.num_steps = 0  # steps planned and updated so far

    # --- requests ---------------------------------------------------------------------------

    @property
    def num_waiting_rows(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def check_row(self, row: EngineRow, index: int = 0) -> None:
        """Refuse a row that could never run, before anything is queued."""
        p = row.params
        if len(row.prompt_ids) + p.max_new_tokens > self.max_row_tokens:
            raise PromptTooLongError(
                index, len(row.prompt_ids), p.max_new_tokens, self.max_row_tokens
            )
        problems = []
        if not row.prompt_ids:
            problems.append("the prompt encodes to no tokens")
        if p.max_new_tokens < 1:
            problems.append(f"max_new_tokens {p.max_new_tokens} is below 1")
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
            raise ValueError(f"row {row.row_id}: " + "; ".join(problems))

    def add_request(self, request_id: int, rows: Sequence[EngineRow], now: float) -> None:
        """Queue a request's rows in order; raises before queueing anything it refuses."""
        if request_id in self.requests:
            raise ValueError(f"request {request_id} is queued already")
        for index, row in enumerate(rows):
            self.check_row(row, index)
        limit = self.config.max_queue_rows
        if len(self.waiting) + len(rows) > limit:
            raise QueueFullError(len(self.waiting), len(rows), limit)
        # The n samples of a prompt: hashed once, and one list of keys.
        keys: dict[tuple[tuple[int, ...], bytes], list[bytes]] = {}
        states = []
        for row in rows:
            adapters = (row.params.after, row.params.before)
            extra_key = cache_extra_key(self.model_ids, row.cache_salt, adapters)
            prompt = (row.prompt_ids, extra_key)
            if prompt not in keys:
                keys[prompt] = self.blocks.prompt_keys(row.prompt_ids, extra_key)
            states.append(
                RowState(
                    row.row_id,
                    request_id,
                    row.prompt_ids,
                    row.params,
                    row.seed,
                    keys[prompt],
                )  # fmt: skip
            )
        self.requests[request_id] = RequestState(request_id, states, now, len(states))
        self.waiting.extend(states)

    def abort_request(self, request_id: int) -> int:
        """Drop a request's rows, waiting or running; returns how many were still open."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return 0
        open_rows = [r for r in request.rows if r.finish_reason is None]
        self._drop(open_rows)
        return len(open_rows)

    def finish_rows(self, row_ids: Iterable[int], reason: str) -> None:
        """End rows now (the frontend saw a stop string): their blocks are freed at once."""
        ids = set(row_ids)
        rows = [r for r in (*self.running, *self.waiting) if r.row_id in ids]
        for row in rows:
            row.finish_reason = reason
        self._drop(rows)
        for row in rows:
            self._close(row)

    def _drop(self, rows: list[RowState]) -> None:
        ids = {r.row_id for r in rows}
        if not ids:
            return
        self.waiting = deque(r for r in self.waiting if r.row_id not in ids)
        self.running = [r for r in self.running if r.row_id not in ids]
        for row in rows:
            if row.allocation is not None:
                self.blocks.free(row.allocation)
                row.allocation = None

    def _close(self, row: RowState) -> None:
        request = self.requests.get(row.request_id)
        if request is None:
            return
        request.num_open -= 1
        if request.num_open == 0:
            del self.requests[row.request_id]

    # --- one step ---------------------------------------------------------------------------

    def schedule(self, now: float) -> Schedule:
        """Plan one step: every running row, then newcomers while the budget, the batch size and
        the free blocks allow. An empty plan comes with how long to wait."""
        budget = self.config.max_num_batched_tokens
        rows: list[ScheduledRow] = []
        # Decoding rows first (one token each, and the budget holds max_batch_size of them),
        # then prompts part-way through their prefill, oldest first.
        for row in sorted(self.running, key=lambda r: r.is_prefilling):
            if budget <= 0:
                break
            scheduled = self._schedule_row(row, budget)
            rows.append(scheduled)
            budget -= len(scheduled.token_ids)
        admissions: list[Admission] = []
        num_admitted = 0
        if self._may_admit(now):
            while self.waiting and budget > 0 and len(self.running) < self.config.max_batch_size:
                row = self.waiting[0]
                if not self._admit(row):
                    break  # first in, first admitted: everything behind it waits too
                self.waiting.popleft()
                self.running.append(row)
                num_admitted += 1
                request = self.requests[row.request_id]
                if request.admitted_step is None:
                    request.admitted_step = self.num_steps
                    wait_s = max(0.0, now - request.enqueued_at)
                    admissions.append(Admission(row.request_id, self.num_steps, wait_s))
                scheduled = self._schedule_row(row, budget)
                rows.append(scheduled)
                budget -= len(scheduled.token_ids)
                if self.config.mode == "serial" and not self._has_waiting_rows(row.request_id):
                    break  # one request at a time, like the original global lock
        if rows:
            return Schedule(StepPlan(tuple(rows)), None, tuple(admissions), num_admitted)
        if self.waiting and not self.running and self.config.mode == "static":
            return Schedule(StepPlan(()), self._static_wait_s(now))
        return Schedule(StepPlan(()), IDLE_POLL_S)

    def _may_admit(self, now: float) -> bool:
        mode = self.config.mode
        if mode == "continuous":
            return True
        if self.running:
            return False  # static and serial never join a running batch
        return mode == "serial" or self._static_wait_s(now) is None

    def _static_wait_s(self, now: float) -> float | None:
        """Static mode gives an idle server's first group max_wait_ms to gather, unless the
        batch is full already. None: admit now."""
        if not self.waiting or len(self.waiting) >= self.config.max_batch_size:
            return None
        oldest = self.requests[self.waiting[0].request_id].enqueued_at
        remaining = oldest + self.config.max_wait_ms / 1000 - now
        return remaining if remaining > 0 else None

    def _has_waiting_rows(self, request_id: int) -> bool:
        return bool(self.waiting) and self.waiting[0].request_id == request_id

    def _admit(self, row: RowState) -> bool:
        total = len(row.prompt_ids) + row.params.max_new_tokens
        allocation = self.blocks.allocate(row.keys, len(row.prompt_ids), total)
        if allocation is None:
            return False
        row.allocation = allocation
        row.num_computed = allocation.num_cached_blocks * self.blocks.block_size
        return True

    def _schedule_row(self, row: RowState, budget: int) -> ScheduledRow:
        assert row.allocation is not None
        if row.is_prefilling:
            end = min(len(row.prompt_ids), row.num_computed + budget)
            token_ids = row.prompt_ids[row.num_computed : end]
            # Blocks this chunk fills are findable at once: rows later in this same step may
            # read them, since each layer writes every new key before any query reads.
            self.blocks.register_computed(row.allocation, end)
        else:
            token_ids = (row.output_ids[-1],)
        return ScheduledRow(
            row_id=row.row_id,
            token_ids=tuple(token_ids),
            start=row.num_computed,
            block_ids=tuple(row.allocation.block_ids),
            params=row.params,
            seed=row.seed,
            samples=row.num_computed + len(token_ids) >= len(row.prompt_ids),
            step=len(row.output_ids),
        )

    def update(self, plan: StepPlan, output: StepOutput) -> list[RowUpdate]:
        """Take the runner's tokens for a plan: advance every scheduled row, apply the finish
        rules, free what finished. Rows dropped since the plan was made are skipped."""
        self.num_steps += 1
        sampled = dict(zip(output.row_ids, output.token_ids, strict=True))
        logprobs = dict(zip(output.row_ids, output.logprobs, strict=False))
        live = {r.row_id: r for r in self.running}
        updates: list[RowUpdate] = []
        finished: list[RowState] = []
        for scheduled in plan.rows:
            row = live.get(scheduled.row_id)
            if row is None:
                continue
            row.num_computed = scheduled.start + len(scheduled.token_ids)
            if not scheduled.samples:
                continue
            token = sampled[row.row_id]
            if token == INVALID_TOKEN:
                row.finish_reason = "error"
                finished.append(row)
                error = "the models' logits for this row were not finite (NaN or inf)"
                updates.append(RowUpdate(row.row_id, row.request_id, (), None, "error", error))
                continue
            row.output_ids.append(token)
            reason = self._finish_reason(row, token)
            if reason is not None:
                row.finish_reason = reason
                finished.append(row)
            updates.append(
                RowUpdate(row.row_id, row.request_id, (token,), logprobs.get(row.row_id), reason)
            )
        self._drop(finished)
        for row in finished:
            self._close(row)
        return updates

    def _finish_reason(self, row: RowState, token: int) -> str | None:
        if token in self.eos_token_ids and not row.params.ignore_eos:
            return "eos"
        if len(row.output_ids) >= row.params.max_new_tokens:
            return "length"
        return None

    def step_failed(self) -> None:
        """A planned step did not run (the engine fails its rows): blocks registered for it hold
        nothing, so no later prompt may hit them. The cache forgets every key, and the rows
        still running register their computed blocks again as they go."""
        self.blocks.reset_prefix_cache()
        for row in self.running:
            if row.allocation is not None:
                row.allocation.num_registered = 0
