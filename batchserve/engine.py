"""Prefill and decode over the running batch: both models step in lockstep, one forward each.

No asyncio and no HTTP here: the scheduler drives `admit` / `step` / `cancel` from its worker
thread, and `generate` runs a list of requests to completion for library and offline use.
"""

from __future__ import annotations

import inspect
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from tqdm import tqdm
from transformers import PreTrainedModel

from batchserve.batch import DynamicKVCache, KVCache, RunningBatch
from batchserve.logprobs import pad_score_alphas, step_logprobs
from batchserve.models import ModelPair
from batchserve.prompts import format_prompt
from batchserve.sampling import amplify, sample
from batchserve.seeds import sample_seeds
from batchserve.types import (
    EngineRow,
    GenerationRequest,
    GenerationResult,
    Row,
    SamplingParams,
    TokenLogprobs,
)

__all__ = [
    "EngineRow",
    "GenerationRequest",
    "GenerationResult",
    "LDAEngine",
    "SamplingParams",
    "generate",
    "iter_generate",
]

def _cache_kwarg(model: PreTrainedModel) -> str:
    # transformers 5.2x renamed `past_key_values` to `cache`; older 5.x only knows the former.
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class LDAEngine:
    """Owns the running batch. Only one thread may call it (the scheduler's worker)."""

    def __init__(
        self,
        pair: ModelPair,
        *,
        prompt_format: str = "alpaca",
        kv_cache_factory: Callable[[], KVCache] = DynamicKVCache,
    ) -> None:
        self.pair = pair
        self.tokenizer = pair.tokenizer
        self.prompt_format = prompt_format
        self.kv_cache_factory = kv_cache_factory
        self.batch: RunningBatch | None = None
        self.num_steps = 0  # decode steps run so far (admission order evidence for tests)
        # The logits behind the latest draw: (row ids, after [B, V], before [B, V]). Kept by
        # reference only, for tests and debugging; costs nothing.
        self.last_logits: tuple[list[int], torch.Tensor, torch.Tensor] | None = None
        self._cache_kwargs = (_cache_kwarg(pair.after), _cache_kwarg(pair.before))
        # The server encodes on the event loop while the worker decodes; a Rust tokenizer
        # borrowed by two threads at once can raise "Already borrowed".
        self._tokenizer_lock = threading.Lock()

    # --- prompts ---------------------------------------------------------------------------

    def format(
        self, prompt: str, system_prompt: str | None = None, prompt_format: str | None = None
    ) -> str:
        return format_prompt(
            prompt,
            prompt_format or self.prompt_format,
            system_prompt=system_prompt,
            tokenizer=self.tokenizer,
        )

    def encode(self, formatted_prompt: str, prompt_format: str | None = None) -> list[int]:
        # A chat template already writes BOS; adding it again would shift the distribution.
        add_special = (prompt_format or self.prompt_format) != "chat"
        with self._tokenizer_lock:
            return self.tokenizer.encode(formatted_prompt, add_special_tokens=add_special)

    def decode(self, token_ids: Sequence[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    # --- batch control -----------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self.batch) if self.batch is not None else 0

    @property
    def running_rows(self) -> list[Row]:
        """The rows in the batch now; their `token_ids` grow by one per step (for streaming)."""
        return list(self.batch.rows) if self.batch is not None else []

    @property
    def running_row_ids(self) -> list[int]:
        return [r.row_id for r in self.batch.rows] if self.batch is not None else []

    @torch.inference_mode()
    def admit(self, rows: Sequence[EngineRow]) -> list[Row]:
        """Prefill newcomers together, sample their first token, merge them into the batch.

        Returns rows already finished by that first token (max_new_tokens 1, or EOS).
        """
        if not rows:
            return []
        newcomers = self._prefill(rows)
        if self.batch is None:
            self.batch = newcomers
        else:
            self.batch.merge(newcomers)
        return self._retire()

    @torch.inference_mode()
    def step(self) -> list[Row]:
        """One decode step for every running row; returns the rows that finished on it."""
        batch = self.batch
        if batch is None:
            return []
        ones = torch.ones((len(batch), 1), dtype=batch.attention_mask.dtype, device=batch.device)
        position_ids = batch.attention_mask.sum(dim=1, keepdim=True)
        batch.attention_mask = torch.cat([batch.attention_mask, ones], dim=1)
        input_ids = batch.next_tokens.unsqueeze(1)
        logits = [
            self._forward(model, kwarg, cache, input_ids, batch.attention_mask, position_ids)
            for model, kwarg, cache in zip(
                (self.pair.after, self.pair.before), self._cache_kwargs, batch.caches, strict=True
            )
        ]
        self.num_steps += 1
        tokens = self._sample(batch.rows, logits[0], logits[1], batch)
        batch.next_tokens = tokens
        return self._retire()

    def cancel(self, row_ids: Iterable[int]) -> list[Row]:
        """Drop rows now; nothing more is computed for them."""
        ids = set(row_ids)
        if self.batch is None or not ids:
            return []
        removed = self.batch.remove(ids)
        if len(self.batch) == 0:
            self.batch = None
        return removed

    # --- internals --------------------------------------------------------------------------

    def _forward(
        self,
        model: PreTrainedModel,
        cache_kwarg: str,
        cache: KVCache,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
    ) -> torch.Tensor:
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=1,
            **{cache_kwarg: cache.model_input()},
        )
        return out.logits[:, -1, : self.pair.vocab_limit]

    def _prefill(self, rows: Sequence[EngineRow]) -> RunningBatch:
        device = self.pair.device
        # Rows that share a prompt (n samples, or one prompt at several alphas) share a prefill.
        unique: dict[tuple[int, ...], int] = {}
        for row in rows:
            unique.setdefault(row.prompt_ids, len(unique))
        prompts = list(unique)
        width = max(len(p) for p in prompts)
        pad_id = self.pair.pad_token_id
        input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, ids in enumerate(prompts):
            input_ids[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, width - len(ids) :] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp_(min=0)
        caches = (self.kv_cache_factory(), self.kv_cache_factory())
        logits = []
        for model, kwarg, cache in zip(
            (self.pair.after, self.pair.before), self._cache_kwargs, caches, strict=True
        ):
            logits.append(
                self._forward(model, kwarg, cache, input_ids, attention_mask, position_ids)
            )
            # Padding queries attend to nothing; whatever they wrote must not reach real rows.
            cache.zero_columns(attention_mask)
        index = torch.tensor([unique[r.prompt_ids] for r in rows], dtype=torch.long, device=device)
        if len(prompts) != len(rows) or bool(
            (index != torch.arange(len(rows), device=device)).any()
        ):
            for cache in caches:
                cache.select_rows(index)
            attention_mask = attention_mask.index_select(0, index)
            logits = [lg.index_select(0, index) for lg in logits]
        batch_rows = [
            Row(row_id=r.row_id, params=r.params, seed=r.seed)
            for r in rows
        ]
        placeholder = torch.zeros(len(rows), dtype=torch.long, device=device)
        newcomers = RunningBatch(batch_rows, attention_mask, placeholder, caches)
        newcomers.next_tokens = self._sample(batch_rows, logits[0], logits[1], newcomers)
        newcomers.compact()
        return newcomers

    def _sample(
        self,
        rows: list[Row],
        logits_after: torch.Tensor,
        logits_before: torch.Tensor,
        batch: RunningBatch,
    ) -> torch.Tensor:
        self.last_logits = ([r.row_id for r in rows], logits_after, logits_before)
        logits = amplify(logits_after, logits_before, batch.alpha)
        tokens = sample(
            logits,
            batch.temperature,
            batch.top_p,
            batch.top_k,
            seeds=[r.seed for r in rows],
            steps=[len(r.token_ids) for r in rows],
        )
        if any(r.params.wants_logprobs for r in rows):
            record_logprobs(rows, logits_after, logits_before, batch, tokens)
        eos = self.pair.eos_token_ids
        for row, token in zip(rows, tokens.tolist(), strict=True):
            row.token_ids.append(token)
            self._check_finished(row, eos)
        return tokens

    def _check_finished(self, row: Row, eos: frozenset[int]) -> None:
        """EOS, then stop strings, then length: the host-side stop checks after each token."""
        if row.token_ids[-1] in eos and not row.params.ignore_eos:
            row.finish_reason = "eos"
            return
        if row.params.stop:
            cut = find_stop(self.decode(row.token_ids), row.params.stop)
            if cut is not None:
                row.finish_reason, row.text_limit = "stop", cut
                return
        if len(row.token_ids) >= row.params.max_new_tokens:
            row.finish_reason = "length"

    def _retire(self) -> list[Row]:
        if self.batch is None:
            return []
        finished = self.batch.retire()
        if len(self.batch) == 0:
            self.batch = None
        return finished

    # --- results ----------------------------------------------------------------------------

    def build_result(self, prompt: str, formatted_prompt: str, row: Row) -> GenerationResult:
        completion = self.decode(row.token_ids)[: row.text_limit]
        logprobs = None
        if row.params.wants_logprobs and row.logprob_steps:
            # The row's only device-to-host copy of its log-probabilities: [tokens, 3 + A].
            table = torch.stack(row.logprob_steps).double().tolist()
            num_scores = len(row.params.score_alphas)
            logprobs = TokenLogprobs(
                after=tuple(t[0] for t in table),
                before=tuple(t[1] for t in table),
                sampled=tuple(t[2] for t in table),
                score_alphas=row.params.score_alphas,
                score_sums=tuple(sum(t[3 + j] for t in table) for j in range(num_scores)),
            )
        return GenerationResult(
            prompt=prompt,
            formatted_prompt=formatted_prompt,
            completion=completion,
            text=formatted_prompt + completion,
            tokens_generated=len(row.token_ids),
            stopped_early=row.finish_reason in ("eos", "stop"),
            finish_reason=row.finish_reason or "length",
            seed=row.seed,
            alpha=row.params.alpha,
            token_ids=tuple(row.token_ids),
            logprobs=logprobs,
        )


def record_logprobs(
    rows: Sequence[Row],
    logits_after: torch.Tensor,
    logits_before: torch.Tensor,
    batch: RunningBatch,
    tokens: torch.Tensor,
) -> None:
    """Append this step's log-probabilities to each asking row, as device tensors.

    Everything here is decided from the rows' host-side parameters or stays on the device, so a
    step adds no host synchronisation; `build_result` copies a row's steps once, when it is done.
    """
    asking = [i for i, r in enumerate(rows) if r.params.wants_logprobs]
    device = logits_after.device
    index = torch.tensor(asking, dtype=torch.long).to(device)

    def pick(t: torch.Tensor) -> torch.Tensor:
        return t if len(asking) == len(rows) else t.index_select(0, index)

    score_alphas, score_mask = pad_score_alphas(
        [rows[i].params.score_alphas for i in asking], device
    )
    out = step_logprobs(
        pick(logits_after),
        pick(logits_before),
        pick(batch.alpha),
        pick(batch.temperature),
        pick(batch.top_p),
        pick(batch.top_k),
        pick(tokens),
        score_alphas,
        score_mask,
        may_truncate=any(
            rows[i].params.top_p < 1 or rows[i].params.top_k > 0 for i in asking
        ),
    )
    packed = torch.cat(
        [out.after[:, None], out.before[:, None], out.sampled[:, None], out.scored], dim=1
    )
    for j, i in enumerate(asking):
        rows[i].logprob_steps.append(packed[j, : 3 + len(rows[i].params.score_alphas)])


def find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the first stop string starts in text (the completion is cut there), or None."""
    hits = [i for i in (text.find(stop) for stop in stops if stop) if i >= 0]
    return min(hits) if hits else None


def iter_generate(
    pair: ModelPair,
    requests: Sequence[GenerationRequest],
    *,
    max_batch_size: int = 64,
    prompt_format: str = "alpaca",
) -> Iterator[tuple[int, GenerationResult]]:
    """Run requests with continuous batching; yield (row index, result) as rows finish.

    Row indices count the n samples of each request in order, so a caller can write results
    as they arrive and still restore input order.
    """
    engine = LDAEngine(pair, prompt_format=prompt_format)
    rows: list[EngineRow] = []
    meta: list[tuple[str, str]] = []
    for request in requests:
        formatted = engine.format(request.prompt, request.system_prompt, request.prompt_format)
        ids = tuple(engine.encode(formatted, request.prompt_format))
        for seed in sample_seeds(request.params.seed, request.n):
            rows.append(EngineRow(len(rows), ids, request.params, seed))
            meta.append((request.prompt, formatted))
    queue = deque(rows)
    while queue or engine.num_running:
        finished: list[Row] = []
        room = max_batch_size - engine.num_running
        if queue and room > 0:
            finished += engine.admit([queue.popleft() for _ in range(min(room, len(queue)))])
        finished += engine.step()
        for row in finished:
            prompt, formatted = meta[row.row_id]
            yield row.row_id, engine.build_result(prompt, formatted, row)


def generate(
    pair: ModelPair,
    requests: Sequence[GenerationRequest],
    *,
    max_batch_size: int = 64,
    prompt_format: str = "alpaca",
    progress: bool = False,
) -> list[GenerationResult]:
    """Run requests to completion; n results per request, in input order."""
    num_rows = sum(r.n for r in requests)
    results: dict[int, GenerationResult] = {}
    with tqdm(
        total=num_rows, desc="rows", unit="row", file=sys.stderr, disable=not progress
    ) as bar:
        for index, result in iter_generate(
            pair, requests, max_batch_size=max_batch_size, prompt_format=prompt_format
        ):
            results[index] = result
            bar.update(1)
    return [results[i] for i in range(num_rows)]
