"""bf16_dot_linear (a bfloat16 model's GEMMs through AVX512_BF16 dot products): bit for bit the instruction's
arithmetic written in plain torch (bf16 products exact in fp32, each pair's two sums rounded in order, the
result rounded to bfloat16), its packed layout, its argument checks, and the choice Linear makes. Runs where
the CPU has AVX512_BF16; elsewhere the pack is empty and the model keeps its 16-bit panels (tested too)."""
import pytest
import torch
import torch.nn.functional as F

from testing_utils import non_contiguous_rows

from pagedllm import _ops
from pagedllm.cpu_features import FEATURES_ENV
from pagedllm.layers import linear as linear_mod
from pagedllm.layers.linear import Linear, pack_linear_weights

HAS_DOT = linear_mod.bf16_dot_available()
needs_dot = pytest.mark.skipif(not HAS_DOT, reason="this CPU has no AVX512_BF16")


def reference(x, w, b):
    """Per output: acc = 0; for each input pair (2i, 2i + 1): acc += x[2i + 1] w[2i + 1], then acc +=
    x[2i] w[2i] (fp32, products exact); then bf16(acc + bias)."""
    x2, wf = x.reshape(-1, x.shape[-1]).float(), w.float()
    acc = torch.zeros(x2.shape[0], w.shape[0])
    for i in range(0, x2.shape[1], 2):
        acc = acc + x2[:, i + 1:i + 2] * wf[:, i + 1]
        acc = acc + x2[:, i:i + 1] * wf[:, i]
    if b is not None:
        acc = acc + b.float()
    return acc.to(torch.bfloat16).reshape(*x.shape[:-1], w.shape[0])


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


# N: one short panel, a partial one, whole panels. K: one pair, 34 pairs, the default model's 576. M: one row,
# a full and a split register tile (12, 13), more than the engine sends (300).
@needs_dot
@pytest.mark.parametrize("n,k", [(5, 2), (83, 68), (96, 576), (33, 130)])
@pytest.mark.parametrize("m", [1, 2, 12, 13, 40, 300])  # 300: two row blocks of the kernel (192 + 108)
@pytest.mark.parametrize("bias", [None, "bf16", "fp32"])
def test_the_instructions_arithmetic_bit_for_bit(n, k, m, bias):
    w, x = randn(n, k, seed=1), randn(m, k, seed=2)
    b = None if bias is None else randn(n, seed=3).to(torch.bfloat16 if bias == "bf16" else torch.float32)
    y = _ops.bf16_dot_linear(x, _ops.pack_bf16_dot_linear_weight(w), b, n)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    assert torch.equal(y, reference(x, w, b))
    # the same class of arithmetic as torch's bf16 GEMM: within a bf16 rounding of it
    torch.testing.assert_close(y.float(), F.linear(x.float(), w.float(), None if b is None else b.float()),
                               atol=0.05 * k ** 0.5, rtol=1e-2)


