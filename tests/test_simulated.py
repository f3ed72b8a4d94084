"""The simulated runner: its cost model, its tokens, and the real scheduler and HTTP over it."""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from servers import client_of, running_server, stream_events

from batchserve.api.app import ServerConfig, create_app
from batchserve.api.cli import build_parser
from batchserve.core.scheduler import SchedulerConfig
from batchserve.core.types import SamplingParams, ScheduledRow, StepPlan
from batchserve.worker.models import ModelPair
from batchserve.worker.simulated import (
    SimulatedCost,
    SimulatedRunner,
    load_simulated_pair,
    prefill_tokens,
)

# --- the cost model -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "cost"),
    [
        ("20,0.05", SimulatedCost(20, 0.05, 0)),
        (" 20 , 0.05 , 0.01 ", SimulatedCost(20, 0.05, 0.01)),
        ("0,0", SimulatedCost(0, 0, 0)),
    ],
)
def test_simulate_option_parses_step_row_and_prefill_costs(text: str, cost: SimulatedCost):
    assert SimulatedCost.parse(text) == cost


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("20", "expected STEP_MS,PER_ROW_MS"),
        ("1,2,3,4", "expected STEP_MS,PER_ROW_MS"),
        ("20,fast", "not a number"),
        ("20,-1", "per_row_ms must be a finite number >= 0"),
        ("nan,1", "step_ms must be a finite number >= 0"),
    ],
)
def test_a_bad_simulate_value_is_a_usage_error_naming_the_form(
    text: str, message: str, capsys: pytest.CaptureFixture[str]
):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["serve", "--simulate", text])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --simulate" in err and message in err


def test_simulate_option_becomes_the_server_config():
    from batchserve.api.cli import server_config_from_args

    args = build_parser().parse_args(["serve", "--simulate", "20,0.05,0.5"])
    assert server_config_from_args(args).simulate == SimulatedCost(20, 0.05, 0.5)
    assert server_config_from_args(build_parser().parse_args(["serve"])).simulate is None


# --- the runner alone ---------------------------------------------------------------------------


class FakeClock:
    """Time moves only when the runner sleeps; the first sleep returns `wake_early_s` before
    it should, as a sleep interrupted by a signal handler may."""

    def __init__(self, wake_early_s: float = 0.0) -> None:
        self.now = 100.0
        self.wake_early_s = wake_early_s
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        early = self.wake_early_s if not self.sleeps else 0.0
        self.sleeps.append(seconds)
        self.now += seconds - early


FREE = SimulatedCost(0, 0)


def runner(cost: SimulatedCost = FREE, **kwargs) -> SimulatedRunner:
    options = {"vocab_limit": 1024, "max_context": 512, "eos_token_ids": {1}}
    options |= {"special_token_ids": [0, 1, 2]} | kwargs
    return SimulatedRunner(cost, **options)


def decode_row(row_id: int, seed: int, step: int, **params) -> ScheduledRow:
    return ScheduledRow(row_id, (7,), 4 + step, (1, 2), SamplingParams(**params), seed, True, step)


