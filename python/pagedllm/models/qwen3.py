"""Qwen3: the Llama decoder with an RMSNorm over each query and key head (q_norm, k_norm) before
RoPE, head_dim from the config, biases only when config.attention_bias."""
from __future__ import annotations

from pagedllm.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    @classmethod
    def attention_options(cls, config) -> dict:
        bias = bool(getattr(config, "attention_bias", False))
        return dict(qkv_bias=bias, o_bias=bias, qk_norm=True)
