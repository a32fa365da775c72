"""truncate(seq, n): the rolled-back slots of speculative decoding's rejected drafts."""
import pytest

from pagedllm.engine.block_manager import BlockManager


def test_truncate_releases_emptied_blocks_tail_first():
    bm = BlockManager(8, 16, enable_prefix_caching=True)
    bm.allocate(1, list(range(20)))               # blocks 0, 1
    bm.mark_computed(1, 20)
    bm.append_slots(1, list(range(100, 130)))     # 50 tokens: blocks 0..3
    assert bm.get_block_table(1) == [0, 1, 2, 3]
    bm.truncate(1, 21)
    assert bm.get_block_table(1) == [0, 1] and bm.num_tokens(1) == 21
    assert bm._free_list()[-2:] == [3, 2]         # released tail first, to the back of the free list
    bm._check_invariants()
    # The slots come back for other tokens; the cache only ever registers the kept, computed ones.
    bm.append_slots(1, [7] * 11)
    bm.mark_computed(1, 32)
    assert bm.num_cached_blocks == 2
    bm.free(1)
    assert bm.num_used_blocks == 0
    bm._check_invariants()


def test_truncate_cannot_drop_computed_tokens():
    bm = BlockManager(4, 16)
    bm.allocate(1, list(range(10)))
    bm.mark_computed(1, 8)
    with pytest.raises(ValueError, match="outside"):
        bm.truncate(1, 7)
    with pytest.raises(ValueError, match="outside"):
        bm.truncate(1, 11)
    bm.truncate(1, 8)
    assert bm.num_tokens(1) == 8


def test_truncated_full_block_is_not_hit_with_dropped_tokens():
    bm = BlockManager(8, 16)
    bm.allocate(1, list(range(10)))
    bm.mark_computed(1, 10)
    bm.append_slots(1, [999] * 10)                # block 0 full of drafts 999
    bm.truncate(1, 12)                            # two drafts accepted, the rest rolled back
    bm.append_slots(1, list(range(12, 16)))       # the real tokens fill block 0
    bm.mark_computed(1, 16)
    # The kept content is cached; the dropped drafts' content never was.
    kept = list(range(10)) + [999, 999] + list(range(12, 16))
    assert bm.allocate(2, kept + [1]) == 16
    assert bm.allocate(3, list(range(10)) + [999] * 6 + [1]) == 0
