"""wide16_linear (the CPU decode GEMM over the 16-bit panels of fp32 weights that are exactly bf16 /
fp16 values): bit-identical to packed_linear on the fp32 weights, close to a float64 reference, and
chosen by pack_weight for such weights only."""
import pytest
import torch
import torch.nn.functional as F

from testing_utils import non_contiguous_rows

from pagedllm import _ops
from pagedllm.layers import linear as linear_mod
from pagedllm.layers.linear import Linear, pack_linear_weights, pack_weight

BF16, F16 = 30, 1
DTYPE = {BF16: torch.bfloat16, F16: torch.float16}
# One fp32 FMA chain over k per output against float64 (as test_packed_linear.py): ~sqrt(K) ulps.
TOL = dict(atol=1e-4, rtol=1e-5)


def weight_of(qtype, n, k, seed=0):
    """A float32 weight whose every value is exactly of qtype's 16-bit format."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g).to(DTYPE[qtype]).float()


def reference(x, w, b):
    return F.linear(x.double(), w.double(), None if b is None else b.double())


# N: a single short panel (5), a partial one (83), whole panels (96). K: 1, odd, more than one widen
# chunk (64) with a remainder (130), the default model's 576. M: the fused register rows (1, 2), one
# past them (3), a full and a split tile (12, 13), 33, 64 and 130 (more than any decode step).
@pytest.mark.parametrize("qtype", [BF16, F16])
@pytest.mark.parametrize("n,k", [(5, 1), (83, 130), (96, 576), (33, 67)])
@pytest.mark.parametrize("m", [1, 2, 3, 12, 13, 33, 64, 130])
@pytest.mark.parametrize("bias", [False, True])
def test_bit_identical_to_packed_linear(qtype, n, k, m, bias):
    w = weight_of(qtype, n, k, seed=n + k + m)
    x = torch.randn(m, k)
    b = torch.randn(n) if bias else None
    packed = _ops.pack_wide16_linear_weight(w, qtype)
    assert packed.dtype == DTYPE[qtype] and packed.shape == ((n + 31) // 32, k, 32)
    out = _ops.wide16_linear(x, packed, b, n)
    assert out.shape == (m, n) and out.dtype == torch.float32
    # Same FMA chain over the same fp32 weights: the same bits, -0.0 included.
    assert torch.equal(out.view(torch.int32), _ops.packed_linear(x, _ops.pack_linear_weight(w), b, n).view(torch.int32))
    torch.testing.assert_close(out.double(), reference(x, w, b), **TOL)


def test_pack_layout_keeps_every_bit():
    w = weight_of(BF16, 40, 3)
    w[0, 0], w[1, 1] = -0.0, float("inf")
    p = _ops.pack_wide16_linear_weight(w, BF16)
    assert p.shape == (2, 3, 32)
    for n in range(40):
        assert torch.equal(p[n // 32, :, n % 32].float().view(torch.int32), w[n].view(torch.int32))
    assert torch.count_nonzero(p[1, :, 8:].float()) == 0  # past N: zeros


def test_fp16_subnormals_and_extremes_widen_exactly():
    """F16C's conversion of subnormals, the largest half and -0.0 gives the exact values."""
    specials = torch.tensor([2.0 ** -24, -(2.0 ** -24), 3 * 2.0 ** -20, 65504.0, -65504.0, -0.0, 1.0, 0.5])
    w = specials.repeat(40, 4)[:, :30]  # [40, 30]
    p = _ops.pack_wide16_linear_weight(w, F16)
    assert p.numel() and torch.equal(p[0, :, 0].float(), w[0])
    for m in (1, 2, 5):
        x = torch.randn(m, 30)
        assert torch.equal(_ops.wide16_linear(x, p, None, 40), _ops.packed_linear(x, _ops.pack_linear_weight(w), None, 40))


