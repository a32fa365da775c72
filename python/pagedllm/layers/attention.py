"""Paged attention: plain-torch references (the ground truth for the kernels, and the fallback).

KV cache layout: key_cache, value_cache: [num_blocks, num_kv_heads, block_size, head_size];
slot = block_id * block_size + offset. Shapes of every argument: csrc/torch_bindings.cpp.
"""
from __future__ import annotations

import torch


def gather_kv(key_cache: torch.Tensor, value_cache: torch.Tensor, block_table: torch.Tensor,
              seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's first seq_len keys and values: two [seq_len, num_kv_heads, head_size]."""
    block_size = key_cache.shape[2]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = block_table[:num_blocks].long()
    # [n, kv_heads, block, head] -> [n * block, kv_heads, head]
    k = key_cache[blocks].transpose(1, 2).reshape(-1, key_cache.shape[1], key_cache.shape[3])
    v = value_cache[blocks].transpose(1, 2).reshape(-1, value_cache.shape[1], value_cache.shape[3])
    return k[:seq_len], v[:seq_len]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_positions: torch.Tensor,
           scale: float, sliding_window: int = 0, causal: bool = True) -> torch.Tensor:
    """Causal softmax attention in fp32. q: [nq, num_heads, d] at q_positions; k, v: [nk, num_kv_heads, d]
    at positions 0..nk-1. Key j is seen by query i iff j <= pos_i and (no window or pos_i - j < window);
    causal=False: every key is seen. GQA: query head h reads KV head h // (num_heads // num_kv_heads)."""
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    group = num_heads // num_kv_heads
    kf = k.float().repeat_interleave(group, dim=1)  # [nk, num_heads, d]
    vf = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), kf) * scale
    k_pos = torch.arange(k.shape[0], device=q.device)
    visible = k_pos[None, :] <= q_positions[:, None]
    if not causal:
        visible = torch.ones_like(visible)
    elif sliding_window > 0:
        visible &= (q_positions[:, None] - k_pos[None, :]) < sliding_window
    scores = scores.masked_fill(~visible[None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, vf).to(q.dtype)


def paged_attention_native(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           sliding_window: int = 0) -> torch.Tensor:
    """Decode reference: the one query token of sequence i sits at position seq_lens[i] - 1."""
    out = torch.zeros_like(query)
    for i, seq_len in enumerate(seq_lens.tolist()):
        if seq_len == 0:
            continue  # padding row
        k, v = gather_kv(key_cache, value_cache, block_tables[i], seq_len)
        pos = torch.tensor([seq_len - 1], device=query.device)
        out[i] = attend(query[i : i + 1], k, v, pos, scale, sliding_window)[0]
    return out


def paged_prefill_attention_native(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                                   block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                                   seq_lens: torch.Tensor, scale: float, sliding_window: int = 0,
                                   causal: bool = True) -> torch.Tensor:
    """Prefill reference: query token j of sequence i sits at position seq_lens[i] - q_len_i + j
    (causal=False: it sees all seq_lens[i] keys)."""
    out = torch.zeros_like(query)
    starts = query_start_loc.tolist()
    for i, seq_len in enumerate(seq_lens.tolist()):
        q0, q1 = starts[i], starts[i + 1]
        if q1 == q0:
            continue
        k, v = gather_kv(key_cache, value_cache, block_tables[i], seq_len)
        pos = torch.arange(seq_len - (q1 - q0), seq_len, device=query.device)
        out[q0:q1] = attend(query[q0:q1], k, v, pos, scale, sliding_window, causal)
    return out


# --- the Attention layer used by the models -------------------------------------------------------


class Attention(torch.nn.Module):
    """Paged attention over this layer's KV cache for one step of mixed prefills and decodes.

    q: [num_tokens, num_heads * head_size], k and v: [num_tokens, num_kv_heads * head_size]
    -> [num_tokens, num_heads * head_size]. The model runner binds self.kv_cache = (key_cache,
    value_cache) after allocating the cache, and sets the step's AttentionMetadata."""

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                 sliding_window: int | None = None):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads, self.head_size, self.num_kv_heads = num_heads, head_size, num_kv_heads
        self.scale = scale
        self.sliding_window = sliding_window or 0
        self.kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, native: bool = False) -> torch.Tensor:
        from pagedllm.layers.attention_metadata import get_attention_metadata

        md = get_attention_metadata()
        if self.kv_cache is None:
            raise RuntimeError("Attention.kv_cache is not bound: the model runner binds it after allocating the cache")
        key_cache, value_cache = self.kv_cache
        n = q.shape[0]
        q = q.view(n, self.num_heads, self.head_size)
        k = k.view(n, self.num_kv_heads, self.head_size)
        v = v.view(n, self.num_kv_heads, self.head_size)
        out = torch.empty_like(q)
        p = md.num_prefill_tokens
        if native:
            from pagedllm.layers.kv_cache import reshape_and_cache_native
            reshape_and_cache_native(k, v, key_cache, value_cache, md.slot_mapping)
            if p:
                out[:p] = paged_prefill_attention_native(
                    q[:p], key_cache, value_cache, md.prefill_block_tables, md.prefill_query_start_loc,
                    md.prefill_seq_lens, self.scale, self.sliding_window)
            if md.num_decodes:
                out[p:] = paged_attention_native(q[p:], key_cache, value_cache, md.decode_block_tables,
                                                 md.decode_seq_lens, self.scale, self.sliding_window)
        else:
            from pagedllm import _ops
            _ops.reshape_and_cache(k, v, key_cache, value_cache, md.slot_mapping)
            if p:
                _ops.paged_prefill_attention(q[:p], key_cache, value_cache, md.prefill_block_tables,
                                             md.prefill_query_start_loc, md.prefill_seq_lens,
                                             md.max_prefill_query_len, self.scale, self.sliding_window, out=out[:p])
            if md.num_decodes:
                _ops.paged_attention(q[p:], key_cache, value_cache, md.decode_block_tables, md.decode_seq_lens,
                                     self.scale, self.sliding_window, out=out[p:])
        return out.view(n, self.num_heads * self.head_size)
