"""pagedllm/huge_pages.py: the packed weights and the CPU KV cache sit in 2 MiB-aligned buffers advised for
transparent huge pages (the kernel marks such a mapping "hg" in /proc/self/smaps), unless turned off."""
import ctypes
import ctypes.util
import mmap
import os

import pytest
import torch
from torch import nn

from pagedllm import huge_pages
from pagedllm.layers import linear as linear_mod
from pagedllm.layers.linear import Linear, pack_linear_weights

needs_madvise = pytest.mark.skipif(not huge_pages.enabled(), reason="no madvise here (not Linux / glibc)")


def _vm_flags(addr: int) -> set[str]:
    """The VmFlags of the mapping that holds addr (/proc/self/smaps)."""
    flags, inside = set(), False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= addr < hi
            elif inside and line.startswith("VmFlags:"):
                flags = set(line.split()[1:])
    return flags


@needs_madvise
def test_empty_is_aligned_and_advised():
    buf = huge_pages.empty(3 * huge_pages.HUGE_PAGE + 5)
    assert buf.dtype == torch.uint8 and buf.numel() == 3 * huge_pages.HUGE_PAGE + 5
    assert buf.data_ptr() % huge_pages.HUGE_PAGE == 0
    if os.path.exists("/proc/self/smaps"):
        assert "hg" in _vm_flags(buf.data_ptr())
    buf.fill_(7)  # every byte is writable, the tail in the slack page too
    assert int(buf[-1]) == 7
    small = huge_pages.empty(100)  # under a huge page: a plain buffer
    assert small.numel() == 100


def test_switched_off_and_bad_values(monkeypatch):
    monkeypatch.setenv(huge_pages.ENV, "0")
    assert not huge_pages.enabled()
    assert huge_pages.empty(3 * huge_pages.HUGE_PAGE).numel() == 3 * huge_pages.HUGE_PAGE
    monkeypatch.setenv(huge_pages.ENV, "yes")
    with pytest.raises(ValueError, match="PAGEDLLM_CPU_HUGE_PAGES must be 0 or 1"):
        huge_pages.enabled()
    with pytest.raises(ValueError, match="nbytes must be >= 0"):
        huge_pages.empty(-1)


def test_arena_copies_side_by_side():
    tensors = [torch.randn(5, 7), torch.arange(11, dtype=torch.uint8), torch.randn(3, 4).to(torch.bfloat16)]
    arena = huge_pages.Arena(sum(huge_pages.footprint(t) for t in tensors))
    copies = [arena.copy_in(t) for t in tensors]
    for t, c in zip(tensors, copies):
        assert c.dtype == t.dtype and c.shape == t.shape and c.is_contiguous() and torch.equal(c, t)
        assert c.data_ptr() % huge_pages.ALIGN == 0 and c.data_ptr() != t.data_ptr()
    with pytest.raises(ValueError, match="Arena full"):
        arena.copy_in(torch.zeros(1))
    with pytest.raises(ValueError, match="contiguous CPU tensors"):
        huge_pages.Arena(1024).copy_in(torch.randn(4, 4).t())


def test_empty_tensor_shape_and_dtype():
    t = huge_pages.empty_tensor((2, 3, 4), torch.float16)
    assert t.shape == (2, 3, 4) and t.dtype == torch.float16 and t.is_contiguous()


@needs_madvise
@pytest.mark.parametrize("on", ["1", "0"])
def test_packed_weights_move_into_one_buffer_and_keep_their_results(monkeypatch, on):
    monkeypatch.setenv(huge_pages.ENV, on)
    monkeypatch.setattr(linear_mod, "_available_memory", lambda: 1 << 40)
    torch.manual_seed(0)
    model = nn.Sequential(Linear(256, 2048, bias=False), Linear(2048, 512, bias=True))
    with torch.no_grad():
        for m in model:
            m.weight.normal_()
    x = torch.randn(3, 256)
    assert [m.packed for m in model] == [None, None]
    pack_linear_weights(model)
    ptrs = sorted(m.packed.data.data_ptr() for m in model)
    if on == "1":  # one arena: the second right after the first (64-byte aligned), the first on a huge page
        first = model[0].packed.data if model[0].packed.data.data_ptr() == ptrs[0] else model[1].packed.data
        assert ptrs[0] % huge_pages.HUGE_PAGE == 0
        assert ptrs[1] == ptrs[0] + huge_pages.footprint(first)
    y = model(x)
    ref = torch.nn.functional.linear(torch.nn.functional.linear(x, model[0].weight), model[1].weight, model[1].bias)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-3)


