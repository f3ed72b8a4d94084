"""How the step's forward is compiled: the defaults this project's benchmarks chose, per device.

The runner asks here whether to compile and with which wrapper, and gets the compiled callable;
where a build fails it steps down (worker/runner.py, `_compile_failed`): the C++ wrapper to the
Python one, then, unless compiling was asked for, to the eager forward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable[..., object])


def compile_default(device: torch.device, setting: bool | None) -> bool:
    """`setting` (BATCHSERVE_COMPILE, which the CLI's --compile reads too) where given; else
    compiled on the CPU, where bench.engine measured the compiled step ~2x faster (README,
    "The compiled step"); eager on CUDA, where the decode steps replay as CUDA graphs instead
    and compiling has not been measured (no GPU lent yet)."""
    return device.type == "cpu" if setting is None else setting


def cpp_wrapper_default(device: torch.device, setting: bool | None) -> bool:
    """`setting` (BATCHSERVE_CPP_WRAPPER) where given; else on the CPU. The compiled step's
    Python wrapper (buffer views, size checks: ~320 calls a step) was a fifth of a lone row's
    step; inductor's C++ wrapper made a lone 64-token request ~8% faster through the server and
    left 32 rows in flight unchanged (1.01x), for ~9 s more of a first compile (README, "The
    compiled step"). On CUDA not measured, so off."""
    return device.type == "cpu" if setting is None else setting


def compile_step(forward: F, cpp_wrapper: bool) -> F:
    """`forward` under torch.compile with dynamic shapes: one graph whatever the sizes."""
    # Sizes that happen to be equal at the first call are distinct dimensions, and Python
    # floats (the attention scale) are constants, not symbols: without these the first compile
    # is thrown away and redone (measured: 15 s of 30).
    torch.fx.experimental._config.use_duck_shape = False
    torch._dynamo.config.specialize_float = True
    options = {"cpp_wrapper": True} if cpp_wrapper else None
    return torch.compile(forward, dynamic=True, options=options)  # type: ignore[return-value]
