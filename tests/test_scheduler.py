"""The scheduler: its core by hand (no thread, no clock), its shell against a fake engine."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace

import pytest

from batchserve.core.types import (
    Capacity,
    EngineRow,
    GenerationRequest,
    GenerationResult,
    Row,
    SamplingParams,
)
from batchserve.metrics import Metrics
from batchserve.scheduler import (
    EngineFailedError,
    PromptTooLongError,
    QueueFullError,
    Scheduler,
    SchedulerConfig,
    SchedulerCore,
)


class FakeEngine:
    """Each row finishes after max_new_tokens steps; records every admission."""

    def __init__(self, max_context: int = 100, num_blocks: int = 10_000, slots: int = 64) -> None:
        self.pair = SimpleNamespace(max_context=max_context)
        self.max_row_tokens = max_context
        self.rows: dict[int, Row] = {}
        self.blocks: dict[int, int] = {}  # row id -> blocks held (one per token)
        self.num_blocks, self.slots = num_blocks, slots
        self.admissions: list[tuple[int, list[int]]] = []  # (step, row ids)
        self.num_steps = 0

    @property
    def num_free_slots(self) -> int:
        return self.slots - len(self.rows)

    def capacity(self) -> Capacity:
        return Capacity(
            len(self.rows), self.num_free_slots, self.num_free_blocks, 1, self.num_steps
        )

    @property
    def num_free_blocks(self) -> int:
        return self.num_blocks - sum(self.blocks.values())

    def blocks_needed(self, num_prompt_tokens: int, max_new_tokens: int) -> int:
        return num_prompt_tokens + max_new_tokens

    def format(self, prompt, system_prompt=None, prompt_format=None) -> str:
        return prompt

    def encode(self, formatted, prompt_format=None) -> list[int]:
        return [ord(c) for c in formatted]

    @property
    def num_running(self) -> int:
        return len(self.rows)

    @property
    def running_row_ids(self) -> list[int]:
        return list(self.rows)

    @property
    def running_rows(self) -> list[Row]:
        return list(self.rows.values())

    def admit(self, rows: list[EngineRow]) -> list[Row]:
        self.admissions.append((self.num_steps, [r.row_id for r in rows]))
        need = sum(self.blocks_needed(len(r.prompt_ids), r.params.max_new_tokens) for r in rows)
        assert len(rows) <= self.num_free_slots and need <= self.num_free_blocks
        for r in rows:
            self.rows[r.row_id] = Row(r.row_id, r.params, r.seed, [1])
            self.blocks[r.row_id] = self.blocks_needed(len(r.prompt_ids), r.params.max_new_tokens)
        return self._finished()

    def step(self) -> list[Row]:
        self.num_steps += 1
        for row in self.rows.values():
            row.token_ids.append(1)
        return self._finished()

    def _finished(self) -> list[Row]:
        done = [r for r in self.rows.values() if len(r.token_ids) >= r.params.max_new_tokens]
        for r in done:
            r.finish_reason = "length"
            del self.rows[r.row_id]
            del self.blocks[r.row_id]
        return done

    def cancel(self, row_ids) -> list[Row]:
        gone = [self.rows.pop(i) for i in list(row_ids) if i in self.rows]
        for r in gone:
            del self.blocks[r.row_id]
        return gone

    def build_result(self, prompt, formatted, row) -> GenerationResult:
        return GenerationResult(
            prompt,
            formatted,
            "x" * len(row.token_ids),
            formatted,
            len(row.token_ids),
            False,
            "length",
            row.seed,
            row.params.alpha,
        )


def request(prompt: str, max_new_tokens: int = 5, n: int = 1) -> GenerationRequest:
    return GenerationRequest(prompt, SamplingParams(max_new_tokens=max_new_tokens, seed=1), n=n)


@contextlib.asynccontextmanager
async def running(scheduler: Scheduler) -> AsyncIterator[Scheduler]:
    """The scheduler's worker thread for the block; shut down (5 s grace) however it ends."""
    scheduler.start()
    try:
        yield scheduler
    finally:
        await asyncio.to_thread(scheduler.shutdown, 5)


async def first_admission(engine: FakeEngine) -> None:
    while not engine.admissions:
        await asyncio.sleep(0.001)


async def settle(*futures, return_exceptions: bool = False) -> list:
    return await asyncio.wait_for(
        asyncio.gather(*futures, return_exceptions=return_exceptions), timeout=30
    )


async def run(scheduler: Scheduler, batches: list[list[GenerationRequest]]) -> list:
    async with running(scheduler):
        return await settle(*[scheduler.submit(b)[1] for b in batches])