def test_only_exact_weights_are_packed():
    w = weight_of(BF16, 40, 64)
    assert _ops.pack_wide16_linear_weight(w, BF16).numel()
    late = w.clone()
    late[39, 63] += 2.0 ** -20  # one value off the format, in the last row: found after the first
    assert _ops.pack_wide16_linear_weight(late, BF16).numel() == 0
    assert _ops.pack_wide16_linear_weight(torch.randn(40, 64), BF16).numel() == 0
    big = weight_of(F16, 40, 64)
    big[5, 5] = 65536.0  # a bf16 value past fp16's range
    assert _ops.pack_wide16_linear_weight(big, F16).numel() == 0
    tiny = weight_of(F16, 40, 64)
    tiny[7, 9] = 2.0 ** -26  # below fp16's smallest subnormal
    assert _ops.pack_wide16_linear_weight(tiny, F16).numel() == 0


def test_strided_batched_and_empty_input():
    w = weight_of(F16, 70, 96)
    p = _ops.pack_wide16_linear_weight(w, F16)
    x = non_contiguous_rows(torch.randn(9, 96))  # row stride 99, NaN in the gaps
    torch.testing.assert_close(_ops.wide16_linear(x, p, None, 70).double(), reference(x, w, None), **TOL)
    x3 = torch.randn(2, 7, 96)
    out = _ops.wide16_linear(x3, p, None, 70)
    assert out.shape == (2, 7, 70)
    torch.testing.assert_close(out.double(), reference(x3, w, None), **TOL)
    assert _ops.wide16_linear(torch.empty(0, 96), p, None, 70).shape == (0, 70)


def test_errors():
    w = weight_of(BF16, 40, 8)
    p = _ops.pack_wide16_linear_weight(w, BF16)
    with pytest.raises(RuntimeError, match="qtype must be 30"):
        _ops.pack_wide16_linear_weight(w, 3)
    with pytest.raises(RuntimeError, match="must be a float32 CPU tensor"):
        _ops.pack_wide16_linear_weight(w.bfloat16(), BF16)
    with pytest.raises(RuntimeError, match="x must be float32"):
        _ops.wide16_linear(torch.randn(2, 8).bfloat16(), p, None, 40)
    with pytest.raises(RuntimeError, match="x has 9 features, the weight expects 8"):
        _ops.wide16_linear(torch.randn(2, 9), p, None, 40)
    with pytest.raises(RuntimeError, match="does not match the packed weight"):
        _ops.wide16_linear(torch.randn(2, 8), p, None, 70)
    with pytest.raises(RuntimeError, match="bias must be"):
        _ops.wide16_linear(torch.randn(2, 8), p, torch.randn(39), 40)
    with pytest.raises(RuntimeError, match="must come from pack_wide16_linear_weight"):
        _ops.wide16_linear(torch.randn(2, 8), _ops.pack_linear_weight(w), None, 40)


def test_pack_weight_prefers_codes_then_16_bits(monkeypatch):
    assert pack_weight(weight_of(BF16, 64, 64)).qtype == BF16
    # fp16 values, most with more mantissa bits than bf16 holds: fp16 panels.
    fp16_only = weight_of(F16, 64, 64)
    assert not torch.equal(fp16_only, fp16_only.bfloat16().float())
    assert pack_weight(fp16_only).qtype == F16
    assert pack_weight(torch.randn(64, 64)).qtype == 0
    # Dequantized Q8_0 blocks of power-of-two scales are also bf16 values: the codes (fewer bytes) win.
    q8 = torch.randint(-127, 128, (64, 64)).float()
    q8[:, ::32] = 127  # every block's scale is then exactly 2^-7
    q8 *= 2.0 ** -7
    assert pack_weight(q8).qtype == 8
    monkeypatch.setenv(linear_mod.WIDE16_ENV, "0")
    assert pack_weight(weight_of(BF16, 64, 64)).qtype == 0


def test_layer_uses_the_16_bit_panels_from_one_row(monkeypatch):
    layer = Linear(96, 70, bias=True, dtype=torch.float32)
    with torch.no_grad():
        layer.weight.copy_(weight_of(BF16, 70, 96))
        layer.bias.normal_()
    added = pack_linear_weights(layer)
    assert layer.packed.qtype == BF16 and added == layer.packed.nbytes == 3 * 96 * 32 * 2  # half of fp32 panels
    calls = []
    real = _ops.wide16_linear
    monkeypatch.setattr(linear_mod._ops, "wide16_linear", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    monkeypatch.setattr(linear_mod, "PACKED_MAX_ROWS", 64)  # the limit of a host where MKL wins above it
    hi = linear_mod.PACKED_MAX_ROWS
    for m in (1, hi, hi + 1):
        x = torch.randn(m, 96)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-4, rtol=1e-5)
    assert calls == [1, hi]  # above PACKED_MAX_ROWS: F.linear


