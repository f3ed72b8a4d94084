"""The model runner: both models, a paged KV store per model, and per-slot state on the device.

Rows live in slots. The engine keeps the occupied slots a dense prefix 0..B-1 (a freed slot
takes the last row, which moves a dozen numbers, never KV), so a decode step runs over
`slots[:B]` views: nothing is concatenated, padded or rebuilt when rows come and go.

KV lives in blocks of `block_size` token rows of a store allocated once per model; a block
table per slot maps a row's positions to store rows, so admission is bounded by free blocks
(the token budget), not by a fixed per-slot length. Block 0 is never handed out: padding and
unused table entries point at it and attention masks them.

The models stay stock Hugging Face models: attention is a function registered with
transformers' `AttentionInterface`. Each forward passes `batchserve=_Call(store, layout)`, which
the models hand through to that function with the rotary-embedded query/key/value; positions
reach the model as `position_ids`. Called without it (a plain forward in a test), the
function is ordinary causal SDPA.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from batchserve.core.types import RunnerConfig
from batchserve.worker.models import ModelPair
from batchserve.worker.sampling import SamplingPlan, amplify, sample

log = logging.getLogger(__name__)

ATTENTION_NAME = "batchserve_slots"
INVALID_TOKEN = -1  # sampled for a row whose logits were not finite
_CPU_DEFAULT_TOKENS_PER_SLOT = 2048
_CPU_MAX_KV_BYTES = 4 << 30


# --- the attention function -----------------------------------------------------------------


@dataclass
class KVLayout:
    """Where this forward's keys go and which store rows each query reads; shared by both
    models (their stores differ in shape, not in layout)."""

    is_prefill: bool
    write_index: torch.Tensor  # [N] store rows for the new keys
    # Prefill: prompts are packed into one sequence [1, S]; `write_source` [N] picks the packed
    # token for each written row (a prompt shared by n rows is written n times); `spans` are
    # the prompts' (start, length) in the packed sequence, each attended causally on its own.
    write_source: torch.Tensor | None = None
    spans: list[tuple[int, int]] = field(default_factory=list)
    # Decode: `read_index` [B, L] store rows of each row's keys, `positions` [B] the query's.
    read_index: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict)

    def mask(self, sliding_window: int | None) -> torch.Tensor:
        """Decode's boolean mask [B, 1, 1, L] (True = attend), once per step per window size."""
        if sliding_window not in self._masks:
            pos = self.positions
            keys = torch.arange(self.read_index.shape[1], device=pos.device)
            allowed = keys[None, :] <= pos[:, None]
            if sliding_window:
                allowed &= (pos[:, None] - keys[None, :]) < sliding_window
            self._masks[sliding_window] = allowed[:, None, None, :]
        return self._masks[sliding_window]


@dataclass
class _ShapeProbe:
    """Passed instead of a `_Call` once at start-up: records each layer's KV shape and dtype."""

    shapes: dict[int, tuple[int, int, int]] = field(default_factory=dict)  # heads, key, value dim
    dtype: torch.dtype | None = None
    uses_softcap: bool = False

    @property
    def bytes_per_token(self) -> int:
        size = torch.tensor([], dtype=self.dtype).element_size()
        return sum(h * (kd + vd) * size for h, kd, vd in self.shapes.values())


class KVStore:
    """One model's KV: per layer a key and a value tensor [num_tokens, kv_heads, head_dim]."""

    def __init__(self, probe: _ShapeProbe, num_tokens: int, device: torch.device) -> None:
        # Zeros, not empty: attention multiplies masked entries by 0, and 0 * NaN is NaN.
        self.keys = {
            i: torch.zeros(num_tokens, h, kd, dtype=probe.dtype, device=device)
            for i, (h, kd, _) in probe.shapes.items()
        }
        self.values = {
            i: torch.zeros(num_tokens, h, vd, dtype=probe.dtype, device=device)
            for i, (h, _, vd) in probe.shapes.items()
        }

    @property
    def num_bytes(self) -> int:
        tensors = [*self.keys.values(), *self.values.values()]
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class _Call:
    store: KVStore
    layout: KVLayout


