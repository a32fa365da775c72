"""The PTX helpers of csrc/cuda/ptx.cuh, one micro-kernel each (csrc/cuda/ptx_probe_kernels.cu): the emulator's
twins against references written here from the PTX ISA, and, on a GPU, the instructions against the twins."""
import numpy as np
import pytest
import torch

from pagedllm import _ops

EX2, CP_ASYNC, LDSM, LDSM_TRANS, MMA_BF16, MMA_FP16 = range(6)


def probe_input(probe: int) -> torch.Tensor:
    """int32 words [384]: the probe's operands as bit patterns."""
    g = torch.Generator().manual_seed(probe)
    words = torch.randint(-2**31, 2**31 - 1, (384,), dtype=torch.int64, generator=g).to(torch.int32)
    if probe == EX2:  # exponents: ordinary, large, tiny (subnormal result: ftz gives 0), -inf, 0
        x = torch.tensor([0.0, 1.0, -1.0, 0.5, 10.25, -20.5, 127.0, -126.0, -130.0, -149.5, float("-inf"), 3.3],
                         dtype=torch.float32)
        x = torch.cat([x, torch.randn(20, generator=g) * 8])
        words[:32] = x.view(torch.int32)
    if probe in (MMA_BF16, MMA_FP16):  # A 16x16 and B 16x8 in b16, C 16x8 fp32
        dtype = torch.bfloat16 if probe == MMA_BF16 else torch.float16
        ab = torch.randn(16 * 16 + 16 * 8, generator=g).to(dtype)
        words[:192] = ab.view(torch.int32)
        words[192:320] = torch.randn(128, generator=g).view(torch.int32)
    return words


def reference(probe: int, words: torch.Tensor) -> torch.Tensor:
    """What the PTX ISA says the probe writes (int32 words [128]); ex2 and mma as floats."""
    if probe == EX2:
        y = torch.exp2(words[:32].view(torch.float32).double()).float()
        y[y.abs() < torch.finfo(torch.float32).tiny] = 0.0  # .ftz
        return y
    if probe == CP_ASYNC:  # lane l's 16 bytes land at piece 31 - l; odd lanes zero-fill
        pieces = words[:128].view(32, 4).clone()
        pieces[1::2] = 0
        return pieces.flip(0).reshape(-1)
    b16 = words[:128].view(torch.int16).view(32, 8)  # 32 rows of 8 b16: matrix m = rows 8m..8m+7
    out = np.zeros((32, 4), dtype=np.uint32)
    for lane in range(32):
        for m in range(4):
            mat = b16[8 * m:8 * m + 8]
            if probe == LDSM:  # row lane / 4, columns 2 (lane % 4), +1
                lo, hi = mat[lane // 4, 2 * (lane % 4)], mat[lane // 4, 2 * (lane % 4) + 1]
            else:  # .trans: rows 2 (lane % 4), +1 of column lane / 4
                lo, hi = mat[2 * (lane % 4), lane // 4], mat[2 * (lane % 4) + 1, lane // 4]
            out[lane, m] = (int(lo) & 0xFFFF) | ((int(hi) & 0xFFFF) << 16)  # lo in the low half
    if probe in (LDSM, LDSM_TRANS):
        return torch.from_numpy(out.view(np.int32).reshape(-1))
    dtype = torch.bfloat16 if probe == MMA_BF16 else torch.float16
    ab = words[:192].view(dtype).double()
    a, b = ab[:256].view(16, 16), ab[256:].view(16, 8)
    c = words[192:320].view(torch.float32).double().view(16, 8)
    d = (a @ b + c).float()
    frag = torch.empty(32, 4)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        frag[lane] = torch.stack([d[g, 2 * t], d[g, 2 * t + 1], d[g + 8, 2 * t], d[g + 8, 2 * t + 1]])
    return frag.reshape(-1)


def run(namespace, probe: int, words: torch.Tensor, device: str) -> torch.Tensor:
    out = torch.zeros(128, dtype=torch.int32, device=device)
    namespace.ptx_probe(out, words.to(device), probe)
    out = out.cpu()
    return out[:32].view(torch.float32) if probe == EX2 else (
        out.view(torch.float32) if probe in (MMA_BF16, MMA_FP16) else out)


def check(probe: int, got: torch.Tensor, expected: torch.Tensor):
    if probe == EX2:  # ex2.approx: within 2 ulp (relative 2^-22)
        torch.testing.assert_close(got, expected, rtol=2.5e-7, atol=0.0)
    elif probe in (MMA_BF16, MMA_FP16):  # exact products, fp32 sums in an unspecified order
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(got, expected)


PROBES = [EX2, CP_ASYNC, LDSM, LDSM_TRANS, MMA_BF16, MMA_FP16]


@pytest.mark.cuda_emu
@pytest.mark.parametrize("probe", PROBES)
def test_twin_matches_the_ptx_isa(probe):
    if not _ops.cuda_emu_available():
        pytest.skip("the CUDA emulator library was not built")
    emu = _ops._load_cuda_emu()
    words = probe_input(probe)
    check(probe, run(emu, probe, words, "cpu"), reference(probe, words))


@pytest.mark.cuda
@pytest.mark.parametrize("probe", PROBES)
def test_instruction_on_the_gpu_matches_its_twin(probe):
    if not _ops.cuda_emu_available():
        pytest.skip("the CUDA emulator library was not built")
    words = probe_input(probe)
    gpu = run(torch.ops._C, probe, words, "cuda")
    twin = run(_ops._load_cuda_emu(), probe, words, "cpu")
    check(probe, gpu, twin)
    check(probe, gpu, reference(probe, words))
