"""OpenAI-compatible routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models.

Every tool that speaks the OpenAI dialect (the `openai` package, lm-eval-harness
`local-completions`, promptfoo, LangChain) becomes an LDA client. Standard fields map onto
SamplingParams; LDA's own fields (`alpha`, `top_k`, `ignore_eos`) come as extra body fields,
which is how the openai client's `extra_body` sends them. Errors use OpenAI's error shape
`{"error": {"message", "type", "param", "code"}}`. No tensors here.

Log-probabilities (`logprobs: 0` on completions, `logprobs: true` on chat) come in OpenAI's
shapes. The token's logprob is log q, the distribution it was actually drawn from (amplified,
then temperature, top-k and top-p; 0 for a greedy row); each entry also carries the two models'
own log-probabilities (`after_logprob(s)`, `before_logprob(s)`), which is what LDA users
weigh. Top alternatives are not computed (the sampler never ranks the vocabulary per step), so
`logprobs > 0` and `top_logprobs > 0` are refused rather than answered with empty lists. A
stream carries each choice's log-probabilities in its finishing chunk: the engine copies them
to the host once, when the row ends, never per step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from batchserve.api.bodies import (
    BodyRejected,
    max_prompt_chars,
    read_json_object,
    summarize,
    validation_problems,
)
from batchserve.api.responses import openai_error_body, openai_error_type
from batchserve.api.streaming import (
    Delta,
    Refused,
    RequestTimeoutError,
    event_stream,
    ready_engine,
    refusal,
    run_to_completion,
    submit,
)
from batchserve.core.seeds import SEED_MAX, prompt_seed
from batchserve.core.types import (
    GREEDY_TEMPERATURE,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    UnknownModelError,
)
from batchserve.engine import EngineFailedError, SchedulerClosedError
from batchserve.frontend import Frontend, PreparedPrompt, format_messages
from batchserve.schemas import (
    INT32_MAX,
    MAX_STOP_STRINGS,
    Alpha,
    CacheSalt,
    StopString,
    Temperature,
    TopK,
    TopP,
    stop_strings,
)

if TYPE_CHECKING:  # the HTTP layer never imports torch: the pair comes in with the app state
    from batchserve.worker.models import ModelPair

log = logging.getLogger(__name__)

# OpenAI's finish reasons: EOS and a stop string both read "stop".
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}


class OpenAIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",  # noqa: A002 - OpenAI's field name
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers

    def body(self) -> dict:
        return openai_error_body(self.message, type=self.type, param=self.param, code=self.code)


# --- request bodies -----------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class _OpenAIFields(BaseModel):
    # Unknown fields are refused: a misspelt `alpah` must not silently run alpha 1.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    model: str
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    n: int = Field(1, ge=1, le=INT32_MAX)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # LDA's own fields.
    alpha: Alpha = 1.0
    top_k: TopK = 0
    ignore_eos: bool = False
    cache_salt: CacheSalt | None = None  # as vLLM's: prefix-cache hits only within one salt
    # A LoRA pair: the adapter (or base) amplified against; `model` is the after adapter.
    before: str | None = Field(None, min_length=1, max_length=1024)
    # Accepted at their neutral values only, since tools send them by default.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    @field_validator("presence_penalty", "frequency_penalty", "logit_bias")
    @classmethod
    def _neutral_only(cls, value: object, info: ValidationInfo) -> object:
        if value:
            raise ValueError(f"{info.field_name} is not supported by LDA sampling; leave it out")
        return value


TokenIds = Annotated[list[Annotated[int, Field(ge=0, le=INT32_MAX)]], Field(min_length=1)]
Prompts = Annotated[list[str], Field(min_length=1)]
TokenPrompts = Annotated[list[TokenIds], Field(min_length=1)]


def _no_top_alternatives(value: int | None) -> int | None:
    if value:
        raise ValueError(
            "top alternatives are not computed by this server; 0 returns each sampled token's "
            "log-probability"
        )
    return value


# How many top alternatives per token: only 0 here (OpenAI's bound is 20).
TopAlternatives = Annotated[int | None, Field(ge=0, le=20), AfterValidator(_no_top_alternatives)]


class CompletionRequest(_OpenAIFields):
    prompt: str | Prompts | TokenIds | TokenPrompts
    max_tokens: int = Field(16, ge=1, le=INT32_MAX)
    echo: bool = False
    logprobs: TopAlternatives = None

    @field_validator("prompt")
    @classmethod
    def _no_empty_prompt_in_a_list(cls, value: object) -> object:
        # As the LDA routes refuse one (NonEmptyPrompt): an empty entry in a list is most
        # likely a blank line of a prompts file, and would sample from BOS alone.
        if isinstance(value, list) and "" in value:
            raise ValueError(f"prompt {value.index('')} of the list is empty")
        return value

    @field_validator("logprobs")
    @classmethod
    def _not_with_echo(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("echo"):
            raise ValueError("echo with logprobs (the prompt's log-probabilities) is not supported")
        return value

    best_of: int | None = Field(None, ge=1, le=INT32_MAX)
    suffix: None = None

    @model_validator(mode="after")
    def _supported(self) -> CompletionRequest:
        if self.best_of not in (None, self.n):
            raise ValueError("best_of other than n is not supported")
        return self

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs is not None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None

    def as_dict(self) -> dict[str, str]:
        text = (
            self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        )
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionRequest(_OpenAIFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    logprobs: bool | None = False  # OpenAI's spec allows null for "no"
    top_logprobs: TopAlternatives = None

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    @property
    def wants_logprobs(self) -> bool:
        return bool(self.logprobs)


async def _parse(request: Request, schema: type[BaseModel]) -> Any:
    try:
        return schema.model_validate(await read_json_object(request))
    except BodyRejected as err:  # OpenAI answers every invalid body 400
        raise OpenAIError(400 if err.status == 422 else err.status, str(err)) from None
    except ValidationError as err:
        problems = validation_problems(err)
        # OpenAI names the top-level field; deeper locations also carry pydantic's union tags.
        param = problems[0]["field"].split(".")[0] if problems[0]["field"] != "body" else None
        raise OpenAIError(400, summarize(problems[:4]), param=param) from None


# --- shared plumbing -----------------------------------------------------------------------


def _frontend(request: Request) -> tuple[Frontend, ModelPair]:
    return ready_engine(request)[1], request.app.state.pair


def _check_model(body: _OpenAIFields, pair: ModelPair) -> tuple[str | None, str | None]:
    """`model` (and LDA's `before`) as the row's (after, before) names; unknown ones: 404."""
    try:
        return pair.model_names(body.model, body.before)
    except UnknownModelError as err:
        param = "model" if err.field == "after" else err.field
        served = pair.after_id if pair.lora is None else ", ".join(pair.lora.names)
        raise OpenAIError(
            404,
            f"{param} {getattr(body, param)!r} is not served here; this server serves "
            f"{served} (amplified against {pair.before_id!r}; see GET /v1/models)",
            param=param,
            code="model_not_found",
        ) from None


def _params(
    request: Request, body: _OpenAIFields, max_tokens: int, models: tuple[str | None, str | None]
) -> SamplingParams:
    limit = request.app.state.config.max_new_tokens_limit
    if max_tokens > limit:
        raise OpenAIError(
            400,
            f"max_tokens: {max_tokens} exceeds this server's limit of {limit}",
            param="max_tokens",
        )
    if body.n > request.app.state.config.max_samples_per_prompt:
        raise OpenAIError(400, f"n: {body.n} exceeds this server's limit", param="n")
    return SamplingParams(
        alpha=body.alpha,
        # Below the epsilon a temperature is greedy, as on the native routes.
        temperature=0.0 if body.temperature < GREEDY_TEMPERATURE else body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        max_new_tokens=max_tokens,
        ignore_eos=body.ignore_eos,
        seed=body.seed,
        stop=stop_strings(body.stop),
        logprobs=getattr(body, "wants_logprobs", False),
        after=models[0],
        before=models[1],
    )


def _check_prompt(
    frontend: Frontend,
    pair: ModelPair,
    prompt_ids: tuple[int, ...],
    max_tokens: int,
    param: str,
    *,
    is_max_tokens_given: bool = True,
) -> None:
    if not prompt_ids:
        raise OpenAIError(400, "the prompt is empty", param=param)
    limit = frontend.max_row_tokens  # the models' context, and what the KV store holds
    if len(prompt_ids) + max_tokens > limit:
        wanted = (
            f"max_tokens is {max_tokens}"
            if is_max_tokens_given
            else "no room is left for even one new token"
        )
        raise OpenAIError(
            400,
            f"a row holds at most {limit} tokens here; the prompt has {len(prompt_ids)} and "
            f"{wanted}",
            param=param,
            code="context_length_exceeded",
        )
    if max(prompt_ids) >= pair.vocab_limit:
        raise OpenAIError(400, "prompt token id beyond the vocabulary", param=param)


def _check_chars(pair: ModelPair, num_chars: int, param: str) -> None:
    """The native routes' bound: no tokenizer ever sees more than this many characters."""
    limit = max_prompt_chars(pair.max_context)
    if num_chars > limit:
        raise OpenAIError(
            400,
            f"the prompt has {num_chars} characters, more than this server tokenizes for the "
            f"models' context of {pair.max_context} tokens ({limit})",
            param=param,
            code="context_length_exceeded",
        )


def _openai_error(refused: Refused) -> OpenAIError:
    """The statuses every route shares (streaming.refusal), in OpenAI's error shape."""
    return OpenAIError(
        refused.status,
        refused.message,
        type=openai_error_type(refused.status),
        code=refused.code,
        headers=refused.headers,
    )


def choice_logprobs(
    kind: Literal["text_completion", "chat.completion"],
    pieces: list[str],
    result: GenerationResult,
    text_start: int = 0,
) -> dict | None:
    """A choice's `logprobs` in OpenAI's shape for its kind, with LDA's per-model values."""
    lp = result.logprobs
    if lp is None:
        return None
    if kind == "chat.completion":
        content = [
            {
                "token": piece,
                "logprob": sampled,
                "bytes": list(piece.encode("utf-8")),
                "top_logprobs": [],
                "after_logprob": after,
                "before_logprob": before,
            }
            for piece, sampled, after, before in zip(
                pieces, lp.sampled, lp.after, lp.before, strict=True
            )
        ]
        return {"content": content, "refusal": None}
    offsets, at = [], text_start
    for piece in pieces:
        offsets.append(at)
        at += len(piece)
    return {
        "tokens": pieces,
        "token_logprobs": list(lp.sampled),
        "top_logprobs": None,
        "text_offset": offsets,
        "after_logprobs": list(lp.after),
        "before_logprobs": list(lp.before),
    }


def _usage(prepared: list[PreparedPrompt], results: list[GenerationResult]) -> dict:
    prompt_tokens = sum(len(p.prompt_ids) for p in prepared)
    completion_tokens = sum(r.tokens_generated for r in results)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class _Job:
    """One OpenAI request on the scheduler: its rows, and how to render them as choices."""

    def __init__(
        self,
        request: Request,
        body: _OpenAIFields,
        requests: list[GenerationRequest],
        prepared: list[PreparedPrompt],
        kind: Literal["text_completion", "chat.completion"],
    ) -> None:
        self.request, self.body, self.kind = request, body, kind
        self.requests, self.prepared = requests, prepared
        self.frontend, self.pair = _frontend(request)
        self.id = ("cmpl-" if kind == "text_completion" else "chatcmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        config = request.app.state.config
        self.timeout_s: float = config.request_timeout_s
        num_rows = len(prepared) * body.n
        if num_rows > config.scheduler.max_queue_rows:  # would be refused however long one waits
            raise OpenAIError(
                400,
                f"{num_rows} rows (prompts x n) exceed the queue's {config.scheduler.max_queue_rows}",
                param="n",
            )

    def envelope(self, obj: str, choices: list[dict]) -> dict:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.body.model,
            "choices": choices,
        }

    def text_choice(
        self, index: int, text: str, finish_reason: str | None, logprobs: dict | None = None
    ) -> dict:
        if self.kind == "text_completion":
            return {
                "index": index,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }
        return {
            "index": index,
            "message": {"role": "assistant", "content": text},
            "logprobs": logprobs,
            "finish_reason": finish_reason,
        }

    async def logprobs(self, results: list[GenerationResult]) -> list[dict | None]:
        """Each row's `logprobs` entry (None where nobody asked); detokenized off the loop."""
        if not self.body.wants_logprobs:
            return [None] * len(results)
        try:
            return [
                choice_logprobs(self.kind, list(r.token_texts), r, len(self.echo(i)))
                if r.logprobs is not None
                else None
                for i, r in enumerate(results)
            ]
        except Exception as err:  # noqa: BLE001 - answered in OpenAI's shape, not Starlette's
            log.exception("building the logprobs of %s failed", self.id)
            raise OpenAIError(
                500, f"could not build logprobs: {err}", type="server_error"
            ) from None

    def echo(self, index: int) -> str:
        echo = getattr(self.body, "echo", False)
        return self.prepared[index // self.body.n].prompt if echo else ""

    async def respond(self) -> Response:
        if self.body.stream:
            return self.stream()
        completion = await run_to_completion(
            self.request, self.requests, self.prepared, self.timeout_s
        )
        logprobs = await self.logprobs(completion.results)
        choices = [
            self.text_choice(
                i, self.echo(i) + r.completion, FINISH_REASONS[r.finish_reason], logprobs[i]
            )
            | {"seed": r.seed}
            for i, r in enumerate(completion.results)
        ]
        obj = "text_completion" if self.kind == "text_completion" else "chat.completion"
        payload = self.envelope(obj, choices) | {
            "usage": _usage(self.prepared, completion.results),
            "alpha": completion.results[0].alpha,
        }
        return JSONResponse(payload)

    def stream(self) -> Response:
        job = submit(self.request, self.requests, self.prepared, is_stream=True)
        is_chat = self.kind == "chat.completion"
        obj = "chat.completion.chunk" if is_chat else "text_completion"
        num_rows = len(self.prepared) * self.body.n

        def chunk(
            index: int,
            text: str | None,
            finish_reason: str | None = None,
            role: str | None = None,
            logprobs: dict | None = None,
        ) -> dict:
            if is_chat:
                delta = {} if text is None else {"content": text}
                if role:
                    delta = {"role": role} | delta
                choice = {"index": index, "delta": delta, "finish_reason": finish_reason}
            else:
                choice = {"index": index, "text": text or "", "finish_reason": finish_reason}
            return {"data": json.dumps(self.envelope(obj, [choice | {"logprobs": logprobs}]))}

        async def events() -> AsyncIterator[dict]:
            why = "client_disconnected"
            try:
                for index in range(num_rows):
                    if is_chat:  # OpenAI's first chunk of a choice names the role
                        yield chunk(index, "", role="assistant")
                    elif self.echo(index):
                        yield chunk(index, self.echo(index))
                async for item in job.deltas(self.timeout_s):
                    if isinstance(item, Delta):
                        yield chunk(item.index, item.text)
                        continue
                    logprobs = await self.logprobs(item.results)
                    for index, result in enumerate(item.results):
                        reason = FINISH_REASONS[result.finish_reason]
                        yield chunk(index, None, reason, logprobs=logprobs[index])
                    options = self.body.stream_options
                    if options is not None and options.include_usage:
                        usage = _usage(self.prepared, item.results)
                        yield {"data": json.dumps(self.envelope(obj, []) | {"usage": usage})}
            except (RequestTimeoutError, SchedulerClosedError, EngineFailedError) as err:
                why = "timeout"
                yield {"data": json.dumps(_openai_error(refusal(err)).body())}
            except OpenAIError as err:  # the rows finished; building their logprobs failed
                yield {"data": json.dumps(err.body())}
            finally:
                job.close(why)
            yield {"data": "[DONE]"}

        return event_stream(events(), self.request.app.state.config.shutdown_timeout_s)


def _openai_route(handler: Callable[[Request], Any]) -> Callable[[Request], Any]:
    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except Refused as refused:
            err = _openai_error(refused)
        except OpenAIError as raised:
            err = raised
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    return endpoint


# --- routes ------------------------------------------------------------------------------


@_openai_route
async def completions(request: Request) -> Response:
    body: CompletionRequest = await _parse(request, CompletionRequest)
    frontend, pair = _frontend(request)
    params = _params(request, body, body.max_tokens, _check_model(body, pair))
    prompts: list[str | list[int]]
    if isinstance(body.prompt, str) or (body.prompt and isinstance(body.prompt[0], int)):
        prompts = [body.prompt]  # type: ignore[list-item]
    else:
        prompts = list(body.prompt)  # type: ignore[arg-type]
    if len(prompts) > request.app.state.config.max_prompts_per_request:
        raise OpenAIError(413, f"too many prompts: {len(prompts)} in one request", param="prompt")
    for prompt in prompts:
        _check_chars(pair, len(prompt) if isinstance(prompt, str) else 0, "prompt")

    def tokenize() -> list[tuple[str, tuple[int, ...]]]:
        return [
            (p, tuple(frontend.encode(p, "raw")))
            if isinstance(p, str)
            else (frontend.decode(p), tuple(p))
            for p in prompts
        ]

    # Tokenizing a long prompt takes a while: off the event loop, so others are served.
    tokenized = await asyncio.to_thread(tokenize)
    requests, prepared = [], []
    for i, (text, ids) in enumerate(tokenized):
        _check_prompt(frontend, pair, ids, body.max_tokens, "prompt")
        requests.append(
            GenerationRequest(
                text,
                prompt_seed(params, i * body.n),
                n=body.n,
                prompt_format="raw",
                cache_salt=body.cache_salt,
            )
        )
        prepared.append(PreparedPrompt(text, text, ids))
    return await _Job(request, body, requests, prepared, "text_completion").respond()


@_openai_route
async def chat_completions(request: Request) -> Response:
    body: ChatCompletionRequest = await _parse(request, ChatCompletionRequest)
    frontend, pair = _frontend(request)
    models = _check_model(body, pair)
    messages = [m.as_dict() for m in body.messages]
    try:
        text, fmt = format_messages(
            messages, request.app.state.config.prompt_format, tokenizer=pair.tokenizer
        )
    except Exception as err:  # noqa: BLE001 - a template that rejects the conversation
        raise OpenAIError(400, f"cannot format the messages: {err}", param="messages") from None
    _check_chars(pair, len(text), "messages")
    ids = tuple(await asyncio.to_thread(frontend.encode, text, fmt))
    max_tokens = body.max_completion_tokens or body.max_tokens
    is_given = max_tokens is not None
    if max_tokens is None:  # OpenAI's default: as much as the context leaves
        room = frontend.max_row_tokens - len(ids)
        max_tokens = max(1, min(request.app.state.config.max_new_tokens_limit, room))
    _check_prompt(frontend, pair, ids, max_tokens, "messages", is_max_tokens_given=is_given)
    params = _params(request, body, max_tokens, models)
    last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    requests = [
        GenerationRequest(
            last_user, params, n=body.n, prompt_format=fmt, cache_salt=body.cache_salt
        )
    ]
    prepared = [PreparedPrompt(last_user, text, ids)]
    return await _Job(request, body, requests, prepared, "chat.completion").respond()


async def models(request: Request) -> Response:
    pair: ModelPair | None = getattr(request.app.state, "pair", None)
    if pair is None:
        error = OpenAIError(503, "models are still loading", type="server_error")
        return JSONResponse(error.body(), status_code=503, headers={"Retry-After": "5"})
    if pair.lora is None:
        entries = [(pair.after_id, {"after": pair.after_id, "before": pair.before_id})]
    else:  # a LoRA pair: each adapter is a model, amplified against the base by default
        entries = [
            (a.name, {"after": a.name, "before": pair.before_id, "lora": a.describe()})
            for a in pair.lora.adapters
        ]
    data = [
        {"id": name, "object": "model", "created": 0, "owned_by": "batchserve", "lda": lda}
        for name, lda in entries
    ]
    return JSONResponse({"object": "list", "data": data})


ROUTES = [
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/models", models, methods=["GET"]),
]
