"""The engine gives every row exactly its single-prompt result, whatever batch it runs in."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_models import SAMPLE_WORDS

from batchserve.engine import LDAEngine, generate
from batchserve.models import ModelPair
from batchserve.seeds import sample_seeds
from batchserve.types import EngineRow, GenerationRequest, SamplingParams

PROMPTS = [
    "hello",
    "the cat sat on the mat",
    "tell me a story about the dog and the cat that ran far away",
    "a poem",
    "write me a poem about mango pudding",
    "the dog ran",
]
GREEDY = SamplingParams(alpha=1.5, temperature=0.0, max_new_tokens=12, ignore_eos=True)


def rows_for(
    engine: LDAEngine, prompts: list[str], params: SamplingParams, start: int = 0
) -> list[EngineRow]:
    return [
        EngineRow(start + i, tuple(engine.encode(engine.format(p))), params, seed=start + i)
        for i, p in enumerate(prompts)
    ]


def logits_by_row(engine: LDAEngine) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    ids, after, before = engine.last_logits
    return {row_id: (after[i], before[i]) for i, row_id in enumerate(ids)}


def run_and_trace(pair: ModelPair, prompts: list[str], num_steps: int) -> list[dict]:
    """Admit prompts together; the per-row logits at prefill and at each decode step."""
    engine = LDAEngine(pair)
    engine.admit(rows_for(engine, prompts, GREEDY))
    trace = [logits_by_row(engine)]
    for _ in range(num_steps):
        engine.step()
        trace.append(logits_by_row(engine))
    return trace


def test_left_padded_rows_match_single_prompt_logits(any_pair: ModelPair) -> None:
    batched = run_and_trace(any_pair, PROMPTS, num_steps=10)
    for i, prompt in enumerate(PROMPTS):
        alone = run_and_trace(any_pair, [prompt], num_steps=10)
        for step in (0, 10):
            for which in (0, 1):  # after, before
                diff = (batched[step][i][which] - alone[step][0][which]).abs().max().item()
                assert diff < 1e-4, f"row {i} step {step} model {which}: {diff}"


def test_rows_admitted_mid_generation_match_single_prompt_logits(any_pair: ModelPair) -> None:
    engine = LDAEngine(any_pair)
    engine.admit(rows_for(engine, PROMPTS[:2], GREEDY))
    for _ in range(5):
        engine.step()
    # A longer newcomer forces the running rows' caches to be left-padded too.
    engine.admit(rows_for(engine, PROMPTS[2:3], GREEDY, start=2))
    for _ in range(6):
        engine.step()
    got = logits_by_row(engine)
    early = run_and_trace(any_pair, PROMPTS[:1], num_steps=11)[11][0]
    late = run_and_trace(any_pair, PROMPTS[2:3], num_steps=6)[6][0]
    assert (got[0][0] - early[0]).abs().max().item() < 1e-4
    assert (got[2][0] - late[0]).abs().max().item() < 1e-4
    assert (got[2][1] - late[1]).abs().max().item() < 1e-4


def _lengths(n: int) -> list[str]:
    words = SAMPLE_WORDS
    return [" ".join(words[: 1 + (i * 5) % len(words)]) for i in range(n)]


def test_seeded_rows_sample_the_same_tokens_alone_and_in_a_batch_of_16(
    llama_pair: ModelPair,
) -> None:
    params = SamplingParams(
        alpha=1.0, temperature=1.0, top_p=0.9, max_new_tokens=16, ignore_eos=True, seed=7
    )
    prompts = _lengths(16)
    requests = [
        GenerationRequest(p, dataclasses.replace(params, seed=100 + i))
        for i, p in enumerate(prompts)
    ]
    batched = generate(llama_pair, requests)
    for request, result in zip(requests, batched, strict=True):
        alone = generate(llama_pair, [request])[0]
        assert alone.token_ids == result.token_ids
        assert alone.seed == result.seed == request.params.seed


def test_seeded_row_admitted_mid_generation_samples_its_solo_tokens(llama_pair: ModelPair) -> None:
    params = SamplingParams(
        alpha=2.0, temperature=1.0, top_p=1.0, max_new_tokens=20, ignore_eos=True
    )
    engine = LDAEngine(llama_pair)
    engine.admit(rows_for(engine, _lengths(8), params))
    for _ in range(7):
        engine.step()
    late = rows_for(engine, ["tell me a story about the mango pudding"], params, start=99)
    finished = engine.admit(late)
    while engine.num_running:
        finished += engine.step()
    by_id = {r.row_id: r for r in finished}
    solo = generate(
        llama_pair,
        [
            GenerationRequest(
                "tell me a story about the mango pudding", dataclasses.replace(params, seed=99)
            )
        ],
    )[0]
    assert tuple(by_id[99].token_ids) == solo.token_ids


@pytest.mark.parametrize("alpha", [0.0, -1.0, 2.0])
def test_amplified_logits_follow_the_formula(llama_pair: ModelPair, alpha: float) -> None:
    from batchserve.sampling import amplify

    engine = LDAEngine(llama_pair)
    engine.admit(rows_for(engine, PROMPTS[:3], dataclasses.replace(GREEDY, alpha=alpha)))
    _, after, before = engine.last_logits
    amplified = amplify(after, before, torch.full((3,), alpha))
    if alpha == 0.0:
        expected = after
    elif alpha == -1.0:
        expected = before
    else:
        expected = after + 2.0 * (after - before)
    assert torch.allclose(amplified, expected.float(), atol=1e-5)
    assert not torch.allclose(after, before)  # the test would be vacuous otherwise


def test_alpha_zero_samples_the_after_model_and_minus_one_the_before_model(
    llama_pair: ModelPair,
) -> None:
    """Greedy LDA at alpha 0 / -1 picks each model's own argmax at the first step."""
    for alpha, which in ((0.0, 1), (-1.0, 2)):
        engine = LDAEngine(llama_pair)
        rows = rows_for(engine, PROMPTS, dataclasses.replace(GREEDY, alpha=alpha))
        engine.admit(rows)
        logits = engine.last_logits[which]
        assert [r.token_ids[0] for r in engine.batch.rows] == logits.argmax(dim=-1).tolist()


