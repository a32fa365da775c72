"""Decode-step CUDA graphs (engine/cuda_graph.py). On the CPU the same runner runs with a test double
of the graph backend (capture = warm up and remember the forward bound to the static buffers, replay =
run it again on them), which checks the buffers, the padding and the size selection; on a GPU the
same tests capture real CUDA graphs, and LLM(enforce_eager=False) must equal enforce_eager=True."""
import random

import pytest
import torch

from model_factory import ARCHS, make_tiny_model, tiny_config
from pagedllm import LLM, SamplingParams
from pagedllm.engine.cuda_graph import capture_sizes
from pagedllm.engine.model_runner import ModelRunner
from pagedllm.layers.attention_metadata import AttentionMetadata, make_prefill_metadata, set_attention_metadata
from pagedllm.models import build_model
from pagedllm.models.utils import native_ops
from testing_utils import DEVICES

BLOCK = 16
NUM_BLOCKS = 256
MAX_MODEL_LEN = 512  # the static block tables are 32 blocks wide; the test batches use at most 6


class ReplayBackend:
    """Test double of CudaGraphBackend with a CUDA graph's contract: the output tensor of the capture
    is the one every replay writes and returns."""

    def __init__(self):
        self.captured: list[int] = []

    def capture(self, forward):
        forward()  # the warm-up run, as on CUDA
        output = forward()
        self.captured.append(output.shape[0])
        return _Replay(forward, output)


class _Replay:
    def __init__(self, forward, output):
        self.forward, self.output = forward, output

    def replay(self):
        self.output.copy_(self.forward())
        return self.output


def _runner(arch: str, device: str, max_num_seqs: int = 16, capture: bool = True) -> ModelRunner:
    torch.manual_seed(0)
    model = build_model(tiny_config(arch, 512), torch.float32, device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.08) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    runner = ModelRunner(model, None, torch.device(device), torch.float32, BLOCK)
    runner.allocate_kv_cache(NUM_BLOCKS)
    runner.key_cache.fill_(float("nan"))  # unused slots poisoned: a stray read shows up as NaN
    runner.value_cache.fill_(float("nan"))
    if capture:
        runner.capture_decode_graphs(max_num_seqs, MAX_MODEL_LEN, backend=ReplayBackend() if device == "cpu" else None)
    return runner


def _decode_batch(rng: random.Random, runner: ModelRunner, n: int, free: list[int]):
    """n decodes with random contexts (1..90 tokens) on blocks taken from free, their cached KV random."""
    dev = runner.device
    lens = [rng.randint(1, 90) for _ in range(n)]
    tables = [[free.pop() for _ in range(-(-length // BLOCK))] for length in lens]
    for t in tables:
        idx = torch.tensor(t, device=dev)
        runner.key_cache[:, idx] = torch.randn_like(runner.key_cache[:, idx])
        runner.value_cache[:, idx] = torch.randn_like(runner.value_cache[:, idx])
    width = max(len(t) for t in tables)
    slots = [t[(length - 1) // BLOCK] * BLOCK + (length - 1) % BLOCK for t, length in zip(tables, lens)]
    i32 = dict(dtype=torch.int32, device=dev)
    md = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev), num_prefills=0, num_prefill_tokens=0,
        max_prefill_query_len=0, prefill_query_start_loc=None, prefill_seq_lens=None, prefill_block_tables=None,
        num_decodes=n, decode_seq_lens=torch.tensor(lens, **i32),
        decode_block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], **i32))
    ids = torch.tensor([rng.randrange(3, 500) for _ in range(n)], dtype=torch.int64, device=dev)
    positions = torch.tensor(lens, dtype=torch.int64, device=dev) - 1
    return ids, positions, md, slots, tables


def _slot_rows(cache: torch.Tensor) -> torch.Tensor:
    """[layers, blocks, heads, block, head] -> [blocks * block (= slot), layers, heads, head]."""
    return cache.permute(1, 3, 0, 2, 4).reshape(-1, cache.shape[0], cache.shape[2], cache.shape[4])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ARCHS)
def test_padded_replay_equals_eager_and_padding_writes_nothing(arch, device):
    runner = _runner(arch, device)
    assert runner.graphs.sizes == [1, 2, 4, 8, 16]
    rng = random.Random(0)
    free = list(range(NUM_BLOCKS))
    rng.shuffle(free)
    # 16 first: the later, smaller batches find its real slots and lengths in the rows they pad.
    for n, padded in [(16, 16), (9, 16), (3, 4), (1, 1), (5, 8)]:
        assert runner.graphs.padded_size(n) == padded
        ids, positions, md, slots, tables = _decode_batch(rng, runner, n, free)
        before = (runner.key_cache.clone(), runner.value_cache.clone())
        with torch.inference_mode(), set_attention_metadata(md):
            expected = runner.model(ids, positions).clone()
        expected_cache = (runner.key_cache.clone(), runner.value_cache.clone())
        runner.key_cache.copy_(before[0])
        runner.value_cache.copy_(before[1])

        replays = runner.graphs.num_replays
        assert runner.graphs.can_run(md)
        with torch.inference_mode():
            got = runner.graphs.run(ids, positions, md)
        assert runner.graphs.num_replays == replays + 1
        # fp32; the padded batch has more matmul rows and splits the attention differently, so
        # sums may round in another order (~1e-6 relative).
        tol = dict(rtol=2e-5, atol=2e-5)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, **tol)
        written = torch.zeros(NUM_BLOCKS * BLOCK, dtype=torch.bool, device=runner.device)
        written[slots] = True
        for cache, old, new in zip((runner.key_cache, runner.value_cache), before, expected_cache):
            rows, old_rows, new_rows = _slot_rows(cache), _slot_rows(old), _slot_rows(new)
            torch.testing.assert_close(rows[written], new_rows[written], **tol)
            # Every other slot, NaN-poisoned ones included, is exactly as it was: padding wrote nothing.
            torch.testing.assert_close(rows[~written], old_rows[~written], rtol=0, atol=0, equal_nan=True)
        # The padding rows read nothing either: even their hidden states are finite although the
        # blocks of every earlier batch (still named by stale rows of the buffers) are now NaN.
        assert torch.isfinite(runner.graphs.graphs[padded].output).all()
        for t in tables:
            runner.key_cache[:, t] = float("nan")
            runner.value_cache[:, t] = float("nan")


