"""`LDAClient` and `AsyncLDAClient`: thin httpx twins over the batchserve HTTP API.

The two share everything but the transport call and the sleep: each route is described once as
a `_Call` (method, path, body, response model), the retry decisions come from one `_Attempts`
state machine, and errors are mapped by `batchserve_client.models`. So a fix to either client's behaviour
is made in one place.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import httpx
from pydantic import BaseModel

from batchserve_client.models import (
    GenerateRequest,
    GenerateResponse,
    Health,
    Info,
    LDABatchRequest,
    LDABatchResponse,
    LDAClientError,
    LDARequest,
    LDAResponse,
    RetryPolicy,
    ServerUnreachableError,
    TokenizerCompatibility,
    error_from_response,
    exception_for_transport_error,
    is_retryable_exception,
)

DEFAULT_SERVER = "http://127.0.0.1:8000"
API_KEY_ENV = "BATCHSERVE_API_KEY"

ModelT = TypeVar("ModelT", bound=BaseModel)

# Called before each retry sleep with (route, reason, delay_s, attempt): lets a progress bar say
# "server busy" instead of looking stuck.
RetryHook = Callable[[str, str, float, int], None]


@dataclass(frozen=True)
class _Call(Generic[ModelT]):
    method: str
    path: str
    response_model: type[ModelT] | None
    body: dict[str, Any] | None = None
    is_retried: bool = True


def _lda_call(prompt: str, params: dict[str, Any]) -> _Call[LDAResponse]:
    body = LDARequest(prompt=prompt, **params).model_dump(exclude_defaults=True)
    return _Call("POST", "/generate_lda", LDAResponse, body)


def _lda_batch_call(prompts: list[str], params: dict[str, Any]) -> _Call[LDABatchResponse]:
    body = LDABatchRequest(prompts=list(prompts), **params).model_dump(exclude_defaults=True)
    return _Call("POST", "/generate_lda_batch", LDABatchResponse, body)


def _generate_call(prompt: str, params: dict[str, Any]) -> _Call[GenerateResponse]:
    body = GenerateRequest(prompt=prompt, **params).model_dump(exclude_defaults=True)
    return _Call("POST", "/generate", GenerateResponse, body)


_TOKENIZER_CALL = _Call("GET", "/tokenizer_compatibility", TokenizerCompatibility)
_INFO_CALL = _Call("GET", "/info", Info)
_METRICS_CALL: _Call[Any] = _Call("GET", "/metrics", None)
_HEALTH_CALL: _Call[Any] = _Call("GET", "/health", None, is_retried=False)


def _parse(call: _Call[ModelT], response: httpx.Response) -> ModelT:
    if not response.is_success:
        raise error_from_response(response, call.path)
    assert call.response_model is not None
    try:
        return call.response_model.model_validate(response.json())
    except ValueError as exc:
        raise LDAClientError(
            f"{call.path} returned a body that does not match the contract: {exc}"
        ) from exc


def _parse_text(call: _Call[Any], response: httpx.Response) -> str:
    if not response.is_success:
        raise error_from_response(response, call.path)
    return response.text


def _parse_health(response: httpx.Response) -> Health:
    try:
        body = response.json()
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    status = body.get("status") or ("ok" if response.is_success else "unavailable")
    extra = {k: v for k, v in body.items() if k not in ("status", "status_code")}
    return Health(status=str(status), status_code=response.status_code, **extra)


class _Attempts:
    """Sans-IO retry loop: says whether to retry and how long to wait; the caller sleeps."""

    def __init__(self, policy: RetryPolicy, call: _Call[Any], url: str, hook: RetryHook | None):
        self.policy = policy
        self.call = call
        self.url = url
        self.hook = hook
        self.attempt = 0

    def _retry(self, reason: str, delay_s: float) -> float:
        if self.hook is not None:
            self.hook(self.call.path, reason, delay_s, self.attempt + 1)
        self.attempt += 1
        return delay_s

    def after_exception(self, exc: Exception) -> float:
        """Delay before the next try, or raise the error the caller should see."""
        can_retry = self.call.is_retried and self.attempt < self.policy.max_retries
        if can_retry and is_retryable_exception(exc):
            return self._retry(type(exc).__name__, self.policy.backoff_delay_s(self.attempt))
        if isinstance(exc, httpx.TransportError):
            raise exception_for_transport_error(exc, self.url, self.attempt + 1) from exc
        raise exc

    def after_response(self, response: httpx.Response) -> float | None:
        """Delay before the next try, or None when this response is the answer."""
        can_retry = self.call.is_retried and self.attempt < self.policy.max_retries
        if response.status_code == 503 and can_retry:
            return self._retry("503", self.policy.delay_for_503_s(response, self.attempt))
        return None

    def decide(self, outcome: httpx.Response | Exception) -> httpx.Response | float:
        """The response that answers the call, or the delay before the next try (or raise)."""
        if isinstance(outcome, Exception):
            return self.after_exception(outcome)
        delay_s = self.after_response(outcome)
        return outcome if delay_s is None else delay_s


class _HealthWait:
    """Sans-IO /health polling: the ready answer, None to poll again, or raise past the deadline."""

    def __init__(self, base_url: str, timeout_s: float) -> None:
        self.base_url = base_url
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s

    def decide(self, probe: Health | ServerUnreachableError) -> Health | None:
        if isinstance(probe, Health) and probe.is_ready:
            return probe
        if time.monotonic() >= self.deadline:
            raise ServerUnreachableError(
                f"{self.base_url} not healthy after {self.timeout_s:g} s (last: {probe})"
            )
        return None


class _ClientBase:
    """Settings, request building and response reading shared by the twins: each subclass adds
    only its httpx client, the awaited or blocking transport call and the sleep."""

    def __init__(
        self,
        base_url: str = DEFAULT_SERVER,
        *,
        timeout_s: float = 600.0,
        connect_timeout_s: float = 10.0,
        retry: RetryPolicy | None = None,
        on_retry: RetryHook | None = None,
        transport: Any = None,
        api_key: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        # The server's --api-key; the same environment variable configures both sides.
        api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # Generation of a large batch at 150 tokens can take minutes on a busy server, so the
        # read timeout is long; the connect timeout stays short so a dead server fails fast.
        self.timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s)
        self.retry = retry or RetryPolicy()
        self.on_retry = on_retry
        self._http = self._open(transport)

    def _open(self, transport: Any) -> Any:
        raise NotImplementedError

    def _http_options(self, transport: Any) -> dict[str, Any]:
        return {
            "base_url": self.base_url,
            "timeout": self.timeout,
            "transport": transport,
            "headers": self.headers,
        }

    def _attempts(self, call: _Call[Any]) -> _Attempts:
        return _Attempts(self.retry, call, self.base_url + call.path, self.on_retry)


class LDAClient(_ClientBase):
    """Blocking client. Use as a context manager, or call `close()`.

    `api_key` (default: $BATCHSERVE_API_KEY) is sent as a Bearer token, for a server started
    with --api-key. Generation methods take the request fields of DESIGN.md as keyword arguments (alpha,
    max_new_tokens, temperature, top_p, seed, ignore_eos, ...); unknown names raise at once.
    `transport` is an `httpx.BaseTransport` (tests pass a mock).
    """

    def _open(self, transport: httpx.BaseTransport | None) -> httpx.Client:
        return httpx.Client(**self._http_options(transport))

    def __enter__(self) -> LDAClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _try(self, call: _Call[Any]) -> httpx.Response | Exception:
        try:
            return self._http.request(call.method, call.path, json=call.body)
        except Exception as exc:
            return exc

    def _send(self, call: _Call[Any]) -> httpx.Response:
        attempts = self._attempts(call)
        while not isinstance(step := attempts.decide(self._try(call)), httpx.Response):
            time.sleep(step)
        return step

    def _call(self, call: _Call[ModelT]) -> ModelT:
        return _parse(call, self._send(call))

    def generate_lda(self, prompt: str, **params: Any) -> LDAResponse:
        return self._call(_lda_call(prompt, params))

    def generate_lda_batch(self, prompts: list[str], **params: Any) -> LDABatchResponse:
        return self._call(_lda_batch_call(prompts, params))

    def generate(self, prompt: str, **params: Any) -> GenerateResponse:
        return self._call(_generate_call(prompt, params))

    def tokenizer_compatibility(self) -> TokenizerCompatibility:
        return self._call(_TOKENIZER_CALL)

    def info(self) -> Info:
        return self._call(_INFO_CALL)

    def metrics(self) -> str:
        return _parse_text(_METRICS_CALL, self._send(_METRICS_CALL))

    def health(self) -> Health:
        """One probe, no retries: 503 (still loading) is an answer, not an error."""
        return _parse_health(self._send(_HEALTH_CALL))

    def _probe(self) -> Health | ServerUnreachableError:
        try:
            return self.health()
        except ServerUnreachableError as exc:
            return exc

    def wait_until_healthy(self, timeout_s: float = 60.0, poll_s: float = 0.5) -> Health:
        """Poll /health until the models are loaded; raise ServerUnreachableError on timeout."""
        wait = _HealthWait(self.base_url, timeout_s)
        while (ready := wait.decide(self._probe())) is None:
            time.sleep(poll_s)
        return ready


class AsyncLDAClient(_ClientBase):
    """The asyncio twin of `LDAClient`: same options and methods, awaited; `transport` is an
    `httpx.AsyncBaseTransport`, and `max_connections` bounds the connection pool."""

    def __init__(
        self, base_url: str = DEFAULT_SERVER, *, max_connections: int = 100, **options: Any
    ) -> None:
        self.max_connections = max_connections
        super().__init__(base_url, **options)

    def _open(self, transport: httpx.AsyncBaseTransport | None) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=self.max_connections)
        return httpx.AsyncClient(limits=limits, **self._http_options(transport))

    async def __aenter__(self) -> AsyncLDAClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _try(self, call: _Call[Any]) -> httpx.Response | Exception:
        try:
            return await self._http.request(call.method, call.path, json=call.body)
        except Exception as exc:
            return exc

    async def _send(self, call: _Call[Any]) -> httpx.Response:
        attempts = self._attempts(call)
        while not isinstance(step := attempts.decide(await self._try(call)), httpx.Response):
            await asyncio.sleep(step)
        return step

    async def _call(self, call: _Call[ModelT]) -> ModelT:
        return _parse(call, await self._send(call))

    async def generate_lda(self, prompt: str, **params: Any) -> LDAResponse:
        return await self._call(_lda_call(prompt, params))

    async def generate_lda_batch(self, prompts: list[str], **params: Any) -> LDABatchResponse:
        return await self._call(_lda_batch_call(prompts, params))

    async def generate(self, prompt: str, **params: Any) -> GenerateResponse:
        return await self._call(_generate_call(prompt, params))

    async def tokenizer_compatibility(self) -> TokenizerCompatibility:
        return await self._call(_TOKENIZER_CALL)

    async def info(self) -> Info:
        return await self._call(_INFO_CALL)

    async def metrics(self) -> str:
        return _parse_text(_METRICS_CALL, await self._send(_METRICS_CALL))

    async def health(self) -> Health:
        """One probe, no retries: 503 (still loading) is an answer, not an error."""
        return _parse_health(await self._send(_HEALTH_CALL))

    async def _probe(self) -> Health | ServerUnreachableError:
        try:
            return await self.health()
        except ServerUnreachableError as exc:
            return exc

    async def wait_until_healthy(self, timeout_s: float = 60.0, poll_s: float = 0.5) -> Health:
        """Poll /health until the models are loaded; raise ServerUnreachableError on timeout."""
        wait = _HealthWait(self.base_url, timeout_s)
        while (ready := wait.decide(await self._probe())) is None:
            await asyncio.sleep(poll_s)
        return ready
