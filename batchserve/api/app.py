"""The HTTP API: Starlette routes, request validation, JSON errors, lifespan and metrics.

No tensors here. Each generation route turns a validated body into engine requests, queues
them on the scheduler and awaits the future, watching for the client going away.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from batchserve import __version__
from batchserve.api import openai_api, playground
from batchserve.api.bodies import (
    BodyRejected,
    max_prompt_chars,
    read_json_object,
    summarize,
    validation_problems,
)
from batchserve.api.responses import (
    compatibility,
    generate_response,
    json_response,
    lda_batch_response,
    lda_response,
    route_error,
)
from batchserve.api.security import LOOPBACK_HOSTS, guard_middleware
from batchserve.api.streaming import (
    Completion,
    Delta,
    Refused,
    ready_engine,
    run_to_completion,
    sse_response,
    submit,
)
from batchserve.core.scheduler import PromptTooLongError, SchedulerConfig
from batchserve.core.seeds import prompt_seed
from batchserve.core.types import (
    GREEDY_TEMPERATURE,
    GenerationRequest,
    RunnerConfig,
    SamplingParams,
    UnknownModelError,
)
from batchserve.engine import Engine, EngineCore, build_engine_core
from batchserve.frontend import Frontend, PreparedPrompt
from batchserve.metrics import Metrics
from batchserve.schemas import (
    GenerateLDABatchRequest,
    GenerateLDARequest,
    GenerateRequest,
    Health,
    Info,
    LDAFields,
    SamplingFields,
    StreamDelta,
)

if TYPE_CHECKING:  # the HTTP layer never imports torch: the engine comes in with the models
    from batchserve.worker.models import ModelPair
    from batchserve.worker.simulated import SimulatedCost

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class ServerConfig:
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    prompt_format: str = "alpaca"
    max_new_tokens_limit: int = 1024
    max_prompts_per_request: int = 256
    max_samples_per_prompt: int = 64
    request_timeout_s: float = 600.0
    shutdown_timeout_s: float = 30.0
    # KV store sizes and the compile setting; None: the defaults for the batch size.
    runner: RunnerConfig | None = None
    max_body_bytes: int = MAX_BODY_BYTES
    body_timeout_s: float = 30.0
    api_key: str | None = field(default=None, repr=False)
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS
    # Set by each Ray Serve replica (batchserve.api.ray_serve); /info then names the replica.
    replica_id: str | None = None
    # `--simulate`: a SimulatedRunner (worker/simulated.py) instead of the models; the pair
    # then needs only its tokenizer and configs (load_simulated_pair).
    simulate: SimulatedCost | None = None

    def runner_config(self) -> RunnerConfig:
        if self.runner is not None:
            return dataclasses.replace(self.runner, max_batch_size=self.scheduler.max_batch_size)
        return RunnerConfig(max_batch_size=self.scheduler.max_batch_size)


class APIError(Exception):
    """An error answered as JSON `{"error": ..., "detail": ...}` with a status code."""

    def __init__(
        self, status: int, error: str, detail: Any = None, headers: dict | None = None
    ) -> None:
        super().__init__(error)
        self.status, self.error, self.detail, self.headers = status, error, detail, headers


# --- request parsing --------------------------------------------------------------------------


async def parse_body(request: Request, schema: type[BaseModel]) -> Any:
    try:
        return schema.model_validate(await read_json_object(request))
    except BodyRejected as err:
        raise APIError(err.status, str(err)) from None
    except ValidationError as err:
        problems = validation_problems(err)
        raise APIError(422, summarize(problems), problems) from None


def sampling_params(body: SamplingFields, config: ServerConfig, alpha: float) -> SamplingParams:
    if body.max_new_tokens > config.max_new_tokens_limit:
        raise APIError(
            422,
            f"invalid request: max_new_tokens: {body.max_new_tokens} exceeds this server's limit "
            f"of {config.max_new_tokens_limit}",
            [
                {
                    "field": "max_new_tokens",
                    "message": "above the server's limit",
                    "type": "less_than_equal",
                }
            ],
        )
    is_greedy = not body.do_sample or body.temperature < GREEDY_TEMPERATURE
    return SamplingParams(
        alpha=alpha,
        temperature=0.0 if is_greedy else body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        max_new_tokens=body.max_new_tokens,
        ignore_eos=getattr(body, "ignore_eos", False),
        seed=body.seed,
        stop=body.stop_strings,
    )


def with_models(request: Request, body: SamplingFields, params: SamplingParams) -> SamplingParams:
    """The row's after/before adapters by name (a LoRA pair); an unknown one is a 422."""
    pair = _loaded_pair(request)
    try:
        after, before = pair.model_names(body.after, body.before)
    except UnknownModelError as err:
        problem = {"field": err.field, "message": str(err), "type": "unknown_model"}
        raise APIError(422, f"invalid request: {err}", [problem]) from None
    return dataclasses.replace(params, after=after, before=before)


