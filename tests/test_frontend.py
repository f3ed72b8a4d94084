"""The frontend: incremental detokenization at constant work per token, stop strings, and a
request's rows turned into results."""

from __future__ import annotations

import pytest
from tiny_models import make_byte_tokenizer, make_tokenizer

from batchserve.core.scheduler import PromptTooLongError, RowUpdate
from batchserve.core.types import GenerationRequest, SamplingParams
from batchserve.frontend import (
    MAX_HELD_TOKENS,
    Frontend,
    IncrementalDetokenizer,
    RequestOutput,
    RowText,
    expand_rows,
    find_stop,
)

TEXT = "héllo wörld 🎉 ça va ✓ and some plain words after it"


def test_incremental_text_never_splits_a_multibyte_character_and_joins_to_the_decode() -> None:
    tok = make_byte_tokenizer()
    ids = tok.encode(TEXT, add_special_tokens=False)
    assert len(ids) > len(TEXT)  # the test is only worth something if characters span tokens
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.push(token) for token in ids]
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) + detok.flush() == TEXT == tok.decode(ids)
    # A token that ends inside a character adds "", the one completing it the character.
    assert "" in deltas and "🎉" in deltas


def test_word_level_text_joins_to_the_whole_decode() -> None:
    tok = make_tokenizer()
    ids = tok.encode("the cat sat on the mat and ran far away", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok)
    text = "".join(detok.push(t) for t in ids) + detok.flush()
    assert text == tok.decode(ids, skip_special_tokens=True)


def test_detokenizing_a_4000_token_row_does_constant_work_per_token() -> None:
    tok = make_byte_tokenizer()
    ids = tok.encode(TEXT * 80, add_special_tokens=False)
    assert len(ids) > 4000
    detok = IncrementalDetokenizer(tok)
    text = "".join(detok.push(t) for t in ids) + detok.flush()
    assert text == TEXT * 80
    # Each push decodes a window of the last few tokens, twice: never the whole row.
    assert detok.num_decoded_tokens <= 12 * len(ids)


