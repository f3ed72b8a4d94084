"""Request/response models and error mapping shared by `LDAClient` and `AsyncLDAClient`.

Both clients build requests and read responses only through this module, so the sync and async
twins cannot drift apart (the httpx `Client`/`AsyncClient` pattern). Request models forbid
unknown fields, so a typo in a parameter fails here instead of being silently ignored by the
server; response models allow extra fields, so a newer server does not break an older client.
"""

from __future__ import annotations

import email.utils
import random
import time
from dataclasses import dataclass
from typing import Any

import httpx

# ---------------------------------------------------------------------------------------------
# Requests and responses: the server's own wire contract (batchserve.schemas, no torch), so the
# two sides cannot drift. The request names keep the client's historical spelling.
from batchserve.schemas import (  # noqa: E402 - grouped with the section it serves
    GenerateLDABatchRequest as LDABatchRequest,
)
from batchserve.schemas import GenerateLDARequest as LDARequest  # noqa: E402
from batchserve.schemas import (  # noqa: E402
    GenerateRequest,
    GenerateResponse,
    Health,
    Info,
    LDABatchResponse,
    LDABatchResult,
    LDAResponse,
    ModelOutput,
    RowLogprobs,
    TokenizerCompatibility,
)
from batchserve.schemas import LDAFields as SamplingParams  # noqa: E402

__all__ = [
    "GenerateRequest",
    "GenerateResponse",
    "Health",
    "Info",
    "LDABatchRequest",
    "LDABatchResponse",
    "LDABatchResult",
    "LDARequest",
    "LDAResponse",
    "ModelOutput",
    "RowLogprobs",
    "SamplingParams",
    "TokenizerCompatibility",
]


# ---------------------------------------------------------------------------------------------
# Errors


class LDAClientError(Exception):
    """Base class of everything the client raises."""


class ServerError(LDAClientError):
    """The server answered with an error status; carries its JSON `error` and `detail`."""

    def __init__(self, status_code: int, error: str, detail: Any = None, route: str = "") -> None:
        self.status_code = status_code
        self.error = error
        self.detail = detail
        self.route = route
        where = f" from {route}" if route else ""
        extra = f" ({detail})" if detail not in (None, "", error) else ""
        super().__init__(f"HTTP {status_code}{where}: {error}{extra}")


class AuthenticationError(ServerError):
    """401: the server wants an API key (api_key=, or BATCHSERVE_API_KEY) and got none or
    another one."""


class InvalidRequestError(ServerError):
    """422: a field is invalid; the message names it."""


class RequestTooLargeError(ServerError):
    """413: too many prompts, or prompt + max_new_tokens beyond the models' context."""


class ServerUnavailableError(ServerError):
    """503 still answered after every retry: queue full or models not loaded."""


class ServerUnreachableError(LDAClientError):
    """The connection failed (refused, reset, dropped mid-response) after every retry."""


class RequestTimeoutError(LDAClientError):
    """No answer within the read timeout. Not retried: the server may still be working on it,
    and a retry would add the same load again."""


_ERROR_CLASSES: dict[int, type[ServerError]] = {
    401: AuthenticationError,
    422: InvalidRequestError,
    413: RequestTooLargeError,
    503: ServerUnavailableError,
}


def error_from_response(response: httpx.Response, route: str = "") -> ServerError:
    """Turn an error response into the matching exception, keeping the server's message."""
    error: str = response.reason_phrase or f"HTTP {response.status_code}"
    detail: Any = None
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        error = str(body.get("error") or body.get("detail") or error)
        detail = body.get("detail") if "error" in body else None
    elif response.text:
        detail = response.text[:500]
    cls = _ERROR_CLASSES.get(response.status_code, ServerError)
    return cls(response.status_code, error, detail, route)


# ---------------------------------------------------------------------------------------------
# Retry policy (pure: both clients ask it how long to sleep, then sleep their own way)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to wait before retrying.

    Retried: connection failures (the server restarting or not up yet) and 503 (queue full,
    models loading), both transient by contract. Generation requests are safe to repeat: they
    have no side effects, and a seeded request gives the same answer again.
    """

    max_retries: int = 5
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    # A server's Retry-After is obeyed up to this cap, so a bogus header cannot stall a run.
    max_retry_after_s: float = 120.0

    def backoff_delay_s(self, attempt: int) -> float:
        """Exponential backoff with full jitter, so many clients do not retry in lockstep."""
        ceiling = min(self.max_backoff_s, self.backoff_s * (2**attempt))
        return random.uniform(ceiling / 2, ceiling)

    def delay_for_503_s(self, response: httpx.Response, attempt: int) -> float:
        retry_after = parse_retry_after_s(response.headers.get("retry-after"))
        if retry_after is None:
            return self.backoff_delay_s(attempt)
        return min(retry_after, self.max_retry_after_s)


def parse_retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds; it may be delta-seconds or an HTTP date (RFC 9110 10.2.3)."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def is_retryable_exception(exc: Exception) -> bool:
    """Transport failures worth retrying; a read timeout is not (see RequestTimeoutError)."""
    return isinstance(exc, httpx.TransportError) and not isinstance(
        exc, httpx.ReadTimeout | httpx.WriteTimeout | httpx.PoolTimeout
    )


def exception_for_transport_error(exc: Exception, url: str, attempts: int) -> LDAClientError:
    if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
        return RequestTimeoutError(f"no answer from {url} within the timeout ({exc!r})")
    return ServerUnreachableError(
        f"cannot reach the server at {url} after {attempts} attempt(s): {exc!r}"
    )
