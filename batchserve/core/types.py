"""Plain data that crosses module boundaries: row parameters, rows, requests, results.

No tensors and no torch import, so the HTTP and CLI layers can use these without the KV code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

# Below this temperature a row is greedy, as in vLLM: dividing logits by 1e-45 overflows to
# inf and samples garbage. The HTTP layer and the sampler both read this one constant.
GREEDY_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """Per-row sampling parameters; `seed=None` asks for a random seed at admission."""

    alpha: float = 1.0
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 0
    max_new_tokens: int = 80
    ignore_eos: bool = False
    seed: int | None = None
    # A row finishes when its decoded text ends with one of these; the stop string is cut off.
    stop: tuple[str, ...] = ()
    # Per-token log-probabilities (after, before, sampled) and, per listed alpha, the row's
    # sum of log q_alpha (see logprobs.py); off by default, and free when off.
    logprobs: bool = False
    score_alphas: tuple[float, ...] = ()
    # A LoRA pair: the adapters this row runs as its after and before model, by name (None:
    # the pair's default after adapter, and the base). A full pair leaves both None.
    after: str | None = None
    before: str | None = None

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs or bool(self.score_alphas)


class UnknownModelError(ValueError):
    """A request names an after/before model (adapter) the server does not serve."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class EngineRow:
    """What the scheduler hands the engine for one row: ids and parameters, seed resolved."""

    row_id: int
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    seed: int
    # Part of its prompt's prefix-cache keys: rows hit only blocks cached under the same salt.
    cache_salt: str | None = None


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt with its parameters; `n` samples share one prefill."""

    prompt: str
    params: SamplingParams = field(default_factory=SamplingParams)
    n: int = 1
    system_prompt: str | None = None
    prompt_format: str | None = None  # None: the engine's default
    cache_salt: str | None = None  # prefix-cache hits only among requests with the same salt


@dataclass(frozen=True)
class TokenLogprobs:
    """Per generated token: log p under each model and under the distribution sampled from;
    per listed score alpha: the row's summed log q_alpha (full softmax, no truncation)."""

    after: tuple[float, ...]
    before: tuple[float, ...]
    sampled: tuple[float, ...]
    score_alphas: tuple[float, ...] = ()
    score_sums: tuple[float, ...] = ()


@dataclass(frozen=True)
class GenerationResult:
    prompt: str
    formatted_prompt: str
    completion: str
    text: str
    tokens_generated: int
    stopped_early: bool
    finish_reason: str
    seed: int
    alpha: float
    token_ids: tuple[int, ...] = ()
    logprobs: TokenLogprobs | None = None  # only when the request asked
    token_texts: tuple[str, ...] = ()  # each token's share of the completion, with logprobs


@dataclass(frozen=True)
class RunnerConfig:
    """Sizes fixed at start-up. `kv_cache_tokens=None`: on CUDA from `gpu_memory_fraction`,
    on the CPU `max_batch_size` x min(context, 2048) tokens (at most 4 GiB). `compile=None`:
    the measured default (compiled on the CPU)."""

    max_batch_size: int = 64
    kv_cache_tokens: int | None = None
    gpu_memory_fraction: float = 0.9
    block_size: int = 16
    top_k_cap: int = 128  # the capped top-k/top-p pre-pass (sampling.py)
    # Sampling never reads the device back (see SamplingPlan.sync_free); None: on CUDA only.
    sync_free: bool | None = None
    compile: bool | None = None
    # Decode attention in C on the CPU (worker/native.py); None: wherever it builds and fits.
    native_attention: bool | None = None
    # Sampling in C on the CPU (worker/native.py); None: wherever it builds (float32 logits).
    native_sampler: bool | None = None
    # Decode steps replayed as CUDA graphs (worker/cuda_graphs.py); None: on CUDA.
    cuda_graphs: bool | None = None

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.block_size < 1 or self.top_k_cap < 1:
            raise ValueError("max_batch_size, block_size and top_k_cap must be >= 1")
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < self.block_size:
            raise ValueError(f"kv_cache_tokens must be >= block_size ({self.block_size})")
        if not 0.0 < self.gpu_memory_fraction <= 1.0:
            raise ValueError("gpu_memory_fraction must be in (0, 1]")


# --- one engine step: what the scheduler plans and what the runner returns ---------------------


@dataclass(frozen=True)
class ScheduledRow:
    """One row's part of a step: the tokens it feeds the models and where they go.

    `token_ids` are a prompt chunk (prefill) or the row's last sampled token (decode); they sit
    at positions `start ..` of the row, whose KV lives in `block_ids` (the row's whole block
    table). A row `samples` when this step feeds its last known token: it then draws output
    token number `step` (its seeded draw key), with `params` and `seed`.
    """

    row_id: int
    token_ids: tuple[int, ...]
    start: int
    block_ids: tuple[int, ...]
    params: SamplingParams
    seed: int
    samples: bool
    step: int = 0


@dataclass(frozen=True)
class StepPlan:
    """The scheduler's plan for one step: every scheduled row, in one forward per model."""

    rows: tuple[ScheduledRow, ...]

    @property
    def num_tokens(self) -> int:
        return sum(len(r.token_ids) for r in self.rows)

    @property
    def sampling_rows(self) -> tuple[ScheduledRow, ...]:
        return tuple(r for r in self.rows if r.samples)


INVALID_TOKEN = -1  # drawn for a row whose logits were not finite; the scheduler fails that row


@dataclass(frozen=True)
class StepOutput:
    """The runner's answer: one token per sampling row of the plan, in plan order, and for rows
    that asked, that token's log-probabilities (after, before, sampled, then one per score
    alpha; see worker/logprobs.py)."""

    row_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    logprobs: tuple[tuple[float, ...] | None, ...] = ()


class Runner(Protocol):
    """What the engine loop needs of a model runner (worker/runner.py, worker/simulated.py)."""

    @property
    def num_kv_blocks(self) -> int:
        """KV blocks in the store, the reserved block 0 included."""

    @property
    def block_size(self) -> int: ...

    @property
    def max_row_tokens(self) -> int:
        """Prompt + max_new_tokens of one row can never exceed this (context and KV store)."""

    def execute(self, plan: StepPlan) -> StepOutput: ...

    def info(self) -> dict[str, object]: ...
