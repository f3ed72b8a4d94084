"""A model runner without models: each step waits like a device, then emits seeded tokens.

`SimulatedRunner` has the `Runner` interface (core/types.py), so everything above it is the
real code: scheduler, HTTP, streaming, Ray Serve. A step costs

    step_ms + per_row_ms * B + prefill_ms_per_token * prefill tokens

and waits that long without holding the CPU or the GIL (a sleep to a deadline), the shape of a
memory-bound decode step on a GPU while the host is idle. Ray LLM's mock engine and llm-d's
inference simulator test serving layers the same way. Uses: load tests of the HTTP and
scheduling layers, the scale-out of replicas (bench.replicas --simulate), capacity planning.

Output token number `step` of a row is a hash of (seed, step) alone, within
[first_non_special_id, vocab_limit) and never a special or EOS id: rows always run to
max_new_tokens (or to a stop string, which random text can hit). Log-probabilities, when a row
asks, are plain deterministic negative numbers, not a distribution.

No torch at import: the CLI parses `--simulate` with `SimulatedCost.parse`.
"""

from __future__ import annotations

import argparse
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from batchserve.core.seeds import MASK64, splitmix64
from batchserve.core.types import ScheduledRow, StepOutput, StepPlan

if TYPE_CHECKING:
    from batchserve.worker.models import ModelPair

# A generous store: 2**16 blocks of 16 tokens (1M tokens); with no memory behind it, the
# simulated KV store never limits admission before the batch size does.
DEFAULT_NUM_KV_BLOCKS = 1 << 16
DEFAULT_BLOCK_SIZE = 16
# Mixed into the seed hash so the token and the log-probability draws are independent.
_LOGPROB_SALT = 0x5EED_10C9


@dataclass(frozen=True)
class SimulatedCost:
    """Milliseconds one step waits: fixed, per row in the step, per prefill token."""

    step_ms: float
    per_row_ms: float = 0.0
    prefill_ms_per_token: float = 0.0

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, not {value}")

    @classmethod
    def parse(cls, text: str) -> SimulatedCost:
        """`STEP_MS,PER_ROW_MS[,PREFILL_MS_PER_TOKEN]`, e.g. `20,0.05` or `20,0.05,0.01`."""
        parts = [p.strip() for p in text.split(",")]
        if not 2 <= len(parts) <= 3:
            raise ValueError(
                f"expected STEP_MS,PER_ROW_MS[,PREFILL_MS_PER_TOKEN] (e.g. 20,0.05), not {text!r}"
            )
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise ValueError(f"not a number in {text!r} (expected e.g. 20,0.05)") from None
        return cls(*values)

    def step_s(self, num_rows: int, num_prefill_tokens: int) -> float:
        ms = self.step_ms + self.per_row_ms * num_rows
        return (ms + self.prefill_ms_per_token * num_prefill_tokens) / 1000

    def describe(self) -> str:
        return (
            f"{self.step_ms:g} ms + {self.per_row_ms:g} ms per row + "
            f"{self.prefill_ms_per_token:g} ms per prefill token"
        )


def simulated_cost_option(text: str) -> SimulatedCost:
    """argparse type of `--simulate`: a bad value is a usage error naming the expected form."""
    try:
        return SimulatedCost.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def prefill_tokens(rows: Iterable[ScheduledRow]) -> int:
    """Prompt tokens in these rows: every chunk that does not sample, and the last prompt chunk
    (the one that samples output token 0). Decode rows feed their one token at step >= 1."""
    return sum(len(r.token_ids) for r in rows if not r.samples or r.step == 0)


