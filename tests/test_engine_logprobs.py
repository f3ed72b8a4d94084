"""Log-probabilities from the engine match a direct recomputation and change no sampled token."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from engine_driver import Driver, assert_steps_read_the_device_once, rows_for
from test_logprobs import reference_keep

from batchserve.api.responses import row_result
from batchserve.core.types import GenerationRequest, RunnerConfig, SamplingParams
from batchserve.engine import generate
from batchserve.worker.models import ModelPair

PROMPTS = ["hello", "the cat sat on the mat", "write me a poem about mango pudding", "the dog ran"]
PARAMS = [
    SamplingParams(
        alpha=1.5, temperature=1.0, top_p=1.0, max_new_tokens=12, ignore_eos=True, seed=1
    ),
    SamplingParams(alpha=0.5, temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=9, seed=2),
    SamplingParams(alpha=2.0, temperature=0.0, max_new_tokens=7, ignore_eos=True, seed=3),
    SamplingParams(alpha=-1.0, temperature=1.3, top_p=0.95, max_new_tokens=15, seed=4),
]
SCORE_ALPHAS = [(0.0, 1.5, 4.0), (), (0.0,), (0.25, -1.0)]


def requests(with_logprobs: bool) -> list[GenerationRequest]:
    out = []
    for i, (prompt, params) in enumerate(zip(PROMPTS, PARAMS, strict=True)):
        # The third row asks nothing even when the others ask: mixed batches must work.
        asks = with_logprobs and i != 2
        out.append(
            GenerationRequest(
                prompt,
                dataclasses.replace(
                    params, logprobs=asks, score_alphas=SCORE_ALPHAS[i] if asks else ()
                ),
                n=2,
            )
        )
    return out


def recompute(pair: ModelPair, result, params: SamplingParams):
    """One forward of each model over prompt + completion, log-softmax per position."""
    prompt_ids = list(pair.tokenizer.encode(result.formatted_prompt))
    ids = torch.tensor([prompt_ids + list(result.token_ids)])
    with torch.inference_mode():
        after = pair.after(input_ids=ids).logits[0, :, : pair.vocab_limit].float()
        before = pair.before(input_ids=ids).logits[0, :, : pair.vocab_limit].float()
    positions = range(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(result.token_ids))
    rows = {"after": [], "before": [], "sampled": [], "scores": []}
    t = params.temperature if params.temperature > 0 else 1.0
    for pos, token in zip(positions, result.token_ids, strict=True):
        a, b = after[pos], before[pos]
        rows["after"].append(float(a.log_softmax(-1)[token]))
        rows["before"].append(float(b.log_softmax(-1)[token]))
        z = ((a + params.alpha * (a - b)) / t).double()
        kept = torch.full_like(z, float("-inf"))
        nucleus = reference_keep(z, params.top_p, params.top_k)
        kept[nucleus] = z[nucleus]
        rows["sampled"].append(
            0.0 if params.temperature <= 0 else float(kept.log_softmax(-1)[token])
        )
        rows["scores"].append(
            [float(((a + s * (a - b)) / t).log_softmax(-1)[token]) for s in params.score_alphas]
        )
    return rows


def test_logprobs_match_a_direct_recomputation(llama_pair: ModelPair) -> None:
    reqs = requests(with_logprobs=True)
    results = generate(llama_pair, reqs, max_batch_size=8)
    for index, result in enumerate(results):
        params = reqs[index // 2].params
        if not params.wants_logprobs:
            assert result.logprobs is None
            assert "logprobs" not in row_result(result).model_dump(mode="json")
            continue
        ref = recompute(llama_pair, result, params)
        lp = result.logprobs
        assert len(lp.after) == result.tokens_generated
        for name in ("after", "before", "sampled"):
            assert list(getattr(lp, name)) == pytest.approx(ref[name], abs=1e-4), name
        sums = [sum(s[j] for s in ref["scores"]) for j in range(len(params.score_alphas))]
        assert list(lp.score_sums) == pytest.approx(sums, abs=1e-4 * result.tokens_generated)
        fields = row_result(result).logprobs
        assert fields is not None and fields.token_ids == list(result.token_ids)
        assert fields.sum_after == pytest.approx(sum(ref["after"]), abs=1e-3)
        assert fields.score_alphas == list(params.score_alphas)


def test_asking_for_logprobs_changes_no_sampled_token(llama_pair: ModelPair) -> None:
    plain = generate(llama_pair, requests(with_logprobs=False), max_batch_size=8)
    asked = generate(llama_pair, requests(with_logprobs=True), max_batch_size=8)
    assert [r.token_ids for r in plain] == [r.token_ids for r in asked]
    assert all(r.logprobs is None for r in plain)


def test_untruncated_sampled_logprob_at_alpha_zero_is_the_after_models(llama_pair) -> None:
    params = SamplingParams(
        alpha=0.0,
        temperature=1.0,
        top_p=1.0,
        max_new_tokens=10,
        ignore_eos=True,
        seed=7,
        logprobs=True,
        score_alphas=(0.0,),
    )
    (result,) = generate(llama_pair, [GenerationRequest("the cat", params)])
    lp = result.logprobs
    assert lp.sampled == pytest.approx(lp.after, abs=1e-5)
    assert lp.score_sums[0] == pytest.approx(sum(lp.after), abs=1e-4)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=30, ignore_eos=True),
        SamplingParams(temperature=0.7, top_p=0.5, top_k=3, max_new_tokens=30, ignore_eos=True),
        SamplingParams(temperature=0.0, max_new_tokens=30, ignore_eos=True),
    ],
)
def test_asking_for_logprobs_adds_no_host_sync_to_a_step(llama_pair, params) -> None:
    # The GPU's sampling path (sync_free) on the CPU, with a cap so small the fallback runs.
    runner = RunnerConfig(top_k_cap=4, sync_free=True, compile=False)
    driver = Driver(llama_pair, runner=runner)
    asking = dataclasses.replace(params, logprobs=True, score_alphas=(0.0, 0.5, 2.0))
    driver.add(rows_for(llama_pair, PROMPTS, asking))
    driver.add(rows_for(llama_pair, PROMPTS[:2], params, start=10))  # and rows that do not ask
    driver.step()
    assert_steps_read_the_device_once(driver)
    for row_id in [*range(len(PROMPTS)), 10, 11]:
        assert len(driver.tokens[row_id]) == 4  # the prefill's and 3 steps'
        assert len(driver.logprobs[row_id]) == (4 if row_id < 10 else 0)
        assert all(len(entry) == 6 for entry in driver.logprobs[row_id])
