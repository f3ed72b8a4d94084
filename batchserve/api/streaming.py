"""A request's life on the engine, for the native and the OpenAI routes alike, and its stream.

`submit` queues prepared prompts on the engine and returns a `Job`: the event-loop side of one
request. The engine's worker hands each step's events to the job's loop; there the frontend
turns tokens into text (stop strings end rows), and the job resolves to a `Completion` once
every row has ended. `run_to_completion` waits for it, the client's disconnect or the timeout;
`Refused` carries the status of each way that can end without a result, which each API renders
in its own error shape. No tensors here.

A streaming job queues each step's deltas while its reader keeps up; for a reader that lags,
the queue merges into one delta per row, so a slow client makes the server hold at most the
completion's text, however many steps it took.
`sse_response` frames the deltas for the native routes; openai_api.py frames them in its dialect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from pydantic import BaseModel
from sse_starlette import EventSourceResponse
from starlette.requests import Request

from batchserve.core.scheduler import QueueFullError
from batchserve.core.types import GenerationRequest, GenerationResult
from batchserve.engine import (
    WORKER_STOP_TIMEOUT_S,
    Engine,
    EngineEvent,
    EngineFailedError,
    SchedulerClosedError,
)
from batchserve.frontend import Delta, Frontend, PreparedPrompt, RequestOutput, expand_rows
from batchserve.schemas import ErrorResponse

log = logging.getLogger(__name__)

# Deltas a stream holds for a reader that lags; beyond it they merge into one per row, so the
# server holds at most the rows' text, not an event per token.
MAX_PENDING_DELTAS = 256


class RequestTimeoutError(TimeoutError):
    def __init__(self, timeout_s: float) -> None:
        super().__init__(f"request timed out after {timeout_s:g} s; its rows were dropped")


class ClientDisconnectedError(ConnectionError):
    """The client went away before its result was ready."""


class Refused(Exception):
    """A request answered without a result: status, message, and when to retry. Both API
    dialects render it, the native routes as `{"error", "detail"}`, /v1 in OpenAI's shape,
    so the statuses below are written once for every route."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        retry_after_s: int | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message = status, message
        self.retry_after_s, self.code = retry_after_s, code

    @property
    def headers(self) -> dict[str, str] | None:
        return None if self.retry_after_s is None else {"Retry-After": str(self.retry_after_s)}


def refusal(err: Exception) -> Refused:
    """The status of what queueing a request or waiting for it raised."""
    if isinstance(err, QueueFullError):
        return Refused(503, str(err), retry_after_s=err.retry_after_s, code="server_overloaded")
    if isinstance(err, SchedulerClosedError):
        return Refused(503, str(err), retry_after_s=5)
    if isinstance(err, RequestTimeoutError):
        return Refused(504, str(err), code="timeout")
    if isinstance(err, ClientDisconnectedError):
        return Refused(499, str(err))
    return Refused(500, str(err))


def ready_engine(request: Request) -> tuple[Engine, Frontend]:
    """The engine and the frontend, while the server takes requests: not before the models
    load, nor once it drains for shutdown."""
    state = request.app.state
    if getattr(state, "is_draining", False):
        raise Refused(503, "server is shutting down", retry_after_s=5)
    engine: Engine | None = getattr(state, "engine", None)
    if engine is None:
        raise Refused(503, "models are still loading", retry_after_s=5)
    return engine, state.frontend


@dataclass(frozen=True)
class Completion:
    """A finished request: results in order, plus where it sat in the engine's step clock."""

    results: list[GenerationResult]
    queue_wait_s: float
    admitted_step: int  # engine step when its first row was admitted
    finished_step: int


# A deferring job still hands its events over every this many steps, so the text of a long
# row is decoded in slices, not in one callback that holds up the loop's other requests.
MAX_DEFERRED_STEPS = 64


