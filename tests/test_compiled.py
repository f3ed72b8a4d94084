"""The compiled step (torch.compile over both models and paged attention) gives the eager
step's results, and a steady stream of steps never recompiles it."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from engine_driver import Driver, assert_matches_reference, rows_for
from tiny_models import SAMPLE_WORDS, build_pair, reference_models

from batchserve.core.types import RunnerConfig, SamplingParams
from batchserve.worker import native
from batchserve.worker.runner import ModelRunner

pytestmark = pytest.mark.slow

PROMPTS = [
    "hello",
    "the cat sat on the mat",
    "tell me a story about the dog and the cat that ran far away",
    "write me a poem about mango pudding",
]
GREEDY = SamplingParams(alpha=1.5, temperature=0.0, max_new_tokens=10, ignore_eos=True)
SAMPLED = SamplingParams(alpha=2.0, temperature=1.0, top_p=0.9, max_new_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module", params=[True, False], ids=["c-attention", "torch-attention"])
def compiled(request) -> tuple:
    """One compiled runner per decode attention (compiling takes seconds): the C kernel (the
    CPU default) and inductor's fused kernel (where the C one is off); its pair, references."""
    if request.param and not native.available():
        pytest.skip("no C compiler on this machine")
    pair = build_pair("llama")
    config = RunnerConfig(max_batch_size=32, compile=True, native_attention=request.param)
    runner = ModelRunner(pair, config)
    assert runner.is_compiled and runner.compile_s is not None
    assert runner.native_attention is request.param
    return pair, runner, reference_models("llama")


def driver_over(runner: ModelRunner, **scheduler: object) -> Driver:
    return Driver.over(runner, **scheduler)


def eager(pair, **scheduler: object) -> Driver:
    return Driver(pair, runner=RunnerConfig(max_batch_size=32, compile=False), **scheduler)


def run_all(driver: Driver, rows: list) -> Driver:
    """`rows` added at once and run to the end."""
    driver.add(rows)
    driver.run()
    return driver


def test_compiled_rows_match_single_prompt_logits_alone_batched_and_admitted_mid_run(
    compiled,
) -> None:
    pair, runner, models = compiled
    params = dataclasses.replace(GREEDY, logprobs=True)
    driver = driver_over(runner)
    first = rows_for(pair, PROMPTS[:2], params)
    driver.add(first)
    for _ in range(4):
        driver.step()
    late = rows_for(pair, PROMPTS[2:], params, start=2)
    driver.add(late)
    driver.run()
    assert_matches_reference(driver, models, first + late, pair.vocab_limit)
    alone = driver_over(runner)
    alone.add(late[:1])
    alone.run()
    assert alone.tokens[2] == driver.tokens[2]


def test_compiled_chunked_prefill_matches_one_piece(compiled) -> None:
    pair, runner, models = compiled
    params = dataclasses.replace(GREEDY, logprobs=True)
    rows = rows_for(pair, [" ".join([PROMPTS[2]] * 4), PROMPTS[0]], params)
    chunked = run_all(driver_over(runner, max_num_batched_tokens=7, max_batch_size=2), rows)
    assert chunked.tokens == run_all(driver_over(runner), rows).tokens
    assert_matches_reference(chunked, models, rows, pair.vocab_limit)


def test_compiled_and_eager_steps_draw_the_same_seeded_tokens(compiled) -> None:
    pair, runner, _ = compiled
    prompts = [" ".join(SAMPLE_WORDS[: 1 + 3 * i]) for i in range(6)]
    results = []
    for driver in (driver_over(runner), eager(pair)):
        driver.add(rows_for(pair, prompts, dataclasses.replace(SAMPLED, logprobs=True)))
        driver.run()
        results.append(driver)
    compiled_run, eager_run = results
    assert compiled_run.tokens == eager_run.tokens
    for row_id, entries in compiled_run.logprobs.items():
        for got, want in zip(entries, eager_run.logprobs[row_id], strict=True):
            assert got == pytest.approx(want, abs=1e-4)


def test_a_steady_stream_of_steps_never_recompiles(compiled) -> None:
    pair, runner, _ = compiled
    driver = driver_over(runner, max_num_batched_tokens=64)
    prompts = [" ".join(SAMPLE_WORDS[: 2 + i % 12]) for i in range(40)]
    with torch._dynamo.config.patch(error_on_recompile=True):
        # Rows come and go: batch sizes 1 to 24, prompt chunks beside decoding rows.
        for i in range(0, 40, 4):
            driver.add(rows_for(pair, prompts[i : i + 4], SAMPLED, start=i))
            for _ in range(3):
                driver.step()
        driver.run()
    assert all(len(driver.tokens[i]) == 12 for i in range(40))
