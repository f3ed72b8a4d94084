"""A request's life on the scheduler, for the native and the OpenAI routes alike, and its stream.

`submit` and `run_to_completion` queue a request and wait for its result, the client's
disconnect or the timeout; `Refused` carries the status of each way that can end without a
result, which each API renders in its own error shape. No tensors here.

`TokenStreams` is the scheduler listener of one submitted request: it turns each row's new
token ids into text deltas that never split a multi-byte character and never show text a stop
string will cut, and whose join is exactly the row's non-streamed completion.
`sse_response` frames them for the native routes; openai_api.py frames them in its dialect.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from sse_starlette import EventSourceResponse
from starlette.requests import Request

from batchserve.core.types import GenerationRequest, find_stop
from batchserve.scheduler import (
    Completion,
    EngineFailedError,
    PreparedPrompt,
    QueueFullError,
    Scheduler,
    SchedulerClosedError,
    TokenListener,
)

log = logging.getLogger(__name__)

REPLACEMENT = "\ufffd"  # what a byte-level decoder shows for an unfinished UTF-8 sequence


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
        self, status: int, message: str, *, retry_after_s: int | None = None, code: str | None = None
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


def ready_scheduler(request: Request) -> Scheduler:
    """The scheduler, while the server takes requests: not before the models load, nor once it
    drains for shutdown."""
    state = request.app.state
    if getattr(state, "is_draining", False):
        raise Refused(503, "server is shutting down", retry_after_s=5)
    scheduler: Scheduler | None = getattr(state, "scheduler", None)
    if scheduler is None:
        raise Refused(503, "models are still loading", retry_after_s=5)
    return scheduler


def submit(
    scheduler: Scheduler,
    requests: list[GenerationRequest],
    prepared: list[PreparedPrompt],
    listener: TokenListener | None = None,
) -> tuple[int, asyncio.Future]:
    """Queue prepared requests; a full or closing queue is a 503 the client retries."""
    try:
        return scheduler.submit(requests, prepared, listener)
    except (QueueFullError, SchedulerClosedError) as err:
        raise refusal(err) from None


@dataclass(frozen=True)
class Delta:
    index: int  # the row's position in `Completion.results`
    text: str


class TextStream:
    """One row's text, released as it becomes final.

    Decodes the whole token list each time (a few hundred tokens, microseconds with a Rust
    tokenizer) rather than a window: only the full decode is guaranteed to agree with the
    non-streamed completion, whatever the tokenizer's decoder does with spaces and bytes.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stop = tuple(s for s in stop if s)
        # A stop string that shows up later ends after the current text, so it can start at
        # most len(longest) - 1 characters back: hold that tail until the next token.
        self._holdback = max((len(s) for s in self._stop), default=1) - 1
        self.token_ids: list[int] = []
        self.sent = ""

    def push(self, token_ids: Sequence[int]) -> str:
        """Add tokens; return the newly final text (maybe "")."""
        self.token_ids.extend(token_ids)
        text = self._decode(self.token_ids)
        end = len(text.rstrip(REPLACEMENT)) - self._holdback
        if self._stop:
            cut = find_stop(text, self._stop)
            if cut is not None:
                end = min(end, cut)
        if end <= len(self.sent) or not text.startswith(self.sent):
            # Nothing new, or the decoder rewrote text already sent (spacing clean-up); the
            # final flush settles it.
            return ""
        delta = text[len(self.sent) : end]
        self.sent += delta
        return delta

    def finish(self, completion: str) -> str:
        """The rest of the row's final completion."""
        if not completion.startswith(self.sent):
            log.warning("streamed text is not a prefix of the completion: %r", self.sent[-40:])
            return ""
        delta = completion[len(self.sent) :]
        self.sent = completion
        return delta


