"""ASGI middleware that guards every route: Host names, the API key, Content-Type, body size
and body read time.

Middleware rather than per-route checks, so routes added later are covered too. Refusals are
answered here, before a route runs; the body limits are enforced while the route reads.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import re
import time
from collections.abc import Sequence

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from batchserve.api.responses import route_error

LOOPBACK_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1", "::1", "[::1]")
# Routes served without the API key: the readiness probe (container healthchecks carry no
# key) and the playground page at "/", a static page that asks the user for the key itself.
PUBLIC_PATHS: frozenset[str] = frozenset({"/health", "/"})
JSON_MEDIA_TYPE = "application/json"
METHODS_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})


def is_loopback(host: str) -> bool:
    if host.strip("[]") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def default_allowed_hosts(bind_host: str) -> tuple[str, ...]:
    """Loopback names plus the bound address (unless it is a wildcard such as 0.0.0.0).

    A Host check stops DNS rebinding: a web page whose name resolves to 127.0.0.1 still sends
    its own name as Host, so a browser cannot reach a loopback server through it.
    """
    extra = () if bind_host in ("", "0.0.0.0", "::", "*") else (bind_host,)
    if ":" in bind_host and not bind_host.startswith("["):
        extra += (f"[{bind_host}]",)
    return tuple(dict.fromkeys(LOOPBACK_HOSTS + extra))


def parse_allowed_hosts(value: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """`a.example,b.example` (or a list) to a tuple; None or empty means the default."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    hosts = tuple(h.strip() for h in items if h.strip())
    return hosts or None


