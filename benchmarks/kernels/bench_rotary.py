"""rotary_embedding: achieved bandwidth vs the device's copy bandwidth and vs forward_native.

Floor: read and write the rotated part of every query and key head once, plus the cos/sin row
and position of each token: 2 * tokens * (heads + kv_heads) * rot_dim * elem + tokens * (rot_dim * elem + 8).
(Bytes beyond rot_dim are not touched by the op, so they are not counted.)

    python benchmarks/kernels/bench_rotary.py [--device cuda|cpu] [--dtype bfloat16] [--quick]
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import parse_args, report, time_fn  # noqa: E402

from pagedllm.layers.rotary import RotaryEmbedding  # noqa: E402

MAX_POSITION = 8192
# (tokens, heads, kv_heads, head_size, rotary_dim, neox): Llama-3-8B (32/8 x 128, neox),
# a GPT-J-style partial rotary (16 x 256, rot 64).
CONFIGS = [(1, 32, 8, 128, 128, True), (64, 32, 8, 128, 128, True), (1024, 32, 8, 128, 128, True),
           (4096, 32, 8, 128, 128, True), (4096, 16, 16, 256, 64, False)]
QUICK_CONFIGS = {"cuda": [(1, 32, 8, 128, 128, True), (4096, 32, 8, 128, 128, True)],
                 "cpu": [(1, 32, 8, 128, 128, True), (256, 32, 8, 128, 128, True)]}


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    device, dtype = args.device, args.dtype
    elem = torch.tensor([], dtype=dtype).element_size()
    configs = QUICK_CONFIGS[device] if args.quick else CONFIGS
    iters = min(args.iters, 5) if args.quick and device == "cpu" else args.iters
    for tokens, heads, kv_heads, head_size, rot, neox in configs:
        torch.manual_seed(0)
        rope = RotaryEmbedding(head_size, rot, MAX_POSITION, 10000.0, neox, dtype).to(device)
        positions = torch.randint(0, MAX_POSITION, (tokens,), device=device)
        q = torch.randn(tokens, heads * head_size, dtype=dtype, device=device)
        k = torch.randn(tokens, kv_heads * head_size, dtype=dtype, device=device)
        ref_q, ref_k = rope.forward_native(positions, q, k)
        out_q, out_k = rope(positions, q.clone(), k.clone())
        atol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out_q, ref_q, atol=atol, rtol=atol)
        torch.testing.assert_close(out_k, ref_k, atol=atol, rtol=atol)

        shape = f"{tokens}t {heads}/{kv_heads}x{head_size} rot{rot} {'neox' if neox else 'gptj'} " \
                f"{str(dtype).removeprefix('torch.')}"
        bytes_moved = 2 * tokens * (heads + kv_heads) * rot * elem + tokens * (rot * elem + 8)
        native = time_fn(lambda: rope.forward_native(positions, q, k), device, iters)
        op = time_fn(lambda: rope(positions, q, k), device, iters)  # in place: rotates again each call
        report("rotary_embedding", shape, op, bytes_moved=bytes_moved, native_seconds=native, device=device)


if __name__ == "__main__":
    main()
