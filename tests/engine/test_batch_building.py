"""Building a step's batch costs O(new tokens), not O(context): per-step code reads only the tokens it
computes (Sequence.token_slice) and never copies a whole token list; the step's small arrays go to the
device as views of one copy per dtype."""
import random

import numpy as np
import torch

from model_factory import make_tiny_model
from pagedllm import LLM, SamplingParams
from pagedllm.engine.sequence import Request, Sequence
from pagedllm.sampling_params import SamplingParams as SP


def test_token_slice_equals_slicing_the_whole_list():
    req = Request("r", None, list(range(100, 110)), SP(), 0, 0)
    seq = req.seqs[0]
    seq.output_token_ids.extend(range(500, 506))
    whole = seq.token_ids()
    rng = random.Random(0)
    for _ in range(200):
        a = rng.randint(0, len(whole))
        b = rng.randint(a, len(whole))
        assert seq.token_slice(a, b) == whole[a:b]


def test_steps_do_not_copy_whole_token_lists(tmp_path, monkeypatch):
    llm = LLM(str(make_tiny_model(tmp_path, "llama")), num_gpu_blocks_override=64, max_model_len=256)
    calls = []
    real = Sequence.token_ids
    monkeypatch.setattr(Sequence, "token_ids", lambda self: calls.append(self.seq_id) or real(self))
    prompts = [{"prompt_token_ids": [(3 * i + j) % 300 + 3 for j in range(60 + i)]} for i in range(3)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 40 for o in outs)
    # Admission hashes the prompt (once per sequence, or per retry while the cache is full); the 40
    # decode steps never build a sequence's whole token list.
    assert len(calls) <= 2 * len(prompts), calls


def test_to_device_on_the_cpu_returns_views_of_one_buffer(tmp_path):
    llm = LLM(str(make_tiny_model(tmp_path, "llama")), num_gpu_blocks_override=16, max_model_len=128)
    runner = llm.llm_engine.runner
    a, b = np.arange(6, dtype=np.int32).reshape(2, 3), np.asarray([7, 8], dtype=np.int32)
    ta, tb = runner._to_device([a, b])
    assert ta.tolist() == a.tolist() and tb.tolist() == [7, 8] and ta.dtype == torch.int32
    assert ta.is_contiguous() and tb.is_contiguous()
    assert ta.untyped_storage().data_ptr() == tb.untyped_storage().data_ptr()