def test_completion_is_exactly_the_generated_tokens(any_pair: ModelPair) -> None:
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=9, ignore_eos=True, seed=3)
    results = generate(any_pair, [GenerationRequest(p, params) for p in PROMPTS])
    tokenizer = any_pair.tokenizer
    for prompt, result in zip(PROMPTS, results, strict=True):
        assert result.tokens_generated == len(result.token_ids) == 9
        assert (
            tokenizer.pad_token_id not in result.token_ids
            or tokenizer.pad_token_id in any_pair.eos_token_ids
        )
        assert result.text == result.formatted_prompt + result.completion
        assert result.completion == tokenizer.decode(
            list(result.token_ids), skip_special_tokens=True
        )
        assert (
            result.formatted_prompt.endswith("### Response:\n")
            and prompt in result.formatted_prompt
        )
        assert "### Instruction" not in result.completion or "###" in tokenizer.decode(
            list(result.token_ids)
        )


def test_eos_ends_a_row_unless_ignore_eos(llama_pair: ModelPair) -> None:
    # Make the token greedy decoding picks third for PROMPTS[0] the EOS token of the pair.
    probe = generate(llama_pair, [GenerationRequest(PROMPTS[0], GREEDY)])[0]
    eos = probe.token_ids[2]
    pair = dataclasses.replace(llama_pair, eos_token_ids=frozenset({eos}))
    stop = dataclasses.replace(GREEDY, ignore_eos=False)
    results = generate(
        pair,
        [
            GenerationRequest(PROMPTS[0], stop),
            GenerationRequest(PROMPTS[0], GREEDY),
            GenerationRequest(PROMPTS[1], stop),
        ],
    )
    stopped, ignored, other = results
    assert stopped.finish_reason == "eos" and stopped.stopped_early
    assert stopped.token_ids == probe.token_ids[: probe.token_ids.index(eos) + 1]
    assert ignored.finish_reason == "length" and not ignored.stopped_early
    assert ignored.token_ids == probe.token_ids
    if eos not in other.token_ids:
        assert other.tokens_generated == GREEDY.max_new_tokens


def test_n_samples_share_a_prefill_differ_and_each_reproduces(llama_pair: ModelPair) -> None:
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


def test_retired_rows_free_their_columns(llama_pair: ModelPair) -> None:
    engine = LDAEngine(llama_pair)
    long_row = rows_for(engine, [PROMPTS[2]], dataclasses.replace(GREEDY, max_new_tokens=2))
    short_rows = rows_for(
        engine, [PROMPTS[0]], dataclasses.replace(GREEDY, max_new_tokens=6), start=1
    )
    engine.admit(long_row + short_rows)
    width_before = engine.batch.attention_mask.shape[1]
    engine.step()  # the long prompt's row finishes here
    assert engine.running_row_ids == [1]
    assert engine.batch.attention_mask.shape[1] < width_before
    assert bool(engine.batch.attention_mask.all())
    assert engine.batch.caches[0].length == engine.batch.attention_mask.shape[1]


def test_cancelled_rows_leave_the_batch(llama_pair: ModelPair) -> None:
    engine = LDAEngine(llama_pair)
    engine.admit(rows_for(engine, PROMPTS[:3], GREEDY))
    engine.step()
    assert [r.row_id for r in engine.cancel([1])] == [1]
    assert engine.running_row_ids == [0, 2]
    engine.cancel([0, 2])
    assert engine.num_running == 0 and engine.batch is None


def test_a_stop_string_ends_the_row_and_is_cut_from_the_completion(llama_pair: ModelPair) -> None:
    probe = generate(llama_pair, [GenerationRequest(PROMPTS[0], GREEDY)])[0]
    words = probe.completion.split()
    assert len(words) >= 4
    stop = words[2]
    params = dataclasses.replace(GREEDY, stop=(stop,))
    result = generate(llama_pair, [GenerationRequest(PROMPTS[0], params)])[0]
    assert result.finish_reason == "stop" and result.stopped_early
    assert stop not in result.completion
    assert probe.completion.startswith(result.completion)
    assert result.completion == probe.completion[: probe.completion.find(stop)]
    assert result.tokens_generated < probe.tokens_generated
