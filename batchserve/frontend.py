"""The frontend: prompts become token ids, token ids become text. The core sees ids only.

Prompt formats (how a user's instruction becomes the text the models continue), tokenizing,
incremental detokenization (constant work per token, never splitting a multi-byte character)
and stop strings, for the JSON, SSE and OpenAI routes and offline generation alike.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from batchserve.core.scheduler import PromptTooLongError, RowUpdate
from batchserve.core.seeds import sample_seeds
from batchserve.core.types import EngineRow, GenerationRequest, GenerationResult, TokenLogprobs

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PROMPT_FORMATS: tuple[str, ...] = ("alpaca", "chat", "raw")

ALPACA = "### Instruction:\n{prompt}\n\n### Response:\n"
# With a system prompt, it becomes the instruction and the user's text the input: the
# standard Alpaca layout for a task plus its material.
ALPACA_WITH_INPUT = "### Instruction:\n{system_prompt}\n\n### Input:\n{prompt}\n\n### Response:\n"


def format_prompt(
    prompt: str,
    prompt_format: str = "alpaca",
    *,
    system_prompt: str | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> str:
    if prompt_format == "alpaca":
        if system_prompt:
            return ALPACA_WITH_INPUT.format(system_prompt=system_prompt, prompt=prompt)
        return ALPACA.format(prompt=prompt)
    if prompt_format == "raw":
        return f"{system_prompt}\n\n{prompt}" if system_prompt else prompt
    if prompt_format == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("prompt format 'chat' needs a tokenizer with a chat template")
        messages = [{"role": "user", "content": prompt}]
        if system_prompt:
            messages.insert(0, {"role": "system", "content": system_prompt})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    raise ValueError(
        f"prompt format must be one of {', '.join(PROMPT_FORMATS)}, not {prompt_format!r}"
    )


def format_messages(
    messages: list[dict[str, str]],
    prompt_format: str = "alpaca",
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> tuple[str, str]:
    """A conversation (`role`/`content` dicts) as prompt text, and the format to encode it with.

    The tokenizer's chat template where it has one (encoded as "chat": the template writes
    BOS), otherwise the server's prompt format: alpaca turns, or plain text for raw.
    """
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text, "chat"
    if prompt_format == "chat":
        raise ValueError("prompt format 'chat' needs a tokenizer with a chat template")
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system") or None
    turns = [m for m in messages if m["role"] != "system"]
    if prompt_format == "raw":
        return format_prompt(
            "\n\n".join(m["content"] for m in turns), "raw", system_prompt=system
        ), "raw"
    text = ""
    for turn in turns:
        if turn["role"] == "user":
            # The system prompt goes with the first instruction, as in single-turn alpaca.
            text += format_prompt(turn["content"], prompt_format, system_prompt=system)
            system = None
        else:
            text += turn["content"] + "\n\n"
    if turns and turns[-1]["role"] != "user":
        text = text.removesuffix("\n\n")  # the assistant's text so far: continue it
    return text, prompt_format


# --- prompts in, text out: the only code that touches the tokenizer after start-up -------------

REPLACEMENT = "\ufffd"  # what a byte-level decoder shows for an unfinished UTF-8 sequence
# A UTF-8 character takes at most 4 bytes, so at most 4 tokens: text still unfinished after
# this many held tokens is invalid bytes (a model emitting garbage), released as U+FFFD so that
# the window, and with it the work per token, stays bounded.
MAX_HELD_TOKENS = 16


@dataclass(frozen=True)
class PreparedPrompt:
    prompt: str
    formatted_prompt: str
    prompt_ids: tuple[int, ...]


class Frontend:
    """Formats and tokenizes prompts, and turns generated token ids back into text.

    Prompts are encoded on worker threads (asyncio.to_thread) under a lock of their own; text
    is decoded on one thread (the event loop, or the offline loop) by a second copy of the
    tokenizer, so the two sides never share a tokenizer or a lock, and the engine's step never
    waits for either. (A Rust tokenizer borrowed by two threads at once raises "Already
    borrowed".)
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        *,
        prompt_format: str = "alpaca",
        max_row_tokens: int,
    ) -> None:
        self.prompt_format = prompt_format
        self.max_row_tokens = max_row_tokens
        self._encoder = tokenizer
        self._encode_lock = threading.Lock()
        self._decoder = copy.deepcopy(tokenizer)

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The encoding side's tokenizer (chat templates, vocabulary facts)."""
        return self._encoder

    def format(
        self, prompt: str, system_prompt: str | None = None, prompt_format: str | None = None
    ) -> str:
        return format_prompt(
            prompt,
            prompt_format or self.prompt_format,
            system_prompt=system_prompt,
            tokenizer=self._encoder,
        )

    def encode(self, formatted_prompt: str, prompt_format: str | None = None) -> list[int]:
        # A chat template already writes BOS; adding it again would shift the distribution.
        add_special = (prompt_format or self.prompt_format) != "chat"
        with self._encode_lock:
            return self._encoder.encode(formatted_prompt, add_special_tokens=add_special)

    def prepare(self, request: GenerationRequest, index: int = 0) -> PreparedPrompt:
        """Format and tokenize; refuses a row that could never fit (PromptTooLongError)."""
        formatted = self.format(request.prompt, request.system_prompt, request.prompt_format)
        ids = tuple(self.encode(formatted, request.prompt_format))
        limit = self.max_row_tokens
        if len(ids) + request.params.max_new_tokens > limit:
            raise PromptTooLongError(index, len(ids), request.params.max_new_tokens, limit)
        return PreparedPrompt(request.prompt, formatted, ids)

    def decode(self, token_ids: Sequence[int]) -> str:
        """Whole-sequence decoding on the output side (echoing token-id prompts)."""
        return self._decoder.decode(list(token_ids), skip_special_tokens=True)

    def detokenizer(self) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self._decoder)


