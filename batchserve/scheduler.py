"""Request queue, admission policy and the worker thread that owns the engine.

The event loop side (`submit`, `cancel`) only touches plain Python state under a lock; the
worker thread is the only caller of the engine. Between two decode steps the worker drops
cancelled rows, admits waiting rows (continuous mode), steps once and hands finished requests
back to their event loop with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from batchserve.engine import LDAEngine, RowError
from batchserve.metrics import Metrics
from batchserve.seeds import sample_seeds
from batchserve.types import EngineRow, GenerationRequest, GenerationResult, Row

log = logging.getLogger(__name__)

SchedulerMode = Literal["continuous", "static", "serial"]
SCHEDULER_MODES: tuple[str, ...] = ("continuous", "static", "serial")


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


class SchedulerClosedError(RuntimeError):
    """The server is shutting down (or the worker died) and takes no more work."""


class EngineFailedError(RuntimeError):
    """The engine raised while this request's rows were in the batch."""


@dataclass(frozen=True)
class SchedulerConfig:
    mode: SchedulerMode = "continuous"
    max_batch_size: int = 64
    max_wait_ms: float = 10.0
    max_queue_rows: int = 4096
    max_prefill_tokens: int = 8192

    def __post_init__(self) -> None:
        if self.mode not in SCHEDULER_MODES:
            raise ValueError(f"scheduler mode must be one of {SCHEDULER_MODES}, not {self.mode!r}")
        if self.max_batch_size < 1 or self.max_queue_rows < 1 or self.max_prefill_tokens < 1:
            raise ValueError("max_batch_size, max_queue_rows and max_prefill_tokens must be >= 1")


@dataclass(frozen=True)
class PreparedPrompt:
    prompt: str
    formatted_prompt: str
    prompt_ids: tuple[int, ...]


@dataclass(frozen=True)
class Completion:
    """A finished request: results in order, plus where it sat in the engine's step clock."""

    results: list[GenerationResult]
    queue_wait_s: float
    admitted_step: int  # engine step count when its first row was admitted
    finished_step: int


@dataclass
class _Request:
    request_id: int
    prompts: list[PreparedPrompt]
    pending: deque[EngineRow]
    row_prompt: dict[int, int]  # row id -> index into prompts
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued_at: float
    finished: dict[int, Row] = field(default_factory=dict)
    admitted_step: int | None = None
    admitted_at: float | None = None
    is_cancelled: bool = False

    @property
    def num_rows(self) -> int:
        return len(self.row_prompt)


