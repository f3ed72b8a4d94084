"""The running batch: per-row state plus the tensors both models decode from.

Layout: every row is left-padded to the batch's common length T. `attention_mask[b, t]` is 1
where column t of row b holds a real token in the KV caches. Position ids are always derived
from the mask, so a row's logits never depend on how much padding the batch gives it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from batchserve.types import Row


class KVCache(ABC):
    """What the batch needs from a KV cache; a static or paged cache can replace the dynamic one."""

    @property
    @abstractmethod
    def length(self) -> int: ...

    @abstractmethod
    def model_input(self) -> Any:
        """The object handed to the model's forward (it appends the new step in place)."""

    @abstractmethod
    def select_rows(self, index: torch.Tensor) -> None:
        """Keep (or repeat) rows by index along the batch dimension."""

    @abstractmethod
    def trim_left(self, num_columns: int) -> None:
        """Drop leading columns that are padding in every row."""

    @abstractmethod
    def zero_columns(self, mask: torch.Tensor) -> None:
        """Zero the entries at padding positions (mask [B, T], 0 = padding)."""

    @abstractmethod
    def concat(self, other: KVCache, pad_self: int, pad_other: int) -> None:
        """Left-pad self and other by the given widths, then append other's rows."""


class _SpareCapacity:
    """A [B, H, T, D] tensor kept inside a larger buffer, so appends need no full copy.

    The visible part is buffer[:, :, start:end]; trimming on the left moves `start`, and an
    append that does not fit doubles the capacity (amortised O(1) per token, where a plain
    torch.cat copies the whole cache at every step).
    """

    __slots__ = ("buffer", "start", "end")

    def __init__(self, tensor: torch.Tensor | None) -> None:
        self.buffer, self.start = tensor, 0
        self.end = 0 if tensor is None else tensor.shape[-2]

    def view(self) -> torch.Tensor | None:
        if self.buffer is None:
            return None
        return self.buffer[:, :, self.start : self.end]

    @staticmethod
    def _room(length: int) -> int:
        return max(2 * length, 16)

    def select(self, index: torch.Tensor) -> None:
        """Keep rows by index, copying only the visible columns into a buffer with headroom."""
        view = self.view()
        length = view.shape[-2]
        grown = view.new_empty(index.shape[0], view.shape[1], self._room(length), view.shape[-1])
        grown[:, :, :length] = view.index_select(0, index)
        self.buffer, self.start, self.end = grown, 0, length

    def concat(self, other: torch.Tensor, pad_self: int, pad_other: int) -> None:
        """Left-pad self and other to one length and stack them, into a buffer with headroom."""
        mine = self.view()
        length = mine.shape[-2] + pad_self
        rows = mine.shape[0]
        grown = mine.new_empty(
            rows + other.shape[0], mine.shape[1], self._room(length), mine.shape[-1]
        )
        # Padding must be zeros, not whatever the allocator left: 0 * NaN would poison attention.
        grown[:rows, :, :pad_self] = 0
        grown[:rows, :, pad_self:length] = mine
        grown[rows:, :, :pad_other] = 0
        grown[rows:, :, pad_other:length] = other
        self.buffer, self.start, self.end = grown, 0, length

    def append(self, new: torch.Tensor) -> torch.Tensor:
        num_new = new.shape[-2]
        if self.buffer is None:
            self.buffer, self.start, self.end = (
                new.new_empty(*new.shape[:2], 0, new.shape[-1]),
                0,
                0,
            )
        if self.end + num_new > self.buffer.shape[-2]:
            length = self.end - self.start
            capacity = self._room(length + num_new)
            grown = self.buffer.new_empty(*self.buffer.shape[:2], capacity, self.buffer.shape[-1])
            grown[:, :, :length] = self.buffer[:, :, self.start : self.end]
            self.buffer, self.start, self.end = grown, 0, length
        self.buffer[:, :, self.end : self.end + num_new] = new
        self.end += num_new
        return self.view()


class GrowableLayer(DynamicLayer):
    """A DynamicLayer that appends in place into spare capacity instead of concatenating."""

    def __init__(self, **kwargs: Any) -> None:
        self._k = _SpareCapacity(None)
        self._v = _SpareCapacity(None)
        super().__init__(**kwargs)

    @property
    def keys(self) -> torch.Tensor | None:  # type: ignore[override]
        return self._k.view()

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        self._k = _SpareCapacity(value)

    @property
    def values(self) -> torch.Tensor | None:  # type: ignore[override]
        return self._v.view()

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self._v = _SpareCapacity(value)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ):
        if not self.is_initialized:
            self.device = key_states.device
            self.is_initialized = True
        return self._k.append(key_states), self._v.append(value_states)

    def trim_left(self, num_columns: int) -> None:
        self._k.start += num_columns
        self._v.start += num_columns

    def select_rows(self, index: torch.Tensor) -> None:
        self._k.select(index)
        self._v.select(index)

    def concat(self, other: DynamicLayer, pad_self: int, pad_other: int) -> None:
        self._k.concat(other.keys, pad_self, pad_other)
        self._v.concat(other.values, pad_self, pad_other)


