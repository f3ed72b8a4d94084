"""The HTTP API in-process (httpx ASGI transport, lifespan running) on a tiny random-init pair."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import AsyncIterator

import httpx
import pytest
from servers import client_of
from tiny_models import SAMPLE_WORDS

from batchserve.api.app import ServerConfig, create_app
from batchserve.core.scheduler import SchedulerConfig
from batchserve.core.types import RunnerConfig
from batchserve.worker.models import ModelPair


@contextlib.asynccontextmanager
async def serving(pair: ModelPair, **scheduler: object) -> AsyncIterator[httpx.AsyncClient]:
    limits = {
        k: scheduler.pop(k)
        for k in list(scheduler)
        if k in ("max_prompts_per_request", "max_new_tokens_limit", "runner")
    }
    config = ServerConfig(scheduler=SchedulerConfig(**scheduler), **limits)
    async with client_of(create_app(config, pair=pair)) as client:
        yield client


async def test_single_request_returns_the_contract_fields(llama_pair: ModelPair) -> None:
    async with serving(llama_pair) as client:
        resp = await client.post(
            "/generate_lda", json={"prompt": "hello world", "max_new_tokens": 5, "seed": 1}
        )
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert set(body) == {
            "prompt",
            "formatted_prompt",
            "completion",
            "text",
            "alpha",
            "model_after",
            "model_before",
            "tokens_generated",
            "stopped_early",
            "finish_reason",
            "seed",
        }
        assert body["prompt"] == "hello world" and body["seed"] == 1 and body["alpha"] == 1.0
        assert body["text"] == body["formatted_prompt"] + body["completion"]
        assert body["model_after"] == "tiny-llama-after"
        assert body["finish_reason"] in ("length", "eos")


async def test_batch_request_returns_one_result_per_prompt_and_sample(
    llama_pair: ModelPair,
) -> None:
    sampling = {"max_new_tokens": 4, "alpha": 2.0}  # the batch's, and each row's replay's
    async with serving(llama_pair) as client:
        resp = await client.post(
            "/generate_lda_batch",
            json={"prompts": ["a dog", "the cat sat"], "n": 3, "seed": 5, **sampling},
        )
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["batch_size"] == 2 and body["alpha"] == 2.0
        assert [r["prompt"] for r in body["results"]] == ["a dog"] * 3 + ["the cat sat"] * 3
        seeds = [r["seed"] for r in body["results"]]
        assert seeds[0] == 5 and len(set(seeds)) == 6  # no two rows share their random draws
        assert all(r["tokens_generated"] <= 4 for r in body["results"])
        # Every row replays alone from the seed it reports.
        for row in body["results"]:
            alone = await client.post(
                "/generate_lda", json={"prompt": row["prompt"], "seed": row["seed"], **sampling}
            )
            assert alone.json()["completion"] == row["completion"]


async def test_generate_returns_both_models_plain_samples(llama_pair: ModelPair) -> None:
    async with serving(llama_pair) as client:
        body = {"prompt": "tell me a story", "max_new_tokens": 6, "do_sample": False}
        plain = (await client.post("/generate", json=body)).json()
        assert plain["model_1"]["model_id"] == "tiny-llama-after"
        assert plain["model_2"]["model_id"] == "tiny-llama-before"
        # Greedy LDA at alpha 0 is the after model and at -1 the before model.
        for alpha, key in ((0.0, "model_1"), (-1.0, "model_2")):
            lda = (
                await client.post(
                    "/generate_lda", json=body | {"alpha": alpha, "ignore_eos": False}
                )
            ).json()
            assert lda["completion"] == plain[key]["completion"]
            assert plain[key]["finish_reason"] == lda["finish_reason"]
            assert plain[key]["tokens_generated"] == lda["tokens_generated"]


async def test_generate_reports_each_rows_seed_and_replays_from_it(llama_pair: ModelPair) -> None:
    async with serving(llama_pair) as client:
        body = {"prompt": "tell me a story", "max_new_tokens": 6, "temperature": 1.5}
        plain = (await client.post("/generate", json=body)).json()
        for alpha, key in ((0.0, "model_1"), (-1.0, "model_2")):
            row = plain[key]
            assert isinstance(row["seed"], int)
            assert row["finish_reason"] in ("length", "eos", "stop")
            again = {"alpha": alpha, "seed": row["seed"], "ignore_eos": False}
            lda = (await client.post("/generate_lda", json=body | again)).json()
            assert lda["completion"] == row["completion"]


async def test_info_health_compatibility_and_metrics(llama_pair: ModelPair) -> None:
    async with serving(llama_pair, max_batch_size=8) as client:
        assert (await client.get("/health")).json() == {"status": "ok"}
        info = (await client.get("/info")).json()
        assert info["scheduler"]["max_batch_size"] == 8 and info["dtype"] == "float32"
        assert info["engine"]["compiled"] is False and info["scheduler"]["enable_prefix_cache"]
        assert info["engine"]["kv_cache_tokens"] >= 8 * 256  # 8 slots x the tiny context
        compat = (await client.get("/tokenizer_compatibility")).json()
        assert compat == {
            "compatible": True,
            "vocab_size_1": 64,
            "vocab_size_2": 64,
            "vocabs_match": True,
            "warning": None,
        }
        await client.post("/generate_lda", json={"prompt": "hi", "max_new_tokens": 3})
        text = (await client.get("/metrics")).text
        for name in (
            "batchserve_queue_rows",
            "batchserve_running_rows",
            "batchserve_rows_admitted_total",
            "batchserve_batch_size_bucket",
            "batchserve_tokens_generated_total",
            "batchserve_request_latency_seconds_bucket",
            "batchserve_queue_wait_seconds_bucket",
        ):
            assert name in text
        assert 'batchserve_requests_total{route="/generate_lda",status="200"} 1.0' in text


async def wait_until(condition, timeout_s: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.002)


def _random_request(rng: random.Random, i: int) -> tuple[str, dict]:
    words = SAMPLE_WORDS
    prompt = " ".join(rng.choices(words, k=rng.randint(1, 12)))
    params = {
        "alpha": rng.choice([0.0, 1.0, 2.0, -1.0, 4.0]),
        "temperature": rng.choice([0.0, 0.7, 1.0, 1.3]),
        "top_p": rng.choice([1.0, 0.9, 0.5]),
        "max_new_tokens": rng.randint(1, 24),
        "seed": 1000 + i,
        "ignore_eos": rng.random() < 0.5,
    }
    if i % 3 == 0:
        return "/generate_lda_batch", params | {
            "prompts": [prompt, prompt + " dog"],
            "n": rng.randint(1, 2),
        }
    return "/generate_lda", params | {"prompt": prompt}


def _tokens(body: dict) -> list:
    rows = body.get("results", [body])
    return [(r["completion"], r["tokens_generated"], r["finish_reason"], r["seed"]) for r in rows]


async def test_32_concurrent_mixed_clients_get_their_solo_results(llama_pair: ModelPair) -> None:
    rng = random.Random(0)
    requests = [_random_request(rng, i) for i in range(32)]
    async with serving(llama_pair, max_batch_size=16, max_wait_ms=5) as client:
        responses = await asyncio.gather(*(client.post(path, json=body) for path, body in requests))
        assert all(r.status_code == 200 for r in responses), [
            r.text for r in responses if r.status_code != 200
        ]
        for (path, body), resp in zip(requests, responses, strict=True):
            alone = await client.post(path, json=body)
            assert _tokens(alone.json()) == _tokens(resp.json())
        steps = (await client.get("/metrics")).text
        # Shared forward passes: some step ran with more than one row.
        assert 'batchserve_batch_size_bucket{le="1.0"}' in steps
        count_line = next(
            line for line in steps.splitlines() if line.startswith("batchserve_batch_size_count")
        )
        sum_line = next(
            line for line in steps.splitlines() if line.startswith("batchserve_batch_size_sum")
        )
        assert float(sum_line.split()[-1]) > float(count_line.split()[-1])


async def _admission_steps(pair: ModelPair, mode: str) -> tuple[dict, dict]:
    """A long request, then a short one sent while the long one is mid-generation."""
    async with serving(pair, mode=mode, max_batch_size=8, max_wait_ms=1) as client:
        engine = client.app.state.engine
        long_req = asyncio.create_task(
            client.post(
                "/generate_lda",
                json={"prompt": "hello", "max_new_tokens": 150, "ignore_eos": True, "seed": 1},
            )
        )
        await wait_until(lambda: engine.num_steps >= 10)
        short = await client.post(
            "/generate_lda",
            json={"prompt": "a cat", "max_new_tokens": 3, "ignore_eos": True, "seed": 2},
        )
        long_resp = await long_req
        return dict(long_resp.headers), dict(short.headers)


@pytest.mark.parametrize("mode", ["continuous", "static", "serial"])
async def test_newcomer_joins_the_running_batch_only_in_continuous_mode(
    llama_pair: ModelPair, mode: str
) -> None:
    long_headers, short_headers = await _admission_steps(llama_pair, mode)
    long_finished = int(long_headers["x-batchserve-finished-step"])
    short_admitted = int(short_headers["x-batchserve-admitted-step"])
    short_finished = int(short_headers["x-batchserve-finished-step"])
    if mode == "continuous":
        assert 10 <= short_admitted < long_finished
        assert short_finished < long_finished
    else:
        assert short_admitted >= long_finished


async def test_full_queue_answers_503_with_retry_after_then_recovers(llama_pair: ModelPair) -> None:
    async with serving(llama_pair, max_batch_size=1, max_queue_rows=4, max_wait_ms=0) as client:
        engine = client.app.state.engine
        first = asyncio.create_task(
            client.post(
                "/generate_lda_batch",
                json={"prompts": ["a", "b", "c", "d"], "max_new_tokens": 80, "ignore_eos": True},
            )
        )
        await wait_until(lambda: engine.num_running > 0)
        assert engine.num_waiting_rows == 3
        full = await client.post(
            "/generate_lda_batch", json={"prompts": ["one", "more"], "max_new_tokens": 2}
        )
        assert full.status_code == 503
        assert full.headers["retry-after"] == "1"
        assert "queue full" in full.json()["error"]
        assert (await first).status_code == 200
        after = await client.post("/generate_lda", json={"prompt": "one more", "max_new_tokens": 2})
        assert after.status_code == 200
        assert (
            'batchserve_errors_total{kind="queue_full"} 1.0' in (await client.get("/metrics")).text
        )


async def test_cancelled_request_frees_its_rows(llama_pair: ModelPair) -> None:
    async with serving(llama_pair, max_batch_size=8) as client:
        engine = client.app.state.engine
        task = asyncio.create_task(
            client.post(
                "/generate_lda_batch",
                json={"prompts": ["a", "b"], "n": 2, "max_new_tokens": 200, "ignore_eos": True},
            )
        )
        await wait_until(lambda: engine.num_running == 4)
        (request_id,) = engine.request_ids
        engine.abort(request_id)
        await wait_until(lambda: engine.num_running == 0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

        # The worker counts the rows under its lock right after dropping them; poll /metrics
        # rather than race the worker thread for the GIL.
        async def counted() -> bool:
            text = (await client.get("/metrics")).text
            return "batchserve_rows_cancelled_total 4.0" in text

        for _ in range(100):
            if await counted():
                break
            await asyncio.sleep(0.05)
        assert await counted()
        ok = await client.post("/generate_lda", json={"prompt": "still alive", "max_new_tokens": 2})
        assert ok.status_code == 200


def bad(
    raw: bytes,
    needle: str,
    status: int = 422,
    path: str = "/generate_lda",
    content_type: str = "application/json",
) -> tuple[str, bytes, str, int, str]:
    """A body the server must refuse with `status` and an error naming `needle`."""
    return path, raw, content_type, status, needle


BAD_INPUTS = [
    bad(b'{"prompt": "hi", ', "malformed JSON", 400),
    bad(b'["hi"]', "JSON object"),
    bad(b'{"max_new_tokens": 5}', "prompt"),
    bad(b'{"prompt": ""}', "prompt"),
    bad(b'{"prompt": 42}', "prompt"),
    bad(b'{"prompt": "hi", "max_new_tokens": "10"}', "max_new_tokens"),
    bad(b'{"prompt": "hi", "alpha": NaN}', "alpha"),
    bad(b'{"prompt": "hi", "alpha": Infinity}', "alpha"),
    bad(b'{"prompt": "hi", "max_new_tokens": -3}', "max_new_tokens"),
    bad(b'{"prompt": "hi", "max_new_tokens": 100000000}', "max_new_tokens"),
    bad(b'{"prompt": "hi", "top_p": 0}', "top_p"),
    bad(b'{"prompt": "hi", "top_p": 1.5}', "top_p"),
    bad(b'{"prompt": "hi", "temperature": -0.1}', "temperature"),
    bad(b'{"prompt": "hi", "seed": -1}', "seed"),
    bad(b'{"prompt": "hi", "temprature": 0.5}', "temprature"),
    bad(b'{"prompt": "hi"}', "Content-Type", 415, content_type="text/plain"),
    bad(b"prompt=hi", "Content-Type", 415, content_type="application/x-www-form-urlencoded"),
    bad(json.dumps({"prompt": "cat " * 2000}).encode(), "context", 413),
    bad(b'{"prompts": []}', "prompts", path="/generate_lda_batch"),
    bad(b'{"prompts": ["ok", ""]}', "prompts.1", path="/generate_lda_batch"),
    bad(b'{"prompts": "hi"}', "prompts", path="/generate_lda_batch"),
    bad(
        json.dumps({"prompts": ["x"] * 10000}).encode(),
        "too many prompts",
        413,
        path="/generate_lda_batch",
    ),
    bad(b'{"prompts": ["hi"], "n": 0}', "n", path="/generate_lda_batch"),
    bad(b'{"prompt": "hi", "alpha": 2}', "alpha", path="/generate"),
]


async def test_bad_inputs_get_a_4xx_naming_the_problem_and_the_server_keeps_serving(
    llama_pair: ModelPair,
) -> None:
    async with serving(llama_pair) as client:
        for path, raw, content_type, status, needle in BAD_INPUTS:
            resp = await client.post(path, content=raw, headers={"content-type": content_type})
            assert resp.status_code == status, (raw[:60], resp.text)
            body = resp.json()
            assert needle in body["error"], (raw[:60], body)
            ok = await client.post("/generate_lda", json={"prompt": "fine", "max_new_tokens": 2})
            assert ok.status_code == 200
        assert (await client.get("/nope")).status_code == 404
        assert (await client.get("/generate_lda")).status_code == 405


async def test_a_prompt_beyond_the_kv_store_gets_413_and_a_burst_beyond_it_is_served(
    llama_pair: ModelPair,
) -> None:
    runner = RunnerConfig(kv_cache_tokens=64, block_size=8)
    async with serving(llama_pair, max_batch_size=8, runner=runner) as client:
        info = (await client.get("/info")).json()["engine"]
        assert info["kv_cache_tokens"] == 64 and info["max_row_tokens"] == 64
        resp = await client.post("/generate_lda", json={"prompt": "hi", "max_new_tokens": 80})
        assert resp.status_code == 413 and "64 tokens a row can hold" in resp.json()["error"]
        # Twelve rows of about 30 tokens each, two at a time in the store: all are served.
        body = {"prompts": ["the cat sat"] * 6, "n": 2, "max_new_tokens": 20, "seed": 3}
        body["ignore_eos"] = True
        resp = await client.post("/generate_lda_batch", json=body)
        assert resp.status_code == 200, resp.text
        assert [r["tokens_generated"] for r in resp.json()["results"]] == [20] * 12
