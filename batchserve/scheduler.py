"""Admission policy as a synchronous core, and the worker thread that runs it for the server.

`SchedulerCore` plans with request and row ids and counters, as vLLM's scheduler does: `add`
queues a request's rows, `schedule(capacity, now)` says which rows to admit now (or how long to
wait for company), `update(finished)` takes the engine's finished rows and returns the requests
that completed. No thread, no asyncio, no clock of its own: tests drive it by hand, and the
offline `iter_generate` runs the same core as the server, with the same checks and caps.

`Scheduler` is the thin shell around it: the event loop side (`submit`, `cancel`) touches plain
state under a lock; the worker thread is the only caller of the engine. Between two decode
steps it drops cancelled requests, admits what the core planned, steps once, and hands
finished requests back to their event loop with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

from batchserve.core.seeds import sample_seeds
from batchserve.core.types import (
    Capacity,
    EngineRow,
    GenerationRequest,
    GenerationResult,
    Row,
    RowError,
)
from batchserve.metrics import Metrics

if TYPE_CHECKING:
    from batchserve.engine import LDAEngine

log = logging.getLogger(__name__)

SchedulerMode = Literal["continuous", "static", "serial"]
# Called on the request's event loop with (row index, new token ids) for each of its rows
# that grew since the last call; row indices follow the order of `Completion.results`.
TokenListener = Callable[[list[tuple[int, tuple[int, ...]]]], None]
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


IDLE_POLL_S = 0.1  # how long an idle worker sleeps before looking again (new work wakes it)


class PromptEncoder(Protocol):
    """What `prepare_prompt` needs of an engine."""

    max_row_tokens: int

    def format(
        self, prompt: str, system_prompt: str | None = None, prompt_format: str | None = None
    ) -> str: ...

    def encode(self, formatted_prompt: str, prompt_format: str | None = None) -> list[int]: ...


def prepare_prompt(
    engine: PromptEncoder, request: GenerationRequest, index: int = 0
) -> PreparedPrompt:
    """Format and tokenize (no model involved); refuses a row that could never fit."""
    formatted = engine.format(request.prompt, request.system_prompt, request.prompt_format)
    ids = tuple(engine.encode(formatted, request.prompt_format))
    limit = engine.max_row_tokens
    if len(ids) + request.params.max_new_tokens > limit:
        raise PromptTooLongError(index, len(ids), request.params.max_new_tokens, limit)
    return PreparedPrompt(request.prompt, formatted, ids)


def engine_rows(
    requests: list[GenerationRequest], prepared: list[PreparedPrompt], row_ids: Iterator[int]
) -> tuple[list[EngineRow], dict[int, int]]:
    """A request's rows (n per prompt, seeds resolved) and which prompt each row samples."""
    rows: list[EngineRow] = []
    row_prompt: dict[int, int] = {}
    for index, (request, prompt) in enumerate(zip(requests, prepared, strict=True)):
        for seed in sample_seeds(request.params.seed, request.n):
            row_id = next(row_ids)
            rows.append(EngineRow(row_id, prompt.prompt_ids, request.params, seed))
            row_prompt[row_id] = index
    return rows, row_prompt


# --- the core ---------------------------------------------------------------------------------


@dataclass
class RequestState:
    """One request as the core sees it: row ids, rows still waiting, rows finished."""

    request_id: int
    row_ids: list[int]
    pending: deque[EngineRow]
    enqueued_at: float
    finished: dict[int, Row] = field(default_factory=dict)
    admitted_step: int | None = None
    admitted_at: float | None = None


@dataclass(frozen=True)
class Plan:
    """What to do now: admit these rows; `wait_s` set means nothing runs, so wait that long
    (or until new work arrives) and plan again."""

    admit: list[EngineRow]
    wait_s: float | None = None
    queue_waits_s: list[float] = field(default_factory=list)  # of requests admitted first now


@dataclass(frozen=True)
class FinishedRequest:
    request_id: int
    rows: list[Row]  # in the request's row order
    queue_wait_s: float
    admitted_step: int


