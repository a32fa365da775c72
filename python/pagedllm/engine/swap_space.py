"""Host memory for swapped-out KV blocks: one pool allocated once (pinned when the cache is on a GPU),
block-major, [num_blocks, layers, kv_heads, block_size, head_size], so that a run of consecutive host
blocks is one contiguous region and each copy between it and the device is a single DMA that
non_blocking really makes asynchronous (a strided or pageable host tensor would make it a blocking,
staged copy). All copies go on the current stream, so a later swap reusing host blocks is ordered
after the copies that read them; the host never touches the pool itself."""
from __future__ import annotations

import torch


class HostSwapSpace:
    def __init__(self, num_blocks: int, block_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        """block_shape: one block of every layer, (layers, kv_heads, block_size, head_size)."""
        pin = device.type == "cuda"
        self.device = device
        self.num_blocks = num_blocks
        self.key = torch.empty((num_blocks, *block_shape), dtype=dtype, pin_memory=pin)
        self.value = torch.empty((num_blocks, *block_shape), dtype=dtype, pin_memory=pin)
        self._free: list[tuple[int, int]] = [(0, num_blocks)] if num_blocks else []  # (start, length), sorted
        self.held: dict[int, list[tuple[int, int]]] = {}  # seq_id -> its runs of host blocks, in block order

    @property
    def num_free_blocks(self) -> int:
        return sum(n for _, n in self._free)

    def _take(self, n: int) -> list[tuple[int, int]]:
        """n host blocks: one run when a free run is long enough (first fit), else several in address order."""
        if n > self.num_free_blocks:
            raise RuntimeError(f"swap space full: {n} blocks asked, {self.num_free_blocks} free")
        for i, (start, length) in enumerate(self._free):
            if length >= n:
                self._free[i:i + 1] = [(start + n, length - n)] if length > n else []
                return [(start, n)]
        runs = []
        while n:
            start, length = self._free[0]
            k = min(n, length)
            runs.append((start, k))
            self._free[0:1] = [(start + k, length - k)] if length > k else []
            n -= k
        return runs

    def _give(self, runs: list[tuple[int, int]]) -> None:
        merged: list[tuple[int, int]] = []
        for start, length in sorted(self._free + runs):
            if merged and merged[-1][0] + merged[-1][1] == start:
                merged[-1] = (merged[-1][0], merged[-1][1] + length)
            else:
                merged.append((start, length))
        self._free = merged

    def _index(self, blocks: list[int]) -> torch.Tensor:
        idx = torch.tensor(blocks, dtype=torch.long)
        if self.device.type == "cuda":
            return idx.pin_memory().to(self.device, non_blocking=True)
        return idx.to(self.device)

    def swap_out(self, seq_id: int, caches: tuple[torch.Tensor, torch.Tensor], blocks: list[int]) -> None:
        """Copies the device blocks (caches: key, value [layers, num_blocks, ...]) to host blocks it takes."""
        runs = self._take(len(blocks))
        self.held[seq_id] = runs
        idx = self._index(blocks)
        for cache, host in zip(caches, (self.key, self.value)):
            gathered = cache.transpose(0, 1).index_select(0, idx)  # [n, layers, ...], contiguous, on the device
            done = 0
            for start, n in runs:
                host[start:start + n].copy_(gathered[done:done + n], non_blocking=True)
                done += n

    def swap_in(self, seq_id: int, caches: tuple[torch.Tensor, torch.Tensor], blocks: list[int]) -> None:
        """Copies seq_id's host blocks back into the device blocks `blocks` and frees them. blocks may be
        shorter than what was swapped out: its leading blocks came back as prefix-cache hits."""
        runs = self.held.pop(seq_id)
        if blocks:
            skip = sum(n for _, n in runs) - len(blocks)
            pieces = []  # the contiguous host ranges that come back, in block order
            for start, n in runs:
                drop = min(skip, n)
                skip -= drop
                if n > drop:
                    pieces.append((start + drop, n - drop))
            idx = self._index(blocks)
            for cache, host in zip(caches, (self.key, self.value)):
                moved = [host[s:s + n].to(self.device, non_blocking=True) for s, n in pieces]
                data = moved[0] if len(moved) == 1 else torch.cat(moved)
                cache.index_copy_(1, idx, data.transpose(0, 1))
        self._give(runs)

    def release(self, seq_id: int) -> None:
        """A swapped-out sequence that will not come back (aborted, finished)."""
        runs = self.held.pop(seq_id, None)
        if runs:
            self._give(runs)
