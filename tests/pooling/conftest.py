import pytest


@pytest.fixture(scope="session")
def pooling_root(tmp_path_factory):
    return tmp_path_factory.mktemp("pooling-models")
