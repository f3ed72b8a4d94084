"""`"stream": true` (SSE) and `stop` on the native routes: in-process and over the network."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from httpx_sse import aconnect_sse, connect_sse
from servers import client_of, running_server, stream_events
from tiny_models import build_byte_pair

from batchserve.api.app import ServerConfig, create_app
from batchserve.api.streaming import MAX_PENDING_DELTAS, Completion, Job, LoopInbox
from batchserve.core.scheduler import SchedulerConfig
from batchserve.core.types import GenerationRequest, SamplingParams
from batchserve.engine import EngineFailedError
from batchserve.frontend import Delta, RequestOutput
from batchserve.schemas import ErrorResponse
from batchserve.worker.models import ModelPair, load_pair
from batchserve.worker.simulated import SimulatedCost, load_simulated_pair


@pytest.fixture(scope="module")
def toy_pair() -> ModelPair:
    return load_pair("toy")


@pytest.fixture(scope="module")
def byte_pair() -> ModelPair:
    return build_byte_pair()


@contextlib.asynccontextmanager
async def serving(pair: ModelPair, **scheduler: object) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(ServerConfig(scheduler=SchedulerConfig(**scheduler)), pair=pair)
    async with client_of(app) as client:
        yield client


def joined(events: list, index: int = 0) -> str:
    return "".join(d["text"] for e, d in events if e == "delta" and d["index"] == index)


# --- in-process: the stream joins to the non-streamed completion --------------------------


@pytest.mark.parametrize("pair_name", ["toy_pair", "byte_pair"])
@pytest.mark.parametrize("stop", [None, ["."], [" the", "\n"]])
async def test_streamed_deltas_join_to_the_non_streamed_completion(
    pair_name: str, stop: list[str] | None, request: pytest.FixtureRequest
) -> None:
    pair = request.getfixturevalue(pair_name)
    async with serving(pair) as client:
        for seed in range(3):
            body = {"prompt": "Tell me about é and 🎉", "max_new_tokens": 40, "seed": seed}
            if stop:
                body["stop"] = stop
            plain = (await client.post("/generate_lda", json=body)).json()
            events = await stream_events(client, "/generate_lda", body)
            assert [e for e, _ in events].count("result") == 1 and events[-1][0] == "result"
            assert events[-1][1] == plain  # the final event carries every non-streamed field
            assert joined(events) == plain["completion"]
            if plain["tokens_generated"] > 8:  # a longer row arrives in several pieces
                assert sum(e == "delta" for e, _ in events) > 1
            assert not any("\ufffd" in d["text"] for e, d in events if e == "delta") or (
                "\ufffd" in plain["completion"]
            )
            if stop and plain["finish_reason"] == "stop":
                assert not any(s in plain["completion"] for s in stop)


async def test_byte_pair_streams_multibyte_characters_whole(byte_pair: ModelPair) -> None:
    """A random model over bytes emits valid multi-byte characters now and then; each one
    must arrive whole in a single delta."""
    async with serving(byte_pair) as client:
        completions = []
        for seed in range(6):
            body = {"prompt": "é", "max_new_tokens": 60, "seed": seed, "ignore_eos": True}
            events = await stream_events(client, "/generate_lda", body)
            completion = events[-1][1]["completion"]
            assert joined(events) == completion
            completions.append(completion)
            for _, delta in events[:-1]:
                encoded = delta["text"].encode("utf-8", "surrogatepass")
                assert encoded.decode("utf-8") == delta["text"]
        assert any(ord(c) > 127 and c != "\ufffd" for c in "".join(completions))


async def test_batch_and_plain_routes_stream_every_row(toy_pair: ModelPair) -> None:
    async with serving(toy_pair) as client:
        body = {"prompts": ["Write a poem", "Tell me a story"], "n": 2, "max_new_tokens": 20}
        body |= {"seed": 11, "stop": "."}
        plain = (await client.post("/generate_lda_batch", json=body)).json()
        events = await stream_events(client, "/generate_lda_batch", body)
        assert events[-1] == ("result", plain)
        for index, row in enumerate(plain["results"]):
            assert joined(events, index) == row["completion"]
            assert "." not in row["completion"]

        body = {"prompt": "Write a poem", "max_new_tokens": 20, "seed": 4}
        plain = (await client.post("/generate", json=body)).json()
        events = await stream_events(client, "/generate", body)
        assert events[-1] == ("result", plain)
        for index, key in enumerate(("model_1", "model_2")):
            assert {d["model"] for e, d in events if e == "delta" and d["index"] == index} == {key}
            assert joined(events, index) == plain[key]["completion"]


async def test_stop_works_on_every_route(toy_pair: ModelPair) -> None:
    async with serving(toy_pair) as client:
        base = {"max_new_tokens": 40, "seed": 3, "stop": [" ", "\n"], "ignore_eos": True}
        one = (await client.post("/generate_lda", json=base | {"prompt": "Write a poem"})).json()
        assert one["finish_reason"] == "stop" and " " not in one["completion"]
        batch = (
            await client.post("/generate_lda_batch", json=base | {"prompts": ["a", "b"]})
        ).json()
        assert all(r["finish_reason"] == "stop" for r in batch["results"])
        del base["ignore_eos"]
        plain = (await client.post("/generate", json=base | {"prompt": "Write a poem"})).json()
        assert " " not in plain["model_1"]["completion"] + plain["model_2"]["completion"]
        bad = await client.post("/generate_lda", json={"prompt": "x", "stop": [""]})
        assert bad.status_code == 422 and "stop" in bad.json()["error"]


async def test_a_stream_request_rejected_up_front_gets_a_json_error(toy_pair: ModelPair) -> None:
    async with serving(toy_pair) as client:
        resp = await client.post(
            "/generate_lda", json={"prompt": "x", "stream": True, "max_new_tokens": 10**6}
        )
        assert resp.status_code == 422 and resp.headers["content-type"] == "application/json"
        assert "max_new_tokens" in resp.json()["error"]


# --- over the network ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_server() -> Iterator[str]:
    with running_server(["--log-level", "warning"]) as (url, _):
        yield url


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_100_concurrent_streams_on_the_toy_pair_all_complete(toy_server: str) -> None:
    async def one(client: httpx.AsyncClient, i: int) -> tuple[str, dict]:
        body = {"prompt": f"Tell me story {i}", "max_new_tokens": 24, "seed": i, "stream": True}
        async with aconnect_sse(client, "POST", "/generate_lda", json=body) as source:
            events = [(e.event, json.loads(e.data)) async for e in source.aiter_sse()]
        assert events[-1][0] == "result"
        return joined(events), events[-1][1]

    async def run() -> None:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=toy_server, timeout=120, limits=limits) as client:
            done = await asyncio.gather(*(one(client, i) for i in range(100)))
        for text, result in done:
            assert text == result["completion"]
            assert result["finish_reason"] in ("length", "eos")

    asyncio.run(run())


def test_a_client_that_leaves_mid_stream_frees_its_row(toy_server: str) -> None:
    cancelled = metric(toy_server, "batchserve_rows_cancelled_total")
    body = {"prompt": "go on", "max_new_tokens": 400, "ignore_eos": True, "stream": True}
    with (
        httpx.Client(base_url=toy_server, timeout=60) as client,
        connect_sse(client, "POST", "/generate_lda", json=body) as source,
    ):
        first = next(source.iter_sse())
        assert first.event == "delta"
    deadline = time.monotonic() + 20
    while metric(toy_server, "batchserve_rows_cancelled_total") < cancelled + 1:
        assert time.monotonic() < deadline, "the row of the client that left was not cancelled"
        time.sleep(0.05)
    assert metric(toy_server, "batchserve_running_rows") == 0


def test_sigterm_lets_a_stream_in_flight_finish() -> None:
    with running_server(["--log-level", "warning", "--shutdown-timeout-s", "30"]) as (url, proc):
        body = {"prompt": "go on", "max_new_tokens": 300, "ignore_eos": True, "stream": True}
        with (
            httpx.Client(base_url=url, timeout=60) as client,
            connect_sse(client, "POST", "/generate_lda", json=body) as source,
        ):
            events = source.iter_sse()
            assert next(events).event == "delta"
            proc.send_signal(signal.SIGTERM)
            rest = [(e.event, json.loads(e.data)) for e in events]
        assert rest[-1][0] == "result" and rest[-1][1]["tokens_generated"] == 300
        assert proc.wait(timeout=30) == 0


async def test_a_stream_past_the_request_timeout_ends_with_an_error_event(
    toy_pair: ModelPair,
) -> None:
    config = ServerConfig(request_timeout_s=0.2)
    async with client_of(create_app(config, pair=toy_pair)) as c:
        body = {"prompt": "go on", "max_new_tokens": 400, "ignore_eos": True}
        events = await stream_events(c, "/generate_lda", body)
        assert events[-1][0] == "error" and "timed out" in events[-1][1]["error"]
        seen = await cancelled_rows_counted(c)
        assert seen["batchserve_rows_cancelled_total"] == 1
        assert c.app.state.engine.num_running == 0


# --- the battery's findings: shutdown, slow readers, cancelled rows' tokens ----------------------


def test_streams_cut_by_a_short_shutdown_end_with_an_error_event(tmp_path: Path) -> None:
    """sse-starlette cut streams at the same deadline as the drain: some ended with deltas
    only, and their jobs' failures were logged as "Future exception was never retrieved".
    Steps of 2 s make it certain here: the drain (1 s) then waits for the step in flight,
    so the failure reaches the streams after sse-starlette's own cut would have come."""
    log_path = tmp_path / "server.log"
    args = ["--simulate", "2000,0", "--shutdown-timeout-s", "1", "--log-level", "warning"]
    streams = {
        "/generate_lda_batch": {"prompts": ["go on", "and on"], "max_new_tokens": 400},
        "/v1/completions": {"model": "toy:after", "prompt": "go on", "max_tokens": 400},
    }
    events: dict[str, list[tuple[str, str]]] = {path: [] for path in streams}
    first_seen = {path: threading.Event() for path in streams}

    def read(url: str, path: str) -> None:
        body = streams[path] | {"stream": True}
        with (
            httpx.Client(base_url=url, timeout=60) as client,
            connect_sse(client, "POST", path, json=body) as source,
        ):
            for event in source.iter_sse():
                events[path].append((event.event, event.data))
                first_seen[path].set()

    with running_server(args, log_path=str(log_path)) as (url, proc):
        readers = [threading.Thread(target=read, args=(url, p)) for p in streams]
        for reader in readers:
            reader.start()
        for path, seen in first_seen.items():
            assert seen.wait(30), f"{path} streamed nothing"
        proc.send_signal(signal.SIGTERM)
        for reader in readers:
            reader.join(timeout=60)
        assert proc.wait(timeout=60) == 0
    native = events["/generate_lda_batch"]
    assert native[0][0] == "delta" and native[-1][0] == "error", native[-3:]
    assert "shut down" in ErrorResponse.model_validate_json(native[-1][1]).error
    openai = [data for _, data in events["/v1/completions"]]
    assert openai[-1] == "[DONE]" and "shut down" in json.loads(openai[-2])["error"]["message"]
    log = log_path.read_text()
    assert "never retrieved" not in log and "Traceback" not in log, log


