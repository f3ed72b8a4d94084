"""The scheduler by hand: plans checked and outputs made up, with no model, no thread, no clock;
then the engine's worker thread against a runner that fakes its steps."""

from __future__ import annotations

import threading
import time

import pytest

from batchserve.core.scheduler import (
    IDLE_POLL_S,
    PromptTooLongError,
    QueueFullError,
    Scheduler,
    SchedulerConfig,
)
from batchserve.core.types import (
    INVALID_TOKEN,
    EngineRow,
    SamplingParams,
    StepOutput,
    StepPlan,
)
from batchserve.engine import Engine, EngineCore, EngineEvent, SchedulerClosedError

EOS = 2
TOKEN = 7  # what the made-up outputs draw


def rows(
    first: int, count: int, prompt_len: int = 4, max_new: int = 3, **params
) -> list[EngineRow]:
    sampling = SamplingParams(max_new_tokens=max_new, **params)
    return [
        EngineRow(first + i, tuple(range(10, 10 + prompt_len)), sampling, seed=i)
        for i in range(count)
    ]


def scheduler(blocks: int = 1000, block_size: int = 4, max_row: int = 200, **config) -> Scheduler:
    config.setdefault("enable_prefix_cache", False)
    return Scheduler(
        SchedulerConfig(**config), num_kv_blocks=blocks, block_size=block_size,
        max_row_tokens=max_row, eos_token_ids=[EOS],
    )  # fmt: skip


def output(plan: StepPlan, token: int = TOKEN, **overrides: int) -> StepOutput:
    """Every sampling row draws `token` (a row id in overrides draws its own)."""
    sampling = plan.sampling_rows
    return StepOutput(
        tuple(r.row_id for r in sampling),
        tuple(overrides.get(f"row{r.row_id}", token) for r in sampling),
    )


def step(s: Scheduler, now: float = 0.0, **overrides: int):
    plan = s.schedule(now).plan
    return plan, s.update(plan, output(plan, **overrides))


def ids(plan: StepPlan) -> list[int]:
    return [r.row_id for r in plan.rows]


# --- admission ----------------------------------------------------------------------------------


def test_admits_first_in_first_out_up_to_the_batch_size() -> None:
    s = scheduler(max_batch_size=3, max_num_batched_tokens=64)
    s.add_request(0, rows(0, 2), now=0)
    s.add_request(1, rows(2, 2), now=0)
    plan, _ = step(s)
    assert ids(plan) == [0, 1, 2] and s.num_waiting_rows == 1
    plan, _ = step(s)
    assert ids(plan) == [0, 1, 2]  # the fourth waits for a free place
    plan, updates = step(s)  # max_new_tokens 3: rows 0-2 finish here
    assert {u.row_id for u in updates if u.finish_reason == "length"} == {0, 1, 2}
    plan, _ = step(s)
    assert ids(plan) == [3]


def test_decoding_rows_come_first_and_prompts_share_what_is_left_of_the_budget() -> None:
    s = scheduler(max_batch_size=8, max_num_batched_tokens=10)
    s.add_request(0, rows(0, 2, prompt_len=4, max_new=20), now=0)
    plan, _ = step(s)
    assert [len(r.token_ids) for r in plan.rows] == [4, 4]
    s.add_request(1, rows(2, 1, prompt_len=23, max_new=5), now=0)
    plan, updates = step(s)
    # Two decoding rows, then 8 of the newcomer's 23 prompt tokens: no token drawn for it yet.
    assert [(r.row_id, len(r.token_ids), r.samples) for r in plan.rows] == [
        (0, 1, True), (1, 1, True), (2, 8, False)
    ]  # fmt: skip
    assert [u.row_id for u in updates] == [0, 1]
    plan, _ = step(s)
    assert plan.rows[2].start == 8 and len(plan.rows[2].token_ids) == 8
    plan, updates = step(s)
    assert plan.rows[2].start == 16 and plan.rows[2].token_ids == tuple(range(26, 33))
    assert plan.rows[2].samples and {u.row_id for u in updates} == {0, 1, 2}
    plan, _ = step(s)
    assert [len(r.token_ids) for r in plan.rows] == [1, 1, 1]
    assert plan.rows[2].token_ids == (TOKEN,) and plan.rows[2].start == 23