async def test_admission_respects_max_batch_size_and_fifo() -> None:
    engine = FakeEngine()
    scheduler = Scheduler(engine, SchedulerConfig(max_batch_size=3, max_wait_ms=50))
    done = await run(
        scheduler, [[request("a", 4)], [request("b", 4), request("c", 4)], [request("d", 4)]]
    )
    assert [len(c.results) for c in done] == [1, 2, 1]
    admitted = [rid for _, ids in engine.admissions for rid in ids]
    assert admitted == [0, 1, 2, 3]  # FIFO
    assert engine.admissions[0][1] == [0, 1, 2]  # the batch filled up to max_batch_size
    assert max(len(ids) for _, ids in engine.admissions) <= 3


async def test_a_request_larger_than_the_batch_is_admitted_over_several_steps() -> None:
    engine = FakeEngine()
    scheduler = Scheduler(engine, SchedulerConfig(max_batch_size=2, max_wait_ms=0))
    (done,) = await run(scheduler, [[request("p", 3, n=5)]])
    assert len(done.results) == 5
    assert [ids for _, ids in engine.admissions] == [[0, 1], [2, 3], [4]]


async def test_prefill_tokens_are_capped_per_admission_but_one_prompt_always_goes() -> None:
    engine = FakeEngine()
    scheduler = Scheduler(
        engine, SchedulerConfig(max_batch_size=8, max_prefill_tokens=10, max_wait_ms=50)
    )
    await run(scheduler, [[request("x" * 6, 3), request("y" * 6, 3), request("z" * 30, 3, n=2)]])
    sizes = [ids for _, ids in engine.admissions]
    assert sizes[0] == [0]  # 6 + 6 tokens would exceed 10
    assert [2, 3] in sizes  # a 30-token prompt goes alone; its two samples share one prefill


async def test_static_mode_never_joins_a_running_batch() -> None:
    engine = FakeEngine()
    scheduler = Scheduler(engine, SchedulerConfig(mode="static", max_batch_size=8, max_wait_ms=0))
    async with running(scheduler):
        _, first = scheduler.submit([request("a", 30)])
        await first_admission(engine)
        _, second = scheduler.submit([request("b", 2)])
        await settle(first, second)
    (step_a, _), (step_b, _) = engine.admissions
    assert step_b >= 29  # after the first batch ran to completion


async def test_serial_mode_admits_one_request_at_a_time() -> None:
    engine = FakeEngine()
    scheduler = Scheduler(engine, SchedulerConfig(mode="serial", max_batch_size=8))
    await run(scheduler, [[request("a", 3), request("b", 3)], [request("c", 3)]])
    assert [ids for _, ids in engine.admissions] == [[0, 1], [2]]


async def test_full_queue_and_too_long_prompts_are_refused() -> None:
    engine = FakeEngine(max_context=10)
    metrics = Metrics()
    scheduler = Scheduler(engine, SchedulerConfig(max_queue_rows=2), metrics)
    with pytest.raises(PromptTooLongError, match="beyond the 10 tokens a row can hold"):
        scheduler.prepare(request("x" * 8, 5))
    scheduler.submit([request("a"), request("b")])  # not started: rows stay queued
    with pytest.raises(QueueFullError, match="queue full"):
        scheduler.submit([request("c")])
    assert scheduler.num_waiting_rows == 2


async def test_cancelled_waiting_rows_never_reach_the_engine() -> None:
    engine = FakeEngine()
    scheduler = Scheduler(engine, SchedulerConfig(max_batch_size=1, max_wait_ms=0))
    request_id, future = scheduler.submit([request("gone", 3, n=3)])
    scheduler.cancel(request_id)
    async with running(scheduler):
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(future, timeout=10)
        _, ok = scheduler.submit([request("kept", 2)])
        await asyncio.wait_for(ok, timeout=10)
    assert [ids for _, ids in engine.admissions] == [[3]]
    assert scheduler.num_waiting_rows == 0


async def test_rows_wait_in_order_for_kv_blocks_and_never_overcommit_the_store() -> None:
    engine = FakeEngine(num_blocks=20)  # "p" + 9 new tokens = 10 blocks: two rows at a time
    scheduler = Scheduler(engine, SchedulerConfig(max_batch_size=8, max_wait_ms=0))
    done = await run(scheduler, [[request("p", 9)] for _ in range(7)])
    assert len(done) == 7
    admitted = [rid for _, ids in engine.admissions for rid in ids]
    assert admitted == list(range(7))
    assert max(len(ids) for _, ids in engine.admissions) <= 2


class FlakyEngine(FakeEngine):
    """Raises while admitting rows whose prompt is "bad", or in the steps it is told to."""

    def __init__(self, fail_steps: set[int] = frozenset(), **kwargs) -> None:
        super().__init__(**kwargs)
        self.fail_steps = set(fail_steps)

    def admit(self, rows):
        if any(r.prompt_ids == tuple(ord(c) for c in "bad") for r in rows):
            raise OverflowError("Overflow when unpacking long long")
        return super().admit(rows)

    def step(self):
        if self.num_steps in self.fail_steps:
            self.fail_steps.discard(self.num_steps)
            raise RuntimeError("injected step fault")
        return super().step()


