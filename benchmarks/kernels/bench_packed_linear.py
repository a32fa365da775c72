"""packed_linear and quantized_linear (CPU, fp32): every GEMM of one decode step of the default model
(SmolLM2-135M: 30 layers of qkv 576->960, o 576->576, gate_up 576->3072, down 1536->576, and the 576->49152
head), each layer with its own weights so that they stream from memory as in the engine, against F.linear
(MKL sgemm) on the same weights. The weights are made as the default model's are (dequantized GGUF blocks:
Q4_1 layers, a Q8_0 head), so quantized_linear streams their codes and must give packed_linear's bits.

Floor per step: max(weight bytes / copy bandwidth, FLOPs / the fp32 matmul peak). "x native" is the speedup
over F.linear.

    python benchmarks/kernels/bench_packed_linear.py [--quick]
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
ROWS = [1, 2, 4, 8, 16, 32, 48, 64]
QUICK_ROWS = [1, 8, 32]


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    if args.device != "cpu":  # scripts/gpu_check.sh runs every bench with --device cuda
        print(f"packed_linear is a CPU-only kernel (the layers use cuBLAS on {args.device}): nothing to measure")
        return
    if args.dtype != torch.float32:
        raise SystemExit("packed_linear is a float32 kernel: run with --dtype float32")
    torch.manual_seed(0)
    shapes = [s for _ in range(LAYERS) for s in LAYER_SHAPES] + [HEAD]
    weights = [gguf_like_weight(n, k, 8 if (k, n) == HEAD else 4) for k, n in shapes]
    packed = [_ops.pack_linear_weight(w) for w in weights]
    bits = [8 if (k, n) == HEAD else 4 for k, n in shapes]
    qtypes = [8 if b == 8 else 3 for b in bits]  # GGML type ids: Q8_0, Q4_1
    codes = [_ops.pack_quantized_linear_weight(w, q) for w, q in zip(weights, qtypes)]
    weight_bytes = sum(w.numel() * 4 for w in weights)
    code_bytes = sum(c.numel() for c in codes)
    peak = matmul_peak_flops("cpu", torch.float32)
    inputs = {k: torch.randn(max(ROWS), k) for k in {k for k, _ in shapes}}
    for m in QUICK_ROWS if args.quick else ROWS:
        xs = [inputs[k][:m] for k, _ in shapes]
        for x, w, p, c, b in list(zip(xs, weights, packed, codes, qtypes))[-5:]:  # validate against float64 first
            ref = F.linear(x.double(), w.double())
            out = _ops.packed_linear(x, p, None, w.shape[0])
            torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-5)
            assert torch.equal(_ops.quantized_linear(x, c, b, None, w.shape[0]), out)

        def mkl():
            for x, w in zip(xs, weights):
                F.linear(x, w)

        def ours():
            for x, w, p in zip(xs, weights, packed):
                _ops.packed_linear(x, p, None, w.shape[0])

        def ours_quantized():
            for x, w, c, b in zip(xs, weights, codes, qtypes):
                _ops.quantized_linear(x, c, b, None, w.shape[0])

        iters = 3 if args.quick else 10
        native = time_fn(mkl, "cpu", iters, warmup=1)
        op = time_fn(ours, "cpu", iters, warmup=1)
        op_q = time_fn(ours_quantized, "cpu", iters, warmup=1)
        flops = 2.0 * m * sum(w.numel() for w in weights)
        report("packed_linear", f"decode step, {m} rows (30 layers + head)", op, bytes_moved=weight_bytes,
               flops=flops, native_seconds=native, device="cpu", peak_flops=peak)
        report("quantized_linear", f"decode step, {m} rows (30 layers + head)", op_q, bytes_moved=code_bytes,
               flops=flops, native_seconds=native, device="cpu", peak_flops=peak)


def gguf_like_weight(n: int, k: int, bits: int) -> torch.Tensor:
    """[n, k] fp32 made of blocks as GGUF's quantizers write them (32 inputs of one output): Q4_1,
    d * q + m with q in [0, 15], the block's minimum at q = 0 and its maximum at 15; Q8_0, d * q with
    |q| <= 127, the largest at 127; d and m fp16, |w| ~ k ** -0.5 as in a trained layer."""
    scale = k ** -0.5
    if bits == 4:
        d = ((torch.rand(n, k // 32, 1) + 0.1) * scale / 4).half().float()
        q = torch.randint(0, 16, (n, k // 32, 32)).float()
        q[..., 0], q[..., 1] = 0, 15
        return (d * q + (-7.5 * d).half().float()).view(n, k)
    d = ((torch.rand(n, k // 32, 1) + 0.1) * scale / 40).half().float()
    q = torch.randint(-127, 128, (n, k // 32, 32)).float()
    q[..., 0] = 127
    return (d * q).view(n, k)

if __name__ == "__main__":
    main()
