"""CPU buffers backed by 2 MiB pages (Linux transparent huge pages) for what a decode step streams.

A decode step reads every packed weight once and, for each sequence, its KV blocks (scattered 4 KiB
pages at head size 64): with 4 KiB pages the stream pays a TLB miss and a page walk every 4 KiB.
Measured on the 2-core Zen 5 dev machine: the default model's 120 layer GEMVs at one row, weights
from memory, 2.8 -> 2.2-2.3 ms a step; paged decode attention of 32 sequences 10-20% faster
(benchmarks/RESULTS.md). With THP set to "madvise" (the common default) nothing gets huge pages
unless asked: the buffers here are allocated untouched, 2 MiB-aligned, and madvise(MADV_HUGEPAGE)d
before anything is written, so that the first touch faults in huge pages.

PAGEDLLM_CPU_HUGE_PAGES=0 turns it off (then these are plain torch.empty buffers); where madvise is
missing or refused (not Linux, THP "never") the buffers are plain too.

The first blocks of the CPU KV cache (those the block manager hands out first: its free list starts at
block 0) are also faulted in (zero-filled) when it is allocated, as vLLM's whole cache is (torch.zeros):
a page's first touch costs a fault and, in a VM whose host backs memory lazily, the host's fault too
(~0.5-0.7 GB/s on the dev VM, with compaction stalls of up to 13 ms on one 3 MB write). Left to the
first requests, the ~200 MB of KV that throughput.py's 32 requests write cost ~12-20% of their
throughput there (benchmarks/RESULTS.md). PAGEDLLM_CPU_KV_PREFAULT_GIB (default 1) bounds it: the
whole default 4 GiB took ~7 s of start-up there, 1 GiB ~1.7 s; 0 turns it off (the test suite does, to
keep its many engine start-ups fast).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import math
import os
from typing import Optional

import torch

logger = logging.getLogger(__name__)

ENV = "PAGEDLLM_CPU_HUGE_PAGES"
PREFAULT_ENV = "PAGEDLLM_CPU_KV_PREFAULT_GIB"
HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14
ALIGN = 64  # bytes between tensors placed in one buffer (the kernels' vector loads)


@functools.lru_cache(maxsize=1)
def _madvise():
    name = ctypes.util.find_library("c")
    try:
        fn = ctypes.CDLL(name, use_errno=True).madvise if name else None
    except (OSError, AttributeError):
        return None
    if fn is not None:
        fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


def enabled() -> bool:
    value = os.environ.get(ENV, "1")
    if value not in ("0", "1"):
        raise ValueError(f"{ENV} must be 0 or 1, got {value!r}")
    return value == "1" and _madvise() is not None


def prefault_bytes() -> int:
    """How much of the CPU KV cache to fault in when it is allocated (PAGEDLLM_CPU_KV_PREFAULT_GIB, default 1)."""
    value = os.environ.get(PREFAULT_ENV, "1")
    try:
        gib = float(value)
    except ValueError:
        gib = -1.0
    if not math.isfinite(gib) or gib < 0:
        raise ValueError(f"{PREFAULT_ENV} must be a number of GiB >= 0, got {value!r}")
    return int(gib * (1 << 30))


def prefault_count(num_blocks: int, block_bytes: int) -> int:
    """How many of a KV cache's first blocks (block_bytes each, K and V of every layer) prefault_bytes() covers."""
    return min(num_blocks, prefault_bytes() // max(block_bytes, 1))


def empty(nbytes: int) -> torch.Tensor:
    """An uninitialized uint8 CPU tensor of nbytes; 2 MiB-aligned and advised for huge pages when
    enabled() (one page of slack is allocated around it, never touched)."""
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    if not enabled() or nbytes < HUGE_PAGE:
        return torch.empty(nbytes, dtype=torch.uint8)
    raw = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)
    start = -raw.data_ptr() % HUGE_PAGE
    buf = raw[start:start + nbytes]  # a view: keeps raw alive
    length = (nbytes + HUGE_PAGE - 1) // HUGE_PAGE * HUGE_PAGE  # the slack past the end is raw's
    if _madvise()(buf.data_ptr(), length, _MADV_HUGEPAGE) != 0:
        logger.debug("madvise(MADV_HUGEPAGE) refused (errno %d): 4 KiB pages", ctypes.get_errno())
    return buf


def empty_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized contiguous CPU tensor of that shape and dtype in a buffer from empty()."""
    return empty(math.prod(shape) * dtype.itemsize).view(dtype).view(shape)


def footprint(t: torch.Tensor) -> int:
    """The bytes Arena.copy_in takes for t."""
    return (t.numel() * t.element_size() + ALIGN - 1) // ALIGN * ALIGN


class Arena:
    """One buffer from empty() that tensors are copied into side by side (a huge page's slack once,
    not per tensor). Reassigning each owner's reference to its copy as it goes releases the original,
    so the peak is about the arena plus one tensor."""

    def __init__(self, nbytes: int):
        self.buf, self.used = empty(nbytes), 0

    def copy_in(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError("Arena.copy_in takes contiguous CPU tensors")
        n = footprint(t)
        if self.used + n > self.buf.numel():
            raise ValueError(f"Arena full: {self.used} + {n} > {self.buf.numel()} bytes")
        view = self.buf[self.used:self.used + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
        view.copy_(t)
        self.used += n
        return view
