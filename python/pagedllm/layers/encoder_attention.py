"""Bidirectional (non-causal) attention of encoder models over a flat batch of whole sequences, and the
per-step metadata saying where each sequence starts.

No resident KV cache: an encoder step sees every token of its sequences at once, so each sequence's queries
attend to all of its own keys and to no other sequence's. The pooling runner sets the step's EncoderMetadata
with set_attention_metadata (the same per-step slot AttentionMetadata uses); every EncoderAttention reads it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from pagedllm import _ops
from pagedllm.layers.attention import attend
from pagedllm.layers.attention_metadata import AttentionMetadata, get_attention_metadata, make_prefill_metadata


@dataclass
class EncoderMetadata:
    seq_lens: list[int]                 # tokens of each sequence, laid end to end
    query_start_loc: torch.Tensor       # [num_seqs + 1] int32 on the device
    block_size: int = 16
    _paged: Optional[AttentionMetadata] = None   # the kernel path's scratch-cache layout, built on first use
    _padding: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # the SDPA path's, built on first use

    def paged(self) -> AttentionMetadata:
        """Slots, block tables and starts of the sequences on consecutive blocks of a scratch paged cache."""
        if self._paged is None:
            self._paged = make_prefill_metadata(self.seq_lens, self.block_size, self.query_start_loc.device)
        return self._paged

    @property
    def uniform(self) -> bool:
        """Every sequence has the longest length: the padded layout is the flat one."""
        return all(n == self.max_len for n in self.seq_lens)

    def padding(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(padded_index [num_tokens] int64: token t of sequence i sits at row i * max_len + t of the padded
        layout; key_mask [num_seqs, 1, 1, max_len] bool, True = a real key), built on first use."""
        if self._padding is None:
            device, max_len = self.query_start_loc.device, self.max_len
            lens = torch.tensor(self.seq_lens, device=device)
            index = torch.cat([torch.arange(n, device=device) + i * max_len for i, n in enumerate(self.seq_lens)])
            key_mask = (torch.arange(max_len, device=device)[None, :] < lens[:, None])[:, None, None, :]
            self._padding = (index, key_mask)
        return self._padding

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
        return cls(list(seq_lens), torch.tensor(starts, dtype=torch.int32, device=device))


def get_encoder_metadata() -> EncoderMetadata:
    """The step's metadata, set by the pooling runner with set_attention_metadata(EncoderMetadata(...))."""
    md = get_attention_metadata()
    if not isinstance(md, EncoderMetadata):
        raise RuntimeError("EncoderAttention runs inside set_attention_metadata(EncoderMetadata.build(...))")
    return md


def encoder_attention_native(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: list[int],
                             scale: float) -> torch.Tensor:
    """Reference: softmax attention in fp32, one sequence at a time. q: [n, heads, d], k, v: [n, kv_heads, d]."""
    out = torch.empty_like(q)
    start = 0
    for n in seq_lens:
        s = slice(start, start + n)
        out[s] = attend(q[s], k[s], v[s], torch.zeros(n, device=q.device), scale, causal=False)
        start += n
    return out


# Off the CPU: head sizes paged_prefill_attention is built for (csrc/dispatch_utils.h); others use SDPA.
# On the CPU (float32) every head size takes encoder_attention (csrc/cpu/encoder_attention.cpp).
KERNEL_HEAD_SIZES = (64, 80, 96, 128, 256)


def encoder_attention_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, md: "EncoderMetadata",
                             scale: float) -> torch.Tensor:
    """The paged prefill kernel with causal=False over a scratch cache of this step's K / V (freed with it)."""

    pm = md.paged()
    shape = (pm.prefill_block_tables.shape[0] * pm.prefill_block_tables.shape[1], k.shape[1], md.block_size,
             k.shape[2])
    key_cache = torch.empty(shape, dtype=k.dtype, device=k.device)
    value_cache = torch.empty(shape, dtype=v.dtype, device=v.device)
    _ops.reshape_and_cache(k, v, key_cache, value_cache, pm.slot_mapping)
    return _ops.paged_prefill_attention(q, key_cache, value_cache, pm.prefill_block_tables,
                                        pm.prefill_query_start_loc, pm.prefill_seq_lens, pm.max_prefill_query_len,
                                        scale, 0, causal=False)


def encoder_attention_padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, md: EncoderMetadata,
                             scale: float) -> torch.Tensor:
    """The same attention in one batched SDPA call over sequences padded to the longest one (padding
    keys masked out; padded query rows are computed and dropped)."""
    b, L = len(md.seq_lens), md.max_len
    heads, kv_heads, d = q.shape[1], k.shape[1], q.shape[2]
    uniform = md.uniform  # no padding: plain views (a batch of one, equal lengths)
    padded_index, key_mask = (None, None) if uniform else md.padding()

    def padded(t: torch.Tensor, h: int) -> torch.Tensor:  # [n, h, d] -> [b, h, L, d]
        if uniform:
            return t.reshape(b, L, h, d).transpose(1, 2)
        buf = t.new_zeros(b * L, h, d)
        buf.index_copy_(0, padded_index, t)
        return buf.view(b, L, h, d).transpose(1, 2)

    qp, kp, vp = padded(q, heads), padded(k, kv_heads), padded(v, kv_heads)
    if kv_heads != heads:
        kp, vp = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (kp, vp))
    o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=key_mask,
                                       scale=scale)  # [b, heads, L, d]
    o = o.transpose(1, 2).reshape(b * L, heads, d)
    return o if uniform else o.index_select(0, padded_index)


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
        elif q.device.type == "cpu" and q.dtype == torch.float32:
            out = _ops.encoder_attention(q, k, v, md.query_start_loc, md.max_len, self.scale)
        elif self.head_size in KERNEL_HEAD_SIZES:
            out = encoder_attention_kernel(q, k, v, md, self.scale)
        else:
            out = encoder_attention_padded(q, k, v, md, self.scale)
        return out.reshape(n, self.num_heads * self.head_size)