def _model_ids(requests: list[GenerationRequest], pair: ModelPair) -> tuple[str, str]:
    """The after and before models the request ran (its adapters, on a LoRA pair)."""
    params = requests[0].params
    return params.after or pair.after_id, params.before or pair.before_id


def prompt_format(body: SamplingFields, config: ServerConfig) -> str:
    return config.prompt_format if body.apply_chat_template else "raw"


# --- generation plumbing ------------------------------------------------------------------------


async def prepare_requests(
    request: Request, requests: list[GenerationRequest]
) -> list[PreparedPrompt]:
    """Format and tokenize for the engine that will run them; a prompt that could never fit
    is a 413 naming it."""
    _, frontend = ready_engine(request)
    context = request.app.state.pair.max_context
    for index, r in enumerate(requests):
        num_chars = len(r.prompt) + len(r.system_prompt or "")
        if num_chars > max_prompt_chars(context):
            raise APIError(
                413,
                f"prompt {index} has {num_chars} characters, more than this server tokenizes "
                f"for the models' context of {context} tokens ({max_prompt_chars(context)})",
                {"prompt_index": index},
            )
    try:
        # Tokenizing a long prompt takes a while: off the event loop, so others are served.
        prepared = await asyncio.to_thread(
            lambda: [frontend.prepare(r, i) for i, r in enumerate(requests)]
        )
    except PromptTooLongError as err:
        raise APIError(413, str(err), {"prompt_index": err.index}) from None
    return prepared


async def run_requests(request: Request, requests: list[GenerationRequest]) -> Completion:
    prepared = await prepare_requests(request, requests)
    timeout_s = request.app.state.config.request_timeout_s
    return await run_to_completion(request, requests, prepared, timeout_s)


def debug_headers(completion: Completion) -> dict[str, str]:
    """Where the request sat in the engine's step clock: timing-free evidence of scheduling."""
    return {
        "x-batchserve-admitted-step": str(completion.admitted_step),
        "x-batchserve-finished-step": str(completion.finished_step),
        "x-batchserve-queue-wait-ms": f"{completion.queue_wait_s * 1000:.1f}",
    }


async def stream_requests(
    request: Request,
    requests: list[GenerationRequest],
    render_result: Callable[[Completion], BaseModel],
    row_models: list[str] | None = None,
) -> Response:
    """`"stream": true`: SSE `delta` events as the rows grow, then the usual body as `result`.

    A delta is `{"index": row, "text": ...}`, plus `"model"` where `row_models` names each row's.
    """

    def render_delta(delta: Delta) -> StreamDelta:
        model = row_models[delta.index] if row_models else None
        return StreamDelta(index=delta.index, text=delta.text, model=model)

    prepared = await prepare_requests(request, requests)
    job = submit(request, requests, prepared, is_stream=True)
    config: ServerConfig = request.app.state.config
    return sse_response(
        job, config.request_timeout_s, render_delta, render_result, config.shutdown_timeout_s
    )


