"""reshape_and_cache: achieved bandwidth vs the device's copy bandwidth and vs reshape_and_cache_native.

Floor: read the new K and V rows and write them into the cache once:
  2 (k, v) * 2 (read + write) * tokens * kv_heads * head_size * elem  (+ 8 bytes of slot per token).

    python benchmarks/kernels/bench_reshape_and_cache.py [--device cuda|cpu] [--dtype bfloat16] [--quick]
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import parse_args, report, time_fn  # noqa: E402

from pagedllm import _ops  # noqa: E402
from pagedllm.layers.kv_cache import reshape_and_cache_native  # noqa: E402

# (tokens, kv_heads, head_size, block_size): decode batches and prefill chunks of Llama-3-8B (8 x 128).
CONFIGS = [(1, 8, 128, 16), (64, 8, 128, 16), (1024, 8, 128, 16), (4096, 8, 128, 16), (4096, 8, 128, 32),
           (4096, 4, 64, 16)]
QUICK_CONFIGS = {"cuda": [(1, 8, 128, 16), (4096, 8, 128, 16)], "cpu": [(1, 8, 128, 16), (1024, 8, 128, 16)]}


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    device, dtype = args.device, args.dtype
    elem = torch.tensor([], dtype=dtype).element_size()
    configs = QUICK_CONFIGS[device] if args.quick else CONFIGS
    iters = min(args.iters, 5) if args.quick and device == "cpu" else args.iters
    for tokens, kv_heads, head_size, block_size in configs:
        torch.manual_seed(0)
        num_blocks = 2 * ((tokens + block_size - 1) // block_size) + 8  # the cache is twice what is written
        key = torch.randn(tokens, kv_heads, head_size, dtype=dtype, device=device)
        value = torch.randn(tokens, kv_heads, head_size, dtype=dtype, device=device)
        slots = torch.randperm(num_blocks * block_size, device=device)[:tokens]  # scattered distinct slots
        cache_shape = (num_blocks, kv_heads, block_size, head_size)
        key_cache = torch.full(cache_shape, float("nan"), dtype=dtype, device=device)
        value_cache = torch.full(cache_shape, float("nan"), dtype=dtype, device=device)
        ref_k, ref_v = key_cache.clone(), value_cache.clone()
        _ops.reshape_and_cache(key, value, key_cache, value_cache, slots)
        reshape_and_cache_native(key, value, ref_k, ref_v, slots)
        torch.testing.assert_close(key_cache, ref_k, atol=0, rtol=0, equal_nan=True)
        torch.testing.assert_close(value_cache, ref_v, atol=0, rtol=0, equal_nan=True)

        shape = f"{tokens}t {kv_heads}x{head_size} bs{block_size} {str(dtype).removeprefix('torch.')}"
        bytes_moved = 4 * tokens * kv_heads * head_size * elem + 8 * tokens
        native = time_fn(lambda: reshape_and_cache_native(key, value, ref_k, ref_v, slots), device, iters)
        op = time_fn(lambda: _ops.reshape_and_cache(key, value, key_cache, value_cache, slots), device, iters)
        report("reshape_and_cache", shape, op, bytes_moved=bytes_moved, native_seconds=native, device=device)


if __name__ == "__main__":
    main()
