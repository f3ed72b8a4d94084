"""The engine gives every row exactly its single-prompt result, whatever batch it runs in."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_models import SAMPLE_WORDS, build_pair, reference_models
from torch.utils._python_dispatch import TorchDispatchMode

from batchserve.core.seeds import sample_seeds
from batchserve.core.types import EngineRow, GenerationRequest, Row, SamplingParams
from batchserve.engine import LDAEngine, RowError, RunnerConfig, generate, iter_generate
from batchserve.worker.models import ModelPair

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


def rows_for(
    engine: LDAEngine, prompts: list[str], params: SamplingParams, start: int = 0
) -> list[EngineRow]:
    return [
        EngineRow(start + i, tuple(engine.encode(engine.format(p))), params, seed=start + i)
        for i, p in enumerate(prompts)
    ]


@torch.no_grad()
def reference_next_logits(models: tuple, prompt: list[int], tokens: list[int], vocab: int):
    """Both models' logits [T, vocab] before each of `tokens`: one plain forward over the
    prompt and the tokens (causal, so position t sees exactly the prompt and tokens[:t])."""
    ids = torch.tensor([prompt + tokens])
    cut = slice(len(prompt) - 1, len(prompt) - 1 + len(tokens))
    return tuple(m(ids).logits[0, cut, :vocab].float() for m in models)


def run_to_completion(engine: LDAEngine, finished: list[Row]) -> dict[int, Row]:
    while engine.num_running:
        finished = finished + engine.step()
    return {r.row_id: r for r in finished}


def assert_matches_reference(engine, models, rows: list[EngineRow], done: dict[int, Row]) -> None:
    """Every token of every row (the prefill's and each step's) is the greedy choice of the
    amplified reference logits, and the log-probabilities the engine reports for it under each
    model equal those of a plain forward over the row's prompt and tokens alone."""
    vocab = engine.pair.vocab_limit
    for row in rows:
        result = engine.build_result("", "", done[row.row_id])
        tokens = list(result.token_ids)
        assert len(result.logprobs.after) == len(tokens) == row.params.max_new_tokens
        after, before = reference_next_logits(models, list(row.prompt_ids), tokens, vocab)
        amplified = after + row.params.alpha * (after - before)
        for t, token in enumerate(tokens):
            assert amplified[t, token] >= amplified[t].max() - 1e-4, (row.row_id, t)
        picked = torch.tensor(tokens)[:, None]
        for name, logits in (("after", after), ("before", before)):
            expected = logits.log_softmax(-1).gather(1, picked)[:, 0].tolist()
            got = list(getattr(result.logprobs, name))
            assert got == pytest.approx(expected, abs=1e-4), (row.row_id, name)


def test_each_row_matches_its_single_prompt_logits_at_prefill_and_every_step(family) -> None:
    pair, models = family
    engine = LDAEngine(pair)
    rows = rows_for(engine, PROMPTS, WITH_LOGPROBS)
    finished = engine.admit(rows)
    for _ in range(10):
        finished += engine.step()
    assert engine.num_running == len(PROMPTS)
    assert_matches_reference(engine, models, rows, run_to_completion(engine, finished))


def test_rows_admitted_mid_run_beside_other_lengths_match_single_prompt_logits(family) -> None:
    pair, models = family
    engine = LDAEngine(pair)
    params = dataclasses.replace(WITH_LOGPROBS, max_new_tokens=20)
    first = rows_for(engine, PROMPTS[:2], params)
    finished = engine.admit(first)
    for _ in range(5):
        finished += engine.step()
    late = rows_for(engine, PROMPTS[2:4], params, start=2)
    finished += engine.admit(late)  # the newcomers' prefill, beside rows 6 tokens in
    for _ in range(6):
        finished += engine.step()
    assert sorted(engine.running_row_ids) == [0, 1, 2, 3]
    done = run_to_completion(engine, finished)
    assert_matches_reference(engine, models, first + late, done)


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
    batched = generate(pair, requests)
    for request, result in zip(requests, batched, strict=True):
        alone = generate(pair, [request])[0]
        assert alone.token_ids == result.token_ids
        assert alone.seed == result.seed == request.params.seed


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_seeded_row_admitted_mid_run_samples_its_solo_tokens(kind: str) -> None:
    pair = build_pair(kind)
    params = SamplingParams(
        alpha=2.0, temperature=1.0, top_p=1.0, max_new_tokens=20, ignore_eos=True
    )
    engine = LDAEngine(pair)
    engine.admit(rows_for(engine, _lengths(8), params))
    for _ in range(7):
        engine.step()
    prompt = "tell me a story about the mango pudding"
    finished = engine.admit(rows_for(engine, [prompt], params, start=99))
    while engine.num_running:
        finished += engine.step()
    by_id = {r.row_id: r for r in finished}
    solo = generate(pair, [GenerationRequest(prompt, dataclasses.replace(params, seed=99))])[0]
    assert tuple(by_id[99].token_ids) == solo.token_ids


