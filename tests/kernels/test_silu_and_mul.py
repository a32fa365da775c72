"""silu_and_mul (CPU, float32): silu(gate) * up in one pass, against the plain-torch form; and the
MLP activation layer's use of it."""
import pytest
import torch
import torch.nn.functional as F

from testing_utils import non_contiguous_rows

from pagedllm import _ops
from pagedllm.layers import activation as activation_mod
from pagedllm.layers.activation import SiluAndMul
from pagedllm.models.utils import native_ops

# Our e^x is within 1.4 ulp, then a divide and two multiplies: a few ulp of the result.
TOL = dict(atol=1e-6, rtol=2e-6)


def reference(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


# d: a partial vector (7), the default model's (1536), odd and large (2753); rows: 1, a decode batch, a prefill.
@pytest.mark.parametrize("d", [7, 1536, 2753])
@pytest.mark.parametrize("rows", [1, 32, 300])
def test_matches_torch(d, rows):
    torch.manual_seed(d + rows)
    x = torch.randn(rows, 2 * d) * 6
    out = _ops.silu_and_mul(x)
    assert out.shape == (rows, d) and out.dtype == torch.float32
    torch.testing.assert_close(out, reference(x), **TOL)


def test_extreme_and_special_values():
    g = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 20.0, -20.0, 88.0, -88.0, 100.0, -100.0, 3e38, -3e38,
                      float("inf"), float("-inf"), float("nan")])
    x = torch.cat([g, torch.full_like(g, 1.5)]).view(1, -1)
    out, ref = _ops.silu_and_mul(x), reference(x)
    assert torch.equal(out.isnan(), ref.isnan())
    torch.testing.assert_close(out.nan_to_num(), ref.nan_to_num(), **TOL)
    assert torch.equal(out[0, 1].signbit(), ref[0, 1].signbit())


def test_strided_rows_and_empty():
    torch.manual_seed(0)
    x = non_contiguous_rows(torch.randn(9, 64))  # row stride 67, NaN in the gaps
    torch.testing.assert_close(_ops.silu_and_mul(x), reference(x), **TOL)
    assert _ops.silu_and_mul(torch.empty(0, 64)).shape == (0, 32)


def test_errors():
    with pytest.raises(RuntimeError, match="float32 only"):
        _ops.silu_and_mul(torch.randn(2, 8).bfloat16())
    with pytest.raises(RuntimeError, match=r"x must be \[rows, 2 d\]"):
        _ops.silu_and_mul(torch.randn(2, 3, 8))
    with pytest.raises(RuntimeError, match="last dim of x and out must be contiguous"):
        _ops.silu_and_mul(torch.randn(8, 2).t())


def test_layer_uses_the_kernel_for_cpu_float32_silu(monkeypatch):
    calls = []
    real = _ops.silu_and_mul
    monkeypatch.setattr(activation_mod._ops, "silu_and_mul", lambda x: calls.append(x.shape) or real(x))
    x = torch.randn(5, 64)
    torch.testing.assert_close(SiluAndMul("silu")(x), reference(x), **TOL)
    assert calls == [(5, 64)]
    SiluAndMul("gelu")(x)                                  # other activations: plain torch
    SiluAndMul("silu")(x.bfloat16())                       # other dtypes
    SiluAndMul("silu")(x.view(5, 2, 32).reshape(5, 1, 64))  # not [rows, 2 d]
    with native_ops():                                     # PAGEDLLM_NATIVE_OPS
        SiluAndMul("silu")(x)
    assert calls == [(5, 64)]
