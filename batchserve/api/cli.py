"""`batchserve serve` (the HTTP server) and `batchserve generate` (offline, no HTTP).

Every `serve` option can also come from an environment variable `BATCHSERVE_<NAME>` (for
containers); `MODEL_AFTER_ID` / `MODEL_BEFORE_ID` are honoured as the original server read them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from pydantic import BaseModel, ConfigDict, ValidationError

from batchserve import __version__
from batchserve.argconfig import config_from_args
from batchserve.core.scheduler import SCHEDULER_MODES
from batchserve.frontend import PROMPT_FORMATS
from batchserve.schemas import (
    Alpha,
    MaxNewTokens,
    NonEmptyPrompt,
    NumSamples,
    Seed,
    Temperature,
    TopK,
    TopP,
)
from batchserve.worker.simulated import simulated_cost_option

if TYPE_CHECKING:
    from batchserve.api.app import ServerConfig

log = logging.getLogger("batchserve")

ENV_PREFIX = "BATCHSERVE_"


def _env(name: str, default: Any, cast: Callable[[str], Any] = str, *aliases: str) -> Any:
    for key in (ENV_PREFIX + name, *aliases):
        if key in os.environ and os.environ[key] != "":
            try:
                return cast(os.environ[key])
            except (ValueError, argparse.ArgumentTypeError):
                raise SystemExit(
                    f"error: environment variable {key}={os.environ[key]!r} is not a valid value"
                ) from None
    return default


def _env_flag(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)


def _option(
    group: argparse._ActionsContainer,
    flag: str,
    default: Any,
    cast: Callable[[str], Any] = str,
    *,
    aliases: tuple[str, ...] = (),
    from_env: bool = True,
    **kwargs: Any,
) -> None:
    """Add `flag`, its default read from BATCHSERVE_<FLAG> (dashes as underscores) or an alias
    where set: the one rule that names the environment variable of every `serve` option."""
    is_switch = kwargs.get("action") in ("store_true", argparse.BooleanOptionalAction)
    if from_env:
        name = flag.removeprefix("--").upper().replace("-", "_")
        default = _env(name, default, _env_flag if is_switch else cast, *aliases)
    if cast is not str:
        kwargs["type"] = cast
    group.add_argument(flag, default=default, **kwargs)


def _adapter_option(value: str) -> tuple[str, str]:
    name, sep, folder = value.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {value!r}")
    return name, folder


def _add_model_options(parser: argparse.ArgumentParser, *, from_env: bool) -> None:
    group = parser.add_argument_group("models")
    _option(
        group,
        "--after",
        None,
        aliases=("MODEL_AFTER_ID",),
        from_env=from_env,
        help="fine-tuned model: local dir, hub id, or toy (default: the embedded toy pair); a "
        "LoRA adapter (adapter_config.json; toy:lora) is served unmerged on one base copy",
    )
    _option(
        group,
        "--before",
        None,
        aliases=("MODEL_BEFORE_ID",),
        from_env=from_env,
        help="base model: local dir or hub id (default: the toy base when --after is the toy, "
        "the adapter's base_model_name_or_path when it is a LoRA adapter)",
    )
    _option(group, "--revision", None, from_env=from_env, help="hub revision of both models")
    group.add_argument(
        "--adapter", action="append", type=_adapter_option, default=[], dest="adapters",
        metavar="NAME=DIR", help="LoRA pairs: serve this adapter on the same base too "
        "(repeatable); a request names it as its after (or before) model",
    )  # fmt: skip
    _option(
        group,
        "--trust-remote-code",
        False,
        from_env=from_env,
        action="store_true",
        help="allow model code from the hub repository",
    )
    _option(
        group,
        "--tokenizer-class",
        None,
        from_env=from_env,
        help="override the tokenizer class (e.g. LlamaTokenizer for uploads naming LLaMATokenizer)",
    )
    _option(
        group,
        "--device",
        "auto",
        from_env=from_env,
        help="auto, cpu, cuda or cuda:N (default: %(default)s)",
    )
    _option(
        group,
        "--dtype",
        "auto",
        from_env=from_env,
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto = bfloat16 on CUDA where supported (else float16), float32 on CPU",
    )
    _option(
        group,
        "--threads",
        "auto",
        from_env=from_env,
        help="torch CPU threads; auto = half the cores on a CPU device (a second thread "
        "spin-waits against the HTTP side on small machines), torch's default on CUDA",
    )
    _option(
        group,
        "--allow-incompatible",
        False,
        from_env=from_env,
        action="store_true",
        help="load a pair whose tokenizers disagree (results are then meaningless)",
    )
    _option(
        group,
        "--prompt-format",
        "alpaca",
        from_env=from_env,
        choices=PROMPT_FORMATS,
        help="how prompts are wrapped: alpaca, chat (the tokenizer's template) or raw (default: %(default)s)",
    )
    _option(
        group,
        "--compile",
        None,
        from_env=from_env,
        action=argparse.BooleanOptionalAction,
        help="torch.compile the step (both models over a packed step) once at start-up; the "
        "compiled step runs about 2x faster on the CPU and takes 15-60 s to compile, cached "
        "under $TORCHINDUCTOR_CACHE_DIR for the next start (default: on for CPU, off on CUDA)",
    )
    kv = parser.add_argument_group("KV store (allocated once at start-up; /info reports it)")
    _option(
        kv,
        "--kv-cache-tokens",
        None,
        int,
        from_env=from_env,
        help="tokens the KV store holds for all running rows together; a row reserves its "
        "prompt + max_new_tokens at admission and waits while they do not fit (default: on "
        "CUDA from --gpu-memory-fraction, on the CPU max batch size x min(context, 2048))",
    )
    _option(
        kv,
        "--gpu-memory-fraction",
        0.9,
        float,
        from_env=from_env,
        help="share of the GPU's memory the server may use, weights included; the KV store "
        "takes what the weights and 1 GiB of activations leave (default: %(default)s)",
    )


def runner_config(args: argparse.Namespace):
    """The runner's sizes and compile setting from the command line."""
    from batchserve.core.types import RunnerConfig

    try:
        return config_from_args(RunnerConfig, args, max_batch_size=args.max_batch_size)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None


