"""The `serve` command's options and the server configuration they make.

Apart from the entry point so that the Ray deployment (`ray_serve.app_builder`) parses a
config file with exactly these options without importing `cli`, which imports it.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from batchserve.api.cli_options import add_model_options, option, runner_config
from batchserve.argconfig import config_from_args
from batchserve.core.scheduler import SCHEDULER_MODES
from batchserve.worker.simulated import simulated_cost_option

if TYPE_CHECKING:
    from batchserve.api.app import ServerConfig

SERVE_DESCRIPTION = (
    "Serve LDA over HTTP with iteration-level batching. Every option also reads "
    "BATCHSERVE_<OPTION> from the environment (e.g. BATCHSERVE_MAX_BATCH_SIZE=32)."
)


def add_serve_options(parser: argparse.ArgumentParser) -> None:
    """Every `serve` option, each with its BATCHSERVE_<OPTION> default."""
    add_model_options(parser, from_env=True)
    simulation = parser.add_argument_group(
        "simulation (no weights: the pair's tokenizer and configs only)"
    )
    option(
        simulation,
        "--simulate",
        None,
        simulated_cost_option,
        metavar="STEP_MS,PER_ROW_MS[,PREFILL_MS_PER_TOKEN]",
        help="serve a simulated runner instead of the models: each step waits STEP_MS + "
        "PER_ROW_MS x rows + PREFILL_MS_PER_TOKEN x prompt tokens without using the CPU, then "
        "emits tokens seeded by (seed, step), never EOS; scheduler, HTTP, streaming and Ray "
        "are the real ones (e.g. 20,0.05)",
    )
    http = parser.add_argument_group("http")
    option(http, "--host", "127.0.0.1", help="bind address (default: %(default)s)")
    option(http, "--port", 8000, int, help="(default: %(default)s)")
    option(
        http,
        "--log-level",
        "info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="(default: %(default)s)",
    )
    option(
        http,
        "--api-key",
        None,
        help="require 'Authorization: Bearer KEY' on every route but /health (better given "
        "as BATCHSERVE_API_KEY: a command line is visible to other users of the machine)",
    )
    option(
        http,
        "--allowed-hosts",
        None,
        help="comma-separated Host names to answer, '*' for any, '*.example.com' for a domain "
        "(default: localhost, 127.0.0.1, [::1] and the --host address), against DNS rebinding",
    )
    option(
        http,
        "--max-body-bytes",
        16 * 1024 * 1024,
        int,
        help="larger request bodies get 413 before they are read (default: %(default)s)",
    )
    option(
        http,
        "--header-timeout-s",
        10.0,
        float,
        help="a connection must send its request headers within this (default: %(default)s)",
    )
    option(
        http,
        "--body-timeout-s",
        30.0,
        float,
        help="and then its body within this, or get 408 (default: %(default)s)",
    )
    option(
        http,
        "--timeout-keep-alive-s",
        5.0,
        float,
        help="an idle keep-alive connection is closed after this (default: %(default)s)",
    )
    option(
        http,
        "--limit-concurrency",
        512,
        int,
        help="open connections at most; past it uvicorn answers 503 (default: %(default)s)",
    )
    option(
        http,
        "--max-header-bytes",
        16 * 1024,
        int,
        help="request line and headers at most (default: %(default)s)",
    )
    sched = parser.add_argument_group("scheduling")
    option(
        sched,
        "--scheduler",
        "continuous",
        choices=SCHEDULER_MODES,
        help="continuous: join the running batch at the next step; static: collect a window and "
        "run it to completion; serial: one request at a time (default: %(default)s)",
    )
    option(sched, "--max-batch-size", 64, int, help="running rows at most (default: %(default)s)")
    option(
        sched,
        "--max-wait-ms",
        10.0,
        float,
        help="when idle, how long to gather a first group (default: %(default)s)",
    )
    option(
        sched,
        "--max-queue-rows",
        4096,
        int,
        help="waiting rows before answering 503 (default: %(default)s)",
    )
    option(
        sched,
        "--max-num-batched-tokens",
        2048,
        int,
        help="tokens in one step's forward: every running row's next token plus newcomers' "
        "prompt chunks; a longer prompt is prefilled over several steps, so running rows never "
        "stall for more than this (default: %(default)s)",
    )
    option(
        sched,
        "--prefix-cache",
        True,
        action=argparse.BooleanOptionalAction,
        dest="enable_prefix_cache",
        help="share the KV of prompt blocks already computed (the n samples of a prompt, its "
        "other alphas, a common system prompt); --no-prefix-cache computes every prompt anew "
        "(default: on)",
    )
    limits = parser.add_argument_group("limits")
    option(limits, "--max-new-tokens-limit", 1024, int, help="(default: %(default)s)")
    option(limits, "--max-prompts-per-request", 256, int, help="(default: %(default)s)")
    option(limits, "--max-samples-per-prompt", 64, int, help="largest n (default: %(default)s)")
    option(
        limits,
        "--request-timeout-s",
        600.0,
        float,
        help="a request still unfinished after this is dropped with 504 (default: %(default)s)",
    )
    option(
        limits,
        "--shutdown-timeout-s",
        30.0,
        float,
        help="on SIGINT/SIGTERM, time given to in-flight requests (default: %(default)s)",
    )
    replicas = parser.add_argument_group(
        "replicas on Ray Serve (pip install 'batchserve[ray]')",
        "--ray deploys this server as a Ray Serve application: every option above goes to each "
        "replica (one pair and scheduler each; one GPU each on CUDA); --host/--port are Serve's "
        "HTTP endpoint.",
    )
    option(
        replicas,
        "--ray",
        False,
        action="store_true",
        help="serve replicas behind one endpoint on Ray Serve",
    )
    option(
        replicas,
        "--ray-address",
        None,
        help="join this Ray cluster (e.g. 10.0.0.1:6379) instead of starting a local one",
    )
    option(
        replicas,
        "--replicas",
        1,
        int,
        help="replicas (initial replicas when autoscaling) (default: %(default)s)",
    )
    option(
        replicas,
        "--min-replicas",
        None,
        int,
        help="autoscale between --min-replicas and --max-replicas (default: no autoscaling)",
    )
    option(replicas, "--max-replicas", None, int)
    option(
        replicas,
        "--target-ongoing-requests",
        None,
        float,
        help="autoscaling target of requests per replica (default: half of --max-batch-size)",
    )
    option(
        replicas,
        "--max-ongoing-requests",
        None,
        int,
        help="requests one replica takes before Serve queues the rest for the next free replica "
        "(default: --max-queue-rows, what the replica's own queue takes)",
    )


def serve_parser() -> argparse.ArgumentParser:
    """The `serve` options alone (what a Ray Serve config file's `args` are parsed with)."""
    parser = argparse.ArgumentParser(prog="batchserve serve", description=SERVE_DESCRIPTION)
    add_serve_options(parser)
    return parser


def server_config_from_args(args: argparse.Namespace) -> ServerConfig:
    from batchserve.api.app import ServerConfig
    from batchserve.api.security import default_allowed_hosts, parse_allowed_hosts
    from batchserve.core.scheduler import SchedulerConfig

    try:
        scheduler = config_from_args(SchedulerConfig, args, mode=args.scheduler)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    allowed_hosts = parse_allowed_hosts(args.allowed_hosts) or default_allowed_hosts(args.host)
    if args.max_body_bytes < 1 or args.header_timeout_s <= 0 or args.body_timeout_s <= 0:
        raise SystemExit("error: --max-body-bytes and the timeouts must be positive")
    return config_from_args(
        ServerConfig,
        args,
        scheduler=scheduler,
        runner=runner_config(args),
        api_key=args.api_key or None,
        allowed_hosts=allowed_hosts,
    )
