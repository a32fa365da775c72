"""The CPU encoder ops (float32) against plain torch: encoder_attention (bidirectional attention within each
sequence of a flat batch, read from strided views of a fused QKV output), add_layer_norm (bias + residual +
LayerNorm in place) and bias_gelu (bias + erf GELU in place); and EncoderAttention's other paths (paged kernel,
padded SDPA) against the same reference on the CPU."""
import pytest
import torch
import torch.nn.functional as F

from testing_utils import non_contiguous_rows

from pagedllm import _ops
from pagedllm.layers.attention_metadata import set_attention_metadata
from pagedllm.layers.encoder_attention import (EncoderAttention, EncoderMetadata, encoder_attention_kernel,
                                               encoder_attention_native, encoder_attention_padded)

# Against a float64 reference: the inputs (std 2) give scores up to ~+-30, whose fp32 rounding (~4e-6 absolute)
# moves each softmax weight by that much relatively; outputs reach ~9, so ~3e-5 absolute.
ATTN_TOL = dict(atol=5e-5, rtol=1e-5)
# The layer's paths (ours, the paged kernel, padded SDPA, the fp32 reference): the same order of error.
PATHS_TOL = ATTN_TOL


def reference64(q, k, v, seq_lens, scale):
    """Softmax attention in float64, one sequence at a time; kv heads shared by heads / kv_heads queries."""
    group = q.shape[1] // k.shape[1]
    q, k, v = q.double(), k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    out, start = [], 0
    for n in seq_lens:
        qs, ks, vs = (t[start:start + n].transpose(0, 1) for t in (q, k, v))  # [heads, n, d]
        out.append((torch.softmax(qs @ ks.transpose(1, 2) * scale, -1) @ vs).transpose(0, 1))
        start += n
    return torch.cat(out).float()
# LayerNorm: two fp32 reductions over the row in another order than torch's.
LN_TOL = dict(atol=2e-6, rtol=2e-5)
# erfc fit: fractional error < 1.2e-7, then a few roundings.
GELU_TOL = dict(atol=1e-6, rtol=2e-6)


