"""Hostile clients against a real uvicorn process: a huge prompt, slow clients, SIGTERM with
work in flight, and the API key over the network (issue 14)."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import select
import signal
import socket
import threading
import time
from urllib.parse import urlsplit

import httpx
import pytest
from servers import running_server
from tiny_models import save_tiny_pair

from batchserve_client import LDAClient


@pytest.fixture(scope="module")
def pair_args(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    after, before = save_tiny_pair(tmp_path_factory.mktemp("tiny-pair"))
    return ["--after", after, "--before", before, "--log-level", "warning"]


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_health_answers_within_a_second_while_a_maximum_size_prompt_is_refused(
    pair_args: list[str],
) -> None:
    """A 16 MiB prompt was tokenized on the event loop before its length was checked: every
    client, /health included, waited for it."""
    limit = 16 * 1024 * 1024
    body = json.dumps({"prompt": "cat " * ((limit - 64) // 4)}).encode()
    assert limit - 64 < len(body) <= limit
    with running_server(pair_args) as (url, _):
        result: dict = {}

        def send_huge() -> None:
            result["resp"] = httpx.post(
                url + "/generate_lda",
                content=body,
                headers={"content-type": "application/json"},
                timeout=120,
            )

        sender = threading.Thread(target=send_huge)
        sender.start()
        latencies = []
        while sender.is_alive() or len(latencies) < 3:
            started = time.monotonic()
            assert httpx.get(url + "/health", timeout=60).status_code == 200
            latencies.append(time.monotonic() - started)
            time.sleep(0.02)
        sender.join()
    assert max(latencies) < 1.0, latencies
    assert result["resp"].status_code == 413, result["resp"].text
    assert "characters" in result["resp"].json()["error"]


def test_sigterm_answers_503_json_to_unfinished_requests_and_to_newcomers(
    pair_args: list[str],
) -> None:
    """uvicorn cancelled the unfinished handlers into text/plain 500s and closed the listener
    at once, so newcomers were refused instead of told to retry."""
    args = [*pair_args, "--shutdown-timeout-s", "1.5", "--max-batch-size", "1"]
    with running_server(args) as (url, proc):
        responses: list[httpx.Response | None] = [None] * 4

        def long_request(i: int) -> None:
            responses[i] = httpx.post(
                url + "/generate_lda",
                json={"prompt": "go on", "max_new_tokens": 1000, "ignore_eos": True, "seed": i},
                timeout=60,
            )

        threads = [threading.Thread(target=long_request, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while metric(url, "batchserve_queue_rows") < 3:  # one running, three waiting
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        while (health := httpx.get(url + "/health", timeout=10)).status_code == 200:
            assert time.monotonic() < deadline, "SIGTERM did not start the drain"
            time.sleep(0.02)
        assert health.status_code == 503 and health.json()["status"] == "shutting down"
        newcomer = httpx.post(url + "/generate_lda", json={"prompt": "hi"}, timeout=10)
        assert newcomer.status_code == 503
        assert newcomer.json()["error"] == "server is shutting down"
        assert newcomer.headers["retry-after"] == "5"
        for t in threads:
            t.join(timeout=60)
        assert proc.wait(timeout=30) == 0
    unfinished = [r for r in responses if r is not None and r.status_code != 200]
    assert len(unfinished) >= 3, [r.status_code for r in responses if r is not None]
    for resp in unfinished:
        assert resp.status_code == 503, resp.text
        assert resp.headers["content-type"] == "application/json"
        assert "shut down" in resp.json()["error"] and "detail" in resp.json()
        assert resp.headers["retry-after"] == "5"


def _trickle(sockets: list[socket.socket], stop: threading.Event) -> None:
    while not stop.is_set():
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.send(b"x")
        stop.wait(0.3)


def _is_closed_by_peer(sock: socket.socket, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        readable, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
        if not readable:
            return False
        try:
            if sock.recv(65536) == b"":
                return True
        except OSError:
            return True
    return False


def test_slowloris_connections_do_not_starve_normal_requests(pair_args: list[str]) -> None:
    """Connections that sent nothing, or a byte at a time, were held forever; under a
    descriptor limit they kept good requests from ever being accepted."""
    args = [*pair_args, "--header-timeout-s", "1", "--body-timeout-s", "1"]
    with running_server(args) as (url, proc):
        address = urlsplit(url)
        open_fds = len(os.listdir(f"/proc/{proc.pid}/fd"))
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (open_fds + 20, hard))
        attackers = []
        for i in range(60):
            sock = socket.create_connection((address.hostname, address.port))
            if i % 3 == 1:  # headers, one byte at a time
                sock.send(b"POST /generate_lda HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            elif i % 3 == 2:  # complete headers, then the body one byte at a time
                sock.send(
                    b"POST /generate_lda HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
                )
            attackers.append(sock)  # i % 3 == 0: connects and says nothing
        stop = threading.Event()
        trickler = threading.Thread(target=_trickle, args=(attackers[1::3] + attackers[2::3], stop))
        trickler.start()
        try:
            started = time.monotonic()
            for i in range(3):
                resp = httpx.post(
                    url + "/generate_lda",
                    json={"prompt": "still served", "max_new_tokens": 5, "seed": i},
                    timeout=httpx.Timeout(30, connect=30),
                )
                assert resp.status_code == 200, resp.text
            assert time.monotonic() - started < 20
            assert all(_is_closed_by_peer(sock, timeout_s=15) for sock in attackers)
        finally:
            stop.set()
            trickler.join()
            for sock in attackers:
                sock.close()


def test_a_keyed_server_serves_the_bundled_client_with_its_key(pair_args: list[str]) -> None:
    with running_server(pair_args, env={"BATCHSERVE_API_KEY": "k3y"}) as (url, _):
        refused = httpx.post(url + "/generate_lda", json={"prompt": "hi"})
        assert refused.status_code == 401
        with LDAClient(url, api_key="k3y") as client:
            assert client.generate_lda("hi", max_new_tokens=3, seed=1).tokens_generated <= 3
            assert client.health().is_ready
