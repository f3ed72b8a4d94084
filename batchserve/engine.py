"""The engine loop: plan = scheduler.schedule(); out = runner.execute(plan); scheduler.update(out).

No asyncio and no HTTP here. `EngineCore` is the loop's body, one thread only. The server runs
it on a worker thread through `Engine`, whose other side (`submit`, `abort`, `finish_rows`)
only appends to an inbox the worker drains between steps, so nothing the event loop calls ever
waits for a step. Offline, `iter_generate` runs the same core in a plain loop.

Each request has a listener, called on the worker thread with an `EngineEvent` after every
step that concerns it; the server's listener hands it to its event loop
(batchserve/api/streaming.py), where the frontend turns tokens into text.
"""

from __future__ import annotations

import itertools
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from tqdm import tqdm

from batchserve.core.scheduler import (
    Admission,
    QueueFullError,
    RowUpdate,
    Scheduler,
    SchedulerConfig,
)
from batchserve.core.types import (
    EngineRow,
    GenerationRequest,
    GenerationResult,
    Runner,
    RunnerConfig,
    SamplingParams,
    StepOutput,
    StepPlan,
)
from batchserve.frontend import Frontend, RequestOutput, expand_rows
from batchserve.metrics import Metrics

__all__ = [
    "Engine",
    "EngineCore",
    "EngineEvent",
    "EngineFailedError",
    "GenerationRequest",
    "GenerationResult",
    "RunnerConfig",
    "SamplingParams",
    "SchedulerClosedError",
    "generate",
    "iter_generate",
]

log = logging.getLogger(__name__)

# How long `Engine.shutdown` waits for the worker to finish the step in flight before it fails
# what is left (streams wait for that failure: api/streaming.event_stream).
WORKER_STOP_TIMEOUT_S = 10.0


class SchedulerClosedError(RuntimeError):
    """The server is shutting down (or the worker died) and takes no more work."""


class EngineFailedError(RuntimeError):
    """The engine raised while this request's rows were in the batch."""


@dataclass(frozen=True)
class EngineEvent:
    """What one step did for one request: its rows' updates, its admission, or its failure."""

    request_id: int
    step: int
    updates: tuple[RowUpdate, ...] = ()
    admission: Admission | None = None
    error: Exception | None = None


Listener = Callable[[EngineEvent], None]


@dataclass
class StepResult:
    events: list[EngineEvent] = field(default_factory=list)
    wait_s: float | None = None  # nothing ran: plan again after this long (or new work)


