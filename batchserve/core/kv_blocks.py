"""The KV block manager: which store blocks each row owns, and the prefix cache over them.

Plain data, no tensors: the runner's store is an array of `num_blocks` blocks of `block_size`
token rows, and this module decides which block ids a row's positions map to. Block 0 is
reserved: padding and unused table entries point at it, and it is never handed out.

Prefix caching (vLLM's automatic prefix caching, SGLang's RadixAttention): a full block of
prompt tokens is keyed by a SHA-256 chained over its parent block's key, its tokens and an
extra key (whatever else changes its contents: the pair, a request's `cache_salt`; built by
`cache_extra_key`). A row whose prompt starts with cached blocks references them instead of
computing them again, so the n samples of a prompt, every alpha of it and any request sharing
a system prompt share one copy.
Blocks carry reference counts; a block nobody references keeps its key (a later prompt can
revive it) until it is needed for new data, oldest first (LRU). A block in use is never
evicted. Only full prompt blocks are shared: the partial last block and generated tokens are
always a row's own, so no shared block is ever written twice.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

BlockKey = bytes


def kv_blocks(num_tokens: int, block_size: int) -> int:
    """KV blocks a row of num_tokens reserves (at least one)."""
    return max(1, math.ceil(num_tokens / block_size))


def cache_extra_key(
    model_ids: Sequence[str] = (),
    cache_salt: str | None = None,
    adapters: tuple[str | None, str | None] = (None, None),
) -> bytes:
    """Everything besides the tokens that decides a block's KV, as the bytes every key of a
    row chains from: the pair (two models give other keys and values for the same tokens) and
    the request's `cache_salt` (a tenant's prompts then never hit another's, so cache timing
    cannot tell one tenant what another sent). One function, so a new part (e.g. the row's
    adapters) reaches every key. JSON keeps the parts apart: ("ab", "c") != ("a", "bc").
    `adapters`: a LoRA pair's row, its (after, before) adapter names (the pair's id is the
    base's alone, and each adapter changes the KV)."""
    parts: dict[str, object] = {"models": list(model_ids), "cache_salt": cache_salt}
    if adapters != (None, None):
        parts["adapters"] = list(adapters)
    return json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()


def block_keys(
    token_ids: Sequence[int], block_size: int, extra_key: bytes = b"", limit: int | None = None
) -> list[BlockKey]:
    """The chained keys of the full blocks of token_ids (at most `limit` of them)."""
    num_full = len(token_ids) // block_size
    if limit is not None:
        num_full = min(num_full, limit)
    keys: list[BlockKey] = []
    parent = hashlib.sha256(b"batchserve-kv" + extra_key).digest()
    for i in range(num_full):
        chunk = token_ids[i * block_size : (i + 1) * block_size]
        parent = hashlib.sha256(parent + struct.pack(f"<{len(chunk)}q", *chunk)).digest()
        keys.append(parent)
    return keys


@dataclass
class Allocation:
    """A row's blocks: `block_ids[:num_cached_blocks]` came from the cache, computed already."""

    block_ids: list[int]
    num_cached_blocks: int
    keys: list[BlockKey]  # keys of the row's full prompt blocks (registered as they fill)
    num_registered: int = 0  # how many of `keys` are registered (cached hits count as registered)


