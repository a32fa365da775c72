"""The C++ block manager (csrc/block_manager) as the scheduler sees it."""
from __future__ import annotations

from typing import Optional

import torch  # noqa: F401 - pagedllm._C links against libtorch; torch must be loaded first

from pagedllm import _C

NoFreeBlocksError = _C.NoFreeBlocksError


class BlockManager:
    """KV blocks of one cache: ref counts, prefix caching, fork / copy-on-write. Sequences are
    addressed by their int seq_id. See csrc/block_manager for the exact allocation policy."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 watermark: float = 0.01):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self._bm = _C.BlockManager(num_blocks, block_size, enable_prefix_caching, watermark)

    def __getattr__(self, name):
        # can_allocate, allocate, can_append, append_slots, mark_computed, fork, free,
        # get_block_table, num_free_blocks, num_used_blocks, ref_count, reset_prefix_cache ...
        return getattr(self._bm, name)

    def salt_for(self, cache_salt: Optional[str], no_cache: bool, seq_id: int) -> Optional[str]:
        """A sequence that must not hit the prefix cache (prompt_logprobs needs every prompt logit)
        gets a salt no other sequence has."""
        return f"\x00no-cache-{seq_id}" if no_cache else cache_salt
