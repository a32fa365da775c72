"""int8_linear (the opt-in quantization="gguf_int8" mode): x quantized per block of 32 to int8, integer dot
products with the GGUF codes. Checked against a plain-torch reference of the same arithmetic (exact integer
dot products, the same fp32 operations: bit for bit), on every kernel twin this CPU runs, and against the
fp32 product within the bound that x's rounding to int8 implies."""
import pytest
import torch
import torch.nn.functional as F

from pagedllm import _ops
from pagedllm.layers.linear import INT8_KIND, Linear, LMHead, pack_linear_weights, pack_weight

gguf = pytest.importorskip("gguf")  # the GPU image has no gguf: collecting tests/kernels must still work
from test_quantized_linear import gguf_round_trip, random_k_quant  # noqa: E402  (the GGUF weights of the exact mode's tests)

Q = gguf.GGMLQuantizationType
QTYPES = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q6_K]
# Per format: (code storage, inputs per scale, has corr, offset of the stored code, fp16 scales) as
# csrc/cpu/int8_codes_layout.h documents them (corr is stored for the affine formats, offset 0; else -offset * d).
LAYOUT = {Q.Q4_0: ("nibble", 32, True, 8, True), Q.Q4_1: ("nibble", 32, True, 0, True),
          Q.Q4_K: ("nibble", 32, True, 0, False), Q.Q5_0: ("byte", 32, True, 16, True),
          Q.Q5_1: ("byte", 32, True, 0, True), Q.Q6_K: ("byte", 16, True, 32, False),
          Q.Q8_0: ("signed", 32, False, 0, True)}
AFFINE = {Q.Q4_1, Q.Q4_K, Q.Q5_1}