class TokenStreams:
    """The listener of one request: its rows' deltas, then its `Completion`.

    Iterate `deltas(future, timeout_s)` after submitting with `listener=self.on_tokens`; the
    generator's last item is the request's `Completion`. Scheduler errors (closed, engine
    failed) propagate from the future.
    """

    def __init__(
        self, decode: Callable[[Sequence[int]], str], requests: Sequence[GenerationRequest]
    ) -> None:
        self.rows = [TextStream(decode, r.params.stop) for r in requests for _ in range(r.n)]
        self._queue: asyncio.Queue[list[tuple[int, tuple[int, ...]]] | None] = asyncio.Queue()

    def on_tokens(self, updates: list[tuple[int, tuple[int, ...]]]) -> None:
        self._queue.put_nowait(updates)

    async def deltas(
        self, future: asyncio.Future, timeout_s: float
    ) -> AsyncIterator[Delta | Completion]:
        # The scheduler schedules every token update before it resolves the future, so this
        # marker comes after the last update.
        future.add_done_callback(lambda _: self._queue.put_nowait(None))
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                updates = await asyncio.wait_for(
                    self._queue.get(), timeout=max(0.0, deadline - time.monotonic())
                )
            except asyncio.TimeoutError:
                raise RequestTimeoutError(timeout_s) from None
            if updates is None:
                break
            for index, token_ids in updates:
                text = self.rows[index].push(token_ids)
                if text:
                    yield Delta(index, text)
        completion: Completion = future.result()
        for index, (row, result) in enumerate(zip(self.rows, completion.results, strict=True)):
            text = row.finish(result.completion)
            if text:
                yield Delta(index, text)
        yield completion


async def wait_for_completion(
    request: Request, future: asyncio.Future, timeout_s: float
) -> Completion:
    """The request's Completion, unless the client goes away or the timeout passes first.

    The caller cancels the scheduler request when this raises.
    """

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait(
            {future, watcher}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        watcher.cancel()
    if future in done:
        if future.cancelled():  # the scheduler dropped it: only a shutdown does that
            raise SchedulerClosedError("server shut down before the request finished")
        return future.result()
    if watcher in done:
        raise ClientDisconnectedError("client disconnected")
    raise RequestTimeoutError(timeout_s)


async def run_to_completion(
    request: Request,
    scheduler: Scheduler,
    requests: list[GenerationRequest],
    prepared: list[PreparedPrompt],
    timeout_s: float,
) -> Completion:
    """Queue, then the result, the client's disconnect or the timeout, whichever comes first;
    what a request that ended early left queued or running is dropped. Raises `Refused`."""
    request_id, future = submit(scheduler, requests, prepared)
    why = "client_disconnected"
    try:
        return await wait_for_completion(request, future, timeout_s)
    except ClientDisconnectedError as err:
        raise refusal(err) from None
    except (RequestTimeoutError, SchedulerClosedError, EngineFailedError) as err:
        why = "timeout"
        raise refusal(err) from None
    finally:
        close_request(scheduler, request_id, future, why)


def sse_response(
    streams: TokenStreams,
    scheduler: Scheduler,
    request_id: int,
    future: asyncio.Future,
    timeout_s: float,
    render_delta: Callable[[Delta], dict],
    render_result: Callable[[Completion], dict],
    shutdown_grace_s: float = 0.0,
) -> EventSourceResponse:
    """The native routes' stream: `delta` events, then one `result` (or `error`) event.

    A client that goes away cancels the generator; its rows are dropped before the next step.
    On shutdown a stream gets `shutdown_grace_s` to finish, like a request in flight.
    """

    async def events() -> AsyncIterator[dict]:
        why = "client_disconnected"
        try:
            async for item in streams.deltas(future, timeout_s):
                if isinstance(item, Delta):
                    yield {"event": "delta", "data": json.dumps(render_delta(item))}
                else:
                    yield {"event": "result", "data": json.dumps(render_result(item))}
        except (SchedulerClosedError, EngineFailedError, RequestTimeoutError) as err:
            why = "timeout"
            yield {"event": "error", "data": json.dumps({"error": str(err), "detail": None})}
        finally:
            close_request(scheduler, request_id, future, why)

    return EventSourceResponse(events(), shutdown_grace_period=shutdown_grace_s)


def close_request(scheduler: Scheduler, request_id: int, future: asyncio.Future, why: str) -> None:
    """Drop what is left of a request that ended early; `why` is the errors metric's kind."""
    if not future.done():
        scheduler.cancel(request_id)
        scheduler.metrics.errors.labels(kind=why).inc()
