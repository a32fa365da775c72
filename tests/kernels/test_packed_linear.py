"""packed_linear (the CPU fp32 decode GEMM on weights packed once) against F.linear in float64,
and the layers' use of it."""
import pytest
import torch
import torch.nn.functional as F

from testing_utils import non_contiguous_rows

from pagedllm import _ops
from pagedllm.layers import linear as linear_mod
from pagedllm.layers.linear import LMHead, Linear, VocabEmbedding, pack_linear_weights

# One fp32 FMA chain over k per output against a float64 reference: the error grows like
# sqrt(K) ulps of the partial sums (|x| |w| ~ 1 here): 1e-4 absolute is ~100x that at K = 1536.
TOL = dict(atol=1e-4, rtol=1e-5)


def reference(x, w, b):
    return F.linear(x.double(), w.double(), None if b is None else b.double())


# N: one partial panel (83), exact panels (576), a single short panel (5). K: odd, small, the model's.
# M: 1 row, one partial register tile (5), a full tile (12), tiles + remainder (13, 25), 64, and 130
# (more tiles than any decode uses).
@pytest.mark.parametrize("n,k", [(83, 769), (576, 576), (5, 16), (1536, 64)])
@pytest.mark.parametrize("m", [1, 5, 12, 13, 25, 64, 130])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_reference(n, k, m, bias):
    torch.manual_seed(n * 7 + k + m)
    w, x = torch.randn(n, k), torch.randn(m, k)
    b = torch.randn(n) if bias else None
    out = _ops.packed_linear(x, _ops.pack_linear_weight(w), b, n)
    assert out.shape == (m, n) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference(x, w, b), **TOL)


def test_packed_linear_strided_and_batched_input():
    torch.manual_seed(0)
    w = torch.randn(70, 96)
    packed = _ops.pack_linear_weight(w)
    x = non_contiguous_rows(torch.randn(9, 96))  # row stride 99, NaN in the gaps
    torch.testing.assert_close(_ops.packed_linear(x, packed, None, 70).double(), reference(x, w, None), **TOL)
    x3 = torch.randn(2, 7, 96)
    out = _ops.packed_linear(x3, packed, None, 70)
    assert out.shape == (2, 7, 70)
    torch.testing.assert_close(out.double(), reference(x3, w, None), **TOL)
    assert _ops.packed_linear(torch.empty(0, 96), packed, None, 70).shape == (0, 70)


