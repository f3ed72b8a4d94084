"""Host values onto the device without waiting for it."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def upload(
    values: Sequence | torch.Tensor, dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """`values` (a list or a CPU tensor) as a tensor on `device`. `torch.tensor(..., device=
    "cuda")` copies from pageable memory with a stream synchronisation; a non-blocking copy is
    staged by the driver before it returns (the host memory may go at once) and waits for
    nothing, so a step's only synchronisation stays its copy of the tokens to the host."""
    tensor = torch.as_tensor(values, dtype=dtype)
    if torch.device(device).type == "cpu":
        return tensor
    return tensor.to(device, non_blocking=True)
