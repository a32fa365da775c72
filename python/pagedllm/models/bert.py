"""BERT encoders (HF BertModel / BertForSequenceClassification), e.g. all-MiniLM-L6-v2 and cross-encoders.

Per layer (post-LayerNorm, bidirectional):
    h = LayerNorm(h + dense(attn(q, k, v)))          # q, k, v from one [q | k | v] matmul, no causal mask
    h = LayerNorm(h + output(gelu(intermediate(h))))
Embeddings: word + absolute position (0.. per sequence) + token type, then LayerNorm.
A step is a flat batch of whole sequences (no KV cache): EncoderAttention attends within each sequence.
Checkpoint names are HF's (bert.* under the classifier); query/key/value are packed into qkv_proj.

On a CPU float32 model (and unless native ops are asked for) the sublayer ends run our fused kernels: the
dense / intermediate GEMMs without bias, then add_layer_norm (bias + residual + LayerNorm, in place) and
bias_gelu (bias + erf GELU, in place); forward_native keeps torch's ops, the reference.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm import _ops
from pagedllm.layers.encoder_attention import EncoderAttention
from pagedllm.layers.linear import Linear, QKVLinear, bias_free_linear
from pagedllm.models.utils import use_native_ops
from pagedllm.models.weight_utils import load_weights


def cpu_kernels(x: torch.Tensor) -> bool:
    """Whether x goes through the CPU float32 encoder kernels (csrc/cpu/add_layer_norm.cpp, gelu.cpp)."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and not use_native_ops()


class LayerNorm(nn.Module):
    def __init__(self, hidden: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(hidden, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


_ACTIVATIONS = {"gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
                "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu, "silu": F.silu}


def activation_of(config):
    name = getattr(config, "hidden_act", "gelu")
    if name not in _ACTIVATIONS:
        raise ValueError(f"Unsupported hidden_act {name!r} for BERT; supported: {', '.join(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


class BertEmbeddings(nn.Module):
    def __init__(self, config, dtype: torch.dtype):
        super().__init__()
        hidden = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, hidden, dtype=dtype)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, hidden, dtype=dtype)
        self.token_type_embeddings = nn.Embedding(max(1, getattr(config, "type_vocab_size", 1)), hidden, dtype=dtype)
        self.LayerNorm = LayerNorm(hidden, config.layer_norm_eps, dtype)
        for emb in (self.word_embeddings, self.position_embeddings, self.token_type_embeddings):
            emb.weight.requires_grad_(False)

    def forward(self, input_ids, positions, token_type_ids) -> torch.Tensor:
        h = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        types = self.token_type_embeddings(token_type_ids)
        if cpu_kernels(h):
            ln = self.LayerNorm
            return _ops.add_layer_norm(h, types, ln.weight, ln.bias, None, ln.eps)
        return self.LayerNorm(h + types)


class BertSelfAttention(nn.Module):
    def __init__(self, config, dtype: torch.dtype):
        super().__init__()
        heads = config.num_attention_heads
        head_size = config.hidden_size // heads
        self.qkv_proj = QKVLinear(config.hidden_size, head_size, heads, heads, True, dtype)
        self.attn = EncoderAttention(heads, head_size, head_size ** -0.5)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj.split(self.qkv_proj(h))
        return self.attn(q, k, v)


class BertDenseNorm(nn.Module):
    """HF's BertSelfOutput / BertOutput: LayerNorm(residual + dense(x))."""

    def __init__(self, in_size: int, config, dtype: torch.dtype):
        super().__init__()
        self.dense = Linear(in_size, config.hidden_size, True, dtype)
        self.LayerNorm = LayerNorm(config.hidden_size, config.layer_norm_eps, dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        if cpu_kernels(x):
            ln, dense = self.LayerNorm, self.dense
            return _ops.add_layer_norm(bias_free_linear(x, dense), residual, ln.weight, ln.bias, dense.bias, ln.eps)
        return self.forward_native(x, residual)

    def forward_native(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, config, dtype: torch.dtype):
        super().__init__()
        setattr(self, "self", BertSelfAttention(config, dtype))  # HF's name: attention.self.query ...
        self.output = BertDenseNorm(config.hidden_size, config, dtype)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.output(getattr(self, "self")(h), h)


class BertIntermediate(nn.Module):
    def __init__(self, config, dtype: torch.dtype):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.intermediate_size, True, dtype)
        self.act = activation_of(config)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.act is F.gelu and cpu_kernels(h):
            return _ops.bias_gelu(bias_free_linear(h, self.dense), self.dense.bias)
        return self.forward_native(h)

    def forward_native(self, h: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(h))


class BertLayer(nn.Module):
    def __init__(self, config, dtype: torch.dtype):
        super().__init__()
        self.attention = BertAttention(config, dtype)
        self.intermediate = BertIntermediate(config, dtype)
        self.output = BertDenseNorm(config.intermediate_size, config, dtype)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.attention(h)
        return self.output(self.intermediate(h), h)


class BertEncoder(nn.Module):
    def __init__(self, config, dtype: torch.dtype):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config, dtype) for _ in range(config.num_hidden_layers))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            h = layer(h)
        return h


class BertPooler(nn.Module):
    """tanh(dense(hidden of each sequence's first token ([CLS])))."""

    def __init__(self, config, dtype: torch.dtype):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.hidden_size, True, dtype)

    def forward(self, first_token_hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(first_token_hidden))


class _BertBase(nn.Module):
    packed_modules_mapping = {"qkv_proj": ["query", "key", "value"]}
    # old checkpoints name LayerNorm parameters gamma / beta
    weight_renames = ((r"LayerNorm\.gamma$", "LayerNorm.weight"), (r"LayerNorm\.beta$", "LayerNorm.bias"))
    is_encoder = True  # bidirectional: the pooling runner feeds token types and needs no KV cache

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_weights(self, weights)


class BertModel(_BertBase):
    """The encoder alone (sentence-transformers' Transformer module): forward -> last hidden states."""
    skip_weights = (r"position_ids$", r"^pooler\.", r"^cls\.")  # the MLM / pooler heads: unused by embeddings

    def __init__(self, config, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.config = config
        self.dtype = dtype or torch.get_default_dtype()
        self.embeddings = BertEmbeddings(config, self.dtype)
        self.encoder = BertEncoder(config, self.dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                token_type_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """input_ids, positions, token_type_ids: [num_tokens] int64 (sequences laid end to end, as the
        EncoderMetadata of the step says) -> [num_tokens, hidden]."""
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        return self.encoder(self.embeddings(input_ids, positions, token_type_ids))


class BertForSequenceClassification(_BertBase):
    """BertModel + pooler (tanh dense on [CLS]) + classifier: forward gives hidden states, classify()
    the [num_sequences, num_labels] logits from each sequence's first token."""
    skip_weights = (r"position_ids$",)
    first_token_classifier = True

    def __init__(self, config, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.config = config
        self.dtype = dtype or torch.get_default_dtype()
        self.bert = BertModel(config, self.dtype)
        self.bert.pooler = BertPooler(config, self.dtype)
        self.classifier = Linear(config.hidden_size, config.num_labels, True, self.dtype)

    def forward(self, input_ids, positions, token_type_ids=None) -> torch.Tensor:
        return self.bert(input_ids, positions, token_type_ids)

    def classify(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, hidden] (each sequence's first token) -> [n, num_labels] float32 logits."""
        return self.classifier(self.bert.pooler(hidden)).float()
