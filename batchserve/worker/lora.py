"""LoRA pairs: read peft's adapter files by hand and apply them unmerged, per token.

A LoRA "after" model is `W + s * B A` on its targeted linear layers, so both models of a pair
can run as one forward over one copy of the base: the runner packs each row twice (its before
copy and its after copy) and every token carries the index of the adapter it runs with
(-1: the base alone). Each targeted `nn.Linear` becomes a `LoraLinear` that adds

    ((x A_cat^T) * mask) (s B)_cat^T,   mask[t, c] = (column c belongs to token t's adapter)

over all loaded adapters at once: one dense product per layer whatever the mix of adapters in
the step, no data-dependent shapes (so torch.compile sees one graph), and a base token's delta
is exactly 0. The extra work is sum(r) * (in + out) per token and layer, a few percent of the
base product at ranks of 8-64.

peft is not needed at run time: its files are a JSON config and a safetensors file with keys
`base_model.model.<module>.lora_A.weight` [r, in] and `...lora_B.weight` [out, r]; its
mixed-batch forward (`adapter_names=`) builds Python index lists in hooks on every call.
Adapters this code cannot apply exactly are refused at start-up, naming why.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

BASE = -1  # a token's adapter index when it runs the base alone
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")
_EMBEDDING_KEY = re.compile(r"lora_embedding_[AB]")


class AdapterError(ValueError):
    """An adapter the server cannot apply exactly (refused at start-up)."""


@dataclass(frozen=True)
class LoraAdapter:
    """One adapter as read from disk: per module, A [r, in] and B [out, r] with its scale."""

    name: str
    path: str
    base_model: str | None
    rank: int
    lora_alpha: float
    scale: float  # lora_alpha / r (rsLoRA: / sqrt(r)); alpha_pattern may override per module
    target_modules: tuple[str, ...]
    num_modules: int
    num_bytes: int
    # Emptied once applied (the LoraLinear layers hold the weights in the model's dtype).
    weights: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = field(repr=False)

    def describe(self) -> dict[str, object]:
        """What /info and /v1/models say about it."""
        return {
            "name": self.name,
            "path": self.path,
            "base_model": self.base_model,
            "rank": self.rank,
            "lora_alpha": self.lora_alpha,
            "scale": self.scale,
            "target_modules": list(self.target_modules),
            "num_modules": self.num_modules,
        }


def find_adapter_dir(name: str) -> str | None:
    """The folder holding `adapter_config.json` if `name` is a LoRA adapter (a local folder or
    a hub id), else None."""
    path = Path(name)
    if path.is_dir():
        return str(path) if (path / "adapter_config.json").is_file() else None
    if path.exists() or name.startswith((".", "/")):
        return None
    from transformers.utils import cached_file, find_adapter_config_file  # noqa: PLC0415

    try:
        found = find_adapter_config_file(name)
    except (OSError, ValueError):
        return None
    if not found:
        return None
    # A hub adapter: its weights land in the same snapshot folder as its config.
    cached_file(name, "adapter_model.safetensors")
    return str(Path(found).parent)


def _pattern_value(pattern: dict, module: str, default: float) -> float:
    """peft's per-module override: a key matches a module name that ends with it."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _check_config(config: dict, where: str) -> None:
    def refuse(why: str) -> None:
        raise AdapterError(f"adapter {where}: {why}")

    if config.get("peft_type", "LORA") != "LORA":
        refuse(f"peft_type {config.get('peft_type')!r} is not LORA")
    if config.get("use_dora"):
        refuse("DoRA (use_dora) rescales each output column by the merged weight's norm; only "
               "plain LoRA is served unmerged (merge it into a full model instead)")  # fmt: skip
    if config.get("modules_to_save"):
        refuse(f"modules_to_save {config['modules_to_save']} replaces whole modules (e.g. the "
               "embeddings or the head); serve a merged full model instead")  # fmt: skip
    if config.get("trainable_token_indices"):
        refuse("trainable_token_indices changes embedding rows, which is not supported")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        refuse("trained biases (bias / lora_bias) are not supported")
    if config.get("fan_in_fan_out"):
        refuse("fan_in_fan_out targets Conv1D layers (GPT-2 style); only nn.Linear is supported")
    if config.get("target_parameters"):
        refuse("target_parameters (LoRA on raw parameters, e.g. MoE experts) is not supported")
    for option in ("use_qalora", "use_bdlora", "alora_invocation_tokens", "layer_replication"):
        if config.get(option):
            refuse(f"{option} is not supported")


def read_adapter(path: str, name: str | None = None) -> LoraAdapter:
    """Read peft's `adapter_config.json` + `adapter_model.safetensors` from a folder."""
    folder = Path(path)
    config_path = folder / "adapter_config.json"
    if not config_path.is_file():
        raise AdapterError(f"{path} has no adapter_config.json")
    config = json.loads(config_path.read_text())
    _check_config(config, str(path))
    weights_path = folder / "adapter_model.safetensors"
    if not weights_path.is_file():
        raise AdapterError(
            f"adapter {path}: no adapter_model.safetensors (only that format is read)"
        )
    tensors = load_file(weights_path)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if _EMBEDDING_KEY.search(key):
            raise AdapterError(f"adapter {path}: LoRA on an embedding ({key}) is not supported")
        m = _KEY.match(key)
        if m is None:
            raise AdapterError(f"adapter {path}: unexpected tensor {key!r} (not a LoRA A/B weight)")
        parts.setdefault(m["module"], {})[m["ab"]] = tensor
    lora_alpha = float(config.get("lora_alpha", 8))
    weights = {}
    for module, ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"adapter {path}: {module} has lora_{''.join(ab)} only")
        a, b = ab["A"], ab["B"]
        rank = a.shape[0]
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != rank:
            raise AdapterError(
                f"adapter {path}: {module}: A {tuple(a.shape)} and B {tuple(b.shape)} are not "
                "a linear layer's [r, in] and [out, r]"
            )
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, lora_alpha)
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        weights[module] = (a, b, scale)
    if not weights:
        raise AdapterError(f"adapter {path}: no LoRA weights in adapter_model.safetensors")
    rank = int(config.get("r", 8))
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else sorted(targets)
    return LoraAdapter(
        name=name or str(path),
        path=str(path),
        base_model=config.get("base_model_name_or_path"),
        rank=rank,
        lora_alpha=lora_alpha,
        scale=lora_alpha / math.sqrt(rank) if config.get("use_rslora") else lora_alpha / rank,
        target_modules=tuple(targets),
        num_modules=len(weights),
        num_bytes=sum((a.nbytes + b.nbytes) for a, b, _ in weights.values()),
        weights=weights,
    )