def test_pack_layout():
    w = torch.arange(40 * 3, dtype=torch.float32).view(40, 3)
    p = _ops.pack_linear_weight(w)
    assert p.shape == (2, 3, 32)
    for n in range(40):
        assert torch.equal(p[n // 32, :, n % 32], w[n])
    assert torch.count_nonzero(p[1, :, 8:]) == 0  # past N: zeros


def test_packed_linear_errors():
    w = torch.randn(40, 8)
    p = _ops.pack_linear_weight(w)
    with pytest.raises(RuntimeError, match="only float32 weights"):
        _ops.pack_linear_weight(w.bfloat16())
    with pytest.raises(RuntimeError, match="float32 only"):
        _ops.packed_linear(torch.randn(2, 8).bfloat16(), p, None, 40)
    with pytest.raises(RuntimeError, match="x has 9 features, the weight expects 8"):
        _ops.packed_linear(torch.randn(2, 9), p, None, 40)
    with pytest.raises(RuntimeError, match="does not match the packed weight"):
        _ops.packed_linear(torch.randn(2, 8), p, None, 70)
    with pytest.raises(RuntimeError, match="bias must be"):
        _ops.packed_linear(torch.randn(2, 8), p, torch.randn(39), 40)
    with pytest.raises(RuntimeError, match="must come from pack_linear_weight"):
        _ops.packed_linear(torch.randn(2, 8), w, None, 40)


class TinyModel(torch.nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.embed = VocabEmbedding(100, 48, dtype)
        self.proj = Linear(48, 70, bias=True, dtype=dtype)
        self.head = LMHead(100, 48, dtype, tie_to=self.embed)
        for p in self.parameters():
            torch.nn.init.normal_(p)


def test_layers_use_the_packed_weight_for_small_batches(monkeypatch):
    monkeypatch.setattr(linear_mod, "PACKED_MIN_ROWS", 2)  # a host where MKL's one-row GEMV is as fast
    torch.manual_seed(0)
    model = TinyModel(torch.float32)
    assert pack_linear_weights(model) == (3 + 4) * 48 * 32 * 4  # whole 32-feature panels of 70 and 100
    assert model.proj.packed.qtype == 0 and model.head.packed.qtype == 0  # random weights: fp32 panels
    calls = []
    real = _ops.packed_linear
    monkeypatch.setattr(linear_mod._ops, "packed_linear", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    monkeypatch.setattr(linear_mod, "PACKED_MAX_ROWS", 64)  # the limit of a host where MKL wins above it
    lo, hi = linear_mod.PACKED_MIN_ROWS, linear_mod.PACKED_MAX_ROWS
    for m in (lo - 1, lo, hi, hi + 1):
        x = torch.randn(m, 48)
        torch.testing.assert_close(model.proj(x).double(), reference(x, model.proj.weight, model.proj.bias), **TOL)
        torch.testing.assert_close(model.head(x).double(), reference(x, model.embed.weight, None), **TOL)
    # Outside [PACKED_MIN_ROWS, PACKED_MAX_ROWS] the layers use F.linear (MKL).
    assert calls == [lo, lo, hi, hi]


def test_packed_layers_on_another_device_take_f_linear():
    """A model packed on the CPU, then moved (model.to("cuda")), keeps its CPU-only packed copies: an
    input on another device must not reach the CPU-only ops. The meta device stands in for CUDA here."""
    torch.manual_seed(0)
    model = TinyModel(torch.float32)
    assert pack_linear_weights(model) > 0
    model.to("meta")
    assert model.proj.packed is not None and model.proj.packed.data.device.type == "cpu"
    x = torch.empty(linear_mod.PACKED_MIN_ROWS, 48, device="meta")
    assert model.proj(x).shape == (linear_mod.PACKED_MIN_ROWS, 70)
    assert model.head(x).shape == (linear_mod.PACKED_MIN_ROWS, 100)


@pytest.mark.cuda
def test_packed_model_moved_to_cuda_runs():
    torch.manual_seed(0)
    model = TinyModel(torch.float32)
    pack_linear_weights(model)
    x = torch.randn(linear_mod.PACKED_MIN_ROWS, 48)
    expected = model.proj(x)
    model.to("cuda")
    torch.testing.assert_close(model.proj(x.cuda()).cpu(), expected, rtol=1e-4, atol=1e-4)


def test_16_bit_cpu_weights_get_their_own_16_bit_panels_only():
    """A bf16 model is not packed as fp32 panels or codes: its decode GEMMs take its own bits
    (test_wide16_linear.py; test_bf16_dot_linear.py where the CPU has AVX512_BF16); a model on another
    device is not packed at all."""
    model = TinyModel(torch.bfloat16)
    assert pack_linear_weights(model) > 0
    kind = linear_mod.BF16_DOT_KIND if linear_mod.bf16_dot_available() else linear_mod.WIDE16_QTYPES[0]
    assert {model.proj.packed.qtype, model.head.packed.qtype} == {kind}
    assert model.proj.packed.act_dtype == torch.bfloat16
    model = TinyModel(torch.float32).to("meta")
    assert pack_linear_weights(model) == 0 and model.proj.packed is None


def test_reloading_weights_repacks(tmp_path):
    """New weights loaded into an engine's model (load_weights) reach the packed copies too."""
    from model_factory import make_tiny_model
    from pagedllm.models import loader

    first = loader.resolve_model(str(make_tiny_model(tmp_path, "qwen2", seed=0)))
    second = loader.resolve_model(str(make_tiny_model(tmp_path / "b", "qwen2", seed=1)))
    model = loader.load_model(first, dtype=torch.float32)
    assert pack_linear_weights(model) > 0
    model.load_weights(loader.iter_weights(second, model))
    layers = [m for m in model.modules() if isinstance(m, (Linear, LMHead))]
    assert layers
    for m in layers:
        weight = m.head_weight if isinstance(m, LMHead) else m.weight
        assert m.packed.qtype == 0 and torch.equal(m.packed.data, _ops.pack_linear_weight(weight))


def test_default_row_limit_by_host_and_override(monkeypatch):
    """No limit on an AMD CPU with AVX-512 (MKL runs its AVX2 code there; one-row GEMVs are packed too), 64
    elsewhere, the environment variable over both; a bad value is refused naming the variable."""
    from pagedllm import cpu_features
    monkeypatch.delenv(linear_mod.PACKED_MAX_ROWS_ENV, raising=False)
    monkeypatch.setenv(cpu_features.FEATURES_ENV, "avx2,avx512f")
    monkeypatch.setattr(cpu_features, "cpu_vendor", lambda: "AuthenticAMD")
    assert linear_mod.default_packed_max_rows() == linear_mod.NO_ROW_LIMIT and linear_mod.mkl_runs_avx2_code()
    monkeypatch.setattr(cpu_features, "cpu_vendor", lambda: "GenuineIntel")
    assert linear_mod.default_packed_max_rows() == 64 and not linear_mod.mkl_runs_avx2_code()
    monkeypatch.setattr(cpu_features, "cpu_vendor", lambda: "AuthenticAMD")
    monkeypatch.setenv(cpu_features.FEATURES_ENV, "avx2,fma")
    assert linear_mod.default_packed_max_rows() == 64
    monkeypatch.setenv(linear_mod.PACKED_MAX_ROWS_ENV, "8")
    assert linear_mod.default_packed_max_rows() == 8
    monkeypatch.setenv(linear_mod.PACKED_MAX_ROWS_ENV, str(10 ** 30))  # more than an int64: no limit
    assert linear_mod.default_packed_max_rows() == linear_mod.NO_ROW_LIMIT
    for bad in ("0", "-3", "many"):
        monkeypatch.setenv(linear_mod.PACKED_MAX_ROWS_ENV, bad)
        with pytest.raises(ValueError, match="PAGEDLLM_CPU_PACKED_MAX_ROWS must be a positive integer"):
            linear_mod.default_packed_max_rows()
