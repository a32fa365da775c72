"""rms_norm and fused_add_rms_norm kernels against RMSNorm.forward_native (and native against HF)."""
import pytest
import torch

from testing_utils import KERNEL_DEVICES, DTYPES

from pagedllm import _ops
from pagedllm.layers.rms_norm import RMSNorm

NUM_TOKENS = [7, 83]
# 64: one warp per row; 769: not a multiple of the vector width (scalar path); 4096: the vector
# path, 2 vectors per thread; 20480: 8 vectors per thread; 40960: too long for registers (generic).
HIDDEN_SIZES = [64, 769, 4096, 20480, 40960]
# contiguous; strided: row stride hidden + 3 (scalar path on CUDA); strided_aligned: row stride
# hidden + 8 (vector path with a row stride); offset: first element 2 bytes past 16-byte alignment.
LAYOUTS = ["contiguous", "strided", "strided_aligned", "offset"]

# Kernel vs native: the fp32 sums run in a different order and CUDA's rsqrtf is within 2 ulp, so
# fp32 agrees to ~1e-6 relative. For 16-bit dtypes the normed value is rounded to the dtype before
# the weight multiply and again after it (HF's order): an fp32 difference can flip each rounding
# by one ulp, so allow 2 ulps relative (bf16 ulp 2^-8, fp16 ulp 2^-11) plus a small atol near zero.
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5),
       torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2),
       torch.float16: dict(atol=2e-3, rtol=2e-3)}


def assert_mostly_identical(out, ref):
    """Beyond the tolerance: for 16-bit dtypes at most 1% of elements may differ at all. A flipped
    rounding from fp32 noise is rare (fp32 error ~1e-7 vs a dtype ulp >= 5e-4); a wrong rounding
    order (e.g. weight applied in fp32 before the cast) changes about a quarter of them."""
    if out.dtype != torch.float32:
        assert (out != ref).float().mean().item() < 0.01


def make_rows(num_tokens, hidden, dtype, device, layout):
    x = torch.randn(num_tokens, hidden, dtype=dtype, device=device)
    if layout == "contiguous":
        return x
    pad = {"strided": 3, "strided_aligned": 8, "offset": 8}[layout]
    start = 1 if layout == "offset" else 0
    wide = torch.full((num_tokens, hidden + pad), float("nan"), dtype=dtype, device=device)
    view = wide[:, start:start + hidden]
    view.copy_(x)
    return view


def make_norm(hidden, dtype, device):
    norm = RMSNorm(hidden, eps=1e-6, dtype=dtype).to(device)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2)
    return norm


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN_SIZES)
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_rms_norm(layout, num_tokens, hidden, dtype, device):
    torch.manual_seed(0)
    norm = make_norm(hidden, dtype, device)
    x = make_rows(num_tokens, hidden, dtype, device, layout)
    before = x.clone()
    out = norm(x)
    assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous()
    ref = norm.forward_native(x)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    assert_mostly_identical(out, ref)
    assert torch.equal(x, before)  # the input is not modified


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN_SIZES)
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fused_add_rms_norm(layout, num_tokens, hidden, dtype, device):
    torch.manual_seed(0)
    norm = make_norm(hidden, dtype, device)
    x = make_rows(num_tokens, hidden, dtype, device, layout)
    residual = make_rows(num_tokens, hidden, dtype, device, layout) * 4
    ref_out, ref_residual = norm.forward_native(x, residual)
    out, new_residual = norm(x, residual)
    # In place on the given tensors (the documented contract of RMSNorm.forward).
    assert out is x and new_residual is residual
    # The sum is one fp32 add rounded once to the dtype in both: bit-exact.
    assert torch.equal(new_residual, ref_residual)
    torch.testing.assert_close(out, ref_out, **TOL[dtype])
    assert_mostly_identical(out, ref_out)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rms_norm_leading_dims(dtype, device):
    """[batch, seq, hidden] inputs: viewable ones run in place on the rows, others through a copy."""
    torch.manual_seed(0)
    norm = make_norm(512, dtype, device)
    x = torch.randn(3, 5, 512, dtype=dtype, device=device)
    torch.testing.assert_close(norm(x), norm.forward_native(x), **TOL[dtype])
    xt = torch.randn(5, 3, 512, dtype=dtype, device=device).transpose(0, 1)  # rows not one stride apart
    torch.testing.assert_close(norm(xt), norm.forward_native(xt), **TOL[dtype])
    r = torch.randn(5, 3, 512, dtype=dtype, device=device).transpose(0, 1)
    ref_out, ref_res = norm.forward_native(xt, r)
    out, res = norm(xt.clone(), r)  # residual gets copied to contiguous rows first
    assert torch.equal(res, ref_res)
    torch.testing.assert_close(out, ref_out, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_native_matches_hf_llama_rms_norm(dtype):
    """forward_native is HF's LlamaRMSNorm bit for bit (the rounding order the kernels follow)."""
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    torch.manual_seed(0)
    norm = make_norm(769, dtype, "cpu")
    hf = llama.LlamaRMSNorm(769, eps=1e-6).to(dtype)
    with torch.no_grad():
        hf.weight.copy_(norm.weight)
    x = torch.randn(7, 769, dtype=dtype)
    assert torch.equal(norm.forward_native(x), hf(x))


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_rms_norm_errors(device):
    x = torch.randn(4, 64, device=device)
    with pytest.raises(RuntimeError, match="weight dtype"):
        _ops.rms_norm(x, torch.ones(64, dtype=torch.bfloat16, device=device), 1e-6)
    with pytest.raises(RuntimeError, match=r"weight must be \[hidden\]"):
        _ops.rms_norm(x, torch.ones(65, device=device), 1e-6)
    with pytest.raises(RuntimeError, match="out shape"):
        torch.ops._C.rms_norm(torch.empty(4, 63, device=device), x, torch.ones(64, device=device), 1e-6)
    with pytest.raises(RuntimeError, match="float32, float16 and bfloat16|not implemented for"):
        _ops.rms_norm(x.double(), torch.ones(64, dtype=torch.double, device=device), 1e-6)
    with pytest.raises(RuntimeError, match="residual shape"):
        _ops.fused_add_rms_norm(x, torch.randn(4, 32, device=device), torch.ones(64, device=device), 1e-6)
    with pytest.raises(RuntimeError, match="written in place"):
        r = torch.randn(64, 4, device=device).t()  # last dim not contiguous
        _ops.fused_add_rms_norm(x, r, torch.ones(64, device=device), 1e-6)
