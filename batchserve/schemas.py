"""The wire contract: request bodies and response bodies of the HTTP API, in one place.

The server validates requests with these models and the client (`batchserve_client/`) builds its
requests and reads its responses with the same ones, so the two cannot drift; this module
imports no torch, so the client stays light. Field names and defaults follow DESIGN.md.

Requests: strict types and no unknown fields, since a typo such as `temprature` would
otherwise be ignored silently and a study run with the wrong parameters. Responses allow extra
fields, so a newer server does not break an older client.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StringConstraints,
    model_serializer,
    model_validator,
)

from batchserve.core.seeds import SEED_MAX
from batchserve.core.types import SamplingParams

NonEmptyPrompt = Annotated[str, StringConstraints(min_length=1)]
StopString = Annotated[str, StringConstraints(min_length=1, max_length=256)]
MAX_STOP_STRINGS = 16
# Mixed into the prefix-cache keys of a request's prompts (as vLLM's `cache_salt`): only
# requests with the same salt share cached blocks, so cache timing leaks nothing across tenants.
CacheSalt = Annotated[str, StringConstraints(min_length=1, max_length=1024)]

# Every integer that ends up in a tensor gets an upper bound here, at the door: an unbounded
# top_k of 2**63 once passed validation and overflowed in the worker, failing the whole batch.
INT32_MAX = 2**31 - 1
# Each score alpha costs one log-softmax over the vocabulary per row and step.
MAX_SCORE_ALPHAS = 16
Alpha = Annotated[float, Field(ge=-1000.0, le=1000.0)]
# The sampling bounds, shared with the OpenAI routes (which differ in defaults only).
Temperature = Annotated[float, Field(ge=0.0, le=100.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
TopK = Annotated[int, Field(ge=0, le=INT32_MAX)]  # 0 or >= vocab: no top-k
Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]
MaxNewTokens = Annotated[int, Field(ge=1, le=INT32_MAX)]
NumSamples = Annotated[int, Field(ge=1, le=INT32_MAX)]  # samples per prompt (`n`)
ModelName = Annotated[str, StringConstraints(min_length=1, max_length=1024)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


# The engine's row defaults are the wire's: written once, in core/types.py.
DEFAULTS = SamplingParams()


class SamplingFields(_Strict):
    max_new_tokens: MaxNewTokens = DEFAULTS.max_new_tokens
    temperature: Temperature = DEFAULTS.temperature
    top_p: TopP = DEFAULTS.top_p
    top_k: TopK = DEFAULTS.top_k
    apply_chat_template: bool = True
    system_prompt: str | None = None
    seed: Seed | None = None
    do_sample: bool = True
    # A row finishes when its text contains one of these (cut from the completion).
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stream: bool = False  # text/event-stream: `delta` events, then one `result` event
    # A LoRA pair: the adapters (or the base) to run as the after and before model, by the
    # names /v1/models lists; None: the server's default after adapter, and the base.
    after: ModelName | None = None
    before: ModelName | None = None

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return stop_strings(self.stop)


class LDAFields(SamplingFields):
    alpha: Alpha = DEFAULTS.alpha
    ignore_eos: bool = DEFAULTS.ignore_eos
    # Per-token log-probabilities, and per listed alpha the row's sum of log q_alpha (logprobs.py).
    logprobs: bool = False
    score_alphas: list[Alpha] = Field(default_factory=list, max_length=MAX_SCORE_ALPHAS)
    cache_salt: CacheSalt | None = None


class GenerateLDARequest(LDAFields):
    prompt: NonEmptyPrompt


class GenerateLDABatchRequest(LDAFields):
    prompts: list[NonEmptyPrompt] = Field(min_length=1)
    n: NumSamples = 1


class GenerateRequest(SamplingFields):
    prompt: NonEmptyPrompt


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


# --- responses ----------------------------------------------------------------------------------


class _Response(BaseModel):
    """A response body. The server sends `model_dump(mode="json")` of one of these (api/
    responses.py), the client validates what it receives with the same class."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())
    # Fields a body leaves out, rather than sending null, when they are None ("absent unless
    # asked for", as `logprobs` is).
    omitted_when_none: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _leave_out_absent(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        for name in self.omitted_when_none:
            if data.get(name, 0) is None:
                del data[name]
        return data


class ErrorResponse(_Response):
    """Every error of the native routes and the HTTP guards: 4xx/5xx bodies and SSE `error`
    events. `detail`: what the error is about (the invalid fields of a 422), or null."""

    error: str
    detail: Any = None


FinishReason = Literal["length", "eos", "stop"]


class RowLogprobs(_Response):
    """Per generated token: log p under each model and under the distribution sampled from;
    per score alpha: the row's summed log q_alpha (full softmax at the row's temperature)."""

    token_ids: list[int] = Field(default_factory=list)
    after: list[float] = Field(default_factory=list)
    before: list[float] = Field(default_factory=list)
    sampled: list[float] = Field(default_factory=list)
    sum_after: float
    sum_before: float
    sum_sampled: float
    score_alphas: list[float] = Field(default_factory=list)
    sum_score_alphas: list[float] = Field(default_factory=list)


class LDABatchResult(_Response):
    omitted_when_none: ClassVar[frozenset[str]] = frozenset({"logprobs"})

    prompt: str
    formatted_prompt: str
    completion: str
    text: str
    tokens_generated: int
    stopped_early: bool
    finish_reason: FinishReason
    seed: int | None = None
    logprobs: RowLogprobs | None = None


class LDAResponse(LDABatchResult):
    """/generate_lda: its one row, with the echo a batch response carries once."""

    alpha: float
    model_after: str
    model_before: str


class LDABatchResponse(_Response):
    results: list[LDABatchResult]
    alpha: float
    model_after: str
    model_before: str
    batch_size: int  # prompts
    n: int = 1  # samples per prompt: results hold prompt 0's n samples, then prompt 1's, ...

    @model_validator(mode="after")
    def _one_result_per_prompt_and_sample(self) -> LDABatchResponse:
        if self.n < 1 or len(self.results) != self.batch_size * self.n:
            raise ValueError(
                f"{len(self.results)} results for batch_size {self.batch_size} x n {self.n}"
            )
        return self


class StreamDelta(_Response):
    """An SSE `delta` event of the native routes: text appended to row `index`'s completion;
    on /generate, `model` says which model's row (model_1 after, model_2 before)."""

    omitted_when_none: ClassVar[frozenset[str]] = frozenset({"model"})

    index: int
    text: str
    model: Literal["model_1", "model_2"] | None = None


class ModelOutput(_Response):
    """One model's row of /generate: the original server's three fields, then what every other
    route reports of a row (so a /generate sample can be replayed from its seed too)."""

    model_id: str
    completion: str
    text: str
    tokens_generated: int = 0
    finish_reason: FinishReason | None = None
    seed: int | None = None


class GenerateResponse(_Response):
    prompt: str
    model_1: ModelOutput
    model_2: ModelOutput


class TokenizerCompatibility(_Response):
    compatible: bool
    vocab_size_1: int
    vocab_size_2: int
    vocabs_match: bool
    warning: str | None = None


class Health(_Response):
    """`/health`: 200 once the models are loaded, 503 while they load; both are answers.
    `status_code` is the HTTP status the client saw, not part of the body."""

    omitted_when_none: ClassVar[frozenset[str]] = frozenset({"error"})

    status: str = "unknown"
    error: str | None = None
    status_code: int = Field(200, exclude=True)

    @property
    def is_ready(self) -> bool:
        return self.status_code == 200


class Info(_Response):
    """`/info`: models, device, dtype, vocab, scheduler settings, version.

    Every field is optional because the route is descriptive, not part of the wire contract
    the experiment depends on; unknown fields stay reachable through `model_extra`.
    """

    omitted_when_none: ClassVar[frozenset[str]] = frozenset({"replica_id"})

    replica_id: str | None = None  # which Ray Serve replica answered
    models: Any = None
    device: str | None = None
    dtype: str | None = None
    vocab: Any = None
    scheduler: Any = None
    version: str | None = None