def test_a_decoding_row_feeds_its_last_token_at_its_next_position() -> None:
    s = scheduler(max_num_batched_tokens=64)
    s.add_request(0, rows(0, 1, prompt_len=5, max_new=4), now=0)
    step(s, row0=11)
    plan, _ = step(s, row0=12)
    (row,) = plan.rows
    assert row.token_ids == (11,) and row.start == 5 and row.step == 1
    plan, _ = step(s)
    assert plan.rows[0].token_ids == (12,) and plan.rows[0].start == 6
    assert plan.rows[0].block_ids == row.block_ids and len(row.block_ids) == 3  # 9 tokens / 4


def test_static_mode_gathers_a_first_group_then_never_joins_a_running_batch() -> None:
    s = scheduler(mode="static", max_batch_size=8, max_wait_ms=50, max_num_batched_tokens=64)
    s.add_request(0, rows(0, 2), now=0.0)
    schedule = s.schedule(now=0.01)
    assert not schedule.plan.rows and schedule.wait_s == pytest.approx(0.04)
    s.add_request(1, rows(2, 1), now=0.02)
    plan, _ = step(s, now=0.06)
    assert ids(plan) == [0, 1, 2]
    s.add_request(2, rows(3, 1), now=0.07)
    plan, _ = step(s, now=0.2)
    assert ids(plan) == [0, 1, 2]  # the newcomer waits for the batch to drain
    step(s, now=0.3)
    plan, _ = step(s, now=0.4)
    assert ids(plan) == [3]


def test_serial_mode_admits_one_request_at_a_time() -> None:
    s = scheduler(mode="serial", max_num_batched_tokens=64)
    s.add_request(0, rows(0, 2), now=0)
    s.add_request(1, rows(2, 2), now=0)
    plan, _ = step(s)
    assert ids(plan) == [0, 1]
    step(s)
    step(s)
    plan, _ = step(s)
    assert ids(plan) == [2, 3]


def test_an_idle_scheduler_says_how_long_to_wait() -> None:
    s = scheduler()
    schedule = s.schedule(now=0)
    assert not schedule.plan.rows and schedule.wait_s == IDLE_POLL_S


# --- refusals and KV blocks ---------------------------------------------------------------------


def test_a_full_queue_and_rows_that_can_never_fit_are_refused_before_queueing() -> None:
    s = scheduler(max_queue_rows=4, max_row=20)
    s.add_request(0, rows(0, 3), now=0)
    with pytest.raises(QueueFullError, match="3 rows waiting, 2 more asked, limit 4"):
        s.add_request(1, rows(3, 2), now=0)
    with pytest.raises(PromptTooLongError, match="beyond the 20 tokens"):
        s.add_request(2, rows(5, 1, prompt_len=18, max_new=3), now=0)
    with pytest.raises(ValueError, match="temperature nan"):
        s.add_request(3, rows(6, 1, temperature=float("nan")), now=0)
    assert s.num_waiting_rows == 3 and list(s.requests) == [0]


def test_rows_wait_in_order_for_kv_blocks_and_never_overcommit_the_store() -> None:
    # 10 free blocks of 4 tokens; each row reserves 12 tokens = 3 blocks: three fit at a time.
    s = scheduler(blocks=11, block_size=4, max_batch_size=8, max_num_batched_tokens=64)
    s.add_request(0, rows(0, 5, prompt_len=4, max_new=8), now=0)
    s.add_request(1, rows(5, 1, prompt_len=1, max_new=1), now=0)  # small, but behind them
    plan, _ = step(s)
    assert ids(plan) == [0, 1, 2] and s.blocks.num_free == 1
    seen_blocks = set()
    for row in plan.rows:
        assert not seen_blocks & set(row.block_ids) and 0 not in row.block_ids
        seen_blocks |= set(row.block_ids)
    for _ in range(7):
        plan, _ = step(s)
    assert ids(plan) == [0, 1, 2]
    plan, _ = step(s)
    assert ids(plan) == [3, 4, 5]  # freed on finishing, first in first admitted