def slot_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    batchserve: _Call | _ShapeProbe | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention over the slot store (query/key/value [B, heads, T, head_dim], rotary applied)."""
    if not isinstance(batchserve, _Call):
        if isinstance(batchserve, _ShapeProbe):
            batchserve.shapes[module.layer_idx] = (key.shape[1], key.shape[3], value.shape[3])
            batchserve.dtype = key.dtype
            if kwargs.get("softcap") is not None:
                batchserve.uses_softcap = True
                kwargs.pop("softcap")
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
            sliding_window=sliding_window, **kwargs,
        )  # fmt: skip
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("attention logit soft-capping is not supported by the runner")
    window = sliding_window or getattr(module, "sliding_window", None)
    store, layout = batchserve.store, batchserve.layout
    key_store, value_store = store.keys[module.layer_idx], store.values[module.layer_idx]
    if layout.is_prefill:
        # [1, heads, S, dim] -> [S, heads, dim] rows, picked per written row.
        key_store.index_copy_(
            0, layout.write_index, key[0].transpose(0, 1).index_select(0, layout.write_source)
        )
        value_store.index_copy_(
            0, layout.write_index, value[0].transpose(0, 1).index_select(0, layout.write_source)
        )
        out = _prefill_attention(query, key, value, layout.spans, scaling, window)
    else:
        key_store.index_copy_(0, layout.write_index, key[:, :, 0])
        value_store.index_copy_(0, layout.write_index, value[:, :, 0])
        # index_select of the flattened index: 3x faster than advanced indexing on the CPU.
        rows, length = layout.read_index.shape
        flat = layout.read_index.view(-1)
        keys = key_store.index_select(0, flat).view(rows, length, *key_store.shape[1:])
        values = value_store.index_select(0, flat).view(rows, length, *value_store.shape[1:])
        keys, values = keys.transpose(1, 2), values.transpose(1, 2)  # [B, heads, L, dim]
        out = _decode_attention(query, keys, values, layout.mask(window), scaling)
    return out.transpose(1, 2).contiguous(), None


def _prefill_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    spans: list[tuple[int, int]],
    scaling: float | None,
    window: int | None,
) -> torch.Tensor:
    """Each packed prompt attends causally to itself alone: one SDPA call per prompt, so the
    cost is the sum of squared prompt lengths (a block-diagonal mask over the packed sequence
    would cost its square) and flash/memory-efficient kernels apply (no mask to materialise)."""
    gqa = query.shape[1] != key.shape[1]
    outputs = []
    for start, length in spans:
        q, k, v = (t[:, :, start : start + length] for t in (query, key, value))
        if window and length > window:
            pos = torch.arange(length, device=query.device)
            distance = pos[:, None] - pos[None, :]
            mask = (distance >= 0) & (distance < window)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, scale=scaling, enable_gqa=gqa
            )
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa
            )
        outputs.append(out)
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)


def _decode_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    scaling: float | None,
) -> torch.Tensor:
    """One query token per row against its gathered keys [B, kv_heads, L, dim].

    With grouped-query attention the query heads sharing a KV head become that head's
    "sequence" ([B, kv_heads, n_rep, dim]), so no KV head is repeated and SDPA needs no
    enable_gqa beside a mask (a combination CUDA serves only with its slow math kernel).
    """
    rows, heads, _, dim = query.shape
    kv_heads = keys.shape[1]
    if heads == kv_heads:
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling)
    grouped = query.reshape(rows, kv_heads, heads // kv_heads, dim)
    out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask, scale=scaling)
    return out.reshape(rows, heads, 1, values.shape[-1])


AttentionInterface.register(ATTENTION_NAME, slot_attention)


# --- blocks ---------------------------------------------------------------------------------


class BlockPool:
    """Free KV blocks. Block 0 is reserved: padding and unused table entries point at it."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = list(range(num_blocks - 1, 0, -1))  # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def capacity_tokens(self) -> int:
        """Tokens one row can ever hold: every block but the reserved one."""
        return (self.num_blocks - 1) * self.block_size

    def allocate(self, num_blocks: int) -> list[int]:
        if num_blocks > len(self._free):
            raise MemoryError(f"{num_blocks} KV blocks asked, {len(self._free)} free")
        return [self._free.pop() for _ in range(num_blocks)]

    def free(self, blocks: Sequence[int]) -> None:
        self._free.extend(blocks)


