"""`batchserve serve` as a real uvicorn process on 127.0.0.1, driven over the network."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from servers import running_server
from tiny_models import make_tokenizer, save_tiny_pair

from batchserve.api.server import check_can_listen


@pytest.fixture(scope="module")
def pair_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    return save_tiny_pair(tmp_path_factory.mktemp("tiny-pair"))


@pytest.fixture(scope="module")
def server(pair_dirs: tuple[str, str]):
    after, before = pair_dirs
    with running_server(
        ["--after", after, "--before", before, "--log-level", "warning"],
        env={"BATCHSERVE_MAX_BATCH_SIZE": "16", "BATCHSERVE_MAX_WAIT_MS": "5"},
    ) as (url, proc):
        yield url


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.split()[-1])
    return 0.0


def test_environment_variables_configure_the_server(server: str) -> None:
    info = httpx.get(server + "/info").json()
    assert info["scheduler"]["max_batch_size"] == 16
    assert info["scheduler"]["max_wait_ms"] == 5.0
    assert info["device"] == "cpu"


def test_concurrent_clients_over_the_network_get_their_solo_results(server: str) -> None:
    async def run() -> None:
        async with httpx.AsyncClient(base_url=server, timeout=60) as client:
            bodies = [
                {
                    "prompt": "the cat " * (1 + i % 5),
                    "max_new_tokens": 5 + i,
                    "seed": i,
                    "alpha": i / 4,
                    "ignore_eos": True,
                }
                for i in range(12)
            ]
            together = await asyncio.gather(*(client.post("/generate_lda", json=b) for b in bodies))
            for body, resp in zip(bodies, together, strict=True):
                assert resp.status_code == 200
                alone = await client.post("/generate_lda", json=body)
                assert alone.json()["completion"] == resp.json()["completion"]
                assert resp.json()["tokens_generated"] == body["max_new_tokens"]

    asyncio.run(run())


def test_a_client_that_disconnects_frees_its_rows(server: str) -> None:
    cancelled_before = metric(server, "batchserve_rows_cancelled_total")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            server + "/generate_lda_batch",
            json={
                "prompts": ["a long one", "another"],
                "n": 2,
                "max_new_tokens": 1000,
                "ignore_eos": True,
            },
            timeout=0.5,
        )
    deadline = time.monotonic() + 20
    while metric(server, "batchserve_rows_cancelled_total") < cancelled_before + 4:
        assert time.monotonic() < deadline, "rows of the vanished client were not cancelled"
        time.sleep(0.05)
    assert metric(server, "batchserve_running_rows") == 0
    ok = httpx.post(
        server + "/generate_lda", json={"prompt": "still here", "max_new_tokens": 3}, timeout=30
    )
    assert ok.status_code == 200


def test_bad_input_over_the_network_then_a_good_request(server: str) -> None:
    bad = httpx.post(
        server + "/generate_lda", content=b"{oops", headers={"content-type": "application/json"}
    )
    assert bad.status_code == 400 and "malformed JSON" in bad.json()["error"]
    assert (
        httpx.post(server + "/generate_lda", json={"prompt": "ok", "max_new_tokens": 2}).status_code
        == 200
    )


def test_sigterm_lets_in_flight_requests_finish_then_exits_zero(pair_dirs: tuple[str, str]) -> None:
    after, before = pair_dirs
    with running_server(["--after", after, "--before", before, "--shutdown-timeout-s", "30"]) as (
        url,
        proc,
    ):
        result: dict = {}

        def long_request() -> None:
            result["resp"] = httpx.post(
                url + "/generate_lda",
                json={"prompt": "go on", "max_new_tokens": 300, "ignore_eos": True},
                timeout=60,
            )

        worker = threading.Thread(target=long_request)
        worker.start()
        deadline = time.monotonic() + 20
        while metric(url, "batchserve_running_rows") < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        worker.join(timeout=60)
        assert result["resp"].status_code == 200
        assert result["resp"].json()["tokens_generated"] == 300
        assert proc.wait(timeout=30) == 0


def test_a_port_in_use_is_said_before_any_model_loads(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "batchserve.api.cli", "serve", "--port", str(port),
             "--after", str(tmp_path / "no-model-here")],  # would fail if it were loaded
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert proc.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr and "in use" in proc.stderr
    assert "no such folder" not in proc.stderr + proc.stdout


def test_the_listen_check_binds_as_uvicorn_does() -> None:
    assert check_can_listen("127.0.0.1", 0) is None  # any free port
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError):
            check_can_listen("127.0.0.1", port)
        if socket.has_ipv6:  # "::" is v6-only under asyncio, so an IPv4 listener is no clash
            try:
                check_can_listen("::1", 0)
            except OSError:
                return  # no IPv6 on this kernel
            check_can_listen("::", port)


def test_an_incompatible_pair_stops_the_server_with_a_clear_message(
    tmp_path: Path, pair_dirs: tuple[str, str]
) -> None:
    other = tmp_path / "other"
    from tiny_models import llama_model

    llama_model(3).save_pretrained(other)
    make_tokenizer(extra=["zebra"]).save_pretrained(other)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "batchserve.api.cli",
            "serve",
            "--after",
            pair_dirs[0],
            "--before",
            str(other),
            "--port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "do not share a vocabulary" in proc.stderr
    assert "--allow-incompatible" in proc.stderr