@needs_dot
def test_pack_layout():
    w = randn(40, 8)
    p = _ops.pack_bf16_dot_linear_weight(w)
    assert p.shape == (2, 4, 64) and p.dtype == torch.bfloat16
    for n in range(40):
        for k in range(8):
            assert p[n // 32, k // 2, 2 * (n % 32) + k % 2] == w[n, k]
    assert not p[1, :, 2 * 8:].any()  # features past N
    assert _ops.pack_bf16_dot_linear_weight(randn(40, 7)).numel() == 0  # odd K: not packed (the caller's panels)


@needs_dot
def test_strided_batched_and_empty_input():
    w, b = randn(70, 96, seed=1), randn(70, seed=2)
    p = _ops.pack_bf16_dot_linear_weight(w)
    x = non_contiguous_rows(randn(9, 96, seed=3))
    assert torch.equal(_ops.bf16_dot_linear(x, p, b, 70), reference(x.contiguous(), w, b))
    x3 = randn(2, 5, 96, seed=4)
    assert torch.equal(_ops.bf16_dot_linear(x3, p, b, 70), reference(x3, w, b))
    assert _ops.bf16_dot_linear(randn(0, 96), p, b, 70).shape == (0, 70)


@needs_dot
def test_errors():
    w = randn(70, 96)
    p = _ops.pack_bf16_dot_linear_weight(w)
    with pytest.raises(RuntimeError, match="bfloat16 CPU tensor"):
        _ops.bf16_dot_linear(torch.randn(3, 96), p, None, 70)
    with pytest.raises(RuntimeError, match="x has 95 features"):
        _ops.bf16_dot_linear(randn(3, 95), p, None, 70)
    with pytest.raises(RuntimeError, match="does not match"):
        _ops.bf16_dot_linear(randn(3, 96), p, None, 100)
    with pytest.raises(RuntimeError, match="bias"):
        _ops.bf16_dot_linear(randn(3, 96), p, randn(69), 70)
    with pytest.raises(RuntimeError, match="pack_bf16_dot_linear_weight"):
        _ops.bf16_dot_linear(randn(3, 96), _ops.pack_linear_weight(w.float()), None, 70)
    with pytest.raises(RuntimeError, match="bfloat16 CPU tensor"):
        _ops.pack_bf16_dot_linear_weight(w.float())


def _bf16_layer():
    torch.manual_seed(0)
    layer = Linear(96, 70, bias=True, dtype=torch.bfloat16)
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    return layer


def test_row_limit_only_where_amx_exists(monkeypatch):
    """Every row count goes to the dot tiles, except on a CPU with AMX-BF16, whose tiles oneDNN uses."""
    monkeypatch.setenv(FEATURES_ENV, "avx512f,avx512_bf16")
    assert linear_mod.default_bf16_dot_max_rows() == linear_mod.NO_ROW_LIMIT
    monkeypatch.setenv(FEATURES_ENV, "avx512_bf16,amx_bf16")
    assert linear_mod.default_bf16_dot_max_rows() == 256


@needs_dot
def test_a_bf16_model_takes_the_dot_products_up_to_their_rows(monkeypatch):
    """A bfloat16 Linear on an AVX512_BF16 CPU: 1-BF16_DOT_MAX_ROWS rows through bf16_dot_linear, more through
    torch's bf16 GEMM (a limit only on AMX CPUs: set here); PAGEDLLM_CPU_BF16_DOT=0 keeps the 16-bit panels."""
    monkeypatch.setattr(linear_mod, "BF16_DOT_MAX_ROWS", 256)
    layer = _bf16_layer()
    assert pack_linear_weights(layer) == 3 * 48 * 64 * 2
    assert layer.packed.qtype == linear_mod.BF16_DOT_KIND and layer.packed.act_dtype == torch.bfloat16
    calls = []
    real = _ops.bf16_dot_linear
    monkeypatch.setattr(linear_mod._ops, "bf16_dot_linear", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    hi = linear_mod.BF16_DOT_MAX_ROWS
    for m in (1, hi, hi + 1):
        x = randn(m, 96, seed=m)
        ref = reference(x, layer.weight, layer.bias) if m <= hi else F.linear(x, layer.weight, layer.bias)
        assert torch.equal(layer(x), ref)
    assert calls == [1, hi]
    monkeypatch.setenv(linear_mod.BF16_DOT_ENV, "0")
    pack_linear_weights(layer)
    assert layer.packed.qtype == 30


@pytest.mark.skipif(HAS_DOT, reason="the CPU has AVX512_BF16")
def test_without_the_instructions_the_pack_is_empty_and_the_panels_stay():
    assert _ops.pack_bf16_dot_linear_weight(randn(70, 96)).numel() == 0
    layer = _bf16_layer()
    pack_linear_weights(layer)
    assert layer.packed.qtype == 30
    with pytest.raises(RuntimeError, match="no AVX512_BF16"):
        _ops.bf16_dot_linear(randn(1, 96), torch.zeros(3, 48, 64, dtype=torch.bfloat16), None, 70)
