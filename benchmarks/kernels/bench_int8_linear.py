"""int8_linear (the opt-in gguf_int8 mode) against the exact codes path (quantized_linear, <= 64 rows) and
F.linear (MKL fp32) on one Q4_1 layer of the default model's shape (gate_up, 3072 x 576), after checking
int8_linear against the fp32 product within its rounding bound. Best of --iters calls (the minimum: the
machine this runs on is shared; the weights stay in cache: compute, not streaming, is compared).

    python benchmarks/kernels/bench_int8_linear.py [--threads 1] [--iters 60]
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path[:0] = [str(Path(__file__).resolve().parents[2] / "tests" / d) for d in ("kernels", "")]
from test_quantized_linear import gguf_round_trip  # noqa: E402

from pagedllm import _ops  # noqa: E402

Q4_1 = 3


def best(fn, iters: int) -> float:
    fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--iters", type=int, default=60)
    p.add_argument("--rows", type=int, nargs="*", default=[1, 8, 32, 64, 128, 512])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    n, k = 3072, 576
    w = gguf_round_trip(torch.randn(n, k) * 0.05, Q4_1)
    codes = _ops.pack_quantized_linear_weight(w, Q4_1)
    packed = _ops.pack_int8_linear_weight(codes, Q4_1, n)
    x = torch.randn(4, k)
    _, dx, _ = _ops.quantize_rows_int8(x)
    bound = 0.5 * (dx.double().repeat_interleave(32, 1) @ w.double().abs().t())
    assert ((_ops.int8_linear(x, packed, Q4_1, None, n).double() - F.linear(x.double(), w.double())).abs()
            <= bound * 1.0001 + 1e-5).all()
    print(f"{n} x {k} Q4_1, {args.threads} thread(s), best of {args.iters}")
    for m in args.rows:
        x = torch.randn(m, k)
        t8 = best(lambda: _ops.int8_linear(x, packed, Q4_1, None, n), args.iters)
        tq = best(lambda: _ops.quantized_linear(x, codes, Q4_1, None, n), args.iters) if m <= 64 else float("nan")
        tf = best(lambda: F.linear(x, w), args.iters)
        print(f"rows {m:4d}: int8 {t8 * 1e3:7.3f} ms ({2 * m * n * k / t8 / 1e9:6.1f} GOP/s)   exact codes "
              f"{tq * 1e3:7.3f} ms   F.linear {tf * 1e3:7.3f} ms ({2 * m * n * k / tf / 1e9:6.1f} GFLOP/s)")


if __name__ == "__main__":
    main()