def _fused_qkv(n: int, heads: int, kv_heads: int, d: int, seed: int):
    """q, k, v as the strided views the model hands over: slices of one [n, (heads + 2 kv_heads) d] GEMM
    output, reshaped to [n, heads, d]."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(n, (heads + 2 * kv_heads) * d, generator=g) * 2
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    return q.reshape(n, heads, d), k.reshape(n, kv_heads, d), v.reshape(n, kv_heads, d)


def _cu(seq_lens):
    starts = [0]
    for n in seq_lens:
        starts.append(starts[-1] + n)
    return torch.tensor(starts, dtype=torch.int32)


# seq_lens: one token, odd lengths across the 16-key padding, a long one, a mixed (sorted, as the engine
# sends) batch; heads / kv_heads / head_size: MiniLM's 12 x 32, BERT-base's 64, odd 13, GQA 4 / 2 x 80.
SEQ_LENS = [[1], [7], [17, 3, 33], [1, 2, 5, 9, 15, 16, 31, 64, 130]]
HEADS = [(12, 12, 32), (4, 4, 64), (3, 3, 13), (4, 2, 80)]


@pytest.mark.parametrize("seq_lens", SEQ_LENS)
@pytest.mark.parametrize("heads,kv_heads,d", HEADS)
def test_encoder_attention_matches_reference(seq_lens, heads, kv_heads, d):
    n = sum(seq_lens)
    q, k, v = _fused_qkv(n, heads, kv_heads, d, seed=n + d)
    scale = d ** -0.5
    out = _ops.encoder_attention(q, k, v, _cu(seq_lens), max(seq_lens) + 5, scale)
    ref = reference64(q, k, v, seq_lens, scale)
    assert out.shape == (n, heads, d)
    torch.testing.assert_close(out, ref, **ATTN_TOL)


def test_encoder_attention_keeps_sequences_apart():
    """Changing one sequence's keys / values changes only that sequence's outputs."""
    seq_lens = [5, 9, 4]
    q, k, v = _fused_qkv(18, 2, 2, 32, seed=3)
    cu = _cu(seq_lens)
    before = _ops.encoder_attention(q, k, v, cu, 9, 0.2)
    k2, v2 = k.clone(), v.clone()
    k2[5:14] += 1.0
    v2[5:14] -= 3.0
    after = _ops.encoder_attention(q, k2, v2, cu, 9, 0.2)
    assert torch.equal(before[:5], after[:5]) and torch.equal(before[14:], after[14:])
    assert not torch.allclose(before[5:14], after[5:14])


def test_encoder_attention_rejects_bad_metadata():
    q, k, v = _fused_qkv(6, 2, 2, 32, seed=0)
    with pytest.raises(RuntimeError, match="cu_seqlens must run from 0 to 6"):
        _ops.encoder_attention(q, k, v, torch.tensor([0, 3, 5], dtype=torch.int32), 6, 1.0)
    with pytest.raises(RuntimeError, match="outside"):
        _ops.encoder_attention(q, k, v, torch.tensor([0, 6], dtype=torch.int32), 4, 1.0)
    with pytest.raises(RuntimeError, match="not a multiple"):
        _ops.encoder_attention(q, k[:, :1].expand(6, 3, 32), v[:, :1].expand(6, 3, 32), _cu([6]), 6, 1.0)


@pytest.mark.parametrize("seq_lens", [[3, 8, 8, 20], [16]])
@pytest.mark.parametrize("d", [32, 64])
def test_encoder_attention_layer_paths_agree(seq_lens, d):
    """EncoderAttention's CPU path (the op) and its other paths (the paged kernel for the head sizes it is
    built for, padded SDPA for any) equal the plain-torch reference."""
    n, heads = sum(seq_lens), 4
    q, k, v = _fused_qkv(n, heads, heads, d, seed=d)
    scale = d ** -0.5
    md = EncoderMetadata.build(seq_lens, "cpu")
    ref = reference64(q, k, v, seq_lens, scale)
    torch.testing.assert_close(encoder_attention_native(q, k, v, seq_lens, scale), ref, **PATHS_TOL)
    torch.testing.assert_close(encoder_attention_padded(q, k, v, md, scale), ref, **PATHS_TOL)
    if d == 64:
        torch.testing.assert_close(encoder_attention_kernel(q, k, v, md, scale), ref, **PATHS_TOL)
    layer = EncoderAttention(heads, d, scale)
    with set_attention_metadata(md):
        out = layer(q.reshape(n, -1), k.reshape(n, -1), v.reshape(n, -1))
    torch.testing.assert_close(out, ref.reshape(n, -1), **PATHS_TOL)


# hidden: a partial vector (7), MiniLM's 384, odd 769; rows: one, a few, a batch of texts.
@pytest.mark.parametrize("hidden", [7, 384, 769])
@pytest.mark.parametrize("rows", [1, 5, 300])
@pytest.mark.parametrize("with_x_bias", [True, False])
def test_add_layer_norm_matches_torch(hidden, rows, with_x_bias):
    g = torch.Generator().manual_seed(hidden * rows)
    x = torch.randn(rows, hidden, generator=g) * 3 + 1
    residual = torch.randn(rows, hidden, generator=g)
    weight, bias = torch.randn(hidden, generator=g), torch.randn(hidden, generator=g)
    x_bias = torch.randn(hidden, generator=g) if with_x_bias else None
    ref = F.layer_norm(x + (x_bias if with_x_bias else 0) + residual, (hidden,), weight, bias, 1e-12)
    x_strided = non_contiguous_rows(x.clone())  # a row stride wider than the row: written in place
    out = _ops.add_layer_norm(x_strided, non_contiguous_rows(residual), weight, bias, x_bias, 1e-12)
    assert out.data_ptr() == x_strided.data_ptr()
    torch.testing.assert_close(x_strided, ref, **LN_TOL)


def test_add_layer_norm_eps_and_constant_rows():
    x = torch.full((2, 16), 3.0)
    out = _ops.add_layer_norm(x, torch.zeros(2, 16), torch.ones(16), torch.full((16,), 0.5), None, 1e-5)
    torch.testing.assert_close(out, torch.full((2, 16), 0.5))  # zero variance: (v - mean) = 0, eps keeps it finite


def test_add_layer_norm_rejects_mismatched_shapes():
    with pytest.raises(RuntimeError, match="must match"):
        _ops.add_layer_norm(torch.zeros(2, 8), torch.zeros(3, 8), torch.ones(8), torch.zeros(8), None, 1e-5)
    with pytest.raises(RuntimeError, match=r"weight must be a float32 CPU \[8\]"):
        _ops.add_layer_norm(torch.zeros(2, 8), torch.zeros(2, 8), torch.ones(7), torch.zeros(8), None, 1e-5)


# features: a partial vector (7), MiniLM's intermediate 1536, odd 2753.
@pytest.mark.parametrize("features", [7, 1536, 2753])
@pytest.mark.parametrize("rows", [1, 33])
@pytest.mark.parametrize("with_bias", [True, False])
def test_bias_gelu_matches_torch(features, rows, with_bias):
    g = torch.Generator().manual_seed(features + rows)
    x = torch.randn(rows, features, generator=g) * 4
    bias = torch.randn(features, generator=g) if with_bias else None
    # Against exact GELU in float64, not torch's float32 gelu: torch's AVX-512 kernel is itself ~1.3e-6 off
    # (seen on a Zen 5 host), more than ours.
    v = (x + bias if with_bias else x).double()
    ref = (0.5 * v * torch.special.erfc(-v / 2 ** 0.5)).float()
    x_strided = non_contiguous_rows(x.clone())
    _ops.bias_gelu(x_strided, bias)
    torch.testing.assert_close(x_strided, ref, **GELU_TOL)


def test_bias_gelu_tails_and_special_values():
    """The negative tail keeps its relative accuracy (x Phi(x) is tiny there, and torch's own gelu, even in
    float64, cancels it to 0 below about -6 / -8): against 0.5 x erfc(-x / sqrt 2) in float64. inf, NaN as torch."""
    x = torch.cat([torch.linspace(-12, 12, 4801), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 80.0, -80.0,
                                                                 float("inf"), float("nan")])]).view(1, -1)
    x64 = x.double()
    ref = (0.5 * x64 * torch.special.erfc(-x64 / 2 ** 0.5)).float()
    ref[x.isinf()] = F.gelu(x[x.isinf()])
    out = x.clone()
    _ops.bias_gelu(out, None)
    assert torch.equal(out.isnan(), ref.isnan())
    # relative error ~ z^2 x float eps in the far tail (z = |x| / sqrt 2 is rounded before squaring)
    torch.testing.assert_close(out.nan_to_num(), ref.nan_to_num(), atol=1e-30, rtol=5e-5)
