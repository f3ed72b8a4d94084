"""Plain types; the HTTP and CLI layers import neither torch nor the KV code."""

from __future__ import annotations

import subprocess
import sys

import pytest

from batchserve.core.kv_blocks import kv_blocks
from batchserve.core.types import RunnerConfig


@pytest.mark.parametrize(
    ("code", "absent"),
    [
        pytest.param(
            "import batchserve.api.app, batchserve.api.cli, batchserve.engine, "
            "batchserve.frontend, batchserve.core.scheduler, batchserve.schemas",
            ("torch", "transformers", "batchserve.worker.runner"),
            id="the HTTP and CLI layers import no torch",
        ),
        pytest.param(
            "from batchserve.api import cli, app; "
            "cli.server_config_from_args(cli.build_parser().parse_args(['serve']))",
            ("ray",),
            id="a plain server never imports ray",
        ),
    ],
)
def test_a_layer_imports_nothing_it_does_not_need(code: str, absent: tuple[str, ...]) -> None:
    probe = f"import sys; {code}; print(sorted(m for m in {absent!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_kv_blocks_round_up() -> None:
    assert [kv_blocks(n, 16) for n in (0, 1, 16, 17, 32)] == [1, 1, 1, 2, 2]


def test_runner_config_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="kv_cache_tokens"):
        RunnerConfig(kv_cache_tokens=4, block_size=16)
    with pytest.raises(ValueError, match="gpu_memory_fraction"):
        RunnerConfig(gpu_memory_fraction=0)