class SchedulerCore:
    """Queue and admission policy: FIFO, bounded by slots, KV blocks and prefill tokens."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self._waiting: deque[RequestState] = deque()  # requests with rows not yet admitted
        self._requests: dict[int, RequestState] = {}  # every unfinished request by id
        self._row_owner: dict[int, RequestState] = {}
        self.num_waiting_rows = 0

    @property
    def has_requests(self) -> bool:
        return bool(self._requests)

    @property
    def request_ids(self) -> list[int]:
        return list(self._requests)

    def add(self, request_id: int, rows: list[EngineRow], now: float) -> None:
        limit = self.config.max_queue_rows
        if self.num_waiting_rows + len(rows) > limit:
            raise QueueFullError(self.num_waiting_rows, len(rows), limit)
        state = RequestState(request_id, [r.row_id for r in rows], deque(rows), now)
        self._waiting.append(state)
        self._requests[request_id] = state
        for row in rows:
            self._row_owner[row.row_id] = state
        self.num_waiting_rows += len(rows)

    def abort(self, request_id: int) -> tuple[int, list[int]]:
        """Forget a request: (rows that were still waiting, all its row ids). The caller drops
        the running ones from the engine."""
        state = self._requests.pop(request_id, None)
        if state is None:
            return 0, []
        num_pending = len(state.pending)
        if num_pending:
            self.num_waiting_rows -= num_pending
            state.pending.clear()
            self._waiting.remove(state)
        for row_id in state.row_ids:
            self._row_owner.pop(row_id, None)
        return num_pending, state.row_ids

    def owners(self, row_ids: Iterable[int]) -> list[int]:
        """Ids of the requests these rows belong to (each once, in first-seen order)."""
        seen: dict[int, None] = {}
        for row_id in row_ids:
            state = self._row_owner.get(row_id)
            if state is not None:
                seen.setdefault(state.request_id)
        return list(seen)

    def is_live(self, row_id: int) -> bool:
        return row_id in self._row_owner

    def schedule(self, capacity: Capacity, now: float) -> Plan:
        running, mode = capacity.num_running, self.config.mode
        if running and mode != "continuous":
            return Plan([])  # static and serial never join a running batch
        if not self._waiting:
            return Plan([], None if running else IDLE_POLL_S)
        max_wait_s = self.config.max_wait_ms / 1000
        if running:
            # Each admission costs a prefill; a lone newcomer waits up to max_wait_ms for
            # company unless enough rows are waiting already. (Profile at 64 clients: admitting
            # 1-2 rows every step took 11-24% of the worker.)
            oldest_wait_s = now - self._waiting[0].enqueued_at
            if self.num_waiting_rows < max(1, running // 8) and oldest_wait_s < max_wait_s:
                return Plan([])
        elif mode != "serial":
            # Idle: give a first group max_wait_ms to gather, unless the batch is already full.
            remaining = self._waiting[0].enqueued_at + max_wait_s - now
            if remaining > 0 and self.num_waiting_rows < self.config.max_batch_size:
                return Plan([], remaining)
        plan = self._take_rows(self.config.max_batch_size - running, capacity, now)
        if not plan.admit and not running:
            return Plan([], IDLE_POLL_S)  # cannot happen with a consistent capacity; never spin
        return plan

    def _take_rows(self, room: int, capacity: Capacity, now: float) -> Plan:
        """FIFO rows up to `room` and the free slots and KV blocks, and (continuous mode) up to
        max_prefill_tokens of prompts; one prompt always goes."""
        taken: list[EngineRow] = []
        waits: list[float] = []
        prompts_seen: set[tuple[int, ...]] = set()
        prefill_tokens = 0
        room = min(room, capacity.num_free_slots)
        free_blocks = capacity.num_free_blocks
        limit_prefill = self.config.mode == "continuous"
        while self._waiting and len(taken) < room:
            state = self._waiting[0]
            row = state.pending[0]
            # A row that does not fit the free blocks now waits, and so does everything behind
            # it: first in, first admitted.
            blocks = capacity.blocks_needed(len(row.prompt_ids), row.params.max_new_tokens)
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
                state.admitted_step, state.admitted_at = capacity.step, now
                waits.append(now - state.enqueued_at)
            if not state.pending:
                self._waiting.popleft()
                if self.config.mode == "serial":
                    break  # one request at a time, like the original global lock
        self.num_waiting_rows -= len(taken)
        return Plan(taken, queue_waits_s=waits)

    def update(self, finished: Iterable[Row]) -> list[FinishedRequest]:
        """Take finished rows (not failed ones); return the requests now complete."""
        done: list[FinishedRequest] = []
        for row in finished:
            state = self._row_owner.get(row.row_id)
            if state is None:
                continue  # its request was cancelled or failed meanwhile
            state.finished[row.row_id] = row
            if len(state.finished) == len(state.row_ids):
                self.abort(state.request_id)
                admitted_at = state.admitted_at if state.admitted_at is not None else 0.0
                done.append(
                    FinishedRequest(
                        request_id=state.request_id,
                        rows=[state.finished[r] for r in state.row_ids],
                        queue_wait_s=max(0.0, admitted_at - state.enqueued_at),
                        admitted_step=state.admitted_step or 0,
                    )
                )
        return done


# --- the shell: a worker thread for the server --------------------------------------------------


@dataclass
class _Waiter:
    """The event-loop side of a request: its future and what its results need."""

    prompts: list[PreparedPrompt]
    row_prompt: dict[int, int]  # row id -> index into prompts
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    listener: TokenListener | None = None
    row_index: dict[int, int] = field(default_factory=dict)  # row id -> result index
    num_streamed: dict[int, int] = field(default_factory=dict)  # row id -> tokens sent


class Scheduler:
    def __init__(
        self, engine: LDAEngine, config: SchedulerConfig, metrics: Metrics | None = None
    ) -> None:
        self.engine = engine
        self.config = config
        self.metrics = metrics or Metrics()
        self.core = SchedulerCore(config)
        self._cond = threading.Condition()
        self._waiters: dict[int, _Waiter] = {}
        self._cancelled: set[int] = set()  # request ids to drop before the next step
        self._ids = itertools.count()
        self._row_ids = itertools.count()
        self._is_closed = False
        self._is_draining = False
        self._thread: threading.Thread | None = None

    # --- event-loop side ------------------------------------------------------------------

    def prepare(self, request: GenerationRequest, index: int = 0) -> PreparedPrompt:
        """Format and tokenize on the caller's thread (no model involved); checks the length."""
        return prepare_prompt(self.engine, request, index)

    def submit(
        self,
        requests: list[GenerationRequest],
        prepared: list[PreparedPrompt] | None = None,
        listener: TokenListener | None = None,
    ) -> tuple[int, asyncio.Future]:
        """Queue requests (their rows in order); the future resolves to a `Completion`.

        With a listener, each admission and step also sends the request's new tokens to it
        (on the caller's loop, always before the future resolves).
        """
        loop = asyncio.get_running_loop()
        if prepared is None:
            prepared = [self.prepare(r, i) for i, r in enumerate(requests)]
        with self._cond:
            if self._is_closed or self._is_draining:
                raise SchedulerClosedError("server is shutting down")
            rows, row_prompt = engine_rows(requests, prepared, self._row_ids)
            request_id = next(self._ids)
            try:
                self.core.add(request_id, rows, time.monotonic())
            except QueueFullError:
                self.metrics.errors.labels(kind="queue_full").inc()
                raise
            waiter = _Waiter(prepared, row_prompt, loop.create_future(), loop, listener)
            if listener is not None:
                waiter.row_index = {row_id: i for i, row_id in enumerate(row_prompt)}
            self._waiters[request_id] = waiter
            self.metrics.queue_rows.set(self.core.num_waiting_rows)
            self._cond.notify()
        return request_id, waiter.future

    def cancel(self, request_id: int) -> None:
        """Mark a request cancelled; the worker drops its rows before the next step."""
        with self._cond:
            if request_id in self._waiters:
                self._cancelled.add(request_id)
                self._cond.notify()

    @property
    def num_waiting_rows(self) -> int:
        return self.core.num_waiting_rows

    @property
    def request_ids(self) -> list[int]:
        """Requests not finished yet."""
        return self.core.request_ids

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
            while self._waiters and time.monotonic() < deadline:
                self._cond.wait(timeout=min(0.05, max(0.0, deadline - time.monotonic())))
            self._is_closed = True
            leftovers = list(self._waiters.values())
            self._waiters.clear()
            self._cond.notify_all()
        for waiter in leftovers:
            _resolve(waiter, SchedulerClosedError("server shut down before the request finished"))
        if self._thread is not None:
            self._thread.join(timeout=10)

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # --- worker side -----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                if not self._iterate():
                    return
            except Exception as err:  # noqa: BLE001 - the worker must outlive any bug
                log.exception("the worker loop failed; failing every request in flight")
                self._fail_all(err)

    def _iterate(self) -> bool:
        """One pass: drop cancelled requests, plan, admit, step, collect. False when closed."""
        with self._cond:
            self._drop_cancelled()
            if self._is_closed:
                return False
            plan = self.core.schedule(self.engine.capacity(), time.monotonic())
            if plan.wait_s is not None:
                self._cond.wait(timeout=plan.wait_s)
                return True
            for wait_s in plan.queue_waits_s:
                self.metrics.queue_wait.observe(wait_s)
            self.metrics.queue_rows.set(self.core.num_waiting_rows)
        finished: list[Row] = []
        try:
            finished += self._admit(plan.admit)
            if self.engine.num_running:
                self.metrics.batch_size.observe(self.engine.num_running)
                finished += self._step()
                self.metrics.steps.inc()
        except Exception as err:  # noqa: BLE001 - one bad batch must not kill the server
            log.exception("the decode step failed twice in a row; failing the running requests")
            self.metrics.errors.labels(kind="engine").inc()
            self._fail_rows(self.engine.running_row_ids, err, count=False)
        self._collect(finished)  # rows admitted and finished before a failure still resolve
        return True

    def _fail_all(self, err: Exception) -> None:
        with self._cond:
            request_ids = list(self._waiters)
        self._end_requests(request_ids, EngineFailedError(f"generation failed: {err}"))
        try:
            self.engine.cancel(self.engine.running_row_ids)  # rows no request owns any more
        except Exception:  # noqa: BLE001
            log.exception("could not drop the remaining rows")
        self.metrics.errors.labels(kind="worker").inc()

    def _end_requests(
        self, request_ids: Iterable[int], outcome: Exception | None
    ) -> tuple[int, int, int]:
        """Forget requests in the core, drop their rows from the engine and settle their
        futures with `outcome` (None cancels, counted in rows_cancelled). Returns (rows that were
        waiting, rows that were running, futures settled)."""
        waiters: list[_Waiter] = []
        num_pending = num_running = 0
        with self._cond:
            for request_id in request_ids:
                pending, row_ids = self.core.abort(request_id)
                num_pending += pending
                try:
                    num_running += len(self.engine.cancel(row_ids))
                except Exception:  # noqa: BLE001 - the futures must settle all the same
                    log.exception("could not drop the rows of request %d", request_id)
                waiter = self._waiters.pop(request_id, None)
                if waiter is not None:
                    waiters.append(waiter)
            # Counted under the lock that dropped the rows, together with the gauges below.
            if outcome is None:
                self.metrics.rows_cancelled.inc(num_pending + num_running)
            self.metrics.queue_rows.set(self.core.num_waiting_rows)
            self.metrics.running_rows.set(self.engine.num_running)
            self._cond.notify_all()
        for waiter in waiters:
            _resolve(waiter, outcome)
        return num_pending, num_running, len(waiters)

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
            return self._admit(self._still_live(rows))
        except Exception as err:  # noqa: BLE001 - isolate the row that caused it
            if len(rows) == 1:
                log.exception("admitting row %d failed", rows[0].row_id)
                self._fail_rows([rows[0].row_id], err)
                return []
            log.warning("admitting %d rows failed (%s); admitting them one by one", len(rows), err)
            # A failed row fails its whole request, so its siblings are skipped.
            return [row for r in rows for row in self._admit(self._still_live([r]))]
        self.metrics.rows_admitted.inc(len(rows))
        return finished

    def _still_live(self, rows: list[EngineRow]) -> list[EngineRow]:
        """Rows whose request has not failed or been cancelled meanwhile."""
        with self._cond:
            return [r for r in rows if self.core.is_live(r.row_id)]

    def _step(self) -> list[Row]:
        """One decode step, retried once: a failed step changed nothing in the engine."""
        try:
            return self.engine.step()
        except Exception as err:  # noqa: BLE001
            log.warning("decode step failed (%s: %s); retrying it once", type(err).__name__, err)
            return self.engine.step()

    def _drop_cancelled(self) -> None:
        if not self._cancelled:
            return
        self._end_requests(self._cancelled, None)
        self._cancelled.clear()

    def _stream_tokens(self, finished: list[Row]) -> None:
        """Send each listening request the tokens its rows gained on this admission or step."""
        listening = {
            request_id: waiter
            for request_id, waiter in self._waiters.items()
            if waiter.listener is not None and request_id not in self._cancelled
        }
        if not listening:
            return
        owner = {row_id: rid for rid, w in listening.items() for row_id in w.row_index}
        updates: dict[int, list[tuple[int, tuple[int, ...]]]] = {}
        for row in [*self.engine.running_rows, *finished]:
            request_id = owner.get(row.row_id)
            if request_id is None or row.error:
                continue
            waiter = listening[request_id]
            sent = waiter.num_streamed.get(row.row_id, 0)
            if len(row.token_ids) > sent:
                waiter.num_streamed[row.row_id] = len(row.token_ids)
                new = (waiter.row_index[row.row_id], tuple(row.token_ids[sent:]))
                updates.setdefault(request_id, []).append(new)
        for request_id, rows in updates.items():
            waiter = listening[request_id]
            if not waiter.loop.is_closed():
                waiter.loop.call_soon_threadsafe(waiter.listener, rows)

    def _collect(self, finished: list[Row]) -> None:
        with self._cond:
            self._stream_tokens(finished)
        for row in finished:
            if row.error:
                self._fail_rows([row.row_id], RuntimeError(row.error))
        with self._cond:
            # Rows of requests that failed or were cancelled meanwhile count nowhere.
            live = [row for row in finished if not row.error and self.core.is_live(row.row_id)]
            for row in live:
                self.metrics.rows_finished.labels(reason=row.finish_reason or "length").inc()
                self.metrics.tokens_generated.inc(len(row.token_ids))
            done = [
                (request, self._waiters.pop(request.request_id, None))
                for request in self.core.update(live)
            ]
            self.metrics.running_rows.set(self.engine.num_running)
            self._cond.notify_all()
        for request, waiter in done:
            if waiter is not None:
                self._resolve_finished(request, waiter)

    def _resolve_finished(self, request: FinishedRequest, waiter: _Waiter) -> None:
        results: list[GenerationResult] = []
        for row in request.rows:
            prompt = waiter.prompts[waiter.row_prompt[row.row_id]]
            results.append(self.engine.build_result(prompt.prompt, prompt.formatted_prompt, row))
        completion = Completion(
            results=results,
            queue_wait_s=request.queue_wait_s,
            admitted_step=request.admitted_step,
            finished_step=self.engine.num_steps,
        )
        _resolve(waiter, completion)

    def _fail_rows(self, row_ids: list[int], err: Exception, count: bool = True) -> None:
        """Fail the requests that own these rows; their other rows leave the batch or queue."""
        with self._cond:
            owners = self.core.owners(row_ids)
        error = EngineFailedError(f"generation failed for this request: {err}")
        _, _, num_failed = self._end_requests(owners, error)
        if count:
            self.metrics.errors.labels(kind="row").inc(num_failed)


def _resolve(waiter: _Waiter, outcome: Completion | Exception | None) -> None:
    """Settle a future from the worker thread: a result, an exception, or None to cancel it."""
    if waiter.loop.is_closed():
        return

    def settle() -> None:
        if waiter.future.done():
            return
        if outcome is None:
            waiter.future.cancel()
        elif isinstance(outcome, Exception):
            waiter.future.set_exception(outcome)
        else:
            waiter.future.set_result(outcome)

    waiter.loop.call_soon_threadsafe(settle)