class Scheduler:
    def __init__(
        self, engine: LDAEngine, config: SchedulerConfig, metrics: Metrics | None = None
    ) -> None:
        self.engine = engine
        self.config = config
        self.metrics = metrics or Metrics()
        self._cond = threading.Condition()
        self._waiting: deque[_Request] = deque()  # requests with rows not yet admitted
        self._active: dict[int, _Request] = {}  # every unfinished request by id
        self._row_owner: dict[int, _Request] = {}
        self._cancelled: set[int] = set()  # request ids to drop before the next step
        self._ids = itertools.count()
        self._row_ids = itertools.count()
        self._num_waiting_rows = 0
        self._is_closed = False
        self._is_draining = False
        self._thread: threading.Thread | None = None

    # --- event-loop side ------------------------------------------------------------------

    def prepare(self, request: GenerationRequest, index: int = 0) -> PreparedPrompt:
        """Format and tokenize on the caller's thread (no model involved); checks the context."""
        formatted = self.engine.format(request.prompt, request.system_prompt, request.prompt_format)
        ids = tuple(self.engine.encode(formatted, request.prompt_format))
        limit = self.engine.max_row_tokens
        if len(ids) + request.params.max_new_tokens > limit:
            raise PromptTooLongError(index, len(ids), request.params.max_new_tokens, limit)
        return PreparedPrompt(request.prompt, formatted, ids)

    def submit(
        self, requests: list[GenerationRequest], prepared: list[PreparedPrompt] | None = None
    ) -> tuple[int, asyncio.Future]:
        """Queue requests (their rows in order); the future resolves to a `Completion`."""
        loop = asyncio.get_running_loop()
        if prepared is None:
            prepared = [self.prepare(r, i) for i, r in enumerate(requests)]
        rows: list[EngineRow] = []
        row_prompt: dict[int, int] = {}
        for index, (request, prompt) in enumerate(zip(requests, prepared, strict=True)):
            for seed in sample_seeds(request.params.seed, request.n):
                row_id = next(self._row_ids)
                rows.append(EngineRow(row_id, prompt.prompt_ids, request.params, seed))
                row_prompt[row_id] = index
        with self._cond:
            if self._is_closed or self._is_draining:
                raise SchedulerClosedError("server is shutting down")
            limit = self.config.max_queue_rows
            if self._num_waiting_rows + len(rows) > limit:
                self.metrics.errors.labels(kind="queue_full").inc()
                raise QueueFullError(self._num_waiting_rows, len(rows), limit)
            state = _Request(
                request_id=next(self._ids),
                prompts=prepared,
                pending=deque(rows),
                row_prompt=row_prompt,
                future=loop.create_future(),
                loop=loop,
                enqueued_at=time.monotonic(),
            )
            self._waiting.append(state)
            self._active[state.request_id] = state
            for row in rows:
                self._row_owner[row.row_id] = state
            self._num_waiting_rows += len(rows)
            self.metrics.queue_rows.set(self._num_waiting_rows)
            self._cond.notify()
        return state.request_id, state.future

    def cancel(self, request_id: int) -> None:
        """Mark a request cancelled; the worker drops its rows before the next step."""
        with self._cond:
            state = self._active.get(request_id)
            if state is not None and not state.is_cancelled:
                state.is_cancelled = True
                self._cancelled.add(request_id)
                self._cond.notify()

    @property
    def num_waiting_rows(self) -> int:
        return self._num_waiting_rows

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="batchserve-worker", daemon=True)
        self._thread.start()

    def drain(self) -> None:
        """Stop taking new requests; the ones in flight go on."""
        with self._cond:
            self._is_draining = True

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Finish in-flight work within timeout_s, then fail what is left and stop the worker.

        Blocks: call it from a thread (`asyncio.to_thread`) so the loop can still resolve futures.
        """
        self.drain()
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._active and time.monotonic() < deadline:
                self._cond.wait(timeout=min(0.05, max(0.0, deadline - time.monotonic())))
            self._is_closed = True
            leftovers = list(self._active.values())
            for state in leftovers:
                state.is_cancelled = True
                self._cancelled.add(state.request_id)
            self._cond.notify_all()
        for state in leftovers:
            self._fail(state, SchedulerClosedError("server shut down before the request finished"))
        if self._thread is not None:
            self._thread.join(timeout=10)

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # --- worker side -----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                self._drop_cancelled()
                if self._is_closed:
                    return
                batch = self._next_admission()
                if batch is None:
                    continue
            try:
                finished = self._admit(batch) if batch else []
                if self.engine.num_running:
                    self.metrics.batch_size.observe(self.engine.num_running)
                    finished += self._step()
                    self.metrics.steps.inc()
            except Exception as err:  # noqa: BLE001 - one bad batch must not kill the server
                log.exception("engine failed twice in a row; failing the requests in the batch")
                self._fail_running(err)
                continue
            self._collect(finished)

    def _admit(self, rows: list[EngineRow]) -> list[Row]:
        """Admit rows; a row that fails alone fails its own request, never its neighbours'.

        The engine changes nothing when admission raises, so on an unattributed failure each
        row is retried alone to find the culprit.
        """
        if not rows:
            return []
        try:
            finished = self.engine.admit(rows)
        except RowError as err:
            log.warning("refusing rows %s: %s", err.row_ids, err)
            self._fail_rows(err.row_ids, err)
            return self._admit(self._still_owned(rows))
        except Exception as err:  # noqa: BLE001 - isolate the row that caused it
            if len(rows) == 1:
                log.exception("admitting row %d failed", rows[0].row_id)
                self._fail_rows([rows[0].row_id], err)
                return []
            log.warning("admitting %d rows failed (%s); admitting them one by one", len(rows), err)
            # A failed row fails its whole request, so its siblings are skipped.
            return [row for r in rows for row in self._admit(self._still_owned([r]))]
        self.metrics.rows_admitted.inc(len(rows))
        return finished

    def _still_owned(self, rows: list[EngineRow]) -> list[EngineRow]:
        """Rows whose request has not failed or been cancelled meanwhile."""
        with self._cond:
            return [r for r in rows if r.row_id in self._row_owner]

    def _step(self) -> list[Row]:
        """One decode step, retried once: a failed step changed nothing in the engine."""
        try:
            return self.engine.step()
        except Exception as err:  # noqa: BLE001
            log.warning("decode step failed (%s: %s); retrying it once", type(err).__name__, err)
            return self.engine.step()

    def _next_admission(self) -> list[EngineRow] | None:
        """Rows to admit now (maybe none, with rows running); None after waiting for work."""
        running = self.engine.num_running
        mode = self.config.mode
        if running and mode != "continuous":
            return []  # static and serial never join a running batch
        if not self._waiting:
            if running:
                return []
            self._cond.wait(timeout=0.1)
            return None
        if running:
            # Each admission costs a prefill and a merge of the whole cache; a lone newcomer
            # waits up to max_wait_ms for company unless enough rows are waiting already.
            # (Profile at 64 clients: admitting 1-2 rows every step took 11-24% of the worker.)
            oldest_wait_s = time.monotonic() - self._waiting[0].enqueued_at
            if (
                self._num_waiting_rows < max(1, running // 8)
                and oldest_wait_s < self.config.max_wait_ms / 1000
            ):
                return []
        if not running and mode != "serial":
            # Idle: give a first group max_wait_ms to gather, unless the batch is already full.
            first = self._waiting[0].enqueued_at
            remaining = first + self.config.max_wait_ms / 1000 - time.monotonic()
            if remaining > 0 and self._num_waiting_rows < self.config.max_batch_size:
                self._cond.wait(timeout=remaining)
                return None
        return self._take_rows(self.config.max_batch_size - running)

    def _take_rows(self, room: int) -> list[EngineRow]:
        """FIFO rows up to `room`, and (continuous mode) up to max_prefill_tokens of prompts."""
        taken: list[EngineRow] = []
        prompts_seen: set[tuple[int, ...]] = set()
        prefill_tokens = 0
        step = self.engine.num_steps
        now = time.monotonic()
        limit_prefill = self.config.mode == "continuous"
        room = min(room, self.engine.num_free_slots)
        free_blocks = self.engine.num_free_blocks
        while self._waiting and len(taken) < room:
            state = self._waiting[0]
            row = state.pending[0]
            # KV blocks are reserved for a row's whole length at admission; a row that does not
            # fit now waits, and so does everything behind it (first in, first admitted).
            blocks = self.engine.blocks_needed(len(row.prompt_ids), row.params.max_new_tokens)
            if blocks > free_blocks:
                break
            if row.prompt_ids not in prompts_seen:
                cost = len(row.prompt_ids)
                if (
                    limit_prefill
                    and taken
                    and prefill_tokens + cost > self.config.max_prefill_tokens
                ):
                    break
                prompts_seen.add(row.prompt_ids)
                prefill_tokens += cost
            free_blocks -= blocks
            taken.append(state.pending.popleft())
            if state.admitted_step is None:
                state.admitted_step, state.admitted_at = step, now
                self.metrics.queue_wait.observe(now - state.enqueued_at)
            if not state.pending:
                self._waiting.popleft()
                if self.config.mode == "serial":
                    break  # one request at a time, like the original global lock
        self._num_waiting_rows -= len(taken)
        self.metrics.queue_rows.set(self._num_waiting_rows)
        return taken

    def _drop_cancelled(self) -> None:
        if not self._cancelled:
            return
        cancelled = [self._active[i] for i in self._cancelled if i in self._active]
        self._cancelled.clear()
        running = set(self.engine.running_row_ids)
        for state in cancelled:
            num_pending = len(state.pending)
            if num_pending:
                self._num_waiting_rows -= num_pending
                state.pending.clear()
                self._waiting.remove(state)
            in_batch = [rid for rid in state.row_prompt if rid in running]
            self.engine.cancel(in_batch)
            self.metrics.rows_cancelled.inc(num_pending + len(in_batch))
            self._forget(state)
            if not state.future.done():
                state.loop.call_soon_threadsafe(_cancel_future, state.future)
        self.metrics.queue_rows.set(self._num_waiting_rows)
        self.metrics.running_rows.set(self.engine.num_running)

    def _forget(self, state: _Request) -> None:
        self._active.pop(state.request_id, None)
        for row_id in state.row_prompt:
            self._row_owner.pop(row_id, None)
        self._cond.notify_all()

    def _collect(self, finished: list[Row]) -> None:
        failed = [row for row in finished if row.error]
        if failed:
            for row in failed:
                self._fail_rows([row.row_id], RuntimeError(row.error))
            finished = [row for row in finished if not row.error]
        done: list[_Request] = []
        with self._cond:
            for row in finished:
                self.metrics.rows_finished.labels(reason=row.finish_reason or "length").inc()
                self.metrics.tokens_generated.inc(len(row.token_ids))
                state = self._row_owner.get(row.row_id)
                if state is None:
                    continue
                state.finished[row.row_id] = row
                if len(state.finished) == state.num_rows:
                    done.append(state)
                    self._forget(state)
            self.metrics.running_rows.set(self.engine.num_running)
        for state in done:
            self._resolve(state)

    def _resolve(self, state: _Request) -> None:
        results = []
        for row_id, index in state.row_prompt.items():
            prompt = state.prompts[index]
            results.append(
                self.engine.build_result(
                    prompt.prompt, prompt.formatted_prompt, state.finished[row_id]
                )
            )
        completion = Completion(
            results=results,
            queue_wait_s=(state.admitted_at or state.enqueued_at) - state.enqueued_at,
            admitted_step=state.admitted_step or 0,
            finished_step=self.engine.num_steps,
        )
        state.loop.call_soon_threadsafe(_set_result, state.future, completion)

    def _fail(self, state: _Request, err: Exception) -> None:
        if not state.loop.is_closed():
            state.loop.call_soon_threadsafe(_set_exception, state.future, err)

    def _fail_rows(self, row_ids: list[int], err: Exception) -> None:
        """Fail the requests that own these rows; their other rows leave the batch or queue."""
        with self._cond:
            owners = {
                self._row_owner[rid].request_id: self._row_owner[rid]
                for rid in row_ids
                if rid in self._row_owner
            }
            for state in owners.values():
                if state.pending:
                    self._num_waiting_rows -= len(state.pending)
                    state.pending.clear()
                    if state in self._waiting:
                        self._waiting.remove(state)
                self.engine.cancel(state.row_prompt)
                self._forget(state)
            self.metrics.errors.labels(kind="row").inc(len(owners))
            self.metrics.queue_rows.set(self._num_waiting_rows)
            self.metrics.running_rows.set(self.engine.num_running)
        for state in owners.values():
            self._fail(state, EngineFailedError(f"generation failed for this request: {err}"))

    def _fail_running(self, err: Exception) -> None:
        with self._cond:
            running = set(self.engine.running_row_ids)
            owners = {
                self._row_owner[rid].request_id: self._row_owner[rid]
                for rid in running
                if rid in self._row_owner
            }
            self.engine.cancel(running)
            for state in owners.values():
                if state.pending:
                    self._num_waiting_rows -= len(state.pending)
                    state.pending.clear()
                    if state in self._waiting:
                        self._waiting.remove(state)
                self._forget(state)
            self.metrics.errors.labels(kind="engine").inc()
            self.metrics.running_rows.set(0)
        for state in owners.values():
            self._fail(state, EngineFailedError(f"generation failed: {err}"))


def _set_result(future: asyncio.Future, value: object) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, err: Exception) -> None:
    if not future.done():
        future.set_exception(err)


def _cancel_future(future: asyncio.Future) -> None:
    if not future.done():
        future.cancel()
