"""The prefix cache end to end: an engine on a tiny fp32 pair with the cache on and off.

Seeded rows draw from (seed, step) only, so a row's tokens must not depend on whether its
prompt's KV was computed for it or found in the cache; its log-probabilities may move by float
noise only. Each scenario runs twice, cache on and off, with the same arrivals, and also
asserts that the cache did what the scenario is about (hits, sharing, eviction): a test that
would pass with the cache doing nothing is worth nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

import httpx
import pytest
from engine_driver import Driver
from servers import client_of

from batchserve.api.app import ServerConfig, create_app
from batchserve.core.kv_blocks import cache_extra_key
from batchserve.core.scheduler import SchedulerConfig
from batchserve.core.types import EngineRow, RunnerConfig, SamplingParams, StepPlan
from batchserve.worker.models import ModelPair
from bench.report import parse_prometheus

BLOCK = 4
ATOL = 1e-5


def params(max_new_tokens: int) -> SamplingParams:
    return SamplingParams(
        temperature=1.0, top_p=1.0, max_new_tokens=max_new_tokens, ignore_eos=True, logprobs=True
    )


def tokens(n: int, start: int = 4) -> tuple[int, ...]:
    """n prompt ids, no special ones (0-3), cycling through the tiny vocabulary."""
    return tuple(4 + (start + i) % 60 for i in range(n))


class Run:
    """One engine, requests arriving at chosen steps, and every plan it executed."""

    def __init__(self, pair: ModelPair, *, cache: bool, kv_cache_tokens: int | None = None):
        runner = RunnerConfig(
            max_batch_size=16, kv_cache_tokens=kv_cache_tokens, block_size=BLOCK, compile=False
        )
        self.driver = Driver(pair, runner=runner, max_batch_size=16, enable_prefix_cache=cache)
        self.plans: list[StepPlan] = []
        self.running: list[list[int]] = []  # row ids running before each step
        execute = self.driver.core.runner.execute

        def recording(plan: StepPlan):
            self.plans.append(plan)
            return execute(plan)

        self.driver.core.runner.execute = recording  # type: ignore[method-assign]

    @property
    def blocks(self):
        return self.driver.scheduler.blocks

    def step(self) -> None:
        self.running.append([r.row_id for r in self.driver.scheduler.running])
        self.driver.step()

    def play(self, arrivals: dict[int, list[list[EngineRow]]]) -> Run:
        """Add each request at its step (before that step is planned), then run to the end."""
        for step in range(max(arrivals) + 1):
            for rows in arrivals.get(step, []):
                self.driver.add(rows)
            self.step()
        while self.driver.scheduler.has_work:
            self.step()
        return self

    def prompt_tokens_computed(self, row_id: int) -> int:
        """Prompt tokens this row fed the models (its prefill chunks; a decode step has step >= 1)."""
        return sum(
            len(r.token_ids)
            for p in self.plans
            for r in p.rows
            if r.row_id == row_id and r.step == 0
        )


def rows(start: int, prompt: Sequence[int], n: int, max_new: int) -> list[EngineRow]:
    return [
        EngineRow(start + i, tuple(prompt), params(max_new), seed=100 + start + i) for i in range(n)
    ]


def assert_same_outputs(on: Run, off: Run) -> None:
    """Same tokens, log-probabilities within 1e-5, for every row of both runs."""
    a, b = on.driver, off.driver
    assert a.finish == b.finish and set(a.finish) and not a.errors and not b.errors
    assert set(a.tokens) == set(b.tokens)
    for row_id, row_tokens in a.tokens.items():
        assert row_tokens == b.tokens[row_id], row_id
        for x, y in zip(a.logprobs[row_id], b.logprobs[row_id], strict=True):
            assert x == pytest.approx(y, abs=ATOL), row_id


def both(pair: ModelPair, arrivals: dict[int, list[list[EngineRow]]], **kwargs) -> tuple[Run, Run]:
    return Run(pair, cache=True, **kwargs).play(arrivals), Run(pair, cache=False, **kwargs).play(
        arrivals
    )


# --- outputs with the cache on and off ------------------------------------------------------------


@pytest.mark.parametrize("prompt_len", [16, 17])  # exactly 4 full blocks; 4 blocks + 1 token
def test_a_prompt_that_hits_entirely_gives_the_same_outputs(
    llama_pair: ModelPair, prompt_len: int
) -> None:
    prompt = tokens(prompt_len)
    # The same prompt again while the first row still holds its blocks (step 2), and once
    # every row is done and the blocks wait in the free queue, keys kept (step 12).
    arrivals = {0: [rows(0, prompt, 1, 6)], 2: [rows(1, prompt, 1, 6)], 12: [rows(2, prompt, 1, 6)]}
    on, off = both(llama_pair, arrivals)
    assert_same_outputs(on, off)
    hit = (prompt_len - 1) // BLOCK * BLOCK  # the last token is always computed
    assert on.blocks.num_hit_tokens == 2 * hit and on.blocks.num_queried_tokens == 3 * prompt_len
    assert [on.prompt_tokens_computed(r) for r in range(3)] == [prompt_len] + [prompt_len - hit] * 2
    assert [off.prompt_tokens_computed(r) for r in range(3)] == [prompt_len] * 3
    assert off.blocks.num_hit_tokens == 0


def test_a_hit_of_several_blocks_then_a_partial_block_gives_the_same_outputs(
    llama_pair: ModelPair,
) -> None:
    shared = tokens(12, start=20)  # three full blocks
    first = (*shared, *tokens(3, start=40))
    second = (*shared, *tokens(6, start=50))  # one more full block, then 2 tokens
    arrivals = {0: [rows(0, first, 1, 8)], 2: [rows(1, second, 3, 8)]}
    on, off = both(llama_pair, arrivals)
    assert_same_outputs(on, off)
    # The second prompt's first sample reads the 3 shared blocks and computes 6 tokens; its
    # other two samples also share the 4th block that sample wrote in the same step.
    assert [on.prompt_tokens_computed(r) for r in (1, 2, 3)] == [6, 2, 2]
    assert on.blocks.num_hit_tokens == 12 + 2 * 16


def test_the_n_samples_of_a_prompt_write_its_blocks_once(llama_pair: ModelPair) -> None:
    prompt = tokens(22)  # 5 full blocks and 2 tokens
    run = Run(llama_pair, cache=True)
    run.driver.add(rows(0, prompt, 4, 6))
    run.step()
    allocations = [r.allocation for r in run.driver.scheduler.running]
    assert len(allocations) == 4
    shared = allocations[0].block_ids[:5]
    assert all(a.block_ids[:5] == shared for a in allocations)
    assert [run.blocks.ref_count(b) for b in shared] == [4] * 5  # written once, referenced 4 times
    owned = [set(a.block_ids[5:]) for a in allocations]  # the partial block and the tails
    assert sum(len(o) for o in owned) == len(set().union(*owned))
    assert [run.prompt_tokens_computed(r) for r in range(4)] == [22, 2, 2, 2]


def test_eviction_under_pressure_spares_the_blocks_rows_still_use(llama_pair: ModelPair) -> None:
    long_prompt = tokens(10, start=0)  # 2 full blocks shared by the two long rows
    # 32 blocks: the long rows hold 13 + 11, so the short prompts' cached blocks (2 each) are
    # soon all that is free, and each new short prompt must evict older ones.
    shorts = [tokens(9, start=11 + 7 * i) for i in range(6)]
    arrivals = {
        0: [rows(0, long_prompt, 2, 40)],
        1: [rows(10 + i, p, 1, 3) for i, p in enumerate(shorts)],
        # Later, while the long rows run: their prompt again, and the first short prompt again.
        24: [rows(30, long_prompt, 1, 3), rows(31, shorts[0], 1, 3)],
    }
    on, off = both(llama_pair, arrivals, kv_cache_tokens=32 * BLOCK)
    assert_same_outputs(on, off)
    assert on.blocks.num_evicted_blocks > 0
    assert all(0 in running and 1 in running for running in on.running[1:25])
    assert on.prompt_tokens_computed(30) == 2  # the long rows' blocks survived the pressure
    assert on.prompt_tokens_computed(31) == 9  # the first short prompt's blocks were evicted


def test_sixteen_samples_fit_with_the_cache_where_sixteen_copies_do_not(
    llama_pair: ModelPair,
) -> None:
    prompt, max_new = tokens(40), 8
    # One copy of the prompt (10 blocks) and 16 tails (2 blocks of tokens and the partial one:
    # 3 blocks each) fit in 58 blocks; 16 copies (12 blocks each, 192) do not: at most 4 rows.
    kv_tokens = 58 * BLOCK
    assert 16 * len(prompt) > kv_tokens >= len(prompt) + 16 * max_new
    arrivals = {0: [rows(0, prompt, 16, max_new)]}
    on, off = both(llama_pair, arrivals, kv_cache_tokens=kv_tokens)
    assert_same_outputs(on, off)
    assert len(on.running[1]) == 16  # served at once: all sixteen admitted in the first step
    assert len(on.plans) == max_new
    assert max(len(r) for r in off.running) == 4  # queued: four rows at a time
    assert len(off.plans) == 4 * max_new


# --- keys ----------------------------------------------------------------------------------------


def test_rows_hit_only_blocks_cached_under_the_same_pair_and_salt(llama_pair: ModelPair) -> None:
    assert cache_extra_key(("a", "b")) != cache_extra_key(("b", "a"))
    assert cache_extra_key(("ab", "c")) != cache_extra_key(("a", "bc"))
    assert cache_extra_key(("a", "b"), "s") != cache_extra_key(("a", "b"))
    prompt = tokens(12)
    run = Run(llama_pair, cache=True)
    salted = [EngineRow(i, prompt, params(2), seed=i, cache_salt=salt) for i, salt in
              enumerate(["x", "y", None, "x"])]  # fmt: skip
    for row in salted:
        run.driver.add([row])
        run.step()
    assert [run.prompt_tokens_computed(i) for i in range(4)] == [12, 12, 12, 4]
    assert run.driver.scheduler.model_ids == ("tiny-llama-after", "tiny-llama-before")


# --- over HTTP -----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def serving(
    pair: ModelPair, cache: bool, kv_cache_tokens: int | None = None, max_batch_size: int = 8
) -> AsyncIterator[httpx.AsyncClient]:
    config = ServerConfig(
        scheduler=SchedulerConfig(max_batch_size=max_batch_size, enable_prefix_cache=cache),
        runner=RunnerConfig(block_size=BLOCK, kv_cache_tokens=kv_cache_tokens, compile=False),
    )
    async with client_of(create_app(config, pair=pair)) as c:
        yield c


async def cache_counts(client: httpx.AsyncClient) -> tuple[float, float]:
    values = parse_prometheus((await client.get("/metrics")).text)
    return (
        values["batchserve_prefix_cache_queried_tokens_total"],
        values["batchserve_prefix_cache_hit_tokens_total"],
    )


@pytest.mark.parametrize("cache", [True, False])
async def test_info_shows_the_setting_and_metrics_count_queried_and_hit_tokens(
    llama_pair: ModelPair, cache: bool
) -> None:
    body = {"prompts": ["the cat sat on the mat and ran far away"], "n": 4, "max_new_tokens": 2}
    async with serving(llama_pair, cache) as client:
        info = (await client.get("/info")).json()
        assert info["scheduler"]["enable_prefix_cache"] is cache
        assert info["engine"]["kv_block_size"] == BLOCK
        resp = await client.post("/generate_lda_batch", json=body)
        assert resp.status_code == 200, resp.text
        queried, hits = await cache_counts(client)
    if not cache:
        assert (queried, hits) == (0, 0)
        return
    prompt_len = queried / 4
    assert prompt_len > 8 and hits == 3 * ((prompt_len - 1) // BLOCK * BLOCK)


async def test_cache_salt_separates_requests_over_http(llama_pair: ModelPair) -> None:
    body = {"prompt": "tell me a story about the cat and the dog", "max_new_tokens": 2}
    async with serving(llama_pair, cache=True) as client:
        hits = []
        for salt in ("alice", "bob", None, "alice"):
            extra = {} if salt is None else {"cache_salt": salt}
            resp = await client.post("/generate_lda", json=body | extra)
            assert resp.status_code == 200, resp.text
            hits.append((await cache_counts(client))[1])
        assert hits[:3] == [0, 0, 0] and hits[3] > 0  # only the second "alice" hits
        completion = {"model": "tiny-llama-after", "prompt": "the cat sat on the mat and ran",
                      "max_tokens": 2, "cache_salt": "carol"}  # fmt: skip
        for _ in range(2):
            resp = await client.post("/v1/completions", json=completion)
            assert resp.status_code == 200, resp.text
        assert (await cache_counts(client))[1] > hits[3]
        # An empty salt is refused, naming the field (OpenAI's routes answer 400, as OpenAI).
        for route, bad, status in (
            ("/generate_lda", body, 422),
            ("/v1/completions", completion, 400),
        ):
            resp = await client.post(route, json=bad | {"cache_salt": ""})
            assert resp.status_code == status and "cache_salt" in resp.text


@pytest.mark.parametrize("cache", [True, False])
async def test_sixteen_samples_over_http_run_at_once_only_with_the_cache(
    llama_pair: ModelPair, cache: bool
) -> None:
    """The server's side of the n = 16 case: its step headers show one wave or four."""
    words = " ".join(["the cat sat on the mat"] * 7).split()[:39]
    body = {"prompts": [" ".join(words)], "n": 16, "max_new_tokens": 8, "seed": 1,
            "ignore_eos": True, "apply_chat_template": False}  # fmt: skip
    async with serving(llama_pair, cache, kv_cache_tokens=58 * BLOCK, max_batch_size=16) as client:
        resp = await client.post("/generate_lda_batch", json=body)
        assert resp.status_code == 200, resp.text
        queried, _ = await cache_counts(client)
    assert [r["tokens_generated"] for r in resp.json()["results"]] == [8] * 16
    steps = int(resp.headers["x-batchserve-finished-step"]) - int(
        resp.headers["x-batchserve-admitted-step"]
    )
    if cache:
        assert queried == 16 * 39  # 39 words, one token each (raw, no BOS)
        assert steps == 8  # one wave: every row admitted at once, done 8 tokens later
    else:
        assert steps >= 4 * 8 - 1  # four waves of four rows, one after the other
