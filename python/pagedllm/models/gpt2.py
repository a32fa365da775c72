"""GPT-2 (and DialoGPT): learned absolute positions, pre-LayerNorm blocks, gelu_new MLP, packed
c_attn = [q | k | v] projection, LM head tied to the token embedding.

HF stores the projections as Conv1D ([in, out]); they are transposed on load (transposed_weights).
Old checkpoints name tensors without the "transformer." prefix and carry the causal-mask buffers
attn.bias / attn.masked_bias: both handled by the declared renames / skips.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from pagedllm.layers.activation import get_act_fn
from pagedllm.layers.attention import Attention
from pagedllm.layers.linear import LMHead, Linear, VocabEmbedding
from pagedllm.models import utils
from pagedllm.models.weight_utils import load_weights


class GPT2Attention(nn.Module):
    def __init__(self, config, layer_idx: int, dtype: torch.dtype):
        super().__init__()
        embed = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = embed // self.num_heads
        self.c_attn = Linear(embed, 3 * embed, bias=True, dtype=dtype)
        self.c_proj = Linear(embed, embed, bias=True, dtype=dtype)
        scale = self.head_dim ** -0.5 if getattr(config, "scale_attn_weights", True) else 1.0
        if getattr(config, "scale_attn_by_inverse_layer_idx", False):
            scale /= float(layer_idx + 1)
        self.attn = Attention(self.num_heads, self.head_dim, scale, self.num_heads)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        q, k, v = self.c_attn(hidden_states).chunk(3, dim=-1)
        return self.c_proj(utils.attention(self.attn, q, k, v))


class GPT2MLP(nn.Module):
    def __init__(self, config, dtype: torch.dtype):
        super().__init__()
        inner = getattr(config, "n_inner", None) or 4 * config.hidden_size
        self.c_fc = Linear(config.hidden_size, inner, bias=True, dtype=dtype)
        self.c_proj = Linear(inner, config.hidden_size, bias=True, dtype=dtype)
        self.act = get_act_fn(getattr(config, "activation_function", "gelu_new"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, config, layer_idx: int, dtype: torch.dtype):
        super().__init__()
        eps = config.layer_norm_epsilon
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=eps, dtype=dtype)
        self.attn = GPT2Attention(config, layer_idx, dtype)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=eps, dtype=dtype)
        self.mlp = GPT2MLP(config, dtype)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.attn(self.ln_1(hidden_states)) + hidden_states
        return hidden_states + self.mlp(self.ln_2(hidden_states))


class GPT2Model(nn.Module):
    def __init__(self, config, dtype: torch.dtype):
        super().__init__()
        self.wte = VocabEmbedding(config.vocab_size, config.hidden_size, dtype)
        self.wpe = VocabEmbedding(config.max_position_embeddings, config.hidden_size, dtype)
        self.h = nn.ModuleList(GPT2Block(config, i, dtype) for i in range(config.num_hidden_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon, dtype=dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden_states = self.wte(input_ids) + self.wpe(positions)
        for block in self.h:
            hidden_states = block(hidden_states)
        return self.ln_f(hidden_states)


class GPT2LMHeadModel(nn.Module):
    packed_modules_mapping: dict[str, list[str]] = {}  # c_attn is stored packed already
    weight_renames = ((r"^(?!transformer\.|lm_head\.)", "transformer."),)
    skip_weights = (r"\.attn\.bias$", r"\.attn\.masked_bias$")
    transposed_weights = ("c_attn.weight", "c_proj.weight", "c_fc.weight")

    def __init__(self, config, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.config = config
        self.dtype = dtype or torch.get_default_dtype()
        self.transformer = GPT2Model(config, self.dtype)
        tie = self.transformer.wte if getattr(config, "tie_word_embeddings", True) else None
        self.lm_head = LMHead(config.vocab_size, config.hidden_size, self.dtype, tie_to=tie)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [num_tokens] int64 -> hidden_states [num_tokens, hidden]."""
        return self.transformer(input_ids, positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_states)

    def attention_layers(self) -> list[Attention]:
        return [block.attn.attn for block in self.transformer.h]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_weights(self, weights)

