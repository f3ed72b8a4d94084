"""Servers for tests: `batchserve serve` as a real process on 127.0.0.1, or the app in-process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
from httpx_sse import aconnect_sse
from starlette.applications import Starlette

from batchserve.api.app import ServerConfig, create_app
from batchserve.api.server import ConnectionLimits, build_server
from batchserve.core.scheduler import SchedulerConfig
from batchserve.worker.models import ModelPair

KEY = "s3cret-key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_server(
    args: list[str], timeout_s: float = 120.0, env: dict | None = None, log_path: str | None = None
) -> Iterator[tuple[str, subprocess.Popen]]:
    """`batchserve serve ARGS` on a free port until healthy; its output goes to `log_path`
    where given (to read once it has exited), else to a temporary file."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "batchserve.api.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *args,
    ]
    # A file, not a pipe: nobody reads a pipe while the server runs, and a full one blocks it.
    # Closed in the finally below.
    log = open(log_path, "w+") if log_path else tempfile.TemporaryFile(mode="w+")  # noqa: SIM115
    proc = subprocess.Popen(
        cmd,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read()}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not become healthy in time")
            time.sleep(0.1)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def make_app(pair: ModelPair | HeldLoad, **config: Any) -> Starlette:
    """The real app over `pair`; over a `HeldLoad`, an app whose models are still loading."""
    config.setdefault("scheduler", SchedulerConfig(max_batch_size=16, max_wait_ms=1))
    if isinstance(pair, HeldLoad):
        return create_app(ServerConfig(**config), load_pair=pair)
    return create_app(ServerConfig(**config), pair=pair)


class HeldLoad:
    """A model load that waits for `release()`: until then the app answers 503 (loading) on
    /health and on every route that needs the models, as a server does while it starts."""

    def __init__(self, pair: ModelPair) -> None:
        self.pair = pair
        self._go = threading.Event()
        self._is_cancelled = False

    def __call__(self) -> ModelPair:
        self._go.wait(timeout=120)
        if self._is_cancelled or not self._go.is_set():
            raise RuntimeError("the test ended before releasing the load")
        return self.pair

    def release(self) -> None:
        self._go.set()

    def cancel(self) -> None:
        self._is_cancelled = True
        self._go.set()

    def __enter__(self) -> HeldLoad:
        return self

    def __exit__(self, *exc_info: object) -> None:
        # Inside the app's lifespan: the app then stops without waiting for a load.
        self.cancel()


@contextmanager
def uvicorn_thread(app: Starlette, timeout_s: float = 60.0) -> Iterator[str]:
    """`app` under the server's own uvicorn set-up (batchserve.api.server), in a thread on a
    free 127.0.0.1 port: real sockets, for the blocking client and for clients run in their
    own event loop or process. Yields the base URL."""
    port = free_port()
    server = build_server(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        shutdown_timeout_s=5.0,
        limits=ConnectionLimits(),
    )
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout_s
        while not server.started:
            assert thread.is_alive(), "uvicorn exited while starting"
            assert time.monotonic() < deadline, "uvicorn did not start in time"
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextlib.asynccontextmanager
async def client_of(
    app: Starlette, base_url: str = "http://localhost"
) -> AsyncIterator[httpx.AsyncClient]:
    """`app` with its lifespan running, and an httpx client that calls it in-process (the
    app is the client's `.app`)."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=base_url, timeout=60) as client:
            client.app = app  # type: ignore[attr-defined]
            yield client


async def stream_events(client: httpx.AsyncClient, path: str, body: dict) -> list:
    """POST `body` with `"stream": true`; the SSE events as (event, parsed data) pairs."""
    async with aconnect_sse(client, "POST", path, json=body | {"stream": True}) as source:
        assert source.response.status_code == 200
        assert source.response.headers["content-type"].startswith("text/event-stream")
        return [(e.event, json.loads(e.data)) async for e in source.aiter_sse()]


@contextlib.asynccontextmanager
async def serving(
    pair: ModelPair, base_url: str = "http://localhost", **config: Any
) -> AsyncIterator[httpx.AsyncClient]:
    async with client_of(make_app(pair, **config), base_url) as client:
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


async def send_beside_innocents(
    client: httpx.AsyncClient, send_bad: Any, headers: dict | None = None
) -> httpx.Response:
    """Send a bad request while the innocents run; assert they come out as they do alone."""
    innocent_headers = headers or {}
    alone = [
        (await client.post(path, json=body, headers=innocent_headers)).json()
        for path, body in INNOCENTS
    ]
    engine = client.app.state.engine  # type: ignore[attr-defined]
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


def asgi_scope(headers: list[tuple[bytes, bytes]]) -> dict:
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