def test_abort_drops_waiting_and_running_rows_and_frees_their_blocks() -> None:
    s = scheduler(max_batch_size=2, max_num_batched_tokens=64)
    free = s.blocks.num_free
    s.add_request(0, rows(0, 3, max_new=10), now=0)
    s.add_request(1, rows(3, 1, max_new=10), now=0)
    plan = s.schedule(0).plan
    assert s.abort_request(0) == 3
    updates = s.update(plan, output(plan))
    assert updates == []  # rows dropped since the plan was made are skipped
    plan, _ = step(s)
    assert ids(plan) == [3]
    assert s.abort_request(1) == 1 and s.abort_request(1) == 0
    assert s.blocks.num_free == free and not s.has_work and not s.requests


def test_finish_rules_eos_length_and_a_broken_row() -> None:
    s = scheduler(max_num_batched_tokens=64)
    s.add_request(0, rows(0, 1, max_new=5), now=0)
    s.add_request(1, rows(1, 1, max_new=5, ignore_eos=True), now=0)
    s.add_request(2, rows(2, 1, max_new=5), now=0)
    _, updates = step(s, row0=EOS, row1=EOS, row2=INVALID_TOKEN)
    by_row = {u.row_id: u for u in updates}
    assert by_row[0].finish_reason == "eos" and by_row[0].token_ids == (EOS,)
    assert by_row[1].finish_reason is None
    assert by_row[2].finish_reason == "error" and "not finite" in by_row[2].error
    assert by_row[2].token_ids == ()
    for _ in range(4):
        _, updates = step(s)
    assert [(u.row_id, u.finish_reason) for u in updates] == [(1, "length")]
    assert not s.has_work


def test_rows_a_stop_string_ended_are_freed_at_once() -> None:
    s = scheduler(max_num_batched_tokens=64)
    free = s.blocks.num_free
    s.add_request(0, rows(0, 2, max_new=10), now=0)
    step(s)
    s.finish_rows([0], "stop")
    plan, _ = step(s)
    assert ids(plan) == [1]
    s.finish_rows([1], "stop")
    assert not s.requests and s.blocks.num_free == free


def test_a_request_is_closed_once_every_row_ended_whatever_ended_it() -> None:
    s = scheduler(max_num_batched_tokens=64)
    s.add_request(0, rows(0, 2, max_new=2), now=0)
    step(s)
    s.finish_rows([0], "stop")
    assert 0 in s.requests
    step(s)
    assert 0 not in s.requests


# --- the prefix cache in the plan ---------------------------------------------------------------


def test_the_n_samples_of_a_prompt_share_its_full_blocks_in_the_same_step() -> None:
    s = scheduler(block_size=4, enable_prefix_cache=True, max_num_batched_tokens=64)
    free = s.blocks.num_free
    s.add_request(0, rows(0, 3, prompt_len=10, max_new=6), now=0)
    plan, _ = step(s)
    first, *others = plan.rows
    assert len(first.token_ids) == 10 and first.start == 0
    for row in others:
        # Two full blocks (8 tokens) shared: only positions 8-9 are computed again.
        assert row.block_ids[:2] == first.block_ids[:2] and row.start == 8
        assert row.token_ids == tuple(range(18, 20))
        assert not set(row.block_ids[2:]) & set(first.block_ids[2:])
    assert s.blocks.num_free == free - 4 - 2 * 2  # 16 tokens = 4 blocks; others 2 each
    assert s.blocks.num_hit_tokens == 16 and s.blocks.num_queried_tokens == 30


# --- the engine's worker thread -------------------------------------------------------------------


class FakeRunner:
    """Draws TOKEN for every sampling row; can be made to fail or to wait."""

    num_kv_blocks = 1000
    block_size = 4
    max_row_tokens = 200

    def __init__(self, step_s: float = 0.0) -> None:
        self.plans: list[StepPlan] = []
        self.fail: Exception | None = None
        self.gate = threading.Event()
        self.gate.set()
        self.step_s = step_s

    def execute(self, plan: StepPlan) -> StepOutput:
        self.gate.wait(10)
        time.sleep(self.step_s)
        self.plans.append(plan)
        if self.fail is not None:
            raise self.fail
        return output(plan)

    def info(self) -> dict:
        return {}


