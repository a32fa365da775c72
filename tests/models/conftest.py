import pytest

from models_testing import kernels_available


@pytest.fixture(params=["native", "kernels"])
def native(request) -> bool:
    """Run a model test on the plain-torch references and, where pagedllm._C has them, on our kernels."""
    if request.param == "kernels" and not kernels_available():
        pytest.skip("pagedllm._C kernels (norm, rope, cache, attention) are not built / written yet")
    return request.param == "native"
