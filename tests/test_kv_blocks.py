"""The block manager: reference counts, the prefix cache's keys, LRU eviction."""

from __future__ import annotations

import pytest

from batchserve.core.kv_blocks import BlockManager, block_keys


def prompt(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


def test_keys_chain_over_the_prefix_and_the_extra_key() -> None:
    a = block_keys(prompt(12), 4)
    assert len(a) == 3 and len(set(a)) == 3
    assert block_keys(prompt(11), 4) == a[:2]  # only full blocks have keys
    changed_head = block_keys([99, *prompt(11, 1)], 4)
    assert all(x != y for x, y in zip(a, changed_head, strict=True))  # every later key moves
    assert block_keys(prompt(12), 4, extra_key=b"adapter") != a
    assert block_keys(prompt(12), 4) == a  # deterministic, not Python's salted hash


def test_allocation_reserves_whole_rows_and_refuses_without_changing_anything() -> None:
    blocks = BlockManager(num_blocks=6, block_size=4, enable_prefix_cache=False)
    assert blocks.num_free == 5
    first = blocks.allocate([], 3, 9)  # 9 tokens: 3 blocks
    assert first is not None and len(first.block_ids) == 3 and 0 not in first.block_ids
    assert blocks.allocate([], 3, 9) is None and blocks.num_free == 2
    blocks.free(first)
    assert blocks.num_free == 5


def test_a_cached_prefix_is_shared_and_its_blocks_counted_once() -> None:
    blocks = BlockManager(num_blocks=20, block_size=4)
    ids = prompt(10)
    keys = blocks.prompt_keys(ids)
    first = blocks.allocate(keys, 10, 14)
    blocks.register_computed(first, 10)
    assert blocks.blocks_needed(keys, 10, 14) == 2  # 4 blocks, 2 of them shared
    second = blocks.allocate(keys, 10, 14)
    assert second.block_ids[:2] == first.block_ids[:2] and second.num_cached_blocks == 2
    assert set(second.block_ids[2:]).isdisjoint(first.block_ids)
    assert blocks.ref_count(first.block_ids[0]) == 2
    assert blocks.num_hit_tokens == 8 and blocks.num_queried_tokens == 20


def test_a_prompt_that_hits_entirely_still_computes_its_last_block() -> None:
    blocks = BlockManager(num_blocks=20, block_size=4)
    ids = prompt(8)  # exactly two full blocks
    keys = blocks.prompt_keys(ids)
    first = blocks.allocate(keys, 8, 10)
    blocks.register_computed(first, 8)
    assert blocks.num_cached_blocks == 2
    second = blocks.allocate(keys, 8, 10)
    assert second.num_cached_blocks == 1  # the last block is computed again, in its own block
    assert second.block_ids[1] != first.block_ids[1]


def test_freed_blocks_keep_their_keys_until_reused_oldest_first() -> None:
    blocks = BlockManager(num_blocks=5, block_size=2)  # 4 usable blocks
    a_keys = blocks.prompt_keys(prompt(5))
    a = blocks.allocate(a_keys, 5, 5)  # 3 blocks
    a_blocks = list(a.block_ids)
    blocks.register_computed(a, 5)
    blocks.free(a)
    assert a.block_ids == []
    assert blocks.num_free == 4 and blocks.num_cached_blocks == 2
    revived = blocks.allocate(a_keys, 5, 5)  # the same prompt again: both full blocks revive
    assert revived.num_cached_blocks == 2 and revived.block_ids[:2] == a_blocks[:2]
    blocks.free(revived)
    # A different prompt needs all 4 blocks: the cached ones are evicted (tail first freed).
    assert blocks.num_evicted_blocks == 0
    other = blocks.allocate(blocks.prompt_keys(prompt(8, 100)), 8, 8)
    assert other is not None and blocks.num_cached_blocks == 0
    assert blocks.num_evicted_blocks == 2
    assert blocks.allocate(a_keys, 5, 5) is None


def test_a_block_in_use_is_never_evicted() -> None:
    blocks = BlockManager(num_blocks=5, block_size=2)
    keys = blocks.prompt_keys(prompt(5))
    holder = blocks.allocate(keys, 5, 5)
    blocks.register_computed(holder, 5)
    assert blocks.allocate(blocks.prompt_keys(prompt(4, 50)), 4, 4) is None  # 1 free, needs 2
    assert blocks.num_cached_blocks == 2 and blocks.ref_count(holder.block_ids[0]) == 1


def test_blocks_become_findable_only_as_far_as_they_are_computed() -> None:
    blocks = BlockManager(num_blocks=30, block_size=4)
    ids = prompt(20)
    keys = blocks.prompt_keys(ids)
    first = blocks.allocate(keys, 20, 24)
    blocks.register_computed(first, 9)  # a chunk of 9 tokens: two full blocks
    assert blocks.allocate(keys, 20, 24).num_cached_blocks == 2
    blocks.reset_prefix_cache()
    assert blocks.allocate(keys, 20, 24).num_cached_blocks == 0


def test_nonsense_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="reserved"):
        BlockManager(num_blocks=1, block_size=4)
