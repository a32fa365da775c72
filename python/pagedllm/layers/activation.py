"""Activations, in the model dtype with HF's operation order (so bf16 / fp16 round as HF does).

Plain torch, except SiluAndMul on CPU float32 tensors: one pass of our silu_and_mul kernel
(csrc/cpu/activation.cpp) instead of two torch ops over the gate/up activations.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm import _ops
from pagedllm.models.utils import use_native_ops


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's tanh GELU, written exactly as HF's NewGELUActivation (rounding per op in half types)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_new": gelu_new,
    "gelu_fast": gelu_new,  # same function, HF writes it with different rounding; fp32 equal to ~1e-7
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def get_act_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"Unsupported activation {name!r}; supported: {sorted(_ACTIVATIONS)}") from None


class SiluAndMul(nn.Module):
    """x: [..., 2 * d] = [gate | up] -> act(gate) * up: [..., d] (HF: act_fn(gate_proj(x)) * up_proj(x))."""

    def __init__(self, act: str = "silu"):
        super().__init__()
        self.act_name = act
        self.act = get_act_fn(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.act is F.silu and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2
                and not use_native_ops()):
            return _ops.silu_and_mul(x)
        return self.forward_native(x)

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        return self.act(x[..., :d]) * x[..., d:]

    def extra_repr(self) -> str:
        return self.act_name