class BlockManager:
    """Allocate and free KV blocks by reference count, with an optional prefix cache."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_cache: bool = True) -> None:
        if num_blocks < 2 or block_size < 1:
            raise ValueError("a block manager needs >= 2 blocks (one is reserved) of >= 1 token")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_cache = enable_prefix_cache
        self._ref_counts = [0] * num_blocks
        self._key_of: dict[int, BlockKey] = {}
        self._block_of: dict[BlockKey, int] = {}
        # Unreferenced blocks, least recently freed first; cached ones keep their key in here.
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(1, num_blocks))
        self.num_queried_tokens = 0  # prompt tokens looked up in the cache
        self.num_hit_tokens = 0  # of which were found
        self.num_evicted_blocks = 0  # cached blocks whose key was dropped to reuse the block

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take now (free ones and unreferenced cached ones)."""
        return len(self._free)

    @property
    def capacity_tokens(self) -> int:
        """Tokens one row can ever hold: every block but the reserved one."""
        return (self.num_blocks - 1) * self.block_size

    @property
    def num_cached_blocks(self) -> int:
        return len(self._block_of)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def _cached_prefix(self, keys: list[BlockKey]) -> list[int]:
        hits: list[int] = []
        for key in keys:
            block = self._block_of.get(key)
            if block is None:
                break
            hits.append(block)
        return hits

    def prompt_keys(self, prompt_ids: Sequence[int], extra_key: bytes = b"") -> list[BlockKey]:
        """Keys of a prompt's full blocks (none with the cache off): computed once per row."""
        if not self.enable_prefix_cache:
            return []
        return block_keys(prompt_ids, self.block_size, extra_key)

    def _hits(self, keys: list[BlockKey], num_prompt_tokens: int) -> list[int]:
        # A prompt that hits entirely must still compute its last token (for the next-token
        # logits), so its last block is never taken from the cache: at most (len - 1) // size.
        return self._cached_prefix(keys[: (num_prompt_tokens - 1) // self.block_size])

    def blocks_needed(self, keys: list[BlockKey], num_prompt_tokens: int, num_tokens: int) -> int:
        """Free blocks a row reserving num_tokens in all would take now (its prompt's cached
        blocks are shared, and count only if nobody holds them)."""
        hits = self._hits(keys, num_prompt_tokens)
        revived = sum(1 for b in hits if self._ref_counts[b] == 0)
        return kv_blocks(num_tokens, self.block_size) - len(hits) + revived

    def allocate(
        self, keys: list[BlockKey], num_prompt_tokens: int, num_tokens: int
    ) -> Allocation | None:
        """Reserve num_tokens for a row whose prompt has these block keys (`prompt_keys`), or
        None when the free blocks do not suffice (nothing changes then)."""
        hits = self._hits(keys, num_prompt_tokens)
        total = kv_blocks(num_tokens, self.block_size)
        revived = sum(1 for b in hits if self._ref_counts[b] == 0)
        if total - len(hits) + revived > self.num_free:
            return None
        for block in hits:
            if self._ref_counts[block] == 0:
                del self._free[block]
            self._ref_counts[block] += 1
        fresh = [self._take_free() for _ in range(total - len(hits))]
        if self.enable_prefix_cache:
            self.num_queried_tokens += num_prompt_tokens
            self.num_hit_tokens += len(hits) * self.block_size
        return Allocation(hits + fresh, len(hits), keys, len(hits))

    def _take_free(self) -> int:
        block, _ = self._free.popitem(last=False)
        key = self._key_of.pop(block, None)
        if key is not None and self._block_of.get(key) == block:
            del self._block_of[key]  # evicted: its contents are about to be overwritten
            self.num_evicted_blocks += 1
        self._ref_counts[block] = 1
        return block

    def register_computed(self, allocation: Allocation, num_computed_tokens: int) -> None:
        """Make the row's full prompt blocks covered by num_computed_tokens findable.

        Called when a step is planned: a block written in this step is readable by any row in
        the same step, since each layer writes all new keys before any query reads them."""
        full = min(num_computed_tokens // self.block_size, len(allocation.keys))
        for i in range(allocation.num_registered, full):
            key, block = allocation.keys[i], allocation.block_ids[i]
            if key not in self._block_of:
                self._block_of[key] = block
                self._key_of[block] = key
        allocation.num_registered = max(allocation.num_registered, full)

    def free(self, allocation: Allocation) -> None:
        """Drop a row's references; its blocks go to the free queue, last block first, so a
        prompt's tail is evicted before its head (which more prompts share)."""
        for block in reversed(allocation.block_ids):
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                self._free[block] = None
        allocation.block_ids = []

    def reset_prefix_cache(self) -> None:
        """Forget every cached key (blocks in use stay in use)."""
        self._key_of.clear()
        self._block_of.clear()
