"""Shared test helpers (tests/ is on sys.path through tests/conftest.py)."""
import pytest
import torch

# Parametrize kernel tests over these: CPU always, CUDA where a GPU and the CUDA build exist.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]

# The CUDA kernels and their host launchers run by the CUDA emulator (csrc/cuda/emu) on CPU
# tensors, under two fiber schedules (threads of a block in order, and in reverse). A test
# parametrized with one of these runs with device "cpu" and every kernel op sent to the emulator
# (tests/conftest.py); it is skipped where the emulator library was not built.
EMU_DEVICES = [pytest.param("cuda_emu", marks=pytest.mark.cuda_emu),
               pytest.param("cuda_emu_reversed", marks=pytest.mark.cuda_emu)]
KERNEL_DEVICES = DEVICES + EMU_DEVICES

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def non_contiguous_rows(t: torch.Tensor, pad: int = 3) -> torch.Tensor:
    """The same values as t ([rows, ..., last]) viewed out of a wider buffer, so the row stride
    is larger than the row: the shape a slice of a fused qkv projection has."""
    wide = torch.full((*t.shape[:-1], t.shape[-1] + pad), float("nan"), dtype=t.dtype, device=t.device)
    wide[..., : t.shape[-1]] = t
    return wide[..., : t.shape[-1]]
