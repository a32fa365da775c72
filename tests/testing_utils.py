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


def assert_close_to_row_scale(out: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    """|out - ref| <= rel * (|ref| + the largest |ref| of its row), row = the last dim (one token's head).

    Attention outputs are averages of V rows, so their size falls with the context (~0.03 at 2000 random keys
    against ~1 at a few keys): an absolute tolerance that fits short rows would accept ~70% errors on long ones
    and hide, say, a split-KV merge bug. Both the kernel and the reference accumulate in fp32 and round once (or
    feed P to the tensor cores in 16 bits), so their difference is a few ulps of the row's own scale."""
    out, ref = out.float(), ref.float()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert not out.isnan().any(), "NaN in the output"
    row_scale = ref.abs().amax(dim=-1, keepdim=True)
    bound = rel * (ref.abs() + row_scale)
    excess = (out - ref).abs() - bound
    if (excess > 0).any():
        worst = int(excess.argmax())
        raise AssertionError(f"{int((excess > 0).sum())} of {out.numel()} elements beyond rel={rel} of their row's "
                             f"scale; worst: out={out.view(-1)[worst].item():.6g} ref={ref.view(-1)[worst].item():.6g} "
                             f"row scale={row_scale.expand_as(ref).reshape(-1)[worst].item():.6g}")