class EngineCore:
    """Scheduler + runner + metrics: one step at a time, one thread."""

    def __init__(
        self,
        runner: Runner,
        config: SchedulerConfig,
        *,
        eos_token_ids: Sequence[int] = (),
        metrics: Metrics | None = None,
        model_ids: Sequence[str] = (),
    ) -> None:
        self.runner = runner
        self.metrics = metrics or Metrics()
        self.scheduler = Scheduler(
            config,
            num_kv_blocks=runner.num_kv_blocks,
            block_size=runner.block_size,
            max_row_tokens=runner.max_row_tokens,
            eos_token_ids=eos_token_ids,
            model_ids=model_ids,
        )

    def add_request(self, request_id: int, rows: Sequence[EngineRow], now: float) -> None:
        self.scheduler.add_request(request_id, rows, now)
        self.metrics.queue_rows.set(self.scheduler.num_waiting_rows)

    def step(self, now: float) -> StepResult:
        """Plan, execute (retried once: a failed step changed nothing), update."""
        scheduler, metrics = self.scheduler, self.metrics
        blocks = scheduler.blocks
        queried, hits = blocks.num_queried_tokens, blocks.num_hit_tokens
        schedule = scheduler.schedule(now)
        plan = schedule.plan
        if not plan.rows:
            return StepResult(wait_s=schedule.wait_s)
        for admission in schedule.admissions:
            metrics.queue_wait.observe(admission.queue_wait_s)
        metrics.prefix_cache_queried.inc(blocks.num_queried_tokens - queried)
        metrics.prefix_cache_hits.inc(blocks.num_hit_tokens - hits)
        try:
            output = self._execute(plan)
        except Exception as err:  # noqa: BLE001 - one bad batch must not kill the server
            log.exception("the step failed twice in a row; failing its requests")
            metrics.errors.labels(kind="engine").inc()
            return StepResult(self._fail_plan(plan, err))
        updates = scheduler.update(plan, output)
        metrics.steps.inc()
        metrics.batch_size.observe(len(plan.rows))
        metrics.step_tokens.observe(plan.num_tokens)
        metrics.tokens_generated.inc(sum(len(u.token_ids) for u in updates))
        for update in updates:
            if update.finish_reason is not None:
                metrics.rows_finished.labels(reason=update.finish_reason).inc()
        metrics.rows_admitted.inc(schedule.num_admitted)
        metrics.queue_rows.set(scheduler.num_waiting_rows)
        metrics.running_rows.set(scheduler.num_running)
        return StepResult(self._events(updates, schedule.admissions))

    def _execute(self, plan: StepPlan) -> StepOutput:
        try:
            return self.runner.execute(plan)
        except Exception as err:  # noqa: BLE001
            log.warning("step failed (%s: %s); retrying it once", type(err).__name__, err)
            return self.runner.execute(plan)

    def _fail_plan(self, plan: StepPlan, err: Exception) -> list[EngineEvent]:
        planned = {r.row_id for r in plan.rows}
        owners = {row.request_id for row in self.scheduler.running if row.row_id in planned}
        self.scheduler.step_failed()
        error = EngineFailedError(f"generation failed for this request: {err}")
        for request_id in owners:
            self.scheduler.abort_request(request_id)
        return [EngineEvent(rid, self.scheduler.num_steps, error=error) for rid in owners]

    def _events(
        self, updates: list[RowUpdate], admissions: Sequence[Admission]
    ) -> list[EngineEvent]:
        step = self.scheduler.num_steps
        by_request: dict[int, list[RowUpdate]] = {}
        for update in updates:
            by_request.setdefault(update.request_id, []).append(update)
        admitted = {a.request_id: a for a in admissions}
        return [
            EngineEvent(rid, step, tuple(by_request.get(rid, ())), admitted.get(rid))
            for rid in by_request.keys() | admitted.keys()
        ]

    def abort_request(self, request_id: int) -> int:
        """Drop a request (cancelled by its client, timed out, failed); returns its open rows."""
        num_open = self.scheduler.abort_request(request_id)
        self.metrics.queue_rows.set(self.scheduler.num_waiting_rows)
        self.metrics.running_rows.set(self.scheduler.num_running)
        return num_open

    def finish_rows(self, row_ids: Sequence[int], reason: str = "stop") -> None:
        self.scheduler.finish_rows(row_ids, reason)
        self.metrics.rows_finished.labels(reason=reason).inc(len(row_ids))
        self.metrics.running_rows.set(self.scheduler.num_running)


# --- the worker thread, for the server ------------------------------------------------------------


