"""The C sampler (worker/native.py, csrc/sample_rows.c) draws by the torch sampler's rules: the
same tokens as the float64 one-row reference on mixed rows, ties kept together, broken rows
flagged alone, the same amplified logits bit for bit and the same kept set; served rows draw
the same tokens and log-probabilities with it and without it."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from engine_driver import Driver, served
from tiny_models import build_pair

from batchserve.core.seeds import SEED_MAX
from batchserve.core.types import (
    GREEDY_TEMPERATURE,
    INVALID_TOKEN,
    RunnerConfig,
    SamplingParams,
    ScheduledRow,
)
from batchserve.worker import native
from batchserve.worker.sampling import (
    SamplingPlan,
    amplify,
    kept_probs,
    row_uniform,
    sample_reference,
)

pytestmark = pytest.mark.skipif(
    not native.sampler_available(), reason="no C compiler on this machine"
)


def c_sample(after, before, alpha, temperature, top_p, top_k, uniforms, want_kept=True):  # noqa: ANN001, ANN201
    return native.sample_rows(
        after, before, torch.tensor(alpha, dtype=torch.float32),
        torch.tensor(temperature, dtype=torch.float32), torch.tensor(top_p, dtype=torch.float32),
        torch.tensor(top_k), uniforms, GREEDY_TEMPERATURE, INVALID_TOKEN, want_kept,
    )  # fmt: skip


@pytest.mark.parametrize("vocab", [50, 200, 1024])
@pytest.mark.parametrize("bf16_ties", [False, True], ids=["float32", "bf16-rounded"])
def test_draws_exactly_the_references_tokens(vocab: int, bf16_ties: bool) -> None:
    rng = random.Random(vocab)
    torch.manual_seed(vocab)
    rows = 24
    for _ in range(6):
        after = torch.randn(rows, vocab) * rng.choice([0.3, 1.0, 3.0])
        before = torch.randn(rows, vocab)
        if bf16_ties:  # bf16 logits: many exact ties, as on a GPU
            after, before = after.bfloat16().float(), before.bfloat16().float()
        alpha = [rng.choice([0.0, 1.0, 2.0, -1.0, 4.0]) for _ in range(rows)]
        temperature = [rng.choice([0.0, 0.5, 1.0, 1.3, 1e-45]) for _ in range(rows)]
        top_p = [rng.choice([1.0, 0.99, 0.95, 0.9, 0.5]) for _ in range(rows)]
        top_k = [rng.choice([0, 0, 5, 50, 150, vocab - 1, vocab]) for _ in range(rows)]
        seeds = [rng.randrange(SEED_MAX) for _ in range(rows)]
        step = rng.randrange(500)
        uniforms = [row_uniform(s, step) for s in seeds]
        out = c_sample(after, before, alpha, temperature, top_p, top_k, uniforms)
        amplified = amplify(after, before, torch.tensor(alpha))
        assert torch.equal(out.amplified, amplified)  # bit for bit: no fused multiply-add
        for b in range(rows):
            expected = sample_reference(
                amplified[b], temperature[b], top_p[b], top_k[b], seeds[b], step
            )
            assert int(out.tokens[b]) == expected, (b, temperature[b], top_p[b], top_k[b])
        # The kept probabilities are the torch sampler's (their exp differs in the last bits,
        # and below e^-87 this one is 0 where torch's is subnormal); the kept set is the
        # reference's, decided in float64 (torch's float32 sums may drop a 1e-8 tail token).
        # Below 1e-12 a token's fate at top_p 1 hangs on the rounding of a float64 mass near 1.
        plan = SamplingPlan.for_rows(temperature, top_p, top_k, vocab, cap=vocab)
        expected_kept = kept_probs(
            amplified, torch.tensor(temperature), torch.tensor(top_p), torch.tensor(top_k), plan
        )
        assert torch.allclose(out.kept, expected_kept, rtol=1e-5, atol=1e-7)
        for b in range(rows):
            scored_at = temperature[b] if temperature[b] >= GREEDY_TEMPERATURE else 1.0
            probs = (amplified[b].double() / scored_at).softmax(-1)
            visible = probs > 1e-12
            expected = reference_keep(probs, top_p[b], top_k[b]) & visible
            assert torch.equal((out.kept[b] > 0) & visible, expected), b


def reference_keep(probs: torch.Tensor, top_p: float, top_k: int) -> torch.Tensor:
    """The order-free rule in float64: fewer than k tokens strictly more likely, and the top-k
    mass strictly more likely below top_p of the top-k mass; no filter keeps every token."""
    vocab = probs.shape[0]
    k = top_k if 0 < top_k < vocab else vocab
    if top_p >= 1.0 and k == vocab:
        return torch.ones(vocab, dtype=torch.bool)
    more_likely = probs[None, :] > probs[:, None]  # [token, other]
    in_k = more_likely.sum(-1) < k
    mass = (probs * in_k).sum() if k < vocab else torch.tensor(1.0, dtype=torch.float64)
    above = (more_likely * (probs * in_k)[None, :]).sum(-1)
    return in_k & (above < top_p * mass)


@pytest.mark.parametrize(
    ("logits", "top_p", "top_k", "kept"),
    [
        ([2.0, 1.0, 1.0, 1.0, -5.0], 0.6, 0, {0, 1, 2, 3}),  # a tie at the nucleus' edge
        ([5.0, 4.0, 3.0, 3.0, 1.0], 1.0, 3, {0, 1, 2, 3}),  # a tie at the k-th place
        ([1.0] * 6, 0.1, 0, set(range(6))),  # all tied: nothing can be cut
        ([3.0, 2.0, 1.0, 0.0], 0.5, 1, {0}),  # top-k inside the nucleus
    ],
)
def test_ties_at_the_cut_are_kept_together(
    logits: list[float], top_p: float, top_k: int, kept: set[int]
) -> None:
    row = torch.tensor([logits]).repeat(64, 1)
    out = c_sample(
        row, row, [0.0] * 64, [1.0] * 64, [top_p] * 64, [top_k] * 64,
        [row_uniform(s, 0) for s in range(64)],
    )  # fmt: skip
    assert set(out.kept[0].nonzero().flatten().tolist()) == kept
    assert out.tokens.tolist() == [
        sample_reference(row[0], 1.0, top_p, top_k, s, 0) for s in range(64)
    ]
    assert set(out.tokens.tolist()) <= kept


def test_broken_rows_are_flagged_alone_and_greedy_rows_take_the_first_maximum() -> None:
    after = torch.tensor(
        [
            [0.0, 1.0, 1.0, 0.5],  # greedy, a tie: the first
            [0.0, float("nan"), 1.0, 0.5],  # a NaN in a model: broken
            [float("-inf")] * 4,  # nothing finite: broken
            [0.0, float("inf"), 1.0, 0.5],  # +inf: broken
            [float("-inf"), 1.0, float("-inf"), 2.0],  # -inf in both models stays -inf
        ]
    )
    before = after.clone()
    before[3, 1] = 0.0  # inf - inf would be NaN, amplified to -inf: not broken
    before[4] = torch.tensor([float("-inf"), 0.0, float("-inf"), 0.0])
    out = c_sample(
        after, before, [1.0] * 5, [0.0, 1.0, 1.0, 1.0, 1.0], [1.0] * 5, [0] * 5, [0.5] * 5
    )
    assert out.tokens.tolist()[:4] == [1, INVALID_TOKEN, INVALID_TOKEN, INVALID_TOKEN]
    assert int(out.tokens[4]) in (1, 3)
    assert out.amplified[4, 0] == float("-inf") and out.amplified[4, 2] == float("-inf")
    assert float(out.kept[4, 0]) == 0.0 and float(out.kept[4, 2]) == 0.0


def test_a_row_draws_the_same_alone_and_in_a_batch_and_from_strided_logits() -> None:
    torch.manual_seed(3)
    wide_after, wide_before = torch.randn(7, 300), torch.randn(7, 300)
    after, before = wide_after[:, :256], wide_before[:, :256]  # a column slice, as served
    params = ([2.0] * 7, [0.8] * 7, [0.95] * 7, [0, 5, 0, 40, 0, 0, 3])
    uniforms = [row_uniform(s, 9) for s in range(7)]
    together = c_sample(after, before, *params, uniforms).tokens.tolist()
    for b in range(7):
        alone = c_sample(
            after[b : b + 1].contiguous(), before[b : b + 1].contiguous(),
            *([p[b]] for p in params), uniforms[b : b + 1],
        )  # fmt: skip
        assert int(alone.tokens[0]) == together[b]


def test_the_draw_and_the_nucleus_edge_are_strict() -> None:
    """A uniform of 0 draws the first kept token, not a filtered one before it; a token whose
    mass above equals top_p x mass exactly is out."""
    row = torch.tensor([[0.0, 3.0, 2.0, 1.0]])
    out = c_sample(row, row, [0.0], [1.0], [1.0], [2], [0.0])
    assert out.kept[0].nonzero().flatten().tolist() == [1, 2]
    assert int(out.tokens[0]) == 1  # token 0 is out of the top 2: the draw must skip it
    full = c_sample(row, row, [0.0], [1.0], [1.0], [0], [0.5])
    top = float(full.kept[0, 1])  # float32: C compares it in float64 exactly
    edge = c_sample(row, row, [0.0], [1.0], [top], [0], [0.5])
    assert edge.kept[0].nonzero().flatten().tolist() == [1]


@pytest.mark.parametrize("use_c", [True, False], ids=["c-sampler", "torch-sampler"])
def test_a_temperature_just_under_the_greedy_threshold_is_greedy_in_any_batch(use_c) -> None:
    """Rounded to float32 it equals the threshold; the runner decides greedy on the host."""
    pair = build_pair("llama")
    runner = Driver(
        pair, runner=RunnerConfig(max_batch_size=4, compile=False, native_sampler=use_c)
    ).core.runner
    vocab = pair.vocab_limit
    after = torch.zeros(2, vocab)
    after[:, 0], after[:, 3] = 5.0, 5.0002  # token 3 is the argmax, token 0 a close second
    edge = 9.9999995e-06
    assert edge < GREEDY_TEMPERATURE and not torch.tensor(edge) < GREEDY_TEMPERATURE

    def rows(temperatures: list[float]) -> list[ScheduledRow]:
        return [
            ScheduledRow(
                i,
                (1,),
                3,
                (0,),
                SamplingParams(alpha=0.0, temperature=t, top_p=1.0),
                7 + i,
                True,
                5,
            )
            for i, t in enumerate(temperatures)
        ]

    with torch.inference_mode():
        alone = runner.sampler.sample(after[:1], after[:1], rows([edge]))[0].tolist()
        runner.sampler._rows = None  # the same row ids, other rows
        beside = runner.sampler.sample(after, after, rows([edge, 0.8]))[0].tolist()
    assert alone[0] == beside[0] == 3


def test_draws_follow_the_distribution() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).repeat(4000, 1)
    out = c_sample(
        logits, logits, [0.0] * 4000, [1.0] * 4000, [1.0] * 4000, [0] * 4000,
        [row_uniform(s, 0) for s in range(4000)], want_kept=False,
    )  # fmt: skip
    assert out.kept is None
    freq = torch.bincount(out.tokens, minlength=3).float() / 4000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.03)


def test_bad_inputs_are_refused() -> None:
    logits = torch.zeros(2, 8)
    with pytest.raises(TypeError, match="float32"):
        c_sample(
            logits.double(), logits.double(), [0.0] * 2, [1.0] * 2, [1.0] * 2, [0] * 2, [0.5] * 2
        )
    with pytest.raises(TypeError, match="CPU"):
        c_sample(
            logits.to("meta"),
            logits.to("meta"),
            [0.0] * 2,
            [1.0] * 2,
            [1.0] * 2,
            [0] * 2,
            [0.5] * 2,
        )
    with pytest.raises(ValueError, match="per row"):
        c_sample(logits, logits, [0.0] * 3, [1.0] * 2, [1.0] * 2, [0] * 2, [0.5] * 2)


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "top-p"])
def test_served_rows_draw_the_same_with_and_without_the_c_sampler(sampled: bool) -> None:
    """Eager steps, logprobs and score_alphas asked: the same tokens, and log-probabilities
    equal within float32 rounding, whichever sampler runs."""
    pair = build_pair("llama")
    params = SamplingParams(
        alpha=1.5, temperature=0.9 if sampled else 0.0, top_p=0.9, top_k=0,
        max_new_tokens=12, ignore_eos=True, score_alphas=(0.0, 3.0),
    )  # fmt: skip
    params = dataclasses.replace(params, logprobs=True)
    prompts = ["hello", "the cat sat on the mat", "a poem about the dog that ran far away"]
    runs = {
        use_c: served(
            pair,
            prompts,
            params,
            RunnerConfig(max_batch_size=8, compile=False, native_sampler=use_c),
        )
        for use_c in (True, False)
    }
    for use_c, driver in runs.items():
        assert driver.core.runner.native_sampler is use_c
        assert driver.core.runner.info()["native_sampler"] is use_c
    assert runs[True].tokens == runs[False].tokens
    for row_id, entries in runs[True].logprobs.items():
        assert len(entries) == 12
        for got, expected in zip(entries, runs[False].logprobs[row_id], strict=True):
            assert got == pytest.approx(expected, abs=1e-5)


def test_the_environment_can_turn_the_c_sampler_off(monkeypatch) -> None:
    pair = build_pair("llama")
    config = RunnerConfig(max_batch_size=2, compile=False)
    monkeypatch.setenv("BATCHSERVE_NATIVE_SAMPLER", "0")
    assert not Driver(pair, runner=config).core.runner.native_sampler
    monkeypatch.delenv("BATCHSERVE_NATIVE_SAMPLER")
    assert Driver(pair, runner=config).core.runner.native_sampler
