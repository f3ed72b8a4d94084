"""Drive an EngineCore by hand: queue rows at chosen steps, collect every row's tokens."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from batchserve.core.scheduler import SchedulerConfig
from batchserve.core.types import EngineRow, RunnerConfig, SamplingParams
from batchserve.engine import EngineCore, build_engine_core
from batchserve.frontend import format_prompt
from batchserve.worker.models import ModelPair
from batchserve.worker.runner import ModelRunner as Runner


def encode(pair: ModelPair, prompt: str) -> tuple[int, ...]:
    return tuple(pair.tokenizer.encode(format_prompt(prompt), add_special_tokens=True))


def rows_for(
    pair: ModelPair, prompts: Sequence[str], params: SamplingParams, start: int = 0
) -> list[EngineRow]:
    return [
        EngineRow(start + i, encode(pair, p), params, seed=start + i) for i, p in enumerate(prompts)
    ]


class Driver:
    """An engine core over a pair, and what its rows produced (by row id)."""

    def __init__(
        self,
        pair: ModelPair,
        *,
        runner: RunnerConfig | None = None,
        core: EngineCore | None = None,
        **scheduler: object,
    ) -> None:
        scheduler.setdefault("max_batch_size", 32)
        config = SchedulerConfig(**scheduler)  # type: ignore[arg-type]
        runner = runner or RunnerConfig(max_batch_size=config.max_batch_size, compile=False)
        self.core = core or build_engine_core(pair, runner, config)
        self.tokens: dict[int, list[int]] = defaultdict(list)
        self.logprobs: dict[int, list[tuple[float, ...]]] = defaultdict(list)
        self.finish: dict[int, str] = {}
        self.errors: dict[int, str] = {}
        self._next_request = 0

    @classmethod
    def over(cls, runner: Runner, **scheduler: object) -> Driver:
        """A driver over a runner already built (compiled, graphed): its own engine core."""
        scheduler.setdefault("max_batch_size", 32)
        config = SchedulerConfig(**scheduler)  # type: ignore[arg-type]
        eos = sorted(runner.pair.eos_token_ids)
        return cls(runner.pair, core=EngineCore(runner, config, eos_token_ids=eos))

    @property
    def scheduler(self):
        return self.core.scheduler

    def add(self, rows: Sequence[EngineRow]) -> int:
        request_id = self._next_request
        self._next_request += 1
        self.core.add_request(request_id, rows, now=0.0)
        return request_id

    def step(self) -> None:
        result = self.core.step(now=0.0)
        for event in result.events:
            assert event.error is None, event.error
            for update in event.updates:
                self.tokens[update.row_id].extend(update.token_ids)
                if update.logprobs is not None:
                    self.logprobs[update.row_id].append(update.logprobs)
                if update.finish_reason is not None:
                    self.finish[update.row_id] = update.finish_reason
                if update.error is not None:
                    self.errors[update.row_id] = update.error

    def run(self, max_steps: int = 10_000) -> None:
        for _ in range(max_steps):
            if not self.scheduler.has_work:
                return
            self.step()
        raise AssertionError("the engine did not finish")


def served(
    pair: ModelPair, prompts: Sequence[str], params: SamplingParams, runner: RunnerConfig
) -> Driver:
    """A driver over `runner` that has run one row per prompt to the end."""
    driver = Driver(pair, runner=runner)
    driver.add(rows_for(pair, prompts, params))
    driver.run()
    return driver


@torch.no_grad()
def reference_next_logits(models: tuple, prompt: Sequence[int], tokens: Sequence[int], vocab: int):
    """Both models' logits [T, vocab] before each of `tokens`: one plain forward over the
    prompt and the tokens (causal, so position t sees exactly the prompt and tokens[:t])."""
    ids = torch.tensor([list(prompt) + list(tokens)])
    cut = slice(len(prompt) - 1, len(prompt) - 1 + len(tokens))
    return tuple(m(ids).logits[0, cut, :vocab].float() for m in models)


def assert_matches_reference(
    driver: Driver, models: tuple, rows: Sequence[EngineRow], vocab: int, atol: float = 1e-4
) -> None:
    """Every token of every row (the prefill's and each step's) is the greedy choice of the
    amplified reference logits, and the log-probabilities the engine reports for it under each
    model equal those of a plain forward over the row's prompt and tokens alone."""
    for row in rows:
        tokens = driver.tokens[row.row_id]
        logprobs = driver.logprobs[row.row_id]
        assert len(tokens) == len(logprobs) == row.params.max_new_tokens, row.row_id
        after, before = reference_next_logits(models, row.prompt_ids, tokens, vocab)
        amplified = after + row.params.alpha * (after - before)
        for t, token in enumerate(tokens):
            assert amplified[t, token] >= amplified[t].max() - atol, (row.row_id, t)
        picked = torch.tensor(tokens)[:, None]
        for column, logits in ((0, after), (1, before)):
            expected = logits.log_softmax(-1).gather(1, picked)[:, 0].tolist()
            got = [entry[column] for entry in logprobs]
            assert got == pytest.approx(expected, abs=atol), (row.row_id, column)


# Ops that read a device value back to the host (item, bool, data-dependent shapes).
_SYNCING_OPS = {
    "aten._local_scalar_dense",
    "aten.nonzero",
    "aten.masked_select",
    "aten.is_nonzero",
    "aten.equal",
    "aten._unique2",
    "aten.unique_consecutive",
    "aten.unique_dim",
}


class SyncCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket._qualified_op_name.replace("::", ".")
        if name in _SYNCING_OPS or (
            name == "aten.repeat_interleave" and (kwargs or {}).get("output_size") is None
        ):
            self.syncs.append(name)
        return func(*args, **(kwargs or {}))


def assert_steps_read_the_device_once(driver: Driver, num_steps: int = 3) -> None:
    """Each of the next steps syncs nowhere but its one device-to-host copy of the tokens."""
    runner = driver.core.runner
    for _ in range(num_steps):
        transfers = runner.num_host_transfers
        with SyncCounter() as counter:
            driver.step()
        assert counter.syncs == []
        assert runner.num_host_transfers == transfers + 1