def _lda_requests(
    request: Request, body: LDAFields, prompts: list[str], n: int
) -> list[GenerationRequest]:
    config: ServerConfig = request.app.state.config
    params = dataclasses.replace(
        with_models(request, body, sampling_params(body, config, body.alpha)),
        logprobs=body.logprobs,
        score_alphas=tuple(body.score_alphas),
    )
    fmt = prompt_format(body, config)
    return [
        GenerationRequest(
            p,
            prompt_seed(params, i * n),
            n=n,
            system_prompt=body.system_prompt,
            prompt_format=fmt,
            cache_salt=body.cache_salt,
        )
        for i, p in enumerate(prompts)
    ]


async def respond(
    request: Request,
    requests: list[GenerationRequest],
    render_result: Callable[[Completion], BaseModel],
    *,
    is_stream: bool,
    row_models: list[str] | None = None,
) -> Response:
    """The route's body from `render_result`: as SSE events (`"stream": true`) or one JSON body."""
    if is_stream:
        return await stream_requests(request, requests, render_result, row_models)
    completion = await run_requests(request, requests)
    return json_response(render_result(completion), headers=debug_headers(completion))


# --- routes ---------------------------------------------------------------------------------


async def generate_lda(request: Request) -> Response:
    body = await parse_body(request, GenerateLDARequest)
    requests = _lda_requests(request, body, [body.prompt], 1)
    models = _model_ids(requests, request.app.state.pair)

    def payload(completion: Completion) -> BaseModel:
        return lda_response(completion.results[0], *models)

    return await respond(request, requests, payload, is_stream=body.stream)


async def generate_lda_batch(request: Request) -> Response:
    body = await parse_body(request, GenerateLDABatchRequest)
    config: ServerConfig = request.app.state.config
    if len(body.prompts) > config.max_prompts_per_request:
        raise APIError(
            413,
            f"too many prompts: {len(body.prompts)} in one request, this server takes at most "
            f"{config.max_prompts_per_request}; split them over several requests",
        )
    if body.n > config.max_samples_per_prompt:
        raise APIError(
            422,
            f"invalid request: n: {body.n} exceeds this server's limit of {config.max_samples_per_prompt}",
        )
    num_rows = len(body.prompts) * body.n
    if num_rows > config.scheduler.max_queue_rows:
        raise APIError(
            413,
            f"{num_rows} rows (prompts x n) exceed the queue's {config.scheduler.max_queue_rows}",
        )
    requests = _lda_requests(request, body, body.prompts, body.n)
    models = _model_ids(requests, request.app.state.pair)

    def payload(completion: Completion) -> BaseModel:
        return lda_batch_response(completion.results, body.n, *models)

    return await respond(request, requests, payload, is_stream=body.stream)


async def generate_plain(request: Request) -> Response:
    """Each model alone (alpha 0 is `after`, alpha -1 is `before`), through the same engine."""
    body = await parse_body(request, GenerateRequest)
    config: ServerConfig = request.app.state.config
    fmt = prompt_format(body, config)
    requests = [
        GenerationRequest(
            body.prompt,
            with_models(request, body, sampling_params(body, config, alpha)),
            system_prompt=body.system_prompt,
            prompt_format=fmt,
        )
        for alpha in (0.0, -1.0)
    ]
    models = _model_ids(requests, request.app.state.pair)

    def payload(completion: Completion) -> BaseModel:
        after, before = completion.results
        return generate_response(body.prompt, after, before, *models)

    rows = ["model_1", "model_2"]  # after, before
    return await respond(request, requests, payload, is_stream=body.stream, row_models=rows)


async def tokenizer_compatibility(request: Request) -> Response:
    pair = _loaded_pair(request)
    return json_response(compatibility(pair.compatibility))


