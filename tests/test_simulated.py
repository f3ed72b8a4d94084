"""The simulated runner: its cost model, its tokens, and the real scheduler and HTTP over it."""

from __future__ import annotations

import math
import threading
import time

import pytest

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
