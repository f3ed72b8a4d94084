"""`batchserve generate`: offline batch generation from a prompts file to JSONL, no HTTP."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

from pydantic import BaseModel, ConfigDict, ValidationError

from batchserve.api.cli_options import add_model_options, configure_threads, runner_config
from batchserve.api.responses import row_result
from batchserve.argconfig import config_from_args
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


def add_generate_parser(commands: argparse._SubParsersAction) -> None:
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
    add_model_options(gen, from_env=False)
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


_DEFAULT_FIELDS = ("seed", "alpha", "temperature", "top_p", "top_k", "max_new_tokens", "n")


def _problems(err: ValidationError, name: Callable[[str], str] = str) -> str:
    return "; ".join(
        f"{'.'.join(name(str(part)) for part in e['loc']) or 'line'}: {e['msg']}"
        for e in err.errors(include_url=False)
    )


def check_sampling_options(args: argparse.Namespace) -> None:
    """The command line's sampling defaults pass the rules a .jsonl row's own values do, before
    any model loads (a bad --max-new-tokens stopped the run only after the step compiled)."""
    try:
        PromptRow(prompt="-", **{field: getattr(args, field) for field in _DEFAULT_FIELDS})
    except ValidationError as err:
        problems = _problems(err, lambda field: "--" + field.replace("_", "-"))
        raise SystemExit(f"error: {problems}") from None


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
                raise SystemExit(f"error: {path}:{number}: {_problems(err)}") from None
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

    from batchserve.core.scheduler import PromptTooLongError
    from batchserve.core.seeds import prompt_seed
    from batchserve.core.types import GenerationRequest, SamplingParams
    from batchserve.engine import iter_generate
    from batchserve.worker.models import IncompatibleTokenizersError, load_options, load_pair

    check_sampling_options(args)
    rows = read_prompt_rows(args.prompts)
    defaults = config_from_args(SamplingParams, args, score_alphas=_score_alphas(args.score_alphas))
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
    # Opened with the first result: a file that cannot run (a prompt too long) leaves none.
    out: TextIO | None = None if args.output else sys.stdout
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
                    **row_result(result).model_dump(mode="json"),
                    "prompt_index": request_of_row[index],
                    "temperature": request.params.temperature,
                    "top_p": request.params.top_p,
                }
                bar.update(1)
                if out is None:
                    out = args.output.open("w", encoding="utf-8")
                while next_to_write in held:
                    out.write(json.dumps(held.pop(next_to_write), ensure_ascii=False) + "\n")
                    next_to_write += 1
                out.flush()
    except PromptTooLongError as err:  # raised before any row runs
        where = f"prompt {err.index + 1} of {len(rows)}"
        text = str(err).replace(f"prompt {err.index} ", f"{where} ", 1)
        raise SystemExit(f"error: {args.prompts}: {text}") from None
    finally:
        if out is not None and out is not sys.stdout:
            out.close()
    return 0