class LoopInbox:
    """What the worker hands one event loop: the first hand-off of a step wakes the loop, the
    others of that step ride along, so many streams cost one wake-up (one GIL hand-off, one
    self-pipe write) a step instead of one each."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[Callable[..., None], tuple]] = []

    def post(self, callback: Callable[..., None], *args: object) -> None:
        """From any thread: run callback(*args) on the loop, in the order posted."""
        with self._lock:
            wake = not self._pending
            self._pending.append((callback, args))
        if wake:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                self._loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for callback, args in pending:
            try:
                callback(*args)
            except Exception:  # noqa: BLE001 - one job's bug must not drop the others' events
                log.exception("handing a step's events to a request failed")


_INBOXES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopInbox] = (
    weakref.WeakKeyDictionary()
)


def inbox_of(loop: asyncio.AbstractEventLoop) -> LoopInbox:
    """The loop's inbox (made on the loop's own thread, the first time a job there asks)."""
    inbox = _INBOXES.get(loop)
    if inbox is None:
        inbox = _INBOXES[loop] = LoopInbox(loop)
    return inbox


class Job:
    """One submitted request, on its event loop: the frontend's output, and its Completion."""

    def __init__(
        self,
        engine: Engine,
        frontend: Frontend,
        requests: Sequence[GenerationRequest],
        prepared: Sequence[PreparedPrompt],
        *,
        is_stream: bool,
    ) -> None:
        self.engine = engine
        self.loop = asyncio.get_running_loop()
        self._inbox = inbox_of(self.loop)
        rows, row_prompt = expand_rows(requests, prepared, engine.row_ids)
        self.output = RequestOutput(frontend, prepared, rows, row_prompt)
        self.future: asyncio.Future[Completion] = self.loop.create_future()
        # A result nobody awaits any more (a stream cut short) must not log "never retrieved".
        self.future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._is_stream = is_stream
        # A plain request (no stream, no stop strings) needs nothing from its loop until a row
        # ends: its step events wait on the worker thread (see _listen). The worker is the
        # only writer, except a shutdown whose worker is stuck; its error event then settles
        # the job, and whatever else arrives is ignored.
        self._defers = not is_stream and not any(row.params.stop for row in rows)
        self._deferred: list[EngineEvent] = []
        self._pending: list[Delta] = []  # text not yet streamed
        self._wake = asyncio.Event()
        self._admitted_step = 0
        self._queue_wait_s = 0.0
        try:
            self.request_id = engine.submit(rows, self._listen)
        except (QueueFullError, SchedulerClosedError) as err:
            raise refusal(err) from None

    def _listen(self, event: EngineEvent) -> None:
        """On the engine's worker thread: hand the event to this job's loop.

        Waking the loop takes the GIL from the worker between its torch calls: measured on the
        toy pair, a thread taking it for 60 us every step slowed a lone request's steps by
        16%. So a plain request's step events wait here until one of its rows ends (or fails),
        and then go over together; streams and stop strings need every step at once."""
        ends = event.error is not None or any(
            u.finish_reason is not None or u.error is not None for u in event.updates
        )
        if self._defers and not ends and len(self._deferred) < MAX_DEFERRED_STEPS:
            self._deferred.append(event)
            return
        events = [*self._deferred, event]
        self._deferred = []
        self._inbox.post(self._on_events, events)

    def _on_events(self, events: list[EngineEvent]) -> None:
        for event in events:
            try:
                self._on_event(event)
            except Exception as err:  # noqa: BLE001 - the job fails, not the loop's other jobs
                log.exception("request %d: taking a step's events failed", self.request_id)
                self.engine.abort(self.request_id)
                if not self.future.done():
                    self._settle(EngineFailedError(f"generation failed for this request: {err}"))
                return

    def _on_event(self, event: EngineEvent) -> None:
        if self.future.done():
            return
        if event.error is not None:
            self._settle(event.error)
            return
        if event.admission is not None:
            self._admitted_step = event.admission.step
            self._queue_wait_s = event.admission.queue_wait_s
        deltas, stopped = self.output.process(event.updates)
        if stopped:
            self.engine.finish_rows(stopped)
        if self.output.error is not None:
            self.engine.abort(self.request_id)
            self._settle(
                EngineFailedError(f"generation failed for this request: {self.output.error}")
            )
            return
        if self._is_stream and deltas:
            self._pending.extend(deltas)
            if len(self._pending) > MAX_PENDING_DELTAS:  # a slow reader: one delta per row
                merged: dict[int, str] = {}
                for delta in self._pending:
                    merged[delta.index] = merged.get(delta.index, "") + delta.text
                self._pending = [Delta(i, text) for i, text in sorted(merged.items())]
            self._wake.set()
        if self.output.is_finished:
            completion = Completion(
                self.output.results(), self._queue_wait_s, self._admitted_step, event.step
            )
            self._settle(completion)

    def _settle(self, outcome: Completion | Exception) -> None:
        if isinstance(outcome, Exception):
            self.future.set_exception(outcome)
        else:
            self.future.set_result(outcome)
        self._wake.set()

    def close(self, why: str) -> None:
        """Drop what is left of a job that ended early; `why` is the errors metric's kind."""
        if not self.future.done():
            self.engine.abort(self.request_id)
            self.engine.metrics.errors.labels(kind=why).inc()
            self.future.cancel()

    async def deltas(self, timeout_s: float) -> AsyncIterator[Delta | Completion]:
        """The rows' text as it becomes final, then the Completion. Engine errors (closed,
        failed) propagate; past timeout_s, RequestTimeoutError."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self._pending:
                pending, self._pending = self._pending, []
                for delta in pending:
                    yield delta
                continue
            if self.future.done():
                break
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise RequestTimeoutError(timeout_s) from None
        if self.future.cancelled():
            raise SchedulerClosedError("server shut down before the request finished")
        yield self.future.result()


def submit(
    request: Request,
    requests: Sequence[GenerationRequest],
    prepared: Sequence[PreparedPrompt],
    *,
    is_stream: bool = False,
) -> Job:
    """Queue prepared requests; a full or closing queue is a 503 the client retries."""
    engine, frontend = ready_engine(request)
    return Job(engine, frontend, requests, prepared, is_stream=is_stream)


async def wait_for_completion(request: Request, job: Job, timeout_s: float) -> Completion:
    """The job's Completion, unless the client goes away or the timeout passes first.

    The caller closes the job when this raises.
    """

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait(
            {job.future, watcher}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        watcher.cancel()
    if job.future in done:
        if job.future.cancelled():
            raise SchedulerClosedError("server shut down before the request finished")
        return job.future.result()
    if watcher in done:
        raise ClientDisconnectedError("client disconnected")
    raise RequestTimeoutError(timeout_s)


async def run_to_completion(
    request: Request,
    requests: Sequence[GenerationRequest],
    prepared: Sequence[PreparedPrompt],
    timeout_s: float,
) -> Completion:
    """Queue, then the result, the client's disconnect or the timeout, whichever comes first;
    what a request that ended early left queued or running is dropped. Raises `Refused`."""
    job = submit(request, requests, prepared)
    why = "client_disconnected"
    try:
        return await wait_for_completion(request, job, timeout_s)
    except ClientDisconnectedError as err:
        raise refusal(err) from None
    except (RequestTimeoutError, SchedulerClosedError, EngineFailedError) as err:
        why = "timeout"
        raise refusal(err) from None
    finally:
        job.close(why)


def event_stream(events: AsyncIterator[dict], shutdown_timeout_s: float) -> EventSourceResponse:
    """An SSE response that the server's drain ends on shutdown, not sse-starlette.

    sse-starlette cancels a stream `shutdown_grace_period` after it sees uvicorn's exit flag
    (polled every 0.5 s). With a grace equal to the drain's timeout the two raced, and a stream
    cut first ended without its closing `error` event (3 of 9 runs with --shutdown-timeout-s 1)
    while its job's failure went unread. The drain fails every unfinished job once the worker
    has stopped (the shutdown timeout, plus at most WORKER_STOP_TIMEOUT_S for the step in
    flight), and each stream then sends its own closing event; the longer grace only bounds a
    drain that hangs.
    """
    grace_s = shutdown_timeout_s + WORKER_STOP_TIMEOUT_S + 1.0
    return EventSourceResponse(events, shutdown_grace_period=grace_s)


def sse_response(
    job: Job,
    timeout_s: float,
    render_delta: Callable[[Delta], BaseModel],
    render_result: Callable[[Completion], BaseModel],
    shutdown_timeout_s: float,
) -> EventSourceResponse:
    """The native routes' stream: `delta` events, then one `result` (or `error`) event.

    A client that goes away cancels the generator; its rows are dropped before the next step.
    On shutdown a stream gets `shutdown_timeout_s` to finish, like a request in flight, and one
    cut by it ends with an `error` event.
    """

    async def events() -> AsyncIterator[dict]:
        why = "client_disconnected"
        try:
            async for item in job.deltas(timeout_s):
                if isinstance(item, Delta):
                    yield {"event": "delta", "data": render_delta(item).model_dump_json()}
                else:
                    yield {"event": "result", "data": render_result(item).model_dump_json()}
        except (SchedulerClosedError, EngineFailedError, RequestTimeoutError) as err:
            why = "timeout"
            yield {"event": "error", "data": ErrorResponse(error=str(err)).model_dump_json()}
        finally:
            job.close(why)

    return event_stream(events(), shutdown_timeout_s)
