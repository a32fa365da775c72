"""The CUDA paths of the engine that the kernel emulator cannot run (issue 11): decode-graph replay against
eager in bf16 for every architecture at split-KV shapes, and one host sync per decode step. Every test
here needs a GPU (`-m cuda`, run by scripts/gpu_check.sh); their CPU halves are in test_cuda_graph.py,
test_kv_cache_profile.py and test_swap_space.py."""
import random
import warnings

import pytest
import torch

from model_factory import ARCHS, make_tiny_model, tiny_config
from pagedllm import LLM, SamplingParams
from pagedllm.engine.model_runner import ModelRunner
from pagedllm.layers.attention_metadata import AttentionMetadata, set_attention_metadata
from pagedllm.models import build_model

pytestmark = pytest.mark.cuda

BLOCK = 16
MAX_MODEL_LEN = 4096  # a 256-block static table: the decode kernel plans split-KV partitions from its width


def _long_config(arch: str):
    config = tiny_config(arch, 512)
    if arch == "gpt2":
        config.n_positions = MAX_MODEL_LEN
    else:
        config.max_position_embeddings = MAX_MODEL_LEN
    return config


def _bf16_runner(arch: str, num_blocks: int) -> ModelRunner:
    torch.manual_seed(0)
    model = build_model(_long_config(arch), torch.bfloat16, "cuda")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.08) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    runner = ModelRunner(model, None, torch.device("cuda"), torch.bfloat16, BLOCK)
    runner.allocate_kv_cache(num_blocks)
    runner.key_cache.normal_()
    runner.value_cache.normal_()
    runner.capture_decode_graphs(8, MAX_MODEL_LEN)
    return runner


def _decode_md(lens: list[int], tables: list[list[int]]) -> AttentionMetadata:
    width = max(len(t) for t in tables)
    slots = [t[(n - 1) // BLOCK] * BLOCK + (n - 1) % BLOCK for t, n in zip(tables, lens)]
    i32 = dict(dtype=torch.int32, device="cuda")
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device="cuda"), num_prefills=0, num_prefill_tokens=0,
        max_prefill_query_len=0, prefill_query_start_loc=None, prefill_seq_lens=None, prefill_block_tables=None,
        num_decodes=len(lens), decode_seq_lens=torch.tensor(lens, **i32),
        decode_block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], **i32))


@pytest.mark.parametrize("arch", ARCHS)  # qwen3: q/k norm; mistral: sliding window; gpt2: learned positions
def test_bf16_graph_replay_equals_eager_at_split_kv_shapes(arch):
    num_blocks = 8 * (MAX_MODEL_LEN // BLOCK)
    runner = _bf16_runner(arch, num_blocks)
    assert runner.graphs is not None and runner.graphs.sizes == [1, 2, 4, 8]
    rng = random.Random(0)
    free = list(range(num_blocks))
    rng.shuffle(free)
    # Contexts of 1..4095 tokens: a few (sequence, kv head) pairs over thousands of keys split the keys
    # into partitions (flash-decoding), short ones run in one pass.
    for n in (1, 3, 8, 5):
        lens = [rng.choice([rng.randint(1, 200), rng.randint(1500, MAX_MODEL_LEN - 1)]) for _ in range(n)]
        tables = [[free.pop() for _ in range(-(-length // BLOCK))] for length in lens]
        md = _decode_md(lens, tables)
        ids = torch.tensor([rng.randrange(3, 500) for _ in range(n)], dtype=torch.int64, device="cuda")
        positions = torch.tensor(lens, dtype=torch.int64, device="cuda") - 1
        saved = (runner.key_cache.clone(), runner.value_cache.clone())
        with torch.inference_mode(), set_attention_metadata(md):
            eager = runner.model(ids, positions).float()
        runner.key_cache.copy_(saved[0])
        runner.value_cache.copy_(saved[1])
        with torch.inference_mode():
            replayed = runner.graphs.run(ids, positions, md).float()
        # bf16: the padded batch runs GEMMs of another row count (other cuBLAS tiles, other rounding).
        torch.testing.assert_close(replayed, eager, rtol=3e-2, atol=3e-2)
        for t in tables:
            free.extend(t)


def test_one_host_sync_per_decode_step(tmp_path):
    path = str(make_tiny_model(tmp_path, "qwen3"))
    llm = LLM(path, device="cuda", dtype="bfloat16", max_model_len=256, num_gpu_blocks_override=128,
              max_num_seqs=8, seed=0)
    engine = llm.llm_engine
    params = SamplingParams(temperature=0.7, top_p=0.9, max_tokens=40, ignore_eos=True)
    for i in range(5):
        engine.add_request(str(i), {"prompt_token_ids": [(11 * i + j) % 400 + 3 for j in range(20 + i)]}, params)
    engine.step()  # the prefills
    torch.cuda.synchronize()
    syncs_per_step = []
    torch.cuda.set_sync_debug_mode("warn")
    try:
        for _ in range(4):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                engine.step()  # decode only
            syncs_per_step.append(sum("synchroniz" in str(w.message) for w in caught))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert syncs_per_step == [1, 1, 1, 1]  # the sampled tokens coming back
