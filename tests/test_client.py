"""LDAClient / AsyncLDAClient against the contract fake: in-process (ASGI) and a uvicorn process."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

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
from batchserve_client.fake_server import FakeServerProcess, FakeState, create_app, free_port
from batchserve_client.models import error_from_response, parse_retry_after_s

FAST_RETRY = RetryPolicy(max_retries=4, backoff_s=0.01, max_backoff_s=0.05)


@pytest.fixture(scope="module")
def fake_process() -> Iterator[FakeServerProcess]:
    with FakeServerProcess() as server:
        yield server


@pytest.fixture
def fake_state() -> FakeState:
    return FakeState()


@pytest.fixture
async def async_client(fake_state: FakeState) -> AsyncLDAClient:
    transport = httpx.ASGITransport(app=create_app(fake_state))
    async with AsyncLDAClient("http://fake", retry=FAST_RETRY, transport=transport) as client:
        yield client


# --- every route, both twins -----------------------------------------------------------------


def test_sync_client_returns_typed_results_for_every_route(fake_process: FakeServerProcess):
    with LDAClient(fake_process.url, retry=FAST_RETRY) as client:
        single = client.generate_lda("mango pudding", alpha=2.0, seed=5, max_new_tokens=20)
        batch = client.generate_lda_batch(["a", "b", "c"], n=2, alpha=1.0, seed=11)
        plain = client.generate("hello", seed=3)
        compat = client.tokenizer_compatibility()
        health = client.health()
        info = client.info()
        metrics = client.metrics()

    assert single.alpha == 2.0 and single.seed == 5 and single.finish_reason in ("length", "eos")
    assert single.text.endswith(single.completion)
    assert [r.prompt for r in batch.results] == ["a", "a", "b", "b", "c", "c"]
    assert batch.batch_size == 6 and len({r.seed for r in batch.results}) == 6
    assert plain.model_1.model_id == "fake/after" and plain.model_2.model_id == "fake/before"
    assert compat.compatible and compat.vocabs_match
    assert health.is_ready and health.status == "ok"
    assert info.device == "cpu" and info.version == "fake"
    assert "batchserve_requests_total" in metrics


async def test_async_client_returns_typed_results_for_every_route(async_client: AsyncLDAClient):
    single = await async_client.generate_lda("mango pudding", alpha=2.0, seed=5)
    batch = await async_client.generate_lda_batch(["a", "b"], alpha=0.0, seed=1)
    plain = await async_client.generate("hello")
    compat = await async_client.tokenizer_compatibility()
    health = await async_client.health()
    info = await async_client.info()
    metrics = await async_client.metrics()

    assert single.model_after == "fake/after" and single.seed == 5
    assert [r.prompt for r in batch.results] == ["a", "b"] and batch.alpha == 0.0
    assert plain.prompt == "hello"
    assert compat.vocab_size_1 == compat.vocab_size_2
    assert health.is_ready
    assert info.models == {"after": "fake/after", "before": "fake/before"}
    assert "batchserve_rows_total 2" in metrics


async def test_sync_and_async_twins_send_identical_requests(fake_process: FakeServerProcess):
    params = {"alpha": 1.5, "seed": 42, "max_new_tokens": 30, "temperature": 1.0, "top_p": 1.0}
    with LDAClient(fake_process.url) as sync_client:
        sync_result = sync_client.generate_lda_batch(["x", "y"], **params)
    async with AsyncLDAClient(fake_process.url) as async_client:
        async_result = await async_client.generate_lda_batch(["x", "y"], **params)
    assert sync_result.model_dump() == async_result.model_dump()


def test_unknown_parameter_raises_before_anything_is_sent():
    with LDAClient("http://127.0.0.1:9") as client, pytest.raises(ValueError, match="temprature"):
        client.generate_lda("hi", temprature=0.5)


# --- retries -----------------------------------------------------------------------------------


async def test_async_client_retries_503_then_succeeds(fake_state: FakeState):
    fake_state.fail_next = 3
    retries: list[tuple[str, str, int]] = []
    transport = httpx.ASGITransport(app=create_app(fake_state))
    async with AsyncLDAClient(
        "http://fake",
        retry=FAST_RETRY,
        transport=transport,
        on_retry=lambda route, reason, delay_s, attempt: retries.append((route, reason, attempt)),
    ) as client:
        result = await client.generate_lda_batch(["a"], alpha=1.0)
    assert len(result.results) == 1
    assert retries == [("/generate_lda_batch", "503", n) for n in (1, 2, 3)]
    assert fake_state.fail_next == 0


def test_sync_client_retries_503_then_succeeds(fake_process: FakeServerProcess):
    fake_process.control(fail_next=2, retry_after="0")
    with LDAClient(fake_process.url, retry=FAST_RETRY) as client:
        result = client.generate_lda("hi", alpha=1.0)
    assert result.prompt == "hi"
    assert fake_process.stats()["fail_next"] == 0


async def test_retry_after_header_sets_the_wait(fake_state: FakeState):
    fake_state.fail_next, fake_state.retry_after = 1, "1"
    transport = httpx.ASGITransport(app=create_app(fake_state))
    async with AsyncLDAClient("http://fake", retry=FAST_RETRY, transport=transport) as client:
        started = time.monotonic()
        await client.generate_lda("hi")
    # FAST_RETRY's own backoff is at most 0.05 s, so a wait of a second came from the header.
    assert time.monotonic() - started >= 0.95


async def test_persistent_503_raises_server_unavailable_with_server_message(
    fake_state: FakeState,
):
    fake_state.fail_next = 100
    transport = httpx.ASGITransport(app=create_app(fake_state))
    policy = RetryPolicy(max_retries=2, backoff_s=0.01)
    async with AsyncLDAClient("http://fake", retry=policy, transport=transport) as client:
        with pytest.raises(ServerUnavailableError, match="queue is full") as info:
            await client.generate_lda("hi")
    assert info.value.status_code == 503
    assert fake_state.num_requests == 3


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


def test_health_probe_is_not_retried_and_reports_loading(fake_process: FakeServerProcess):
    fake_process.control(is_loaded=False)
    try:
        with LDAClient(fake_process.url, retry=FAST_RETRY) as client:
            health = client.health()
            with pytest.raises(ServerUnreachableError, match="not healthy"):
                client.wait_until_healthy(timeout_s=0.2, poll_s=0.05)
    finally:
        fake_process.control(is_loaded=True)
    assert not health.is_ready and health.status_code == 503 and health.status == "loading"


# --- error mapping -------------------------------------------------------------------------------


def _mock_client(status: int, body: object) -> LDAClient:
    transport = httpx.MockTransport(lambda request: httpx.Response(status, json=body))
    return LDAClient("http://mock", retry=FAST_RETRY, transport=transport)


def test_422_raises_invalid_request_carrying_the_server_message():
    body = {"error": "invalid field 'top_p': must be in (0, 1]", "detail": {"field": "top_p"}}
    with _mock_client(422, body) as client, pytest.raises(InvalidRequestError) as info:
        client.generate_lda("hi")
    assert info.value.status_code == 422
    assert info.value.error == body["error"] and info.value.detail == body["detail"]
    assert "top_p" in str(info.value) and "/generate_lda" in str(info.value)


def test_413_from_a_real_server_raises_too_large(fake_process: FakeServerProcess):
    fake_process.control(max_prompts_per_request=2)
    try:
        with LDAClient(fake_process.url) as client, pytest.raises(RequestTooLargeError) as info:
            client.generate_lda_batch(["a", "b", "c"])
    finally:
        fake_process.control(max_prompts_per_request=64)
    assert "too many prompts" in info.value.error


def test_other_4xx_is_not_retried_and_keeps_a_non_json_body():
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
