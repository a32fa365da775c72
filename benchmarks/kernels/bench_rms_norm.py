"""rms_norm and fused_add_rms_norm: achieved bandwidth vs the device's copy bandwidth and vs forward_native.

Floor: the op must read the input (and residual) and write the output (and residual) once:
  rms_norm:           2 * tokens * hidden * elem  (+ weight)
  fused_add_rms_norm: 4 * tokens * hidden * elem  (+ weight)
At 4096 x 4096 bf16 on an H100 (~3 TB/s copy) that is ~22 us and ~45 us.

    python benchmarks/kernels/bench_rms_norm.py [--device cuda|cpu] [--dtype bfloat16] [--quick]
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import parse_args, report, time_fn  # noqa: E402

from pagedllm.layers.rms_norm import RMSNorm  # noqa: E402

# (tokens, hidden): decode batches and prefill chunks of Llama-3-8B (4096), Qwen2-7B (3584),
# Llama-2-13B (5120), Llama-3-70B (8192).
SHAPES = [(1, 4096), (64, 4096), (512, 4096), (4096, 4096), (4096, 3584), (2048, 5120), (4096, 8192)]
QUICK_SHAPES = {"cuda": [(1, 4096), (4096, 4096)], "cpu": [(1, 4096), (256, 4096)]}


def validate(norm: RMSNorm, x: torch.Tensor, residual: torch.Tensor) -> None:
    atol = 1e-5 if x.dtype == torch.float32 else 2e-2
    torch.testing.assert_close(norm(x), norm.forward_native(x), atol=atol, rtol=atol)
    ref_out, ref_res = norm.forward_native(x, residual)
    out, res = norm(x.clone(), residual.clone())
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=atol)
    torch.testing.assert_close(res, ref_res, atol=0, rtol=0)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    device, dtype = args.device, args.dtype
    elem = torch.tensor([], dtype=dtype).element_size()
    shapes = QUICK_SHAPES[device] if args.quick else SHAPES
    iters = min(args.iters, 5) if args.quick and device == "cpu" else args.iters
    for tokens, hidden in shapes:
        torch.manual_seed(0)
        norm = RMSNorm(hidden, eps=1e-6, dtype=dtype).to(device)
        with torch.no_grad():
            norm.weight.normal_(1.0, 0.2)
        x = torch.randn(tokens, hidden, dtype=dtype, device=device)
        residual = torch.randn(tokens, hidden, dtype=dtype, device=device)
        validate(norm, x, residual)
        shape = f"{tokens}x{hidden} {str(dtype).removeprefix('torch.')}"
        row_bytes = tokens * hidden * elem

        native = time_fn(lambda: norm.forward_native(x), device, iters)
        op = time_fn(lambda: norm(x), device, iters)
        report("rms_norm", shape, op, bytes_moved=2 * row_bytes + hidden * elem, native_seconds=native, device=device)

        # In place: x and residual change every call (the residual grows by x each time: harmless).
        xf, rf = x.clone(), residual.clone()
        native = time_fn(lambda: norm.forward_native(xf, rf), device, iters)
        op = time_fn(lambda: norm(xf, rf), device, iters)
        report("fused_add_rms_norm", shape, op, bytes_moved=4 * row_bytes + hidden * elem, native_seconds=native,
               device=device)


if __name__ == "__main__":
    main()
