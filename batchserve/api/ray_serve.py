"""Replicas of the server behind one endpoint, on Ray Serve (`batchserve serve --ray`).

Each replica is the same Starlette app (`create_app`) behind Serve's ASGI ingress, holding its
own model pair and scheduler; Serve's proxy routes, queues, health-checks and restarts. This
module imports ray, so only `--ray` (or a `serve deploy` config naming `app_builder`) imports it.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

# Set before ray is imported: a cluster this module starts reports nothing home.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402
from ray import serve  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.middleware import Middleware  # noqa: E402
from starlette.requests import Request  # noqa: E402

from batchserve.api.app import MAX_BODY_BYTES, ServerConfig, create_app, health  # noqa: E402
from batchserve.api.cli_options import configure_threads  # noqa: E402
from batchserve.api.cli_serve import serve_parser, server_config_from_args  # noqa: E402
from batchserve.api.responses import error_response  # noqa: E402
from batchserve.api.security import HTTPMiddleware  # noqa: E402
from batchserve.argconfig import config_from_args  # noqa: E402
from batchserve.core.scheduler import SchedulerConfig  # noqa: E402
from batchserve.schemas import ErrorResponse  # noqa: E402

log = logging.getLogger("batchserve")

APP_NAME = "batchserve"
REPLICA_HEADER = "x-batchserve-replica"
# Set by the proxy on a request whose whole body it read before Serve routed it.
BODY_BUFFERED_HEADER = b"x-batchserve-body-buffered"
# How long a replica waits for a body the proxy already holds: one actor call, normally
# milliseconds; past this the body went to a replica that died (see BufferedBodyMiddleware).
PROXIED_BODY_WAIT_S = 5.0


@dataclass(frozen=True)
class ReplicaSpec:
    """Everything a replica needs to build its server; pickled to every replica."""

    config: ServerConfig
    after: str
    before: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    revision: str | None = None
    trust_remote_code: bool = False
    tokenizer_class: str | None = None
    allow_incompatible: bool = False
    adapters: tuple[tuple[str, str], ...] | list[tuple[str, str]] = ()  # LoRA pairs: --adapter
    threads: str = "auto"
    log_level: str = "info"


@dataclass(frozen=True)
class DeploymentOptions:
    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float | None = None
    max_ongoing_requests: int | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0

    @property
    def is_autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None


def default_max_ongoing_requests(scheduler: SchedulerConfig) -> int:
    """As many requests as the replica's own queue takes (it answers 503 past `max_queue_rows`).

    A smaller cap leaves Serve's proxy holding the surplus, and it does not hand a request to a
    replica the moment one frees: it probes a full replica (0.1 s deadline, more under load)
    and backs off up to 0.5 s between tries. Measured with simulated steps (bench.replicas
    --simulate, 64 clients, batch 16): a cap of 2 x batch kept one replica's batch at 11-15
    rows instead of 16, 20-25% below the plain server; with this cap Ray cost under 1% and the
    proxy's power-of-two choice on queue lengths kept 4 replicas within 5% of each other in
    rows served. Ray Serve LLM leaves the cap unbounded for the same reason."""
    return max(1, scheduler.max_queue_rows)


def replica_id() -> str:
    return serve.get_replica_context().replica_id.unique_id


class ReplicaHeaderMiddleware(HTTPMiddleware):
    """Names the replica that answered on every response, so a client can tell them apart."""

    def __init__(self, app: Any, replica: str) -> None:
        super().__init__(app)
        self.header = (REPLICA_HEADER.encode(), replica.encode())

    async def handle(self, scope: dict, receive: Any, send: Any) -> None:
        async def send_with_header(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_with_header)


class ReplicaFailureMiddleware(HTTPMiddleware):
    """In Serve's proxy: a request whose replica died gets 503 + Retry-After, not a bare 500.

    The proxy answers a request cut off by a replica's death (killed, crashed, out of memory)
    with a plain-text 500, which clients rightly do not retry. Our app answers every error as
    JSON, so a response that never started, or a non-JSON 500, is the replica gone: generation
    is a pure function of (prompt, parameters, seed), so the client may safely send it again,
    and Serve routes the retry to a live replica while it restarts the dead one."""

    async def handle(self, scope: dict, receive: Any, send: Any) -> None:
        state = {"started": False, "replaced": False}

        async def send_or_replace(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers", []))
                is_json = b"json" in headers.get(b"content-type", b"")
                if message["status"] == 500 and not is_json:
                    state["replaced"] = True
                    return
                state["started"] = True
            if state["replaced"]:
                return
            await send(message)

        try:
            await self.app(scope, receive, send_or_replace)
        except Exception:
            if state["started"]:
                raise
            log.warning("request to %s failed in the proxy; answering 503", scope.get("path"))
            state["replaced"] = True
        if state["replaced"] or not state["started"]:
            await _send_replica_failed(send)


class BufferedBodyMiddleware(HTTPMiddleware):
    """In Serve's proxy: a request's whole body is read before Serve routes the request.

    Serve's proxy hands a body out once, to the replica that asks for it. When that replica
    dies before it has accepted the request, Serve's router sends the request to another
    replica, which then waits for a body nobody will send: seen in CI as a 408 after the 30 s
    body timeout, on each request a killed replica held. Read here first, the body is
    complete in the proxy's queue before any replica is chosen, and a header says so; a
    replica that then finds no body within seconds knows another took it, and answers 503
    (ProxiedBodyMiddleware), which clients retry. A body over `max_body_bytes` streams on
    unmarked, for the replica's own limit to judge."""

    def __init__(
        self, app: Any, max_body_bytes: int = MAX_BODY_BYTES, body_timeout_s: float = 30.0
    ) -> None:
        super().__init__(app)
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s

    async def handle(self, scope: dict, receive: Any, send: Any) -> None:
        headers = [(k, v) for k, v in scope["headers"] if k != BODY_BUFFERED_HEADER]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout_s
        read: list[dict] = []
        size, is_complete = 0, False
        while not is_complete and size <= self.max_body_bytes:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.001))
            except asyncio.TimeoutError:
                refusal = f"request body not received within {self.body_timeout_s:g} s"
                await error_response(408, refusal, None, {"Connection": "close"})(
                    scope, receive, send
                )
                return
            read.append(message)
            if message["type"] != "http.request":
                break  # the client left mid-body: Serve sees the disconnect as it would
            size += len(message.get("body", b""))
            is_complete = not message.get("more_body", False)
        if is_complete:
            body = b"".join(m.get("body", b"") for m in read)
            read = [{"type": "http.request", "body": body, "more_body": False}]
            headers.append((BODY_BUFFERED_HEADER, b"1"))
        await self.app({**scope, "headers": headers}, _replaying(read, receive), send)


