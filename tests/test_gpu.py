"""GPU checks of the runner (skipped without CUDA; CI is CPU-only). Run with `make test-gpu`.

Not yet run on a GPU in this repository's history: see bench/results/README.md. The CUDA
graphs' bucketing and static buffers are also tested on the CPU (tests/test_cuda_graphs.py);
what only a GPU shows, the capture itself, is here.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from engine_driver import Driver, rows_for
from tiny_models import build_pair

from batchserve.core.types import GenerationRequest, RunnerConfig, SamplingParams
from batchserve.engine import generate
from batchserve.worker.models import pair_from_models
from batchserve.worker.runner import ModelRunner

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

PROMPTS = ["hello", "the cat sat on the mat", "tell me a story about the dog", "a poem"]
EAGER = RunnerConfig(compile=False)
NO_GRAPHS = RunnerConfig(compile=False, cuda_graphs=False)


def cuda_pair(kind: str = "llama", dtype: torch.dtype = torch.float32):
    cpu = build_pair(kind)
    after, before = (m.to("cuda", dtype) for m in (cpu.after, cpu.before))
    return pair_from_models(after, before, cpu.tokenizer)


def test_cuda_runner_matches_the_cpu_runner_in_float32() -> None:
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=24, ignore_eos=True, seed=1)
    requests = [
        GenerationRequest(p, dataclasses.replace(params, seed=i)) for i, p in enumerate(PROMPTS)
    ]
    on_cpu = generate(build_pair("llama"), requests, runner_config=EAGER)
    on_gpu = generate(cuda_pair(), requests, runner_config=NO_GRAPHS)
    assert [r.token_ids for r in on_gpu] == [r.token_ids for r in on_cpu]


@pytest.mark.parametrize("logprobs", [False, True], ids=["sampler-in-graph", "models-only"])
def test_cuda_graphs_draw_the_ungraphed_runners_tokens(logprobs) -> None:
    """Rows of different lengths, so the graphs are replayed over fewer rows than they were
    recorded with, and rows cross from one key-length bucket to the next."""
    pair = cuda_pair()
    params = SamplingParams(temperature=1.0, top_p=0.9, ignore_eos=True, logprobs=logprobs)
    drivers = {}
    for graphs in (True, False):
        driver = Driver(pair, runner=RunnerConfig(compile=False, cuda_graphs=graphs))
        for i, prompt in enumerate(PROMPTS):
            row_params = dataclasses.replace(params, max_new_tokens=30 + 30 * i)
            driver.add(rows_for(pair, [prompt], row_params, start=i))
        driver.run()
        drivers[graphs] = driver
    graphed, plain = drivers[True], drivers[False]
    assert graphed.tokens == plain.tokens
    for row_id, entries in plain.logprobs.items():
        got = [value for entry in graphed.logprobs[row_id] for value in entry]
        assert got == pytest.approx([value for entry in entries for value in entry], abs=1e-4)
    info = graphed.core.runner.info()
    assert info["cuda_graphs"] is True and info["cuda_graphs_captured"] >= 4


@pytest.mark.parametrize("graphs", [True, False], ids=["cuda-graphs", "no-graphs"])
def test_a_cuda_decode_step_synchronises_once_for_its_one_copy(graphs) -> None:
    pair = cuda_pair(dtype=torch.bfloat16)
    runner = RunnerConfig(top_k_cap=4, compile=False, cuda_graphs=graphs)  # fallback runs too
    driver = Driver(pair, runner=runner)
    assert driver.core.runner.sync_free
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=40, ignore_eos=True)
    driver.add(rows_for(pair, PROMPTS, params))
    driver.step()  # the prefill
    driver.step()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(3):
                driver.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 3, [str(w.message) for w in syncs]  # each step's token copy, no other


def test_cudnn_attention_is_off_on_the_decode_path() -> None:
    ModelRunner(cuda_pair(), EAGER)
    assert not torch.backends.cuda.cudnn_sdp_enabled()