class IncrementalDetokenizer:
    """Text of a growing token sequence at constant work per token (TGI's and vLLM's scheme).

    Each new token decodes a short window: the tokens since the last emitted text plus the one
    before them as context (so a SentencePiece leading space or a byte-level merge comes out
    right); the difference to the window without the new token is the new text. A window that
    ends in an unfinished UTF-8 sequence emits nothing until the sequence completes, so no
    multi-byte character is ever split. Special tokens are skipped without decoding (the text
    leaves them out), so a row of EOS tokens under `ignore_eos` costs nothing; before, each one
    widened the window and 2,000 of them decoded 1,000 tokens per token.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tokenizer = tokenizer
        self._special_ids = frozenset(tokenizer.all_special_ids)
        self.token_ids: list[int] = []  # the row's tokens that can carry text
        self._prefix = 0  # window start (context)
        self._read = 0  # tokens whose text is emitted
        self.num_decoded_tokens = 0  # tokens decoded in all windows (the work done)

    def _decode(self, start: int, end: int) -> str:
        self.num_decoded_tokens += end - start
        # No clean-up of spaces: it rewrites text across token boundaries, which a window
        # cannot see (vLLM's incremental detokenizer skips it too).
        return self._tokenizer.decode(
            self.token_ids[start:end],
            skip_special_tokens=True,
            clean_up_tokenization_spaces=False,
        )

    def push(self, token_id: int) -> str:
        if token_id in self._special_ids:
            return ""
        self.token_ids.append(token_id)
        before = self._decode(self._prefix, self._read)
        after = self._decode(self._prefix, len(self.token_ids))
        is_held_too_long = len(self.token_ids) - self._read > MAX_HELD_TOKENS
        if is_held_too_long or (len(after) > len(before) and not after.endswith(REPLACEMENT)):
            self._prefix, self._read = self._read, len(self.token_ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """What is still held back at the end (an unfinished character shows as U+FFFD)."""
        before = self._decode(self._prefix, self._read)
        after = self._decode(self._prefix, len(self.token_ids))
        self._prefix = self._read = len(self.token_ids)
        return after[len(before) :]


class RowText:
    """A row's text as tokens arrive: stop strings found at constant work per token, and the
    part that is final (no stop string can still cut it) released for streaming.

    Only the unreleased tail is a string that changes; released text is kept as a list of
    pieces, so no token copies the text before it (`text += piece` on a 16 KB row did).
    """

    def __init__(self, detokenizer: IncrementalDetokenizer, stop: Sequence[str] = ()) -> None:
        self._detokenizer = detokenizer
        self._stop = tuple(s for s in stop if s)
        # A stop string that shows up later ends after the current text, so it can start at
        # most len(longest) - 1 characters back: hold that tail until the next token.
        self._holdback = max((len(s) for s in self._stop), default=1) - 1
        self._sent: list[str] = []  # released text, in pieces
        self._unsent = ""  # the rest: at most the holdback plus one token's text
        self.is_stopped = False
        self._pieces: list[str] = []  # the text each token added

    @property
    def text(self) -> str:
        """The row's text so far (cut at a stop string); joined on each call."""
        return "".join(self._sent) + self._unsent

    def push(self, token_id: int) -> str:
        """Add a token; return the newly final text (maybe ""). Sets `is_stopped` when a stop
        string completes (the text is cut where it starts)."""
        piece = self._detokenizer.push(token_id)
        self._pieces.append(piece)
        return self._add(piece, final=False)

    def finish(self) -> str:
        """The rest of the text, once the row has ended."""
        rest = "" if self.is_stopped else self._detokenizer.flush()
        if rest and self._pieces:
            self._pieces[-1] += rest
        return self._add(rest, final=True)

    def token_texts(self) -> tuple[str, ...]:
        """Each token's share of the final text, joining to it exactly: a token that ends
        inside a multi-byte character gets "" and the one completing it the character; tokens
        past a stop string get ""."""
        text = self.text
        pieces, at = [], 0
        for piece in self._pieces:
            kept = text[at : at + len(piece)] if at < len(text) else ""
            pieces.append(kept)
            at += len(kept)
        if pieces and at < len(text):
            pieces[-1] += text[at:]
        return tuple(pieces)

    def _add(self, new: str, final: bool) -> str:
        if new and not self.is_stopped:
            # Released text ends `holdback` characters before the end, so a stop string that
            # completes now starts in the unreleased tail.
            search_from = max(0, len(self._unsent) - self._holdback)
            self._unsent += new
            if self._stop:
                cut = find_stop(self._unsent[search_from:], self._stop)
                if cut is not None:
                    self._unsent = self._unsent[: search_from + cut]
                    self.is_stopped = True
        end = len(self._unsent)
        if not (final or self.is_stopped):
            end -= self._holdback
        if end <= 0:
            return ""
        delta, self._unsent = self._unsent[:end], self._unsent[end:]
        self._sent.append(delta)
        return delta


