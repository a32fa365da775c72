"""Llama family decoder (Llama 2 / 3.x, SmolLM2, TinyLlama, Mistral), also the base of Qwen2 / Qwen3.

Per layer (HF LlamaDecoderLayer, with vLLM's fused residual add):
    h, residual = input_layernorm(h, residual)       # residual = h + residual, h = norm(residual)
    h = o_proj(attn(rope(q), rope(k), v))            # q, k, v from one [q | k | v] matmul
    h, residual = post_attention_layernorm(h, residual)
    h = down_proj(act(gate) * up)                    # gate, up from one [gate | up] matmul
Checkpoint names are HF's; q/k/v and gate/up are packed by packed_modules_mapping.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from pagedllm.layers.activation import SiluAndMul
from pagedllm.layers.attention import Attention
from pagedllm.layers.attention_metadata import get_attention_metadata
from pagedllm.layers.linear import LMHead, Linear, MergedLinear, QKVLinear, VocabEmbedding
from pagedllm.layers.rms_norm import RMSNorm
from pagedllm.layers.rope_scaling import get_rope, rope_parameters
from pagedllm.models import utils
from pagedllm.models.weight_utils import load_weights


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def sliding_window_of(config, layer_idx: int) -> Optional[int]:
    """HF's rule: with config.layer_types (Qwen2/3), only "sliding_attention" layers use the window;
    without (Mistral), every layer uses config.sliding_window when it is set."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if layer_types[layer_idx] == "sliding_attention" else None
    return window


def make_rope(config, dtype: torch.dtype):
    base, scaling = rope_parameters(config)
    head_dim = head_dim_of(config)
    rotary_dim = int(head_dim * (scaling or {}).get("partial_rotary_factor", 1.0))
    return get_rope(head_dim, rotary_dim, config.max_position_embeddings, base, is_neox_style=True,
                    rope_scaling=scaling, dtype=dtype)


class LlamaAttention(nn.Module):
    def __init__(self, config, layer_idx: int, dtype: torch.dtype, rotary_emb: nn.Module, qkv_bias: bool,
                 o_bias: bool, qk_norm: bool = False):
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = head_dim_of(config)
        self.qkv_proj = QKVLinear(hidden, self.head_dim, self.num_heads, self.num_kv_heads, qkv_bias, dtype)
        self.o_proj = Linear(self.num_heads * self.head_dim, hidden, o_bias, dtype)
        self.qk_norm = qk_norm
        if qk_norm:  # Qwen3: RMSNorm over each head's vector, before RoPE
            self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps, dtype=dtype)
            self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps, dtype=dtype)
        self.rotary_emb = rotary_emb  # one module (one cos / sin cache) shared by every layer
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim ** -0.5, self.num_kv_heads,
                              sliding_window=sliding_window_of(config, layer_idx))

    def _norm_heads(self, norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        return utils.rms_norm(norm, x.reshape(-1, self.head_dim)).view(n, -1)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden_states))
        if self.qk_norm:
            q, k = self._norm_heads(self.q_norm, q), self._norm_heads(self.k_norm, k)
        q, k = utils.rotary(self.rotary_emb, positions, q, k)
        return self.o_proj(utils.attention(self.attn, q, k, v))


class LlamaMLP(nn.Module):
    def __init__(self, config, dtype: torch.dtype):
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        inter = config.intermediate_size
        self.gate_up_proj = MergedLinear(config.hidden_size, [inter, inter], bias, dtype)
        self.down_proj = Linear(inter, config.hidden_size, bias, dtype)
        self.act_fn = SiluAndMul(getattr(config, "hidden_act", "silu"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, dtype: torch.dtype, rotary_emb: nn.Module, **attn_options):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx, dtype, rotary_emb, **attn_options)
        self.mlp = LlamaMLP(config, dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = utils.rms_norm(self.input_layernorm, hidden_states)
        else:
            hidden_states, residual = utils.rms_norm(self.input_layernorm, hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states)
        hidden_states, residual = utils.rms_norm(self.post_attention_layernorm, hidden_states, residual)
        return self.mlp(hidden_states), residual


class LlamaModel(nn.Module):
    # Set by the model runner (models/cpu_decoder_layers.install): hidden -> the one-op layers or None.
    cpu_layers = None

    def __init__(self, config, dtype: torch.dtype, **attn_options):
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size, dtype)
        rope = make_rope(config, dtype)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i, dtype, rope, **attn_options)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden_states, residual = self.embed_tokens(input_ids), None
        fused = self.cpu_layers(hidden_states) if self.cpu_layers is not None else None
        if fused is not None:  # CPU float32: the same layers in one op call (models/cpu_decoder_layers.py)
            hidden_states, residual = fused(positions, hidden_states, get_attention_metadata())
        else:
            for layer in self.layers:
                hidden_states, residual = layer(positions, hidden_states, residual)
        hidden_states, _ = utils.rms_norm(self.norm, hidden_states, residual)
        return hidden_states


class LlamaForCausalLM(nn.Module):
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    skip_weights = (r"rotary_emb\.inv_freq$",)

    @classmethod
    def attention_options(cls, config) -> dict:
        bias = bool(getattr(config, "attention_bias", False))
        return dict(qkv_bias=bias, o_bias=bias)

    def __init__(self, config, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.config = config
        self.dtype = dtype or torch.get_default_dtype()
        self.model = LlamaModel(config, self.dtype, **self.attention_options(config))
        tie = self.model.embed_tokens if getattr(config, "tie_word_embeddings", False) else None
        self.lm_head = LMHead(config.vocab_size, config.hidden_size, self.dtype, tie_to=tie)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [num_tokens] int64 -> hidden_states [num_tokens, hidden]."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[n, hidden] -> [n, vocab] float32."""
        return self.lm_head(hidden_states)

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_weights(self, weights)


class MistralForCausalLM(LlamaForCausalLM):
    """Llama with config.sliding_window on every layer (handled by sliding_window_of)."""
