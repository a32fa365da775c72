"""Shared timing and reporting for benchmarks/kernels/bench_*.py.

Every benchmark validates the op against its plain-torch reference first, then times both and
reports achieved bandwidth (or FLOP/s) next to the copy bandwidth measured on the same device.
Each result is also printed as one `RESULT {json}` line that scripts/gpu_check.sh gathers.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable, Optional

import torch


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="bfloat16 | float16 | float32 (default: bf16 on cuda, fp32 on cpu)")
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="fewer shapes and iterations")
    args = parser.parse_args()
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    args.dtype = getattr(torch, args.dtype)
    if args.iters is None:
        args.iters = 50 if args.device == "cuda" else 10
    return args


def time_fn(fn: Callable[[], object], device: str, iters: int, warmup: int = 3) -> float:
    """Median seconds per call. CUDA: events around each call after warm-up."""
    for _ in range(warmup):
        fn()
    samples = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


_BANDWIDTH: dict = {}


def copy_bandwidth(device: str) -> float:
    """Bytes/s of a large device-to-device copy (read + write counted), measured once per device."""
    if device not in _BANDWIDTH:
        numel = (1 << 28) if device == "cuda" else (1 << 25)  # 512 MiB / 64 MiB of bf16
        src = torch.empty(numel, dtype=torch.bfloat16, device=device).fill_(1)
        dst = torch.empty_like(src)
        seconds = time_fn(lambda: dst.copy_(src), device, iters=20 if device == "cuda" else 5)
        _BANDWIDTH[device] = 2 * src.numel() * src.element_size() / seconds
    return _BANDWIDTH[device]


def report(op: str, shape: str, seconds: float, *, bytes_moved: Optional[float] = None,
           flops: Optional[float] = None, native_seconds: Optional[float] = None,
           device: str = "cpu", peak_flops: Optional[float] = None) -> dict:
    """Print one human line and one RESULT json line; returns the row."""
    row = {"op": op, "shape": shape, "device": device, "median_us": seconds * 1e6}
    if bytes_moved is not None:
        bw = copy_bandwidth(device)
        row["gbps"] = bytes_moved / seconds / 1e9
        row["pct_copy_bw"] = 100.0 * (bytes_moved / seconds) / bw
        row["copy_gbps"] = bw / 1e9
    if flops is not None:
        row["tflops"] = flops / seconds / 1e12
        if peak_flops:
            row["pct_peak"] = 100.0 * (flops / seconds) / peak_flops
    if native_seconds is not None:
        row["speedup_vs_native"] = native_seconds / seconds
    parts = [f"{op:<24} {shape:<40} {row['median_us']:10.1f} us"]
    if "gbps" in row:
        parts.append(f"{row['gbps']:8.1f} GB/s ({row['pct_copy_bw']:5.1f}% of copy)")
    if "tflops" in row:
        parts.append(f"{row['tflops']:7.1f} TFLOP/s" + (f" ({row['pct_peak']:5.1f}% of matmul)" if "pct_peak" in row else ""))
    if "speedup_vs_native" in row:
        parts.append(f"x{row['speedup_vs_native']:.2f} vs native")
    print("  ".join(parts), flush=True)
    print("RESULT " + json.dumps(row), flush=True)
    return row


def matmul_peak_flops(device: str, dtype: torch.dtype = torch.bfloat16, n: int = 8192) -> float:
    """Dense matmul FLOP/s measured by torch, the roof for tensor-core kernels."""
    if device != "cuda":
        n = 1024
        dtype = torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = time_fn(lambda: a @ b, device, iters=20 if device == "cuda" else 3)
    return 2 * n ** 3 / seconds