def find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the first stop string starts in text (the completion is cut there), or None."""
    hits = [i for i in (text.find(stop) for stop in stops if stop) if i >= 0]
    return min(hits) if hits else None


# --- a request's rows on the output side ----------------------------------------------------------


def expand_rows(
    requests: Sequence[GenerationRequest],
    prepared: Sequence[PreparedPrompt],
    row_ids: Iterator[int],
) -> tuple[list[EngineRow], list[int]]:
    """A request's rows (n per prompt, seeds resolved) and which prompt each row samples."""
    rows: list[EngineRow] = []
    row_prompt: list[int] = []
    for index, (request, prompt) in enumerate(zip(requests, prepared, strict=True)):
        for seed in sample_seeds(request.params.seed, request.n):
            rows.append(
                EngineRow(
                    next(row_ids), prompt.prompt_ids, request.params, seed, request.cache_salt
                )
            )
            row_prompt.append(index)
    return rows, row_prompt


@dataclass(frozen=True)
class Delta:
    index: int  # the row's position in the request's results
    text: str


@dataclass
class RowOutput:
    index: int
    row: EngineRow
    prompt: PreparedPrompt
    text: RowText
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[tuple[float, ...]] = field(default_factory=list)
    finish_reason: str | None = None


class RequestOutput:
    """One request's rows as the engine reports them: tokens become text deltas, stop strings
    end rows, and once every row has ended, the results. One thread only (the event loop, or
    the offline loop)."""

    def __init__(
        self,
        frontend: Frontend,
        prompts: Sequence[PreparedPrompt],
        rows: Sequence[EngineRow],
        row_prompt: Sequence[int],
    ) -> None:
        self.rows = [
            RowOutput(i, row, prompts[p], RowText(frontend.detokenizer(), row.params.stop))
            for i, (row, p) in enumerate(zip(rows, row_prompt, strict=True))
        ]
        self._by_id = {r.row.row_id: r for r in self.rows}
        self._num_open = len(self.rows)
        self.error: str | None = None

    @property
    def is_finished(self) -> bool:
        return self._num_open == 0 or self.error is not None

    def process(self, updates: Iterable[RowUpdate]) -> tuple[list[Delta], list[int]]:
        """Take one step's updates: the rows' new final text, and the ids of rows a stop string
        ended here (the engine must stop them; their later tokens are ignored)."""
        deltas: list[Delta] = []
        stopped: list[int] = []
        for update in updates:
            out = self._by_id.get(update.row_id)
            if out is None or out.finish_reason is not None:
                continue
            if update.error is not None:
                self.error = f"row {update.row_id}: {update.error}"
                continue
            for token in update.token_ids:
                out.token_ids.append(token)
                if update.logprobs is not None:
                    out.logprobs.append(update.logprobs)
                text = out.text.push(token)
                if out.text.is_stopped:
                    out.finish_reason = "stop"
                    stopped.append(update.row_id)
                if text:
                    deltas.append(Delta(out.index, text))
                if out.text.is_stopped:
                    break
            if out.finish_reason is None and update.finish_reason is not None:
                out.finish_reason = update.finish_reason
            if out.finish_reason is not None:
                self._num_open -= 1
                rest = out.text.finish()
                if rest:
                    deltas.append(Delta(out.index, rest))
        return deltas, stopped

    def results(self) -> list[GenerationResult]:
        return [self._result(out) for out in self.rows]

    @staticmethod
    def _result(out: RowOutput) -> GenerationResult:
        params = out.row.params
        logprobs = None
        if params.wants_logprobs and out.logprobs:
            table = out.logprobs
            logprobs = TokenLogprobs(
                after=tuple(t[0] for t in table),
                before=tuple(t[1] for t in table),
                sampled=tuple(t[2] for t in table),
                score_alphas=params.score_alphas,
                score_sums=tuple(
                    sum(t[3 + j] for t in table) for j in range(len(params.score_alphas))
                ),
            )
        return GenerationResult(
            prompt=out.prompt.prompt,
            formatted_prompt=out.prompt.formatted_prompt,
            completion=out.text.text,
            text=out.prompt.formatted_prompt + out.text.text,
            tokens_generated=len(out.token_ids),
            stopped_early=out.finish_reason in ("eos", "stop"),
            finish_reason=out.finish_reason or "length",
            seed=out.row.seed,
            alpha=params.alpha,
            token_ids=tuple(out.token_ids),
            logprobs=logprobs,
            token_texts=out.text.token_texts() if logprobs is not None else (),
        )
