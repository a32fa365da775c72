"""pagedllm._C.BlockManager in small scenarios with exact block ids (the rules are in
csrc/block_manager/block_manager.h): allocation order, eviction order, prefix hits, watermark, fork and
copy-on-write, errors, collision safety, and the SHA-256 / block-hash format against hashlib."""
import hashlib
import os
import struct

import numpy as np
import pytest
import torch  # noqa: F401 - _C links torch: import it first

from pagedllm import _C

BS = 4


def toks(n, start=0):
    return list(range(start, start + n))


def snapshot(bm, seq_ids):
    """Everything observable about the pool, to check that a failed call changed nothing."""
    return (
        bm._free_list(),
        bm._evictable(),
        [bm.ref_count(b) for b in range(bm.num_blocks)],
        {s: (bm.get_block_table(s), bm.num_tokens(s), bm.num_computed_tokens(s)) for s in seq_ids},
        bm.num_cached_blocks,
        bm.num_free_blocks,
    )


# ---------------------------------------------------------------------------------------------- hashing

@pytest.mark.parametrize("n", [0, 1, 3, 55, 56, 57, 63, 64, 65, 119, 120, 128, 1000, 100_003])
def test_sha256_matches_hashlib(n):
    data = os.urandom(n) if n != 3 else b"abc"
    assert _C._sha256_hex(data) == hashlib.sha256(data).hexdigest()