def _announces_body(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return True
    return False


def _unread_body_headers(scope: Scope, headers: dict | None = None) -> dict | None:
    """Headers of a refusal answered without reading the body: `Connection: close` whenever a
    body is announced. The server ends such a connection after the response (an unread body
    cannot be told from the next request; server.GuardedH11Protocol), and a keep-alive client
    that is not told so sends its next request into the closed socket."""
    if not _announces_body(scope):
        return headers
    return {**(headers or {}), "Connection": "close"}


class HTTPMiddleware:
    """Pure ASGI middleware that acts on HTTP requests only: lifespan and websocket scopes pass
    through untouched. A subclass implements `handle` for the HTTP ones."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.handle(scope, receive, send)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        raise NotImplementedError


# A Host header: a name or an IPv4 address, or a bracketed IPv6 address, and an optional port.
_HOST_HEADER = re.compile(
    r"(?P<name>\[[0-9a-f:.]+\]|[^\[\]:/?#@\s]+)(?::[0-9]{1,5})?", flags=re.IGNORECASE
)


def _host_header(scope: Scope) -> str | None:
    return next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), None)


class AllowedHostsMiddleware(HTTPMiddleware):
    """The Host header must name this server: stops DNS rebinding (see default_allowed_hosts).

    `*` allows any name, `*.example.com` any subdomain. Starlette's TrustedHostMiddleware
    does the same check but answers text/plain; this one answers the API's JSON error.
    """

    def __init__(self, app: ASGIApp, allowed_hosts: Sequence[str]) -> None:
        super().__init__(app)
        for pattern in allowed_hosts:
            is_bad_wildcard = "*" in pattern[1:] or (pattern[:1] == "*" and pattern[:2] != "*.")
            if is_bad_wildcard and pattern != "*":
                raise ValueError(f"allowed host {pattern!r}: a wildcard must be '*.example.com'")
        self.allowed_hosts = tuple(pattern.lower() for pattern in allowed_hosts)
        self.allow_any = "*" in self.allowed_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and not self.is_allowed(_host_header(scope)):
            await send({"type": "websocket.close", "code": 1008})  # policy violation
            return
        await super().__call__(scope, receive, send)

    def is_allowed(self, host_header: str | None) -> bool:
        if self.allow_any:
            return True
        match = _HOST_HEADER.fullmatch(host_header.strip()) if host_header else None
        if match is None:
            return False
        name = match["name"].lower()
        return any(
            name == pattern or (pattern.startswith("*.") and name.endswith(pattern[1:]))
            for pattern in self.allowed_hosts
        )

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        host = _host_header(scope)
        if self.is_allowed(host):
            await self.app(scope, receive, send)
            return
        shown = repr(host) if host else "missing"
        response = route_error(
            scope["path"],
            400,
            f"Host header {shown} is not a name this server answers to",
            "the server's --allowed-hosts (BATCHSERVE_ALLOWED_HOSTS) lists the names it accepts",
            _unread_body_headers(scope),
        )
        await response(scope, receive, send)


class ApiKeyMiddleware(HTTPMiddleware):
    """`Authorization: Bearer <key>` on every route but PUBLIC_PATHS, as vLLM's --api-key."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        if not api_key:
            raise ValueError("an empty API key would let everyone in")
        super().__init__(app)
        self.expected = api_key.encode()

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] in PUBLIC_PATHS and scope["method"] in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        token = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() != b"bearer":
                    token = b""
                break
        # Constant-time: the comparison's duration must not say how much of a guess was right.
        if not hmac.compare_digest(token.strip(), self.expected):
            response = route_error(
                scope["path"],
                401,
                "missing or invalid API key",
                "send the header 'Authorization: Bearer <key>' (the server's --api-key)",
                _unread_body_headers(scope, {"WWW-Authenticate": "Bearer"}),
                code="invalid_api_key",
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class _BodyRefusedError(Exception):
    def __init__(self, status: int, error: str) -> None:
        super().__init__(error)
        self.status, self.error = status, error


class RequestBodyMiddleware(HTTPMiddleware):
    """JSON only, at most `max_body_bytes`, read within `body_timeout_s`.

    A POST must say `Content-Type: application/json`: the types a web page may send without a
    CORS preflight (text/plain, forms) are refused, so a page cannot drive the API from a
    browser. Content-Length beyond the limit is refused before reading; a body without one is
    counted chunk by chunk and refused as soon as it passes the limit, so a huge upload costs
    at most the limit in memory. The read deadline stops a client that trickles its body.
    These refusals close the connection, since the rest of the body is never read.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int, body_timeout_s: float) -> None:
        super().__init__(app)
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {name: value for name, value in scope["headers"]}
        if scope["method"] in METHODS_WITH_BODY:
            content_type = headers.get(b"content-type", b"").decode("latin-1")
            media_type = content_type.split(";")[0].strip().lower()
            if media_type != JSON_MEDIA_TYPE and not media_type.endswith("+json"):
                shown = repr(media_type) if media_type else "none"
                await route_error(
                    scope["path"],
                    415,
                    f"Content-Type must be application/json, not {shown} "
                    "(with curl: -H 'Content-Type: application/json')",
                    None,
                    _unread_body_headers(scope),
                )(scope, receive, send)
                return
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                declared_bytes = int(declared)
            except ValueError:
                await route_error(
                    scope["path"], 400, "invalid Content-Length", None, {"Connection": "close"}
                )(scope, receive, send)
                return
            if declared_bytes > self.max_body_bytes:
                await self._refuse(scope, receive, send, self._too_large(declared_bytes))
                return

        deadline = time.monotonic() + self.body_timeout_s
        state = {"received": 0, "is_complete": False, "response_started": False}

        async def guarded_receive() -> Message:
            if state["is_complete"]:
                return await receive()  # the body is in: now only waiting for a disconnect
            remaining = deadline - time.monotonic()
            try:
                message = await asyncio.wait_for(receive(), timeout=max(remaining, 0.001))
            except asyncio.TimeoutError:
                raise _BodyRefusedError(
                    408, f"request body not received within {self.body_timeout_s:g} s"
                ) from None
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.max_body_bytes:
                    raise self._too_large(None)
                state["is_complete"] = not message.get("more_body", False)
            else:
                state["is_complete"] = True
            return message

        async def watched_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["response_started"] = True
            await send(message)

        try:
            await self.app(scope, guarded_receive, watched_send)
        except _BodyRefusedError as err:
            if state["response_started"]:
                raise
            await self._refuse(scope, receive, send, err)

    def _too_large(self, declared_bytes: int | None) -> _BodyRefusedError:
        size = f"of {declared_bytes} bytes " if declared_bytes is not None else ""
        return _BodyRefusedError(
            413, f"request body {size}exceeds this server's limit of {self.max_body_bytes} bytes"
        )

    async def _refuse(
        self, scope: Scope, receive: Receive, send: Send, err: _BodyRefusedError
    ) -> None:
        await route_error(scope["path"], err.status, err.error, None, {"Connection": "close"})(
            scope, receive, send
        )


class ShutdownCancelMiddleware(HTTPMiddleware):
    """A handler cancelled while the server shuts down answers the documented 503 JSON.

    uvicorn cancels the handlers still running at its graceful-shutdown timeout, or at once on
    a forced exit (a second Ctrl-C), and answers them with a text/plain 500, which clients do
    not retry. Cancellations outside a shutdown propagate untouched.
    """

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        is_started = False

        async def watched_send(message: Message) -> None:
            nonlocal is_started
            is_started = is_started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        except asyncio.CancelledError:
            app = scope.get("app")
            if is_started or not getattr(getattr(app, "state", None), "is_draining", False):
                raise
            await route_error(
                scope["path"],
                503,
                "server shut down before the request finished",
                None,
                {"Retry-After": "5", "Connection": "close"},
            )(scope, receive, send)


def guard_middleware(
    *,
    api_key: str | None,
    allowed_hosts: Sequence[str],
    max_body_bytes: int,
    body_timeout_s: float,
) -> list[Middleware]:
    """Outermost first: a wrong Host, then a missing key, are refused before anything is read;
    a handler cancelled at shutdown still answers 503 JSON."""
    stack = [
        Middleware(ShutdownCancelMiddleware),
        Middleware(AllowedHostsMiddleware, allowed_hosts=tuple(allowed_hosts)),
    ]
    if api_key:
        stack.append(Middleware(ApiKeyMiddleware, api_key=api_key))
    stack.append(
        Middleware(
            RequestBodyMiddleware, max_body_bytes=max_body_bytes, body_timeout_s=body_timeout_s
        )
    )
    return stack


def startup_warnings(host: str, api_key: str | None, allowed_hosts: Sequence[str]) -> list[str]:
    warnings = []
    if not api_key and not is_loopback(host):
        warnings.append(
            f"binding {host} without an API key: anyone who can reach this address can use "
            "the models; set --api-key (or BATCHSERVE_API_KEY)"
        )
    if not is_loopback(host) and all(is_loopback(h) for h in allowed_hosts):
        warnings.append(
            f"binding {host}, but only loopback Host names are accepted; clients reaching the "
            "server by another name get 400: widen with --allowed-hosts"
        )
    return warnings
