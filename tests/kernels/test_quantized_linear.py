"""quantized_linear (the CPU decode GEMM over the exact GGUF codes of fp32 weights: Q4_0, Q4_1, Q5_0,
Q5_1, Q8_0): the codes are found only for weights that are exactly such blocks as the gguf package
dequantizes them, and the product equals packed_linear on the fp32 weights bit for bit (the same FMA
chains), for every row count; and the layers' use of it."""
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
QTYPES = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0]
BLOCK_BYTES = {Q.Q4_0: 576, Q.Q4_1: 640, Q.Q5_0: 704, Q.Q5_1: 768, Q.Q8_0: 1088}  # per 32 x 32 block (fp16 d, m)


def gguf_round_trip(w: torch.Tensor, qtype) -> torch.Tensor:
    """w quantized by the gguf package as llama.cpp does, then dequantized: the fp32 weights a GGUF
    checkpoint loads as."""
    raw = gguf.quants.quantize(w.numpy(), qtype)
    return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(raw, qtype)).reshape(w.shape))


def random_k_quant(n: int, k: int, qtype, seed: int = 0) -> torch.Tensor:
    """A [n, k] weight of random Q4_K / Q6_K super-blocks (random codes and 6 / 8-bit scales, fp16 super-block
    scales of random magnitudes; Q6_K's d of either sign, as llama.cpp's), dequantized by the gguf package
    (which cannot quantize to K-quants)."""
    rng = np.random.default_rng(seed)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (n, k // block, size), dtype=np.uint8)
    scales = np.exp(rng.uniform(np.log(1e-4), np.log(0.1), (n, k // block, 2))).astype(np.float16)
    if qtype == Q.Q6_K:  # d is the last field
        raw[..., -2:] = (scales[..., :1] * rng.choice([-1, 1], (n, k // block, 1))).astype(np.float16).view(np.uint8)
    else:  # d, dmin first
        raw[..., 0:4] = scales.view(np.uint8)
    return torch.from_numpy(gguf.quants.dequantize(raw.reshape(n, -1), qtype).reshape(n, k).copy())


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K], ids=lambda q: q.name)
def test_k_quant_blocks_are_found_and_exact(qtype):
    """Q4_K: every 32-weight sub-block is fma(d * sc, q, -dmin * mn) with fp32 scale and offset; Q6_K: every
    16-weight one (d * sc) * q. The codes are found for all of them and give gguf's dequantized weights and
    packed_linear's products back."""
    w = random_k_quant(83, 512, qtype, seed=1)
    if qtype == Q.Q6_K:  # d < 0 makes -0.0 zeros, which the codes must give back too (checked at packing)
        assert ((w == 0) & torch.signbit(w)).any()
    codes = _ops.pack_quantized_linear_weight(w, qtype)
    assert codes.shape == (3, 16, 768 if qtype == Q.Q4_K else 1280)
    assert torch.equal(_ops.quantized_linear(torch.eye(512), codes, qtype, None, 83), w.t())
    fp32 = _ops.pack_linear_weight(w)
    for m in (1, 7, 30):
        x = torch.randn(m, 512)
        assert torch.equal(_ops.quantized_linear(x, codes, qtype, None, 83), _ops.packed_linear(x, fp32, None, 83))
    for other in (Q.Q4_1, Q.Q8_0):  # their scales are not fp16 / not one per 32
        assert _ops.pack_quantized_linear_weight(w, other).numel() == 0
    assert _ops.pack_quantized_linear_weight(torch.randn(64, 256), qtype).numel() == 0
    off = w.clone()
    off[40, 300] = torch.nextafter(off[40, 300], torch.tensor(1.0))
    assert _ops.pack_quantized_linear_weight(off, qtype).numel() == 0

    # Q4_1 blocks are Q4_K sub-blocks too (fp16 d and m)
    w41 = gguf_round_trip(torch.randn(40, 64), Q.Q4_1)
    x = torch.randn(5, 64)
    assert torch.equal(_ops.quantized_linear(x, _ops.pack_quantized_linear_weight(w41, Q.Q4_K), Q.Q4_K, None, 40),
                       _ops.packed_linear(x, _ops.pack_linear_weight(w41), None, 40))


# N: a single short panel (5), a partial panel (83), a partial panel paired with a full one in the 1-2
# row tiles (115: two panels a thread), exact panels (576). K: one block, two, the model's two.
# M: 1 row, the in-register expansion (2 rows on AVX2, up to 12 on AVX-512), whole expanded panels with
# a remainder tile (13, 25), 64, 130.
@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("n,k", [(5, 32), (83, 576), (115, 64), (576, 1536)])
@pytest.mark.parametrize("m", [1, 2, 3, 12, 13, 25, 64, 130])
@pytest.mark.parametrize("bias", [False, True])
def test_bit_identical_to_packed_linear(qtype, n, k, m, bias):
    torch.manual_seed(n + k + m)
    w = gguf_round_trip(torch.randn(n, k) * 0.05, qtype)
    codes = _ops.pack_quantized_linear_weight(w, qtype)
    assert codes.dtype == torch.uint8 and codes.shape == (-(-n // 32), k // 32, BLOCK_BYTES[qtype])
    x, b = torch.randn(m, k), (torch.randn(n) if bias else None)
    out = _ops.quantized_linear(x, codes, qtype, b, n)
    assert torch.equal(out, _ops.packed_linear(x, _ops.pack_linear_weight(w), b, n))
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
def test_codes_give_back_every_weight(qtype):
    """x = rows of the identity: y = W^T exactly, whichever path (in-register or chunked) runs."""
    torch.manual_seed(0)
    w = gguf_round_trip(torch.randn(40, 96), qtype)
    codes = _ops.pack_quantized_linear_weight(w, qtype)
    eye = torch.eye(96)
    assert torch.equal(_ops.quantized_linear(eye, codes, qtype, None, 40), w.t())  # chunked
    for i in range(0, 96, 4):
        assert torch.equal(_ops.quantized_linear(eye[i:i + 4], codes, qtype, None, 40), w.t()[i:i + 4])


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q5_0], ids=lambda q: q.name)
def test_signed_formats_keep_their_negative_zeros(qtype):
    """gguf dequantizes a Q4_0 / Q5_0 zero code as d * 0.0: -0.0 where d < 0. Those bits are part of
    the exactness check: the same weight with one of them turned into +0.0 is not packed."""
    torch.manual_seed(0)
    w = gguf_round_trip(torch.randn(64, 64), qtype)
    neg_zero = (w == 0) & torch.signbit(w)
    assert neg_zero.any() and _ops.pack_quantized_linear_weight(w, qtype).numel() > 0
    flipped = w.clone()
    flipped[tuple(neg_zero.nonzero()[0].tolist())] = 0.0
    assert _ops.pack_quantized_linear_weight(flipped, qtype).numel() == 0


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
def test_ramps_over_the_code_range(qtype):
    """Ramps over the whole code range of each format, both signs of d: all found, all given back."""
    ramp = torch.linspace(-1, 1, 32)
    w = gguf_round_trip(torch.stack([ramp * s for s in (1.0, -1.0, 0.3, -7.5)] + [ramp.abs() + 2, -ramp.abs()]), qtype)
    codes = _ops.pack_quantized_linear_weight(w, qtype)
    assert codes.numel() > 0
    assert torch.equal(_ops.quantized_linear(torch.eye(32), codes, qtype, None, w.shape[0]), w.t())


def test_only_exact_blocks_are_packed():
    torch.manual_seed(0)
    weights = {q: gguf_round_trip(torch.randn(64, 64), q) for q in QTYPES}
    empty = lambda w, qtype: _ops.pack_quantized_linear_weight(w, qtype).numel() == 0  # noqa: E731
    for q in QTYPES:
        assert not empty(weights[q], q)
        assert empty(torch.randn(64, 64), q)  # plain fp32
    # fewer bits or another form do not hold the weights
    for q, others in {Q.Q4_0: [Q.Q4_1, Q.Q5_1], Q.Q4_1: [Q.Q4_0, Q.Q5_0, Q.Q8_0], Q.Q5_0: [Q.Q4_0, Q.Q4_1, Q.Q5_1],
                      Q.Q5_1: [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q8_0], Q.Q8_0: [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]}.items():
        assert all(empty(weights[q], o) for o in others), q.name
    w4 = weights[Q.Q4_1]
    off = w4.clone()
    off[17, 40] = torch.nextafter(off[17, 40], torch.tensor(1.0))  # one weight one ulp off
    assert empty(off, Q.Q4_1)
    nan = w4.clone()
    nan[3, 3] = float("nan")
    assert empty(nan, Q.Q4_1)
    assert empty(w4[:, :48].contiguous(), Q.Q4_1)  # K not a multiple of 32
    assert empty(torch.zeros(0, 64), Q.Q4_1)


def test_strided_batched_and_empty_input():
    torch.manual_seed(0)
    w = gguf_round_trip(torch.randn(70, 96), Q.Q4_1)
    codes, fp32 = _ops.pack_quantized_linear_weight(w, Q.Q4_1), _ops.pack_linear_weight(w)
    x = non_contiguous_rows(torch.randn(9, 96))  # row stride 99, NaN in the gaps
    assert torch.equal(_ops.quantized_linear(x, codes, Q.Q4_1, None, 70), _ops.packed_linear(x, fp32, None, 70))
    x3 = torch.randn(2, 7, 96)
    out = _ops.quantized_linear(x3, codes, Q.Q4_1, None, 70)
    assert out.shape == (2, 7, 70) and torch.equal(out, _ops.packed_linear(x3, fp32, None, 70))
    assert _ops.quantized_linear(torch.empty(0, 96), codes, Q.Q4_1, None, 70).shape == (0, 70)


def test_errors():
    w = gguf_round_trip(torch.randn(40, 64), Q.Q4_1)
    codes = _ops.pack_quantized_linear_weight(w, Q.Q4_1)
    with pytest.raises(RuntimeError, match="qtype must be a GGML type id of Q4_0"):
        _ops.pack_quantized_linear_weight(w, 4)
    with pytest.raises(RuntimeError, match="qtype must be a GGML type id"):
        _ops.quantized_linear(torch.randn(2, 64), codes, Q.Q5_K, None, 40)
    with pytest.raises(RuntimeError, match="float32 CPU tensor"):
        _ops.pack_quantized_linear_weight(w.bfloat16(), Q.Q4_1)
    with pytest.raises(RuntimeError, match="must come from pack_quantized_linear_weight with qtype=8"):
        _ops.quantized_linear(torch.randn(2, 64), codes, Q.Q8_0, None, 40)
    with pytest.raises(RuntimeError, match="x must be float32"):
        _ops.quantized_linear(torch.randn(2, 64).bfloat16(), codes, Q.Q4_1, None, 40)
    with pytest.raises(RuntimeError, match="x has 63 features, the weight expects 64"):
        _ops.quantized_linear(torch.randn(2, 63), codes, Q.Q4_1, None, 40)
    with pytest.raises(RuntimeError, match="out_features 70 does not match"):
        _ops.quantized_linear(torch.randn(2, 64), codes, Q.Q4_1, None, 70)
    with pytest.raises(RuntimeError, match="bias must be"):
        _ops.quantized_linear(torch.randn(2, 64), codes, Q.Q4_1, torch.randn(39), 40)


def test_pack_weight_picks_the_exact_format(monkeypatch):
    torch.manual_seed(0)
    for q in QTYPES:
        assert pack_weight(gguf_round_trip(torch.randn(64, 64), q)).qtype == q
    assert pack_weight(random_k_quant(64, 256, Q.Q4_K)).qtype == Q.Q4_K
    assert pack_weight(random_k_quant(64, 256, Q.Q6_K)).qtype == Q.Q6_K
    assert pack_weight(torch.randn(64, 64)).qtype == 0
    monkeypatch.setenv(linear_mod.QUANTIZED_ENV, "0")
    assert pack_weight(gguf_round_trip(torch.randn(64, 64), Q.Q4_1)).qtype == 0


def test_layer_uses_the_codes_from_one_row(monkeypatch):
    torch.manual_seed(0)
    layer = Linear(96, 70, bias=True, dtype=torch.float32)
    with torch.no_grad():
        layer.weight.copy_(gguf_round_trip(torch.randn(70, 96), Q.Q4_1))
        layer.bias.normal_()
    added = pack_linear_weights(layer)
    assert layer.packed.qtype == Q.Q4_1 and added == layer.packed.nbytes == 3 * 3 * 640  # panels x blocks
    calls = []
    real = _ops.quantized_linear
    monkeypatch.setattr(linear_mod._ops, "quantized_linear", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    monkeypatch.setattr(linear_mod, "PACKED_MAX_ROWS", 64)  # the limit of a host where MKL wins above it
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
    assert coded.packed.qtype == Q.Q4_1 and plain.packed is None
    monkeypatch.setattr(linear_mod, "_available_memory", lambda: 4 * 40 * 64 * 4)
    pack_linear_weights(model)
    assert coded.packed.qtype == Q.Q4_1 and plain.packed.qtype == 0
