"""Plain types and seed rules; the HTTP and CLI layers import neither torch nor the KV code."""

from __future__ import annotations

import subprocess
import sys

import pytest

from batchserve.seeds import SEED_MAX, derive_seed, prompt_seed, sample_seeds
from batchserve.types import Capacity, RunnerConfig, SamplingParams, kv_blocks


def test_the_http_and_cli_layers_import_no_torch() -> None:
    code = (
        "import sys, batchserve.app, batchserve.cli, batchserve.scheduler, batchserve.schemas;"
        "print(sorted(m for m in ('torch', 'transformers', 'batchserve.runner') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_kv_blocks_round_up_and_a_row_reserves_its_whole_length() -> None:
    assert [kv_blocks(n, 16) for n in (0, 1, 16, 17, 32)] == [1, 1, 1, 2, 2]
    assert Capacity(0, 4, 10, block_size=8, step=0).blocks_needed(10, 7) == 3


def test_runner_config_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="kv_cache_tokens"):
        RunnerConfig(kv_cache_tokens=4, block_size=16)
    with pytest.raises(ValueError, match="gpu_memory_fraction"):
        RunnerConfig(gpu_memory_fraction=0)


def test_seed_rules() -> None:
    assert sample_seeds(7, 3)[0] == 7 and len(set(sample_seeds(7, 3))) == 3
    assert all(0 <= s < 2**31 for s in sample_seeds(None, 5))
    assert all(0 <= derive_seed(SEED_MAX, j) <= SEED_MAX for j in range(20))
    params = SamplingParams(seed=5)
    assert prompt_seed(params, 0) is params
    assert prompt_seed(params, 3).seed == derive_seed(5, 3)
    assert prompt_seed(SamplingParams(), 3).seed is None