@pytest.fixture(scope="module")
def meta_pair() -> ModelPair:
    return load_simulated_pair("toy")


@contextlib.asynccontextmanager
async def simulated_app(pair: ModelPair, cost: SimulatedCost, **config: object) -> AsyncIterator:
    app = create_app(ServerConfig(simulate=cost, **config), pair=pair)
    async with app.router.lifespan_context(app):
        yield app


def submit_job(app, prompt: str, n: int = 1, **params: object) -> Job:
    """A stream's job on the app's engine, as the SSE routes submit it (no HTTP)."""
    frontend = app.state.frontend
    request = GenerationRequest(prompt, SamplingParams(ignore_eos=True, **params), n=n)
    return Job(app.state.engine, frontend, [request], [frontend.prepare(request)], is_stream=True)


async def test_a_job_failed_while_nobody_reads_it_logs_nothing(
    meta_pair: ModelPair, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="asyncio")
    async with simulated_app(meta_pair, SimulatedCost(50, 0)) as app:  # running at shutdown
        job = submit_job(app, "go on", max_new_tokens=400)
        await asyncio.to_thread(app.state.engine.shutdown, 0.0)
        deadline = time.monotonic() + 10
        while not job.future.done():  # failed by the shutdown; no reader ever asks why
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        await asyncio.sleep(0)  # the future's done callbacks run
        del job
        gc.collect()
    assert "never retrieved" not in caplog.text