async def test_a_row_failing_admission_fails_only_its_own_request() -> None:
    engine = FlakyEngine()
    scheduler = Scheduler(engine, SchedulerConfig(max_batch_size=8, max_wait_ms=50))
    async with running(scheduler):
        _, good1 = scheduler.submit([request("a", 4)])
        _, bad = scheduler.submit([request("bad", 4), request("c", 4)])
        _, good2 = scheduler.submit([request("d", 4, n=2)])
        results = await settle(good1, bad, good2, return_exceptions=True)
    assert isinstance(results[1], EngineFailedError)
    assert "Overflow" in str(results[1])
    assert [len(results[0].results), len(results[2].results)] == [1, 2]
    assert all(r.tokens_generated == 4 for r in results[0].results + results[2].results)
    admitted = {rid for _, ids in engine.admissions for rid in ids}
    assert 2 not in admitted  # the bad request's sibling row was never run


async def test_a_failed_step_is_retried_and_every_request_completes() -> None:
    engine = FlakyEngine(fail_steps={2})
    scheduler = Scheduler(engine, SchedulerConfig(max_batch_size=8, max_wait_ms=10))
    done = await run(scheduler, [[request("a", 5)], [request("b", 5, n=3)]])
    assert [len(c.results) for c in done] == [1, 3]
    assert all(r.tokens_generated == 5 for c in done for r in c.results)


async def test_a_row_that_errors_in_a_step_fails_only_its_own_request() -> None:
    engine = FakeEngine()
    real_step = engine.step

    def step_with_one_bad_row():
        finished = real_step()
        row = engine.rows.get(1)
        if row is not None and len(row.token_ids) == 3:
            row.finish_reason, row.error = "error", "stop check raised"
            del engine.rows[1], engine.blocks[1]
            finished.append(row)
        return finished

    engine.step = step_with_one_bad_row
    scheduler = Scheduler(engine, SchedulerConfig(max_batch_size=8, max_wait_ms=50))
    async with running(scheduler):
        futures = [scheduler.submit([request(p, 6)])[1] for p in "abc"]
        results = await settle(*futures, return_exceptions=True)
    assert isinstance(results[1], EngineFailedError) and "stop check raised" in str(results[1])
    assert [r.results[0].tokens_generated for r in (results[0], results[2])] == [6, 6]


# --- the core, by hand: no thread, no clock, no engine --------------------------------------


def rows_of(start: int, prompt: str, n: int = 1, max_new_tokens: int = 4) -> list[EngineRow]:
    params = SamplingParams(max_new_tokens=max_new_tokens)
    ids = tuple(ord(c) for c in prompt)
    return [EngineRow(start + j, ids, params, seed=start + j) for j in range(n)]


def finish(rows: list[EngineRow]) -> list[Row]:
    return [Row(r.row_id, r.params, r.seed, [1] * r.params.max_new_tokens, "length") for r in rows]


def capacity(running: int = 0, slots: int = 8, blocks: int = 1000, step: int = 0) -> Capacity:
    return Capacity(running, slots - running, blocks, block_size=4, step=step)


def test_core_admits_first_in_first_out_up_to_the_batch_and_the_free_slots() -> None:
    core = SchedulerCore(SchedulerConfig(max_batch_size=3, max_wait_ms=0))
    core.add(0, rows_of(0, "a"), now=0)
    core.add(1, rows_of(1, "b", n=2), now=0)
    core.add(2, rows_of(3, "c"), now=0)
    plan = core.schedule(capacity(), now=0)
    assert [r.row_id for r in plan.admit] == [0, 1, 2] and plan.wait_s is None
    assert core.num_waiting_rows == 1
    assert core.schedule(capacity(running=3, slots=3), now=0).admit == []  # no free slot
    done = core.update(finish(plan.admit))
    assert [(d.request_id, [r.row_id for r in d.rows]) for d in done] == [(0, [0]), (1, [1, 2])]
    assert [r.row_id for r in core.schedule(capacity(), now=1).admit] == [3]


def test_core_waits_for_kv_blocks_in_order() -> None:
    core = SchedulerCore(SchedulerConfig(max_batch_size=8, max_wait_ms=0))
    core.add(0, rows_of(0, "x" * 8, max_new_tokens=8), now=0)  # 16 tokens = 4 blocks
    core.add(1, rows_of(1, "y"), now=0)  # small, but behind a row that does not fit
    assert core.schedule(capacity(running=1, blocks=3), now=0).admit == []
    assert [r.row_id for r in core.schedule(capacity(running=1, blocks=5), now=0).admit] == [0]
    assert [r.row_id for r in core.schedule(capacity(running=1, blocks=2), now=0).admit] == [1]