def test_capture_sizes():
    assert capture_sizes(1) == [1]
    assert capture_sizes(3) == [1, 2, 3]
    assert capture_sizes(8) == [1, 2, 4, 8]
    assert capture_sizes(16) == [1, 2, 4, 8, 16]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert capture_sizes(256) == [1, 2, 4, 8] + list(range(16, 257, 16))
    for m in (1, 5, 37, 100, 256):
        sizes = capture_sizes(m)
        assert sizes[-1] == m and sizes == sorted(set(sizes))
        for n in range(1, m + 1):  # every batch pads to a captured size, with fewer than 16 padding rows
            assert min(s for s in sizes if s >= n) - n < 16
    with pytest.raises(ValueError):
        capture_sizes(0)


def test_capture_is_largest_first_and_cpu_never_captures():
    runner = _runner("llama", "cpu", max_num_seqs=20)
    assert runner.graphs.backend.captured == [20, 16, 8, 4, 2, 1]
    assert runner.graphs.buffers.block_tables.shape == (20, MAX_MODEL_LEN // BLOCK)
    plain = _runner("llama", "cpu", capture=False)
    plain.capture_decode_graphs(20, MAX_MODEL_LEN)  # no backend on the CPU: nothing is captured
    assert plain.graphs is None


def test_steps_graphs_cannot_run_are_eager():
    runner = _runner("llama", "cpu", max_num_seqs=4)
    rng = random.Random(1)
    free = list(range(NUM_BLOCKS))
    md = _decode_batch(rng, runner, 4, free)[2]
    assert runner.graphs.can_run(md)
    too_many = _decode_batch(rng, runner, 5, free)[2]
    assert not runner.graphs.can_run(too_many)  # larger than the largest captured size
    wide = AttentionMetadata(**{**md.__dict__, "decode_block_tables": torch.zeros(4, MAX_MODEL_LEN // BLOCK + 1,
                                                                                  dtype=torch.int32)})
    assert not runner.graphs.can_run(wide)  # wider than the static block table
    assert not runner.graphs.can_run(make_prefill_metadata([5, 3], BLOCK, "cpu"))  # prefill in the step
    with native_ops():
        assert not runner.graphs.can_run(md)  # the plain-torch ops are not capturable


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return str(make_tiny_model(tmp_path_factory.mktemp("graphs"), "llama"))


def _greedy(llm: LLM) -> list[list[int]]:
    rng = random.Random(3)
    prompts = [{"prompt_token_ids": [rng.randrange(3, 300) for _ in range(rng.randint(1, 40))]} for _ in range(13)]
    params = [SamplingParams(temperature=0, max_tokens=rng.randint(1, 24), ignore_eos=True) for _ in prompts]
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def test_llm_with_replayed_decodes_equals_eager_on_cpu(tiny_llama):
    llm = LLM(tiny_llama, num_gpu_blocks_override=64, max_model_len=256, max_num_seqs=16, seed=0,
              enable_prefix_caching=False)
    runner = llm.llm_engine.runner
    assert runner.graphs is None  # the CPU never captures on its own
    eager = _greedy(llm)
    # Up to 8 decodes replay (padded to 1, 2, 4, 8); 9..13 are larger than the largest size: eager.
    runner.capture_decode_graphs(8, 256, backend=ReplayBackend())
    assert _greedy(llm) == eager
    assert runner.graphs.num_replays > 0


def test_enforce_eager_turns_capture_off(tiny_llama, monkeypatch):
    calls = []
    monkeypatch.setattr(ModelRunner, "capture_decode_graphs", lambda self, *args: calls.append(args))
    LLM(tiny_llama, num_gpu_blocks_override=32, max_model_len=256, max_num_seqs=24, enforce_eager=True)
    assert calls == []
    LLM(tiny_llama, num_gpu_blocks_override=32, max_model_len=256, max_num_seqs=24)
    assert calls == [(24, 256)]


@pytest.mark.cuda
def test_cuda_graphs_equal_eager_greedy_tokens(tiny_llama):
    common = dict(device="cuda", dtype="float32", num_gpu_blocks_override=64, max_model_len=256,
                  max_num_seqs=16, seed=0, enable_prefix_caching=False)
    eager_llm = LLM(tiny_llama, enforce_eager=True, **common)
    assert eager_llm.llm_engine.runner.graphs is None
    eager = _greedy(eager_llm)
    del eager_llm
    llm = LLM(tiny_llama, **common)
    graphs = llm.llm_engine.runner.graphs
    assert graphs is not None and graphs.sizes == [1, 2, 4, 8, 16]
    assert _greedy(llm) == eager
    assert graphs.num_replays > 0