class SimulatedRunner:
    """The `Runner` protocol over a cost model: no weights, no tensors, no CPU while waiting.

    `clock` and `sleep` are injectable so that tests can check the timing with a fake clock.
    Thread-safe enough for its use: one engine thread calls `execute`; `info` may be read from
    another thread (it reads counters only).
    """

    def __init__(
        self,
        cost: SimulatedCost,
        *,
        vocab_limit: int,
        max_context: int,
        eos_token_ids: Iterable[int] = (),
        special_token_ids: Iterable[int] = (),
        num_kv_blocks: int = DEFAULT_NUM_KV_BLOCKS,
        block_size: int = DEFAULT_BLOCK_SIZE,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if num_kv_blocks < 2 or block_size < 1 or max_context < 1:
            raise ValueError("need num_kv_blocks >= 2, block_size >= 1 and max_context >= 1")
        self.cost = cost
        self.vocab_limit = vocab_limit
        self.max_context = max_context
        self.eos_token_ids = frozenset(eos_token_ids)
        # Every id below vocab_limit but the special ones (BOS, PAD, ...) and EOS, wherever the
        # tokenizer puts them (at the start for Llama 2, at the end for GPT-2 and Llama 3).
        excluded = {*special_token_ids, *self.eos_token_ids}
        self._choices = [i for i in range(vocab_limit) if i not in excluded]
        if not self._choices:
            raise ValueError(f"every token id below vocab_limit {vocab_limit} is special")
        self.first_non_special_id = self._choices[0]
        self._num_kv_blocks = num_kv_blocks
        self._block_size = block_size
        self._clock, self._sleep = clock, sleep
        self._lock = threading.Lock()
        self.num_steps = 0
        self.num_rows_stepped = 0  # rows over all steps (prefill and decode)
        self.num_tokens_sampled = 0
        self.busy_s = 0.0  # simulated device time so far

    @classmethod
    def for_pair(cls, pair: ModelPair, cost: SimulatedCost, **kwargs: object) -> SimulatedRunner:
        """The runner for a pair's tokenizer-side facts (weights, if any, are ignored)."""
        return cls(
            cost,
            vocab_limit=pair.vocab_limit,
            max_context=pair.max_context,
            eos_token_ids=pair.eos_token_ids,
            special_token_ids=pair.tokenizer.all_special_ids,
            **kwargs,  # type: ignore[arg-type]
        )

    # --- the Runner protocol -------------------------------------------------------------------

    @property
    def num_kv_blocks(self) -> int:
        return self._num_kv_blocks

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def max_row_tokens(self) -> int:
        return min(self.max_context, (self._num_kv_blocks - 1) * self._block_size)

    def execute(self, plan: StepPlan) -> StepOutput:
        """Wait the step's cost, then one token (and, if asked, log-probabilities) per sampling
        row, in plan order. A row whose tokens overrun its blocks is the scheduler's bug: raise."""
        started = self._clock()
        for row in plan.rows:
            self._check(row)
        wait_s = self.cost.step_s(len(plan.rows), prefill_tokens(plan.rows))
        deadline = started + wait_s
        # A sleep to a deadline: releases the GIL and the CPU, and a short wake-up sleeps again.
        while (left := deadline - self._clock()) > 0:
            self._sleep(left)
        sampling = plan.sampling_rows
        tokens = tuple(self.token(r.seed, r.step) for r in sampling)
        logprobs = tuple(
            self.logprobs(r.seed, r.step, len(r.params.score_alphas))
            if r.params.wants_logprobs
            else None
            for r in sampling
        )
        with self._lock:
            self.num_steps += 1
            self.num_rows_stepped += len(plan.rows)
            self.num_tokens_sampled += len(sampling)
            self.busy_s += wait_s
        return StepOutput(tuple(r.row_id for r in sampling), tokens, logprobs)

    def info(self) -> dict[str, object]:
        with self._lock:
            counters = {
                "num_steps": self.num_steps,
                "num_rows_stepped": self.num_rows_stepped,
                "num_tokens_sampled": self.num_tokens_sampled,
                "busy_s": round(self.busy_s, 3),
            }
        return {
            "runner": "simulated",
            "cost": asdict(self.cost),
            "cost_model": self.cost.describe(),
            "tokens": "seeded hash of (seed, step); never EOS, so rows run to max_new_tokens",
            "vocab_limit": self.vocab_limit,
            "first_non_special_id": self.first_non_special_id,
            "kv_blocks": self._num_kv_blocks,
            "block_size": self._block_size,
            "max_row_tokens": self.max_row_tokens,
            **counters,
        }

    # --- the deterministic outputs ------------------------------------------------------------

    def token(self, seed: int, step: int) -> int:
        """Output token number `step` of a row seeded `seed`: a function of those two alone."""
        draw = splitmix64((splitmix64(seed & MASK64) + step) & MASK64)
        return self._choices[draw % len(self._choices)]

    def logprobs(self, seed: int, step: int, num_score_alphas: int) -> tuple[float, ...]:
        """(after, before, sampled, one per score alpha): finite, negative, deterministic."""
        key = splitmix64((splitmix64((seed ^ _LOGPROB_SALT) & MASK64) + step) & MASK64)
        values = []
        for i in range(3 + num_score_alphas):
            key = splitmix64((key + i) & MASK64)
            values.append(-0.05 - (key % 10_000) / 1_000)  # in (-10.05, -0.05]
        return tuple(values)

    def _check(self, row: ScheduledRow) -> None:
        end = row.start + len(row.token_ids)
        if not row.token_ids or end > len(row.block_ids) * self._block_size:
            raise ValueError(
                f"row {row.row_id}: tokens {row.start}..{end} do not fit its "
                f"{len(row.block_ids)} block(s) of {self._block_size}"
            )
        if end > self.max_row_tokens:
            raise ValueError(f"row {row.row_id}: {end} tokens exceed {self.max_row_tokens}")


def load_simulated_pair(
    after: str = "toy:after",
    before: str | None = None,
    *,
    dtype: str = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
    tokenizer_class: str | None = None,
    allow_incompatible: bool = False,
    **_ignored: object,
) -> ModelPair:
    """A pair's tokenizer and configs, no weights: what a SimulatedRunner and the frontend need.

    `after` and `before` of the returned pair are None and its device is `meta` (no data);
    only a simulated runner may serve it. Takes load_pair's options (`device` is ignored).
    """
    import torch
    from transformers import AutoConfig, GenerationConfig

    from batchserve.worker.models import (
        ModelPair,
        check_tokenizer_compatibility,
        context_length,
        eos_ids,
        load_tokenizer,
        pair_names,
        require_compatible,
        resolve_dtype,
        resolve_model_path,
    )

    after, before = pair_names(after, before)
    tok_kwargs = {"trust_remote_code": trust_remote_code, "tokenizer_class": tokenizer_class}
    tokenizer = load_tokenizer(after, revision=revision, **tok_kwargs)
    report = check_tokenizer_compatibility(
        tokenizer, load_tokenizer(before, revision=revision, **tok_kwargs)
    )
    require_compatible(report, after, before, allow_incompatible)
    configs = [
        AutoConfig.from_pretrained(
            resolve_model_path(name), revision=revision, trust_remote_code=trust_remote_code
        )
        for name in (after, before)
    ]
    try:
        generation = GenerationConfig.from_pretrained(resolve_model_path(after), revision=revision)
    except OSError:  # no generation_config.json: the model config and tokenizer say it
        generation = None
    widths = [getattr(c, "vocab_size", None) or len(tokenizer) for c in configs]
    return ModelPair(
        after=None,  # type: ignore[arg-type]
        before=None,  # type: ignore[arg-type]
        tokenizer=tokenizer,
        after_id=after,
        before_id=before,
        device=torch.device("meta"),
        dtype=resolve_dtype(dtype, torch.device("cpu")),
        compatibility=report,
        vocab_limit=min(*widths, len(tokenizer)),
        max_context=min(context_length(c) for c in configs),
        eos_token_ids=eos_ids(generation, configs[0], tokenizer),
    )
