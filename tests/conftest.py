import pytest
import torch


def cuda_kernels_usable() -> bool:
    if not torch.cuda.is_available():
        return False
    from pagedllm import _C
    return bool(_C.cuda_compiled)


def pytest_collection_modifyitems(config, items):
    if cuda_kernels_usable():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU and pagedllm built with its CUDA kernels")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
