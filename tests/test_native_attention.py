"""The C decode attention (worker/native.py) computes what the torch attention computes, for
every head layout, window and row length, and the runner keeps torch's where asked."""

from __future__ import annotations

import ctypes
import dataclasses
import math

import pytest
import torch
from engine_driver import Driver, assert_matches_reference, rows_for, served
from tiny_models import build_pair, reference_models

from batchserve.core.types import RunnerConfig, SamplingParams, ScheduledRow
from batchserve.worker import native
from batchserve.worker import runner as runner_module
from batchserve.worker.attention import decode_attention
from batchserve.worker.models import pair_from_models

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler on this machine")

BLOCK = 16


def paged_case(
    rows: int, heads: int, kv_heads: int, dim: int, seed: int
) -> tuple[torch.Tensor, ...]:
    """A store of scattered blocks, each row's table and position (row 0 a padding row at 0)."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = 64
    keys = torch.randn(num_blocks * BLOCK, kv_heads, dim, generator=gen)
    values = torch.randn(num_blocks * BLOCK, kv_heads, dim, generator=gen)
    positions = torch.randint(0, 6 * BLOCK, (rows,), generator=gen)
    positions[0] = 0
    width = math.ceil((int(positions.max()) + 1) / BLOCK) + 1
    tables = torch.stack(
        [torch.randperm(num_blocks - 1, generator=gen)[:width] + 1 for _ in range(rows)]
    )
    tables[0] = 0
    query = torch.randn(rows, heads, dim, generator=gen)
    return query, keys, values, tables, positions


def torch_reference(query, keys, values, tables, positions, window) -> torch.Tensor:  # noqa: ANN001
    length = tables.shape[1] * BLOCK
    slots = torch.arange(length)
    read_index = tables[:, slots // BLOCK] * BLOCK + slots % BLOCK
    scale = query.shape[-1] ** -0.5
    return decode_attention(query, keys, values, read_index, positions, scale, window, fused=False)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim"),
    [(4, 4, 32), (8, 2, 64), (6, 3, 24), (2, 1, 128), (4, 2, 256)],
    ids=["mha-32", "gqa-64", "odd-24", "mqa-128", "gqa-256"],
)
@pytest.mark.parametrize("window", [0, 7])
def test_the_c_kernel_matches_torch_attention(heads, kv_heads, dim, window) -> None:
    query, keys, values, tables, positions = paged_case(9, heads, kv_heads, dim, seed=dim)
    got = torch.ops.batchserve.native_decode_attention(
        query, keys, values, tables, positions, BLOCK, dim**-0.5, window
    )
    want = torch_reference(query, keys, values, tables, positions, window)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_portable_loop_matches_torch_attention_too(tmp_path, monkeypatch) -> None:
    """Where the CPU has AVX-512 the kernel takes its vector path for head sizes 32-256; a
    build without it (as on a CPU that lacks it) takes the portable loop: both must hold."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = native._build([*native.compiler(), "-mno-avx512f"], "decode_attention")
    portable = ctypes.CDLL(str(path)).batchserve_decode_attention
    portable.restype = ctypes.c_int
    portable.argtypes = native._kernel().argtypes
    monkeypatch.setattr(native, "_kernel", lambda: portable)
    for heads, kv_heads, dim in [(4, 4, 32), (8, 2, 64), (2, 1, 128), (4, 2, 256)]:
        for window in (0, 7):
            case = paged_case(9, heads, kv_heads, dim, seed=dim + window)
            got = torch.ops.batchserve.native_decode_attention(*case, BLOCK, dim**-0.5, window)
            want = torch_reference(*case, window)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_non_finite_key_spoils_its_own_row_only() -> None:
    query, keys, values, tables, positions = paged_case(4, 4, 4, 32, seed=1)
    positions[1:] = 40
    keys[tables[2, 1] * BLOCK + 3, 0, 5] = float("nan")  # row 2, position 19
    out = torch.ops.batchserve.native_decode_attention(
        query, keys, values, tables, positions, BLOCK, 32**-0.5, 0
    )
    assert torch.isnan(out[2, 0]).all()
    assert torch.isfinite(out[[0, 1, 3]]).all()
    assert torch.isfinite(out[2, 1:]).all()  # the other heads read another KV head


def test_a_row_that_reads_past_its_block_table_is_an_error() -> None:
    query, keys, values, tables, positions = paged_case(3, 4, 4, 32, seed=2)
    positions[1] = tables.shape[1] * BLOCK  # one key past the table
    with pytest.raises(RuntimeError, match="past its block table"):
        torch.ops.batchserve.native_decode_attention(
            query, keys, values, tables, positions, BLOCK, 32**-0.5, 0
        )