@needs_madvise
def test_cpu_kv_cache_is_on_huge_pages():
    from model_factory import tiny_config
    from pagedllm.engine.model_runner import ModelRunner
    from pagedllm.models import build_model

    model = build_model(tiny_config("llama", 512), torch.float32, "cpu")
    runner = ModelRunner(model, None, torch.device("cpu"), torch.float32, 16)
    runner.allocate_kv_cache(1024)  # 2 layers x 1024 blocks x 1 kv head x 16 x 64 floats: 8 MiB each
    for cache in (runner.key_cache, runner.value_cache):
        assert cache.shape[1] == 1024 and cache.dtype == torch.float32 and cache.is_contiguous()
        assert cache.data_ptr() % huge_pages.HUGE_PAGE == 0
        if os.path.exists("/proc/self/smaps"):
            assert "hg" in _vm_flags(cache.data_ptr())


def _resident_fraction(t: torch.Tensor) -> float:
    """The share of t's pages that are in memory (mincore)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    start = t.data_ptr() // mmap.PAGESIZE * mmap.PAGESIZE
    length = t.data_ptr() + t.numel() * t.element_size() - start
    pages = (length + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vec = (ctypes.c_ubyte * pages)()
    assert libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(length), vec) == 0, ctypes.get_errno()
    return sum(v & 1 for v in vec) / pages


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="mincore is checked on Linux")
def test_cpu_kv_cache_first_blocks_are_faulted_in_when_allocated(monkeypatch):
    from model_factory import tiny_config
    from pagedllm.engine.model_runner import ModelRunner
    from pagedllm.models import build_model

    model = build_model(tiny_config("llama", 512), torch.float32, "cpu")
    runner = ModelRunner(model, None, torch.device("cpu"), torch.float32, 16)
    # 2 layers x 1024 blocks x 1 kv head x 16 x 64 floats: 8 MiB each for K and V, 16 KiB a block id (K + V)
    monkeypatch.setenv(huge_pages.PREFAULT_ENV, str(8 / 1024))  # 8 MiB: the first 512 blocks of each layer
    runner.allocate_kv_cache(1024)
    for cache in (runner.key_cache, runner.value_cache):
        for layer in cache:
            assert _resident_fraction(layer[:512]) == 1.0
            assert not layer[:512].any()  # zero-filled, as vLLM's torch.zeros cache
    monkeypatch.setenv(huge_pages.PREFAULT_ENV, "100")  # more than the cache: all of it
    runner.allocate_kv_cache(256)
    assert _resident_fraction(runner.key_cache) == 1.0 and _resident_fraction(runner.value_cache) == 1.0
    for bad in ("on", "-1", "nan", "inf"):
        monkeypatch.setenv(huge_pages.PREFAULT_ENV, bad)
        with pytest.raises(ValueError, match="PAGEDLLM_CPU_KV_PREFAULT_GIB must be a number of GiB >= 0"):
            runner.allocate_kv_cache(256)


def test_prefault_covers_the_first_blocks_up_to_its_budget(monkeypatch):
    monkeypatch.setenv(huge_pages.PREFAULT_ENV, "1")  # the default: 1 GiB
    assert huge_pages.prefault_count(10_000, 1 << 20) == 1024
    assert huge_pages.prefault_count(100, 1 << 20) == 100
    monkeypatch.setenv(huge_pages.PREFAULT_ENV, "0.5")
    assert huge_pages.prefault_count(10_000, 1 << 20) == 512
    monkeypatch.setenv(huge_pages.PREFAULT_ENV, "0")
    assert huge_pages.prefault_count(10_000, 1 << 20) == 0
    monkeypatch.delenv(huge_pages.PREFAULT_ENV)
    assert huge_pages.prefault_bytes() == 1 << 30
