"""Paged attention for packed steps: every row reads its own KV through its block table.

A step packs the decoding rows' one token each, then the prefilling rows' prompt chunks, into
one sequence [1, N] that both models run once. The models stay stock Hugging Face models:
attention is a function registered with transformers' `AttentionInterface`, which gets the
rotary-embedded query/key/value and a `batchserve=PagedCall` keyword handed through the model.

Per layer it writes the N new keys and values into the store (one `index_copy_`), then:
- decoding rows: one query each against the store rows their block table names, masked to
  their length. Under torch.compile this is written as a product-and-sum over the store rows,
  which inductor fuses into one loop that reads the keys where they lie: no [B, L] copy.
  Eagerly it gathers and calls SDPA (the faster choice without a compiler);
- prefilling rows: each chunk attends causally to its row's cached prefix and itself, one SDPA
  call per chunk, in a custom op the compiler treats as opaque (the number of chunks varies).

Because each layer writes every new key before any query reads, a row may read blocks another
row of the same step is writing (the n samples of one prompt, a shared prefix).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from batchserve.worker import native  # noqa: F401 - registers batchserve::native_decode_attention

ATTENTION_NAME = "batchserve_paged"


class KVStore:
    """One model's KV: per layer a key and a value tensor [num_slots, kv_heads, head_dim]."""

    def __init__(
        self, shapes: dict[int, tuple[int, int, int]], dtype: torch.dtype, num_slots: int,
        device: torch.device,
    ) -> None:  # fmt: skip
        # Zeros, not empty: attention multiplies masked entries by 0, and 0 * NaN is NaN.
        self.keys = {
            i: torch.zeros(num_slots, h, kd, dtype=dtype, device=device)
            for i, (h, kd, _) in shapes.items()
        }
        self.values = {
            i: torch.zeros(num_slots, h, vd, dtype=dtype, device=device)
            for i, (h, _, vd) in shapes.items()
        }

    @property
    def num_bytes(self) -> int:
        tensors = [*self.keys.values(), *self.values.values()]
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class PagedBatch:
    """Where one step's tokens go and what each query reads. The first `num_decode` packed
    tokens are single queries of the decode attention, each reading keys 0..its position:
    decoding rows and, with the C kernel, the tokens of short prompt chunks (padded with
    queries that read and write the reserved block 0); the rest prompt chunks attended per
    chunk (`prefill_spans` [R, 3] on the host: offset in the chunk part, tokens, start position
    of each chunk; padding tokens belong to no span)."""

    write_index: torch.Tensor  # [N] store slot of each packed token
    # What the decoding rows read: with the C kernel (worker/native.py) their block tables
    # [B, W]; else [B, L] store slots of each row's positions 0..L-1.
    decode_read_index: torch.Tensor
    decode_positions: torch.Tensor  # [B] the query's position (it reads keys 0..position)
    # None when the step only decodes (most steps): no chunk part at all, its own graph.
    prefill_read_index: torch.Tensor | None  # [R, L'] likewise for each chunk's row
    prefill_spans: torch.Tensor | None  # [R, 3] int64, on the CPU
    is_compiled: bool = False
    # A LoRA pair: each packed token's adapter index (worker/lora.py; -1 = the base alone).
    token_adapters: torch.Tensor | None = None
    native_block_size: int = 0  # > 0: decode_read_index holds block tables for the C kernel


@dataclass
class PagedCall:
    """The keyword each model's forward hands its attention: the model's store, the step."""

    store: KVStore
    batch: PagedBatch