async def test_a_slow_reader_gets_merged_deltas_not_one_event_per_token(
    meta_pair: ModelPair,
) -> None:
    """The job queues what its reader has not taken; past MAX_PENDING_DELTAS the queue merges
    into one delta per row, so a reader that lags costs the server at most its rows' text."""
    async with simulated_app(meta_pair, SimulatedCost(0, 0)) as app:
        job = submit_job(app, "go on", n=3, max_new_tokens=450, seed=5)
        completion = await asyncio.wait_for(asyncio.shield(job.future), 120)  # nothing read yet
        items = [item async for item in job.deltas(10)]
    *deltas, last = items
    assert isinstance(last, Completion) and all(isinstance(d, Delta) for d in deltas)
    assert sum(r.tokens_generated for r in completion.results) == 3 * 450 > 2 * MAX_PENDING_DELTAS
    assert len(deltas) <= MAX_PENDING_DELTAS + 3
    for index, result in enumerate(completion.results):
        assert "".join(d.text for d in deltas if d.index == index) == result.completion
        assert len(result.completion) > 450  # every token added text: nothing was lost


def metrics_of(text: str) -> dict[str, float]:
    return {
        line.split()[0]: float(line.split()[-1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


async def cancelled_rows_counted(client: httpx.AsyncClient, timeout_s: float = 20.0) -> dict:
    """/metrics once the worker has counted a dropped row. It drops the rows first and counts
    them after, so a loop that saw `num_running` reach 0 could scrape before the count."""
    deadline = time.monotonic() + timeout_s
    while not (seen := metrics_of((await client.get("/metrics")).text)).get(
        "batchserve_rows_cancelled_total"
    ):
        assert time.monotonic() < deadline, "no cancelled row was counted"
        await asyncio.sleep(0.01)
    return seen


async def test_the_tokens_of_cancelled_rows_are_counted(meta_pair: ModelPair) -> None:
    """The counter grew only when a row finished, so a row dropped mid-run (its client left,
    or it timed out) generated tokens that /metrics never showed."""
    async with simulated_app(meta_pair, SimulatedCost(5, 0), request_timeout_s=0.3) as app:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
            body = {"prompt": "go on", "max_new_tokens": 400, "ignore_eos": True}
            assert (await c.post("/generate_lda", json=body)).status_code == 504
            seen = await cancelled_rows_counted(c)
            assert app.state.engine.num_running == 0
    assert seen["batchserve_rows_cancelled_total"] == 1
    assert not [name for name in seen if name.startswith("batchserve_rows_finished_total")]
    # One row, one prompt chunk: each step drew exactly one of its tokens.
    assert seen["batchserve_tokens_generated_total"] == seen["batchserve_engine_steps_total"] > 5


async def test_a_plain_request_wakes_its_loop_when_a_row_ends_not_every_step(
    meta_pair: ModelPair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each wake-up takes the GIL from the worker mid-step, so a request that is neither
    streamed nor stopped by strings hears its step events together when a row ends; streams
    and stop strings hear every step. All three give the same completions."""
    wakes: dict[str, int] = {}
    on_events = Job._on_events

    def counting(self: Job, events: list) -> None:
        wakes[self.label] = wakes.get(self.label, 0) + 1
        on_events(self, events)

    monkeypatch.setattr(Job, "_on_events", counting)
    async with simulated_app(meta_pair, SimulatedCost(0, 0)) as app:
        frontend = app.state.frontend
        jobs = {}
        for label, is_stream, stop in [
            ("plain", False, ()), ("stream", True, ()), ("stop strings", False, ("\x00",)),
        ]:  # fmt: skip
            params = SamplingParams(ignore_eos=True, max_new_tokens=40, seed=3, stop=stop)
            request = GenerationRequest("go on", params, n=2)
            job = Job(app.state.engine, frontend, [request], [frontend.prepare(request)],
                      is_stream=is_stream)  # fmt: skip
            job.label = label
            jobs[label] = job
        done = {k: await asyncio.wait_for(asyncio.shield(j.future), 60) for k, j in jobs.items()}
    completions = {k: [r.completion for r in c.results] for k, c in done.items()}
    assert completions["plain"] == completions["stream"] == completions["stop strings"]
    assert all(r.tokens_generated == 40 for c in done.values() for r in c.results)
    assert wakes["plain"] <= 2  # once per finishing step of its two rows (40 < 64 steps)
    assert wakes["stream"] >= 40 and wakes["stop strings"] >= 40


async def test_the_streams_of_one_step_wake_their_loop_once(
    meta_pair: ModelPair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four streams each hear every step, and the worker wakes their loop about once a step
    for all four (each wake-up takes the GIL from the worker), not once per stream."""
    counts = {"drains": 0, "handed": 0}
    drain, on_events = LoopInbox._drain, Job._on_events

    def counting_drain(self: LoopInbox) -> None:
        counts["drains"] += 1
        drain(self)

    def counting_events(self: Job, events: list) -> None:
        counts["handed"] += 1
        on_events(self, events)

    monkeypatch.setattr(LoopInbox, "_drain", counting_drain)
    monkeypatch.setattr(Job, "_on_events", counting_events)
    async with simulated_app(meta_pair, SimulatedCost(1, 0)) as app:
        jobs = [submit_job(app, "go on", max_new_tokens=30, seed=i) for i in range(4)]
        done = [await asyncio.wait_for(asyncio.shield(j.future), 60) for j in jobs]
    assert all(c.results[0].tokens_generated == 30 for c in done)
    assert counts["handed"] >= 4 * 30
    assert counts["drains"] <= counts["handed"] / 2


async def test_a_failure_taking_deferred_events_fails_the_job_at_once(
    meta_pair: ModelPair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deferred steps arrive in one callback; a bug in one of them must settle the job with an
    error (and drop its rows), not lose the final event and leave the client to its timeout."""
    process = RequestOutput.process
    calls = {"n": 0}

    def failing_third(self: RequestOutput, updates):  # noqa: ANN001, ANN202
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected")
        return process(self, updates)

    monkeypatch.setattr(RequestOutput, "process", failing_third)
    async with simulated_app(meta_pair, SimulatedCost(0, 0)) as app:
        frontend = app.state.frontend
        request = GenerationRequest("go on", SamplingParams(ignore_eos=True, max_new_tokens=40))
        job = Job(app.state.engine, frontend, [request], [frontend.prepare(request)],
                  is_stream=False)  # fmt: skip
        with pytest.raises(EngineFailedError, match="injected"):
            await asyncio.wait_for(asyncio.shield(job.future), 10)
        deadline = time.monotonic() + 10
        while app.state.engine.num_running:  # its row was dropped
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
