"""Benchmark of paged_prefill_attention (causal varlen attention over the paged KV cache).

Validates the op against paged_prefill_attention_native first, then times both and reports
TFLOP/s next to the dense matmul peak measured on the same device. FLOPs count only what causal
attention needs: 4 * head_size * num_heads * (sum over queries of the keys each one sees).
Then the bidirectional variant (causal=False, encoders such as BERT: every query sees its whole sequence)
on encoder-sized shapes, next to the reference and to torch's SDPA over the same sequences padded.

    python benchmarks/kernels/bench_prefill_attention.py                 # cuda: 8 x 2048, 32/8 heads, head 128
    python benchmarks/kernels/bench_prefill_attention.py --device cpu    # the CPU engine's shapes
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python"))

from common import matmul_peak_flops, parse_args, report, time_fn  # noqa: E402

from pagedllm import _ops  # noqa: E402
from pagedllm.layers.attention import paged_prefill_attention_native  # noqa: E402

# (num_seqs, new tokens per seq, cached tokens per seq, num_heads, num_kv_heads, head_size, block_size)
CUDA_SHAPES = [
    (8, 2048, 0, 32, 8, 128, 16),    # the target: 8 prompts of 2k tokens, a 7B/8B-style GQA model
    (8, 512, 1536, 32, 8, 128, 16),  # chunked prefill: the last 512 tokens over a 1.5k cached prefix
    (16, 1024, 0, 16, 2, 64, 16),    # a small model (head 64, GQA 8)
    (4, 1024, 0, 8, 8, 256, 16),     # head 256
]
CPU_SHAPES = [
    (4, 256, 0, 9, 3, 64, 16),    # small
    (32, 500, 0, 9, 3, 64, 16),   # the CPU engine's prefill: 32 prompts of 500 tokens
]


# bidirectional (encoder) shapes: (num_seqs, tokens per seq, num_heads, head_size, block_size)
BIDI_CUDA_SHAPES = [(64, 512, 12, 64, 16), (256, 128, 16, 64, 16)]
BIDI_CPU_SHAPES = [(256, 16, 12, 64, 16), (32, 128, 12, 64, 16)]  # short texts, BERT-base heads


def build(num_seqs, q_len, ctx, num_heads, num_kv_heads, head_size, block_size, dtype, device):
    seq_len = q_len + ctx
    blocks_per_seq = (seq_len + block_size - 1) // block_size
    num_blocks = num_seqs * blocks_per_seq
    gen = torch.Generator(device="cpu").manual_seed(0)
    key_cache = torch.randn(num_blocks, num_kv_heads, block_size, head_size, generator=gen).to(device, dtype)
    value_cache = torch.randn(num_blocks, num_kv_heads, block_size, head_size, generator=gen).to(device, dtype)
    block_tables = torch.randperm(num_blocks, generator=gen).to(torch.int32).view(num_seqs, blocks_per_seq).to(device)
    query = torch.randn(num_seqs * q_len, num_heads, head_size, generator=gen).to(device, dtype)
    query_start_loc = torch.arange(0, num_seqs + 1, dtype=torch.int32, device=device) * q_len
    seq_lens = torch.full((num_seqs,), seq_len, dtype=torch.int32, device=device)
    # keys seen by query i (0-based) of a sequence: ctx + i + 1
    keys_seen = num_seqs * (q_len * ctx + q_len * (q_len + 1) // 2)
    flops = 4 * head_size * num_heads * keys_seen
    return (query, key_cache, value_cache, block_tables, query_start_loc, seq_lens), flops


def main():
    args = parse_args(__doc__.splitlines()[0])
    device, dtype = args.device, args.dtype
    shapes = CUDA_SHAPES if device == "cuda" else CPU_SHAPES
    if args.quick:
        shapes = shapes[:1]
    peak = matmul_peak_flops(device, dtype)
    print(f"device {device}, dtype {dtype}, dense matmul peak {peak / 1e12:.1f} TFLOP/s", flush=True)
    for num_seqs, q_len, ctx, num_heads, num_kv_heads, head_size, block_size in shapes:
        inputs, flops = build(num_seqs, q_len, ctx, num_heads, num_kv_heads, head_size, block_size, dtype, device)
        scale = head_size ** -0.5
        out = torch.empty_like(inputs[0])

        def op():
            return _ops.paged_prefill_attention(*inputs, q_len, scale, 0, out=out)

        def native():
            return paged_prefill_attention_native(*inputs, scale, 0)

        ref = native().float()
        got = op().float()
        # bf16/fp16: both round the output; the CUDA kernel also rounds P to bf16 / fp16.
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(got, ref, atol=tol, rtol=tol)
        del ref, got

        seconds = time_fn(op, device, args.iters)
        # The reference materializes [heads, q, keys] fp32 scores per sequence: a few runs suffice.
        native_seconds = time_fn(native, device, iters=3 if device == "cuda" else 1, warmup=1)
        shape = (f"{num_seqs}x{q_len}" + (f"+{ctx}ctx" if ctx else "") +
                 f" h{num_heads}/{num_kv_heads} d{head_size} bs{block_size}")
        report("paged_prefill_attention", shape, seconds, flops=flops, native_seconds=native_seconds,
               device=device, peak_flops=peak)

    bidi = BIDI_CUDA_SHAPES if device == "cuda" else BIDI_CPU_SHAPES
    for num_seqs, q_len, num_heads, head_size, block_size in bidi[:1] if args.quick else bidi:
        inputs, _ = build(num_seqs, q_len, 0, num_heads, num_heads, head_size, block_size, dtype, device)
        flops = 4 * head_size * num_heads * num_seqs * q_len * q_len  # every query sees all q_len keys
        scale = head_size ** -0.5
        out = torch.empty_like(inputs[0])

        def op():
            return _ops.paged_prefill_attention(*inputs, q_len, scale, 0, out=out, causal=False)

        def native():
            return paged_prefill_attention_native(*inputs, scale, 0, causal=False)

        q = inputs[0].view(num_seqs, q_len, num_heads, head_size).transpose(1, 2)
        k = torch.randn_like(q)
        v = torch.randn_like(q)

        def sdpa():  # what EncoderAttention runs for head sizes without a kernel (equal lengths: no padding)
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)

        tol = 1e-4 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(op().float(), native().float(), atol=tol, rtol=tol)
        seconds = time_fn(op, device, args.iters)
        native_seconds = time_fn(native, device, iters=3 if device == "cuda" else 1, warmup=1)
        sdpa_seconds = time_fn(sdpa, device, args.iters)
        shape = f"bidirectional {num_seqs}x{q_len} h{num_heads} d{head_size} bs{block_size}"
        report("paged_prefill_attention", shape, seconds, flops=flops, native_seconds=native_seconds,
               device=device, peak_flops=peak)
        print(f"    torch SDPA on the same shape: {sdpa_seconds * 1e3:.3f} ms "
              f"({seconds / sdpa_seconds:.2f}x the kernel's time)", flush=True)


if __name__ == "__main__":
    main()