def test_core_gives_an_idle_first_group_max_wait_ms_to_gather() -> None:
    core = SchedulerCore(SchedulerConfig(max_batch_size=4, max_wait_ms=50))
    assert core.schedule(capacity(), now=0).wait_s == pytest.approx(0.1)  # nothing at all
    core.add(0, rows_of(0, "a"), now=10.0)
    plan = core.schedule(capacity(), now=10.02)
    assert plan.admit == [] and plan.wait_s == pytest.approx(0.03)
    plan = core.schedule(capacity(), now=10.06)
    assert [r.row_id for r in plan.admit] == [0] and plan.queue_waits_s == [pytest.approx(0.06)]


def test_core_static_and_serial_modes_never_join_a_running_batch() -> None:
    for mode in ("static", "serial"):
        core = SchedulerCore(SchedulerConfig(mode=mode, max_batch_size=8, max_wait_ms=0))
        core.add(0, rows_of(0, "a", n=2), now=0)
        core.add(1, rows_of(2, "b"), now=0)
        first = core.schedule(capacity(), now=0).admit
        assert [r.row_id for r in first] == ([0, 1] if mode == "serial" else [0, 1, 2])
        assert core.schedule(capacity(running=len(first)), now=0).admit == []


def test_core_caps_prefill_tokens_but_one_prompt_always_goes() -> None:
    core = SchedulerCore(SchedulerConfig(max_batch_size=8, max_prefill_tokens=10, max_wait_ms=0))
    core.add(0, rows_of(0, "x" * 6), now=0)
    core.add(1, rows_of(1, "y" * 6), now=0)
    core.add(2, rows_of(2, "z" * 30, n=2), now=0)
    assert [r.row_id for r in core.schedule(capacity(), now=0).admit] == [0]
    assert [r.row_id for r in core.schedule(capacity(running=1), now=0).admit] == [1]
    assert [r.row_id for r in core.schedule(capacity(running=2), now=0).admit] == [2, 3]


def test_core_abort_forgets_waiting_and_running_rows() -> None:
    core = SchedulerCore(SchedulerConfig(max_batch_size=1, max_wait_ms=0))
    core.add(0, rows_of(0, "a", n=3), now=0)
    admitted = core.schedule(capacity(), now=0).admit
    assert core.abort(0) == (2, [0, 1, 2])
    assert core.num_waiting_rows == 0 and not core.has_requests
    assert core.update(finish(admitted)) == []  # a late finished row of an aborted request


def test_core_refuses_rows_beyond_the_queue_limit() -> None:
    core = SchedulerCore(SchedulerConfig(max_queue_rows=2))
    core.add(0, rows_of(0, "a", n=2), now=0)
    with pytest.raises(QueueFullError):
        core.add(1, rows_of(2, "b"), now=0)


async def test_a_request_finished_at_admission_resolves_even_when_that_steps_fails_twice() -> None:
    class DoubleFault(FakeEngine):
        faults = 0

        def step(self):
            if len(self.admissions) >= 2 and self.faults < 2:
                self.faults += 1
                raise RuntimeError("injected double fault")
            time.sleep(0.001)  # so b is still running when a arrives
            return super().step()

    engine = DoubleFault(max_context=10_000)
    scheduler = Scheduler(engine, SchedulerConfig(max_batch_size=8, max_wait_ms=0))
    async with running(scheduler):
        _, slow = scheduler.submit([request("b", 5000)])
        await first_admission(engine)
        _, quick = scheduler.submit([request("a", 1)])
        results = await settle(slow, quick, return_exceptions=True)
    assert isinstance(results[0], EngineFailedError)
    assert results[1].results[0].tokens_generated == 1
    assert scheduler.request_ids == []


async def test_a_listener_gets_each_token_of_its_rows_once_before_the_result() -> None:
    engine = FakeEngine()
    scheduler = Scheduler(engine, SchedulerConfig(max_batch_size=2, max_wait_ms=0))
    seen: list = []
    async with running(scheduler):
        _, future = scheduler.submit([request("p", 4, n=3)], listener=seen.extend)
        future.add_done_callback(lambda _: seen.append("resolved"))
        _, other = scheduler.submit([request("q", 2)])  # not listening: sends nothing
        await settle(future, other)
        await asyncio.sleep(0)
    assert seen[-1] == "resolved"
    tokens: dict[int, list[int]] = {}
    for index, ids in seen[:-1]:
        tokens.setdefault(index, []).extend(ids)
    # Row 2 waited for a free slot (max_batch_size 2) and still streams under its own index.
    assert tokens == {0: [1] * 4, 1: [1] * 4, 2: [1] * 4}
