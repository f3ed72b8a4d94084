"""`batchserve serve` (the HTTP server) and `batchserve generate` (offline, no HTTP).

The entry point: it assembles the commands from `cli_serve` and `cli_generate` (their options;
the shared pieces are in `cli_options`) and runs `serve`, which alone imports the Ray
deployment, and only for `--ray`.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from collections.abc import Sequence
from typing import Any

from batchserve import __version__
from batchserve.api.cli_generate import add_generate_parser
from batchserve.api.cli_options import configure_threads
from batchserve.api.cli_serve import SERVE_DESCRIPTION, add_serve_options, server_config_from_args

log = logging.getLogger("batchserve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batchserve",
        description="Logit Diff Amplification: sample from after + alpha * (after - before), batched.",
    )
    parser.add_argument("--version", action="version", version=f"batchserve {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the HTTP server", description=SERVE_DESCRIPTION)
    add_serve_options(serve)
    serve.set_defaults(func=cmd_serve)
    add_generate_parser(commands)
    return parser


def page_url(host: str, port: int) -> str:
    """Where a browser on this machine finds the playground (a wildcard bind is local too)."""
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def cmd_serve(args: argparse.Namespace) -> int:
    from batchserve.api.app import create_app
    from batchserve.api.security import startup_warnings
    from batchserve.api.server import ConnectionLimits, build_server, check_can_listen
    from batchserve.worker.models import load_options, load_pair
    from batchserve.worker.simulated import load_simulated_pair

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = server_config_from_args(args)
    shown = {k: v for k, v in vars(args).items() if k != "func"}
    shown["api_key"] = "(set)" if args.api_key else None
    log.info("batchserve %s: %s", __version__, shown)
    for warning in startup_warnings(args.host, config.api_key, config.allowed_hosts):
        log.warning(warning)
    if args.ray:
        if not args.ray_address:
            # A cluster of this machine alone: Ray maps 127.0.0.1 to the machine's first
            # network address unless told it is not a cluster; this keeps it on loopback.
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        # Imported only here: a plain install never imports ray.
        try:
            from batchserve.api.ray_serve import serve_on_ray
        except ImportError as err:
            raise SystemExit(
                f"error: --ray needs Ray Serve ({err}): pip install 'batchserve[ray]'"
            ) from None

        return serve_on_ray(args, config)
    if args.replicas != 1 or args.ray_address:
        raise SystemExit("error: --replicas and --ray-address need --ray")
    try:
        check_can_listen(args.host, args.port)
    except socket.gaierror as err:
        raise SystemExit(f"error: --host {args.host}: {err.strerror or err}") from None
    except OSError as err:
        raise SystemExit(
            f"error: cannot listen on {args.host}:{args.port}: {err.strerror or err} "
            "(another server there? --port chooses another)"
        ) from None
    configure_threads(args.threads, args.device)
    after = args.after or "toy:after"

    def load():
        loader = load_pair if config.simulate is None else load_simulated_pair
        return loader(after, args.before, **load_options(args))

    holder: dict[str, Any] = {}

    def stop_on_load_error(err: BaseException) -> None:
        holder["server"].should_exit = True

    app = create_app(config, load_pair=load, on_load_error=stop_on_load_error)
    server = build_server(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        shutdown_timeout_s=args.shutdown_timeout_s,
        limits=ConnectionLimits(
            header_timeout_s=args.header_timeout_s,
            timeout_keep_alive_s=args.timeout_keep_alive_s,
            limit_concurrency=args.limit_concurrency if args.limit_concurrency > 0 else None,
            max_header_bytes=args.max_header_bytes,
        ),
    )
    holder["server"] = server
    print(f"playground: {page_url(args.host, args.port)}  (OpenAI-compatible API: /v1)", flush=True)
    server.run()
    if app.state.load_error:
        print(f"error: could not load the models: {app.state.load_error}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