def test_sha256_known_vector():
    assert _C._sha256_hex(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def expected_block_hash(parent, salt, tokens):
    h = hashlib.sha256(parent if parent is not None else bytes(32))
    if parent is None and salt is not None:
        salt = salt.encode() if isinstance(salt, str) else salt
        h.update(struct.pack("<Q", len(salt)) + salt)
    h.update(struct.pack(f"<{len(tokens)}q", *tokens))
    return h.digest()


def test_block_hash_format():
    first = _C._block_hash(None, None, [1, 2, -3, 2**62])
    assert first == expected_block_hash(None, None, [1, 2, -3, 2**62])
    salted = _C._block_hash(None, b"tenant-a", [1, 2, -3, 2**62])
    assert salted == expected_block_hash(None, b"tenant-a", [1, 2, -3, 2**62]) != first
    assert _C._block_hash(None, "tenant-a", [1, 2, -3, 2**62]) == salted  # str salt = its UTF-8 bytes
    assert _C._block_hash(None, b"", [1, 2, -3, 2**62]) not in (first, salted)  # empty salt != no salt
    child = _C._block_hash(first, b"ignored after the first block", [5, 6, 7, 8])
    assert child == expected_block_hash(first, None, [5, 6, 7, 8])


# ---------------------------------------------------------------------------------------------- allocation order

def test_allocate_append_exact_ids():
    bm = _C.BlockManager(10, BS, enable_prefix_caching=False, watermark=0.0)
    assert bm.allocate(1, toks(10)) == 0
    assert bm.get_block_table(1) == [0, 1, 2]
    assert (bm.num_tokens(1), bm.num_used_blocks, bm.num_free_blocks, bm.usage) == (10, 3, 7, 0.3)
    assert bm.allocate(2, toks(4)) == 0
    assert bm.get_block_table(2) == [3]
    # seq 1's last block holds 2 tokens: 2 more fit, the 3rd crosses into a new block.
    assert bm.append_slots(1, [10, 11]) == []
    assert bm.get_block_table(1) == [0, 1, 2]
    assert bm.append_slots(1, [12]) == []
    assert bm.get_block_table(1) == [0, 1, 2, 4]
    # several tokens at once (chunked appends) take several blocks
    assert bm.append_slots(2, toks(6, 100)) == []
    assert bm.get_block_table(2) == [3, 5, 6]
    assert bm.num_tokens(1) == 13 and bm.num_tokens(2) == 10
    assert [bm.ref_count(b) for b in range(10)] == [1] * 7 + [0] * 3
    bm._check_invariants()


def test_free_list_fifo_tail_first_reuse():
    bm = _C.BlockManager(8, BS, enable_prefix_caching=False, watermark=0.0)
    bm.allocate(1, toks(8))   # [0, 1]
    bm.allocate(2, toks(9))   # [2, 3, 4]
    assert bm._free_list() == [5, 6, 7]
    bm.free(1)                # released tail first: 1, then 0, appended at the back
    assert bm._free_list() == [5, 6, 7, 1, 0]
    assert [bm.ref_count(b) for b in range(8)] == [0, 0, 1, 1, 1, 0, 0, 0]
    bm.allocate(3, toks(17))  # 5 blocks, from the front of the free list
    assert bm.get_block_table(3) == [5, 6, 7, 1, 0]
    bm.free(2)
    bm.free(3)
    assert bm._free_list() == [4, 3, 2, 0, 1, 7, 6, 5]
    assert bm.num_used_blocks == 0 and bm.num_free_blocks == 8
    bm._check_invariants()


def test_uncomputed_blocks_are_not_cached():
    bm = _C.BlockManager(8, BS, watermark=0.0)  # prefix caching on, but nothing marked computed
    bm.allocate(1, toks(8))
    bm.free(1)
    assert bm.num_cached_blocks == 0 and bm._evictable() == []
    assert bm._free_list() == [2, 3, 4, 5, 6, 7, 1, 0]


# ---------------------------------------------------------------------------------------------- eviction

def test_release_tail_first_and_lru_eviction_order():
    bm = _C.BlockManager(6, 2, watermark=0.0)
    assert bm.allocate(1, toks(7)) == 0          # blocks [0, 1, 2, 3]; 3 holds one token
    bm.mark_computed(1, 7)                        # full blocks 0, 1, 2 are cached
    assert bm.num_cached_blocks == 3
    bm.free(1)
    assert bm._evictable() == [2, 1, 0]           # tail first: 2 is the least recently released
    assert bm._free_list() == [4, 5, 3]           # the partial block was never cached
    assert bm.num_free_blocks == 6 and bm.num_used_blocks == 0
    # 5 fresh blocks: the free list first, then evict 2, then 1
    assert bm.allocate(2, toks(10, 100)) == 0
    assert bm.get_block_table(2) == [4, 5, 3, 2, 1]
    assert bm._evictable() == [0] and bm.num_cached_blocks == 1
    bm._check_invariants()
    # block 0 ([0, 1]) is still cached: the same first block hits it
    bm.free(2)
    assert bm.allocate(3, [0, 1, 55]) == 2
    assert bm.get_block_table(3)[0] == 0 and bm.ref_count(0) == 1
    assert 0 not in bm._evictable()
    bm._check_invariants()


def test_lru_across_sequences():
    bm = _C.BlockManager(4, 2, watermark=0.0)
    bm.allocate(1, toks(4, 0))     # [0, 1]
    bm.allocate(2, toks(4, 10))    # [2, 3]
    bm.mark_computed(1, 4)
    bm.mark_computed(2, 4)
    bm.free(2)                     # 3, 2 released first ...
    bm.free(1)                     # ... then 1, 0
    assert bm._evictable() == [3, 2, 1, 0]
    bm.allocate(3, toks(5, 50))    # 3 blocks: evicts 3, 2, 1
    assert bm.get_block_table(3) == [3, 2, 1]
    assert bm._evictable() == [0]
    # seq 1's first block survived
    bm.free(3)
    assert bm.allocate(4, [0, 1, 99]) == 2 and bm.get_block_table(4)[0] == 0


def test_hit_on_evictable_block_moves_it_out():
    bm = _C.BlockManager(8, BS, watermark=0.0)
    bm.allocate(1, toks(9))  # [0, 1, 2]
    bm.mark_computed(1, 9)
    bm.free(1)
    assert bm._evictable() == [1, 0] and bm.num_free_blocks == 8
    assert bm.allocate(2, toks(9)) == 8
    assert bm.get_block_table(2) == [0, 1, 3]
    assert bm._evictable() == [] and bm.num_free_blocks == 5
    assert (bm.ref_count(0), bm.ref_count(1)) == (1, 1)
    bm._check_invariants()


# ---------------------------------------------------------------------------------------------- prefix hits

def test_prefix_hit_shares_blocks():
    bm = _C.BlockManager(16, BS, watermark=0.0)
    assert bm.allocate(1, toks(10)) == 0          # [0, 1, 2]
    assert bm.num_cached_blocks == 0
    bm.mark_computed(1, 10)
    assert bm.num_cached_blocks == 2              # only full blocks are cached
    assert bm.allocate(2, toks(10)) == 8
    assert bm.get_block_table(2) == [0, 1, 3]
    assert [bm.ref_count(b) for b in range(4)] == [2, 2, 1, 1]
    assert bm.num_cached_tokens(2) == 8 and bm.num_computed_tokens(2) == 8
    # a prompt diverging inside block 1 hits block 0 only
    assert bm.allocate(3, toks(5) + [99] * 5) == 4
    assert bm.get_block_table(3) == [0, 4, 5]
    # a prompt diverging in block 0 hits nothing, even though its block 1 tokens are equal
    assert bm.allocate(4, [99] + toks(9, 1)) == 0
    assert bm.get_block_table(4) == [6, 7, 8]
    bm._check_invariants()


@pytest.mark.parametrize("n, cached", [(4, 0), (5, 4), (8, 4), (9, 8), (10, 8), (12, 8), (13, 12)])
def test_hit_cap_keeps_the_last_token_computed(n, cached):
    bm = _C.BlockManager(16, BS, watermark=0.0)
    bm.allocate(1, toks(16))
    bm.mark_computed(1, 16)
    # at most (n - 1) // block_size blocks hit: a prompt of exactly k blocks recomputes its last block
    assert bm.allocate(2, toks(n)) == cached
    assert bm.get_block_table(2)[: cached // BS] == bm.get_block_table(1)[: cached // BS]
    assert len(bm.get_block_table(2)) == -(-n // BS)


def test_only_computed_blocks_hit():
    bm = _C.BlockManager(16, BS, watermark=0.0)
    bm.allocate(1, toks(13))
    assert bm.allocate(2, toks(13)) == 0          # seq 1 is still prefilling: nothing to hit
    bm.mark_computed(1, 7)                        # block 0 written, block 1 only half
    assert bm.num_cached_blocks == 1
    assert bm.allocate(3, toks(13)) == 4
    bm.mark_computed(1, 13)
    assert bm.num_cached_blocks == 3
    assert bm.allocate(4, toks(13)) == 12
    bm.mark_computed(1, 5)                        # going back is a no-op
    assert bm.num_computed_tokens(1) == 13 and bm.num_cached_blocks == 3


def test_decode_blocks_become_cached():
    bm = _C.BlockManager(16, BS, watermark=0.0)
    bm.allocate(1, toks(6))
    bm.mark_computed(1, 6)
    assert bm.num_cached_blocks == 1
    bm.append_slots(1, [6])
    bm.mark_computed(1, 7)
    bm.append_slots(1, [7])
    assert bm.num_cached_blocks == 1              # block 1 is full but its last token is not computed
    bm.mark_computed(1, 8)
    assert bm.num_cached_blocks == 2
    assert bm.allocate(2, toks(9)) == 8
    assert bm.get_block_table(2)[:2] == bm.get_block_table(1)


def test_salt_isolation():
    bm = _C.BlockManager(32, BS, watermark=0.0)
    bm.allocate(1, toks(9), salt=b"alice")
    bm.mark_computed(1, 9)
    assert bm.allocate(2, toks(9), salt=b"bob") == 0
    assert bm.allocate(3, toks(9)) == 0
    assert bm.allocate(4, toks(9), salt=b"") == 0
    assert bm.allocate(5, toks(9), salt="alice") == 8   # a str salt is its UTF-8 bytes
    assert bm.get_block_table(5)[:2] == bm.get_block_table(1)[:2]
    assert bm.get_salt(5) == b"alice" and bm.get_salt(3) is None
    # unsalted and differently salted prompts cache separately
    bm.mark_computed(3, 9)
    assert bm.allocate(6, toks(9)) == 8
    assert bm.get_block_table(6)[:2] == bm.get_block_table(3)[:2]
    assert set(bm.get_block_table(6)).isdisjoint(bm.get_block_table(1))


def test_duplicate_registration_keeps_existing_entry():
    bm = _C.BlockManager(16, BS, watermark=0.0)
    bm.allocate(1, toks(9))          # [0, 1, 2]
    bm.allocate(2, toks(9))          # [3, 4, 5]: no hit, seq 1 is not computed yet
    bm.mark_computed(1, 9)
    bm.mark_computed(2, 9)           # same content: the entries of seq 1 stay, 3 and 4 are not cached
    assert bm.num_cached_blocks == 2
    bm.free(2)
    assert bm._evictable() == [] and bm._free_list()[-3:] == [5, 4, 3]
    assert bm.allocate(3, toks(9)) == 8
    assert bm.get_block_table(3)[:2] == [0, 1]


def test_chain_continues_through_an_existing_entry():
    bm = _C.BlockManager(16, BS, watermark=0.0)
    bm.allocate(1, toks(5))          # [0, 1]
    bm.allocate(2, toks(9))          # [2, 3, 4]
    bm.mark_computed(1, 5)           # caches block 0 = tokens 0..3
    bm.mark_computed(2, 9)           # its block 0 duplicates block 0; block 3 is cached as block 0's child
    assert bm.num_cached_blocks == 2
    assert bm.allocate(3, toks(9)) == 8
    assert bm.get_block_table(3)[:2] == [0, 3]


def test_numpy_tokens_equal_list_tokens():
    bm = _C.BlockManager(16, BS, watermark=0.0)
    bm.allocate(1, np.arange(9, dtype=np.int64))
    bm.mark_computed(1, 9)
    assert bm.allocate(2, np.arange(9, dtype=np.int32)) == 8
    assert bm.allocate(3, [np.int64(i) for i in range(9)]) == 8
    view = np.repeat(np.arange(9, dtype=np.int64), 2)[::2]
    assert not view.flags.c_contiguous
    assert bm.allocate(4, view) == 8
    bm.append_slots(4, np.array([7], dtype=np.int64))
    assert bm.num_tokens(4) == 10


def test_reset_prefix_cache():
    bm = _C.BlockManager(8, BS, watermark=0.0)
    bm.allocate(1, toks(9))                      # [0, 1, 2]
    bm.allocate(2, toks(5, 100))                 # [3, 4]
    bm.mark_computed(1, 9)
    bm.mark_computed(2, 5)
    bm.free(1)
    assert bm._evictable() == [1, 0] and bm.num_cached_blocks == 3
    assert bm.reset_prefix_cache() is False      # block 3 is in use by seq 2 and stays cached
    assert bm._evictable() == [] and bm.num_cached_blocks == 1
    assert bm._free_list() == [5, 6, 7, 2, 1, 0]
    assert bm.allocate(3, toks(9)) == 0
    bm.free(2)
    bm.free(3)
    assert bm.reset_prefix_cache() is True and bm.num_cached_blocks == 0
    assert bm.num_free_blocks == 8
    bm._check_invariants()


def test_prefix_caching_disabled():
    bm = _C.BlockManager(8, BS, enable_prefix_caching=False, watermark=0.0)
    assert not bm.enable_prefix_caching
    bm.allocate(1, toks(9))
    bm.mark_computed(1, 9)
    assert bm.allocate(2, toks(9)) == 0 and bm.num_cached_blocks == 0
    assert set(bm.get_block_table(1)).isdisjoint(bm.get_block_table(2))


# ---------------------------------------------------------------------------------------------- watermark

def test_watermark_refuses_admission():
    bm = _C.BlockManager(100, BS, watermark=0.05)
    assert bm.watermark_blocks == 5
    assert bm.can_allocate(toks(95 * BS))
    assert not bm.can_allocate(toks(95 * BS + 1))      # 96 blocks would leave 4 < 5
    assert _C.BlockManager(100, BS, watermark=0.019).watermark_blocks == 1  # int(1.9)
    bm.allocate(1, toks(50 * BS))
    assert bm.can_allocate(toks(45 * BS, 10_000))
    assert not bm.can_allocate(toks(46 * BS, 10_000))
    # allocate only fails when the blocks are not there: the watermark is an admission policy
    bm.allocate(2, toks(46 * BS, 10_000))
    assert bm.num_free_blocks == 4
    assert bm.can_append(2, 4 * BS) and not bm.can_append(2, 4 * BS + 1)


def test_watermark_counts_hits_on_used_blocks_as_free():
    bm = _C.BlockManager(100, BS, watermark=0.1)
    bm.allocate(1, toks(50 * BS))
    bm.mark_computed(1, 50 * BS)
    # 91 blocks of which 50 hit blocks in use: 41 new; 50 - 41 = 9 < 10
    assert not bm.can_allocate(toks(90 * BS + 1))
    # 90 blocks, 40 new: 50 - 40 = 10
    assert bm.can_allocate(toks(89 * BS + 1))


def test_watermark_hit_on_evictable_block_costs_a_block():
    bm = _C.BlockManager(20, BS, watermark=0.1)   # 2 watermark blocks
    bm.allocate(1, toks(16))                      # [0..3]
    bm.mark_computed(1, 16)
    bm.free(1)                                    # 4 evictable
    bm.allocate(2, toks(14 * BS, 1000))           # 14 of the 16 free-list blocks
    assert bm.num_free_blocks == 6
    # 5 blocks, 4 of them hits on evictable blocks: they leave the free pool, so 6 - 5 = 1 < 2
    assert not bm.can_allocate(toks(17))
    assert bm.allocate(3, toks(17)) == 16
    assert bm.get_block_table(3) == [0, 1, 2, 3, 18]
    assert bm.num_free_blocks == 1


# ---------------------------------------------------------------------------------------------- fork / CoW

def test_fork_shares_and_copy_on_write():
    bm = _C.BlockManager(8, BS, watermark=0.0)
    bm.allocate(1, toks(6))                       # [0, 1]; block 1 holds 2 tokens
    bm.fork(1, 2)
    bm.fork(1, 3)
    assert bm.get_block_table(2) == bm.get_block_table(3) == [0, 1]
    assert (bm.ref_count(0), bm.ref_count(1)) == (3, 3)
    assert bm.num_used_blocks == 2 and bm.num_tokens(3) == 6
    assert bm.can_append(2, 1)
    assert bm.append_slots(2, [100]) == [(1, 2)]  # shared partial block: copy it first
    assert bm.get_block_table(2) == [0, 2]
    assert (bm.ref_count(0), bm.ref_count(1), bm.ref_count(2)) == (3, 2, 1)
    assert bm.append_slots(2, [101]) == []        # now private
    assert bm.append_slots(3, [200, 201, 202]) == [(1, 3)]  # copy, then a new block
    assert bm.get_block_table(3) == [0, 3, 4]
    assert bm.append_slots(1, [300]) == []        # the last holder writes in place
    assert bm.get_block_table(1) == [0, 1]
    assert [bm.ref_count(b) for b in range(5)] == [3, 1, 1, 1, 1]
    bm.free(1)
    assert [bm.ref_count(b) for b in range(5)] == [2, 0, 1, 1, 1]
    bm.free(3)
    bm.free(2)
    assert bm.num_used_blocks == 0
    bm._check_invariants()


def test_fork_full_last_block_needs_no_copy():
    bm = _C.BlockManager(8, BS, watermark=0.0)
    bm.allocate(1, toks(8))
    bm.fork(1, 2)
    assert bm.append_slots(2, [8]) == []
    assert bm.get_block_table(2) == [0, 1, 2] and bm.get_block_table(1) == [0, 1]


def test_fork_copies_counters_and_cached_state():
    bm = _C.BlockManager(16, BS, watermark=0.0)
    bm.allocate(1, toks(9))
    bm.mark_computed(1, 9)
    assert bm.allocate(2, toks(10)) == 8
    bm.fork(2, 3)
    assert bm.num_cached_tokens(3) == 8 and bm.num_computed_tokens(3) == 8
    assert bm.get_num_common_prefix_blocks([1, 2, 3]) == 2
    assert bm.get_num_common_prefix_blocks([2, 3]) == 3
    assert bm.get_num_common_prefix_blocks([2]) == 3


def test_can_append_counts_the_copy():
    bm = _C.BlockManager(3, BS, watermark=0.0)
    bm.allocate(1, toks(6))   # [0, 1]
    bm.fork(1, 2)
    assert bm.can_append(2, 2)          # the copy takes the last block
    assert not bm.can_append(2, 3)      # copy + a new block
    before = snapshot(bm, [1, 2])
    with pytest.raises(_C.NoFreeBlocksError, match="needs 2 free blocks, only 1 available"):
        bm.append_slots(2, [1, 2, 3])
    assert snapshot(bm, [1, 2]) == before


# ---------------------------------------------------------------------------------------------- errors

def test_errors_leave_state_unchanged():
    bm = _C.BlockManager(4, BS, watermark=0.0)
    bm.allocate(1, toks(9))                       # 3 of 4 blocks
    before = snapshot(bm, [1])
    with pytest.raises(_C.NoFreeBlocksError, match="needs 2 free blocks, only 1 available"):
        bm.allocate(2, toks(5))
    assert issubclass(_C.NoFreeBlocksError, RuntimeError)
    assert snapshot(bm, [1]) == before and not bm.has_seq(2)
    with pytest.raises(_C.NoFreeBlocksError):
        bm.append_slots(1, toks(8))
    assert snapshot(bm, [1]) == before
    with pytest.raises(ValueError, match="already exists"):
        bm.allocate(1, toks(1))
    with pytest.raises(ValueError, match="empty"):
        bm.allocate(3, [])
    with pytest.raises(ValueError, match="empty"):
        bm.can_allocate([])
    with pytest.raises(ValueError):
        bm.mark_computed(1, 10)
    with pytest.raises(ValueError):
        bm.mark_computed(1, -1)
    with pytest.raises(ValueError):
        bm.can_append(1, -1)
    assert snapshot(bm, [1]) == before
    bm._check_invariants()


def test_unknown_sequence_and_double_free():
    bm = _C.BlockManager(4, BS)
    bm.allocate(7, toks(3))
    bm.free(7)
    with pytest.raises(KeyError, match="unknown sequence 7"):
        bm.free(7)
    for call in (lambda: bm.get_block_table(7), lambda: bm.append_slots(7, [1]), lambda: bm.can_append(7),
                 lambda: bm.mark_computed(7, 1), lambda: bm.num_tokens(7), lambda: bm.num_cached_tokens(7),
                 lambda: bm.fork(7, 8), lambda: bm.get_num_common_prefix_blocks([7])):
        with pytest.raises(KeyError, match="unknown sequence 7"):
            call()
    assert not bm.has_seq(7) and 7 not in bm and bm.num_free_blocks == 4
    bm.allocate(1, toks(2))
    with pytest.raises(ValueError, match="already exists"):
        bm.fork(1, 1)


def test_bad_arguments():
    for args in [(0, 16), (-1, 16), (8, 0)]:
        with pytest.raises(ValueError):
            _C.BlockManager(*args)
    for wm in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError):
            _C.BlockManager(8, 16, watermark=wm)
    with pytest.raises(ValueError):
        _C.BlockManager(8, 16, _debug_hash_bits=257)
    bm = _C.BlockManager(8, BS)
    with pytest.raises(ValueError):
        bm.ref_count(8)
    with pytest.raises(ValueError):
        bm.ref_count(-1)
    with pytest.raises(TypeError):
        bm.allocate(1, [1.5, 2.0])
    with pytest.raises(TypeError):
        bm.allocate(1, "abc")
    with pytest.raises(TypeError):
        bm.allocate(1, np.ones(3, dtype=np.float32))
    with pytest.raises(ValueError):
        bm.allocate(1, np.ones((2, 2), dtype=np.int64))
    with pytest.raises(TypeError):
        bm.allocate(1, [1, 2], salt=3)
    assert bm.num_seqs == 0 and bm.num_free_blocks == 8


# ---------------------------------------------------------------------------------------------- collisions

@pytest.mark.parametrize("bits", [0, 1, 8])
def test_forced_collisions_never_share_different_prompts(bits):
    bm = _C.BlockManager(64, BS, watermark=0.0, _debug_hash_bits=bits)
    prompts = {1: toks(13, 0), 2: toks(13, 100), 3: toks(4, 0) + toks(9, 100), 4: toks(13, 0)[::-1]}
    for sid, p in prompts.items():                   # all allocated before any is computed: no hits
        assert bm.allocate(sid, p) == 0
    for sid in prompts:
        bm.mark_computed(sid, 13)
    # equal hash keys, yet every distinct content is cached once; seq 3's first block duplicates
    # seq 1's, so only its blocks 1 and 2 are new entries (chained to seq 1's block 0)
    assert bm.num_cached_blocks == 11
    tables = {sid: bm.get_block_table(sid) for sid in prompts}
    for sid in (1, 2, 4):                            # same prompt: full hits on the same blocks
        assert bm.allocate(10 + sid, prompts[sid]) == 12
        assert bm.get_block_table(10 + sid)[:3] == tables[sid][:3]
    assert bm.allocate(13, prompts[3]) == 12
    assert bm.get_block_table(13)[:3] == tables[1][:1] + tables[3][1:3]
    # sharing only the first block with seq 1 hits that block only, never seq 3's later blocks
    assert bm.allocate(20, toks(4, 0) + toks(9, 100)[::-1]) == 4
    assert bm.allocate(21, toks(13, 0), salt=b"s") == 0
    # no block is shared by two sequences whose tokens differ up to the end of that block
    for a in list(prompts) + [11, 12, 13, 14, 20, 21]:
        for b in list(prompts) + [11, 12, 13, 14, 20, 21]:
            for i, (x, y) in enumerate(zip(bm.get_block_table(a), bm.get_block_table(b))):
                if x == y:
                    assert bm.get_salt(a) == bm.get_salt(b)
            ta, tb = bm.get_block_table(a), bm.get_block_table(b)
            for i, blk in enumerate(ta):
                if blk in tb:
                    assert tb.index(blk) == i
    bm._check_invariants()


def test_stale_child_of_a_reregistered_parent_never_hits():
    # bs 2, every hash key equal. Block 3 ([3, 4] after [1, 2]) stays cached while its parent block 0
    # is evicted and re-registered as [5, 6]: a lookup of [5, 6, 3, 4, ...] must not take block 3,
    # whose KV was computed after [1, 2]. Only the parent's registration generation tells them apart.
    bm = _C.BlockManager(10, 2, watermark=0.0, _debug_hash_bits=0)
    bm.allocate(1, [1, 2, 9])                 # X: [0, 1]
    bm.allocate(2, [1, 2, 3, 4, 9])           # S: [2, 3, 4] (X not computed yet: no hit)
    bm.mark_computed(1, 3)                    # caches block 0 = [1, 2]
    bm.mark_computed(2, 5)                    # S's block 2 duplicates block 0; block 3 = [3, 4] with parent 0
    assert bm.num_cached_blocks == 2
    bm.free(1)
    assert bm._evictable() == [0] and bm._free_list() == [5, 6, 7, 8, 9, 1]
    bm.allocate(3, [7] * 12)                  # F takes the whole free list
    assert bm.allocate(4, [5, 6]) == 0        # T evicts block 0 ...
    assert bm.get_block_table(4) == [0]
    bm.mark_computed(4, 2)                    # ... and registers it as [5, 6]
    bm.free(3)
    assert bm.allocate(5, [5, 6, 3, 4, 9]) == 2
    assert bm.get_block_table(5) == [0, 1, 9]
    # [1, 2] is no longer cached anywhere (S's copy was a duplicate), so its old child is unreachable
    assert bm.allocate(6, [1, 2, 3, 4, 9]) == 0
    assert 3 not in bm.get_block_table(6)
    bm._check_invariants()


# ---------------------------------------------------------------------------------------------- helpers

def test_fill_block_tables():
    bm = _C.BlockManager(16, BS, watermark=0.0)
    bm.allocate(1, toks(9))
    bm.allocate(2, toks(2, 50))
    out = np.full((2, 4), 77, dtype=np.int32)
    bm.fill_block_tables([2, 1], out, pad=-1)
    assert out.tolist() == [[3, -1, -1, -1], [0, 1, 2, -1]]
    with pytest.raises(ValueError, match="room"):
        bm.fill_block_tables([1], np.zeros((1, 2), dtype=np.int32))
    with pytest.raises(TypeError):
        bm.fill_block_tables([1], np.zeros((1, 4), dtype=np.int64))
    with pytest.raises(KeyError):
        bm.fill_block_tables([9], np.zeros((1, 4), dtype=np.int32))


def test_properties_and_repr():
    bm = _C.BlockManager(10, 16, watermark=0.25)
    assert (bm.num_blocks, bm.block_size, bm.watermark_blocks, bm.enable_prefix_caching) == (10, 16, 2, True)
    bm.allocate(3, toks(20))
    assert (bm.num_seqs, bm.num_used_blocks, bm.num_free_blocks, bm.usage) == (1, 2, 8, 0.2)
    assert "used=2" in repr(bm)
