"""LDAClient / AsyncLDAClient against the real app on the tiny pair: in-process (ASGI) for the
async twin, under the server's own uvicorn set-up on 127.0.0.1 for the blocking one.

503s come from the server itself: an app whose models are still loading (`HeldLoad`) answers
503 with Retry-After on /health and every generation route, as a starting server does.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from servers import HeldLoad, free_port, make_app, uvicorn_thread
from starlette.applications import Starlette

from batchserve.worker.models import ModelPair
from batchserve_client import (
    AsyncLDAClient,
    InvalidRequestError,
    LDAClient,
    RequestTooLargeError,
    RetryPolicy,
    ServerError,
    ServerUnavailableError,
    ServerUnreachableError,
)
from batchserve_client.models import error_from_response, parse_retry_after_s

# Retry-After from a loading server is 5 s; the cap keeps these tests fast.
FAST_RETRY = RetryPolicy(max_retries=4, backoff_s=0.01, max_backoff_s=0.05, max_retry_after_s=0.05)
PATIENT_RETRY = RetryPolicy(
    max_retries=400, backoff_s=0.01, max_backoff_s=0.05, max_retry_after_s=0.05
)
AFTER, BEFORE = "tiny-llama-after", "tiny-llama-before"


class StopRetrying(Exception):
    """Raised from an on_retry hook: ends the call at its first retry, without the sleep."""


@pytest.fixture(scope="module")
def live_url(llama_pair: ModelPair) -> Iterator[str]:
    with uvicorn_thread(make_app(llama_pair)) as url:
        yield url


@pytest.fixture
def held_load(llama_pair: ModelPair) -> Iterator[HeldLoad]:
    load = HeldLoad(llama_pair)
    yield load
    load.cancel()


@contextlib.asynccontextmanager
async def bundled_client(app: Starlette, **options: Any) -> AsyncIterator[AsyncLDAClient]:
    """The bundled async client over `app` in-process, with the app's lifespan running."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with AsyncLDAClient("http://localhost", transport=transport, **options) as client:
            yield client


@pytest.fixture
async def asgi_transport(llama_pair: ModelPair) -> AsyncIterator[httpx.ASGITransport]:
    app = make_app(llama_pair)
    async with app.router.lifespan_context(app):
        yield httpx.ASGITransport(app=app)


