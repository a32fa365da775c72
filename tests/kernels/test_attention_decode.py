"""paged_attention (decode) against the plain-torch reference paged_attention_native.

Caches are filled only in the slots the sequences use; every other slot, every unused block and
(for sliding-window cases) every key/value before the window is NaN, so a kernel that reads
anything it must not read leaks NaN into the output. Block tables are shuffled and their unused
entries point at a poisoned block.
"""
import math

import pytest
import torch

from pagedllm import _ops
from pagedllm.layers.attention import paged_attention_native
from testing_utils import KERNEL_DEVICES, DTYPES, assert_close_to_row_scale, non_contiguous_rows

# Both sides accumulate in fp32 from the same inputs. Errors are bounded relative to each output row's own scale
# (testing_utils.assert_close_to_row_scale): outputs shrink with the context (~0.03 at 2000 keys), so an absolute
# bound would hide a split-KV merge bug there. fp32: only the summation order and the exp implementation differ
# (measured on the CPU: <= 1.3e-6). bf16/fp16: the result is rounded once to the output dtype, so the two can
# differ by about one ulp of the output (2^-8 relative for bf16, 2^-11 for fp16); allowed: ~2.5 ulps of the row
# scale (measured on the CPU: bf16 <= 2e-3, fp16 <= 8e-5).
TOLERANCES = {
    torch.float32: 2e-5,
    torch.bfloat16: 1e-2,
    torch.float16: 1.5e-3,
}

SHORT_LENS = [1, 7, 16, 17, 83, 200]   # max_blocks * block_size <= 256: one pass on CUDA
MEDIUM_LENS = [1, 7, 16, 17, 83, 300]  # a longer table: the CUDA split-KV path
LONG_LENS = [2000, 5, 0, 1100]         # split-KV with several partitions, a padding row


