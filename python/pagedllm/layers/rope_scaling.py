"""RoPE variants selected by a config's rope scaling: each one only changes how the inverse
frequencies (and so the cos / sin cache) are built; applying them is RotaryEmbedding's job.

Formulas follow transformers' modeling_rope_utils (_compute_*_parameters) operation by operation, so
the fp32 cache is bit-identical to the cos / sin HF computes.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch

from pagedllm.layers.rotary import RotaryEmbedding

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


class LinearScalingRotaryEmbedding(RotaryEmbedding):
    """Position interpolation: inv_freq / factor."""

    def __init__(self, *args, scaling_factor: float, **kwargs):
        self.scaling_factor = float(scaling_factor)
        super().__init__(*args, **kwargs)

    def _compute_inv_freq(self, base: float) -> torch.Tensor:
        return super()._compute_inv_freq(base) / self.scaling_factor


class Llama3RotaryEmbedding(RotaryEmbedding):
    """Llama 3.1 frequency-dependent scaling (transformers' _compute_llama3_parameters)."""

    def __init__(self, *args, scaling_factor: float, low_freq_factor: float, high_freq_factor: float,
                 original_max_position: int, **kwargs):
        self.scaling_factor = float(scaling_factor)
        self.low_freq_factor = float(low_freq_factor)
        self.high_freq_factor = float(high_freq_factor)
        self.original_max_position = int(original_max_position)
        super().__init__(*args, **kwargs)

    def _compute_inv_freq(self, base: float) -> torch.Tensor:
        inv_freq = super()._compute_inv_freq(base)
        factor, low, high = self.scaling_factor, self.low_freq_factor, self.high_freq_factor
        old_context_len = self.original_max_position
        low_freq_wavelen = old_context_len / low
        high_freq_wavelen = old_context_len / high
        wavelen = 2 * math.pi / inv_freq
        inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth_factor = (old_context_len / wavelen - low) / (high - low)
        smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
        is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama)


def get_rope(head_size: int, rotary_dim: int, max_position: int, base: float, is_neox_style: bool = True,
             rope_scaling: Optional[dict[str, Any]] = None, dtype: Optional[torch.dtype] = None) -> RotaryEmbedding:
    """The RotaryEmbedding for a config's rope scaling dict (None, or with "rope_type" / legacy "type").

    "dynamic" (NTK) equals the default RoPE for positions below max_position (HF only rescales once
    a sequence grows past max_position_embeddings, which is the cache length here), so it is built as
    the default one over max_position positions."""
    args = (head_size, rotary_dim, max_position, base, is_neox_style, dtype)
    rope_type = "default"
    if rope_scaling:
        rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    if rope_type in ("default", "dynamic"):
        return RotaryEmbedding(*args)
    if rope_type == "linear":
        return LinearScalingRotaryEmbedding(*args, scaling_factor=rope_scaling["factor"])
    if rope_type == "llama3":
        return Llama3RotaryEmbedding(
            *args, scaling_factor=rope_scaling["factor"], low_freq_factor=rope_scaling["low_freq_factor"],
            high_freq_factor=rope_scaling["high_freq_factor"],
            original_max_position=rope_scaling.get("original_max_position_embeddings", max_position))
    raise ValueError(f"Unsupported rope scaling type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")


def rope_parameters(config) -> tuple[float, Optional[dict[str, Any]]]:
    """(rope_theta, rope scaling dict or None) from an HF config, transformers 5 style
    (config.rope_parameters holding rope_theta and rope_type) or 4 style (rope_theta + rope_scaling)."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and params and "rope_theta" in params:
        scaling = dict(params)
        base = float(scaling.pop("rope_theta"))
        if scaling.get("rope_type", scaling.get("type", "default")) == "default":
            return base, None
        if "original_max_position_embeddings" not in scaling:
            scaling["original_max_position_embeddings"] = getattr(
                config, "original_max_position_embeddings", config.max_position_embeddings)
        return base, scaling
    base = float(getattr(config, "rope_theta", 10000.0))
    scaling = getattr(config, "rope_scaling", None)
    return base, (dict(scaling) if scaling else None)