@pytest.mark.parametrize("alpha", [0.0, -1.0, 2.0])
def test_greedy_tokens_are_the_argmax_of_the_amplified_reference_logits(alpha: float) -> None:
    """alpha 0 is the after model alone, -1 the before model, others the LDA formula."""
    pair, models = build_pair("llama"), reference_models("llama")
    params = dataclasses.replace(GREEDY, alpha=alpha, max_new_tokens=6)
    for prompt, result in zip(
        PROMPTS[:3],
        generate(pair, [GenerationRequest(p, params) for p in PROMPTS[:3]]),
        strict=True,
    ):
        engine_ids = list(LDAEngine(pair).encode(LDAEngine(pair).format(prompt)))
        tokens = list(result.token_ids)
        afters, befores = reference_next_logits(models, engine_ids, tokens, pair.vocab_limit)
        for token, after, before in zip(tokens, afters, befores, strict=True):
            assert not torch.allclose(after, before)  # else the formula would be untested
            expected = after + alpha * (after - before)
            assert token == int(expected.argmax())


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


def test_a_finished_row_frees_its_slot_and_blocks_and_the_rest_stay_packed(
    llama_pair: ModelPair,
) -> None:
    engine = LDAEngine(llama_pair)
    free_before = engine.num_free_blocks
    short = rows_for(engine, [PROMPTS[2]], dataclasses.replace(GREEDY, max_new_tokens=2))
    long = rows_for(engine, PROMPTS[:2], dataclasses.replace(GREEDY, max_new_tokens=6), start=1)
    engine.admit(short + long)
    assert engine.num_free_slots == engine.max_slots - 3
    finished = engine.step()  # the short row finishes here; slot 0 takes the last row
    assert [r.row_id for r in finished] == [0]
    assert sorted(engine.running_row_ids) == [1, 2]
    assert engine.num_free_slots == engine.max_slots - 2
    used = sum(engine.blocks_needed(len(r.prompt_ids), 6) for r in long)
    assert engine.num_free_blocks == free_before - used
    while engine.num_running:
        engine.step()
    assert engine.num_free_blocks == free_before
    assert int(engine.runner.block_table.abs().sum()) == 0  # free slots point at block 0


def test_cancelled_rows_leave_the_batch(llama_pair: ModelPair) -> None:
    engine = LDAEngine(llama_pair)
    engine.admit(rows_for(engine, PROMPTS[:3], GREEDY))
    engine.step()
    assert [r.row_id for r in engine.cancel([1])] == [1]
    assert sorted(engine.running_row_ids) == [0, 2]
    engine.step()
    engine.cancel([0, 2])
    assert engine.num_running == 0


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
    llama_pair: ModelPair, monkeypatch
) -> None:
    params = SamplingParams(temperature=1.0, max_new_tokens=20, ignore_eos=True, seed=5)
    requests = [GenerationRequest(p, params) for p in _lengths(24)]
    solo = [generate(llama_pair, [r])[0] for r in requests]
    # Room for about four rows at a time: the other twenty must wait for blocks to free.
    config = RunnerConfig(max_slots=16, kv_cache_tokens=4 * 48, block_size=8)
    admitted: list[int] = []
    stores: list[list[tuple[int, int]]] = []
    real_admit = LDAEngine.admit

    def spy(self, rows):
        admitted.extend(r.row_id for r in rows)
        stores.append(
            [(t.data_ptr(), t.numel()) for s in self.runner.stores for t in s.keys.values()]
        )
        assert self.num_running + len(rows) <= 5
        return real_admit(self, rows)

    monkeypatch.setattr(LDAEngine, "admit", spy)
    results = dict(iter_generate(llama_pair, requests, runner_config=config))
    assert admitted == list(range(24))  # first in, first admitted
    assert [results[i].token_ids for i in range(24)] == [s.token_ids for s in solo]
    assert all(s == stores[0] for s in stores)  # the store was never reallocated