def test_16_bit_panels_need_half_the_memory_of_fp32_ones(monkeypatch):
    layer = Linear(64, 40, dtype=torch.float32)
    with torch.no_grad():
        layer.weight.copy_(weight_of(BF16, 40, 64))
    fp32_bytes = 40 * 64 * 4
    monkeypatch.setattr(linear_mod, "_available_memory", lambda: fp32_bytes)  # fp32 panels would not fit
    pack_linear_weights(layer)
    assert layer.packed.qtype == BF16
    monkeypatch.setattr(linear_mod, "_available_memory", lambda: fp32_bytes - 2)
    pack_linear_weights(layer)
    assert layer.packed is None


@pytest.mark.slow
@pytest.mark.parametrize("source", ["wide16_linear.cpp", "quantized_linear.cpp", "attention_decode.cpp",
                                    "bf16_dot_linear.cpp"])
@pytest.mark.parametrize("march", ["x86-64-v4", "x86-64-v3", "x86-64"])
def test_other_isa_variants_compile(source, march, tmp_path):
    """The AVX-512 (x86-64-v4), AVX2 (x86-64-v3) and portable (x86-64) variants of the panel kernels
    (and of the decode attention's inner loop): -march=native builds only one of them, so compile each,
    to object code, so that they at least build."""
    import shutil
    import subprocess
    from pathlib import Path

    from torch.utils import cpp_extension

    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    csrc = Path(__file__).resolve().parents[2] / "csrc"
    includes = [f"-I{p}" for p in [str(csrc), *cpp_extension.include_paths()]]
    cmd = [cxx, "-std=c++20", "-O2", f"-march={march}", "-fopenmp", "-Wall", "-Werror", "-Wno-unused-function",
           "-Wno-maybe-uninitialized",  # GCC 12 flags its own avx512fintrin.h (`__m512i __Y = __Y;`)
           "-Wno-sign-compare", *includes, "-c", str(csrc / "cpu" / source), "-o", str(tmp_path / "w.o")]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.parametrize("dtype,qtype", [(torch.bfloat16, BF16), (torch.float16, F16)])
def test_16_bit_model_decode_gemms_take_its_own_bits_as_panels(monkeypatch, dtype, qtype):
    """A model kept in bf16 / fp16 (a CPU with that type's hardware): 1-NATIVE16_MAX_ROWS rows go through
    wide16_linear in fp32 math on its own weights, rounded back to its dtype; more rows keep torch's
    16-bit GEMM; PAGEDLLM_CPU_WIDE16_WEIGHTS=0 packs nothing. (bf16 with AVX512_BF16 takes bf16_dot_linear
    unless PAGEDLLM_CPU_BF16_DOT=0: test_bf16_dot_linear.py.)"""
    monkeypatch.setenv(linear_mod.BF16_DOT_ENV, "0")
    torch.manual_seed(0)
    layer = Linear(96, 70, bias=True, dtype=dtype)
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    added = pack_linear_weights(layer)
    assert layer.packed.qtype == qtype and layer.packed.act_dtype == dtype and added == 3 * 96 * 32 * 2
    calls = []
    real = _ops.wide16_linear
    monkeypatch.setattr(linear_mod._ops, "wide16_linear", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    hi = linear_mod.NATIVE16_MAX_ROWS
    w32, b32 = layer.weight.float(), layer.bias.float()
    for m in (1, hi, hi + 1):
        x = torch.randn(m, 96).to(dtype)
        y = layer(x)
        assert y.dtype == dtype
        if m <= hi:  # packed_linear's bits on the widened weights (the fp32 result), then one rounding
            ref = _ops.packed_linear(x.float(), _ops.pack_linear_weight(w32), b32, 70).to(dtype)
        else:
            ref = F.linear(x, layer.weight, layer.bias)
        assert torch.equal(y, ref)
    assert calls == [1, hi]
    monkeypatch.setenv(linear_mod.WIDE16_ENV, "0")
    assert pack_linear_weights(layer) == 0 and layer.packed is None
