"""The engine gives every row exactly its single-prompt result, whatever step it runs in:
alone or in a batch, admitted mid-run, prefilled in one piece or in chunks."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from engine_driver import (
    Driver,
    assert_matches_reference,
    assert_steps_read_the_device_once,
    encode,
    reference_next_logits,
    rows_for,
)
from tiny_models import SAMPLE_WORDS, build_pair, make_tokenizer, reference_models

from batchserve.core.scheduler import PromptTooLongError, SchedulerConfig
from batchserve.core.seeds import sample_seeds
from batchserve.core.types import EngineRow, GenerationRequest, RunnerConfig, SamplingParams
from batchserve.engine import generate, iter_generate
from batchserve.worker.models import ModelPair, pair_from_models
from batchserve.worker.runner import ModelRunner

PROMPTS = [
    "hello",
    "the cat sat on the mat",
    "tell me a story about the dog and the cat that ran far away",
    "a poem",
    "write me a poem about mango pudding",
    "the dog ran",
]
GREEDY = SamplingParams(alpha=1.5, temperature=0.0, max_new_tokens=12, ignore_eos=True)
WITH_LOGPROBS = dataclasses.replace(GREEDY, logprobs=True)
FAMILIES = ["llama", "gpt2", "qwen2", "qwen3", "mistral", "olmo2"]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> tuple[ModelPair, tuple]:
    """A tiny pair of each family, and eager transformers copies of its models as references."""
    return build_pair(request.param), reference_models(request.param)


def test_each_row_matches_its_single_prompt_logits_at_prefill_and_every_step(family) -> None:
    pair, models = family
    driver = Driver(pair)
    rows = rows_for(pair, PROMPTS, WITH_LOGPROBS)
    driver.add(rows)
    driver.run()
    assert_matches_reference(driver, models, rows, pair.vocab_limit)


def test_rows_admitted_mid_run_beside_other_lengths_match_single_prompt_logits(family) -> None:
    pair, models = family
    driver = Driver(pair)
    params = dataclasses.replace(WITH_LOGPROBS, max_new_tokens=20)
    first = rows_for(pair, PROMPTS[:2], params)
    driver.add(first)
    for _ in range(5):
        driver.step()
    late = rows_for(pair, PROMPTS[2:4], params, start=2)
    driver.add(late)  # their prompts ride in the same forward as rows 5 tokens in
    driver.step()
    assert driver.scheduler.num_running == 4
    assert all(len(driver.tokens[r.row_id]) == 6 for r in first)
    assert all(len(driver.tokens[r.row_id]) == 1 for r in late)
    driver.run()
    assert_matches_reference(driver, models, first + late, pair.vocab_limit)


@pytest.mark.parametrize("budget", [5, 16])
def test_a_prompt_prefilled_in_chunks_matches_one_piece_and_running_rows_never_stall(
    budget: int,
) -> None:
    pair, models = build_pair("llama"), reference_models("llama")
    params = dataclasses.replace(WITH_LOGPROBS, max_new_tokens=8)
    driver = Driver(pair, max_num_batched_tokens=budget, max_batch_size=2)
    running = rows_for(pair, PROMPTS[:1], params)
    driver.add(running)
    while not driver.tokens[0]:
        driver.step()
    long = rows_for(pair, [" ".join([PROMPTS[2]] * 5)], params, start=1)
    assert len(long[0].prompt_ids) > 3 * budget
    driver.add(long)
    steps = 0
    while not driver.tokens[1]:
        before = len(driver.tokens[0])
        driver.step()
        steps += 1
        # The running row draws a token every step while the long prompt is prefilled.
        assert len(driver.tokens[0]) == min(before + 1, 8)
    assert steps >= len(long[0].prompt_ids) // budget
    driver.run()
    assert_matches_reference(driver, models, running + long, pair.vocab_limit)


def _lengths(n: int) -> list[str]:
    words = SAMPLE_WORDS
    return [" ".join(words[: 1 + (i * 5) % len(words)]) for i in range(n)]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_seeded_rows_sample_the_same_tokens_alone_and_in_a_batch_of_16(kind: str) -> None:
    pair = build_pair(kind)
    params = SamplingParams(
        alpha=1.0, temperature=1.0, top_p=0.9, max_new_tokens=16, ignore_eos=True
    )
    requests = [
        GenerationRequest(p, dataclasses.replace(params, seed=100 + i))
        for i, p in enumerate(_lengths(16))
    ]
    batched = generate(pair, requests, runner_config=RunnerConfig(compile=False))
    for request, result in zip(requests, batched, strict=True):
        alone = generate(pair, [request], runner_config=RunnerConfig(compile=False))[0]
        assert alone.token_ids == result.token_ids
        assert alone.seed == result.seed == request.params.seed


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_seeded_row_admitted_mid_run_samples_its_solo_tokens(kind: str) -> None:
    pair = build_pair(kind)
    params = SamplingParams(
        alpha=2.0, temperature=1.0, top_p=1.0, max_new_tokens=20, ignore_eos=True
    )
    driver = Driver(pair)
    driver.add(rows_for(pair, _lengths(8), params))
    for _ in range(7):
        driver.step()
    prompt = "tell me a story about the mango pudding"
    driver.add(rows_for(pair, [prompt], params, start=99))
    driver.run()
    solo = generate(
        pair,
        [GenerationRequest(prompt, dataclasses.replace(params, seed=99))],
        runner_config=RunnerConfig(compile=False),
    )[0]
    assert tuple(driver.tokens[99]) == solo.token_ids


@pytest.mark.parametrize("alpha", [0.0, -1.0, 2.0])
def test_greedy_tokens_are_the_argmax_of_the_amplified_reference_logits(alpha: float) -> None:
    """alpha 0 is the after model alone, -1 the before model, others the LDA formula."""
    pair, models = build_pair("llama"), reference_models("llama")
    params = dataclasses.replace(GREEDY, alpha=alpha, max_new_tokens=6)
    driver = Driver(pair)
    rows = rows_for(pair, PROMPTS[:3], params)
    driver.add(rows)
    driver.run()
    for row in rows:
        tokens = driver.tokens[row.row_id]
        afters, befores = reference_next_logits(models, row.prompt_ids, tokens, pair.vocab_limit)
        for token, after, before in zip(tokens, afters, befores, strict=True):
            assert not torch.allclose(after, before)  # else the formula would be untested
            assert token == int((after + alpha * (after - before)).argmax())


def test_completion_is_exactly_the_generated_tokens(any_pair: ModelPair) -> None:
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=9, ignore_eos=True, seed=3)
    results = generate(any_pair, [GenerationRequest(p, params) for p in PROMPTS])
    tokenizer = any_pair.tokenizer
    for prompt, result in zip(PROMPTS, results, strict=True):
        assert result.tokens_generated == len(result.token_ids) == 9
        assert result.text == result.formatted_prompt + result.completion
        assert result.completion == tokenizer.decode(
            list(result.token_ids), skip_special_tokens=True
        )
        assert result.formatted_prompt.endswith("### Response:\n")
        assert prompt in result.formatted_prompt


def test_eos_ends_a_row_unless_ignore_eos(llama_pair: ModelPair) -> None:
    # Make the token greedy decoding picks third for PROMPTS[0] the EOS token of the pair.
    probe, other_probe = generate(
        llama_pair, [GenerationRequest(PROMPTS[0], GREEDY), GenerationRequest(PROMPTS[1], GREEDY)]
    )
    eos = probe.token_ids[2]
    pair = dataclasses.replace(llama_pair, eos_token_ids=frozenset({eos}))
    stop = dataclasses.replace(GREEDY, ignore_eos=False)
    stopped, ignored, other = generate(
        pair,
        [
            GenerationRequest(PROMPTS[0], stop),
            GenerationRequest(PROMPTS[0], GREEDY),
            GenerationRequest(PROMPTS[1], stop),
        ],
    )
    assert stopped.finish_reason == "eos" and stopped.stopped_early
    assert stopped.token_ids == probe.token_ids[: probe.token_ids.index(eos) + 1]
    assert ignored.finish_reason == "length" and not ignored.stopped_early
    assert ignored.token_ids == probe.token_ids
    # The other row stops at its own first EOS, or runs to length if it never samples one.
    cut = other_probe.token_ids.index(eos) + 1 if eos in other_probe.token_ids else None
    assert other.token_ids == other_probe.token_ids[:cut]
    assert other.finish_reason == ("eos" if cut else "length")


def test_n_samples_differ_and_each_reproduces(llama_pair: ModelPair) -> None:
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=10, ignore_eos=True, seed=42)
    results = generate(llama_pair, [GenerationRequest(PROMPTS[1], params, n=4)])
    assert [r.seed for r in results] == sample_seeds(42, 4)
    assert results[0].seed == 42
    assert len({r.token_ids for r in results}) == 4
    for result in results:
        again = generate(
            llama_pair,
            [GenerationRequest(PROMPTS[1], dataclasses.replace(params, seed=result.seed))],
        )[0]
        assert again.token_ids == result.token_ids


def test_unseeded_rows_report_a_seed_that_reproduces_them(llama_pair: ModelPair) -> None:
    params = SamplingParams(temperature=1.0, max_new_tokens=8, ignore_eos=True)
    first = generate(llama_pair, [GenerationRequest(PROMPTS[2], params)])[0]
    again = generate(
        llama_pair, [GenerationRequest(PROMPTS[2], dataclasses.replace(params, seed=first.seed))]
    )[0]
    assert again.token_ids == first.token_ids


def test_a_finished_row_frees_its_blocks_and_the_others_go_on(llama_pair: ModelPair) -> None:
    driver = Driver(llama_pair, enable_prefix_cache=False)
    blocks = driver.scheduler.blocks
    free_before = blocks.num_free
    short = rows_for(llama_pair, [PROMPTS[2]], dataclasses.replace(GREEDY, max_new_tokens=2))
    long = rows_for(llama_pair, PROMPTS[:2], dataclasses.replace(GREEDY, max_new_tokens=6), 1)
    driver.add(short)
    driver.add(long)
    driver.step()
    driver.step()  # the short row finishes here
    assert driver.finish == {0: "length"}
    assert sorted(r.row_id for r in driver.scheduler.running) == [1, 2]
    size = blocks.block_size
    used = sum(-(-(len(r.prompt_ids) + 6) // size) for r in long)
    assert blocks.num_free == free_before - used
    driver.run()
    assert blocks.num_free == free_before


def test_an_aborted_request_leaves_the_batch_and_frees_its_blocks(llama_pair: ModelPair) -> None:
    driver = Driver(llama_pair)
    free_before = driver.scheduler.blocks.num_free
    first = driver.add(rows_for(llama_pair, PROMPTS[:2], GREEDY))
    driver.add(rows_for(llama_pair, PROMPTS[2:3], GREEDY, start=2))
    driver.step()
    assert driver.core.abort_request(first) == 2
    assert [r.row_id for r in driver.scheduler.running] == [2]
    driver.run()
    assert len(driver.tokens[2]) == 12 and len(driver.tokens[0]) == 1
    assert driver.scheduler.blocks.num_free == free_before


def test_a_stop_string_ends_the_row_and_is_cut_from_the_completion(llama_pair: ModelPair) -> None:
    probe = generate(llama_pair, [GenerationRequest(PROMPTS[0], GREEDY)])[0]
    words = probe.completion.split()
    assert len(words) >= 4
    stop = words[2]
    params = dataclasses.replace(GREEDY, stop=(stop,))
    result = generate(llama_pair, [GenerationRequest(PROMPTS[0], params)])[0]
    assert result.finish_reason == "stop" and result.stopped_early
    assert stop not in result.completion
    assert result.completion == probe.completion[: probe.completion.find(stop)]
    assert result.tokens_generated < probe.tokens_generated


# --- KV budget ------------------------------------------------------------------------------


def test_a_burst_beyond_the_kv_budget_is_served_completely_in_order_within_the_store(
    llama_pair: ModelPair,
) -> None:
    params = SamplingParams(temperature=1.0, max_new_tokens=20, ignore_eos=True, seed=5)
    requests = [GenerationRequest(p, params) for p in _lengths(24)]
    solo = [generate(llama_pair, [r])[0] for r in requests]
    # Room for about four rows at a time: the other twenty must wait for blocks to free.
    runner = RunnerConfig(max_batch_size=16, kv_cache_tokens=4 * 48, block_size=8, compile=False)
    driver = Driver(llama_pair, runner=runner, max_batch_size=16, enable_prefix_cache=False)
    stores = [(t.data_ptr(), t.numel()) for s in driver.core.runner.stores for t in s.keys.values()]
    rows = []
    for i, request in enumerate(requests):
        rows.append(EngineRow(i, encode(llama_pair, request.prompt), params, seed=5))
    for row in rows:
        driver.add([row])
    admitted: list[int] = []
    while driver.scheduler.has_work:
        running = [r.row_id for r in driver.scheduler.running]
        assert len(running) <= 5
        admitted += [r for r in running if r not in admitted]
        driver.step()
    assert admitted == list(range(24))  # first in, first admitted
    assert [tuple(driver.tokens[i]) for i in range(24)] == [s.token_ids for s in solo]
    now = [(t.data_ptr(), t.numel()) for s in driver.core.runner.stores for t in s.keys.values()]
    assert now == stores  # the store was never reallocated


def test_a_row_that_can_never_fit_the_store_is_refused_before_anything_runs(
    llama_pair: ModelPair,
) -> None:
    config = RunnerConfig(max_batch_size=4, kv_cache_tokens=32, block_size=8, compile=False)
    params = SamplingParams(max_new_tokens=40)
    with pytest.raises(PromptTooLongError, match="beyond the 32 tokens a row can hold"):
        list(iter_generate(llama_pair, [GenerationRequest("hello", params)], runner_config=config))


def test_rows_the_scheduler_refuses_name_their_problem(llama_pair: ModelPair) -> None:
    driver = Driver(llama_pair)
    (row,) = rows_for(llama_pair, PROMPTS[:1], dataclasses.replace(GREEDY, max_new_tokens=0))
    with pytest.raises(ValueError, match="max_new_tokens 0"):
        driver.add([row])
    (row,) = rows_for(llama_pair, PROMPTS[:1], dataclasses.replace(GREEDY, top_p=0.0))
    with pytest.raises(ValueError, match="top_p 0.0"):
        driver.add([row])
    assert not driver.scheduler.has_work


# --- rows that must fail alone ----------------------------------------------------------------


def test_a_row_whose_logits_are_not_finite_fails_alone(llama_pair: ModelPair) -> None:
    driver = Driver(llama_pair)
    rows = rows_for(llama_pair, PROMPTS[:3], dataclasses.replace(GREEDY, alpha=2.0))
    driver.add(rows)
    driver.step()
    # A NaN in row 1's logits (as a broken fine-tune could produce) at the next step only:
    # it is the second of the three decoding rows.
    model, real_forward = llama_pair.after, llama_pair.after.forward

    def poisoned(*args, **kwargs):
        out = real_forward(*args, **kwargs)
        out.logits[0, 1, 5] = float("nan")
        return out

    model.forward = poisoned
    try:
        driver.step()
    finally:
        model.forward = real_forward
    assert driver.finish == {1: "error"} and "not finite" in driver.errors[1]
    assert sorted(r.row_id for r in driver.scheduler.running) == [0, 2]
    driver.run()
    assert driver.finish == {0: "length", 1: "error", 2: "length"}


def test_a_masked_token_in_both_models_is_never_sampled_and_is_no_error(
    llama_pair: ModelPair,
) -> None:
    """-inf in both models amplifies to -inf (not -inf - -inf = NaN)."""
    models = (llama_pair.after, llama_pair.before)
    originals = [m.forward for m in models]

    def masking(real):
        def forward(*args, **kwargs):
            out = real(*args, **kwargs)
            out.logits[..., 7] = float("-inf")
            return out

        return forward

    for model, real in zip(models, originals, strict=True):
        model.forward = masking(real)
    try:
        params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=30, ignore_eos=True)
        results = generate(llama_pair, [GenerationRequest(p, params) for p in PROMPTS])
    finally:
        for model, real in zip(models, originals, strict=True):
            model.forward = real
    assert all(r.finish_reason == "length" and 7 not in r.token_ids for r in results)


def test_a_soft_capping_model_is_refused_at_start_up() -> None:
    import transformers

    config = transformers.Gemma2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
    )  # fmt: skip
    models = [transformers.Gemma2ForCausalLM(config).eval() for _ in range(2)]
    pair = pair_from_models(*models, make_tokenizer())
    with pytest.raises(ValueError, match="soft-caps"):
        ModelRunner(pair, RunnerConfig(compile=False))


def test_a_step_that_fails_twice_fails_only_its_requests(llama_pair: ModelPair) -> None:
    driver = Driver(llama_pair)
    runner = driver.core.runner
    driver.add(rows_for(llama_pair, PROMPTS[:2], GREEDY))
    driver.step()
    real = runner.execute
    runner.execute = lambda plan: (_ for _ in ()).throw(RuntimeError("device lost"))
    try:
        result = driver.core.step(now=0.0)
    finally:
        runner.execute = real
    assert [str(e.error) for e in result.events] == [
        "generation failed for this request: device lost"
    ]
    assert not driver.scheduler.has_work
    driver.add(rows_for(llama_pair, PROMPTS[2:3], GREEDY, start=5))
    driver.run()
    assert len(driver.tokens[5]) == 12


def test_a_step_that_fails_once_is_retried(llama_pair: ModelPair) -> None:
    driver = Driver(llama_pair)
    runner = driver.core.runner
    driver.add(rows_for(llama_pair, PROMPTS[:2], GREEDY))
    real, calls = runner.execute, []

    def flaky(plan):
        calls.append(plan)
        if len(calls) == 2:
            raise RuntimeError("transient")
        return real(plan)

    runner.execute = flaky
    try:
        driver.run()
    finally:
        runner.execute = real
    assert calls[1] is calls[2]  # the same plan, run again
    assert len(driver.tokens[0]) == len(driver.tokens[1]) == 12


def test_scheduler_config_refuses_a_budget_below_the_batch() -> None:
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        SchedulerConfig(max_batch_size=64, max_num_batched_tokens=32)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=30, ignore_eos=True),
        SamplingParams(temperature=0.0, max_new_tokens=30, ignore_eos=True),
        SamplingParams(temperature=0.7, top_p=0.5, top_k=3, max_new_tokens=30, ignore_eos=True),
    ],
)
def test_a_step_reads_the_device_back_exactly_once(llama_pair: ModelPair, params) -> None:
    # The GPU's sampling path (sync_free) on the CPU, with a cap so small the fallback runs;
    # prompts prefill beside decoding rows in the first steps.
    runner = RunnerConfig(top_k_cap=4, sync_free=True, compile=False)
    driver = Driver(llama_pair, runner=runner, max_num_batched_tokens=40)
    driver.add(rows_for(llama_pair, PROMPTS, params))
    assert_steps_read_the_device_once(driver, 1)
    driver.add(rows_for(llama_pair, PROMPTS[:2], dataclasses.replace(params, alpha=-0.5), 10))
    assert_steps_read_the_device_once(driver)
