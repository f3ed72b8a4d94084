"""Every JSON body the native routes send, built from the wire contract's models (schemas.py).

The engine's results (core.types) become response models here and nowhere else: the JSON
bodies, the SSE `result` and `delta` events, `batchserve generate`'s JSONL lines and every
error, so none of them can drift from what the client validates against. How many prompts a
batch response reports (`batch_size`) and how many samples each (`n`) is decided here, once.
No tensors here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel
from starlette.responses import JSONResponse

from batchserve import schemas
from batchserve.core.types import GenerationResult, TokenLogprobs

if TYPE_CHECKING:
    from batchserve.worker.models import CompatibilityReport


def json_response(
    body: BaseModel, status_code: int = 200, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(body.model_dump(mode="json"), status_code=status_code, headers=headers)


def error_response(
    status_code: int, error: str, detail: Any = None, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """`{"error": ..., "detail": ...}` with its status: every error of the native routes."""
    return json_response(schemas.ErrorResponse(error=error, detail=detail), status_code, headers)


OPENAI_PREFIX = "/v1"


def openai_error_type(status_code: int) -> str:
    """OpenAI's `type` for a status: the client's fault below 500, the server's from it."""
    return "server_error" if status_code >= 500 else "invalid_request_error"


def openai_error_body(
    message: str,
    *,
    type: str = "invalid_request_error",  # noqa: A002 - OpenAI's field name
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def route_error(
    path: str,
    status_code: int,
    error: str,
    detail: Any = None,
    headers: Mapping[str, str] | None = None,
    *,
    code: str | None = None,
) -> JSONResponse:
    """An error in the shape the route's clients parse: OpenAI's under /v1/ (an OpenAI SDK
    reads `error.message`), the native one elsewhere. For the refusals that come before a
    route runs: a missing API key, a bad Host, a body too large, an unknown path."""
    if path != OPENAI_PREFIX and not path.startswith(OPENAI_PREFIX + "/"):
        return error_response(status_code, error, detail, headers)
    message = f"{error} ({detail})" if isinstance(detail, str) and detail else error
    return JSONResponse(
        openai_error_body(message, type=openai_error_type(status_code), code=code),
        status_code=status_code,
        headers=headers,
    )


def row_logprobs(logprobs: TokenLogprobs, token_ids: Sequence[int]) -> schemas.RowLogprobs:
    return schemas.RowLogprobs(
        token_ids=list(token_ids),
        after=list(logprobs.after),
        before=list(logprobs.before),
        sampled=list(logprobs.sampled),
        sum_after=sum(logprobs.after),
        sum_before=sum(logprobs.before),
        sum_sampled=sum(logprobs.sampled),
        score_alphas=list(logprobs.score_alphas),
        sum_score_alphas=list(logprobs.score_sums),
    )


def _row_fields(result: GenerationResult) -> dict[str, Any]:
    return {
        "prompt": result.prompt,
        "formatted_prompt": result.formatted_prompt,
        "completion": result.completion,
        "text": result.text,
        "tokens_generated": result.tokens_generated,
        "stopped_early": result.stopped_early,
        "finish_reason": result.finish_reason,
        "seed": result.seed,
        "logprobs": None
        if result.logprobs is None
        else row_logprobs(result.logprobs, result.token_ids),
    }


def row_result(result: GenerationResult) -> schemas.LDABatchResult:
    """One row of the contract (a batch's result, a line of `batchserve generate`)."""
    return schemas.LDABatchResult(**_row_fields(result))


def lda_response(
    result: GenerationResult, model_after: str, model_before: str
) -> schemas.LDAResponse:
    """/generate_lda: its one row, and the echo a batch response carries once."""
    return schemas.LDAResponse(
        **_row_fields(result),
        alpha=result.alpha,
        model_after=model_after,
        model_before=model_before,
    )


def lda_batch_response(
    results: Sequence[GenerationResult], n: int, model_after: str, model_before: str
) -> schemas.LDABatchResponse:
    """/generate_lda_batch: prompt 0's n rows, then prompt 1's, ...; `batch_size` counts
    prompts (the model checks that results = batch_size x n)."""
    return schemas.LDABatchResponse(
        results=[row_result(r) for r in results],
        # The alpha the rows ran with (one per request), as generate's JSONL reports it.
        alpha=results[0].alpha,
        model_after=model_after,
        model_before=model_before,
        batch_size=len(results) // n,
        n=n,
    )


def generate_response(
    prompt: str,
    after: GenerationResult,
    before: GenerationResult,
    model_after: str,
    model_before: str,
) -> schemas.GenerateResponse:
    """/generate: each model alone (model_1 is the after model, model_2 the before)."""

    def output(model_id: str, result: GenerationResult) -> schemas.ModelOutput:
        return schemas.ModelOutput(
            model_id=model_id,
            completion=result.completion,
            text=result.text,
            tokens_generated=result.tokens_generated,
            finish_reason=result.finish_reason,
            seed=result.seed,
        )

    return schemas.GenerateResponse(
        prompt=prompt, model_1=output(model_after, after), model_2=output(model_before, before)
    )


def compatibility(report: CompatibilityReport) -> schemas.TokenizerCompatibility:
    return schemas.TokenizerCompatibility(**dataclasses.asdict(report))