def make_case(seq_lens, num_heads, num_kv_heads, head_size, block_size, dtype, device,
              sliding_window=0, seed=0, extra_blocks=3):
    """Random query and paged caches. Returns (query, key_cache, value_cache, block_tables,
    seq_lens, ref_key_cache, ref_value_cache): the kernel's caches have NaN before the window,
    the reference's have finite values there (the reference multiplies them by probability 0)."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [math.ceil(n / block_size) for n in seq_lens]
    max_blocks = max(blocks_per_seq) + 1  # one unused column
    num_blocks = sum(blocks_per_seq) + extra_blocks
    shape = (num_blocks, num_kv_heads, block_size, head_size)
    key_cache = torch.full(shape, float("nan"), dtype=torch.float32)
    value_cache = torch.full(shape, float("nan"), dtype=torch.float32)
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    unused_block = perm[-1]  # never assigned: stays NaN
    block_tables = torch.full((len(seq_lens), max_blocks), unused_block, dtype=torch.int32)
    next_block = 0
    for i, n in enumerate(seq_lens):
        for j in range(blocks_per_seq[i]):
            blk = perm[next_block]
            next_block += 1
            block_tables[i, j] = blk
            used = min(block_size, n - j * block_size)
            key_cache[blk, :, :used] = torch.randn(num_kv_heads, used, head_size, generator=gen)
            value_cache[blk, :, :used] = torch.randn(num_kv_heads, used, head_size, generator=gen)
    ref_key_cache, ref_value_cache = key_cache.clone(), value_cache.clone()
    if sliding_window > 0:  # keys before the window: NaN for the kernel
        for i, n in enumerate(seq_lens):
            for pos in range(max(0, n - sliding_window)):
                blk = block_tables[i, pos // block_size]
                key_cache[blk, :, pos % block_size] = float("nan")
                value_cache[blk, :, pos % block_size] = float("nan")
    query = torch.randn(len(seq_lens), num_heads, head_size, generator=gen)
    to = dict(dtype=dtype, device=device)
    return (query.to(**to), key_cache.to(**to), value_cache.to(**to), block_tables.to(device),
            torch.tensor(seq_lens, dtype=torch.int32, device=device), ref_key_cache.to(**to),
            ref_value_cache.to(**to))


def run_and_check(device, dtype, seq_lens, num_heads, num_kv_heads, head_size, block_size,
                  sliding_window=0, query_layout="contiguous", seed=0):
    q, kc, vc, bt, lens, ref_kc, ref_vc = make_case(seq_lens, num_heads, num_kv_heads, head_size,
                                                     block_size, dtype, device, sliding_window, seed)
    if query_layout == "padded_heads":  # head and sequence strides larger than the row
        q = non_contiguous_rows(q)
    elif query_layout == "qkv_slice":  # the query part of a fused qkv projection
        qkv = torch.full((q.shape[0], (num_heads + 2 * num_kv_heads) * head_size), float("nan"),
                         dtype=dtype, device=device)
        qkv[:, : num_heads * head_size] = q.reshape(q.shape[0], -1)
        q = qkv[:, : num_heads * head_size].view(q.shape[0], num_heads, head_size)
    scale = head_size ** -0.5
    # out starts as NaN: every element (padding rows included) must be written.
    out = torch.full(q.shape, float("nan"), dtype=dtype, device=device)
    _ops.paged_attention(q, kc, vc, bt, lens, scale, sliding_window, out=out)
    ref = paged_attention_native(q, ref_kc, ref_vc, bt, lens, scale, sliding_window)
    assert not out.isnan().any()
    assert_close_to_row_scale(out, ref, TOLERANCES[dtype])
    for i, n in enumerate(seq_lens):
        if n == 0:
            assert (out[i] == 0).all()
    return out


# (head_size, block_size, num_heads, num_kv_heads, dtype, sliding_window): a representative
# subset of the cross product; every head size, both block sizes, MHA / GQA / MQA, all dtypes.
CASES = [
    (64, 16, 4, 4, torch.float32, 0),
    (64, 32, 8, 1, torch.float16, 0),
    (80, 16, 8, 2, torch.bfloat16, 0),
    (80, 32, 4, 4, torch.float32, 0),
    (96, 16, 8, 1, torch.float16, 0),
    (96, 32, 8, 2, torch.bfloat16, 0),
    (128, 16, 8, 2, torch.bfloat16, 0),
    (128, 32, 8, 1, torch.float32, 0),
    (256, 16, 4, 4, torch.bfloat16, 0),
    (256, 32, 8, 2, torch.float32, 0),
    (128, 16, 6, 2, torch.float16, 0),   # group 3 (padded group on CUDA)
    (64, 16, 24, 2, torch.bfloat16, 0),  # group 12 (more than one group chunk on CUDA)
    (128, 16, 8, 2, torch.bfloat16, 50),
    (64, 32, 8, 1, torch.float32, 17),
    (256, 16, 4, 4, torch.float16, 1),
    (80, 16, 8, 2, torch.float32, 40),
]


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("lens", [SHORT_LENS, MEDIUM_LENS], ids=["short", "medium"])
@pytest.mark.parametrize("head_size,block_size,num_heads,num_kv_heads,dtype,window", CASES)
def test_paged_attention(device, lens, head_size, block_size, num_heads, num_kv_heads, dtype, window):
    run_and_check(device, dtype, lens, num_heads, num_kv_heads, head_size, block_size, window)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_attention_dtypes_with_padding_row(device, dtype):
    run_and_check(device, dtype, [83, 0, 17, 1], 8, 2, 128, 16)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("layout", ["padded_heads", "qkv_slice"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_non_contiguous_query(device, layout, dtype):
    run_and_check(device, dtype, MEDIUM_LENS, 8, 2, 96, 16, query_layout=layout)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("window", [0, 700])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_size,block_size,dtype", [
    (8, 2, 128, 16, torch.bfloat16),
    (4, 4, 64, 32, torch.float32),
])
def test_paged_attention_long_context(device, window, num_heads, num_kv_heads, head_size, block_size, dtype):
    # Long sequences next to short ones and a padding row: the context is split (CPU threads,
    # CUDA split-KV partitions) and the partial results merged.
    run_and_check(device, dtype, LONG_LENS, num_heads, num_kv_heads, head_size, block_size, window)


@pytest.mark.parametrize("lens", [[250] * 6 + [3] * 20 + [0], [1] * 30 + [900]], ids=["long_first", "long_last"])
def test_paged_attention_uneven_batch_cpu(lens):
    # The CPU threads split the items by keys, not by count: all of the work at one end of the batch.
    run_and_check("cpu", torch.float32, lens, 9, 3, 64, 16)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_paged_attention_batch_one_long(device):
    run_and_check(device, torch.float16, [3001], 8, 1, 80, 16)


@pytest.mark.cuda
def test_paged_attention_many_sequences_cuda():
    # Enough (sequence, kv head) pairs to fill the GPU: the single-pass CUDA path with long rows.
    gen = torch.Generator().manual_seed(1)
    lens = torch.randint(1, 700, (160,), generator=gen).tolist()
    lens[3] = 0
    run_and_check("cuda", torch.bfloat16, lens, 8, 4, 128, 16, seed=1)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_paged_attention_writes_strided_out(device):
    q, kc, vc, bt, lens, _, _ = make_case([5, 40], 4, 2, 64, 16, torch.float32, device)
    wide = torch.full((2, 4, 64 + 8), float("nan"), device=device)
    out = wide[..., :64]
    _ops.paged_attention(q, kc, vc, bt, lens, 0.125, 0, out=out)
    assert_close_to_row_scale(out, paged_attention_native(q, kc, vc, bt, lens, 0.125), TOLERANCES[torch.float32])
    assert wide[..., 64:].isnan().all()  # the padding after each row is untouched


def _inputs(device, head_size=64, block_size=16, kv_dtype=torch.float32, num_heads=4, num_kv_heads=2):
    q = torch.randn(2, num_heads, head_size, device=device)
    kc = torch.zeros(4, num_kv_heads, block_size, head_size, dtype=kv_dtype, device=device)
    bt = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32, device=device)
    lens = torch.tensor([3, 20], dtype=torch.int32, device=device)
    return q, kc, kc.clone(), bt, lens


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_paged_attention_errors(device):
    with pytest.raises(RuntimeError, match="Unsupported head size: 100"):
        _ops.paged_attention(*_inputs(device, head_size=100), 0.1)
    with pytest.raises(RuntimeError, match="Unsupported block size: 8"):
        _ops.paged_attention(*_inputs(device, block_size=8), 0.1)
    with pytest.raises(RuntimeError, match="key_cache dtype .* does not match query dtype"):
        _ops.paged_attention(*_inputs(device, kv_dtype=torch.float16), 0.1)
    with pytest.raises(RuntimeError, match="must be a multiple of num_kv_heads"):
        _ops.paged_attention(*_inputs(device, num_heads=3, num_kv_heads=2), 0.1)
    q, kc, vc, bt, lens = _inputs(device)
    with pytest.raises(RuntimeError, match="block_tables must be int32"):
        _ops.paged_attention(q, kc, vc, bt.long(), lens, 0.1)
    with pytest.raises(RuntimeError, match="head_size"):
        _ops.paged_attention(q[..., :32].contiguous(), kc, vc, bt, lens, 0.1)


def test_paged_attention_cpu_rejects_bad_metadata():
    q, kc, vc, bt, lens = _inputs("cpu")
    with pytest.raises(RuntimeError, match=r"seq_lens\[1\] = 40 is outside"):
        _ops.paged_attention(q, kc, vc, bt, torch.tensor([3, 40], dtype=torch.int32), 0.1)
    with pytest.raises(RuntimeError, match="is not a block of the cache"):
        _ops.paged_attention(q, kc, vc, torch.tensor([[0, 1], [2, 9]], dtype=torch.int32), lens, 0.1)
