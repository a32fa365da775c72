"""HostSwapSpace (engine/swap_space.py): one host pool allocated once, runs of contiguous host blocks,
exact round trips (also when leading blocks come back as prefix-cache hits and when the pool is
fragmented), and the engine's swap preemption with prefix caching on."""
import pytest
import torch

from model_factory import make_tiny_model
from pagedllm import LLM, SamplingParams
from pagedllm.engine.swap_space import HostSwapSpace

LAYERS, HEADS, BLOCK, HEAD = 3, 2, 4, 8


def _caches(num_blocks=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (LAYERS, num_blocks, HEADS, BLOCK, HEAD)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def _space(num_blocks):
    return HostSwapSpace(num_blocks, (LAYERS, HEADS, BLOCK, HEAD), torch.float32, torch.device("cpu"))


def test_round_trip_to_other_blocks():
    k, v = _caches()
    space = _space(8)
    pool = (space.key.data_ptr(), space.value.data_ptr())
    blocks = [5, 2, 9]
    saved = (k[:, blocks].clone(), v[:, blocks].clone())
    space.swap_out(7, (k, v), blocks)
    assert space.held[7] == [(0, 3)] and space.num_free_blocks == 5  # one contiguous run
    k[:, blocks] = float("nan")
    v[:, blocks] = float("nan")
    back = [1, 3, 12]
    space.swap_in(7, (k, v), back)
    assert torch.equal(k[:, back], saved[0]) and torch.equal(v[:, back], saved[1])
    assert space.held == {} and space.num_free_blocks == 8
    assert (space.key.data_ptr(), space.value.data_ptr()) == pool  # allocated once


def test_leading_blocks_back_as_prefix_hits_are_not_copied():
    k, v = _caches()
    space = _space(8)
    saved = k[:, [4, 6, 8, 10]].clone()
    space.swap_out(1, (k, v), [4, 6, 8, 10])
    before = k.clone()
    space.swap_in(1, (k, v), [0, 1])  # the first two blocks were prefix-cache hits
    assert torch.equal(k[:, [0, 1]], saved[:, 2:])
    untouched = [b for b in range(16) if b not in (0, 1)]
    assert torch.equal(k[:, untouched], before[:, untouched])


def test_fragmented_pool_splits_a_sequence_over_runs():
    k, v = _caches(num_blocks=32)
    space = _space(10)
    space.swap_out(1, (k, v), [0, 1, 2])      # host 0..2
    space.swap_out(2, (k, v), [3, 4])         # host 3..4
    space.swap_out(3, (k, v), [5, 6, 7])      # host 5..7
    space.release(2)                          # free: 3..4 and 8..9
    blocks = [20, 21, 22, 23]
    saved = (k[:, blocks].clone(), v[:, blocks].clone())
    space.swap_out(4, (k, v), blocks)
    assert space.held[4] == [(3, 2), (8, 2)]
    with pytest.raises(RuntimeError, match="swap space full"):
        space.swap_out(5, (k, v), [30])
    k[:, blocks] = 0
    v[:, blocks] = 0
    space.swap_in(4, (k, v), [24, 25, 26, 27])
    assert torch.equal(k[:, 24:28], saved[0]) and torch.equal(v[:, 24:28], saved[1])
    space.release(1)
    space.release(3)
    assert space.num_free_blocks == 10 and space._free == [(0, 10)]  # runs merge back


def _swap_run(path, device, prefix_caching):
    # Prompts sharing a long prefix (prefix-cache hits when they come back); 9 blocks force preemption.
    shared = [(5 * j) % 300 + 3 for j in range(32)]
    prompts = [{"prompt_token_ids": shared + [(7 * i + j) % 300 + 3 for j in range(14 + i)]} for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    common = dict(device=device, max_model_len=144, enable_prefix_caching=prefix_caching)
    if device == "cuda":
        common["dtype"] = "float32"
    roomy = LLM(path, num_gpu_blocks_override=64, **common)
    expected = [o.outputs[0].token_ids for o in roomy.generate(prompts, params, use_tqdm=False)]
    del roomy
    tight = LLM(path, num_gpu_blocks_override=9, preemption_mode="swap", swap_space=0.01, **common)
    got = [o.outputs[0].token_ids for o in tight.generate(prompts, params, use_tqdm=False)]
    engine = tight.llm_engine
    assert engine.scheduler.num_preemptions > 0
    assert engine.runner.host_kv == {} and engine.runner.swap.num_free_blocks == engine.runner.swap.num_blocks
    assert got == expected
    return engine


def test_swap_with_prefix_caching_keeps_results_on_cpu(tmp_path):
    _swap_run(str(make_tiny_model(tmp_path, "llama")), "cpu", True)


@pytest.mark.cuda
def test_swap_with_prefix_caching_keeps_results_on_cuda(tmp_path):
    engine = _swap_run(str(make_tiny_model(tmp_path, "llama")), "cuda", True)
    assert engine.runner.swap.key.is_pinned()
