"""Rotary position embedding (RoPE), neox and GPT-J styles, partial rotary dims.

cos_sin_cache: [max_position, rotary_dim] = [cos(pos * inv_freq) | sin(pos * inv_freq)], built in
fp32 and cast to the model dtype once. For each head, pair i (0 <= i < rotary_dim / 2) is
    neox:  (x, y) = (h[i], h[i + rotary_dim / 2])      GPT-J: (x, y) = (h[2i], h[2i + 1])
    x' = x cos_i - y sin_i,   y' = y cos_i + x sin_i
computed in fp32 and rounded to the dtype once; dims beyond rotary_dim pass through unchanged.
Subclasses (rope scaling: llama3, linear, ...) override _compute_inv_freq / _compute_cos_sin_cache.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    def __init__(self, head_size: int, rotary_dim: int, max_position: int, base: float,
                 is_neox_style: bool = True, dtype: Optional[torch.dtype] = None):
        super().__init__()
        if rotary_dim % 2 != 0 or not 0 < rotary_dim <= head_size:
            raise ValueError(f"rotary_dim must be even and in (0, head_size={head_size}], got {rotary_dim}")
        self.head_size = head_size
        self.rotary_dim = rotary_dim
        self.max_position = max_position
        self.base = base
        self.is_neox_style = is_neox_style
        self.dtype = dtype if dtype is not None else torch.get_default_dtype()
        cache = self._compute_cos_sin_cache().to(self.dtype)
        self.register_buffer("cos_sin_cache", cache, persistent=False)

    def _compute_inv_freq(self, base: float) -> torch.Tensor:
        """[rotary_dim / 2] fp32: 1 / base^(2i / rotary_dim)."""
        exponents = torch.arange(0, self.rotary_dim, 2, dtype=torch.float) / self.rotary_dim
        return 1.0 / (base ** exponents)

    def _compute_cos_sin_cache(self) -> torch.Tensor:
        """[max_position, rotary_dim] fp32: cos half | sin half."""
        inv_freq = self._compute_inv_freq(self.base)
        t = torch.arange(self.max_position, dtype=torch.float)
        freqs = torch.outer(t, inv_freq)
        return torch.cat((freqs.cos(), freqs.sin()), dim=-1)

    def extra_repr(self) -> str:
        return (f"head_size={self.head_size}, rotary_dim={self.rotary_dim}, max_position={self.max_position}, "
                f"base={self.base}, is_neox_style={self.is_neox_style}")

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [num_tokens, num_heads, head_size]; cos, sin: [num_tokens, 1, rotary_dim / 2] fp32."""
        rot = x[..., : self.rotary_dim].float()
        if self.is_neox_style:
            x1, x2 = rot.chunk(2, dim=-1)
        else:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
        o1 = x1 * cos - x2 * sin
        o2 = x2 * cos + x1 * sin
        if self.is_neox_style:
            rotated = torch.cat((o1, o2), dim=-1)
        else:
            rotated = torch.stack((o1, o2), dim=-1).flatten(-2)
        return torch.cat((rotated.to(x.dtype), x[..., self.rotary_dim:]), dim=-1)

    def forward_native(self, positions: torch.Tensor, query: torch.Tensor,
                       key: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Plain torch; returns new tensors shaped like query and key (which are not modified).
        positions: [num_tokens] int64; query: [num_tokens, num_heads * head_size] or
        [num_tokens, num_heads, head_size]; key likewise (or None)."""
        cos_sin = self.cos_sin_cache.to(query.device)[positions].float()  # cache values in the cache's dtype
        cos, sin = cos_sin.chunk(2, dim=-1)
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)

        def apply(t: torch.Tensor) -> torch.Tensor:
            heads = t.reshape(t.shape[0], -1, self.head_size)
            return self._rotate(heads, cos, sin).reshape(t.shape)

        return apply(query), (apply(key) if key is not None else None)

    def forward(self, positions: torch.Tensor, query: torch.Tensor,
                key: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The kernel, IN PLACE on query and key; returns them."""
        from pagedllm import _ops

        if self.cos_sin_cache.device != query.device or self.cos_sin_cache.dtype != query.dtype:
            # Once per model (the kernel needs the cache in the query's dtype and device).
            self.cos_sin_cache = self.cos_sin_cache.to(query.device, dtype=query.dtype)
        _ops.rotary_embedding(positions, query, key, self.head_size, self.cos_sin_cache, self.is_neox_style)
        return query, key
