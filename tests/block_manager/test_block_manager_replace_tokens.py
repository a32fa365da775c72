"""replace_tokens(seq, start, ids): multi-step decoding reserves a few steps' slots before it samples their tokens."""
import pytest

from pagedllm.engine.block_manager import BlockManager


def test_replaced_tokens_are_what_the_prefix_cache_registers():
    bm = BlockManager(8, 16, enable_prefix_caching=True)
    bm.allocate(1, list(range(14)))
    bm.mark_computed(1, 14)
    bm.append_slots(1, [0] * 6)                     # placeholders for positions 14..19 (into block 1)
    assert bm.get_block_table(1) == [0, 1]
    bm.replace_tokens(1, 14, list(range(14, 20)))
    bm.mark_computed(1, 20)
    bm._check_invariants()
    # The full block 0 was registered with the real tokens: a prompt with them hits it, one with the
    # placeholders does not.
    assert bm.allocate(2, list(range(16)) + [99]) == 16
    assert bm.allocate(3, list(range(14)) + [0, 0, 1]) == 0
    bm._check_invariants()


def test_replace_drops_hashes_of_blocks_not_yet_computed():
    bm = BlockManager(8, 16)
    bm.allocate(1, list(range(40)))                 # 2 full blocks + 8 tokens, hashes may be known ahead
    bm.mark_computed(1, 16)
    bm.replace_tokens(1, 16, [7] * 24)
    bm.mark_computed(1, 32)
    bm._check_invariants()
    assert bm.allocate(2, list(range(16)) + [7] * 16 + [1]) == 32  # block 1 cached with the new tokens
    assert bm.allocate(3, list(range(33))) == 16


def test_replace_tokens_bounds():
    bm = BlockManager(4, 16)
    bm.allocate(1, list(range(10)))
    bm.mark_computed(1, 8)
    with pytest.raises(ValueError, match="outside"):
        bm.replace_tokens(1, 7, [1])                # below the computed prefix
    with pytest.raises(ValueError, match="outside"):
        bm.replace_tokens(1, 9, [1, 2])             # past the reserved slots
    with pytest.raises(KeyError):
        bm.replace_tokens(5, 0, [1])
    bm.replace_tokens(1, 8, [5, 6])
    assert bm.num_tokens(1) == 10
