"""glibc malloc settings for inference on the CPU: keep freed activation memory in the heap.

A prefill step allocates and frees tens of MiB per layer. With glibc's defaults, blocks above the
(dynamic) mmap threshold are mapped and unmapped on every allocation, and the top of the heap is
trimmed back to the OS: each step then writes to fresh pages and pays a page fault per 4 KiB.
Measured on the 2-core dev machine, the default model, one prefill step of 32 prompts (3979 tokens):
3.5-4.8 s with glibc's defaults, 2.9 s with the settings below (benchmarks/RESULTS.md).

The settings: blocks up to 32 MiB (glibc's largest mmap threshold) come from the heap, and up to
1 GiB of free memory at the top of the heap stays mapped instead of being trimmed. Applied once per
process, by the engine on a CPU device, unless the user set glibc's own MALLOC_*_ variables.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20   # glibc's maximum on 64-bit systems
TRIM_THRESHOLD = 1 << 30

_applied = False


def keep_freed_memory() -> bool:
    """Applies the settings (glibc only); True when they are in effect."""
    global _applied
    if _applied:
        return True
    if any(k in os.environ for k in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")):
        return False  # the user's own settings win
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False  # not glibc (musl, macOS): nothing to tune
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if _applied:
        logger.info("glibc malloc: heap blocks up to %d MiB, trim above %d MiB", MMAP_THRESHOLD >> 20,
                    TRIM_THRESHOLD >> 20)
    return _applied
