"""Qwen2 / Qwen2.5: the Llama decoder with biases on q, k and v (none on o_proj), tied embeddings
for the small ones (config.tie_word_embeddings), optional sliding window on the layers that
config.layer_types marks "sliding_attention"."""
from __future__ import annotations

from pagedllm.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    @classmethod
    def attention_options(cls, config) -> dict:
        return dict(qkv_bias=True, o_bias=False)