def test_a_row_that_can_never_fit_the_store_is_refused_before_anything_runs(
    llama_pair: ModelPair,
) -> None:
    config = RunnerConfig(max_slots=4, kv_cache_tokens=32, block_size=8)
    params = SamplingParams(max_new_tokens=40)
    with pytest.raises(ValueError, match="beyond the 32 tokens a row can hold"):
        list(iter_generate(llama_pair, [GenerationRequest("hello", params)], runner_config=config))


# --- host synchronisation -------------------------------------------------------------------

# Ops that read a device value back to the host (item, bool, data-dependent shapes).
_SYNCING_OPS = {
    "aten._local_scalar_dense",
    "aten.nonzero",
    "aten.masked_select",
    "aten.is_nonzero",
    "aten.equal",
    "aten._unique2",
    "aten.unique_consecutive",
    "aten.unique_dim",
}


class _SyncCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket._qualified_op_name.replace("::", ".")
        if name in _SYNCING_OPS or (
            name == "aten.repeat_interleave" and (kwargs or {}).get("output_size") is None
        ):
            self.syncs.append(name)
        return func(*args, **(kwargs or {}))


def assert_steps_read_the_device_once(engine: LDAEngine, num_steps: int = 3) -> None:
    """Each of the next steps syncs nowhere but its one device-to-host copy of the tokens."""
    for _ in range(num_steps):
        transfers = engine.runner.num_host_transfers
        with _SyncCounter() as counter:
            engine.step()
        assert counter.syncs == []
        assert engine.runner.num_host_transfers == transfers + 1


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=30, ignore_eos=True),
        SamplingParams(temperature=0.0, max_new_tokens=30, ignore_eos=True),
        SamplingParams(temperature=0.7, top_p=0.5, top_k=3, max_new_tokens=30, ignore_eos=True),
    ],
)
def test_a_decode_step_reads_the_device_back_exactly_once(llama_pair, params) -> None:
    # The GPU's sampling path (sync_free) on the CPU, with a cap so small the fallback runs.
    engine = LDAEngine(llama_pair, runner_config=RunnerConfig(top_k_cap=4, sync_free=True))
    engine.admit(rows_for(engine, PROMPTS, params))
    engine.admit(rows_for(engine, PROMPTS[:2], dataclasses.replace(params, alpha=-0.5), start=10))
    assert_steps_read_the_device_once(engine)


# --- rows that must fail alone ----------------------------------------------------------------


def test_a_row_whose_logits_are_not_finite_fails_alone(llama_pair: ModelPair) -> None:
    engine = LDAEngine(llama_pair)
    rows = rows_for(engine, PROMPTS[:3], dataclasses.replace(GREEDY, alpha=2.0))
    engine.admit(rows)
    # A NaN in row 1's logits (as a broken fine-tune could produce) at the next step only.
    model, real_forward = llama_pair.after, llama_pair.after.forward
    index = engine.running_row_ids.index(1)

    def poisoned(*args, **kwargs):
        out = real_forward(*args, **kwargs)
        out.logits[index, -1, 5] = float("nan")
        return out

    model.forward = poisoned
    try:
        finished = engine.step()
    finally:
        model.forward = real_forward
    assert [(r.row_id, r.finish_reason) for r in finished] == [(1, "error")]
    assert "not finite" in finished[0].error
    assert sorted(engine.running_row_ids) == [0, 2]
    while engine.num_running:
        finished = engine.step()
        assert all(r.finish_reason == "length" for r in finished)


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


def test_max_new_tokens_below_one_is_refused(llama_pair: ModelPair) -> None:
    engine = LDAEngine(llama_pair)
    (row,) = rows_for(engine, PROMPTS[:1], dataclasses.replace(GREEDY, max_new_tokens=0))
    with pytest.raises(RowError, match="max_new_tokens 0"):
        engine.admit([row])
    assert engine.num_running == 0


def test_a_soft_capping_model_is_refused_at_start_up() -> None:
    import transformers

    config = transformers.Gemma2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
    )  # fmt: skip
    models = [transformers.Gemma2ForCausalLM(config).eval() for _ in range(2)]
    from tiny_models import make_tokenizer

    from batchserve.worker.models import pair_from_models

    pair = pair_from_models(*models, make_tokenizer())
    with pytest.raises(ValueError, match="soft-caps"):
        LDAEngine(pair)