class CountingTokenizer:
    """A tokenizer whose decode calls are counted, with the tokens each one is given: the
    detokenizer's work, measured from outside it."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self.all_special_ids = tokenizer.all_special_ids
        self.num_calls = 0
        self.num_tokens = 0

    def decode(self, ids, **kwargs) -> str:
        self.num_calls += 1
        self.num_tokens += len(ids)
        return self._tokenizer.decode(ids, **kwargs)


def row_of(kind: str, tok) -> list[int]:
    text_ids = tok.encode(TEXT * 80, add_special_tokens=False)
    if kind == "text":
        return text_ids[:4000]
    start = tok.encode(TEXT * 8, add_special_tokens=False)
    if kind == "eos under ignore_eos":  # a model that ended, made to go on
        return start + [tok.eos_token_id] * (4000 - len(start))
    # A model emitting garbage: UTF-8 continuation bytes that never make a character.
    (continuation,) = tok.encode("é", add_special_tokens=False)[1:]
    return start + [continuation] * (4000 - len(start))


@pytest.mark.parametrize("kind", ["text", "eos under ignore_eos", "invalid bytes"])
def test_each_token_of_a_4000_token_row_with_stop_strings_costs_bounded_decoding(kind: str):
    """A row with stop strings was decoded in full every step (quadratic in its length), and a
    run of EOS tokens widened the incremental window by one token each."""
    tok = make_byte_tokenizer()
    ids = row_of(kind, tok)
    counting = CountingTokenizer(tok)
    row = RowText(IncrementalDetokenizer(counting), stop=["NEVER SEEN", "é!?"])
    calls, tokens, released = [], [], []
    for token in ids:
        before = (counting.num_calls, counting.num_tokens)
        released.append(row.push(token))
        calls.append(counting.num_calls - before[0])
        tokens.append(counting.num_tokens - before[1])
    released.append(row.finish())
    assert len(ids) == 4000 and not row.is_stopped
    # Per token: two decodes of a window of at most the held tokens and their context.
    assert max(calls) <= 2 and max(tokens) <= 4 * (MAX_HELD_TOKENS + 1)
    expected = tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    if kind == "invalid bytes":  # released in pieces, garbage as U+FFFD: not the same count
        assert row.text.rstrip("\ufffd") == TEXT * 8 == expected.rstrip("\ufffd")
        assert row.text.endswith("\ufffd") and row.text == "".join(released)
    else:
        assert row.text == "".join(released) == expected
        assert sum(tokens) <= 8 * len(ids)  # about 3 a token: a window of one or two


@pytest.mark.parametrize("stop", [["STOP"], ["xx", "STOP"], ["é!"]])
def test_row_text_never_releases_text_a_stop_string_cuts(stop: list[str]) -> None:
    tok = make_byte_tokenizer()
    text = "abc xSTéOP x STOP é! and then more"
    ids = tok.encode(text, add_special_tokens=False)
    row = RowText(IncrementalDetokenizer(tok), stop)
    released = ""
    for k, token in enumerate(ids, 1):
        released += row.push(token)
        cut = find_stop(tok.decode(ids[:k]), stop)
        if cut is not None:  # the row ends on this very token
            assert row.is_stopped
            completion = tok.decode(ids[:k])[:cut]
            assert row.text == completion and completion.startswith(released)
            released += row.finish()
            assert released == completion
            return
        assert not row.is_stopped and tok.decode(ids[:k]).startswith(released)
    pytest.fail("no stop string found")


def test_each_token_gets_its_share_of_the_text_past_a_stop_string_too() -> None:
    tok = make_byte_tokenizer()
    ids = tok.encode("ab é cd", add_special_tokens=False)
    row = RowText(IncrementalDetokenizer(tok), [" c"])
    for token in ids:
        row.push(token)
        if row.is_stopped:
            break
    row.finish()
    pieces = row.token_texts()
    assert "".join(pieces) == row.text == "ab é"
    assert len(pieces) == ids.index(tok.encode(" c", add_special_tokens=False)[-1]) + 1
    assert pieces[-1] == ""  # the token that completed the stop string adds nothing kept


def test_token_texts_never_split_a_multibyte_character() -> None:
    tok = make_byte_tokenizer()
    text = "naïve 🙂 café"
    ids = tok.encode(text, add_special_tokens=False)
    row = RowText(IncrementalDetokenizer(tok))
    for token in ids:
        row.push(token)
    row.finish()
    pieces = row.token_texts()
    assert len(pieces) == len(ids) and "".join(pieces) == text
    assert "\ufffd" not in "".join(pieces)
    assert "" in pieces and "🙂" in pieces  # the emoji's first bytes wait for its last one


def frontend(max_row_tokens: int = 64) -> Frontend:
    return Frontend(make_tokenizer(), prompt_format="raw", max_row_tokens=max_row_tokens)


def test_prepare_refuses_a_prompt_that_could_never_fit() -> None:
    request = GenerationRequest("the cat sat", SamplingParams(max_new_tokens=62))
    with pytest.raises(PromptTooLongError, match="beyond the 64 tokens"):
        frontend().prepare(request, index=3)
    prepared = frontend(100).prepare(request)
    assert prepared.formatted_prompt == "the cat sat" and len(prepared.prompt_ids) >= 3


def test_a_request_output_ends_rows_by_stop_strings_and_builds_results_in_order() -> None:
    front = frontend()
    tok = front.tokenizer
    params = SamplingParams(max_new_tokens=10, stop=("ran",), seed=5)
    request = GenerationRequest("the cat", params, n=2)
    prepared = front.prepare(request)
    rows, row_prompt = expand_rows([request], [prepared], iter(range(100, 200)))
    assert [r.row_id for r in rows] == [100, 101] and row_prompt == [0, 0]
    out = RequestOutput(front, [prepared], rows, row_prompt)
    words = [tok.convert_tokens_to_ids(w) for w in ("the", "dog", "ran", "far")]
    stopped = []
    for step, word in enumerate(words):
        updates = [RowUpdate(100, 0, (word,)), RowUpdate(101, 0, (words[1],))]
        if step == 3:
            updates[1] = RowUpdate(101, 0, (words[1],), finish_reason="length")
        deltas, stop_ids = out.process(updates)
        stopped += stop_ids
    assert stopped == [100] and out.is_finished
    first, second = out.results()
    assert first.finish_reason == "stop" and first.completion == "the dog "
    assert first.tokens_generated == 3 and first.stopped_early
    assert second.finish_reason == "length" and second.completion == "dog dog dog dog"
    assert second.seed != first.seed == 5