def test_inputs_the_c_code_cannot_check_are_refused_before_it_runs() -> None:
    query, keys, values, tables, positions = paged_case(3, 4, 2, 32, seed=3)
    op = torch.ops.batchserve.native_decode_attention
    scale = 32**-0.5
    with pytest.raises(TypeError, match="int64"):
        op(query, keys, values, tables.int(), positions, BLOCK, scale, 0)
    with pytest.raises(TypeError, match="float32"):
        op(query, keys.double(), values.double(), tables, positions, BLOCK, scale, 0)
    with pytest.raises(ValueError, match="contiguous"):
        op(query, keys.transpose(1, 2), values.transpose(1, 2), tables, positions, BLOCK, scale, 0)
    with pytest.raises(ValueError, match="group"):
        op(query[:, :3], keys, values, tables, positions, BLOCK, scale, 0)
    # With a window the row reads only its last keys, yet may not read past its table.
    positions[1] = tables.shape[1] * BLOCK + 5
    with pytest.raises(RuntimeError, match="past its block table"):
        op(query, keys, values, tables, positions, BLOCK, scale, 4)


def test_the_build_is_cached_per_source_and_machine(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    compiler = [native.shutil.which("cc") or native.shutil.which("gcc")]
    first = native._build(compiler)
    assert first.parent == tmp_path / "batchserve" and first.exists()
    built_at = first.stat().st_mtime_ns
    assert native._build(compiler) == first
    assert first.stat().st_mtime_ns == built_at  # loaded, not rebuilt
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no partial file left


def test_the_environment_can_turn_the_kernel_off(llama_pair, monkeypatch) -> None:
    config = RunnerConfig(max_batch_size=2, compile=False)
    monkeypatch.setenv("BATCHSERVE_NATIVE_ATTENTION", "0")
    assert not Driver(llama_pair, runner=config).core.runner.native_attention
    monkeypatch.setenv("BATCHSERVE_NATIVE_ATTENTION", "1")
    assert Driver(llama_pair, runner=config).core.runner.native_attention


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_served_rows_agree_with_and_without_the_c_kernel(family) -> None:
    """Eager steps: the C kernel's rows and torch attention's rows both match single-prompt
    logits, and draw the same tokens."""
    pair, models = build_pair(family), reference_models(family)
    params = SamplingParams(alpha=1.5, temperature=0.0, max_new_tokens=12, ignore_eos=True)
    params = dataclasses.replace(params, logprobs=True)
    prompts = ["hello", "the cat sat on the mat", "a poem about the dog that ran far away"]
    runs = {}
    for use_native in (True, False):
        config = RunnerConfig(max_batch_size=8, compile=False, native_attention=use_native)
        driver = served(pair, prompts, params, config)
        assert driver.core.runner.native_attention is use_native
        assert driver.core.runner.info()["native_decode_attention"] is use_native
        assert_matches_reference(driver, models, rows_for(pair, prompts, params), pair.vocab_limit)
        runs[use_native] = driver.tokens
    assert runs[True] == runs[False]


def test_a_model_the_kernel_cannot_serve_is_refused_when_asked_for() -> None:
    pair = build_pair("llama")
    half = pair_from_models(
        pair.after.to(torch.bfloat16), pair.before.to(torch.bfloat16), pair.tokenizer
    )
    with pytest.raises(ValueError, match="float32 models on the CPU"):
        Driver(half, runner=RunnerConfig(max_batch_size=2, native_attention=True))
    assert not Driver(half, runner=RunnerConfig(max_batch_size=2)).core.runner.native_attention


@pytest.mark.parametrize("as_queries", [True, False], ids=["short-as-queries", "all-per-chunk"])
def test_prompts_as_queries_or_per_chunk_match_a_plain_forward(monkeypatch, as_queries) -> None:
    """Short prompts go through the C kernel as one query per token, a long one beside them
    through the per-chunk attention, in the same steps; either way every row's tokens and
    log-probabilities are a plain forward's."""
    if not as_queries:
        monkeypatch.setattr(runner_module, "_SHORT_CHUNK_READS", 0)
    pair, models = build_pair("llama"), reference_models("llama")
    params = SamplingParams(alpha=1.5, temperature=0.0, max_new_tokens=6, ignore_eos=True)
    params = dataclasses.replace(params, logprobs=True)
    prompts = ["hello", "the cat sat on the mat", "a poem about the dog that ran far away " * 8]
    rows = rows_for(pair, prompts, params)
    config = RunnerConfig(max_batch_size=8, compile=False, native_attention=True)
    driver = served(pair, prompts, params, config)
    runner = driver.core.runner
    short, long = (
        ScheduledRow(0, r.prompt_ids, 0, (), params, 0, True) for r in (rows[1], rows[2])
    )
    assert runner._rides_as_queries(short) is as_queries
    assert not runner._rides_as_queries(long)
    assert_matches_reference(driver, models, rows, pair.vocab_limit)
