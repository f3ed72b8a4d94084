"""uvicorn, set up for clients that misbehave and for a clean drain on SIGTERM.

uvicorn offers a keep-alive timeout, a concurrency cap and a header size cap, but no deadline
for a request's headers: a connection that sends nothing, or one header byte a second, is held
forever, and enough of them exhaust the file descriptors. `GuardedH11Protocol` adds that
deadline; the body's deadline is `security.RequestBodyMiddleware`'s.
"""

from __future__ import annotations

import asyncio
import logging
import math
import resource
import socket
import time
from dataclasses import dataclass
from typing import Any

import h11
import uvicorn
from starlette.applications import Starlette
from uvicorn.protocols.http.h11_impl import H11Protocol

from batchserve.api.app import drain

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float = 10.0
    timeout_keep_alive_s: float = 5.0
    limit_concurrency: int | None = 512  # uvicorn answers 503 past this many connections
    max_header_bytes: int = 16 * 1024


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing connections that do not complete their request headers
    within `header_timeout_s` (from connecting, or from the previous response on keep-alive)."""

    header_timeout_s: float = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_deadline: asyncio.TimerHandle | None = None
        self._arm_header_deadline()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the headers are in
            self._cancel_header_deadline()

    def on_response_complete(self) -> None:
        # Answered before the body was read (401, 413, 404...): a client still sending it would
        # hold the connection, since uvicorn drops such data unread and its keep-alive timer
        # restarts with every byte. (Checked first: the call below may start a pipelined request.)
        is_body_unread = self.conn.their_state is h11.SEND_BODY
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if is_body_unread:
            self.transport.close()
            return
        self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_deadline()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        self._cancel_header_deadline()
        self._header_deadline = self.loop.call_later(self.header_timeout_s, self._on_deadline)

    def _cancel_header_deadline(self) -> None:
        handle = getattr(self, "_header_deadline", None)
        if handle is not None:
            handle.cancel()
            self._header_deadline = None

    def _on_deadline(self) -> None:
        self._header_deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


class AcceptErrorFilter(logging.Filter):
    """One report per `interval_s` of asyncio's "socket.accept() out of system resource".

    When descriptors run out, asyncio (3.11) retries accept() up to the listen backlog (2048)
    times per wake-up, logging a traceback and arming a retry timer for each failure: measured
    80,000 tracebacks (39 MB) in 20 s under a slowloris attack, which kept the loop from serving
    anyone, and at shutdown each leftover timer logs one more ("_start_serving").
    """

    MESSAGES = (
        "socket.accept() out of system resource",
        "Exception in callback BaseSelectorEventLoop._start_serving",
    )

    def __init__(self, interval_s: float = 10.0) -> None:
        super().__init__()
        self.interval_s = interval_s
        self.last_report = -math.inf
        self.num_suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.MESSAGES):
            return True
        now = time.monotonic()
        if now - self.last_report < self.interval_s:
            self.num_suppressed += 1
            return False
        if self.num_suppressed:
            record.msg = f"{record.msg}\n({self.num_suppressed} more since the last report)"
        self.last_report, self.num_suppressed = now, 0
        return True


def check_can_listen(host: str, port: int) -> None:
    """Bind (and release) the address the server will listen on, so that a port in use is
    said at once: uvicorn binds only after start-up, while the models load, and a 7B pair
    would load for minutes before its 'address already in use'. Binds as asyncio's
    create_server (which uvicorn calls) does: every address the host resolves to, IPv6 ones
    v6-only, skipping a family this kernel lacks. Raises OSError."""
    if port == 0:
        return  # any free port
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    probes = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            try:
                probe = socket.socket(family, kind, proto)
            except OSError:
                continue  # e.g. ::1 on a kernel without IPv6, as create_server skips it
            probes.append(probe)  # held until every address is bound: no false clash
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            probe.bind(address)
    finally:
        for probe in probes:
            probe.close()


def raise_open_files_limit() -> None:
    """Soft descriptor limit up to the hard one (often 1024 of 1M): every connection costs one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as err:
            log.warning("could not raise the open files limit from %s to %s: %s", soft, target, err)


def protocol_class(header_timeout_s: float) -> type[GuardedH11Protocol]:
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"header_timeout_s": header_timeout_s})


class DrainingServer(uvicorn.Server):
    """From the first signal on, answer 503 to new requests while the listener stays open, and
    give in-flight requests `shutdown_timeout_s`; those that cannot finish get a 503 JSON.

    uvicorn alone closes the listener at once (newcomers are refused) and, at its graceful
    timeout, cancels the handlers, which it answers with a text/plain 500.
    """

    def __init__(self, config: uvicorn.Config, app: Starlette, shutdown_timeout_s: float) -> None:
        super().__init__(config)
        self.batchserve_app = app
        self.shutdown_timeout_s = shutdown_timeout_s

    def handle_exit(self, sig: int, frame: Any) -> None:
        state = self.batchserve_app.state
        state.is_draining = True
        if getattr(state, "engine", None) is not None:
            state.engine.drain()
        super().handle_exit(sig, frame)
        # uvicorn re-raises the signal after its graceful shutdown, so the process would die
        # by SIGTERM; a clean drain is a normal exit, status 0.
        captured = getattr(self, "_captured_signals", None)
        if isinstance(captured, list):
            captured.clear()

    async def shutdown(self, sockets: list | None = None) -> None:
        draining = asyncio.ensure_future(drain(self.batchserve_app, self.shutdown_timeout_s))
        while not draining.done() and not self.force_exit:  # a second Ctrl-C quits at once
            await asyncio.wait({draining}, timeout=0.1)
        await super().shutdown(sockets)


def build_server(
    app: Starlette,
    *,
    host: str,
    port: int,
    log_level: str,
    shutdown_timeout_s: float,
    limits: ConnectionLimits,
) -> DrainingServer:
    """Build the server (`server.run()` serves until a signal)."""
    raise_open_files_limit()
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, AcceptErrorFilter) for f in asyncio_log.filters):
        asyncio_log.addFilter(AcceptErrorFilter())
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        http=protocol_class(limits.header_timeout_s),
        # The plain asyncio loop, whatever else is installed: with uvloop (which ray[serve]
        # brings in) libuv sheds connections when descriptors run out, accepting and closing
        # good requests at once instead of queueing them until the header deadline frees some.
        loop="asyncio",
        timeout_keep_alive=limits.timeout_keep_alive_s,  # type: ignore[arg-type]
        limit_concurrency=limits.limit_concurrency,
        h11_max_incomplete_event_size=limits.max_header_bytes,
        # Only handlers still running after our own drain reach this: responses being written,
        # bodies still arriving. The drain already answered every generation request.
        timeout_graceful_shutdown=5,
    )
    return DrainingServer(config, app, shutdown_timeout_s)
