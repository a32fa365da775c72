"""RoPE scaling variants: our cos / sin cache equals what HF's rotary embedding computes."""
from types import SimpleNamespace

import pytest
import torch

from pagedllm.layers.rope_scaling import get_rope, rope_parameters

HEAD = 64
LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=64)
CASES = {
    "default": dict(rope_type="default"),
    "linear": dict(rope_type="linear", factor=4.0),
    "dynamic": dict(rope_type="dynamic", factor=2.0),  # equal to default below max_position
    "llama3": LLAMA3,
}


@pytest.mark.parametrize("case", list(CASES))
def test_cos_sin_cache_matches_hf(case):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    max_pos = 512
    config = LlamaConfig(hidden_size=256, num_attention_heads=4, head_dim=HEAD, max_position_embeddings=max_pos,
                         rope_parameters=dict(rope_theta=500000.0, **CASES[case]))
    base, scaling = rope_parameters(config)
    assert base == 500000.0
    rope = get_rope(HEAD, HEAD, max_pos, base, True, scaling, torch.float32)
    positions = torch.arange(max_pos)
    cos, sin = LlamaRotaryEmbedding(config)(torch.zeros(1, dtype=torch.float32), positions[None])
    half = HEAD // 2
    torch.testing.assert_close(rope.cos_sin_cache[:, :half], cos[0, :, :half], atol=0, rtol=0)
    torch.testing.assert_close(rope.cos_sin_cache[:, half:], sin[0, :, :half], atol=0, rtol=0)
    if case in ("linear", "llama3"):  # the scaling does change something
        plain = get_rope(HEAD, HEAD, max_pos, base, True, None, torch.float32)
        assert not torch.equal(plain.cos_sin_cache, rope.cos_sin_cache)


def test_transformers4_style_config():
    config = SimpleNamespace(rope_theta=1e6, rope_scaling={"type": "linear", "factor": 2.0}, max_position_embeddings=8)
    base, scaling = rope_parameters(config)
    assert base == 1e6 and get_rope(HEAD, HEAD, 8, base, True, scaling).scaling_factor == 2.0
    assert rope_parameters(SimpleNamespace(max_position_embeddings=8)) == (10000.0, None)


def test_unsupported_rope_type_names_it():
    with pytest.raises(ValueError, match="yarn.*supported: default, linear, dynamic, llama3"):
        get_rope(HEAD, HEAD, 16, 10000.0, True, {"rope_type": "yarn", "factor": 4.0})