class ProxiedBodyMiddleware(HTTPMiddleware):
    """In a replica: a request whose body the proxy holds but never arrives is answered 503.

    See BufferedBodyMiddleware: the body went to a replica that died, so this request will
    never receive it, and the client's retry, sent anew through the proxy, will."""

    def __init__(self, app: Any, wait_s: float = PROXIED_BODY_WAIT_S) -> None:
        super().__init__(app)
        self.wait_s = wait_s

    async def handle(self, scope: dict, receive: Any, send: Any) -> None:
        if (BODY_BUFFERED_HEADER, b"1") not in scope["headers"]:
            await self.app(scope, receive, send)
            return
        try:
            first = await asyncio.wait_for(receive(), self.wait_s)
        except asyncio.TimeoutError:
            log.warning(
                "%s: the proxy's body for this request went to another replica; answering 503",
                scope.get("path"),
            )
            await _send_replica_failed(send)
            return
        await self.app(scope, _replaying([first], receive), send)


def _replaying(messages: list[dict], receive: Any) -> Any:
    """An ASGI receive that hands out `messages` already read, then reads on."""
    pending = deque(messages)

    async def replay() -> dict:
        return pending.popleft() if pending else await receive()

    return replay


async def _send_replica_failed(send: Any) -> None:
    error = ErrorResponse(error="the replica serving this request failed; retry")
    body = error.model_dump_json().encode()
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", b"1"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def proxy_middlewares() -> list[Middleware]:
    """For RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH, set on every node before `ray start`."""
    return [Middleware(BufferedBodyMiddleware), Middleware(ReplicaFailureMiddleware)]


