"""Bidirectional (non-causal) attention of encoder models over a flat batch of whole sequences, and the
per-step metadata saying where each sequence starts.

No KV cache: an encoder step sees every token of its sequences at once, so each sequence's queries attend
to all of its own keys and to no other sequence's. The metadata is set once per forward by the pooling
runner (set_encoder_metadata) and read by every EncoderAttention layer, like AttentionMetadata.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F


@dataclass
class EncoderMetadata:
    seq_lens: list[int]                 # tokens of each sequence, laid end to end
    query_start_loc: torch.Tensor       # [num_seqs + 1] int32 on the device
    # gather index of the padded layout: token t of sequence i sits at row i * max_len + t
    padded_index: Optional[torch.Tensor] = None  # [num_tokens] int64
    key_mask: Optional[torch.Tensor] = None      # [num_seqs, 1, 1, max_len] bool, True = a real key

    @property
    def max_len(self) -> int:
        return max(self.seq_lens)

    @property
    def num_tokens(self) -> int:
        return sum(self.seq_lens)

    @classmethod
    def build(cls, seq_lens: list[int], device: torch.device | str) -> "EncoderMetadata":
        starts = [0]
        for n in seq_lens:
            starts.append(starts[-1] + n)
        max_len = max(seq_lens)
        lens = torch.tensor(seq_lens, device=device)
        index = torch.cat([torch.arange(n, device=device) + i * max_len for i, n in enumerate(seq_lens)])
        key_mask = (torch.arange(max_len, device=device)[None, :] < lens[:, None])[:, None, None, :]
        return cls(list(seq_lens), torch.tensor(starts, dtype=torch.int32, device=device), index, key_mask)


_current: Optional[EncoderMetadata] = None


@contextmanager
def set_encoder_metadata(metadata: EncoderMetadata) -> Iterator[None]:
    global _current
    previous, _current = _current, metadata
    try:
        yield
    finally:
        _current = previous


def get_encoder_metadata() -> EncoderMetadata:
    if _current is None:
        raise RuntimeError("EncoderAttention runs inside set_encoder_metadata(...) (the pooling runner sets it)")
    return _current


def encoder_attention_native(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: list[int],
                             scale: float) -> torch.Tensor:
    """Reference: softmax attention in fp32, one sequence at a time. q: [n, heads, d], k, v: [n, kv_heads, d]."""
    out = torch.empty_like(q)
    group = q.shape[1] // k.shape[1]
    start = 0
    for n in seq_lens:
        qs, ks, vs = (t[start:start + n].float() for t in (q, k, v))
        ks, vs = ks.repeat_interleave(group, dim=1), vs.repeat_interleave(group, dim=1)
        probs = torch.softmax(torch.einsum("qhd,khd->hqk", qs, ks) * scale, dim=-1)
        out[start:start + n] = torch.einsum("hqk,khd->qhd", probs, vs).to(q.dtype)
        start += n
    return out


def encoder_attention_padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, md: EncoderMetadata,
                             scale: float) -> torch.Tensor:
    """The same attention in one batched SDPA call over sequences padded to the longest one (padding
    keys masked out; padded query rows are computed and dropped)."""
    b, L = len(md.seq_lens), md.max_len
    heads, kv_heads, d = q.shape[1], k.shape[1], q.shape[2]

    def padded(t: torch.Tensor, h: int) -> torch.Tensor:  # [n, h, d] -> [b, h, L, d]
        buf = t.new_zeros(b * L, h, d)
        buf.index_copy_(0, md.padded_index, t)
        return buf.view(b, L, h, d).transpose(1, 2)

    qp, kp, vp = padded(q, heads), padded(k, kv_heads), padded(v, kv_heads)
    if kv_heads != heads:
        kp, vp = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (kp, vp))
    mask = None if all(n == L for n in md.seq_lens) else md.key_mask
    o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=scale)  # [b, heads, L, d]
    return o.transpose(1, 2).reshape(b * L, heads, d).index_select(0, md.padded_index)


class EncoderAttention(torch.nn.Module):
    """q: [num_tokens, num_heads * head_size], k, v: [num_tokens, num_kv_heads * head_size] -> like q."""

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: Optional[int] = None):
        super().__init__()
        self.num_heads, self.head_size = num_heads, head_size
        self.num_kv_heads = num_kv_heads or num_heads
        self.scale = scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        from pagedllm.models.utils import use_native_ops

        md = get_encoder_metadata()
        n = q.shape[0]
        q = q.reshape(n, self.num_heads, self.head_size)
        k = k.reshape(n, self.num_kv_heads, self.head_size)
        v = v.reshape(n, self.num_kv_heads, self.head_size)
        if use_native_ops():
            out = encoder_attention_native(q, k, v, md.seq_lens, self.scale)
        else:
            out = encoder_attention_padded(q, k, v, md, self.scale)
        return out.reshape(n, self.num_heads * self.head_size)
