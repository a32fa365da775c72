"""RMSNorm (Llama / Qwen style), with the fused residual add.

Math as HF LlamaRMSNorm, rounding order included (the kernels follow it exactly):
    h = x.float(); h = h * rsqrt(mean(h^2) + eps); out = weight * h.to(x.dtype)
With a residual (vLLM semantics): residual = (x + residual).to(dtype) first, then the norm of that
rounded sum; the layer returns (normed, new_residual).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

Output = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.hidden_size = hidden_size
        self.variance_epsilon = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype))

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.variance_epsilon}"

    def forward_native(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> Output:
        """Plain torch; never modifies its arguments."""
        dtype = x.dtype
        if residual is not None:
            x = (x.float() + residual.float()).to(dtype)
            residual = x
        h = x.float()
        variance = h.pow(2).mean(dim=-1, keepdim=True)
        h = h * torch.rsqrt(variance + self.variance_epsilon)
        out = self.weight * h.to(dtype)
        return out if residual is None else (out, residual)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> Output:
        """The kernels. Without residual: a new tensor. With residual: fused_add_rms_norm runs IN PLACE
        on the given x and residual (x becomes the normed output, residual becomes x + residual) and
        returns them as (x, residual); only when they cannot be viewed as strided rows [rows, hidden]
        does it work on contiguous copies. Either way, use the returned tensors."""
        from pagedllm import _ops

        if residual is None:
            return _ops.rms_norm(x, self.weight, self.variance_epsilon)
        if not _rows_viewable(x):
            x = x.contiguous()
        if not _rows_viewable(residual):
            residual = residual.contiguous()
        _ops.fused_add_rms_norm(x, residual, self.weight, self.variance_epsilon)
        return x, residual


def _rows_viewable(t: torch.Tensor) -> bool:
    """True when t can be viewed as [rows, hidden] with one row stride and a contiguous last dim."""
    if t.dim() == 0 or (t.shape[-1] > 1 and t.stride(-1) != 1):
        return False
    try:
        t.view(-1, t.shape[-1])
    except RuntimeError:
        return False
    return True
