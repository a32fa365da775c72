"""wide16_linear (CPU): every GEMM of one step of the default model's shapes (SmolLM2-135M: 30 layers of
qkv 576->960, o 576->576, gate_up 576->3072, down 1536->576, and the 576->49152 head), each layer with its
own weights so that they stream from memory as in the engine, with bf16-exact fp32 weights (an HF bf16
checkpoint loaded as float32). Compared, on the same weights:
  packed_linear   fp32 panels (what such a model got before: 2x the bytes), same bits as wide16_linear
  F.linear fp32   MKL sgemm on the fp32 weights (prefill-sized steps)
  widen + MKL     the bf16 weights widened per call, then MKL sgemm (the prefill alternative that keeps
                  no fp32 copy)
  F.linear bf16   torch's bf16 GEMM (what dtype=bfloat16 ran on a CPU without bf16 hardware)

    python benchmarks/kernels/bench_wide16_linear.py [--quick]
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import matmul_peak_flops, parse_args, report, time_fn  # noqa: E402

from pagedllm import _ops  # noqa: E402

LAYERS = 30
LAYER_SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576)]  # (in, out)
HEAD = (576, 49152)
ROWS = [1, 2, 8, 32, 64, 128, 256]
QUICK_ROWS = [1, 32, 128]
BF16 = 30  # GGML type id


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    if args.device != "cpu":
        print(f"wide16_linear is a CPU-only kernel (the layers use cuBLAS on {args.device}): nothing to measure")
        return
    torch.manual_seed(0)
    shapes = [s for _ in range(LAYERS) for s in LAYER_SHAPES] + [HEAD]
    w16 = [(torch.randn(n, k) * k ** -0.5).bfloat16() for k, n in shapes]
    weights = [w.float() for w in w16]
    panels32 = [_ops.pack_linear_weight(w) for w in weights]
    panels16 = [_ops.pack_wide16_linear_weight(w, BF16) for w in weights]
    fp32_bytes = sum(w.numel() * 4 for w in weights)
    peak = matmul_peak_flops("cpu", torch.float32)
    inputs = {k: torch.randn(max(ROWS), k) for k in {k for k, _ in shapes}}
    for m in QUICK_ROWS if args.quick else ROWS:
        xs = [inputs[k][:m] for k, _ in shapes]
        for x, w, p32, p16 in list(zip(xs, weights, panels32, panels16))[-5:]:  # validate first
            out = _ops.wide16_linear(x, p16, None, w.shape[0])
            torch.testing.assert_close(out.double(), F.linear(x.double(), w.double()), atol=1e-4, rtol=1e-5)
            assert torch.equal(out, _ops.packed_linear(x, p32, None, w.shape[0]))

        runs = {
            "packed_linear": lambda: [_ops.packed_linear(x, p, None, w.shape[0]) for x, w, p in zip(xs, weights, panels32)],
            "wide16_linear": lambda: [_ops.wide16_linear(x, p, None, w.shape[0]) for x, w, p in zip(xs, weights, panels16)],
            "F.linear fp32": lambda: [F.linear(x, w) for x, w in zip(xs, weights)],
            "widen + MKL": lambda: [F.linear(x, w.float()) for x, w in zip(xs, w16)],
            "F.linear bf16": lambda: [F.linear(x.bfloat16(), w) for x, w in zip(xs, w16)],
        }
        iters = 2 if args.quick else 5
        native = time_fn(runs["F.linear fp32"], "cpu", iters, warmup=1)
        flops = 2.0 * m * sum(w.numel() for w in weights)
        for name, fn in runs.items():
            seconds = native if name == "F.linear fp32" else time_fn(fn, "cpu", iters, warmup=1)
            moved = fp32_bytes // 2 if name in ("wide16_linear", "widen + MKL", "F.linear bf16") else fp32_bytes
            report(name, f"one step, {m} rows (30 layers + head)", seconds, bytes_moved=moved, flops=flops,
                   native_seconds=native, device="cpu", peak_flops=peak)


if __name__ == "__main__":
    main()
