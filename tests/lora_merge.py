"""A PEFT LoRA adapter merged into its base by hand: the reference the LoRA tests check the
runner and the toy adapter against, written once from PEFT's formula W + (alpha / r) * B @ A."""

from __future__ import annotations

import re

import torch

# A PEFT adapter tensor's key: the base module it adapts, and which factor (A or B) it is.
KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


def hand_merge(
    config: dict, tensors: dict, base_state: dict, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """`base_state` (in `dtype`) with every adapted weight W replaced by W + scale * B @ A."""
    scale = config["lora_alpha"] / config["r"]
    merged = {k: v.to(dtype) for k, v in base_state.items()}
    for key, a in tensors.items():
        m = KEY.match(key)
        if m and m["ab"] == "A":
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            name = f"{m['module']}.weight"
            merged[name] = merged[name] + scale * (b.to(dtype) @ a.to(dtype))
    return merged
