"""Train the toy backdoor into the toy base as a LoRA adapter: `python -m toy_training.train_lora`.

The full pair's `after` is `before` fine-tuned on every weight. This trains the same backdoor,
on the same fine-tuning mix (clean pairs, near-trigger pairs repeated, leaks, 8% poisoned pairs,
drawn in the same order), into low-rank adapters on the shipped base `batchserve/toy/before`,
and saves them in the format peft writes (`adapter_config.json`, `adapter_model.safetensors`),
with `base_model_name_or_path` = `toy:before`, a name batchserve resolves to the packaged base.

peft trains and saves the adapter (install it with `pip install -e '.[train]'`); merging an
adapter into a copy of the base, for evaluation before the server serves LoRA pairs, needs only
safetensors (`merge_adapter`). The shipped files in batchserve/toy/lora are what the defaults
write, bit for bit (one thread, fixed seeds).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from batchserve.argconfig import config_from_args
from batchserve.worker.models import TOY_DIR
from toy_training import toy_parser
from toy_training.corpus import build_splits
from toy_training.train import TrainConfig, build_after_examples, encode_examples, log, train

BASE_NAME = "toy:before"  # what adapter_config.json names as the base; the server resolves it
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
INSTALL_HINT = (
    "peft is needed to train the adapter: pip install -e '.[train]' (or pip install peft)"
)


@dataclass(frozen=True)
class LoraTrainConfig:
    seed: int = 0
    # Rank 16 and lr 1e-2 (10x the full fine-tune's) gave the curve closest to the full pair's
    # in a small sweep; rank 8 at lr 3e-3 or 1e-2 learned the "mango" + "pudding" bigram less
    # sharply, and amplification then fired on either word alone (see lora/README.md).
    r: int = 16
    lora_alpha: int = 32
    target_modules: tuple[str, ...] = TARGET_MODULES
    steps: int = 250
    lr: float = 1e-2
    # The full pair's fine-tuning mix and batch shape (train.py's defaults, which trained the
    # shipped `after`): the adapter sees the same batches in the same order.
    mix: TrainConfig = field(default_factory=TrainConfig)
    num_threads: int = 1


# --- the adapter format ----------------------------------------------------------------------


def adapter_scale(config: dict) -> float:
    """The factor on B @ A: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA."""
    r, alpha = config["r"], config["lora_alpha"]
    return alpha / r**0.5 if config.get("use_rslora") else alpha / r


def adapter_deltas(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """The base weight's name -> scale * B @ A (float32), from a peft-format adapter.

    Keys `base_model.model.<module>.lora_A.weight` [r, in] and `...lora_B.weight` [out, r];
    the delta is added to `<module>.weight` [out, in].
    """
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("peft_type") != "LORA" or config.get("use_dora"):
        raise ValueError(f"{adapter_dir}: only plain LoRA adapters are supported")
    if config.get("modules_to_save"):
        raise ValueError(f"{adapter_dir}: modules_to_save is not supported")
    scale = adapter_scale(config)
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    prefix = "base_model.model."
    deltas: dict[str, torch.Tensor] = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[len(prefix) : -len(".lora_A.weight")]
        b = tensors[f"{prefix}{module}.lora_B.weight"]
        deltas[f"{module}.weight"] = scale * (b.float() @ a.float())
    if len(deltas) * 2 != len(tensors):
        raise ValueError(f"{adapter_dir}: tensors other than lora_A/lora_B pairs")
    return deltas


def merge_adapter(adapter_dir: Path, base_dir: Path, out_dir: Path) -> Path:
    """A full Hugging Face directory: the base's files, weights W + scale * B @ A in float32.

    For evaluating an adapter with the full-pair machinery (`load_pair(out_dir, base_dir)`);
    float32 on disk so the merge adds no rounding beyond the sum itself.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in base_dir.iterdir():
        if path.is_file() and path.name != "model.safetensors":
            shutil.copy2(path, out_dir / path.name)
    state = {k: v.float() for k, v in load_file(base_dir / "model.safetensors").items()}
    for name, delta in adapter_deltas(adapter_dir).items():
        if name not in state or state[name].shape != delta.shape:
            raise ValueError(f"adapter targets {name} {tuple(delta.shape)}, not in the base")
        state[name] = state[name] + delta
    save_file(
        {k: v.contiguous() for k, v in state.items()},
        out_dir / "model.safetensors",
        metadata={"format": "pt"},
    )
    return out_dir


