"""rotary_embedding kernel against RotaryEmbedding.forward_native, and native against HF / Meta formulas."""
import math

import pytest
import torch

from testing_utils import KERNEL_DEVICES, DTYPES

from pagedllm import _ops
from pagedllm.layers.rotary import RotaryEmbedding

MAX_POSITION = 1024
# (head_size, rotary_dim): every supported head size fully rotated, plus partial rotary dims.
HEAD_ROT = [(64, 64), (80, 80), (96, 96), (128, 128), (256, 256), (128, 64), (80, 32)]
NUM_TOKENS = [7, 83]
NUM_HEADS, NUM_KV_HEADS = 4, 2
# Both sides compute in fp32 from the same dtype-rounded cos/sin and round once, so they differ only
# by fp32 contraction (FMA) before that rounding: at most one ulp of the dtype (bf16 2^-8, fp16
# 2^-11 relative), and ~1e-6 in fp32.
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5),
       torch.bfloat16: dict(atol=1e-2, rtol=1e-2),
       torch.float16: dict(atol=1e-3, rtol=1e-3)}


def make_qk(num_tokens, head_size, dtype, device, layout):
    """query, key and the fused buffer they may be slices of (or None)."""
    q_width, k_width = NUM_HEADS * head_size, NUM_KV_HEADS * head_size
    if layout == "fused_qkv":  # slices of one [num_tokens, q + k + v] projection: token stride > row
        qkv = torch.randn(num_tokens, q_width + 2 * k_width, dtype=dtype, device=device)
        return qkv[:, :q_width], qkv[:, q_width:q_width + k_width], qkv
    q = torch.randn(num_tokens, q_width, dtype=dtype, device=device)
    k = torch.randn(num_tokens, k_width, dtype=dtype, device=device)
    if layout == "3d":
        q, k = q.view(num_tokens, NUM_HEADS, head_size), k.view(num_tokens, NUM_KV_HEADS, head_size)
    return q, k, None


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("head_size,rotary_dim", HEAD_ROT)
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
@pytest.mark.parametrize("layout", ["2d", "3d", "fused_qkv"])
def test_rotary_embedding(layout, num_tokens, head_size, rotary_dim, is_neox, dtype, device):
    torch.manual_seed(0)
    rope = RotaryEmbedding(head_size, rotary_dim, MAX_POSITION, 10000.0, is_neox, dtype).to(device)
    positions = torch.randint(0, MAX_POSITION, (num_tokens,), device=device)
    query, key, qkv = make_qk(num_tokens, head_size, dtype, device, layout)
    ref_q, ref_k = rope.forward_native(positions, query, key)
    value_before = qkv[:, query.shape[1] + key.shape[1]:].clone() if qkv is not None else None
    q_in = query.clone()
    out_q, out_k = rope(positions, query, key)
    assert out_q is query and out_k is key  # in place
    torch.testing.assert_close(query, ref_q, **TOL[dtype])
    torch.testing.assert_close(key, ref_k, **TOL[dtype])
    if dtype != torch.float32:  # one rounding each side: a differing element is a rare fp32 tie-break
        assert (query != ref_q).float().mean().item() < 0.01
    # Dims beyond rotary_dim pass through bit for bit.
    q_heads, qi_heads = query.reshape(num_tokens, -1, head_size), q_in.reshape(num_tokens, -1, head_size)
    assert torch.equal(q_heads[..., rotary_dim:], qi_heads[..., rotary_dim:])
    if value_before is not None:  # the v slice of the fused buffer is untouched
        assert torch.equal(qkv[:, query.shape[1] + key.shape[1]:], value_before)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rotary_without_key(dtype, device):
    torch.manual_seed(0)
    rope = RotaryEmbedding(128, 128, MAX_POSITION, 10000.0, True, dtype).to(device)
    positions = torch.randint(0, MAX_POSITION, (7,), device=device)
    query = torch.randn(7, NUM_HEADS * 128, dtype=dtype, device=device)
    ref_q, _ = rope.forward_native(positions, query, None)
    out_q, out_k = rope(positions, query, None)
    assert out_k is None
    torch.testing.assert_close(out_q, ref_q, **TOL[dtype])


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_neox_matches_hf_apply_rotary_pos_emb(device):
    """The op equals transformers' Llama apply_rotary_pos_emb (rotate_half) in fp32."""
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    torch.manual_seed(0)
    head_size, base, num_tokens = 128, 10000.0, 83
    rope = RotaryEmbedding(head_size, head_size, MAX_POSITION, base, True, torch.float32).to(device)
    positions = torch.randint(0, MAX_POSITION, (num_tokens,), device=device)
    q = torch.randn(num_tokens, NUM_HEADS, head_size, device=device)
    k = torch.randn(num_tokens, NUM_KV_HEADS, head_size, device=device)
    # HF: inv_freq over even dims, emb = cat(freqs, freqs), tensors [batch, heads, seq, dim].
    inv_freq = 1.0 / (base ** (torch.arange(0, head_size, 2, dtype=torch.int64).float().to(device) / head_size))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    hf_q, hf_k = llama.apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                            emb.cos()[None], emb.sin()[None])
    out_q, out_k = rope(positions, q.clone(), k.clone())
    torch.testing.assert_close(out_q, hf_q[0].transpose(0, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_k, hf_k[0].transpose(0, 1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_gptj_matches_complex_rotation(device):
    """GPT-J style equals Meta Llama's complex formulation: pairs (2i, 2i+1) times e^(i pos f_i)."""
    torch.manual_seed(0)
    head_size, rotary_dim, base, num_tokens = 80, 32, 10000.0, 7
    rope = RotaryEmbedding(head_size, rotary_dim, MAX_POSITION, base, False, torch.float32).to(device)
    positions = torch.randint(0, MAX_POSITION, (num_tokens,), device=device)
    q = torch.randn(num_tokens, NUM_HEADS, head_size, device=device)
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2).float().to(device) / rotary_dim))
    freqs_cis = torch.polar(torch.ones(num_tokens, rotary_dim // 2, device=device),
                            positions.float()[:, None] * inv_freq[None, :])
    rot = torch.view_as_complex(q[..., :rotary_dim].reshape(num_tokens, NUM_HEADS, -1, 2).contiguous())
    expected = torch.cat((torch.view_as_real(rot * freqs_cis[:, None]).flatten(-2), q[..., rotary_dim:]), dim=-1)
    out_q, _ = rope(positions, q.clone(), None)
    torch.testing.assert_close(out_q, expected, atol=1e-5, rtol=1e-5)


def test_cos_sin_cache_layout():
    rope = RotaryEmbedding(64, 32, 16, 500.0, True, torch.bfloat16)
    cache = rope.cos_sin_cache
    assert cache.shape == (16, 32) and cache.dtype == torch.bfloat16
    pos, i = 5, 3
    angle = pos / 500.0 ** (2 * i / 32)
    assert cache[pos, i].item() == torch.tensor(math.cos(angle), dtype=torch.bfloat16).item()
    assert cache[pos, 16 + i].item() == torch.tensor(math.sin(angle), dtype=torch.bfloat16).item()


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_rotary_errors(device):
    positions = torch.zeros(3, dtype=torch.long, device=device)
    q = torch.randn(3, 2 * 64, device=device)
    cache = torch.randn(16, 64, device=device)
    with pytest.raises(RuntimeError, match="must equal the query dtype"):
        _ops.rotary_embedding(positions, q, None, 64, cache.bfloat16(), True)
    with pytest.raises(RuntimeError, match="rot_dim"):
        _ops.rotary_embedding(positions, q, None, 32, torch.randn(16, 64, device=device), True)
    with pytest.raises(RuntimeError, match="not a multiple of head_size"):
        _ops.rotary_embedding(positions, torch.randn(3, 100, device=device), None, 64, cache, True)
    with pytest.raises(RuntimeError, match="tokens but positions has"):
        _ops.rotary_embedding(positions, torch.randn(4, 128, device=device), None, 64, cache, True)
    with pytest.raises(RuntimeError, match="int64"):
        _ops.rotary_embedding(positions.int(), q, None, 64, cache, True)
    with pytest.raises(ValueError, match="rotary_dim"):
        RotaryEmbedding(64, 65, 16, 10000.0, True, torch.float32)


def test_rotary_position_out_of_range_cpu():
    q = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match="outside the cos_sin_cache"):
        _ops.rotary_embedding(torch.tensor([0, 16]), q, None, 64, torch.randn(16, 64), True)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_rotary_zero_heads_is_a_no_op(device):
    """A [num_tokens, 0] query (and key) is accepted and left as it is; the CUDA launcher once
    launched a block of 0 threads for it (an invalid configuration on a GPU)."""
    positions = torch.tensor([0, 3, 5], device=device)
    cache = torch.randn(16, 64, device=device)
    q, k = torch.empty(3, 0, device=device), torch.empty(3, 0, device=device)
    _ops.rotary_embedding(positions, q, k, 64, cache, True)
    _ops.rotary_embedding(positions, q, None, 64, cache, False)
    assert q.shape == (3, 0) and k.shape == (3, 0)
