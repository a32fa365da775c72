"""Per-step attention metadata, set once per forward by the model runner and read by every
Attention layer (so it never travels through layer signatures).

A step's tokens are laid out prefills first, then decodes: tokens [0, num_prefill_tokens) belong to
sequences running prefill (or chunked prefill, or prefill after a prefix-cache hit), the remaining
num_decodes tokens are one query token per decoding sequence.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor              # [num_tokens] int64; -1 = padding, not written
    num_prefills: int
    num_prefill_tokens: int
    max_prefill_query_len: int
    prefill_query_start_loc: Optional[torch.Tensor]  # [num_prefills + 1] int32
    prefill_seq_lens: Optional[torch.Tensor]         # [num_prefills] int32, cached + new tokens
    prefill_block_tables: Optional[torch.Tensor]     # [num_prefills, max_blocks] int32
    num_decodes: int
    decode_seq_lens: Optional[torch.Tensor]          # [num_decodes] int32, including the new token
    decode_block_tables: Optional[torch.Tensor]      # [num_decodes, max_blocks] int32

    @property
    def num_tokens(self) -> int:
        return self.num_prefill_tokens + self.num_decodes


def make_prefill_metadata(prompt_lens: list[int], block_size: int, device: torch.device | str,
                          first_block: int = 0) -> AttentionMetadata:
    """Metadata for fresh prefills of the given lengths on consecutive blocks starting at
    first_block: for tests and for the model runner's profiling pass."""
    tables, slots, block = [], [], first_block
    for n in prompt_lens:
        nb = (n + block_size - 1) // block_size
        tables.append(list(range(block, block + nb)))
        slots.extend(range(block * block_size, block * block_size + n))
        block += nb
    width = max(len(t) for t in tables)
    starts = [0]
    for n in prompt_lens:
        starts.append(starts[-1] + n)
    i32 = dict(dtype=torch.int32, device=device)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        num_prefills=len(prompt_lens),
        num_prefill_tokens=starts[-1],
        max_prefill_query_len=max(prompt_lens),
        prefill_query_start_loc=torch.tensor(starts, **i32),
        prefill_seq_lens=torch.tensor(prompt_lens, **i32),
        prefill_block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], **i32),
        num_decodes=0, decode_seq_lens=None, decode_block_tables=None)


def make_decode_metadata(slot_mapping: torch.Tensor, seq_lens: torch.Tensor,
                         block_tables: torch.Tensor) -> AttentionMetadata:
    """Metadata of a decode-only step: one token per sequence (decode CUDA graphs, multi-step decoding)."""
    return AttentionMetadata(
        slot_mapping=slot_mapping, num_prefills=0, num_prefill_tokens=0, max_prefill_query_len=0,
        prefill_query_start_loc=None, prefill_seq_lens=None, prefill_block_tables=None,
        num_decodes=seq_lens.shape[0], decode_seq_lens=seq_lens, decode_block_tables=block_tables)


_current: Optional[AttentionMetadata] = None


@contextmanager
def set_attention_metadata(metadata: Optional[AttentionMetadata]) -> Iterator[None]:
    global _current
    previous, _current = _current, metadata
    try:
        yield
    finally:
        _current = previous


def get_attention_metadata() -> AttentionMetadata:
    if _current is None:
        raise RuntimeError("Attention layers run inside set_attention_metadata(...) (the model runner sets it)")
    return _current
