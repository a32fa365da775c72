"""Which 16-bit matrix math this CPU runs natively, and so which dtype a CPU model computes in.

A bf16 (fp16) model on a CPU without bf16 (fp16) dot-product hardware runs torch's 16-bit GEMMs as
conversions around fp32 math: ~4x slower than a float32 model. There, `dtype=bfloat16` builds the
float32 model with the weights rounded to bfloat16 (models/loader.py round_weights), which the CPU
decode GEMMs stream as 16-bit panels widened in registers (csrc/cpu/wide16_linear.cpp): half of the
fp32 weight bytes, fp32 math. Where AVX512_BF16 / AMX-BF16 (AVX512_FP16 / AMX-FP16 for fp16) exist,
the model stays 16-bit and torch's oneDNN GEMMs use them (a bfloat16 model's GEMMs take
csrc/cpu/bf16_dot_linear.cpp where the running CPU has AVX512_BF16: layers/linear.py BF16_DOT_KIND).

PAGEDLLM_CPU_FEATURES overrides the detected flags (a comma-separated list of /proc/cpuinfo flag
names, e.g. "amx_bf16,avx512_bf16"; "none" for no flag): how the selection is tested on any machine.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch

FEATURES_ENV = "PAGEDLLM_CPU_FEATURES"

# The /proc/cpuinfo flags that give native dot products of each 16-bit type.
NATIVE_16BIT_FLAGS = {
    torch.bfloat16: ("amx_bf16", "avx512_bf16"),
    torch.float16: ("amx_fp16", "avx512_fp16"),
}


def _cpuinfo_field(name: str) -> str:
    """The value of the first /proc/cpuinfo line named name; "" where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":", 1)[0].strip() == name:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


@functools.lru_cache(maxsize=1)
def _detected_flags() -> frozenset[str]:
    return frozenset(_cpuinfo_field("flags").split())


@functools.lru_cache(maxsize=1)
def cpu_vendor() -> str:
    """/proc/cpuinfo's vendor_id (GenuineIntel, AuthenticAMD, ...); "" where there is none."""
    return _cpuinfo_field("vendor_id")


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags: PAGEDLLM_CPU_FEATURES when set, else /proc/cpuinfo's (empty elsewhere)."""
    override: Optional[str] = os.environ.get(FEATURES_ENV)
    if override is not None:
        names = {name.strip().lower() for name in override.split(",")}
        return frozenset(names - {"", "none"})
    return _detected_flags()


def native_16bit_math(dtype: torch.dtype) -> bool:
    """Whether this CPU has dot-product instructions for dtype (bfloat16 / float16)."""
    return any(flag in cpu_flags() for flag in NATIVE_16BIT_FLAGS.get(dtype, ()))


def cpu_math_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype a model asked for in dtype computes in on device: float32 for a 16-bit dtype on a CPU
    without that type's hardware (its weights keep their 16-bit values), else dtype itself."""
    if device.type == "cpu" and dtype in NATIVE_16BIT_FLAGS and not native_16bit_math(dtype):
        return torch.float32
    return dtype