def configure_threads(threads: str, device: str) -> None:
    import torch

    if threads == "auto":
        if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
            return
        count = max(1, (os.cpu_count() or 2) // 2)
    else:
        try:
            count = int(threads)
        except ValueError:
            raise SystemExit(
                f"error: --threads must be auto or a positive integer, not {threads!r}"
            ) from None
        if count < 1:
            raise SystemExit("error: --threads must be at least 1")
    torch.set_num_threads(count)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batchserve",
        description="Logit Diff Amplification: sample from after + alpha * (after - before), batched.",
    )
    parser.add_argument("--version", action="version", version=f"batchserve {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the HTTP server",
        description="Serve LDA over HTTP with iteration-level batching. Every option also reads "
        "BATCHSERVE_<OPTION> from the environment (e.g. BATCHSERVE_MAX_BATCH_SIZE=32).",
    )
    _add_model_options(serve, from_env=True)
    simulation = serve.add_argument_group(
        "simulation (no weights: the pair's tokenizer and configs only)"
    )
    _option(
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
    http = serve.add_argument_group("http")
    _option(http, "--host", "127.0.0.1", help="bind address (default: %(default)s)")
    _option(http, "--port", 8000, int, help="(default: %(default)s)")
    _option(
        http,
        "--log-level",
        "info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="(default: %(default)s)",
    )
    _option(
        http,
        "--api-key",
        None,
        help="require 'Authorization: Bearer KEY' on every route but /health (better given "
        "as BATCHSERVE_API_KEY: a command line is visible to other users of the machine)",
    )
    _option(
        http,
        "--allowed-hosts",
        None,
        help="comma-separated Host names to answer, '*' for any, '*.example.com' for a domain "
        "(default: localhost, 127.0.0.1, [::1] and the --host address), against DNS rebinding",
    )
    _option(
        http,
        "--max-body-bytes",
        16 * 1024 * 1024,
        int,
        help="larger request bodies get 413 before they are read (default: %(default)s)",
    )
    _option(
        http,
        "--header-timeout-s",
        10.0,
        float,
        help="a connection must send its request headers within this (default: %(default)s)",
    )
    _option(
        http,
        "--body-timeout-s",
        30.0,
        float,
        help="and then its body within this, or get 408 (default: %(default)s)",
    )
    _option(
        http,
        "--timeout-keep-alive-s",
        5.0,
        float,
        help="an idle keep-alive connection is closed after this (default: %(default)s)",
    )
    _option(
        http,
        "--limit-concurrency",
        512,
        int,
        help="open connections at most; past it uvicorn answers 503 (default: %(default)s)",
    )
    _option(
        http,
        "--max-header-bytes",
        16 * 1024,
        int,
        help="request line and headers at most (default: %(default)s)",
    )
    sched = serve.add_argument_group("scheduling")
    _option(
        sched,
        "--scheduler",
        "continuous",
        choices=SCHEDULER_MODES,
        help="continuous: join the running batch at the next step; static: collect a window and "
        "run it to completion; serial: one request at a time (default: %(default)s)",
    )
    _option(sched, "--max-batch-size", 64, int, help="running rows at most (default: %(default)s)")
    _option(
        sched,
        "--max-wait-ms",
        10.0,
        float,
        help="when idle, how long to gather a first group (default: %(default)s)",
    )
    _option(
        sched,
        "--max-queue-rows",
        4096,
        int,
        help="waiting rows before answering 503 (default: %(default)s)",
    )
    _option(
        sched,
        "--max-num-batched-tokens",
        2048,
        int,
        help="tokens in one step's forward: every running row's next token plus newcomers' "
        "prompt chunks; a longer prompt is prefilled over several steps, so running rows never "
        "stall for more than this (default: %(default)s)",
    )
    _option(
        sched,
        "--prefix-cache",
        True,
        action=argparse.BooleanOptionalAction,
        dest="enable_prefix_cache",
        help="share the KV of prompt blocks already computed (the n samples of a prompt, its "
        "other alphas, a common system prompt); --no-prefix-cache computes every prompt anew "
        "(default: on)",
    )
    limits = serve.add_argument_group("limits")
    _option(limits, "--max-new-tokens-limit", 1024, int, help="(default: %(default)s)")
    _option(limits, "--max-prompts-per-request", 256, int, help="(default: %(default)s)")
    _option(limits, "--max-samples-per-prompt", 64, int, help="largest n (default: %(default)s)")
    _option(
        limits,
        "--request-timeout-s",
        600.0,
        float,
        help="a request still unfinished after this is dropped with 504 (default: %(default)s)",
    )
    _option(
        limits,
        "--shutdown-timeout-s",
        30.0,
        float,
        help="on SIGINT/SIGTERM, time given to in-flight requests (default: %(default)s)",
    )
    replicas = serve.add_argument_group(
        "replicas on Ray Serve (pip install 'batchserve[ray]')",
        "--ray deploys this server as a Ray Serve application: every option above goes to each "
        "replica (one pair and scheduler each; one GPU each on CUDA); --host/--port are Serve's "
        "HTTP endpoint.",
    )
    _option(
        replicas,
        "--ray",
        False,
        action="store_true",
        help="serve replicas behind one endpoint on Ray Serve",
    )
    _option(
        replicas,
        "--ray-address",
        None,
        help="join this Ray cluster (e.g. 10.0.0.1:6379) instead of starting a local one",
    )
    _option(
        replicas,
        "--replicas",
        1,
        int,
        help="replicas (initial replicas when autoscaling) (default: %(default)s)",
    )
    _option(
        replicas,
        "--min-replicas",
        None,
        int,
        help="autoscale between --min-replicas and --max-replicas (default: no autoscaling)",
    )
    _option(replicas, "--max-replicas", None, int)
    _option(
        replicas,
        "--target-ongoing-requests",
        None,
        float,
        help="autoscaling target of requests per replica (default: half of --max-batch-size)",
    )
    _option(
        replicas,
        "--max-ongoing-requests",
        None,
        int,
        help="requests one replica takes before Serve queues the rest for the next free replica "
        "(default: --max-queue-rows, what the replica's own queue takes)",
    )
    serve.set_defaults(func=cmd_serve)

    gen = commands.add_parser(
        "generate",
        help="offline batch generation to JSONL, no HTTP",
        description="Generate for every prompt of a file; one JSONL line per sample, in input order.",
    )
    gen.add_argument(
        "--prompts", required=True, type=Path, help=".txt (one prompt per line) or .jsonl"
    )
    gen.add_argument(
        "--output", "-o", type=Path, default=None, help="JSONL output (default: stdout)"
    )
    _add_model_options(gen, from_env=False)
    sampling = gen.add_argument_group("sampling defaults (a .jsonl row may override each)")
    sampling.add_argument("--alpha", type=float, default=1.0, help="(default: %(default)s)")
    sampling.add_argument(
        "--n", type=int, default=1, help="samples per prompt (default: %(default)s)"
    )
    sampling.add_argument(
        "--seed", type=int, default=None, help="seed of every prompt's first sample"
    )
    sampling.add_argument("--max-new-tokens", type=int, default=80, help="(default: %(default)s)")
    sampling.add_argument(
        "--temperature", type=float, default=0.8, help="0 = greedy (default: %(default)s)"
    )
    sampling.add_argument("--top-p", type=float, default=0.95, help="(default: %(default)s)")
    sampling.add_argument("--top-k", type=int, default=0, help="0 = off (default: %(default)s)")
    sampling.add_argument(
        "--ignore-eos", action="store_true", help="always generate max-new-tokens"
    )
    sampling.add_argument("--system-prompt", default=None)
    sampling.add_argument(
        "--logprobs",
        action="store_true",
        help="add per-token log-probabilities (after, before, sampled) to each line",
    )
    sampling.add_argument(
        "--score-alphas",
        type=float,
        nargs="+",
        default=(),
        metavar="ALPHA",
        help="also give each row's summed log q_alpha for these alphas (mixture weights)",
    )
    gen.add_argument("--max-batch-size", type=int, default=64, help="(default: %(default)s)")
    gen.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    gen.set_defaults(func=cmd_generate)
    return parser


# --- serve ------------------------------------------------------------------------------------


def page_url(host: str, port: int) -> str:
    """Where a browser on this machine finds the playground (a wildcard bind is local too)."""
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


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


def cmd_serve(args: argparse.Namespace) -> int:
    from batchserve.api.app import create_app
    from batchserve.api.security import startup_warnings
    from batchserve.api.server import ConnectionLimits, build_server
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


# --- generate ---------------------------------------------------------------------------------


class PromptRow(BaseModel):
    """One line of a .jsonl prompts file; missing fields take the command-line defaults."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    prompt: NonEmptyPrompt
    seed: Seed | None = None
    alpha: Alpha | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    max_new_tokens: MaxNewTokens | None = None
    n: NumSamples | None = None
    ignore_eos: bool | None = None
    system_prompt: str | None = None


def read_prompt_rows(path: Path) -> list[PromptRow]:
    if not path.exists():
        raise SystemExit(f"error: prompts file {path} does not exist")
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                rows.append(PromptRow.model_validate_json(line))
            except ValidationError as err:
                problems = "; ".join(
                    f"{'.'.join(map(str, e['loc'])) or 'line'}: {e['msg']}"
                    for e in err.errors(include_url=False)
                )
                raise SystemExit(f"error: {path}:{number}: {problems}") from None
    else:
        rows = [PromptRow(prompt=line) for line in lines if line.strip()]
    if not rows:
        raise SystemExit(f"error: no prompts in {path}")
    return rows


def _score_alphas(values: Sequence[float]) -> tuple[float, ...]:
    from batchserve.schemas import MAX_SCORE_ALPHAS

    if len(values) > MAX_SCORE_ALPHAS or not all(abs(v) <= 1000 for v in values):
        raise SystemExit(
            f"error: --score-alphas takes at most {MAX_SCORE_ALPHAS} finite values in [-1000, 1000]"
        )
    return tuple(float(v) for v in values)


def cmd_generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from batchserve.core.seeds import prompt_seed
    from batchserve.core.types import GenerationRequest, SamplingParams
    from batchserve.engine import iter_generate
    from batchserve.worker.models import IncompatibleTokenizersError, load_options, load_pair

    rows = read_prompt_rows(args.prompts)
    defaults = config_from_args(
        SamplingParams, args, score_alphas=_score_alphas(args.score_alphas)
    )
    requests = []
    first_row = 0
    for row in rows:
        overrides = {
            k: v
            for k, v in row.model_dump(exclude={"prompt", "n", "system_prompt"}).items()
            if v is not None
        }
        # --seed seeds the whole file; each prompt derives its own (see engine.prompt_seed).
        params = dataclasses.replace(prompt_seed(defaults, first_row), **overrides)
        first_row += row.n or args.n
        requests.append(
            GenerationRequest(
                row.prompt,
                params,
                n=row.n or args.n,
                system_prompt=row.system_prompt or args.system_prompt,
            )
        )
    configure_threads(args.threads, args.device)
    if args.after is None and args.before is not None and not args.adapters:
        raise SystemExit("error: --before given without --after")
    try:
        pair = load_pair(args.after or "toy:after", args.before, **load_options(args))
    except (IncompatibleTokenizersError, ValueError, FileNotFoundError, OSError) as err:
        raise SystemExit(f"error: {err}") from None
    out: TextIO = args.output.open("w", encoding="utf-8") if args.output else sys.stdout
    # Rows finish out of order; hold each until those before it are written, so the file is
    # in input order and a crash loses only rows not yet reachable in order.
    request_of_row = [i for i, r in enumerate(requests) for _ in range(r.n)]
    held: dict[int, dict] = {}
    next_to_write = 0
    total = len(request_of_row)
    try:
        with tqdm(
            total=total, desc="generate", unit="row", file=sys.stderr, disable=args.no_progress
        ) as bar:
            for index, result in iter_generate(
                pair,
                requests,
                prompt_format=args.prompt_format,
                runner_config=runner_config(args),
            ):
                request = requests[request_of_row[index]]
                held[index] = {
                    "index": index,
                    "alpha": result.alpha,
                    **result.row_fields(),
                    "prompt_index": request_of_row[index],
                    "temperature": request.params.temperature,
                    "top_p": request.params.top_p,
                }
                bar.update(1)
                while next_to_write in held:
                    out.write(json.dumps(held.pop(next_to_write), ensure_ascii=False) + "\n")
                    next_to_write += 1
                out.flush()
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
