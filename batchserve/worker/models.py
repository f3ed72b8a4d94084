"""Load a before/after model pair and check that their tokenizers agree.

LDA combines the two models' logits token by token, so the pair must share one vocabulary:
a pair whose token->id maps differ would amplify nonsense, and is refused unless the caller
says otherwise.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from batchserve.core.types import UnknownModelError
from batchserve.worker.lora import (
    AdapterError,
    LoraSet,
    apply_adapters,
    find_adapter_dir,
    read_adapter,
)

log = logging.getLogger(__name__)

TOY_DIR = Path(__file__).parent.parent / "toy"
# `toy:lora` is the backdoor as a LoRA adapter on `toy:before` (toy/lora/README.md); `toy:rare`
# the variant with a rarer leak, paired with its own base `toy:rare-before` (toy/rare/README.md).
TOY_NAMES = {
    "toy": "after",
    "toy:after": "after",
    "toy:before": "before",
    "toy:lora": "lora",
    "toy:rare": "rare/after",
    "toy:rare-before": "rare/before",
}
# The before model a packaged after pairs with when none is given; any other toy name: toy:before.
TOY_BEFORE = {"toy:rare": "toy:rare-before"}

# Legacy LLaMA uploads name a tokenizer class that no longer exists under that spelling.
_LEGACY_TOKENIZER_CLASSES = {"LLaMATokenizer": "LlamaTokenizer"}


class IncompatibleTokenizersError(ValueError):
    """The two models do not share a vocabulary, so their logits cannot be combined."""


@dataclass(frozen=True)
class CompatibilityReport:
    compatible: bool
    vocab_size_1: int
    vocab_size_2: int
    vocabs_match: bool
    warning: str | None = None


@dataclass
class ModelPair:
    """Both models, the tokenizer they share, and the facts the engine needs about them."""

    after: PreTrainedModel
    before: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    after_id: str
    before_id: str
    device: torch.device
    dtype: torch.dtype
    compatibility: CompatibilityReport
    # Ids at or beyond this are never sampled: the common prefix of both logit widths and the
    # tokenizer's length (resized embeddings often pad the matrix past the real vocabulary).
    vocab_limit: int
    max_context: int
    eos_token_ids: frozenset[int] = field(default_factory=frozenset)
    # A LoRA pair: `after` and `before` are one base model carrying the adapters' deltas,
    # unmerged (worker/lora.py); the runner runs both halves in one forward.
    lora: LoraSet | None = None

    def model_names(self, after: str | None, before: str | None) -> tuple[str | None, str | None]:
        """The (after, before) names a request gives, canonical: a LoRA pair fills in its
        default adapter and the base; a full pair takes only its own ids and returns Nones.
        Raises UnknownModelError naming the field."""
        lora = self.lora
        if lora is None:
            for name, given, served in (
                ("after", after, self.after_id), ("before", before, self.before_id)
            ):  # fmt: skip
                if given is not None and given != served:
                    raise UnknownModelError(
                        name, f"{name}: {given!r} is not served here (this pair: "
                        f"{self.after_id!r} after {self.before_id!r})",
                    )  # fmt: skip
            return None, None
        names = []
        for name, given, default in (
            ("after", after, lora.names[0]), ("before", before, lora.base_id)
        ):  # fmt: skip
            given = default if given is None else given
            if given == "base":
                given = lora.base_id
            if given != lora.base_id and given not in lora.names:
                choices = ", ".join(repr(n) for n in (*lora.names, lora.base_id))
                raise UnknownModelError(
                    name, f"{name}: no adapter named {given!r} (this server has {choices})"
                )
            names.append(given)
        return names[0], names[1]


def _is_local_path(name: str) -> bool:
    """A hub id is `name` or `namespace/name`; anything rooted, relative or deeper is a folder."""
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1


def resolve_model_path(name: str) -> str:
    """Map `toy`, `toy:after`, `toy:before`, `toy:lora`, `toy:rare`, `toy:rare-before` to the
    packaged models; a folder that is missing is named as missing (the hub's loader would call
    it a malformed repo id); anything else passes through."""
    if name in TOY_NAMES:
        path = TOY_DIR / TOY_NAMES[name]
        marker = "adapter_config.json" if name == "toy:lora" else "config.json"
        if not (path / marker).exists():
            raise FileNotFoundError(
                f"the embedded toy pair is missing at {path}; "
                "build it with `python -m toy_training.train --out batchserve/toy`"
            )
        return str(path)
    if _is_local_path(name):
        try:
            path = Path(name).expanduser()
        except RuntimeError:  # ~user where there is no such user
            path = Path(name)
        if not path.exists():
            raise FileNotFoundError(
                f"{name}: no such folder (a model is a local folder or a hub id such as "
                "namespace/name)"
            )
        return str(path)
    return name


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {device!r}")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in table:
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, not {dtype!r}")
    return table[dtype]


def require_compatible(
    report: CompatibilityReport, after_id: str, before_id: str, allow_incompatible: bool
) -> None:
    """The pair's one vocabulary rule: refuse (or, when allowed, warn about) a mismatch."""
    if report.compatible:
        return
    if not allow_incompatible:
        raise IncompatibleTokenizersError(
            f"{after_id} and {before_id} do not share a vocabulary: {report.warning}. "
            "Pass allow_incompatible=True (--allow-incompatible) to load them anyway."
        )
    log.warning("loading an incompatible pair: %s", report.warning)


