"""Writing new keys and values into the paged KV cache: the plain-torch reference.

key_cache, value_cache: [num_blocks, num_kv_heads, block_size, head_size]; token t goes to slot
s = slot_mapping[t] = block_id * block_size + offset; a negative slot is padding and is skipped.
The kernel is pagedllm._ops.reshape_and_cache (same arguments, in place).
"""
from __future__ import annotations

import torch


def reshape_and_cache_native(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                             value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """In place on key_cache and value_cache. key, value: [num_tokens, num_kv_heads, head_size];
    tokens t >= slot_mapping.numel() (padding rows) are ignored."""
    num_tokens = slot_mapping.shape[0]
    block_size = key_cache.shape[2]
    slots = slot_mapping.to(key_cache.device, torch.long)
    keep = slots >= 0
    slots = slots[keep]
    blocks, offsets = slots // block_size, slots % block_size
    # Advanced indexing [blocks, :, offsets] puts the indexed dim first: [n, num_kv_heads, head_size].
    key_cache[blocks, :, offsets] = key[:num_tokens][keep].to(key_cache.dtype)
    value_cache[blocks, :, offsets] = value[:num_tokens][keep].to(value_cache.dtype)