PROXY_CALLBACK = "batchserve.api.ray_serve:proxy_middlewares"


def _load_replica_pair(spec: ReplicaSpec):
    import torch

    from batchserve.worker.models import load_options, load_pair

    if spec.config.simulate is not None:
        from batchserve.worker.simulated import load_simulated_pair

        return load_simulated_pair(spec.after, spec.before, **load_options(spec))
    on_gpu = spec.device.startswith("cuda") or (spec.device == "auto" and torch.cuda.is_available())
    threads = spec.threads
    if threads == "auto" and not on_gpu:
        # On CPU, as many torch threads as the CPUs Ray reserved for this replica: more would
        # spin against the other replicas on the same machine.
        assigned = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        threads = str(max(1, int(assigned)))
    configure_threads(threads, spec.device)
    return load_pair(spec.after, spec.before, **load_options(spec))


@serve.ingress()
class BatchServeReplica:
    """One pair, one scheduler, the unchanged app; Serve's ingress forwards HTTP to it."""

    async def __init__(self, spec: ReplicaSpec) -> None:
        logging.getLogger("batchserve").setLevel(spec.log_level.upper())
        self._replica = replica_id()
        self._server_config = dataclasses.replace(spec.config, replica_id=self._replica)
        # Loaded here, before the replica reports ready: Serve routes nothing to a replica
        # whose models are still loading, and a pair that fails to load fails the deployment.
        self._pair = await asyncio.to_thread(_load_replica_pair, spec)
        self._server_app: Starlette | None = None

    def __serve_build_asgi_app__(self) -> Starlette:
        self._server_app = create_app(self._server_config, pair=self._pair)
        self._server_app.add_middleware(ProxiedBodyMiddleware)
        self._server_app.add_middleware(ReplicaHeaderMiddleware, replica=self._replica)
        return self._server_app

    async def check_health(self) -> None:
        """The app's own readiness (/health): Serve restarts a replica whose worker died."""
        if self._server_app is None:
            return
        response = await health(Request({"type": "http", "app": self._server_app, "headers": []}))
        if response.status_code != 200:
            raise RuntimeError(f"replica {self._replica} unhealthy: {response.body.decode()}")


def build_application(spec: ReplicaSpec, options: DeploymentOptions) -> serve.Application:
    max_ongoing = options.max_ongoing_requests or default_max_ongoing_requests(
        spec.config.scheduler
    )
    deployment_options: dict[str, Any] = {
        "name": "BatchServe",
        "max_ongoing_requests": max_ongoing,
        "ray_actor_options": {"num_cpus": options.num_cpus, "num_gpus": options.num_gpus},
        # Serve stops routing to a stopping replica, waits this long for its ongoing requests,
        # then runs the app's lifespan shutdown (the scheduler's own drain).
        "graceful_shutdown_timeout_s": spec.config.shutdown_timeout_s,
        "health_check_period_s": 5.0,
    }
    if options.is_autoscaling:
        lowest = options.min_replicas if options.min_replicas is not None else 1
        highest = options.max_replicas if options.max_replicas is not None else options.replicas
        if not 0 <= lowest <= options.replicas <= highest or highest < 1:
            raise ValueError(
                f"need min_replicas <= replicas <= max_replicas, got {lowest} <= "
                f"{options.replicas} <= {highest}"
            )
        deployment_options["autoscaling_config"] = {
            "min_replicas": lowest,
            "max_replicas": highest,
            "initial_replicas": options.replicas,
            "target_ongoing_requests": options.target_ongoing_requests
            or max(1.0, spec.config.scheduler.max_batch_size / 2),
        }
    elif options.replicas < 1:
        raise ValueError(f"replicas must be at least 1, not {options.replicas}")
    else:
        deployment_options["num_replicas"] = options.replicas
    deployment = serve.deployment(BatchServeReplica).options(**deployment_options)
    return deployment.bind(spec)


