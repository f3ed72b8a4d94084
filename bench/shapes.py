"""Named model shapes and random-init pairs built in code, so benchmarks need no downloads.

Random weights give the same step time as trained ones (the matmuls do not look at the
values), which is all a throughput benchmark needs. Big shapes are built straight on the
target device: initialising 7B parameters on 2 CPU cores takes minutes, on a GPU a second.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from batchserve.worker.models import TOY_DIR, ModelPair, pair_from_models

# The LlamaConfig fields every shape sets, in the order of the rows of _TABLE.
SHAPE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
)
_TABLE: dict[str, tuple[tuple[int, ...], dict]] = {
    # name: ((vocab, hidden, ffn, layers, heads, kv heads, context), other LlamaConfig fields)
    # Llama-3.2-1B: GQA, 128k vocabulary, tied embeddings.
    "llama-1b": (
        (128256, 2048, 8192, 16, 32, 8, 4096),
        {"tie_word_embeddings": True, "rope_theta": 500000.0},
    ),
    # Llama-2-7B: the reference shape of the H200 numbers in issue 2 and issue 6.
    "llama-7b": ((32000, 4096, 11008, 32, 32, 32, 4096), {"rms_norm_eps": 1e-5}),
}


def _toy_shape() -> dict:
    """The embedded toy pair's own shape, read from its config: CPU numbers from a random-init
    `tiny` pair then predict the toy pair's speed, and a retrained toy cannot drift from it."""
    config = json.loads((TOY_DIR / "after" / "config.json").read_text(encoding="utf-8"))
    return {k: config[k] for k in (*SHAPE_FIELDS, "tie_word_embeddings", "rms_norm_eps")}


SHAPES: dict[str, dict] = {
    "tiny": _toy_shape(),
    **{
        name: dict(zip(SHAPE_FIELDS, row, strict=True), **other)
        for name, (row, other) in _TABLE.items()
    },
}

PAD_ID, BOS_ID, EOS_ID = 1, 2, 3
# Prompt words of the load benchmark; all are in the random pair's vocabulary (one id each).
WORDS = (  # noqa: SIM905 - a sentence reads better than 50 quoted words
    "write explain describe summarize list tell me a short story poem letter recipe about the "
    "river mountain city garden music history bread friend book ideas why how ocean forest "
    "winter summer travel science and of for with three simple kind old new cat dog mango pudding"
).split()


SPECIAL_TOKENS = {"<unk>": 0, "<pad>": PAD_ID, "<s>": BOS_ID, "</s>": EOS_ID}


def fast_tokenizer(backend: Tokenizer) -> PreTrainedTokenizerFast:
    """`backend` with the special tokens of SPECIAL_TOKENS named (its vocabulary starts so)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
    )


def word_tokenizer(words: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Whitespace-split words, one id each after the special tokens, then filler words `w0`,
    `w1`, ... up to vocab_size ids. Built in code for random-init pairs (benchmarks, tests)."""
    vocab = dict(SPECIAL_TOKENS)
    for word in words:
        vocab.setdefault(word, len(vocab))
    for i in range(vocab_size - len(vocab)):
        vocab.setdefault(f"w{i}", len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")
    return fast_tokenizer(backend)


def make_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Word-level tokenizer with exactly vocab_size ids, so the whole logit width is sampled."""
    return word_tokenizer(["###", "Instruction:", "Response:", "Input:", *WORDS], vocab_size)


def llama_config(shape: Mapping[str, Any]) -> LlamaConfig:
    """A Llama config of `shape` (LlamaConfig fields, as a SHAPES entry holds them) with the
    special-token ids make_tokenizer gives every random-init pair."""
    return LlamaConfig(**shape, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)


def shape_config(shape: str) -> LlamaConfig:
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    return llama_config(SHAPES[shape])


def random_model(
    config: LlamaConfig, device: torch.device, dtype: torch.dtype, seed: int
) -> LlamaForCausalLM:
    """Random-init weights allocated and initialised on `device` directly, in `dtype`."""
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def random_pair(shape: str, device: str | torch.device, dtype: torch.dtype) -> ModelPair:
    """A random-init Llama pair at a named shape (after: seed 1, before: seed 2)."""
    config = shape_config(shape)
    device = torch.device(device)
    after = random_model(config, device, dtype, seed=1)
    before = random_model(config, device, dtype, seed=2)
    return pair_from_models(
        after,
        before,
        make_tokenizer(config.vocab_size),
        after_id=f"random-{shape}-after",
        before_id=f"random-{shape}-before",
    )


def save_random_pair(
    root: str | Path,
    shape: str = "tiny",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[str, str]:
    """Write a random-init pair to root/after and root/before, for a server to load.

    Big shapes: pass device="cuda" and a 16-bit dtype, so the weights are initialised on the GPU
    and written at half the size (7B float32 on 2 CPU cores would take many minutes).
    """
    root = Path(root)
    config = shape_config(shape)
    tokenizer = make_tokenizer(config.vocab_size)
    dirs = []
    for name, seed in (("after", 1), ("before", 2)):
        model = random_model(config, torch.device(device), dtype, seed)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        dirs.append(str(root / name))
        del model
    return dirs[0], dirs[1]


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step must read once: every distinct parameter (tied ones counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total
