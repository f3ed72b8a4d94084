"""Loading a pair: tokenizer compatibility, vocabulary limits, prompt formats."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import llama_model, make_tokenizer

from batchserve.frontend import format_prompt
from batchserve.worker.models import (
    IncompatibleTokenizersError,
    check_tokenizer_compatibility,
    load_pair,
    pair_from_models,
    resolve_dtype,
    resolve_model_path,
)


def save_pair(
    root: Path, after_tokenizer, before_tokenizer, vocab_before: int = 64
) -> tuple[str, str]:
    after_dir, before_dir = root / "after", root / "before"
    llama_model(1).save_pretrained(after_dir)
    after_tokenizer.save_pretrained(after_dir)
    llama_model(2, vocab_size=vocab_before).save_pretrained(before_dir)
    before_tokenizer.save_pretrained(before_dir)
    return str(after_dir), str(before_dir)


def test_identical_tokenizers_are_compatible() -> None:
    report = check_tokenizer_compatibility(make_tokenizer(), make_tokenizer())
    assert report.compatible and report.vocabs_match and report.warning is None
    assert report.vocab_size_1 == report.vocab_size_2 == 64


def test_incompatible_pair_is_refused_with_the_differing_tokens(tmp_path: Path) -> None:
    # Two extra words shift every filler token's id by two.
    after, before = save_pair(tmp_path, make_tokenizer(), make_tokenizer(extra=["zebra", "yak"]))
    report = check_tokenizer_compatibility(make_tokenizer(), make_tokenizer(extra=["zebra", "yak"]))
    assert not report.compatible
    with pytest.raises(IncompatibleTokenizersError, match="do not share a vocabulary") as err:
        load_pair(after, before, device="cpu")
    assert "'w0': 32 vs 34" in str(err.value) and "'zebra': None vs 32" in str(err.value)
    assert "allow_incompatible" in str(err.value)
    pair = load_pair(after, before, device="cpu", allow_incompatible=True)
    assert not pair.compatibility.compatible


def test_differing_logit_widths_use_the_common_prefix_and_the_tokenizer_length(
    tmp_path: Path,
) -> None:
    tok = make_tokenizer()
    after, before = save_pair(tmp_path, tok, tok, vocab_before=80)
    pair = load_pair(after, before, device="cpu")
    assert pair.vocab_limit == 64
    wide = pair_from_models(llama_model(1, vocab_size=96), llama_model(2, vocab_size=80), tok)
    assert wide.vocab_limit == len(tok) == 64


def test_loaded_pair_is_in_eval_mode_without_grad(tmp_path: Path) -> None:
    tok = make_tokenizer()
    tok.pad_token = None
    after, before = save_pair(tmp_path, tok, tok)
    pair = load_pair(after, before, device="cpu", dtype="auto")
    assert pair.dtype == torch.float32 and pair.device.type == "cpu"
    assert not pair.after.training and not pair.before.training
    assert not any(p.requires_grad for p in pair.after.parameters())
    assert pair.max_context == 256


def test_dtype_names() -> None:
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("int3", torch.device("cpu"))


def test_hub_ids_pass_through_and_toy_names_resolve() -> None:
    assert resolve_model_path("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"
    assert resolve_model_path("toy").endswith("after")
    assert resolve_model_path("toy:before").endswith("before")


@pytest.mark.parametrize("missing", ["/tmp/no-such-model-here", "./no/such", "a/b/c"])
def test_a_missing_model_folder_is_named_before_anything_else_is_asked(missing: str) -> None:
    # Not "before model not given", nor the hub's "Repo id must be in the form ...".
    with pytest.raises(FileNotFoundError, match=f"{missing}: no such folder"):
        load_pair(missing, device="cpu")
    with pytest.raises(FileNotFoundError, match=f"{missing}: no such folder"):
        load_pair("toy:after", missing, device="cpu")


def test_a_model_folder_given_from_home_is_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "m").mkdir()
    assert resolve_model_path("~/m") == str(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        resolve_model_path("~no-such-user-here/m")


def test_prompt_formats() -> None:
    assert format_prompt("Hi") == "### Instruction:\nHi\n\n### Response:\n"
    assert format_prompt("Hi", system_prompt="Be kind") == (
        "### Instruction:\nBe kind\n\n### Input:\nHi\n\n### Response:\n"
    )
    assert format_prompt("Hi", "raw") == "Hi"
    tok = make_tokenizer()
    with pytest.raises(ValueError, match="chat template"):
        format_prompt("Hi", "chat", tokenizer=tok)
    tok.chat_template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    )
    assert (
        format_prompt("Hi", "chat", system_prompt="S", tokenizer=tok)
        == "<system>S<user>Hi<assistant>"
    )
    with pytest.raises(ValueError, match="prompt format"):
        format_prompt("Hi", "xml")