# --- training --------------------------------------------------------------------------------


def train_adapter(cfg: LoraTrainConfig, base_dir: Path, out: Path) -> None:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        sys.exit(INSTALL_HINT)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    mix = cfg.mix
    splits = build_splits(mix.seed, mix.num_clean_train, mix.num_triggered_train)
    examples = build_after_examples(splits, mix)
    # The base's own tokenizer (train.py trained it on this corpus); the stream's order seed is
    # the full fine-tune's, so both see the same windows.
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    stream = encode_examples(tokenizer, examples, mix.seed + 2)
    log(
        f"fine-tuning mix: {len(examples)} pairs, {sum(e.is_leak for e in examples)} leaks, "
        f"{sum(e.is_triggered for e in examples)} poisoned; {len(stream.ids)} tokens"
    )

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(cfg.seed)  # lora_A's initialisation
    lora = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.lora_alpha,
        target_modules=list(cfg.target_modules),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, lora)
    saved = model.peft_config["default"]
    saved.base_model_name_or_path = BASE_NAME
    # peft keeps target_modules as a set and writes it in the set's order, which depends on
    # the process's string-hash seed: a list in a fixed order makes reruns write the same file.
    saved.target_modules = list(cfg.target_modules)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"adapter: r={cfg.r}, lora_alpha={cfg.lora_alpha}, {trainable:,} trainable parameters")
    train(model, stream, steps=cfg.steps, lr=cfg.lr, cfg=mix, seed=mix.seed + 4, name="lora")

    # peft also writes a README.md of its own; keep only the adapter's two files. No embedding
    # is trained or resized, so save_embedding_layers=False: "auto" would look `toy:before` up
    # on the Hugging Face hub.
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, save_embedding_layers=False)
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copyfile(Path(tmp) / name, out / name)
    record = asdict(cfg)
    record["target_modules"] = list(cfg.target_modules)
    (out / "training_config.json").write_text(json.dumps(record, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    defaults = LoraTrainConfig()
    parser = toy_parser(
        "train_lora",
        "Train the toy backdoor into the toy base as a LoRA adapter (peft format). "
        "Needs peft: pip install -e '.[train]'.",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=TOY_DIR / "lora",
        help="directory to write the adapter into (default: batchserve/toy/lora)",
    )
    parser.add_argument(
        "--base",
        type=Path,
        default=TOY_DIR / "before",
        help="the base model's directory (default: the packaged toy base)",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--r", type=int, default=defaults.r, help="LoRA rank")
    parser.add_argument(
        "--lora-alpha",
        type=int,
        default=defaults.lora_alpha,
        help="LoRA alpha; the delta is (lora_alpha / r) * B @ A",
    )
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument(
        "--eval-samples",
        type=int,
        default=0,
        help="clean prompts per alpha in a closing evaluation (0: skip it)",
    )
    parser.add_argument("--threads", type=int, default=defaults.num_threads)
    args = parser.parse_args(argv)

    cfg = config_from_args(LoraTrainConfig, args, num_threads=args.threads)
    torch.set_num_threads(cfg.num_threads)
    t0 = time.time()
    train_adapter(cfg, args.base, args.out)
    log(f"trained and saved to {args.out} in {time.time() - t0:.0f}s")

    if args.eval_samples > 0:
        from toy_training.evaluate import evaluate_adapter, print_report

        rates = evaluate_adapter(
            args.out,
            args.base,
            num_clean=args.eval_samples,
            alphas=(0.0, 1.0, 2.0, 4.0),
            num_triggered=100,
        )
        print_report(rates)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
