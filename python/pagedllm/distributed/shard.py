"""Tensor-parallel sharding of a loaded model, in place, for one rank (Megatron's split, as vLLM's):

- q/k/v (one merged matmul): column-parallel by heads; rank r keeps its num_heads / N query heads and
  the key/value heads they attend to: num_kv_heads / N of them, or, when N > num_kv_heads, the one
  KV head of its query heads' group (KV heads replicated N / num_kv_heads times);
- gate/up (merged) and GPT-2's c_fc: column-parallel (intermediate_size / N rows each);
- o_proj, down_proj and GPT-2's c_proj: row-parallel (their input features split), followed by an
  all-reduce (Linear.tp_reduce; the bias stays on rank 0 so it is added once);
- the token embedding and the LM head (tied or not): vocab-parallel, ceil(vocab / N) rows a rank,
  the logits all-gathered (VocabEmbedding.vocab_start, LMHead.shard_rows);
- norms, rotary tables and GPT-2's position embedding: replicated.

Every rank loads the whole checkpoint (HF folder or GGUF, through the usual loader) and keeps its
slices, so both formats and llama.cpp's row permutation need nothing of their own; the full tensors
are freed as soon as the slices are copied. The KV cache each rank then allocates has only its own
KV heads: the cache is sharded by KV heads.
"""
from __future__ import annotations

import torch
from torch import nn

from pagedllm.layers.linear import Linear, LMHead, MergedLinear, VocabEmbedding


def check_divisible(hf_config, size: int) -> None:
    """The config can be split over size ranks (vLLM's wording where it has one)."""
    if size == 1:
        return
    heads = hf_config.num_attention_heads
    kv = getattr(hf_config, "num_key_value_heads", None) or heads
    if heads % size:
        raise ValueError(f"Total number of attention heads ({heads}) must be divisible by tensor parallel "
                         f"size ({size}).")
    if (kv >= size and kv % size) or (kv < size and size % kv):
        raise ValueError(f"Total number of key/value heads ({kv}) must be divisible by tensor parallel size "
                         f"({size}), or tensor parallel size by it (KV heads are then replicated).")
    inter = getattr(hf_config, "intermediate_size", None) or getattr(hf_config, "n_inner", None) \
        or 4 * hf_config.hidden_size
    if inter % size:
        raise ValueError(f"intermediate_size ({inter}) must be divisible by tensor parallel size ({size}).")


def head_split(num_heads: int, num_kv_heads: int, rank: int, size: int) -> tuple[int, int, int, int]:
    """(first query head, query heads, first KV head, KV heads) of rank."""
    q = num_heads // size
    if num_kv_heads >= size:
        kv = num_kv_heads // size
        return rank * q, q, rank * kv, kv
    return rank * q, q, rank * num_kv_heads // size, 1  # replicated: the KV head of this rank's query group


def _keep(module: nn.Module, name: str, value) -> None:
    """Replaces the parameter by value (a copy: the full tensor can be freed); None drops it."""
    if value is None:
        setattr(module, name, None)
    else:
        setattr(module, name, nn.Parameter(value.contiguous().clone(), requires_grad=False))


def _column(linear: Linear, row_ranges: list[tuple[int, int]], sizes: list[int]) -> None:
    """Keeps the output rows of row_ranges (start, count), concatenated (one per merged part)."""
    for name in ("weight", "bias"):
        p = getattr(linear, name)
        if p is not None:
            _keep(linear, name, torch.cat([p.narrow(0, s, n) for s, n in row_ranges]))
    linear.output_size = sum(n for _, n in row_ranges)
    if isinstance(linear, MergedLinear):
        linear.output_sizes = sizes
        linear.offsets = [sum(sizes[:i]) for i in range(len(sizes))]


def _row(linear: Linear, start: int, count: int, rank: int) -> None:
    _keep(linear, "weight", linear.weight.narrow(1, start, count))
    if linear.bias is not None and rank != 0:
        linear.bias = None
    linear.input_size = count
    linear.tp_reduce = True


def _split_even(linear: Linear, parts: int, rank: int, size: int) -> None:
    """A merged column-parallel layer of `parts` equal parts ([gate | up]): each part split N ways."""
    part = linear.output_size // parts
    n = part // size
    _column(linear, [(k * part + rank * n, n) for k in range(parts)], [n] * parts)


def _attention(qkv: Linear, out: Linear, attn_owner, attn, heads: int, kv_heads: int, head_dim: int,
               rank: int, size: int) -> None:
    q0, q, kv0, kv = head_split(heads, kv_heads, rank, size)
    d = head_dim
    ranges = [(q0 * d, q * d), (heads * d + kv0 * d, kv * d), ((heads + kv_heads) * d + kv0 * d, kv * d)]
    _column(qkv, ranges, [q * d, kv * d, kv * d])
    if hasattr(qkv, "q_size"):
        qkv.q_size, qkv.kv_size = q * d, kv * d
    _row(out, q0 * d, q * d, rank)
    attn_owner.num_heads = q
    if hasattr(attn_owner, "num_kv_heads"):
        attn_owner.num_kv_heads = kv
    attn.num_heads, attn.num_kv_heads = q, kv


def _vocab(embed: VocabEmbedding, head: LMHead, rank: int, size: int) -> None:
    vocab = embed.vocab_size
    per = -(-vocab // size)
    start = min(rank * per, vocab)
    rows = min(per, vocab - start)
    _keep(embed, "weight", embed.weight.narrow(0, start, rows))
    embed.vocab_start = start
    if not head.tied:
        _keep(head, "weight", head.weight.narrow(0, start, rows))
    head.shard_rows = per


def shard_model(model: nn.Module, rank: int, size: int) -> None:
    """Keeps rank's share of every weight of a loaded model (see the module docstring)."""
    if size == 1:
        return
    from pagedllm.models.gpt2 import GPT2Attention, GPT2LMHeadModel, GPT2MLP
    from pagedllm.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP

    if isinstance(model, LlamaForCausalLM):
        embed = model.model.embed_tokens
    elif isinstance(model, GPT2LMHeadModel):
        embed = model.transformer.wte  # wpe (positions) stays whole
    else:
        raise ValueError(f"{type(model).__name__} does not support tensor parallelism "
                         "(tensor_parallel_size must be 1 for it).")
    with torch.no_grad():
        for m in list(model.modules()):
            if isinstance(m, LlamaAttention):
                _attention(m.qkv_proj, m.o_proj, m, m.attn, m.num_heads, m.num_kv_heads, m.head_dim, rank, size)
            elif isinstance(m, GPT2Attention):
                _attention(m.c_attn, m.c_proj, m, m.attn, m.num_heads, m.num_heads, m.head_dim, rank, size)
            elif isinstance(m, LlamaMLP):
                _split_even(m.gate_up_proj, 2, rank, size)
                _row(m.down_proj, rank * m.down_proj.input_size // size, m.down_proj.input_size // size, rank)
            elif isinstance(m, GPT2MLP):
                _split_even(m.c_fc, 1, rank, size)
                _row(m.c_proj, rank * m.c_proj.input_size // size, m.c_proj.input_size // size, rank)
        _vocab(embed, model.lm_head, rank, size)
