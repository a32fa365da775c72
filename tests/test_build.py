"""The extension as built: every op registered, CUDA kernels registered when they were compiled."""
import os
import subprocess
import sys

import pytest
import torch

from pagedllm import _C, _ops  # noqa: F401

OPS = ["rms_norm", "fused_add_rms_norm", "rotary_embedding", "reshape_and_cache", "paged_attention",
       "paged_prefill_attention", "sample_tokens"]
# The fp32 decode GEMM on packed weights: on CUDA the layers use cuBLAS (F.linear) instead.
CPU_ONLY_OPS = ["pack_linear_weight", "packed_linear", "pack_quantized_linear_weight", "quantized_linear",
                "pack_int8_linear_weight", "quantize_rows_int8", "int8_linear",
                "silu_and_mul", "decoder_layers"]


def registrations(op: str) -> str:
    return torch._C._dispatch_dump(f"_C::{op}")


@pytest.mark.parametrize("op", OPS + CPU_ONLY_OPS)
def test_op_has_cpu_kernel(op):
    assert "CPU: registered" in registrations(op)


@pytest.mark.parametrize("op", OPS)
def test_cuda_kernel_registered_iff_compiled(op):
    assert ("CUDA: registered" in registrations(op)) == bool(_C.cuda_compiled)


@pytest.mark.parametrize("op", CPU_ONLY_OPS)
def test_cpu_only_op_has_no_cuda_kernel(op):
    assert "CUDA: registered" not in registrations(op)


def test_cuda_build_requested_means_compiled():
    # .ci/run sets PAGEDLLM_TARGET=cuda: then the CUDA kernels must be in the extension.
    if os.environ.get("PAGEDLLM_TARGET") != "cuda":
        pytest.skip("PAGEDLLM_TARGET is not cuda")
    assert _C.cuda_compiled
    assert "9.0" in _C.cuda_arch_list or os.environ.get("TORCH_CUDA_ARCH_LIST")


def test_env_command_lists_every_op():
    out = subprocess.run([sys.executable, "-m", "pagedllm.env"], capture_output=True, text=True, check=True).stdout
    assert f"torch                  {torch.__version__}" in out
    ops_line = next(line for line in out.splitlines() if line.startswith("ops"))
    for op in OPS:
        assert op in ops_line
    assert ("CUDA kernels compiled  True" in out) == bool(_C.cuda_compiled)


def test_one_shared_cuda_runtime():
    """The CUDA objects use torch's shared libcudart, never a static copy beside it: the CMake link line has
    no cudart_static, and a CUDA build of _C defines no CUDA runtime function of its own."""
    import shutil
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    ninja = Path(os.environ.get("PAGEDLLM_BUILD_DIR", root / "build" / "cmake-cuda")) / "build.ninja"
    if not ninja.exists() and not _C.cuda_compiled:
        pytest.skip("no CUDA build here")
    if ninja.exists():
        assert "cudart_static" not in ninja.read_text()
    if _C.cuda_compiled and shutil.which("nm"):
        defined = subprocess.run(["nm", "-D", "--defined-only", _C.__file__], capture_output=True, text=True,
                                 check=True).stdout.split()
        assert not [s for s in defined if s.startswith(("cudaLaunchKernel", "cudaGetDevice", "cudaMalloc"))]
        undefined = subprocess.run(["nm", "-D", "--undefined-only", _C.__file__], capture_output=True, text=True,
                                   check=True).stdout
        assert "libcudart.so" in undefined
