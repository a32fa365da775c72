"""Fixtures shared by the engine-level speculative decoding tests."""
import pytest

from model_factory import make_tiny_model
from pagedllm import LLM


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    """A tiny random llama folder (one per test module)."""
    return str(make_tiny_model(tmp_path_factory.mktemp("spec"), "llama"))


@pytest.fixture(scope="module")
def plain(path):
    """The non-speculative engine the speculating runs are compared with. Single steps (not the offline
    default's multi-step decoding): test_draft_lengths' simulated clock charges each model step."""
    return LLM(path, kv_cache_space=0.05, max_model_len=256, num_scheduler_steps=1)
