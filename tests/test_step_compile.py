"""The compile defaults: a setting (BATCHSERVE_COMPILE, BATCHSERVE_CPP_WRAPPER) wins, else the
device decides; the runner reads the switches, reports the choice, and steps down where a build
fails. `compile_step` is stood in for: no test here compiles (tests/test_compiled.py does)."""

from __future__ import annotations

import pytest
import torch
from engine_driver import Driver, rows_for
from tiny_models import build_pair

from batchserve.core.types import RunnerConfig, SamplingParams
from batchserve.worker.runner import ModelRunner
from batchserve.worker.step_compile import compile_default, cpp_wrapper_default

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
GREEDY = SamplingParams(alpha=1.5, temperature=0.0, max_new_tokens=6, ignore_eos=True)


def set_switch(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    """BATCHSERVE_CPP_WRAPPER set to `value`, or unset (None)."""
    if value is None:
        monkeypatch.delenv("BATCHSERVE_CPP_WRAPPER", raising=False)
    else:
        monkeypatch.setenv("BATCHSERVE_CPP_WRAPPER", value)


@pytest.mark.parametrize("default", [compile_default, cpp_wrapper_default])
def test_a_setting_wins_else_on_the_cpu_only(default) -> None:  # noqa: ANN001
    assert default(CPU, None) is True and default(CUDA, None) is False
    assert default(CPU, False) is False and default(CUDA, True) is True


@pytest.mark.parametrize("switch", ["1", "0", None])
def test_an_eager_runner_has_no_cpp_wrapper_whatever_the_switch(
    switch: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_switch(monkeypatch, switch)
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
        set_switch(monkeypatch, switch)
        runner = ModelRunner(build_pair("llama"), RunnerConfig(max_batch_size=4, compile=True))
        assert runner.cpp_wrapper is expected and asked[-1] is expected


class BuildFailed(torch._dynamo.exc.BackendCompilerFailed):
    """What dynamo raises where inductor's build fails (no C++ compiler, no headers: checked by
    hand with CXX=/nonexistent, README "The compiled step")."""

    def __init__(self) -> None:
        Exception.__init__(self, "no C++ compiler here (a test)")


@pytest.fixture
def failing_builds(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Every compiled step fails its build at its first call; records, per attempt, whether
    the C++ wrapper was asked for."""
    import batchserve.worker.runner as runner_module

    attempts: list[bool] = []

    def compile_step(forward, cpp_wrapper: bool):  # noqa: ANN001, ANN202
        attempts.append(cpp_wrapper)

        def fails(*args: object, **kwargs: object) -> None:
            raise BuildFailed

        return fails

    monkeypatch.setattr(runner_module, "compile_step", compile_step)
    monkeypatch.delenv("BATCHSERVE_COMPILE", raising=False)
    set_switch(monkeypatch, None)
    return attempts


def tokens_of(runner: ModelRunner, prompts: list[str]) -> dict:
    driver = Driver.over(runner, max_batch_size=8)
    driver.add(rows_for(runner.pair, prompts, GREEDY))
    driver.run()
    return driver.tokens


def test_a_step_that_will_not_build_steps_down_to_the_python_wrapper_then_eager(
    failing_builds: list[bool], caplog: pytest.LogCaptureFixture
) -> None:
    pair = build_pair("llama")
    runner = ModelRunner(pair, RunnerConfig(max_batch_size=8, compile=None))
    assert failing_builds == [True, False]  # the C++ wrapper, the Python one, then eager
    assert not runner.is_compiled and not runner.cpp_wrapper and runner.compile_s is None
    assert runner.info()["compiled"] is False and runner.info()["cpp_wrapper"] is False
    assert "C++ wrapper did not build" in caplog.text and "runs eagerly" in caplog.text
    # And it serves: the same tokens as a runner that never tried to compile.
    eager = ModelRunner(pair, RunnerConfig(max_batch_size=8, compile=False))
    prompts = ["hello", "the cat sat on the mat"]
    assert tokens_of(runner, prompts) == tokens_of(eager, prompts)


def test_a_step_asked_to_compile_that_will_not_build_says_so(failing_builds: list[bool]) -> None:
    with pytest.raises(RuntimeError, match="asked to compile and could not"):
        ModelRunner(build_pair("llama"), RunnerConfig(max_batch_size=8, compile=True))
    assert failing_builds == [True, False]  # the C++ wrapper first, then the Python one
