"""Decode steps replayed as graphs (worker/cuda_graphs.py), on the CPU.

The runner takes how a step is recorded as a parameter; `replay_by_call` keeps a CUDA graph's
contract (static inputs copied in before each replay, static outputs overwritten by it), so
the bucketing, padding and static buffers run here exactly as on a GPU. `replay_by_trace`
also freezes what the step's Python decided at recording, as a graph does: it replays a
make_fx trace of the step, so a value read from the host at recording would stay stale.
What only CUDA can show (the capture itself, the speed) is in tests/test_gpu.py and
bench/gpu.sh. A step that runs on the meta device needs no value on the host and no host
tensor: the proxy, here, for a step a CUDA graph can hold.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from engine_driver import Driver, assert_matches_reference, rows_for
from test_compiled import GREEDY, SAMPLED
from test_compiled import PROMPTS as COMPILED_PROMPTS
from tiny_models import build_pair, reference_models
from torch.fx.experimental.proxy_tensor import make_fx

from batchserve.core.types import RunnerConfig, SamplingParams, ScheduledRow, StepPlan
from batchserve.worker import native
from batchserve.worker.cuda_graphs import GraphKey, StepGraphs, replay_by_call
from batchserve.worker.models import load_pair, pair_from_models
from batchserve.worker.runner import ModelRunner

PROMPTS = [*COMPILED_PROMPTS, "a poem"]
# Every switch of the step that a graph records: the C or torch attention and sampler.
KINDS = {
    "torch": {"native_attention": False, "native_sampler": False},
    "c-attention": {"native_attention": True, "native_sampler": False},
    "c-both": {"native_attention": True, "native_sampler": True},
}


def replay_by_trace(step):
    """A stand-in capture stricter than `replay_by_call`: each replay runs the operations
    traced at recording (Python branches and host values frozen), not the step's Python."""
    outputs = step()
    traced = make_fx(step, tracing_mode="real")()

    def replay() -> None:
        for static, fresh in zip(outputs, traced(), strict=True):
            static.copy_(fresh)

    return outputs, replay


@pytest.fixture(scope="module")
def pair():
    return build_pair("llama")


def runner(pair, kind: str = "torch", capture=replay_by_call, **config) -> ModelRunner:
    if KINDS[kind]["native_attention"] and not native.available():
        pytest.skip("no C compiler on this machine")
    config = {"max_batch_size": 8, "compile": False, **KINDS[kind], **config}
    return ModelRunner(pair, RunnerConfig(**config), graph_capture=capture)


def driver_over(model_runner: ModelRunner, **scheduler: object) -> Driver:
    scheduler.setdefault("max_batch_size", 8)
    return Driver.over(model_runner, **scheduler)


def staggered(model_runner: ModelRunner, params: list[SamplingParams]) -> tuple[Driver, list]:
    """Rows admitted at three times, with different lengths: the step's rows grow and shrink
    through the buckets, so a graph is replayed over rows a larger step left in its inputs.
    The driver after the run, and the rows."""
    pair = model_runner.pair
    driver = driver_over(model_runner)
    batches = [
        rows_for(pair, PROMPTS[:2], params[0]),
        rows_for(pair, PROMPTS[2:4], params[1], start=2),
        rows_for(pair, PROMPTS[4:], params[2], start=4),
    ]
    for rows, steps in zip(batches, (3, 5, 0), strict=True):
        driver.add(rows)
        for _ in range(steps):
            driver.step()
    driver.run()
    return driver, [row for rows in batches for row in rows]


@pytest.mark.parametrize("capture", [replay_by_call, replay_by_trace], ids=["call", "trace"])
@pytest.mark.parametrize("kind", KINDS)
def test_graphed_sampled_rows_draw_the_ungraphed_runners_tokens(pair, kind, capture) -> None:
    # The first two share a sampling plan, so one graph replays 4 rows, then 3 (the first
    # rows end first): the departed row's inputs must not linger.
    params = [
        SAMPLED,
        dataclasses.replace(SAMPLED, alpha=0.5, temperature=0.7, top_p=0.8, max_new_tokens=20),
        dataclasses.replace(SAMPLED, top_k=5, max_new_tokens=6),
    ]
    # sync_free as on CUDA: the sampler a graph can hold (the CPU's default may read back).
    graphed = runner(pair, kind, capture, sync_free=True)
    with_graphs, _ = staggered(graphed, params)
    without, _ = staggered(runner(pair, kind, capture=None, sync_free=True), params)
    assert with_graphs.tokens == without.tokens
    assert len(with_graphs.tokens) == 5 and all(with_graphs.tokens.values())
    assert graphed._graphs is not None and graphed._graphs.num_graphs >= 3
    assert graphed._graphs.num_replays >= 20


@pytest.mark.parametrize("kind", ["torch", "c-attention"])
def test_graphed_rows_match_single_prompt_logits_and_logprobs(pair, kind) -> None:
    """Rows asking for log-probabilities: the graph runs the models, the sampler runs after."""
    params = dataclasses.replace(GREEDY, logprobs=True)
    graphed = runner(pair, kind)
    unamplified = dataclasses.replace(params, alpha=0.0)
    driver, rows = staggered(graphed, [params, unamplified, params])
    assert_matches_reference(driver, reference_models("llama"), rows, pair.vocab_limit)
    assert all(key.plan is None for key in graphed._graphs._graphs)


def test_rows_that_outgrow_a_key_width_move_to_the_next_graph(pair) -> None:
    """Rows 100-200 tokens long cross key widths 64, 128 and 256: each width its own graph,
    every row reading all of its keys."""
    params = [dataclasses.replace(SAMPLED, max_new_tokens=n) for n in (100, 200, 150)]
    graphed = runner(pair, "torch", replay_by_trace, sync_free=True)
    with_graphs, _ = staggered(graphed, params)
    without, _ = staggered(runner(pair, "torch", capture=None, sync_free=True), params)
    assert with_graphs.tokens == without.tokens
    assert {key.keys for key in graphed._graphs._graphs} >= {64, 128, 256}