async def health(request: Request) -> Response:
    state = request.app.state
    if getattr(state, "load_error", None):
        return json_response(Health(status="error", error=state.load_error), 500)
    if getattr(state, "engine", None) is None:
        return json_response(Health(status="loading"), 503, {"Retry-After": "5"})
    if getattr(state, "is_draining", False):
        return json_response(Health(status="shutting down"), 503)
    if not state.engine.is_alive:
        return json_response(Health(status="error", error="worker thread stopped"), 500)
    return json_response(Health(status="ok"))


async def info(request: Request) -> Response:
    pair = _loaded_pair(request)
    config: ServerConfig = request.app.state.config
    return json_response(
        Info(
            replica_id=config.replica_id,
            version=__version__,
            models={
                "after": pair.after_id,
                "before": pair.before_id,
                # A LoRA pair: one base carrying its adapters unmerged (rank, targets each).
                "kind": "full" if pair.lora is None else "lora",
                "lora": None if pair.lora is None else pair.lora.describe(),
            },
            device=str(pair.device),
            dtype=str(pair.dtype).removeprefix("torch."),
            vocab={
                "tokenizer_size": len(pair.tokenizer),
                "vocab_limit": pair.vocab_limit,
                "max_context": pair.max_context,
            },
            prompt_format=config.prompt_format,
            scheduler=asdict(config.scheduler),
            engine=request.app.state.engine_info,
            limits={
                "max_new_tokens_limit": config.max_new_tokens_limit,
                "max_prompts_per_request": config.max_prompts_per_request,
                "max_samples_per_prompt": config.max_samples_per_prompt,
                "request_timeout_s": config.request_timeout_s,
            },
            tokenizer_compatibility=compatibility(pair.compatibility),
        )
    )


async def metrics(request: Request) -> Response:
    return Response(
        request.app.state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8"
    )


def _loaded_pair(request: Request) -> ModelPair:
    pair = getattr(request.app.state, "pair", None)
    if pair is None:
        raise Refused(503, "models are still loading", retry_after_s=5)
    return pair


# --- errors -----------------------------------------------------------------------------------


async def api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return route_error(request.url.path, exc.status, exc.error, exc.detail, exc.headers)


async def refused(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Refused)
    return route_error(request.url.path, exc.status, exc.message, None, exc.headers)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return route_error(request.url.path, exc.status_code, exc.detail, None, exc.headers)


async def unexpected_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s", request.url.path)
    request.app.state.metrics.errors.labels(kind="internal").inc()
    return route_error(request.url.path, 500, "internal server error", str(exc))


# --- app --------------------------------------------------------------------------------------


