"""The CUDA emulator's own errors (csrc/cuda/emu/emu_selftest_kernels.cu, broken on purpose): each stops with a
RuntimeError naming the kernel, the file and the line, and never hangs; the process goes on working."""
import pytest
import torch

from pagedllm import _ops

pytestmark = pytest.mark.cuda_emu

CASES = [  # (case, what the message must say)
    (0, r"barrier_after_exit_kernel.*emu_selftest_kernels\.cu:13: __syncthreads reached by 32 threads while 32"),
    (1, r"deadlock_kernel.*deadlock.*emu_selftest_kernels\.cu:19.*emu_selftest_kernels\.cu:21"),
    (2, r"divergent_shuffle_kernel.*emu_selftest_kernels\.cu:(28|30): divergent warp collective"),
    (3, r"smem_overflow_kernel.*emu_selftest_kernels\.cu:38: store of 16 bytes at shared offset 256, outside the launch's 256"),
    (4, r"cp_async_outside_kernel.*emu_selftest_kernels\.cu:43: cp\.async source: global address .* outside every tensor"),
    (5, r"CUDA error: .*launch of barrier_after_exit_kernel at .*emu_selftest_kernels\.cu:\d+: block of 0 threads"),
]


@pytest.mark.parametrize("case,message", CASES)
def test_broken_kernel_is_reported_with_its_line(case, message):
    if not _ops.cuda_emu_available():
        pytest.skip("the CUDA emulator library was not built")
    emu = _ops._load_cuda_emu()
    with pytest.raises(RuntimeError, match=message):
        emu.selftest(case, torch.zeros(64))
    # The emulator is usable again right after the error.
    x, w = torch.randn(3, 64), torch.ones(64)
    out = torch.empty_like(x)
    emu.rms_norm(out, x, w, 1e-6)
    torch.testing.assert_close(out, x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