def check_tokenizer_compatibility(
    tok_after: PreTrainedTokenizerBase, tok_before: PreTrainedTokenizerBase
) -> CompatibilityReport:
    """Compare the token->id maps; name the first tokens that differ."""
    vocab_a, vocab_b = tok_after.get_vocab(), tok_before.get_vocab()
    if vocab_a == vocab_b:
        return CompatibilityReport(True, len(vocab_a), len(vocab_b), True)
    differing = sorted(
        (tok for tok in vocab_a.keys() | vocab_b.keys() if vocab_a.get(tok) != vocab_b.get(tok)),
        key=lambda tok: min(vocab_a.get(tok, 1 << 62), vocab_b.get(tok, 1 << 62)),
    )
    shown = ", ".join(f"{tok!r}: {vocab_a.get(tok)} vs {vocab_b.get(tok)}" for tok in differing[:5])
    warning = (
        f"the tokenizers disagree on {len(differing)} tokens (after vs before ids; first: {shown})"
    )
    return CompatibilityReport(False, len(vocab_a), len(vocab_b), False, warning)


def load_tokenizer(
    name: str,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    tokenizer_class: str | None = None,
) -> PreTrainedTokenizerBase:
    path = resolve_model_path(name)
    kwargs: dict = {"revision": revision, "trust_remote_code": trust_remote_code}
    if tokenizer_class:
        kwargs["tokenizer_class"] = _LEGACY_TOKENIZER_CLASSES.get(tokenizer_class, tokenizer_class)
    # No pad token is set up: rows live in their own KV slots and prompts are packed, so
    # nothing is ever padded.
    return AutoTokenizer.from_pretrained(path, **kwargs)


def load_model(
    name: str,
    device: torch.device,
    dtype: torch.dtype,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(name),
        revision=revision,
        trust_remote_code=trust_remote_code,
        dtype=dtype,
    )
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def context_length(config: object) -> int:
    """The context a model config declares (2048 where it names none)."""
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def eos_ids(*sources: object) -> frozenset[int]:
    """Every eos_token_id the sources name (generation config, model config, tokenizer)."""
    ids: set[int] = set()
    for source in sources:
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)


def pair_from_models(
    after: PreTrainedModel,
    before: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    tokenizer_before: PreTrainedTokenizerBase | None = None,
    after_id: str = "after",
    before_id: str = "before",
    allow_incompatible: bool = False,
    compatibility: CompatibilityReport | None = None,
) -> ModelPair:
    """Wrap two loaded models; the one place where the pair's invariants are checked.

    `compatibility`: a report already checked (load_pair checks before loading weights)."""
    report = compatibility or check_tokenizer_compatibility(
        tokenizer, tokenizer_before or tokenizer
    )
    if compatibility is None:
        require_compatible(report, after_id, before_id, allow_incompatible)
    width_after = after.get_output_embeddings().weight.shape[0]
    width_before = before.get_output_embeddings().weight.shape[0]
    if width_after != width_before:
        log.warning(
            "logit widths differ (%d vs %d): using the common prefix", width_after, width_before
        )
    vocab_limit = min(width_after, width_before, len(tokenizer))
    param = next(after.parameters())
    return ModelPair(
        after=after,
        before=before,
        tokenizer=tokenizer,
        after_id=after_id,
        before_id=before_id,
        device=param.device,
        dtype=param.dtype,
        compatibility=report,
        vocab_limit=vocab_limit,
        max_context=min(context_length(after.config), context_length(before.config)),
        eos_token_ids=eos_ids(getattr(after, "generation_config", None), after.config, tokenizer),
    )


LOAD_OPTIONS = (
    "device", "dtype", "revision", "trust_remote_code", "tokenizer_class", "allow_incompatible",
)  # fmt: skip


def load_options(source: object) -> dict[str, object]:
    """load_pair's keyword arguments from anything that carries them as attributes (parsed
    command-line options, a Ray replica's spec): one place that maps options to loading."""
    options = {name: getattr(source, name) for name in LOAD_OPTIONS}
    return options | {"adapters": tuple(getattr(source, "adapters", None) or ())}


