"""The option pieces every command shares: environment-aware options, the model options, threads.

Every `serve` option can also come from an environment variable `BATCHSERVE_<NAME>` (for
containers); `MODEL_AFTER_ID` / `MODEL_BEFORE_ID` are honoured as the original server read them.
Kept apart from the commands so that `cli_serve` (imported by the Ray deployment) and
`cli_generate` build on it without importing the entry point.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from batchserve.argconfig import config_from_args
from batchserve.frontend import PROMPT_FORMATS

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


def option(
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


def add_model_options(parser: argparse.ArgumentParser, *, from_env: bool) -> None:
    group = parser.add_argument_group("models")
    option(
        group,
        "--after",
        None,
        aliases=("MODEL_AFTER_ID",),
        from_env=from_env,
        help="fine-tuned model: local dir, hub id, or toy (default: the embedded toy pair); a "
        "LoRA adapter (adapter_config.json; toy:lora) is served unmerged on one base copy",
    )
    option(
        group,
        "--before",
        None,
        aliases=("MODEL_BEFORE_ID",),
        from_env=from_env,
        help="base model: local dir or hub id (default: the toy base when --after is the toy, "
        "the adapter's base_model_name_or_path when it is a LoRA adapter)",
    )
    option(group, "--revision", None, from_env=from_env, help="hub revision of both models")
    group.add_argument(
        "--adapter", action="append", type=_adapter_option, default=[], dest="adapters",
        metavar="NAME=DIR", help="LoRA pairs: serve this adapter on the same base too "
        "(repeatable); a request names it as its after (or before) model",
    )  # fmt: skip
    option(
        group,
        "--trust-remote-code",
        False,
        from_env=from_env,
        action="store_true",
        help="allow model code from the hub repository",
    )
    option(
        group,
        "--tokenizer-class",
        None,
        from_env=from_env,
        help="override the tokenizer class (e.g. LlamaTokenizer for uploads naming LLaMATokenizer)",
    )
    option(
        group,
        "--device",
        "auto",
        from_env=from_env,
        help="auto, cpu, cuda or cuda:N (default: %(default)s)",
    )
    option(
        group,
        "--dtype",
        "auto",
        from_env=from_env,
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto = bfloat16 on CUDA where supported (else float16), float32 on CPU",
    )
    option(
        group,
        "--threads",
        "auto",
        from_env=from_env,
        help="torch CPU threads; auto = half the cores on a CPU device (a second thread "
        "spin-waits against the HTTP side on small machines), torch's default on CUDA",
    )
    option(
        group,
        "--allow-incompatible",
        False,
        from_env=from_env,
        action="store_true",
        help="load a pair whose tokenizers disagree (results are then meaningless)",
    )
    option(
        group,
        "--prompt-format",
        "alpaca",
        from_env=from_env,
        choices=PROMPT_FORMATS,
        help="how prompts are wrapped: alpaca, chat (the tokenizer's template) or raw (default: %(default)s)",
    )
    option(
        group,
        "--compile",
        None,
        from_env=from_env,
        action=argparse.BooleanOptionalAction,
        help="torch.compile the step (both models over a packed step) once at start-up; the "
        "compiled step runs about 2x faster on the CPU and takes 15-60 s to compile, cached "
        "under $TORCHINDUCTOR_CACHE_DIR for the next start (default: on for CPU, off on CUDA)",
    )
    option(
        group,
        "--cuda-graphs",
        None,
        from_env=from_env,
        action=argparse.BooleanOptionalAction,
        help="replay decode steps (both models and the sampler) as CUDA graphs, one per bucket "
        "of rows and key length, recorded the first time a bucket is met (/info reports how "
        "many and the seconds spent); a LoRA pair is not graphed yet (default: on CUDA)",
    )
    option(
        group,
        "--native-attention",
        None,
        from_env=from_env,
        action=argparse.BooleanOptionalAction,
        help="decoding rows' attention in C (float32 on the CPU), built with the C compiler "
        "once per machine (under a second, cached in ~/.cache/batchserve); it reads each row's "
        "own keys where they lie, faster than the compiled torch attention (README, 'The C "
        "decode attention'); it runs on one core (default: on with one torch thread, where it "
        "builds and the model is float32 on the CPU)",
    )
    option(
        group,
        "--native-sampler",
        None,
        from_env=from_env,
        action=argparse.BooleanOptionalAction,
        help="sampling (amplify, temperature, top-k, top-p, the draw, the kept set the "
        "log-probabilities read) in C on the CPU, one pass per row, built like the C attention; "
        "it draws by the same rules as the torch sampler (README, 'The C sampler') "
        "(default: on where it builds and the step runs on the CPU)",
    )
    kv = parser.add_argument_group("KV store (allocated once at start-up; /info reports it)")
    option(
        kv,
        "--kv-cache-tokens",
        None,
        int,
        from_env=from_env,
        help="tokens the KV store holds for all running rows together; a row reserves its "
        "prompt + max_new_tokens at admission and waits while they do not fit (default: on "
        "CUDA from --gpu-memory-fraction, on the CPU max batch size x min(context, 2048))",
    )
    option(
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
    """The worker's torch threads, and OpenMP threads that sleep when they wait.

    OpenMP's default lets a waiting thread spin, which steals the core the event loop and any
    neighbour need: bench.threads measured two spinning threads on a 2-core machine serve 0
    tokens/s beside one busy process, where passive waits held. libgomp reads the policy when
    torch loads it, so it is set before the first import; an OMP_WAIT_POLICY already in the
    environment (even empty: OpenMP's default) is left alone.
    """
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
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