class Engine:
    """`EngineCore` on a worker thread. The event-loop side only touches the inbox."""

    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self.metrics = core.metrics
        self.config = core.scheduler.config
        self._cond = threading.Condition()
        self._inbox: list[Callable[[], None]] = []
        self._num_inbox_rows = 0
        self._queued: set[int] = set()  # requests submitted, not yet added to the scheduler
        self._listeners: dict[int, Listener] = {}
        self._request_ids = itertools.count()
        self.row_ids = itertools.count()  # for `frontend.expand_rows`: unique in this engine
        self._is_draining = False
        self._is_closed = False
        self._thread: threading.Thread | None = None

    # --- the event loop's side ---------------------------------------------------------------

    @property
    def num_waiting_rows(self) -> int:
        """Rows queued and not yet admitted (read without a lock: a gauge, not a promise)."""
        return self._num_inbox_rows + self.core.scheduler.num_waiting_rows

    @property
    def num_requests(self) -> int:
        return len(self._listeners)

    @property
    def request_ids(self) -> list[int]:
        """Requests in flight (queued or running)."""
        return list(self._listeners)

    @property
    def num_running(self) -> int:
        return self.core.scheduler.num_running

    @property
    def num_steps(self) -> int:
        return self.core.scheduler.num_steps

    @property
    def max_row_tokens(self) -> int:
        return self.core.scheduler.max_row_tokens

    def submit(self, rows: Sequence[EngineRow], listener: Listener) -> int:
        """Queue a request's rows; `listener` gets its events on the worker thread. A full
        queue raises QueueFullError, a closing engine SchedulerClosedError, before anything
        is queued."""
        with self._cond:
            if self._is_closed or self._is_draining:
                raise SchedulerClosedError("server is shutting down")
            limit = self.config.max_queue_rows
            if self.num_waiting_rows + len(rows) > limit:
                self.metrics.errors.labels(kind="queue_full").inc()
                raise QueueFullError(self.num_waiting_rows, len(rows), limit)
            request_id = next(self._request_ids)
            self._listeners[request_id] = listener
            self._num_inbox_rows += len(rows)
            self._queued.add(request_id)
            now = time.monotonic()

            def add() -> None:
                with self._cond:
                    self._num_inbox_rows -= len(rows)
                    self._queued.discard(request_id)
                try:
                    self.core.add_request(request_id, rows, now)
                except Exception as err:  # noqa: BLE001 - refused: its listener hears why
                    self._notify(EngineEvent(request_id, self.core.scheduler.num_steps, error=err))
                    self._listeners.pop(request_id, None)

            self._inbox.append(add)
            self._cond.notify()
        return request_id

    def abort(self, request_id: int) -> None:
        """Drop a request's rows before the next step (its client left, or it timed out)."""
        self._post(lambda: self._abort(request_id))

    def finish_rows(self, row_ids: Sequence[int]) -> None:
        """End rows a stop string ended (the frontend found it) before the next step."""
        self._post(lambda: self.core.finish_rows(row_ids))

    def _post(self, action: Callable[[], None]) -> None:
        with self._cond:
            self._inbox.append(action)
            self._cond.notify()

    def _abort(self, request_id: int) -> None:
        if self._listeners.pop(request_id, None) is not None:
            self.metrics.rows_cancelled.inc(self.core.abort_request(request_id))

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="batchserve-engine", daemon=True)
        self._thread.start()

    def drain(self) -> None:
        """Stop taking new requests; the ones in flight go on."""
        with self._cond:
            self._is_draining = True

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Give in-flight requests timeout_s, then fail what is left and stop the worker.
        Blocks: call it off the event loop."""
        self.drain()
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._listeners and time.monotonic() < deadline:
                self._cond.wait(timeout=min(0.05, max(0.0, deadline - time.monotonic())))
            self._is_closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=WORKER_STOP_TIMEOUT_S)
        self._fail_all(SchedulerClosedError("server shut down before the request finished"))

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # --- the worker --------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                if not self._iterate():
                    return
            except Exception as err:  # noqa: BLE001 - the worker must outlive any bug
                log.exception("the engine loop failed; failing every request in flight")
                self.metrics.errors.labels(kind="worker").inc()
                self._fail_all(EngineFailedError(f"generation failed: {err}"))

    def _iterate(self) -> bool:
        """Drain the inbox, run one step, hand out its events. False once closed."""
        with self._cond:
            actions, self._inbox = self._inbox, []
        for action in actions:
            action()
        if self._is_closed:
            return False
        result = self.core.step(time.monotonic())
        for event in result.events:
            self._notify(event)
        self._forget_finished()
        if result.wait_s is not None:
            with self._cond:
                if not self._inbox and not self._is_closed:
                    self._cond.wait(timeout=result.wait_s)
        return True

    def _notify(self, event: EngineEvent) -> None:
        listener = self._listeners.get(event.request_id)
        if listener is None:
            return
        try:
            listener(event)
        except Exception:  # noqa: BLE001 - a listener's bug must not stop the engine
            log.exception("the listener of request %d failed", event.request_id)

    def _forget_finished(self) -> None:
        """Listeners of requests the scheduler has closed (and not just queued)."""
        live = self.core.scheduler.requests
        with self._cond:
            finished = [r for r in self._listeners if r not in live and r not in self._queued]
            for rid in finished:
                del self._listeners[rid]
            if finished:
                self._cond.notify_all()

    def _fail_all(self, error: Exception) -> None:
        with self._cond:
            listeners, self._listeners = self._listeners, {}
            self._cond.notify_all()
        step = self.core.scheduler.num_steps
        for request_id, listener in listeners.items():
            try:
                self.core.abort_request(request_id)
            except Exception:  # noqa: BLE001 - the listeners must hear all the same
                log.exception("could not drop the rows of request %d", request_id)
            try:
                listener(EngineEvent(request_id, step, error=error))
            except Exception:  # noqa: BLE001
                log.exception("the listener of request %d failed", request_id)


# --- offline ----------------------------------------------------------------------------------


def build_engine_core(
    pair, runner_config: RunnerConfig | None, scheduler_config: SchedulerConfig, metrics=None
) -> EngineCore:
    """The model runner over a loaded pair, and its core. (The only import of the worker.)"""
    from batchserve.worker.runner import ModelRunner

    runner = ModelRunner(pair, runner_config)
    return EngineCore(
        runner,
        scheduler_config,
        eos_token_ids=sorted(pair.eos_token_ids),
        metrics=metrics,
        model_ids=(pair.after_id, pair.before_id),
    )


def iter_generate(
    pair,
    requests: Sequence[GenerationRequest],
    *,
    max_batch_size: int = 64,
    prompt_format: str = "alpaca",
    runner_config: RunnerConfig | None = None,
    scheduler_config: SchedulerConfig | None = None,
) -> Iterator[tuple[int, GenerationResult]]:
    """Run requests with continuous batching; yield (row index, result) as rows finish.

    Row indices count the n samples of each request in order, so a caller can write results
    as they arrive and still restore input order. The server's scheduler plans the steps, and a
    prompt that could never fit raises `PromptTooLongError` (a ValueError) before anything runs.
    """
    config = scheduler_config or SchedulerConfig(
        max_batch_size=max_batch_size,
        max_num_batched_tokens=max(2048, max_batch_size),
        max_queue_rows=max(1, sum(r.n for r in requests)),
    )
    runner_config = runner_config or RunnerConfig(max_batch_size=config.max_batch_size)
    core = build_engine_core(pair, runner_config, config)
    frontend = Frontend(
        pair.tokenizer, prompt_format=prompt_format, max_row_tokens=core.runner.max_row_tokens
    )
    row_ids = itertools.count()
    outputs: dict[int, tuple[int, RequestOutput]] = {}  # request id -> (first row index, output)
    first_row = 0
    for index, request in enumerate(requests):
        # A LoRA pair's adapter names, checked before anything runs (UnknownModelError).
        pair.model_names(request.params.after, request.params.before)
        prompt = frontend.prepare(request, index)
        rows, row_prompt = expand_rows([request], [prompt], row_ids)
        core.add_request(index, rows, now=0.0)
        outputs[index] = (first_row, RequestOutput(frontend, [prompt], rows, row_prompt))
        first_row += len(rows)
    while core.scheduler.has_work:
        result = core.step(now=0.0)
        for event in result.events:
            first, output = outputs[event.request_id]
            if event.error is not None:
                raise event.error
            _, stopped = output.process(event.updates)
            if stopped:
                core.finish_rows(stopped)
            if output.error is not None:
                raise RuntimeError(output.error)
            if output.is_finished:
                del outputs[event.request_id]
                core.abort_request(event.request_id)  # rows a stop string ended: gone already
                for i, result_row in enumerate(output.results()):
                    yield first + i, result_row


def generate(
    pair,
    requests: Sequence[GenerationRequest],
    *,
    max_batch_size: int = 64,
    prompt_format: str = "alpaca",
    progress: bool = False,
    runner_config: RunnerConfig | None = None,
    scheduler_config: SchedulerConfig | None = None,
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
            scheduler_config=scheduler_config,
        ):
            results[index] = result
            bar.update(1)
    return [results[i] for i in range(num_rows)]
