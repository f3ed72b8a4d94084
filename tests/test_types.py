"""Plain types; the HTTP and CLI layers import neither torch nor the KV code."""

from __future__ import annotations

import subprocess
import sys

import pytest

from batchserve.core.kv_blocks import kv_blocks
from batchserve.core.types import RunnerConfig


def test_the_http_and_cli_layers_import_no_torch() -> None:
    code = (
        "import sys, batchserve.api.app, batchserve.api.cli, batchserve.engine, batchserve.frontend, "
        "batchserve.core.scheduler, batchserve.schemas;"
        "print(sorted(m for m in ('torch', 'transformers', 'batchserve.worker.runner') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_kv_blocks_round_up() -> None:
    assert [kv_blocks(n, 16) for n in (0, 1, 16, 17, 32)] == [1, 1, 1, 2, 2]


def test_runner_config_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="kv_cache_tokens"):
        RunnerConfig(kv_cache_tokens=4, block_size=16)
    with pytest.raises(ValueError, match="gpu_memory_fraction"):
        RunnerConfig(gpu_memory_fraction=0)