class Events:
    """A listener that records its request's events (on the worker thread)."""

    def __init__(self) -> None:
        self.events: list[EngineEvent] = []
        self.done = threading.Event()

    def __call__(self, event: EngineEvent) -> None:
        self.events.append(event)
        if event.error or any(u.finish_reason for u in event.updates):
            self.done.set()

    @property
    def tokens(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for event in self.events:
            for u in event.updates:
                out.setdefault(u.row_id, []).extend(u.token_ids)
        return out


def engine(runner: FakeRunner | None = None, **config) -> tuple[Engine, FakeRunner]:
    runner = runner or FakeRunner()
    config.setdefault("max_num_batched_tokens", 64)
    core = EngineCore(runner, SchedulerConfig(**config), eos_token_ids=[EOS])
    eng = Engine(core)
    eng.start()
    return eng, runner


def test_the_worker_steps_every_request_and_tells_its_listener() -> None:
    eng, _ = engine()
    listeners = [Events() for _ in range(3)]
    for i, listener in enumerate(listeners):
        eng.submit(rows(10 * i, 2, max_new=4), listener)
    for listener in listeners:
        assert listener.done.wait(10)
    eng.shutdown(5)
    for i, listener in enumerate(listeners):
        assert listener.tokens == {10 * i: [TOKEN] * 4, 10 * i + 1: [TOKEN] * 4}
        assert listener.events[0].admission is not None
    assert eng.num_requests == 0 and not eng.is_alive


def test_a_full_queue_refuses_at_submit_and_a_draining_engine_refuses_all() -> None:
    runner = FakeRunner()
    runner.gate.clear()  # the worker blocks in its first step
    eng, _ = engine(runner, max_queue_rows=4, max_batch_size=1)
    first = Events()
    eng.submit(rows(0, 3, max_new=2), first)
    deadline = time.monotonic() + 10
    while eng.num_waiting_rows != 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    eng.submit(rows(3, 2, max_new=2), Events())
    with pytest.raises(QueueFullError):
        eng.submit(rows(5, 1, max_new=2), Events())
    eng.drain()
    with pytest.raises(SchedulerClosedError):
        eng.submit(rows(6, 1, max_new=2), Events())
    runner.gate.set()
    eng.shutdown(10)
    assert first.done.is_set() and len(first.tokens) == 3


def test_shutdown_fails_what_is_still_running_with_scheduler_closed() -> None:
    runner = FakeRunner(step_s=0.01)
    eng, _ = engine(runner)
    listener = Events()
    eng.submit(rows(0, 1, max_new=150), listener)
    while not listener.events:
        time.sleep(0.01)
    eng.shutdown(0.05)
    assert isinstance(listener.events[-1].error, SchedulerClosedError)


def test_a_failing_step_fails_its_requests_and_the_worker_goes_on() -> None:
    runner = FakeRunner()
    eng, _ = engine(runner)
    runner.fail = RuntimeError("device lost")
    failed = Events()
    eng.submit(rows(0, 2, max_new=3), failed)
    assert failed.done.wait(10)
    assert "device lost" in str(failed.events[-1].error)
    runner.fail = None
    ok = Events()
    eng.submit(rows(5, 1, max_new=3), ok)
    assert ok.done.wait(10)
    eng.shutdown(5)
    assert ok.tokens == {5: [TOKEN] * 3}
    assert eng.is_alive is False


def test_an_aborted_request_stops_at_the_next_step() -> None:
    runner = FakeRunner(step_s=0.005)
    eng, _ = engine(runner)
    listener = Events()
    request_id = eng.submit(rows(0, 2, max_new=150), listener)
    deadline = time.monotonic() + 10
    while len(runner.plans) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    eng.abort(request_id)
    deadline = time.monotonic() + 10
    while eng.num_running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert eng.num_running == 0 and eng.num_requests == 0
    eng.shutdown(5)
