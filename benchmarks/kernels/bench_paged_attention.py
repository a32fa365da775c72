"""Benchmark paged_attention (decode) against paged_attention_native.

Floor: decode attention is bound by memory traffic. Bytes moved = the K and V rows every sequence
must read (seq_len * num_kv_heads * head_size per tensor) + the query and the output + the block
table; the floor is bytes / the device's measured copy bandwidth (reported as % of copy).

  python benchmarks/kernels/bench_paged_attention.py                 # cuda: the two target shapes
  python benchmarks/kernels/bench_paged_attention.py --device cpu    # a small CPU shape
"""
from __future__ import annotations

import math

import torch

from common import parse_args, report, time_fn
from pagedllm import _ops
from pagedllm.layers.attention import paged_attention_native

# (batch, context, num_heads, num_kv_heads, head_size, block_size)
CUDA_SHAPES = [
    (64, 4096, 32, 8, 128, 16),   # large batch: one pass, every SM busy
    (1, 32768, 32, 8, 128, 16),   # batch 1, long context: split-KV over all SMs
]
CUDA_EXTRA_SHAPES = [
    (8, 8192, 32, 8, 128, 16),
    (256, 1024, 32, 8, 128, 16),
    (16, 4096, 64, 8, 128, 32),   # group 8
]
CPU_SHAPES = [
    (4, 1024, 8, 2, 128, 16),
    (1, 4096, 8, 2, 128, 16),     # batch 1: the context is split over the threads
]

# Same reasoning as the tests: both sides accumulate in fp32, the outputs differ by a final rounding.
TOLERANCES = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def build(batch, ctx, num_heads, num_kv_heads, head_size, block_size, dtype, device):
    blocks_per_seq = math.ceil(ctx / block_size)
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, num_kv_heads, block_size, head_size)
    key_cache = torch.randn(shape, dtype=dtype, device=device)
    value_cache = torch.randn(shape, dtype=dtype, device=device)
    # Shuffled blocks: a sequence's KV is scattered over the cache as in a running engine.
    block_tables = torch.randperm(num_blocks, device=device).view(batch, blocks_per_seq).to(torch.int32)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    query = torch.randn(batch, num_heads, head_size, dtype=dtype, device=device)
    return query, key_cache, value_cache, block_tables, seq_lens


def main():
    args = parse_args(__doc__)
    device, dtype = args.device, args.dtype
    if device == "cuda":
        shapes = CUDA_SHAPES + ([] if args.quick else CUDA_EXTRA_SHAPES)
    else:
        shapes = CPU_SHAPES[:1] if args.quick else CPU_SHAPES
    for batch, ctx, num_heads, num_kv_heads, head_size, block_size in shapes:
        torch.manual_seed(0)
        q, kc, vc, bt, lens = build(batch, ctx, num_heads, num_kv_heads, head_size, block_size, dtype, device)
        scale = head_size ** -0.5
        out = torch.empty_like(q)

        def run():
            _ops.paged_attention(q, kc, vc, bt, lens, scale, 0, out=out)

        def native():
            return paged_attention_native(q, kc, vc, bt, lens, scale)

        run()
        ref = native()
        tol = TOLERANCES[dtype]
        torch.testing.assert_close(out, ref, atol=tol, rtol=tol)

        seconds = time_fn(run, device, args.iters)
        # The reference loops over sequences in Python: a few timed calls are enough.
        native_seconds = time_fn(native, device, iters=3 if not args.quick else 1, warmup=1)
        elem = q.element_size()
        kv_bytes = 2 * int(lens.sum()) * num_kv_heads * head_size * elem
        bytes_moved = kv_bytes + 2 * q.numel() * elem + bt.numel() * 4 + lens.numel() * 4
        shape = f"b{batch} ctx{ctx} h{num_heads}/{num_kv_heads} d{head_size} bs{block_size} {str(dtype)[6:]}"
        report("paged_attention", shape, seconds, bytes_moved=bytes_moved, native_seconds=native_seconds,
               device=device)
        del q, kc, vc, bt, lens, out, ref
        if device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