# --- the runner -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SlotParams:
    """What a slot's sampling needs, written once at admission."""

    alpha: float
    temperature: float
    top_p: float
    top_k: int
    seed: int


class ModelRunner:
    """Prefill into slots and decode the occupied prefix; knows rows only as slots."""

    def __init__(self, pair: ModelPair, config: RunnerConfig | None = None) -> None:
        self.pair = pair
        self.config = config or RunnerConfig()
        self.device = pair.device
        self.vocab = pair.vocab_limit
        sync_free = self.config.sync_free
        self.sync_free = self.device.type == "cuda" if sync_free is None else sync_free
        self.num_host_transfers = 0  # device-to-host copies made by `to_host` (tests count them)
        models = (pair.after, pair.before)
        if self.device.type == "cuda" and torch.backends.cuda.cudnn_sdp_enabled():
            # cuDNN's SDPA re-plans for every new KV length: 2 ms of host time per call was
            # measured on an H200, more than a whole 7B decode step's weight streaming.
            torch.backends.cuda.enable_cudnn_sdp(False)
            log.info("cuDNN attention disabled: it re-plans for every KV length")
        probes = [self._probe_shapes(m) for m in models]
        for model in models:
            model.set_attn_implementation(ATTENTION_NAME)
        bytes_per_token = sum(p.bytes_per_token for p in probes)
        # Decode gathers one layer's K and V for every slot at full length (a transient).
        gather_bytes = (
            self.config.max_slots
            * pair.max_context
            * max(p.bytes_per_token // max(1, len(p.shapes)) for p in probes)
        )
        num_tokens = self._kv_tokens(bytes_per_token, gather_bytes)
        bs = self.config.block_size
        num_blocks = max(2, num_tokens // bs + 1)  # + the reserved block 0
        self.blocks = BlockPool(num_blocks, bs)
        self.stores = tuple(KVStore(p, num_blocks * bs, self.device) for p in probes)
        self.kv_bytes = sum(s.num_bytes for s in self.stores)
        slots = self.config.max_slots
        max_blocks_per_row = math.ceil(min(pair.max_context, self.blocks.capacity_tokens) / bs)
        self.max_row_tokens = min(pair.max_context, max_blocks_per_row * bs)
        dev = self.device
        self.block_table = torch.zeros(slots, max_blocks_per_row, dtype=torch.long, device=dev)
        self.next_token = torch.zeros(slots, dtype=torch.long, device=dev)
        self.position = torch.zeros(slots, dtype=torch.long, device=dev)
        self.step = torch.zeros(slots, dtype=torch.long, device=dev)
        self.seed = torch.zeros(slots, dtype=torch.long, device=dev)
        self.top_k = torch.zeros(slots, dtype=torch.long, device=dev)
        self.alpha = torch.zeros(slots, dtype=torch.float32, device=dev)
        self.temperature = torch.ones(slots, dtype=torch.float32, device=dev)
        self.top_p = torch.ones(slots, dtype=torch.float32, device=dev)
        self._slot_tensors = (
            self.block_table, self.next_token, self.position, self.step, self.seed,
            self.top_k, self.alpha, self.temperature, self.top_p,
        )  # fmt: skip
        log.info(
            "KV store: %d tokens in %d blocks of %d (%.1f MiB for both models), %d slots",
            (num_blocks - 1) * bs, num_blocks - 1, bs, self.kv_bytes / 2**20, slots,
        )  # fmt: skip

    # --- sizing ---------------------------------------------------------------------------

    def _probe_shapes(self, model: PreTrainedModel) -> _ShapeProbe:
        probe = _ShapeProbe()
        model.set_attn_implementation(ATTENTION_NAME)
        with torch.inference_mode():
            ids = torch.zeros((1, 1), dtype=torch.long, device=self.device)
            model(input_ids=ids, use_cache=False, logits_to_keep=1, batchserve=probe)
        if not probe.shapes:
            raise ValueError(
                f"{type(model).__name__} does not route attention through transformers' "
                "AttentionInterface, so the runner cannot serve it"
            )
        if probe.uses_softcap:
            raise ValueError(
                f"{type(model).__name__} soft-caps its attention logits (e.g. Gemma-2), which "
                "the runner's attention does not implement"
            )
        return probe

    def _kv_tokens(self, bytes_per_token: int, gather_bytes: int) -> int:
        config = self.config
        if config.kv_cache_tokens is not None:
            return config.kv_cache_tokens
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            used = total - free
            # Headroom for activations (prefill hidden states, both models' logits) and the
            # decode step's gathered keys and values of one layer.
            reserve = (1 << 30) + gather_bytes
            budget = int(total * config.gpu_memory_fraction) - used - reserve
            if budget < bytes_per_token * config.block_size:
                raise MemoryError(
                    f"no GPU memory left for the KV store at --gpu-memory-fraction "
                    f"{config.gpu_memory_fraction} ({used / 2**30:.1f} GiB in use of "
                    f"{total / 2**30:.1f} GiB)"
                )
            return budget // bytes_per_token
        tokens = config.max_slots * min(self.pair.max_context, _CPU_DEFAULT_TOKENS_PER_SLOT)
        return max(config.block_size, min(tokens, _CPU_MAX_KV_BYTES // bytes_per_token))

    def info(self) -> dict[str, object]:
        return {
            "kv_cache_tokens": self.blocks.capacity_tokens,
            "kv_block_size": self.blocks.block_size,
            "kv_cache_bytes": self.kv_bytes,
            "max_slots": self.config.max_slots,
            "max_row_tokens": self.max_row_tokens,
            "top_k_cap": self.config.top_k_cap,
            "sync_free_sampling": self.sync_free,
            "attention": ATTENTION_NAME,
        }

    # --- slots ----------------------------------------------------------------------------

    def write_slots(
        self, slots: Sequence[int], params: Sequence[SlotParams], blocks: Sequence[list[int]]
    ) -> None:
        """Admission: a slot's sampling parameters and block table, written once."""
        dev = self.device
        index = torch.tensor(slots, dtype=torch.long, device=dev)
        table = torch.zeros((len(slots), self.block_table.shape[1]), dtype=torch.long)
        for i, row_blocks in enumerate(blocks):
            table[i, : len(row_blocks)] = torch.tensor(row_blocks, dtype=torch.long)
        self.block_table.index_copy_(0, index, table.to(dev))
        for tensor, values in (
            (self.alpha, [p.alpha for p in params]),
            (self.temperature, [p.temperature for p in params]),
            (self.top_p, [p.top_p for p in params]),
            (self.top_k, [p.top_k for p in params]),
            (self.seed, [p.seed for p in params]),
        ):
            tensor.index_copy_(0, index, torch.tensor(values, dtype=tensor.dtype, device=dev))
        self.step.index_fill_(0, index, 0)

    def move_slots(self, sources: Sequence[int], targets: Sequence[int]) -> None:
        """Move rows between slots (the engine closes gaps left by finished rows)."""
        if not sources:
            return
        src = torch.tensor(sources, dtype=torch.long, device=self.device)
        dst = torch.tensor(targets, dtype=torch.long, device=self.device)
        for tensor in self._slot_tensors:
            tensor.index_copy_(0, dst, tensor.index_select(0, src))

    def clear_slots(self, first: int, end: int) -> None:
        """Point freed slots' block tables at the reserved block 0, so anything that runs over
        a free slot (a padding row of a CUDA-graph bucket) can only write there."""
        if end > first:
            self.block_table[first:end] = 0

    def to_host(self, tokens: torch.Tensor) -> list[int]:
        """The one device-to-host copy of a step."""
        self.num_host_transfers += 1
        return tokens.tolist()

    # --- forward passes -------------------------------------------------------------------

    def _forward(
        self, model: PreTrainedModel, store: KVStore, layout: KVLayout, **inputs
    ) -> torch.Tensor:
        out = model(use_cache=False, batchserve=_Call(store, layout), **inputs)
        return out.logits[0 if layout.is_prefill else slice(None), ..., : self.vocab]

    def _store_rows(self, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Store row of each (slot, position) pair, via the block table."""
        bs = self.config.block_size
        blocks = self.block_table[slots, positions // bs]
        return blocks * bs + positions % bs

    @torch.inference_mode()
    def prefill(
        self,
        slots: Sequence[int],
        prompts: Sequence[Sequence[int]],
        plan: SamplingPlan,
    ) -> torch.Tensor:
        """Prefill each slot's prompt (rows sharing a prompt share its forward), write its KV,
        sample its first token; returns the tokens [len(slots)] on the device."""
        dev = self.device
        unique: dict[tuple[int, ...], int] = {}
        for ids in prompts:
            unique.setdefault(tuple(ids), len(unique))
        packed = [t for ids in unique for t in ids]
        lengths = [len(ids) for ids in unique]
        starts = [0]
        for n in lengths[:-1]:
            starts.append(starts[-1] + n)
        positions = torch.cat([torch.arange(n) for n in lengths]).to(dev)
        prompt_of_row = [unique[tuple(ids)] for ids in prompts]
        row_lengths = torch.tensor([lengths[p] for p in prompt_of_row])
        row_slots = torch.repeat_interleave(torch.tensor(list(slots)), row_lengths).to(dev)
        row_positions = torch.cat([torch.arange(int(n)) for n in row_lengths]).to(dev)
        write_source = torch.cat(
            [torch.arange(starts[p], starts[p] + lengths[p]) for p in prompt_of_row]
        ).to(dev)
        layout = KVLayout(
            is_prefill=True,
            write_index=self._store_rows(row_slots, row_positions),
            write_source=write_source,
            spans=list(zip(starts, lengths, strict=True)),
        )
        last = torch.tensor([s + n - 1 for s, n in zip(starts, lengths, strict=True)], device=dev)
        inputs = {
            "input_ids": torch.tensor([packed], dtype=torch.long, device=dev),
            "position_ids": positions.unsqueeze(0),
            "logits_to_keep": last,
        }
        pick = torch.tensor(prompt_of_row, dtype=torch.long, device=dev)
        after, before = (
            self._forward(model, store, layout, **inputs).index_select(0, pick)
            for model, store in zip((self.pair.after, self.pair.before), self.stores, strict=True)
        )
        index = torch.tensor(list(slots), dtype=torch.long, device=dev)
        tokens = self._sample(after, before, index, plan)
        self.next_token.index_copy_(0, index, tokens)
        self.position.index_copy_(0, index, row_lengths.to(dev))
        self.step.index_fill_(0, index, 1)
        self.last_logits = (after, before)
        return tokens

    @torch.inference_mode()
    def decode(self, num_rows: int, num_keys: int, plan: SamplingPlan) -> torch.Tensor:
        """One step for slots [0, num_rows); `num_keys` = the longest row's length + 1.

        Position and step counters advance only after both forwards, so a step that raises
        can be retried: it rewrites the same store rows.
        """
        rows = slice(0, num_rows)
        positions = self.position[rows]
        slots = torch.arange(num_rows, device=self.device)
        keys = torch.arange(num_keys, device=self.device)
        layout = KVLayout(
            is_prefill=False,
            write_index=self._store_rows(slots, positions),
            read_index=self._store_rows(slots[:, None], keys[None, :]),
            positions=positions,
        )
        inputs = {
            "input_ids": self.next_token[rows].unsqueeze(1),
            "position_ids": positions.unsqueeze(1),
            "logits_to_keep": 1,
        }
        after, before = (
            self._forward(model, store, layout, **inputs)[:, -1]
            for model, store in zip((self.pair.after, self.pair.before), self.stores, strict=True)
        )
        tokens = self._sample(after, before, rows, plan)
        self.next_token[rows] = tokens
        self.position[rows] += 1
        self.step[rows] += 1
        self.last_logits = (after, before)
        return tokens

    def _sample(
        self,
        after: torch.Tensor,
        before: torch.Tensor,
        index: torch.Tensor | slice,
        plan: SamplingPlan,
    ) -> torch.Tensor:
        logits = amplify(after, before, self.alpha[index])
        # -inf in both models (a masked token) is -inf amplified, not -inf - -inf = NaN.
        logits = torch.where(torch.isnan(logits), float("-inf"), logits)
        tokens = sample(
            logits,
            self.temperature[index],
            self.top_p[index],
            self.top_k[index],
            self.seed[index],
            self.step[index],
            plan,
        )
        # A row whose models gave NaN, +inf or nothing finite is flagged with token -1 (it
        # rides the step's one copy to the host); the engine fails that row alone.
        broken = (
            torch.isnan(after).any(-1)
            | torch.isnan(before).any(-1)
            | ~torch.isfinite(logits.max(-1).values)
        )
        return torch.where(broken, torch.full_like(tokens, INVALID_TOKEN), tokens)
