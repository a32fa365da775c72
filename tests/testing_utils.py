"""Shared test helpers (tests/ is on sys.path through tests/conftest.py)."""
import pytest
import torch

# Parametrize kernel tests over these: CPU always, CUDA where a GPU and the CUDA build exist.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def non_contiguous_rows(t: torch.Tensor, pad: int = 3) -> torch.Tensor:
    """The same values as t ([rows, ..., last]) viewed out of a wider buffer, so the row stride
    is larger than the row: the shape a slice of a fused qkv projection has."""
    wide = torch.full((*t.shape[:-1], t.shape[-1] + pad), float("nan"), dtype=t.dtype, device=t.device)
    wide[..., : t.shape[-1]] = t
    return wide[..., : t.shape[-1]]