class DynamicKVCache(KVCache):
    """transformers' DynamicCache with growable layers, edited layer by layer."""

    def __init__(self, cache: DynamicCache | None = None) -> None:
        if cache is None:
            cache = DynamicCache()
            # Layers are created lazily by the model's first update; make them growable.
            if getattr(cache, "layer_class_to_replicate", None) is DynamicLayer:
                cache.layer_class_to_replicate = GrowableLayer
        self.cache = cache

    @property
    def length(self) -> int:
        return self.cache.get_seq_length()

    def model_input(self) -> DynamicCache:
        return self.cache

    def _layers(self) -> list:
        return [layer for layer in self.cache.layers if layer.is_initialized]

    def select_rows(self, index: torch.Tensor) -> None:
        for layer in self._layers():
            if isinstance(layer, GrowableLayer):
                layer.select_rows(index)
            else:
                layer.keys = layer.keys.index_select(0, index)
                layer.values = layer.values.index_select(0, index)

    def trim_left(self, num_columns: int) -> None:
        if num_columns <= 0:
            return
        for layer in self._layers():
            if isinstance(layer, GrowableLayer):
                layer.trim_left(num_columns)
            else:
                layer.keys = layer.keys[:, :, num_columns:].contiguous()
                layer.values = layer.values[:, :, num_columns:].contiguous()

    def zero_columns(self, mask: torch.Tensor) -> None:
        padding = ~mask[:, None, :, None].to(dtype=torch.bool)
        for layer in self._layers():
            # In place: the views share the growable buffers, whose headroom stays.
            layer.keys.masked_fill_(padding, 0)
            layer.values.masked_fill_(padding, 0)

    def concat(self, other: KVCache, pad_self: int, pad_other: int) -> None:
        assert isinstance(other, DynamicKVCache)
        for mine, theirs in zip(self._layers(), other._layers(), strict=True):
            mine.keys = torch.cat(
                [_left_pad(mine.keys, pad_self), _left_pad(theirs.keys, pad_other)]
            )
            mine.values = torch.cat(
                [_left_pad(mine.values, pad_self), _left_pad(theirs.values, pad_other)]
            )


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """Pad dim -2 (the sequence) of a [B, H, T, D] tensor on the left with zeros."""
    if width == 0:
        return t
    return torch.nn.functional.pad(t, (0, 0, width, 0))


class RunningBatch:
    """Rows that decode together, with one KV cache per model."""

    def __init__(
        self,
        rows: list[Row],
        attention_mask: torch.Tensor,
        next_tokens: torch.Tensor,
        caches: tuple[KVCache, KVCache],
    ) -> None:
        self.rows = rows
        self.attention_mask = attention_mask  # [B, T] over the cached columns
        self.next_tokens = next_tokens  # [B]: sampled, not yet in the caches
        self.caches = caches
        self._refresh_params()

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def device(self) -> torch.device:
        return self.attention_mask.device

    def _refresh_params(self) -> None:
        """Per-row parameter tensors; rebuilt only when rows join or leave."""
        device = self.attention_mask.device
        params = [r.params for r in self.rows]
        self.alpha = torch.tensor([p.alpha for p in params], dtype=torch.float32, device=device)
        self.temperature = torch.tensor(
            [p.temperature for p in params], dtype=torch.float32, device=device
        )
        self.top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
        self.top_k = torch.tensor([p.top_k for p in params], dtype=torch.long, device=device)

    def merge(self, other: RunningBatch) -> None:
        """Admit other's rows: left-pad both sides to a common length, then stack."""
        length, other_length = self.attention_mask.shape[1], other.attention_mask.shape[1]
        common = max(length, other_length)
        pad_self, pad_other = common - length, common - other_length
        for mine, theirs in zip(self.caches, other.caches, strict=True):
            mine.concat(theirs, pad_self, pad_other)
        pad = torch.nn.functional.pad
        self.attention_mask = torch.cat(
            [pad(self.attention_mask, (pad_self, 0)), pad(other.attention_mask, (pad_other, 0))]
        )
        self.next_tokens = torch.cat([self.next_tokens, other.next_tokens])
        self.rows = self.rows + other.rows
        self._refresh_params()

    def keep_rows(self, keep: list[int]) -> None:
        if len(keep) == len(self.rows):
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        for cache in self.caches:
            cache.select_rows(index)
        self.attention_mask = self.attention_mask.index_select(0, index)
        self.next_tokens = self.next_tokens.index_select(0, index)
        self.rows = [self.rows[i] for i in keep]
        self._refresh_params()
        self.compact()

    def retire(self) -> list[Row]:
        """Remove and return the finished rows."""
        finished = [r for r in self.rows if r.is_finished]
        if finished:
            self.keep_rows([i for i, r in enumerate(self.rows) if not r.is_finished])
        return finished

    def remove(self, row_ids: set[int]) -> list[Row]:
        """Drop rows (cancelled requests) so no more compute is spent on them."""
        removed = [r for r in self.rows if r.row_id in row_ids]
        if removed:
            self.keep_rows([i for i, r in enumerate(self.rows) if r.row_id not in row_ids])
        return removed

    def compact(self) -> None:
        """Drop leading columns that are padding in every row (left padding keeps them leading)."""
        if not self.rows:
            return
        occupied = self.attention_mask.any(dim=0)
        first = int(occupied.int().argmax()) if bool(occupied.any()) else occupied.shape[0]
        if first > 0:
            for cache in self.caches:
                cache.trim_left(first)
            self.attention_mask = self.attention_mask[:, first:]
