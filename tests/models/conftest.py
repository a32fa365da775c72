import pytest


@pytest.fixture(params=["native", "kernels"])
def native(request) -> bool:
    """Run a model test on the plain-torch references and on our kernels."""
    return request.param == "native"