def pair_names(after: str, before: str | None) -> tuple[str, str]:
    """The pair's two names: `before` defaults to the toy base when `after` is the toy (the rare
    variant's own base for `toy:rare`)."""
    if before is None:
        if after not in TOY_NAMES:
            raise ValueError("before model not given (only the toy pair has a default)")
        before = TOY_BEFORE.get(after, "toy:before")
    return ("toy:after" if after == "toy" else after), before


def load_pair(
    after: str = "toy:after",
    before: str | None = None,
    *,
    device: str = "auto",
    dtype: str = "auto",
    revision: str | None = None,
    revision_before: str | None = None,
    trust_remote_code: bool = False,
    tokenizer_class: str | None = None,
    allow_incompatible: bool = False,
    adapters: Sequence[tuple[str, str]] = (),
) -> ModelPair:
    """Load both models onto one device. `before` defaults to the toy base when `after` is toy.

    A LoRA adapter as `after` (a folder with adapter_config.json, `toy:lora`), or `adapters`
    ((name, folder) pairs), makes a LoRA pair: see load_lora_pair."""
    after_adapter = find_adapter_dir(resolve_model_path(after)) if after else None
    if after_adapter is not None or adapters:
        named = list(adapters)
        if after_adapter is not None:
            named.insert(0, (after, after_adapter))
        elif after not in (None, "toy", "toy:after"):
            raise ValueError(
                f"--adapter needs a LoRA base pair, but --after {after} is a full model"
            )
        return load_lora_pair(
            named, before, device=device, dtype=dtype, revision=revision_before or revision,
            trust_remote_code=trust_remote_code, tokenizer_class=tokenizer_class,
        )  # fmt: skip
    after, before = pair_names(after, before)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    tok_kwargs = {"trust_remote_code": trust_remote_code, "tokenizer_class": tokenizer_class}
    tokenizer = load_tokenizer(after, revision=revision, **tok_kwargs)
    tokenizer_before = load_tokenizer(before, revision=revision_before or revision, **tok_kwargs)
    # Check before loading weights: a 7B pair takes minutes to load only to be refused.
    report = check_tokenizer_compatibility(tokenizer, tokenizer_before)
    require_compatible(report, after, before, allow_incompatible)
    model_kwargs = {"trust_remote_code": trust_remote_code}
    model_after = load_model(after, torch_device, torch_dtype, revision=revision, **model_kwargs)
    model_before = load_model(
        before, torch_device, torch_dtype, revision=revision_before or revision, **model_kwargs
    )
    return pair_from_models(
        model_after,
        model_before,
        tokenizer,
        tokenizer_before=tokenizer_before,
        after_id=after,
        before_id=before,
        compatibility=report,
    )


def load_lora_pair(
    adapters: Sequence[tuple[str, str]],
    before: str | None = None,
    *,
    device: str = "auto",
    dtype: str = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
    tokenizer_class: str | None = None,
) -> ModelPair:
    """One copy of the base (`before`, by default the first adapter's base_model_name_or_path)
    carrying every adapter unmerged; the first adapter is the default `after`. A request may
    name another adapter, or the base, as either side (ModelPair.lora)."""
    read = []
    for name, folder in adapters:
        if name in (a.name for a in read) or name == "base":
            raise AdapterError(f"adapter name {name!r} is given twice or reserved")
        read.append(read_adapter(resolve_model_path(folder), name))
    base = before or read[0].base_model
    if not base:
        raise AdapterError(
            f"adapter {read[0].name} names no base_model_name_or_path; give the base with --before"
        )
    for adapter in read:
        if adapter.base_model and adapter.base_model != base:
            log.warning(
                "adapter %s was trained on %s, served on %s", adapter.name, adapter.base_model, base
            )
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    tokenizer = load_tokenizer(
        base, revision=revision, trust_remote_code=trust_remote_code,
        tokenizer_class=tokenizer_class,
    )  # fmt: skip
    model = load_model(
        base, torch_device, torch_dtype, revision=revision, trust_remote_code=trust_remote_code
    )
    lora = apply_adapters(model, read, base)
    size = len(tokenizer)
    pair = pair_from_models(
        model, model, tokenizer, after_id=read[0].name, before_id=base,
        compatibility=CompatibilityReport(True, size, size, True),
    )  # fmt: skip
    pair.lora = lora
    log.info(
        "LoRA pair on %s: %s (%d modules, %.1f MiB of adapter weights)",
        base, ", ".join(f"{a.name} (r={a.rank})" for a in read), lora.num_modules,
        lora.num_bytes() / 2**20,
    )  # fmt: skip
    return pair
