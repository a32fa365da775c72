"""paged_prefill_attention (CPU and CUDA kernels) against the plain-torch reference
paged_prefill_attention_native in python/pagedllm/layers/attention.py.

Every case builds a paged cache whose blocks are shuffled, fills only the slots the sequences
use, and poisons everything else with NaN: unused slots of a sequence's last block, spare blocks,
and the block-table columns past each sequence's blocks (they point at NaN blocks). A kernel that
reads a key it must not see, or leaves an output row unwritten (outputs start as NaN), fails.
"""
import math

import pytest
import torch

from testing_utils import KERNEL_DEVICES, DTYPES, assert_close_to_row_scale, non_contiguous_rows

from pagedllm import _ops
from pagedllm.layers.attention import paged_attention_native, paged_prefill_attention_native

HEAD_SIZES = [64, 80, 96, 128, 256]
BLOCK_SIZES = [16, 32]
# Query lengths 1 / 7 / 83 over cached prefixes 0 / 16 / 37: single tokens, partial blocks, a
# prefix that ends mid-block, a tile that is not a multiple of any kernel tile.
Q_LENS = [1, 7, 83]
CTX_LENS = [0, 16, 37]

# Error allowed against the reference (which computes in fp32 and rounds to the dtype), relative to each output
# row's own scale (testing_utils.assert_close_to_row_scale): attention outputs shrink as the context grows, so an
# absolute tolerance would be loose exactly where a long-context bug shows.
TOLERANCES = {
    # fp32 on both sides; only summation order and the kernels' exp2 (CPU: a 2e-7 polynomial,
    # CUDA: exp2f) differ (measured on the CPU: <= 2e-6).
    torch.float32: 2e-5,
    # The output is rounded to bf16 on both sides (8-bit mantissa: one ulp is 0.4% relative, so a
    # value can round the other way), and the CUDA kernel also feeds P to the tensor cores as bf16:
    # about 2.5 ulps of the row scale (measured on the CPU: <= 2.7e-3).
    torch.bfloat16: 1e-2,
    # Same with fp16's 11-bit mantissa (one ulp = 0.05% relative; measured on the CPU: <= 4e-4).
    torch.float16: 1.5e-3,
}