def prefill_row(row_id: int, num_tokens: int, seed: int = 0) -> ScheduledRow:
    blocks = tuple(range(1, 2 + num_tokens // 16))
    return ScheduledRow(row_id, (5,) * num_tokens, 0, blocks, SamplingParams(), seed, True, 0)


def test_a_step_waits_the_cost_of_its_rows_and_prefill_tokens():
    clock = FakeClock()
    sim = runner(SimulatedCost(20, 0.5, 0.1), clock=clock, sleep=clock.sleep)
    plan = StepPlan((decode_row(1, 1, 3), decode_row(2, 2, 5), prefill_row(3, 40)))
    assert prefill_tokens(plan.rows) == 40
    sim.execute(plan)
    assert clock.now - 100.0 == pytest.approx((20 + 0.5 * 3 + 0.1 * 40) / 1000)
    assert sim.info()["busy_s"] == pytest.approx(0.0255, abs=1e-3)


def test_a_sleep_that_wakes_early_sleeps_again_until_the_deadline():
    clock = FakeClock(wake_early_s=0.004)
    sim = runner(SimulatedCost(20, 0), clock=clock, sleep=clock.sleep)
    sim.execute(StepPlan((decode_row(1, 1, 1),)))
    assert clock.now - 100.0 == pytest.approx(0.020)
    assert clock.sleeps == [pytest.approx(0.020), pytest.approx(0.004)]


def test_a_prefill_chunk_that_does_not_sample_costs_its_tokens_and_returns_nothing():
    clock = FakeClock()
    sim = runner(SimulatedCost(0, 0, 1.0), clock=clock, sleep=clock.sleep)
    chunk = ScheduledRow(4, (5,) * 16, 0, (1, 2), SamplingParams(), 9, False, 0)
    out = sim.execute(StepPlan((chunk, decode_row(1, 1, 2))))
    assert clock.now - 100.0 == pytest.approx(0.016)
    assert out.row_ids == (1,) and len(out.token_ids) == 1


def test_tokens_depend_on_seed_and_step_alone():
    a, b = runner(), runner()
    alone = a.execute(StepPlan((decode_row(1, seed=42, step=3),)))
    crowd = [decode_row(i, seed=1000 + i, step=i % 7, alpha=float(i)) for i in range(2, 12)]
    mixed = b.execute(StepPlan((*crowd[:5], decode_row(99, 42, 3, alpha=-1.0), *crowd[5:])))
    assert mixed.row_ids[5] == 99 and mixed.token_ids[5] == alone.token_ids[0]
    assert mixed.token_ids[5] == a.token(42, 3)
    assert len({a.token(42, step) for step in range(64)}) > 32  # it does vary with the step


def test_tokens_stay_in_the_vocabulary_above_the_specials_and_are_never_eos():
    sim = runner(vocab_limit=40, eos_token_ids={1, 17}, special_token_ids=[0, 1, 2, 39])
    drawn = {sim.token(seed, step) for seed in range(50) for step in range(50)}
    assert sim.first_non_special_id == 3
    assert drawn == set(range(3, 39)) - {17}


def test_logprobs_only_for_rows_that_ask_and_finite_and_deterministic():
    sim = runner()
    plan = StepPlan(
        (
            decode_row(1, 5, 2),
            decode_row(2, 5, 2, logprobs=True),
            decode_row(3, 5, 2, score_alphas=(0.0, 1.0, 4.0)),
        )
    )
    out = sim.execute(plan)
    assert out.logprobs[0] is None
    assert len(out.logprobs[1]) == 3 and len(out.logprobs[2]) == 6
    assert all(math.isfinite(v) and v < 0 for v in out.logprobs[1] + out.logprobs[2])
    assert out.logprobs[1] == out.logprobs[2][:3] == runner().execute(plan).logprobs[1]


def test_a_row_whose_tokens_overrun_its_blocks_is_refused():
    bad = ScheduledRow(1, (5,) * 17, 0, (1,), SamplingParams(), 0, True, 0)
    with pytest.raises(ValueError, match="do not fit its 1 block"):
        runner().execute(StepPlan((bad,)))


def test_kv_store_and_row_limit_come_from_the_context():
    sim = runner(num_kv_blocks=8, block_size=4, max_context=512)
    assert (sim.num_kv_blocks, sim.block_size, sim.max_row_tokens) == (8, 4, 28)
    assert runner().max_row_tokens == 512
    assert runner().info()["runner"] == "simulated"


def test_a_step_waits_without_holding_the_cpu():
    sim = runner(SimulatedCost(200, 0))
    cpu_before, wall_before = time.thread_time(), time.perf_counter()
    sim.execute(StepPlan((decode_row(1, 1, 1),)))
    assert time.perf_counter() - wall_before >= 0.2
    assert time.thread_time() - cpu_before < 0.05


def test_two_runners_on_two_threads_step_at_the_same_time():
    """The wait releases the GIL: 2 x 4 steps of 100 ms overlap instead of taking 800 ms."""
    runners = [runner(SimulatedCost(100, 0)) for _ in range(2)]

    def run(sim: SimulatedRunner) -> None:
        for step in range(4):
            sim.execute(StepPlan((decode_row(1, 1, step + 1),)))

    threads = [threading.Thread(target=run, args=(sim,)) for sim in runners]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert 0.4 <= time.perf_counter() - started < 0.7


# --- the real scheduler and HTTP routes over it -------------------------------------------------


@pytest.fixture(scope="module")
def toy_meta_pair() -> ModelPair:
    return load_simulated_pair("toy")


def test_the_simulated_pair_has_the_tokenizer_facts_and_no_weights(toy_meta_pair: ModelPair):
    pair = toy_meta_pair
    assert pair.after is None and pair.before is None and pair.device.type == "meta"
    assert (pair.vocab_limit, pair.max_context, pair.eos_token_ids) == (1024, 512, {1})
    assert pair.compatibility.compatible
    assert (pair.after_id, pair.before_id) == ("toy:after", "toy:before")


@contextlib.asynccontextmanager
async def serving(
    pair: ModelPair, cost: SimulatedCost, **scheduler: object
) -> AsyncIterator[httpx.AsyncClient]:
    config = ServerConfig(scheduler=SchedulerConfig(**scheduler), simulate=cost)
    async with client_of(create_app(config, pair=pair)) as client:
        yield client


async def test_http_routes_run_the_simulated_runner_through_the_scheduler(
    toy_meta_pair: ModelPair,
):
    async with serving(toy_meta_pair, SimulatedCost(2, 0.01)) as client:
        assert (await client.get("/health")).json() == {"status": "ok"}
        info = (await client.get("/info")).json()
        assert info["device"] == "meta" and info["engine"]["runner"] == "simulated"

        body = {"prompt": "Tell me a story.", "max_new_tokens": 12, "seed": 7, "logprobs": True}
        one = (await client.post("/generate_lda", json=body)).json()
        assert one["tokens_generated"] == 12 and one["finish_reason"] == "length"
        sim = runner()
        assert one["logprobs"]["token_ids"] == [sim.token(7, step) for step in range(12)]
        assert one["text"] == one["formatted_prompt"] + one["completion"]

        batch = await client.post(
            "/generate_lda_batch",
            json={"prompts": ["a", "b c"], "n": 3, "max_new_tokens": 5, "seed": 7},
        )
        results = batch.json()["results"]
        assert len(results) == 6 and {r["tokens_generated"] for r in results} == {5}
        assert len({r["seed"] for r in results}) == 6

        plain = (await client.post("/generate", json={"prompt": "x", "max_new_tokens": 3})).json()
        assert plain["model_1"]["model_id"] == "toy:after"

        v1 = await client.post(
            "/v1/completions",
            json={"model": "toy:after", "prompt": "Once", "max_tokens": 6, "n": 2, "seed": 3},
        )
        assert v1.status_code == 200, v1.text
        assert [c["finish_reason"] for c in v1.json()["choices"]] == ["length", "length"]
        chat = await client.post(
            "/v1/chat/completions",
            json={"model": "toy:after", "messages": [{"role": "user", "content": "hi"}],
                  "max_tokens": 4},
        )  # fmt: skip
        assert chat.status_code == 200, chat.text

        metrics = (await client.get("/metrics")).text
        assert "batchserve_rows_admitted_total 1" in metrics.replace(".0", "")


async def test_a_seeded_request_is_the_same_alone_and_in_a_crowd(toy_meta_pair: ModelPair):
    body = {"prompt": "The river", "max_new_tokens": 16, "seed": 123}
    async with serving(toy_meta_pair, SimulatedCost(1, 0)) as client:
        alone = (await client.post("/generate_lda", json=body)).json()
        crowd = [
            client.post("/generate_lda", json={"prompt": f"p {i}", "max_new_tokens": 8 + i})
            for i in range(12)
        ]
        *_, again = await asyncio.gather(*crowd, client.post("/generate_lda", json=body))
        assert again.json() == alone


async def test_requests_take_the_simulated_time_and_batch_together(toy_meta_pair: ModelPair):
    """16 requests of 10 tokens at 20 ms a step: ~11 steps batched (0.22 s), not 16 x 11."""
    async with serving(toy_meta_pair, SimulatedCost(20, 0), max_wait_ms=50) as client:
        started = time.perf_counter()
        responses = await asyncio.gather(
            *(
                client.post("/generate_lda", json={"prompt": f"q{i}", "max_new_tokens": 10})
                for i in range(16)
            )
        )
        elapsed = time.perf_counter() - started
        assert {r.status_code for r in responses} == {200}
        assert elapsed >= 10 * 0.020
        assert elapsed < 16 * 10 * 0.020 / 2  # batched: far below one request at a time
        metrics = (await client.get("/metrics")).text
        steps = [
            line
            for line in metrics.splitlines()
            if line.startswith("batchserve_engine_steps_total")
        ]
        assert float(steps[0].split()[-1]) < 40


async def test_streams_carry_the_simulated_tokens(toy_meta_pair: ModelPair):
    async with serving(toy_meta_pair, SimulatedCost(1, 0)) as client:
        body = {"prompt": "Stream this.", "max_new_tokens": 10, "seed": 9}
        plain = (await client.post("/generate_lda", json=body)).json()
        events = await stream_events(client, "/generate_lda", body)
        assert events[-1] == ("result", plain)
        deltas = [d["text"] for e, d in events if e == "delta"]
        assert len(deltas) > 1 and "".join(deltas) == plain["completion"]


def test_serve_simulate_runs_without_weights():
    with running_server(["--simulate", "5,0.01", "--log-level", "warning"]) as (url, _):
        info = httpx.get(url + "/info").json()
        assert info["engine"]["cost"] == {
            "step_ms": 5.0, "per_row_ms": 0.01, "prefill_ms_per_token": 0.0,
        }  # fmt: skip
        response = httpx.post(
            url + "/generate_lda", json={"prompt": "hi", "max_new_tokens": 20}, timeout=60
        )
        assert response.status_code == 200 and response.json()["tokens_generated"] == 20