@dataclass
class ShapeProbe:
    """Passed instead of a `PagedBatch` once at start-up: records each layer's KV shape."""

    shapes: dict[int, tuple[int, int, int]] = field(default_factory=dict)  # heads, key, value dim
    dtype: torch.dtype | None = None
    uses_softcap: bool = False

    @property
    def bytes_per_token(self) -> int:
        size = torch.tensor([], dtype=self.dtype).element_size()
        return sum(h * (kd + vd) * size for h, kd, vd in self.shapes.values())


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    batchserve: PagedCall | ShapeProbe | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query [1, heads, N, dim], key/value [1, kv_heads, N, dim] -> [1, N, heads, dim]."""
    if not isinstance(batchserve, PagedCall):
        if isinstance(batchserve, ShapeProbe):
            batchserve.shapes[module.layer_idx] = (key.shape[1], key.shape[3], value.shape[3])
            batchserve.dtype = key.dtype
            if kwargs.get("softcap") is not None:
                batchserve.uses_softcap = True
                kwargs.pop("softcap")
        # A plain forward (a test's reference, the probe): ordinary causal SDPA.
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
            sliding_window=sliding_window, **kwargs,
        )  # fmt: skip
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("attention logit soft-capping is not supported by the runner")
    window = sliding_window or getattr(module, "sliding_window", None) or 0
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    batch = batchserve.batch
    key_store = batchserve.store.keys[module.layer_idx]
    value_store = batchserve.store.values[module.layer_idx]
    key_store.index_copy_(0, batch.write_index, key[0].transpose(0, 1))
    value_store.index_copy_(0, batch.write_index, value[0].transpose(0, 1))
    q = query[0].transpose(0, 1)  # [N, heads, dim]
    num_decode = batch.decode_positions.shape[0]
    if batch.native_block_size:
        decode = torch.ops.batchserve.native_decode_attention(
            q[:num_decode], key_store, value_store, batch.decode_read_index,
            batch.decode_positions, batch.native_block_size, scale, window,
        )  # fmt: skip
    else:
        decode = decode_attention(
            q[:num_decode], key_store, value_store, batch.decode_read_index,
            batch.decode_positions, scale, window, fused=batch.is_compiled,
        )  # fmt: skip
    if batch.prefill_spans is None:
        return decode.unsqueeze(0), None
    prefill = torch.ops.batchserve.prefill_attention(
        q[num_decode:], key_store, value_store, batch.prefill_read_index,
        batch.prefill_spans, scale, window,
    )  # fmt: skip
    return torch.cat([decode, prefill]).unsqueeze(0), None


def decode_attention(
    query: torch.Tensor,
    key_store: torch.Tensor,
    value_store: torch.Tensor,
    read_index: torch.Tensor,
    positions: torch.Tensor,
    scale: float,
    window: int,
    fused: bool,
) -> torch.Tensor:
    """One query per row [B, heads, dim] against store slots read_index [B, L]; keys at
    positions <= the row's position count (and, with a window, within it)."""
    rows, heads, dim = query.shape
    length = read_index.shape[1]
    kv_heads = key_store.shape[1]
    group = heads // kv_heads
    key_positions = torch.arange(length, device=query.device)
    valid = key_positions[None, :] <= positions[:, None]
    if window:
        valid = valid & (positions[:, None] - key_positions[None, :] < window)
    grouped = query.reshape(rows, kv_heads, group, dim)
    if fused:
        # Product and sum over indexed store rows: inductor emits one loop reading the keys in
        # place (matmul would make it copy them out first).
        grouped = torch.ops.batchserve.materialize(grouped)
        keys = key_store[read_index]  # [B, L, kv_heads, dim], fused away
        scores = (grouped[:, None] * keys[:, :, :, None, :]).sum(-1) * scale  # [B, L, kv, g]
        scores = scores.masked_fill(~valid[:, :, None, None], float("-inf"))
        weights = scores.softmax(dim=1).to(value_store.dtype)
        values = value_store[read_index]
        out = (weights[..., None] * values[:, :, :, None, :]).sum(1)  # [B, kv, g, dim]
        return out.reshape(rows, heads, value_store.shape[-1])
    flat = read_index.reshape(-1)
    keys = key_store.index_select(0, flat).view(rows, length, kv_heads, -1).transpose(1, 2)
    values = value_store.index_select(0, flat).view(rows, length, kv_heads, -1).transpose(1, 2)
    # The query heads sharing a KV head become its "sequence": no KV head is repeated.
    out = F.scaled_dot_product_attention(
        grouped, keys, values, attn_mask=valid[:, None, None, :], scale=scale
    )  # [B, kv, g, dim]
    return out.reshape(rows, heads, values.shape[-1])


@torch.library.custom_op("batchserve::materialize", mutates_args=())
def materialize(tensor: torch.Tensor) -> torch.Tensor:
    """A copy the compiler cannot see through. Inlined, a decode query's rotary embedding
    (a cos and a sin per element) is recomputed inside the attention loop for every key it
    meets; computed once here, the loop only multiplies and adds."""
    return tensor.clone()


@materialize.register_fake
def _(tensor):  # noqa: ANN001, ANN202
    return torch.empty_like(tensor)


@torch.library.custom_op("batchserve::prefill_attention", mutates_args=())
def prefill_attention(
    query: torch.Tensor,
    key_store: torch.Tensor,
    value_store: torch.Tensor,
    read_index: torch.Tensor,
    spans: torch.Tensor,
    scale: float,
    window: int,
) -> torch.Tensor:
    """Each chunk [tokens, heads, dim] attends to its row's keys 0..its last position, causally:
    one SDPA per chunk, so the cost is the sum over chunks, not the square of the packed
    sequence."""
    out = torch.zeros(
        (query.shape[0], query.shape[1], value_store.shape[-1]),
        dtype=query.dtype, device=query.device,
    )  # fmt: skip
    gqa = query.shape[1] != key_store.shape[1]
    for r, (offset, num_tokens, start) in enumerate(spans.tolist()):
        if num_tokens == 0:
            continue  # a padding span
        length = start + num_tokens
        index = read_index[r, :length]
        keys = key_store.index_select(0, index).transpose(0, 1).unsqueeze(0)  # [1, kv, L, d]
        values = value_store.index_select(0, index).transpose(0, 1).unsqueeze(0)
        q = query[offset : offset + num_tokens].transpose(0, 1).unsqueeze(0)  # [1, h, T, d]
        if start == 0 and not (window and length > window):
            attended = F.scaled_dot_product_attention(
                q, keys, values, is_causal=True, scale=scale, enable_gqa=gqa
            )
        else:
            query_pos = torch.arange(start, length, device=query.device)[:, None]
            key_pos = torch.arange(length, device=query.device)[None, :]
            mask = key_pos <= query_pos
            if window:
                mask = mask & (query_pos - key_pos < window)
            attended = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask, scale=scale, enable_gqa=gqa
            )
        out[offset : offset + num_tokens] = attended[0].transpose(0, 1)
    return out


@prefill_attention.register_fake
def _(query, key_store, value_store, read_index, spans, scale, window):  # noqa: ANN001, ANN202
    return query.new_empty((query.shape[0], query.shape[1], value_store.shape[-1]))


AttentionInterface.register(ATTENTION_NAME, paged_attention)
