"""Request bodies of the HTTP API (field names and defaults from DESIGN.md's contract).

Strict types and no unknown fields: a typo such as `temprature` would otherwise be ignored
silently and a study run with the wrong parameters.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from batchserve.seeds import SEED_MAX

NonEmptyPrompt = Annotated[str, StringConstraints(min_length=1)]
StopString = Annotated[str, StringConstraints(min_length=1, max_length=256)]
MAX_STOP_STRINGS = 16

# Every integer that ends up in a tensor gets an upper bound here, at the door: an unbounded
# top_k of 2**63 once passed validation and overflowed in the worker, failing the whole batch.
INT32_MAX = 2**31 - 1
# Below this a temperature is greedy, as in vLLM: dividing logits by 1e-45 overflows to inf
# and samples garbage (see app.sampling_params).
GREEDY_TEMPERATURE_EPS = 1e-5
# Each score alpha costs one log-softmax over the vocabulary per row and step.
MAX_SCORE_ALPHAS = 16
Alpha = Annotated[float, Field(ge=-1000.0, le=1000.0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class SamplingFields(_Strict):
    max_new_tokens: int = Field(80, ge=1, le=INT32_MAX)
    temperature: float = Field(0.8, ge=0.0, le=100.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=INT32_MAX)  # >= vocab: no top-k
    apply_chat_template: bool = True
    system_prompt: str | None = None
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    do_sample: bool = True
    # A row finishes when its text contains one of these (cut from the completion).
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stream: bool = False  # text/event-stream: `delta` events, then one `result` event

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return stop_strings(self.stop)


class LDAFields(SamplingFields):
    alpha: Alpha = 1.0
    ignore_eos: bool = False
    # Per-token log-probabilities, and per listed alpha the row's sum of log q_alpha (logprobs.py).
    logprobs: bool = False
    score_alphas: list[Alpha] = Field(default_factory=list, max_length=MAX_SCORE_ALPHAS)


class GenerateLDARequest(LDAFields):
    prompt: NonEmptyPrompt


class GenerateLDABatchRequest(LDAFields):
    prompts: list[NonEmptyPrompt] = Field(min_length=1)
    n: int = Field(1, ge=1, le=INT32_MAX)


class GenerateRequest(SamplingFields):
    prompt: NonEmptyPrompt


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)
