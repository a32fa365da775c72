"""ModelRunner.profile_num_blocks on the CPU with torch.cuda's memory calls faked: the profiling KV cache
is gone (every view of it) before free memory is measured and the real cache allocated; the budget counts
what is in use on the device (CUDA context, other processes), the step's peak and the graph pool."""
import weakref

import pytest
import torch

from model_factory import tiny_config
from pagedllm.engine.kv_cache_budget import MemoryProfile, kv_cache_bytes
from pagedllm.engine.model_runner import ModelRunner
from pagedllm.models import build_model
from test_cuda_graph import ReplayBackend

GiB = 1 << 30
BLOCK = 16


def _runner() -> ModelRunner:
    torch.manual_seed(0)
    model = build_model(tiny_config("llama", 512), torch.float32, "cpu")
    return ModelRunner(model, None, torch.device("cpu"), torch.float32, BLOCK)


class FakeCudaMemory:
    """torch.cuda's memory calls for a device of `total` bytes where `others` bytes are taken by the CUDA
    context and other processes; torch 'allocates' the weights, then the profiling step's activations."""

    def __init__(self, monkeypatch, runner, total, weights, others, forward_act, logits_act):
        self.runner, self.total, self.weights, self.others = runner, total, weights, others
        self.forward_act, self.logits_act = forward_act, logits_act
        self.live_cache_refs: list[weakref.ref] = []
        self.cache_bytes = 0
        self.max_calls = 0
        self.free_measured = False
        original = ModelRunner.allocate_kv_cache

        def allocate(runner_self, num_blocks):
            original(runner_self, num_blocks)
            self.cache_bytes = num_blocks * runner_self.bytes_per_block
            refs = [runner_self.key_cache, runner_self.value_cache]
            refs += [t for layer in runner_self.attn_layers for t in layer.kv_cache]
            self.live_cache_refs = [weakref.ref(t) for t in refs]

        monkeypatch.setattr(ModelRunner, "allocate_kv_cache", allocate)
        for name in ("empty_cache", "synchronize", "reset_peak_memory_stats"):
            monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: self.weights)
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", self.max_allocated)
        monkeypatch.setattr(torch.cuda, "mem_get_info", self.mem_get_info)
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda *a: type("Props", (), {"total_memory": total})())

    def max_allocated(self, *a):
        self.max_calls += 1  # first call: after the forward; later: after the logits too
        act = self.forward_act if self.max_calls == 1 else max(self.forward_act, self.logits_act)
        return self.weights + self.cache_bytes + act

    def mem_get_info(self, *a):
        alive = [r for r in self.live_cache_refs if r() is not None]
        assert not alive, f"{len(alive)} tensors of the profiling KV cache are alive when free memory is measured"
        self.free_measured = True
        return self.total - self.weights - self.others, self.total


def test_profile_cache_is_released_before_free_memory_is_measured(monkeypatch):
    runner = _runner()
    fake = FakeCudaMemory(monkeypatch, runner, total=80 * GiB, weights=GiB, others=2 * GiB,
                          forward_act=GiB // 4, logits_act=GiB // 2)
    blocks = runner.profile_num_blocks(0.9, max_num_batched_tokens=2048, max_model_len=512)
    assert fake.free_measured and fake.live_cache_refs
    assert runner.key_cache is None and all(layer.kv_cache is None for layer in runner.attn_layers)
    # 0.9 x 80 GiB - (1 GiB weights + 2 GiB context / other processes) - 0.5 GiB step peak, no graphs.
    assert blocks == int(0.9 * 80 * GiB - 3 * GiB - GiB // 2) // runner.bytes_per_block


def test_budget_counts_the_graph_pool(monkeypatch):
    runner = _runner()
    FakeCudaMemory(monkeypatch, runner, total=80 * GiB, weights=GiB, others=2 * GiB,
                   forward_act=GiB // 4, logits_act=GiB // 2)
    with_graphs = runner.profile_num_blocks(0.9, max_num_batched_tokens=2048, max_model_len=512, max_num_seqs=256)
    # The graph pool: the forward's activations scaled to 256 of the 2048 profiled tokens.
    pool = (GiB // 4) * 256 // 2048
    assert with_graphs == int(0.9 * 80 * GiB - 3 * GiB - GiB // 2 - pool) // runner.bytes_per_block


def test_kv_cache_bytes_arithmetic():
    p = MemoryProfile(total=100, in_use=30, step_peak=10, forward_peak=8, profiled_tokens=64)
    assert kv_cache_bytes(p, 0.9) == 90 - 30 - 10
    assert kv_cache_bytes(p, 0.9, max_num_seqs=16) == 90 - 30 - 10 - 2
    assert kv_cache_bytes(p, 0.9, max_num_seqs=1000) == 90 - 30 - 10 - 8  # never more than the whole forward
    assert kv_cache_bytes(p, 0.3) < 0  # other processes took the share: nothing fits


def test_allocate_kv_cache_drops_old_graphs_and_views():
    runner = _runner()
    runner.allocate_kv_cache(32)
    runner.capture_decode_graphs(4, 256, backend=ReplayBackend())
    assert runner.graphs is not None
    old = weakref.ref(runner.attn_layers[0].kv_cache[0])
    runner.allocate_kv_cache(48)
    assert runner.graphs is None  # they held the old cache's address
    assert old() is None
    assert runner.attn_layers[0].kv_cache[0].shape[0] == 48


@pytest.mark.cuda
def test_profile_on_a_gpu_leaves_no_profile_cache_behind():
    runner = _runner_cuda()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    blocks = runner.profile_num_blocks(0.5, max_num_batched_tokens=1024, max_model_len=512, max_num_seqs=8)
    assert blocks > 0
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before  # nothing of the profile step stays allocated


def _runner_cuda() -> ModelRunner:
    torch.manual_seed(0)
    model = build_model(tiny_config("llama", 512), torch.bfloat16, "cuda")
    return ModelRunner(model, None, torch.device("cuda"), torch.bfloat16, BLOCK)