def make_case(q_lens, ctx_lens, num_heads, num_kv_heads, head_size, block_size, dtype, device, seed=0):
    """Returns query, key_cache, value_cache, block_tables, query_start_loc, seq_lens (on device)."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [q + c for q, c in zip(q_lens, ctx_lens)]
    blocks_per_seq = [math.ceil(s / block_size) for s in seq_lens]
    num_spare = 3  # blocks no sequence owns: they stay NaN
    num_blocks = sum(blocks_per_seq) + num_spare
    shape = (num_blocks, num_kv_heads, block_size, head_size)
    key_cache = torch.full(shape, float("nan"))
    value_cache = torch.full(shape, float("nan"))
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    spare = perm[-num_spare:]
    max_blocks = max(blocks_per_seq, default=0) + 2
    block_tables = torch.tensor([spare[i % num_spare] for i in range(len(q_lens) * max_blocks)],
                                dtype=torch.int32).reshape(len(q_lens), max_blocks)
    next_block = 0
    for s, seq_len in enumerate(seq_lens):
        for b in range(blocks_per_seq[s]):
            block_tables[s, b] = perm[next_block]
            next_block += 1
        for pos in range(seq_len):
            blk, off = block_tables[s, pos // block_size], pos % block_size
            key_cache[blk, :, off] = torch.randn(num_kv_heads, head_size, generator=gen)
            value_cache[blk, :, off] = torch.randn(num_kv_heads, head_size, generator=gen)
    query = torch.randn(sum(q_lens), num_heads, head_size, generator=gen)
    starts = [0]
    for q in q_lens:
        starts.append(starts[-1] + q)
    query_start_loc = torch.tensor(starts, dtype=torch.int32)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32)
    return (query.to(device=device, dtype=dtype), key_cache.to(device=device, dtype=dtype),
            value_cache.to(device=device, dtype=dtype), block_tables.to(device), query_start_loc.to(device),
            seq_lens_t.to(device))


def run_op(query, key_cache, value_cache, block_tables, query_start_loc, seq_lens, scale, window=0, out=None):
    if out is None:  # NaN-filled: a row the kernel does not write fails the comparison
        out = torch.full(query.shape, float("nan"), dtype=query.dtype, device=query.device)
    q_lens = (query_start_loc[1:] - query_start_loc[:-1]).tolist()
    return _ops.paged_prefill_attention(query, key_cache, value_cache, block_tables, query_start_loc, seq_lens,
                                        max(q_lens, default=0), scale, window, out=out)


def check(q_lens, ctx_lens, num_heads, num_kv_heads, head_size, block_size, dtype, device, window=0, seed=0):
    case = make_case(q_lens, ctx_lens, num_heads, num_kv_heads, head_size, block_size, dtype, device, seed)
    scale = head_size ** -0.5
    out = run_op(*case, scale, window)
    ref = paged_prefill_attention_native(*case, scale, window)
    assert_close_to_row_scale(out, ref, TOLERANCES[dtype])
    return out


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_size", HEAD_SIZES)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_matches_reference(device, dtype, head_size, block_size):
    # GQA: 8 query heads over 2 kv heads
    check(Q_LENS, CTX_LENS, 8, 2, head_size, block_size, dtype, device)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 1), (9, 3), (32, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_layouts(device, num_heads, num_kv_heads, dtype):
    # MHA, MQA, the CPU engine's 9 q / 3 kv heads, a 7B-style 32 / 8
    check([5, 40], [11, 0], num_heads, num_kv_heads, 64, 16, dtype, device)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [1, 7, 40, 1000])
def test_sliding_window(device, dtype, window):
    # Long contexts so that the window cuts inside blocks, inside tiles and skips whole tiles;
    # 1000 is longer than every sequence (no effect).
    check([1, 30, 150], [100, 0, 45], 4, 2, 64, 16, dtype, device, window=window)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_sequences(device, dtype):
    # Several CUDA query tiles (128 rows) and KV tiles per sequence, uneven last tiles.
    check([300, 129, 64], [200, 0, 500], 4, 1, 128, 32, dtype, device)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_query_and_out(device, dtype):
    q_lens, ctx = [7, 83], [16, 0]
    query, kc, vc, bt, qsl, sl = make_case(q_lens, ctx, 8, 2, 96, 16, dtype, device)
    scale = 96 ** -0.5
    ref = paged_prefill_attention_native(query, kc, vc, bt, qsl, sl, scale)
    # 1) rows padded by 3 elements: row starts not 16-byte aligned
    q_pad = non_contiguous_rows(query.reshape(query.shape[0], -1)).view(query.shape[0], 8, 96)
    assert not q_pad.is_contiguous()
    out = run_op(q_pad, kc, vc, bt, qsl, sl, scale)
    assert_close_to_row_scale(out, ref, TOLERANCES[dtype])
    # 2) the q slice of a fused qkv projection [tokens, (8 + 2 + 2) * 96], written into the
    #    matching slice of a wider output buffer
    qkv = torch.randn(query.shape[0], 12 * 96, device=device).to(dtype)
    qkv[:, : 8 * 96] = query.reshape(query.shape[0], -1)
    q_slice = qkv[:, : 8 * 96].view(-1, 8, 96)
    out_buf = torch.full((query.shape[0], 10 * 96), float("nan"), device=device, dtype=dtype)
    out_slice = out_buf[:, 96 : 9 * 96].view(-1, 8, 96)
    run_op(q_slice, kc, vc, bt, qsl, sl, scale, out=out_slice)
    assert_close_to_row_scale(out_slice, ref, TOLERANCES[dtype])
    assert out_buf[:, :96].isnan().all() and out_buf[:, 9 * 96 :].isnan().all()  # nothing outside the view


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_unaligned_cache(device, dtype):
    # Contiguous caches whose data starts one element past a 16-byte boundary (a view into a
    # bigger buffer): no 16-byte loads possible (CUDA takes its scalar kernel), same result.
    query, kc, vc, bt, qsl, sl = make_case([7, 40], [16, 3], 4, 2, 64, 16, dtype, device)
    shifted = []
    for cache in (kc, vc):
        buf = torch.empty(cache.numel() + 1, dtype=dtype, device=device)
        view = buf[1:].view(cache.shape)
        view.copy_(cache)
        assert view.is_contiguous() and view.data_ptr() % 16 != 0
        shifted.append(view)
    out = run_op(query, shifted[0], shifted[1], bt, qsl, sl, 0.125)
    ref = paged_prefill_attention_native(query, kc, vc, bt, qsl, sl, 0.125)
    assert_close_to_row_scale(out, ref, TOLERANCES[dtype])


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_empty_sequences_write_nothing(device):
    # A sequence with no new tokens (q_len 0, e.g. a finished chunk) between two real ones: the 14 real rows are
    # right, and nothing is written around them (the output is a window of a sentinel-filled buffer) or into the
    # caches.
    case = make_case([5, 0, 9], [3, 20, 0], 4, 2, 64, 16, torch.bfloat16, device)
    caches_before = [c.clone() for c in case[1:3]]
    buf = torch.full((2 + 14 + 2, 4, 64), 7.0, dtype=torch.bfloat16, device=device)
    run_op(*case, 0.125, out=buf[2:16])
    assert_close_to_row_scale(buf[2:16], paged_prefill_attention_native(*case, 0.125), TOLERANCES[torch.bfloat16])
    assert (buf[:2] == 7.0).all() and (buf[16:] == 7.0).all()
    for cache, before in zip(case[1:3], caches_before):
        torch.testing.assert_close(cache, before, rtol=0, atol=0, equal_nan=True)
    # A batch with no query tokens at all is a no-op: an output window of zero rows leaves its buffer alone.
    case = make_case([0, 0], [4, 9], 4, 2, 64, 16, torch.float32, device)
    buf = torch.full((3, 4, 64), 7.0, device=device)
    run_op(*case, 0.125, out=buf[1:1])
    assert (buf == 7.0).all()


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [0, 5])
def test_single_token_equals_decode_reference(device, dtype, window):
    # Prefill with q_len 1 per sequence is decode: compare with the decode reference.
    ctx = [0, 15, 16, 40]
    q, kc, vc, bt, qsl, sl = make_case([1] * 4, ctx, 8, 2, 128, 16, dtype, device)
    scale = 128 ** -0.5
    out = run_op(q, kc, vc, bt, qsl, sl, scale, window)
    ref = paged_attention_native(q, kc, vc, bt, sl, scale, window)
    assert_close_to_row_scale(out, ref, TOLERANCES[dtype])


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_chunked_prefill_equals_one_shot(device):
    # Prefilling 100 tokens in chunks of 37 / 41 / 22 (each chunk attends to the cached earlier
    # chunks) gives the same outputs as one 100-token prefill.
    q, kc, vc, bt, qsl, sl = make_case([100], [0], 4, 2, 64, 16, torch.float32, device)
    scale = 0.125
    whole = run_op(q, kc, vc, bt, qsl, sl, scale)
    start = 0
    for chunk in (37, 41, 22):
        part = run_op(q[start : start + chunk], kc, vc, bt, torch.tensor([0, chunk], dtype=torch.int32, device=device),
                      torch.tensor([start + chunk], dtype=torch.int32, device=device), scale)
        torch.testing.assert_close(part, whole[start : start + chunk], atol=2e-5, rtol=2e-5)
        start += chunk


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_bad_inputs_raise(device):
    q, kc, vc, bt, qsl, sl = make_case([7, 3], [16, 0], 8, 2, 64, 16, torch.float32, device)

    def call(query=q, key_cache=kc, value_cache=vc, block_tables=bt, query_start_loc=qsl, seq_lens=sl,
             max_query_len=7, out=None):
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device) if out is None else out
        _ops.paged_prefill_attention(query, key_cache, value_cache, block_tables, query_start_loc, seq_lens,
                                     max_query_len, 0.125, 0, out=out)

    call()  # the valid call works
    q72 = torch.randn(10, 8, 72, device=device)
    c72 = torch.randn(4, 2, 16, 72, device=device)
    with pytest.raises(RuntimeError, match="Unsupported head size: 72"):
        call(query=q72, key_cache=c72, value_cache=c72)
    c8 = torch.randn(8, 2, 8, 64, device=device)
    with pytest.raises(RuntimeError, match="Unsupported block size: 8"):
        call(key_cache=c8, value_cache=c8)
    with pytest.raises(RuntimeError, match="dtype"):
        call(key_cache=kc.half(), value_cache=vc.half())
    with pytest.raises(RuntimeError, match="multiple of num_kv_heads"):
        call(query=torch.randn(10, 7, 64, device=device))
    with pytest.raises(RuntimeError, match="query_start_loc"):
        call(query_start_loc=qsl[:2])
    with pytest.raises(RuntimeError, match="block_tables"):
        call(block_tables=bt.long())
    with pytest.raises(RuntimeError, match="out shape"):
        call(out=torch.empty(10, 8, 32, device=device))
    with pytest.raises(RuntimeError, match="contiguous"):
        call(key_cache=kc.transpose(1, 2).contiguous().transpose(1, 2))


def test_bad_values_raise_on_cpu():
    # The CPU op validates the metadata values (the CUDA op trusts them: reading them would sync).
    q, kc, vc, bt, qsl, sl = make_case([7, 3], [16, 0], 8, 2, 64, 16, torch.float32, "cpu")

    def call(block_tables=bt, query_start_loc=qsl, seq_lens=sl, max_query_len=7):
        _ops.paged_prefill_attention(q, kc, vc, block_tables, query_start_loc, seq_lens, max_query_len, 0.125)

    with pytest.raises(RuntimeError, match="max_query_len"):
        call(max_query_len=5)
    with pytest.raises(RuntimeError, match="smaller than its query length"):
        call(seq_lens=torch.tensor([20, 2], dtype=torch.int32))
    bad = bt.clone()
    bad[0, 1] = kc.shape[0]
    with pytest.raises(RuntimeError, match="outside"):
        call(block_tables=bad)
    with pytest.raises(RuntimeError, match="non-decreasing"):
        call(query_start_loc=torch.tensor([0, 7, 5], dtype=torch.int32))