def _isas():
    """The kernel twins this CPU can run (PAGEDLLM_CPU_INT8_ISA picks one)."""
    import re
    flags = set(re.findall(r"\w+", open("/proc/cpuinfo").read())) if __import__("os").path.exists("/proc/cpuinfo") else set()
    isas = ["scalar"]
    if {"avx2", "fma"} <= flags:
        isas.append("avx2")
    if {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= flags:
        isas.append("vnni")
    return isas


ISAS = _isas()


def gguf_weight(n: int, k: int, qtype, seed: int) -> torch.Tensor:
    """A [n, k] weight as a GGUF checkpoint loads it: quantized by the gguf package (random K-quant
    super-blocks for Q4_K / Q6_K, which it cannot quantize to), dequantized to fp32."""
    if qtype in (Q.Q4_K, Q.Q6_K):
        return random_k_quant(n, k, qtype, seed)
    return gguf_round_trip(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05, qtype)


def int8_pack(w: torch.Tensor, qtype) -> torch.Tensor:
    codes = _ops.pack_quantized_linear_weight(w, qtype)
    assert codes.numel(), "not exact GGUF blocks"
    return _ops.pack_int8_linear_weight(codes, qtype, w.shape[0])


def unpack(packed: torch.Tensor, qtype, n: int):
    """The layout read back in Python: codes [n, K] (stored, unsigned but Q8_0's), d and corr [n, K / sub]."""
    kind, sub, has_corr, offset, half = LAYOUT[qtype]
    p, b, _ = packed.shape
    subs, stored = 32 // sub, 2 if has_corr and offset == 0 else 1
    nbytes = subs * 8 * stored * (2 if half else 4)
    scale = packed[:, :, :nbytes].contiguous().view(torch.float16 if half else torch.float32).float()
    scale = scale.view(p, b, stored, subs, 8)
    d = scale[:, :, 0].permute(0, 3, 1, 2).reshape(p * 8, b * subs)[:n]
    if stored == 2:
        corr = scale[:, :, 1].permute(0, 3, 1, 2).reshape(p * 8, b * subs)[:n]
    else:  # -offset * d in fp32 (exact), -0.0 where d = 0 as in the kernels
        corr = d * -float(offset) if has_corr else torch.zeros_like(d)
    raw = packed[:, :, nbytes:]
    if kind == "nibble":  # 4 runs of 32 bytes: groups 2q (low nibbles) and 2q + 1 (high)
        runs = raw.reshape(p, b, 4, 8, 4).to(torch.int64)
        groups = torch.stack([runs & 0xF, runs >> 4], dim=3)  # [p, b, 4 runs, 2, 8 features, 4]
        groups = groups.reshape(p, b, 8, 8, 4)
    else:
        groups = raw.reshape(p, b, 8, 8, 4).to(torch.int64)
        if kind == "signed":
            groups = torch.where(groups > 127, groups - 256, groups)
    codes = groups.permute(0, 3, 1, 2, 4).reshape(p * 8, b * 32)[:n]  # [feature, input]
    return codes, d, corr


def fma32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """fp32 fma: a * b of two floats is exact in float64; one rounding of the sum to fp32 (a double
    rounding differs from fma's single one with probability ~2^-29 a call: fixed inputs here)."""
    return (a.double() * b.double() + c.double()).float()


def reference(x: torch.Tensor, packed: torch.Tensor, qtype, n: int, bias=None) -> torch.Tensor:
    """int8_linear's arithmetic in plain torch: exact integer sums per sub-block, then per output the same
    fp32 ops in the same order: acc = fma(float(isum), d_w * d_x, acc); acc = fma(corr, d_x * float(sum x), acc)."""
    _, sub, has_corr, _, _ = LAYOUT[qtype]
    codes, dw, corr = unpack(packed, qtype, n)
    q, dx, sums = _ops.quantize_rows_int8(x)
    m, k = q.shape
    subs = 32 // sub
    isum = torch.einsum("msj,nsj->mns", q.to(torch.int64).view(m, -1, sub), codes.view(n, -1, sub))  # [m, n, B * subs]
    xsum = sums.sum(-1, keepdim=True) if sub == 32 else sums  # [m, B, subs]
    acc = torch.zeros(m, n)
    for s in range(k // sub):
        b = s // subs
        dd = (dw[:, s][None, :] * dx[:, b][:, None])  # fp32 product, as the kernel
        acc = fma32(isum[:, :, s].float(), dd, acc)
        if has_corr:
            sx = dx[:, b] * xsum[:, b, s % subs].float()
            acc = fma32(corr[:, s][None, :].expand(m, n), sx[:, None].expand(m, n), acc)
    return acc if bias is None else acc + bias


def quantize_reference(x: torch.Tensor):
    k = x.shape[-1]
    blocks = x.reshape(-1, k // 32, 32)
    d = blocks.abs().amax(-1) / 127.0
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(blocks * inv[..., None])  # round half to even, as the kernel's nearbyint / cvtps
    return q.to(torch.int8).reshape(-1, k), d, q.view(-1, k // 32, 2, 16).sum(-1).to(torch.int32)


@pytest.mark.parametrize("isa", ISAS)
def test_activation_quantization_is_the_reference_bit_for_bit(isa, monkeypatch):
    monkeypatch.setenv("PAGEDLLM_CPU_INT8_ISA", isa)
    torch.manual_seed(0)
    x = torch.randn(9, 576) * torch.logspace(-3, 2, 576)
    x[2, 64:96] = 0.0  # an all-zero block: d = 0, codes 0
    x[3, 0:32] = torch.arange(32) - 15.5  # ties of x / d at .5 after scaling are rounded to even
    q, d, sums = _ops.quantize_rows_int8(x)
    rq, rd, rsums = quantize_reference(x)
    assert torch.equal(d, rd) and torch.equal(q, rq) and torch.equal(sums, rsums)
    assert q.abs().max() == 127 and (d[2, 2] == 0) and (q[2, 64:96] == 0).all()


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
def test_layout_holds_the_codes_of_every_weight(qtype):
    """Read back in Python, the int8 layout gives every GGUF weight: d * c + corr (affine: fma)."""
    w = gguf_weight(37, 256, qtype, seed=3)
    codes, d, corr = unpack(int8_pack(w, qtype), qtype, 37)
    _, sub, _, _, _ = LAYOUT[qtype]
    rebuilt = codes.double() * d.double().repeat_interleave(sub, 1) + corr.double().repeat_interleave(sub, 1)
    assert torch.equal(rebuilt.float(), w)  # exact in float64, one rounding to fp32 = the fma of gguf's formula


# N: one short panel (5), partial panels (37, 83), the model's sizes (576, 1536). K: one block, the model's
# 576 (not for the K-quants: their super-blocks are 256 inputs), 256 to 1536. M: the 4-row tiles and their
# remainders, past a 64-row chunk (65), a prefill (150).
# (The load-time search for Q4_K codes misses an occasional random Q4_K block, e.g. in 576 x 1536 here: those
# weights would keep their fp32 path; Q4_K's large case is 83 x 1536, whose blocks are all found.)
SHAPES = [(5, 256, 1), (37, 256, 3), (83, 512, 7), (83, 512, 65), (37, 256, 150)]
SHAPES_32 = [(5, 32, 1), (83, 576, 7), (83, 576, 66)]
CASES = ([(q, *s) for q in QTYPES for s in SHAPES] + [(Q.Q4_K, 83, 1536, 2)]
         + [(q, 576, 1536, 2) for q in QTYPES if q != Q.Q4_K]
         + [(q, *s) for q in QTYPES if q not in (Q.Q4_K, Q.Q6_K) for s in SHAPES_32])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("qtype,n,k,m", CASES, ids=lambda v: getattr(v, "name", str(v)))
def test_bit_identical_to_the_reference(isa, qtype, n, k, m, monkeypatch):
    monkeypatch.setenv("PAGEDLLM_CPU_INT8_ISA", isa)
    w = gguf_weight(n, k, qtype, seed=n + k)
    packed = int8_pack(w, qtype)
    torch.manual_seed(m)
    x, bias = torch.randn(m, k), torch.randn(n)
    out = _ops.int8_linear(x, packed, qtype, bias, n)
    assert out.shape == (m, n)
    assert torch.equal(out, reference(x, packed, qtype, n, bias))


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
def test_within_the_rounding_bound_of_the_fp32_product(qtype):
    """Rounding x to the nearest multiple of d_x moves each input at most d_x / 2, so
    |int8 - fp32| <= sum_k |w_k| d_x(k) / 2 (plus fp32 summation error, far below)."""
    n, k, m = 83, 1536, 5
    w = gguf_weight(n, k, qtype, seed=7)
    x = torch.randn(m, k) * 3
    out = _ops.int8_linear(x, int8_pack(w, qtype), qtype, None, n)
    exact = F.linear(x.double(), w.double())
    _, dx, _ = _ops.quantize_rows_int8(x)
    bound = 0.5 * (dx.double().repeat_interleave(32, 1) @ w.double().abs().t())
    err = (out.double() - exact).abs()
    assert (err <= bound * 1.0001 + 1e-5).all()
    assert err.max() > 0  # it is approximate: the int8 path really ran


def test_every_twin_gives_the_same_bits(monkeypatch):
    w = gguf_weight(83, 576, Q.Q4_1, seed=1)
    packed = int8_pack(w, Q.Q4_1)
    x = torch.randn(11, 576)
    outs = []
    for isa in ISAS:
        monkeypatch.setenv("PAGEDLLM_CPU_INT8_ISA", isa)
        outs.append(_ops.int8_linear(x, packed, Q.Q4_1, None, 83))
    assert all(torch.equal(o, outs[0]) for o in outs)


def test_strided_batched_and_empty_input():
    w = gguf_weight(40, 64, Q.Q8_0, seed=2)
    packed = int8_pack(w, Q.Q8_0)
    x = torch.randn(3, 5, 128)[..., ::2]  # non-contiguous last dim
    out = _ops.int8_linear(x, packed, Q.Q8_0, None, 40)
    assert out.shape == (3, 5, 40)
    assert torch.equal(out.reshape(15, 40), _ops.int8_linear(x.reshape(15, 64).contiguous(), packed, Q.Q8_0, None, 40))
    assert _ops.int8_linear(torch.empty(0, 64), packed, Q.Q8_0, None, 40).shape == (0, 40)


def test_errors(monkeypatch):
    w = gguf_weight(40, 64, Q.Q4_1, seed=2)
    codes = _ops.pack_quantized_linear_weight(w, Q.Q4_1)
    packed = _ops.pack_int8_linear_weight(codes, Q.Q4_1, 40)
    with pytest.raises(RuntimeError, match="qtype must be"):
        _ops.int8_linear(torch.randn(2, 64), packed, 9, None, 40)
    with pytest.raises(RuntimeError, match="pack_int8_linear_weight with qtype=8"):
        _ops.int8_linear(torch.randn(2, 64), packed, Q.Q8_0, None, 40)
    with pytest.raises(RuntimeError, match="does not match"):
        _ops.int8_linear(torch.randn(2, 64), packed, Q.Q4_1, None, 80)
    with pytest.raises(RuntimeError, match="features"):
        _ops.int8_linear(torch.randn(2, 32), packed, Q.Q4_1, None, 40)
    with pytest.raises(RuntimeError, match="does not match"):
        _ops.pack_int8_linear_weight(codes, Q.Q4_1, 100)
    monkeypatch.setenv("PAGEDLLM_CPU_INT8_ISA", "sse9")
    with pytest.raises(RuntimeError, match="scalar, avx2 or vnni"):
        _ops.int8_linear(torch.randn(2, 64), packed, Q.Q4_1, None, 40)


def test_layers_take_the_int8_path_for_every_row_count():
    """pack_linear_weights(model, int8=True): code weights run int8_linear from one row to a prefill's
    many; a weight that is not codes keeps its exact path."""
    lin, head, plain = Linear(256, 40, bias=True), LMHead(50, 256), Linear(256, 8)
    with torch.no_grad():
        lin.weight.copy_(gguf_weight(40, 256, Q.Q4_1, seed=4))
        lin.bias.copy_(torch.randn(40))
        head.weight.copy_(gguf_weight(50, 256, Q.Q8_0, seed=5))
        plain.weight.copy_(torch.randn(8, 256))
    model = torch.nn.ModuleList([lin, head, plain])
    pack_linear_weights(model, int8=True)
    assert lin.packed.int8 and lin.packed.kind == INT8_KIND + Q.Q4_1 and head.packed.int8
    assert not plain.packed.int8 and plain.packed.kind == 0
    for rows in (1, 3, 200):
        x = torch.randn(rows, 256)
        assert torch.equal(lin(x), _ops.int8_linear(x, lin.packed.data, Q.Q4_1, lin.bias, 40))
        assert torch.equal(head(x), _ops.int8_linear(x, head.packed.data, Q.Q8_0, None, 50))
        assert not torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))
    assert pack_weight(lin.weight, int8=True).kind == INT8_KIND + Q.Q4_1
    assert pack_weight(lin.weight).kind == Q.Q4_1  # the default stays exact


@pytest.mark.skipif("vnni" in ISAS, reason="the CPU has VNNI: nothing to refuse")
def test_vnni_request_on_a_cpu_without_it_is_refused(monkeypatch):
    w = gguf_weight(8, 32, Q.Q8_0, seed=2)
    monkeypatch.setenv("PAGEDLLM_CPU_INT8_ISA", "vnni")
    with pytest.raises(RuntimeError, match="lacks the instructions"):
        _ops.int8_linear(torch.randn(1, 32), int8_pack(w, Q.Q8_0), Q.Q8_0, None, 8)
