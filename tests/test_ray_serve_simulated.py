"""Ray Serve replicas of the simulated runner (`serve --ray --simulate`): streams through Serve's
proxy, and a replica killed under load. The cluster set-up is test_ray_serve.py's; replicas
here load no weights, and each step waits 20 ms without the CPU, as on a device.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import openai
import pytest
from httpx_sse import aconnect_sse
from servers import stream_events
from test_ray_serve import _wait_for_replicas, ray_address, two_replicas  # noqa: F401

from batchserve.worker.simulated import SimulatedCost, SimulatedRunner, load_simulated_pair
from bench.replicas import kill_replica_with_fresh_requests

pytestmark = [pytest.mark.ray, pytest.mark.slow]

COST = "20,0.05"


@pytest.fixture(scope="module")
def simulated_endpoint(ray_address: str) -> Iterator[tuple[str, subprocess.Popen]]:  # noqa: F811
    with two_replicas(ray_address, "--simulate", COST, "--max-batch-size", "16") as (url, proc):
        yield url, proc


@pytest.fixture(scope="module")
def endpoint(simulated_endpoint: tuple[str, subprocess.Popen]) -> str:
    return simulated_endpoint[0]


@pytest.fixture(scope="module")
def tokens() -> SimulatedRunner:
    """The tokens every replica draws: a function of (seed, step) alone."""
    return SimulatedRunner.for_pair(load_simulated_pair("toy"), SimulatedCost.parse(COST))


def test_info_says_the_replicas_simulate(endpoint: str):
    info = httpx.get(endpoint + "/info", timeout=30).json()
    assert info["engine"]["runner"] == "simulated" and info["device"] == "meta"
    assert info["replica_id"]


async def test_native_stream_arrives_token_by_token_through_the_proxy(
    endpoint: str, tokens: SimulatedRunner
):
    """40 tokens at 20 ms a step: the deltas arrive over ~0.8 s, not in one burst at the end."""
    body = {"prompt": "Stream through Ray.", "max_new_tokens": 40, "seed": 5, "logprobs": True}
    async with httpx.AsyncClient(base_url=endpoint, timeout=60) as client:
        plain = (await client.post("/generate_lda", json=body)).json()
        events: list[tuple[float, str, dict]] = []
        async with aconnect_sse(
            client, "POST", "/generate_lda", json=body | {"stream": True}
        ) as source:
            assert source.response.headers["content-type"].startswith("text/event-stream")
            assert source.response.headers["x-batchserve-replica"]
            async for event in source.aiter_sse():
                events.append((time.perf_counter(), event.event, json.loads(event.data)))
    assert events[-1][1:] == ("result", plain)
    deltas = [(t, d["text"]) for t, kind, d in events if kind == "delta"]
    assert "".join(text for _, text in deltas) == plain["completion"]
    assert plain["logprobs"]["token_ids"] == [tokens.token(5, step) for step in range(40)]
    assert len(deltas) >= 10
    assert deltas[-1][0] - deltas[0][0] > 0.4  # spread over the steps: the proxy streams


async def test_batch_stream_through_the_proxy_carries_every_row(endpoint: str):
    body = {"prompts": ["one", "two"], "n": 2, "max_new_tokens": 12, "seed": 3}
    async with httpx.AsyncClient(base_url=endpoint, timeout=60) as client:
        plain = (await client.post("/generate_lda_batch", json=body)).json()
        events = await stream_events(client, "/generate_lda_batch", body)
    assert events[-1] == ("result", plain)
    joined: dict[int, str] = {}
    for kind, data in events[:-1]:
        assert kind == "delta"
        joined[data["index"]] = joined.get(data["index"], "") + data["text"]
    assert joined == {i: r["completion"] for i, r in enumerate(plain["results"])}


@pytest.mark.parametrize("route", ["completions", "chat"])
def test_v1_streams_through_the_proxy_match_the_unstreamed_answer(endpoint: str, route: str):
    client = openai.OpenAI(base_url=endpoint + "/v1", api_key="unused", max_retries=0)
    if route == "completions":
        call = client.completions.create
        fields: dict = {"prompt": "Once upon a time"}
    else:
        call = client.chat.completions.create
        fields = {"messages": [{"role": "user", "content": "Tell me a story."}]}
    fields |= {"model": "toy:after", "max_tokens": 16, "n": 2, "seed": 11}
    whole = call(**fields)
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    for chunk in call(**fields, stream=True):
        for choice in chunk.choices:
            piece = choice.text if route == "completions" else (choice.delta.content or "")
            texts[choice.index] = texts.get(choice.index, "") + piece
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    expected = {
        c.index: (c.text if route == "completions" else c.message.content) for c in whole.choices
    }
    assert texts == expected and finish == {0: "length", 1: "length"}


def test_a_replica_killed_under_load_loses_no_request(endpoint: str, tokens: SimulatedRunner):
    """32 clients of the bundled client send 160 requests; the busiest replica is killed while
    it holds accepted requests. Each of them comes back as 503 + Retry-After (the proxy hook),
    the client retries it to the live replica, and every request ends answered, with the
    tokens its seed gives wherever it ran."""

    from batchserve_client.api import AsyncLDAClient
    from batchserve_client.models import RetryPolicy

    retries: Counter[str] = Counter()
    num_requests = 160
    answers: dict[int, list[int]] = {}
    kill: dict[str, int] = {}

    def on_retry(route: str, reason: str, delay_s: float, attempt: int) -> None:
        retries[reason] += 1

    async def run() -> None:
        policy = RetryPolicy(max_retries=10, backoff_s=0.5, max_backoff_s=4.0)
        async with AsyncLDAClient(endpoint, retry=policy, on_retry=on_retry) as client:
            queue = iter(range(num_requests))

            async def worker() -> None:
                for i in queue:
                    out = await client.generate_lda(
                        f"request {i}", max_new_tokens=40, seed=1000 + i, logprobs=True
                    )
                    answers[i] = out.logprobs.token_ids

            async def killer() -> None:
                deadline = time.monotonic() + 60
                while len(answers) < 16:
                    assert time.monotonic() < deadline, "no answers in 60 s"
                    await asyncio.sleep(0.05)
                _, kill["ongoing"] = await asyncio.to_thread(
                    kill_replica_with_fresh_requests,
                    4,
                    is_running=lambda: len(answers) < num_requests,
                )

            await asyncio.gather(killer(), *(worker() for _ in range(32)))

    asyncio.run(run())
    assert kill["ongoing"] >= 4
    assert sorted(answers) == list(range(num_requests))  # every request answered
    assert retries["503"] >= 1, retries  # the killed replica's requests, retried
    assert set(retries) <= {"503", "ConnectError", "RemoteProtocolError", "ReadError"}, retries
    for i, token_ids in answers.items():
        assert token_ids == [tokens.token(1000 + i, step) for step in range(40)]
    _wait_for_replicas(2)  # Serve replaced the killed one
