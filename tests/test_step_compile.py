"""The compile defaults: a setting (BATCHSERVE_COMPILE, BATCHSERVE_CPP_WRAPPER) wins, else the
device decides; the runner reads the switches and reports the choice."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build_pair

from batchserve.core.types import RunnerConfig
from batchserve.worker.runner import ModelRunner
from batchserve.worker.step_compile import compile_default, cpp_wrapper_default

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("default", [compile_default, cpp_wrapper_default])
def test_a_setting_wins_else_on_the_cpu_only(default) -> None:  # noqa: ANN001
    assert default(CPU, None) is True and default(CUDA, None) is False
    assert default(CPU, False) is False and default(CUDA, True) is True


@pytest.mark.parametrize("switch", ["1", "0", None])
def test_an_eager_runner_has_no_cpp_wrapper_whatever_the_switch(
    switch: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if switch is None:
        monkeypatch.delenv("BATCHSERVE_CPP_WRAPPER", raising=False)
    else:
        monkeypatch.setenv("BATCHSERVE_CPP_WRAPPER", switch)
    runner = ModelRunner(build_pair("llama"), RunnerConfig(max_batch_size=4, compile=False))
    assert runner.cpp_wrapper is False and runner.info()["cpp_wrapper"] is False


def test_the_switch_sets_the_wrapper_a_compiled_runner_asks_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the runner hands torch.compile, without compiling (the build is stood in for)."""
    import batchserve.worker.runner as runner_module

    asked: list[bool] = []

    def stand_in(forward, cpp_wrapper: bool):  # noqa: ANN001, ANN202
        asked.append(cpp_wrapper)
        return forward

    monkeypatch.setattr(runner_module, "compile_step", stand_in)
    for switch, expected in (("0", False), ("1", True), (None, True)):
        if switch is None:
            monkeypatch.delenv("BATCHSERVE_CPP_WRAPPER", raising=False)
        else:
            monkeypatch.setenv("BATCHSERVE_CPP_WRAPPER", switch)
        runner = ModelRunner(build_pair("llama"), RunnerConfig(max_batch_size=4, compile=True))
        assert runner.cpp_wrapper is expected and asked[-1] is expected