class TokenAdapters:
    """The step's per-token masks, shared by every LoraLinear of a model: for each distinct
    column layout (`owners`: which adapter each column belongs to), mask [T, R] is 1 where the
    token's adapter owns the column. Built once per step, not once per layer; None outside the
    runner's step (a plain forward is the base)."""

    def __init__(self) -> None:
        self.owners: list[torch.Tensor] = []
        self.masks: list[torch.Tensor] | None = None

    def layout(self, owner: torch.Tensor) -> int:
        """The index of `owner`'s layout, added if new."""
        for i, known in enumerate(self.owners):
            if torch.equal(known, owner):
                return i
        self.owners.append(owner)
        return len(self.owners) - 1

    def set(self, index: torch.Tensor | None, dtype: torch.dtype) -> None:
        """The step's adapter index per token [T] (BASE: the base alone); None to clear."""
        if index is None:
            self.masks = None
            return
        self.masks = [(index[:, None] == owner[None, :]).to(dtype) for owner in self.owners]


class LoraLinear(nn.Module):
    """A base nn.Linear plus the low-rank deltas of every adapter that targets it."""

    def __init__(
        self, base: nn.Linear, a: torch.Tensor, b: torch.Tensor, layout: int,
        tokens: TokenAdapters,
    ) -> None:  # fmt: skip
        super().__init__()
        self.base = base
        # Buffers, not parameters: never trained, moved with the model.
        self.register_buffer("lora_a", a, persistent=False)  # [R, in], all adapters' rows
        self.register_buffer("lora_b", b, persistent=False)  # [out, R], scale folded in
        self.layout = layout  # which of tokens.masks selects this layer's columns
        self.tokens = tokens

    @property
    def weight(self) -> torch.Tensor:  # code that inspects a linear layer's weight still can
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        masks = self.tokens.masks
        if masks is None:
            return out
        return out + ((x @ self.lora_a.T) * masks[self.layout]) @ self.lora_b.T


@dataclass
class LoraSet:
    """The adapters applied to one base model, by index; `tokens` is what the runner sets."""

    adapters: tuple[LoraAdapter, ...]
    tokens: TokenAdapters
    base_id: str
    num_modules: int

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.adapters)

    def index_of(self, name: str | None, default: int) -> int:
        """An adapter's index; the base's id (or "base") is BASE; None is `default`."""
        if name is None:
            return default
        if name in (self.base_id, "base"):
            return BASE
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(name) from None

    def describe(self) -> dict[str, object]:
        return {"base": self.base_id, "adapters": [a.describe() for a in self.adapters]}

    def num_bytes(self) -> int:
        """The adapters' weights as read (the model holds them in its own dtype)."""
        return sum(a.num_bytes for a in self.adapters)


def apply_adapters(model: nn.Module, adapters: list[LoraAdapter], base_id: str) -> LoraSet:
    """Wrap every linear layer some adapter targets, in place; checks each adapter against
    the base's modules and shapes first, so a mismatch changes nothing."""
    if not adapters:
        raise AdapterError("no adapters to apply")
    modules = dict(model.named_modules())
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
    for index, adapter in enumerate(adapters):
        for name, (a, b, scale) in adapter.weights.items():
            module = modules.get(name)
            where = f"adapter {adapter.name}: {name}"
            if module is None:
                raise AdapterError(f"{where} is not a module of the base model {base_id}")
            if module is head:
                raise AdapterError(f"{where} is the output head, which is not supported")
            if isinstance(module, LoraLinear):
                raise AdapterError(f"{where} already carries a LoRA delta")
            if type(module) is not nn.Linear:
                raise AdapterError(
                    f"{where} is a {type(module).__name__}; only nn.Linear layers are supported"
                )
            if a.shape[1] != module.in_features or b.shape[0] != module.out_features:
                raise AdapterError(
                    f"{where}: A {tuple(a.shape)} / B {tuple(b.shape)} do not fit the base's "
                    f"{module.in_features} -> {module.out_features} layer (another base model?)"
                )
            targets.setdefault(name, []).append((index, a, b * scale))
    tokens = TokenAdapters()
    weight = next(model.parameters())
    for name, parts in targets.items():
        base = modules[name]
        a = torch.cat([p[1] for p in parts]).to(weight.device, weight.dtype)
        b = torch.cat([p[2] for p in parts], dim=1).to(weight.device, weight.dtype)
        owner = torch.cat([torch.full((p[1].shape[0],), p[0], dtype=torch.long) for p in parts]).to(
            weight.device
        )
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        setattr(parent, child, LoraLinear(base, a, b, tokens.layout(owner), tokens))
    # Keep what describes the adapters, not a second copy of their weights.
    kept = tuple(dataclasses.replace(adapter, weights={}) for adapter in adapters)
    return LoraSet(kept, tokens, base_id, len(targets))
