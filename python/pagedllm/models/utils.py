"""What the model files share: the switch between our kernels and the plain-torch references, and
thin calls that honour it (so a model file reads the same either way).

The switch is process-wide: PAGEDLLM_NATIVE_OPS=1 in the environment, or set_native_ops(True) /
`with native_ops():` (tests, debugging). Default: the kernels of pagedllm._C.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator, Optional

import torch

_native = os.environ.get("PAGEDLLM_NATIVE_OPS", "0") == "1"


def set_native_ops(flag: bool) -> None:
    global _native
    _native = bool(flag)


def use_native_ops() -> bool:
    return _native


@contextmanager
def native_ops(flag: bool = True) -> Iterator[None]:
    global _native
    previous, _native = _native, bool(flag)
    try:
        yield
    finally:
        _native = previous


def rms_norm(layer, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
    """layer(x) -> normed; layer(x, residual) -> (normed, x + residual). The kernel path may work in
    place on x and residual: use only the returned tensors."""
    if _native:
        return layer.forward_native(x, residual)
    return layer(x, residual)


def rotary(layer, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, k) rotated; the kernel path rotates in place, the native path returns new tensors."""
    if _native:
        return layer.forward_native(positions, q, k)
    return layer(positions, q, k)


def attention(layer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return layer(q, k, v, native=_native)
