"""quantized_linear (the CPU decode GEMM over the exact Q4_1 / Q8_0 codes of fp32 weights): the codes
are found only for weights that are exactly such blocks, and the product equals packed_linear on the
fp32 weights bit for bit (the same FMA chains), for every row count; and the layers' use of it."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from testing_utils import non_contiguous_rows

from pagedllm import _ops
from pagedllm.layers import linear as linear_mod
from pagedllm.layers.linear import Linear, pack_linear_weights, pack_weight

gguf = pytest.importorskip("gguf")  # the GPU image has no gguf: collecting tests/kernels must still work

Q = gguf.GGMLQuantizationType
BITS = {Q.Q4_1: 4, Q.Q8_0: 8}


def gguf_round_trip(w: torch.Tensor, qtype) -> torch.Tensor:
    """w quantized by the gguf package as llama.cpp does, then dequantized: the fp32 weights a GGUF
    checkpoint loads as."""
    raw = gguf.quants.quantize(w.numpy(), qtype)
    return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(raw, qtype)).reshape(w.shape))


# N: a single short panel (5), a partial panel (83), exact panels (576). K: one block, the model's two.
# M: 1 row, the in-register expansion (3, 12), chunked tiles with a remainder (13, 25), 64, 130.
@pytest.mark.parametrize("qtype", list(BITS), ids=lambda q: q.name)
@pytest.mark.parametrize("n,k", [(5, 32), (83, 576), (576, 1536)])
@pytest.mark.parametrize("m", [1, 3, 12, 13, 25, 64, 130])
@pytest.mark.parametrize("bias", [False, True])
def test_bit_identical_to_packed_linear(qtype, n, k, m, bias):
    torch.manual_seed(n + k + m)
    w = gguf_round_trip(torch.randn(n, k) * 0.05, qtype)
    codes = _ops.pack_quantized_linear_weight(w, BITS[qtype])
    assert codes.dtype == torch.uint8 and codes.shape[:2] == (-(-n // 32), k // 32)
    x, b = torch.randn(m, k), (torch.randn(n) if bias else None)
    out = _ops.quantized_linear(x, codes, BITS[qtype], b, n)
    assert torch.equal(out, _ops.packed_linear(x, _ops.pack_linear_weight(w), b, n))
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("qtype", list(BITS), ids=lambda q: q.name)
def test_codes_give_back_every_weight(qtype):
    """x = rows of the identity: y = W^T exactly, whichever path (in-register or chunked) runs."""
    torch.manual_seed(0)
    w = gguf_round_trip(torch.randn(40, 96), qtype)
    codes = _ops.pack_quantized_linear_weight(w, BITS[qtype])
    eye = torch.eye(96)
    assert torch.equal(_ops.quantized_linear(eye, codes, BITS[qtype], None, 40), w.t())  # chunked
    for i in range(0, 96, 4):
        assert torch.equal(_ops.quantized_linear(eye[i:i + 4], codes, BITS[qtype], None, 40), w.t()[i:i + 4])


def test_only_exact_blocks_are_packed():
    torch.manual_seed(0)
    w4 = gguf_round_trip(torch.randn(64, 64), Q.Q4_1)
    w8 = gguf_round_trip(torch.randn(64, 64), Q.Q8_0)
    assert _ops.pack_quantized_linear_weight(w4, 4).numel() > 0
    assert _ops.pack_quantized_linear_weight(w8, 8).numel() > 0
    empty = lambda w, bits: _ops.pack_quantized_linear_weight(w, bits).numel() == 0  # noqa: E731
    assert empty(torch.randn(64, 64), 4) and empty(torch.randn(64, 64), 8)  # plain fp32
    assert empty(w8, 4) and empty(w4, 8)  # the other format
    off = w4.clone()
    off[17, 40] = torch.nextafter(off[17, 40], torch.tensor(1.0))  # one weight one ulp off
    assert empty(off, 4)
    nan = w4.clone()
    nan[3, 3] = float("nan")
    assert empty(nan, 4)
    assert empty(gguf_round_trip(torch.randn(64, 64), Q.Q4_1)[:, :48].contiguous(), 4)  # K not a multiple of 32
    assert empty(torch.zeros(0, 64), 4)


def test_strided_batched_and_empty_input():
    torch.manual_seed(0)
    w = gguf_round_trip(torch.randn(70, 96), Q.Q4_1)
    codes, fp32 = _ops.pack_quantized_linear_weight(w, 4), _ops.pack_linear_weight(w)
    x = non_contiguous_rows(torch.randn(9, 96))  # row stride 99, NaN in the gaps
    assert torch.equal(_ops.quantized_linear(x, codes, 4, None, 70), _ops.packed_linear(x, fp32, None, 70))
    x3 = torch.randn(2, 7, 96)
    out = _ops.quantized_linear(x3, codes, 4, None, 70)
    assert out.shape == (2, 7, 70) and torch.equal(out, _ops.packed_linear(x3, fp32, None, 70))
    assert _ops.quantized_linear(torch.empty(0, 96), codes, 4, None, 70).shape == (0, 70)


def test_errors():
    w = gguf_round_trip(torch.randn(40, 64), Q.Q4_1)
    codes = _ops.pack_quantized_linear_weight(w, 4)
    with pytest.raises(RuntimeError, match="bits must be 4"):
        _ops.pack_quantized_linear_weight(w, 5)
    with pytest.raises(RuntimeError, match="float32 CPU tensor"):
        _ops.pack_quantized_linear_weight(w.bfloat16(), 4)
    with pytest.raises(RuntimeError, match="must come from pack_quantized_linear_weight with bits=8"):
        _ops.quantized_linear(torch.randn(2, 64), codes, 8, None, 40)
    with pytest.raises(RuntimeError, match="x must be float32"):
        _ops.quantized_linear(torch.randn(2, 64).bfloat16(), codes, 4, None, 40)
    with pytest.raises(RuntimeError, match="x has 63 features, the weight expects 64"):
        _ops.quantized_linear(torch.randn(2, 63), codes, 4, None, 40)
    with pytest.raises(RuntimeError, match="out_features 70 does not match"):
        _ops.quantized_linear(torch.randn(2, 64), codes, 4, None, 70)
    with pytest.raises(RuntimeError, match="bias must be"):
        _ops.quantized_linear(torch.randn(2, 64), codes, 4, torch.randn(39), 40)


def test_pack_weight_picks_the_exact_format(monkeypatch):
    torch.manual_seed(0)
    assert pack_weight(gguf_round_trip(torch.randn(64, 64), Q.Q4_1)).bits == 4
    assert pack_weight(gguf_round_trip(torch.randn(64, 64), Q.Q8_0)).bits == 8
    assert pack_weight(torch.randn(64, 64)).bits == 0
    monkeypatch.setenv(linear_mod.QUANTIZED_ENV, "0")
    assert pack_weight(gguf_round_trip(torch.randn(64, 64), Q.Q4_1)).bits == 0


def test_layer_uses_the_codes_from_one_row(monkeypatch):
    torch.manual_seed(0)
    layer = Linear(96, 70, bias=True, dtype=torch.float32)
    with torch.no_grad():
        layer.weight.copy_(gguf_round_trip(torch.randn(70, 96), Q.Q4_1))
        layer.bias.normal_()
    added = pack_linear_weights(layer)
    assert layer.packed.bits == 4 and added == layer.packed.nbytes == 3 * 3 * 768  # panels x blocks
    calls = []
    real = _ops.quantized_linear
    monkeypatch.setattr(linear_mod._ops, "quantized_linear", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    hi = linear_mod.PACKED_MAX_ROWS
    for m in (1, hi, hi + 1):
        x = torch.randn(m, 96)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-4, rtol=1e-5)
    assert calls == [1, hi]  # above PACKED_MAX_ROWS: F.linear


def test_codes_are_packed_even_when_fp32_panels_would_not_fit(monkeypatch):
    """Low memory: no fp32 panels (a full copy of the weights), but the codes (<= 9/32 of them) still."""
    torch.manual_seed(0)
    coded, plain = Linear(64, 40, dtype=torch.float32), Linear(64, 40, dtype=torch.float32)
    with torch.no_grad():
        coded.weight.copy_(gguf_round_trip(torch.randn(40, 64), Q.Q4_1))
        plain.weight.normal_()
    model = torch.nn.ModuleList([coded, plain])
    monkeypatch.setattr(linear_mod, "_available_memory", lambda: 2 * 40 * 64 * 4 - 1)
    assert pack_linear_weights(model) == coded.packed.nbytes
    assert coded.packed.bits == 4 and plain.packed is None
    monkeypatch.setattr(linear_mod, "_available_memory", lambda: 4 * 40 * 64 * 4)
    pack_linear_weights(model)
    assert coded.packed.bits == 4 and plain.packed.bits == 0