class MetricsMiddleware:
    """Counts requests by route and status, and times the generation routes."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in ROUTE_PATHS else "other"
        status = {"code": 500}
        started = time.perf_counter()

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.requests.labels(route=route, status=str(status["code"])).inc()
            if route.startswith("/generate"):
                self.metrics.request_latency.labels(route=route).observe(
                    time.perf_counter() - started
                )


ROUTES = [
    Route("/", playground.page, methods=["GET"]),
    Route("/generate_lda", generate_lda, methods=["POST"]),
    Route("/generate_lda_batch", generate_lda_batch, methods=["POST"]),
    Route("/generate", generate_plain, methods=["POST"]),
    Route("/tokenizer_compatibility", tokenizer_compatibility, methods=["GET"]),
    Route("/health", health, methods=["GET"]),
    Route("/info", info, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    *openai_api.ROUTES,
]
ROUTE_PATHS = {r.path for r in ROUTES}


def create_app(
    config: ServerConfig | None = None,
    *,
    pair: ModelPair | None = None,
    load_pair: Callable[[], ModelPair] | None = None,
    on_load_error: Callable[[BaseException], None] | None = None,
) -> Starlette:
    """An app serving `pair`, or the pair `load_pair()` returns (loaded in the background, so
    /health answers 503 until it is ready)."""
    if (pair is None) == (load_pair is None):
        raise ValueError("give exactly one of pair and load_pair")
    config = config or ServerConfig()
    app_metrics = Metrics()

    def start_serving(app: Starlette, loaded: ModelPair) -> None:
        if config.simulate is not None:
            from batchserve.worker.simulated import SimulatedRunner

            runner = SimulatedRunner.for_pair(loaded, config.simulate)
            core = EngineCore(
                runner, config.scheduler, eos_token_ids=sorted(loaded.eos_token_ids),
                metrics=app_metrics, model_ids=(loaded.after_id, loaded.before_id),
            )  # fmt: skip
        else:
            core = build_engine_core(loaded, config.runner_config(), config.scheduler, app_metrics)
        engine = Engine(core)
        frontend = Frontend(
            loaded.tokenizer,
            prompt_format=config.prompt_format,
            max_row_tokens=core.runner.max_row_tokens,
        )
        engine.start()
        app.state.pair = loaded
        app.state.engine_info = core.runner.info()
        app.state.frontend = frontend
        app.state.engine = engine
        log.info(
            "serving %s (after) vs %s (before) on %s in %s; scheduler %s; tokenizers: %s",
            loaded.after_id,
            loaded.before_id,
            loaded.device,
            loaded.dtype,
            asdict(config.scheduler),
            asdict(loaded.compatibility),
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        app.state.config = config
        app.state.metrics = app_metrics
        app.state.pair = None
        app.state.engine = None
        app.state.load_error = None
        app.state.is_draining = False
        loader: threading.Thread | None = None
        if pair is not None:
            start_serving(app, pair)
        else:

            def load() -> None:
                try:
                    start_serving(app, load_pair())
                except BaseException as err:  # noqa: BLE001 - reported on /health and to the CLI
                    log.error("could not load the models: %s", err)
                    app.state.load_error = str(err)
                    if on_load_error is not None:
                        on_load_error(err)

            loader = threading.Thread(target=load, name="batchserve-loader", daemon=True)
            loader.start()
        try:
            yield
        finally:
            if loader is not None:
                loader.join(timeout=1)
            await drain(app, config.shutdown_timeout_s)

    app = Starlette(
        routes=ROUTES,
        middleware=guard_middleware(
            api_key=config.api_key,
            allowed_hosts=config.allowed_hosts,
            max_body_bytes=config.max_body_bytes,
            body_timeout_s=config.body_timeout_s,
        ),
        lifespan=lifespan,
        exception_handlers={
            APIError: api_error,
            Refused: refused,
            HTTPException: http_error,
            Exception: unexpected_error,
        },
    )
    app.add_middleware(MetricsMiddleware, metrics=app_metrics)
    app.state.config = config
    app.state.metrics = app_metrics
    return app


async def drain(app: Starlette, timeout_s: float) -> None:
    """Answer 503 to newcomers, give in-flight requests timeout_s, then fail the rest with 503.

    The server calls this before it stops listening (batchserve.api.server), and the lifespan
    again at exit (then a no-op), so no request is left for uvicorn to cancel into a text 500.
    """
    app.state.is_draining = True
    engine: Engine | None = getattr(app.state, "engine", None)
    if engine is None:
        return
    loop = asyncio.get_running_loop()
    finished = asyncio.Event()

    def shut_down() -> None:
        engine.shutdown(timeout_s)
        with contextlib.suppress(RuntimeError):  # the loop is gone after a forced exit
            loop.call_soon_threadsafe(finished.set)

    # A daemon thread, not the default executor: after a forced exit (a second Ctrl-C) nobody
    # awaits this, and asyncio.run would otherwise wait for the executor's threads at exit.
    threading.Thread(target=shut_down, name="batchserve-drain", daemon=True).start()
    await finished.wait()
