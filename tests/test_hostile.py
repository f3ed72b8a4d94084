"""Hostile input in-process: every bad request is refused at the door, and requests already
running beside it finish exactly as they would alone (issue 14)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import httpx
import pytest
from servers import KEY, asgi_scope, send_beside_innocents, serving

from batchserve.api.app import ServerConfig, create_app
from batchserve.worker.models import ModelPair

NESTED = b"[" * 10_000 + b"]" * 10_000
BAD_BODIES = [
    # (id, raw body, content type, status, words of the error)
    ("top_k_2**63", b'{"prompt": "Name a fruit", "top_k": 9223372036854775808}', 422, "top_k"),
    ("top_k_2**31", b'{"prompt": "Name a fruit", "top_k": 2147483648}', 422, "top_k"),
    ("n_2**63", b'{"prompts": ["a"], "n": 9223372036854775808}', 422, "n"),
    ("max_new_tokens_2**63", b'{"prompt": "a", "max_new_tokens": 9223372036854775808}', 422, "max"),
    ("seed_2**64", b'{"prompt": "a", "seed": 18446744073709551616}', 422, "seed"),
    ("alpha_1e309", b'{"prompt": "a", "alpha": 1e309}', 422, "alpha"),
    ("temperature_1e9", b'{"prompt": "a", "temperature": 1e9}', 422, "temperature"),
    ("nested_10000", NESTED, 400, "nested deeper"),
    (
        "nested_in_a_field",
        b'{"prompt": "a", "seed": ' + b"[" * 40 + b"]" * 40 + b"}",
        400,
        "nested",
    ),
    ("duplicate_key", b'{"prompt": "hi", "prompt": "other"}', 400, "duplicate key 'prompt'"),
    (
        "prompt_over_the_char_bound",
        json.dumps({"prompt": "cat " * 5000}).encode(),
        413,
        "characters",
    ),
]


@pytest.mark.parametrize(
    "raw, status, needle", [c[1:] for c in BAD_BODIES], ids=[c[0] for c in BAD_BODIES]
)
async def test_bad_body_is_refused_and_running_requests_finish_unchanged(
    llama_pair: ModelPair, raw: bytes, status: int, needle: str
) -> None:
    path = "/generate_lda_batch" if b'"prompts"' in raw else "/generate_lda"
    async with serving(llama_pair) as client:
        bad = await send_beside_innocents(
            client,
            lambda: client.post(path, content=raw, headers={"content-type": "application/json"}),
        )
    assert bad.status_code == status, bad.text
    assert needle in bad.json()["error"]


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
async def test_post_without_json_content_type_gets_415(
    llama_pair: ModelPair, content_type: str | None
) -> None:
    """The types a web page can POST without a CORS preflight are refused (no type at all was
    parsed as JSON)."""
    headers = {"content-type": content_type} if content_type else {}
    async with serving(llama_pair) as client:

        def send() -> Any:
            request = client.build_request(
                "POST", "/generate_lda", content=b'{"prompt": "hi"}', headers=headers
            )
            if content_type is None:
                request.headers.pop("content-type", None)
            return client.send(request)

        bad = await send_beside_innocents(client, send)
    assert bad.status_code == 415 and "Content-Type" in bad.json()["error"]


async def test_top_k_at_the_cap_means_no_top_k(llama_pair: ModelPair) -> None:
    body = {"prompt": "the cat", "max_new_tokens": 20, "seed": 3, "temperature": 1.0, "top_p": 1}
    async with serving(llama_pair) as client:
        plain = await client.post("/generate_lda", json=body)
        capped = await client.post("/generate_lda", json=body | {"top_k": 2**31 - 1})
    assert capped.status_code == 200, capped.text
    assert capped.json()["completion"] == plain.json()["completion"]


@pytest.mark.parametrize("path", ["/generate_lda", "/generate_lda_batch", "/generate"])
async def test_a_tiny_temperature_samples_greedily(llama_pair: ModelPair, path: str) -> None:
    body: dict = {"max_new_tokens": 30, "seed": 5, "ignore_eos": True}
    body |= {"prompts": ["tell me a story"]} if path.endswith("batch") else {"prompt": "tell me"}
    if path == "/generate":
        del body["ignore_eos"]
    async with serving(llama_pair) as client:
        greedy = await client.post(path, json=body | {"do_sample": False})
        zero = await client.post(path, json=body | {"temperature": 0.0})
        tiny = await client.post(path, json=body | {"temperature": 1e-45})
    assert tiny.status_code == 200, tiny.text
    assert tiny.json() == greedy.json() == zero.json()


async def test_prompts_are_tokenized_off_the_event_loop(llama_pair: ModelPair) -> None:
    async with serving(llama_pair) as client:
        frontend = client.app.state.frontend  # type: ignore[attr-defined]
        threads = []
        original = frontend.prepare

        def recording_prepare(*args: Any, **kwargs: Any) -> Any:
            threads.append(threading.current_thread())
            return original(*args, **kwargs)

        frontend.prepare = recording_prepare
        resp = await client.post("/generate_lda", json={"prompt": "hi", "max_new_tokens": 2})
    assert resp.status_code == 200
    assert threads and threading.main_thread() not in threads


# --- options and keys from the environment ---------------------------------------------------


def test_serve_reads_the_security_options_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from batchserve.api.cli import build_parser

    monkeypatch.setenv("BATCHSERVE_API_KEY", KEY)
    monkeypatch.setenv("BATCHSERVE_ALLOWED_HOSTS", "a.example, b.example")
    monkeypatch.setenv("BATCHSERVE_HEADER_TIMEOUT_S", "3")
    args = build_parser().parse_args(["serve"])
    assert args.api_key == KEY and args.allowed_hosts == "a.example, b.example"
    assert args.header_timeout_s == 3.0 and args.body_timeout_s == 30.0
    assert args.limit_concurrency == 512 and args.timeout_keep_alive_s == 5.0


def test_sync_client_sends_the_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from batchserve_client import LDAClient

    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        return httpx.Response(200, text="# metrics")

    monkeypatch.setenv("BATCHSERVE_API_KEY", "from-env")
    with LDAClient("http://x", transport=httpx.MockTransport(handler)) as client:
        client.metrics()
    with LDAClient("http://x", transport=httpx.MockTransport(handler), api_key="given") as client:
        client.metrics()
    monkeypatch.delenv("BATCHSERVE_API_KEY")
    with LDAClient("http://x", transport=httpx.MockTransport(handler)) as client:
        client.metrics()
    assert seen == ["Bearer from-env", "Bearer given", None]


def test_asyncio_accept_error_storm_is_logged_once_per_interval() -> None:
    import logging

    from batchserve.api.server import AcceptErrorFilter

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, msg, None, None)

    storm = AcceptErrorFilter(interval_s=60)
    assert storm.filter(record("socket.accept() out of system resource\nsocket: ..."))
    assert not storm.filter(record("socket.accept() out of system resource\nsocket: ..."))
    assert not storm.filter(record("Exception in callback BaseSelectorEventLoop._start_serving"))
    assert storm.filter(record("Task exception was never retrieved"))
    assert storm.num_suppressed == 2


@pytest.mark.parametrize("is_draining", [True, False])
async def test_a_handler_cancelled_at_shutdown_answers_503_json(
    llama_pair: ModelPair, is_draining: bool
) -> None:
    """uvicorn cancels handlers at its graceful timeout or on a forced exit: a text/plain 500
    that clients do not retry, unless the app answers first."""
    app = create_app(ServerConfig(), pair=llama_pair)
    body = json.dumps({"prompt": "go on", "max_new_tokens": 200, "ignore_eos": True}).encode()
    sent: list[dict] = []
    delivered = False

    async def receive() -> dict:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # no disconnect
        raise AssertionError

    async def send(message: dict) -> None:
        sent.append(message)

    async with app.router.lifespan_context(app):
        handler = asyncio.ensure_future(app(asgi_scope([]), receive, send))
        engine = app.state.engine
        deadline = time.monotonic() + 60
        while engine.num_running == 0:
            assert time.monotonic() < deadline, "the request never started running"
            await asyncio.sleep(0.001)
        app.state.is_draining = is_draining
        handler.cancel()
        if is_draining:
            await handler
            start = next(m for m in sent if m["type"] == "http.response.start")
            assert start["status"] == 503 and (b"retry-after", b"5") in start["headers"]
            assert b"shut down" in sent[-1]["body"]
        else:
            with pytest.raises(asyncio.CancelledError):
                await handler
            assert sent == []
