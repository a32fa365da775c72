import os

import pytest
import torch

# The first GiB of the CPU KV cache is faulted in when allocated (pagedllm/huge_pages.py): ~1.7 s on a VM
# whose host backs memory lazily, for every engine the suite starts. tests/engine/test_huge_pages.py
# turns it back on where it tests it.
os.environ.setdefault("PAGEDLLM_CPU_KV_PREFAULT_GIB", "0")


def cuda_kernels_usable() -> bool:
    if not torch.cuda.is_available():
        return False
    from pagedllm import _C
    return bool(_C.cuda_compiled)


EMU_DEVICE_OPTIONS = {"cuda_emu": dict(reverse_schedule=False), "cuda_emu_reversed": dict(reverse_schedule=True)}


def pytest_collection_modifyitems(config, items):
    from pagedllm import _ops
    if not _ops.cuda_emu_available():
        skip_emu = pytest.mark.skip(reason="the CUDA emulator library _C_emu was not built (no CUDA headers)")
        for item in items:
            if "cuda_emu" in item.keywords:
                item.add_marker(skip_emu)
    if cuda_kernels_usable():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU and pagedllm built with its CUDA kernels")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_pyfunc_call(pyfuncitem):
    """A kernel test parametrized with device "cuda_emu" / "cuda_emu_reversed" (testing_utils.EMU_DEVICES)
    runs with device "cpu" while every kernel op goes to the CUDA emulator."""
    options = EMU_DEVICE_OPTIONS.get(pyfuncitem.funcargs.get("device"))
    if options is None:
        yield
        return
    from pagedllm import _ops
    pyfuncitem.funcargs["device"] = "cpu"
    with _ops.use_kernel_backend("cuda_emu", **options):
        yield