def spec_from_args(args: argparse.Namespace, config: ServerConfig) -> ReplicaSpec:
    return config_from_args(ReplicaSpec, args, config=config, after=args.after or "toy:after")


def _wants_gpu(device: str) -> bool:
    if device.startswith("cuda"):
        return True
    # auto: a replica gets a GPU where the cluster has any (decided here, where the driver runs).
    return device == "auto" and ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


# What a simulated replica reserves when --threads does not say: its steps wait without the
# CPU, so it needs only its HTTP and scheduling share, and 4 replicas fit a 2-core machine.
SIMULATED_REPLICA_CPUS = 0.25


def options_from_args(args: argparse.Namespace) -> DeploymentOptions:
    is_simulated = getattr(args, "simulate", None) is not None
    default_cpus = SIMULATED_REPLICA_CPUS if is_simulated else 1.0
    num_cpus = float(args.threads) if args.threads.isdigit() else default_cpus
    return config_from_args(
        DeploymentOptions,
        args,
        num_cpus=num_cpus,
        num_gpus=1.0 if not is_simulated and _wants_gpu(args.device) else 0.0,
    )


def app_builder(args: dict[str, Any]) -> serve.Application:
    """For `serve deploy` / `serve run batchserve.api.ray_serve:app_builder key=value ...`.

    `args` are `batchserve serve` options without their dashes (`max_batch_size: 32`), parsed
    by the same parser, so a config file takes exactly what the command line takes."""
    argv = ["--ray"]
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value not in (False, None):
            argv += [flag, str(value)]
    parsed = serve_parser().parse_args(argv)
    return build_application(
        spec_from_args(parsed, server_config_from_args(parsed)), options_from_args(parsed)
    )


def serve_on_ray(args: argparse.Namespace, config: ServerConfig) -> int:
    """Deploy, serve until SIGINT/SIGTERM, then delete the application (replicas drain)."""
    # Read by Serve's proxy when it starts: inherited by a local cluster started below; a
    # cluster started by `ray start` needs it set there (see the README).
    os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", PROXY_CALLBACK)
    # Read by Serve's controller, likewise: it kills a proxy not ready after 3 checks of 5 s,
    # and `serve.start` then fails; on a busy 2-core machine the proxy took 18-21 s to start.
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "30")
    if args.ray_address:
        ray.init(address=args.ray_address, logging_level=logging.WARNING)
    else:
        # A cluster of this machine alone, addressed over loopback (Ray's own gRPC servers
        # still bind every interface; the HTTP proxy binds --host).
        ray.init(
            include_dashboard=False, _node_ip_address="127.0.0.1", logging_level=logging.WARNING
        )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        spec, options = spec_from_args(args, config), options_from_args(args)
        log.info(
            "deploying %d replica(s) of %s on Ray Serve at http://%s:%d",
            options.replicas,
            spec.after,
            args.host,
            args.port,
        )
        serve.run(build_application(spec, options), name=APP_NAME, route_prefix="/")
        log.info("serving on Ray Serve; SIGINT/SIGTERM drains the replicas and exits")
        while not stop.wait(1.0):
            pass
        serve.delete(APP_NAME)
    except (RuntimeError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    finally:
        if not args.ray_address:
            serve.shutdown()
        ray.shutdown()
    return 0