def test_steady_decoding_replays_its_graphs_without_recording_new_ones(pair) -> None:
    graphed = runner(pair)
    driver = driver_over(graphed)
    driver.add(rows_for(pair, PROMPTS[:3], dataclasses.replace(SAMPLED, max_new_tokens=40)))
    for _ in range(4):
        driver.step()
    graphs = graphed._graphs
    recorded, replays = graphs.num_graphs, graphs.num_replays
    for _ in range(20):  # 3 rows, positions 5..40: one bucket of rows and of keys
        driver.step()
    assert (graphs.num_graphs, graphs.num_replays) == (recorded, replays + 20)
    info = graphed.info()
    assert info["cuda_graphs"] is True and info["cuda_graphs_captured"] == recorded


def test_a_full_set_of_graphs_leaves_other_buckets_to_plain_steps(pair) -> None:
    graphed = runner(pair)
    graphed._graphs.max_graphs = 1
    driver, _ = staggered(graphed, [SAMPLED, SAMPLED, GREEDY])
    plain, _ = staggered(runner(pair, capture=None), [SAMPLED, SAMPLED, GREEDY])
    assert driver.tokens == plain.tokens
    assert graphed._graphs.num_graphs == 1


def test_a_capture_that_fails_turns_graphs_off_and_the_step_still_runs(pair, caplog) -> None:
    def failing(step):
        raise RuntimeError("operation not permitted when stream is capturing")

    graphed = runner(pair, capture=failing)
    driver, _ = staggered(graphed, [SAMPLED, SAMPLED, GREEDY])
    plain, _ = staggered(runner(pair, capture=None), [SAMPLED, SAMPLED, GREEDY])
    assert driver.tokens == plain.tokens
    assert graphed.info()["cuda_graphs"] is False
    assert "without CUDA graphs from now on" in caplog.text
    assert "operation not permitted when stream is capturing" in caplog.text


def test_graphs_are_off_on_the_cpu_and_asking_for_them_there_names_the_device(
    pair, monkeypatch
) -> None:
    plain = ModelRunner(pair, RunnerConfig(max_batch_size=4, compile=False))
    assert plain.info()["cuda_graphs"] is False
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        ModelRunner(pair, RunnerConfig(max_batch_size=4, compile=False, cuda_graphs=True))
    monkeypatch.setenv("BATCHSERVE_CUDA_GRAPHS", "1")
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        ModelRunner(pair, RunnerConfig(max_batch_size=4, compile=False))
    refused = runner(pair, cuda_graphs=False)  # the config wins over a capture and the env
    assert refused.info()["cuda_graphs"] is False


def test_a_lora_pair_is_refused_by_name() -> None:
    lora = load_pair("toy:lora", device="cpu")
    config = RunnerConfig(max_batch_size=4, kv_cache_tokens=512, compile=False)
    assert ModelRunner(lora, config, graph_capture=replay_by_call).info()["cuda_graphs"] is False
    with pytest.raises(ValueError, match="LoRA pair"):
        ModelRunner(
            lora, dataclasses.replace(config, cuda_graphs=True), graph_capture=replay_by_call
        )


def test_step_graphs_copy_inputs_in_and_hand_back_their_own_outputs() -> None:
    made = []

    def make_step(key):
        made.append(key)
        return lambda t: (t["x"] * 2,)

    graphs = StepGraphs(replay_by_call, make_step)
    key = GraphKey(tokens=2, keys=64, sampled=2, plan=None)
    first = graphs.run(key, {"x": torch.tensor([1.0, 2.0])})
    assert first[0].tolist() == [2.0, 4.0]
    second = graphs.run(key, {"x": torch.tensor([5.0, 7.0])})
    assert second[0] is first[0] and second[0].tolist() == [10.0, 14.0]
    assert graphs.num_graphs == 1 and graphs.num_replays == 2 and made == [key]
    with pytest.raises(ValueError, match="for a graph of"):
        graphs.run(key, {"x": torch.tensor([1.0])})  # copy_ would have broadcast it


@pytest.mark.parametrize(
    "params",
    [
        GREEDY,
        SAMPLED,
        dataclasses.replace(SAMPLED, top_k=50, top_p=1.0),  # a top-k above the cap: the search
        dataclasses.replace(SAMPLED, top_p=0.999),  # a nucleus that may exceed the cap
    ],
    ids=["greedy", "top-p", "top-k-search", "wide-nucleus"],
)
def test_a_graphed_step_needs_no_value_on_the_host(params) -> None:
    """The graphed step (models, paged attention, the sync-free sampler) runs on the meta
    device, where reading a value back or mixing in a host tensor raises."""
    cpu = build_pair("llama")
    meta = pair_from_models(cpu.after.to("meta"), cpu.before.to("meta"), cpu.tokenizer)
    config = RunnerConfig(
        max_batch_size=8, kv_cache_tokens=512, compile=False, sync_free=True, top_k_cap=4
    )
    graphed = ModelRunner(meta, config, graph_capture=replay_by_call)
    graphed._to_host = lambda tokens, logprobs, rows, order: tokens
    rows = tuple(ScheduledRow(i, (5,), 7 + i, (1 + i,), params, i, True, 0) for i in range(3))
    tokens = graphed.execute(StepPlan(rows))
    assert tokens.device.type == "meta" and tokens.shape == (3,)
    (key,) = graphed._graphs._graphs
    assert key.plan is not None and key.sampled == 4