def metric(text: str, name: str, **labels: str) -> float:
    """One sample of a Prometheus text exposition (0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
        if match and ",".join(sorted((match.group(1) or "").split(","))) == wanted:
            return float(match.group(2))
    return 0.0


# --- every route, both twins -----------------------------------------------------------------


def test_sync_client_returns_typed_results_for_every_route(live_url: str):
    with LDAClient(live_url, retry=FAST_RETRY) as client:
        single = client.generate_lda("the cat sat", alpha=2.0, seed=5, max_new_tokens=6)
        batch = client.generate_lda_batch(
            ["the cat", "a dog", "hello world"], n=2, alpha=1.0, seed=11, max_new_tokens=4
        )
        plain = client.generate("hello", seed=3, max_new_tokens=4)
        compat = client.tokenizer_compatibility()
        health = client.health()
        info = client.info()
        metrics = client.metrics()

    assert single.alpha == 2.0 and single.seed == 5 and single.finish_reason in ("length", "eos")
    assert single.text.endswith(single.completion) and 1 <= single.tokens_generated <= 6
    assert (single.model_after, single.model_before) == (AFTER, BEFORE)
    assert [r.prompt for r in batch.results] == ["the cat"] * 2 + ["a dog"] * 2 + [
        "hello world"
    ] * 2
    assert batch.n == 2 and len({r.seed for r in batch.results}) == 6
    assert (plain.model_1.model_id, plain.model_2.model_id) == (AFTER, BEFORE)
    assert compat.compatible and compat.vocabs_match and compat.vocab_size_1 == compat.vocab_size_2
    assert health.is_ready and health.status == "ok"
    assert info.models == {"after": AFTER, "before": BEFORE, "kind": "full", "lora": None}
    assert info.device == "cpu"
    assert metric(metrics, "batchserve_requests_total", route="/generate_lda", status="200") >= 1


async def test_async_client_returns_typed_results_for_every_route(
    asgi_transport: httpx.ASGITransport,
):
    async with AsyncLDAClient(
        "http://localhost", retry=FAST_RETRY, transport=asgi_transport
    ) as client:
        single = await client.generate_lda("the cat sat", alpha=2.0, seed=5, max_new_tokens=6)
        batch = await client.generate_lda_batch(["a", "b"], alpha=0.0, seed=1, max_new_tokens=4)
        plain = await client.generate("hello", max_new_tokens=4)
        compat = await client.tokenizer_compatibility()
        health = await client.health()
        info = await client.info()
        metrics = await client.metrics()

    assert single.model_after == AFTER and single.seed == 5
    assert [r.prompt for r in batch.results] == ["a", "b"] and batch.alpha == 0.0
    assert all(r.tokens_generated <= 4 for r in batch.results)
    assert plain.prompt == "hello" and plain.model_2.model_id == BEFORE
    assert compat.vocab_size_1 == compat.vocab_size_2
    assert health.is_ready
    assert info.models == {"after": AFTER, "before": BEFORE, "kind": "full", "lora": None}
    assert (
        metric(metrics, "batchserve_requests_total", route="/generate_lda_batch", status="200") == 1
    )


async def test_sync_and_async_twins_send_identical_requests(live_url: str):
    params = {"alpha": 1.5, "seed": 42, "max_new_tokens": 6, "temperature": 1.0, "top_p": 1.0}
    with LDAClient(live_url) as sync_client:
        sync_result = sync_client.generate_lda_batch(["the cat", "a dog"], **params)
    async with AsyncLDAClient(live_url) as async_client:
        async_result = await async_client.generate_lda_batch(["the cat", "a dog"], **params)
    assert sync_result.model_dump() == async_result.model_dump()


def test_unknown_parameter_raises_before_anything_is_sent():
    with LDAClient("http://127.0.0.1:9") as client, pytest.raises(ValueError, match="temprature"):
        client.generate_lda("hi", temprature=0.5)


# --- retries -----------------------------------------------------------------------------------


async def test_async_client_retries_503_then_succeeds(held_load: HeldLoad):
    retries: list[tuple[str, str, int]] = []

    def on_retry(route: str, reason: str, delay_s: float, attempt: int) -> None:
        retries.append((route, reason, attempt))
        if attempt == 3:
            held_load.release()  # the models finish loading; the server starts answering

    app = make_app(held_load)
    async with bundled_client(app, retry=PATIENT_RETRY, on_retry=on_retry) as client:
        result = await client.generate_lda_batch(["the cat"], alpha=1.0, max_new_tokens=3)
    assert [r.prompt for r in result.results] == ["the cat"]
    assert retries[:3] == [("/generate_lda_batch", "503", n) for n in (1, 2, 3)]
    assert {reason for _, reason, _ in retries} == {"503"}


def test_sync_client_retries_503_then_succeeds(held_load: HeldLoad):
    retries: list[int] = []

    def on_retry(route: str, reason: str, delay_s: float, attempt: int) -> None:
        assert (route, reason) == ("/generate_lda", "503")
        retries.append(attempt)
        if attempt == 2:
            held_load.release()

    with (
        uvicorn_thread(make_app(held_load)) as url,
        LDAClient(url, retry=PATIENT_RETRY, on_retry=on_retry) as client,
    ):
        result = client.generate_lda("hi", alpha=1.0, max_new_tokens=3)
    assert result.prompt == "hi" and result.model_after == AFTER
    assert retries[:2] == [1, 2]


@pytest.mark.parametrize(("cap_s", "expected_s"), [(120.0, 5.0), (1.0, 1.0)])
async def test_retry_after_header_sets_the_wait_up_to_the_cap(
    held_load: HeldLoad, cap_s: float, expected_s: float
):
    delays: list[float] = []

    def on_retry(route: str, reason: str, delay_s: float, attempt: int) -> None:
        delays.append(delay_s)
        raise StopRetrying

    # The backoff alone is at most 0.05 s, so a wait of seconds came from the server's
    # Retry-After (5 s while loading), capped by max_retry_after_s.
    policy = RetryPolicy(max_retries=3, backoff_s=0.01, max_backoff_s=0.05, max_retry_after_s=cap_s)
    app = make_app(held_load)
    async with bundled_client(app, retry=policy, on_retry=on_retry) as client:
        with held_load, pytest.raises(StopRetrying):
            await client.generate_lda("hi")
    assert delays == [expected_s]


async def test_persistent_503_raises_server_unavailable_with_server_message(held_load: HeldLoad):
    app = make_app(held_load)
    policy = RetryPolicy(max_retries=2, backoff_s=0.01, max_retry_after_s=0.01)
    async with bundled_client(app, retry=policy) as client:
        with held_load, pytest.raises(ServerUnavailableError, match="still loading") as info:
            await client.generate_lda("hi")
        metrics = await client.metrics()
    assert info.value.status_code == 503
    # The first try and two retries reached the server.
    assert metric(metrics, "batchserve_requests_total", route="/generate_lda", status="503") == 3


def test_refused_connection_is_retried_then_raises_unreachable():
    attempts: list[int] = []
    client = LDAClient(
        f"http://127.0.0.1:{free_port()}",
        retry=RetryPolicy(max_retries=2, backoff_s=0.01),
        on_retry=lambda *args: attempts.append(args[3]),
    )
    with client, pytest.raises(ServerUnreachableError, match="after 3 attempt"):
        client.generate_lda("hi")
    assert attempts == [1, 2]


def test_health_probe_is_not_retried_and_reports_loading(held_load: HeldLoad):
    retries: list[int] = []
    with (
        uvicorn_thread(make_app(held_load)) as url,
        held_load,
        LDAClient(url, retry=FAST_RETRY, on_retry=lambda *args: retries.append(args[3])) as client,
    ):
        health = client.health()
        with pytest.raises(ServerUnreachableError, match="not healthy"):
            client.wait_until_healthy(timeout_s=0.2, poll_s=0.05)
    assert not health.is_ready and health.status_code == 503 and health.status == "loading"
    assert retries == []


# --- error mapping -------------------------------------------------------------------------------


def test_422_raises_invalid_request_carrying_the_server_message(live_url: str):
    with (
        LDAClient(live_url, retry=FAST_RETRY) as client,
        pytest.raises(InvalidRequestError) as info,
    ):
        client.generate_lda("hi", max_new_tokens=10**6)  # valid JSON, above the server's limit
    assert info.value.status_code == 422 and info.value.route == "/generate_lda"
    assert "max_new_tokens" in info.value.error and "limit" in info.value.error
    assert [problem["field"] for problem in info.value.detail] == ["max_new_tokens"]
    assert "max_new_tokens" in str(info.value) and "/generate_lda" in str(info.value)


async def test_413_from_the_server_raises_too_large(llama_pair: ModelPair):
    app = make_app(llama_pair, max_prompts_per_request=2)
    async with bundled_client(app) as client:
        with pytest.raises(RequestTooLargeError) as info:
            await client.generate_lda_batch(["a", "b", "c"])
    assert info.value.status_code == 413 and "too many prompts" in info.value.error


def test_other_4xx_is_not_retried_and_keeps_a_non_json_body():
    # What a proxy in front of the server may send: the server itself always answers JSON.
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(404, text="no such route")

    client = LDAClient("http://mock", retry=FAST_RETRY, transport=httpx.MockTransport(handler))
    with client, pytest.raises(ServerError, match="no such route") as info:
        client.tokenizer_compatibility()
    assert info.value.status_code == 404 and len(calls) == 1


def test_error_body_with_only_detail_uses_it_as_the_message():
    response = httpx.Response(400, json={"detail": "bad things"})
    error = error_from_response(response, "/x")
    assert error.error == "bad things" and error.status_code == 400


@pytest.mark.parametrize(
    ("header", "expected"),
    [("3", 3.0), ("0", 0.0), (" 1.5 ", 1.5), ("-2", 0.0), ("", None), (None, None), ("soon", None)],
)
def test_retry_after_parses_delta_seconds(header: str | None, expected: float | None):
    assert parse_retry_after_s(header) == expected


def test_retry_after_parses_an_http_date():
    now = 1_700_000_000.0
    header = "Tue, 14 Nov 2023 22:13:30 GMT"  # now + 10 s
    assert parse_retry_after_s(header, now=now) == pytest.approx(10.0)


def test_wait_until_healthy_returns_once_the_models_load(held_load: HeldLoad):
    with uvicorn_thread(make_app(held_load)) as url, LDAClient(url) as client:
        assert not client.health().is_ready
        started = time.monotonic()
        held_load.release()
        ready = client.wait_until_healthy(timeout_s=30, poll_s=0.05)
    assert ready.is_ready and ready.status == "ok" and time.monotonic() - started < 30
