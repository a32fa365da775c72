"""LLM.generate on tiny random models of every architecture equals HF transformers: greedy tokens
identical and top-5 logprobs close; again with prefix-cache hits, tiny chunked prefill and a cache
so small that sequences get preempted."""
import random

import pytest

from hf_reference import hf_greedy, hf_model
from model_factory import ARCHS, make_tiny_model
from pagedllm import LLM, SamplingParams

MAX_TOKENS = 12
# fp32 on both sides, different summation orders: logprobs agree to ~1e-5; 1e-3 leaves margin.
LOGPROB_ATOL = 1e-3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return lambda arch: str(make_tiny_model(root, arch))


def _prompts(vocab: int, lens=(5, 17, 33, 70), seed=0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lens]


def _check(outputs, prompts, path, expect_logprobs=True):
    model = hf_model(path)
    assert len(outputs) == len(prompts)
    for out, prompt in zip(outputs, prompts):
        ref_tokens, ref_tops = hf_greedy(model, prompt, MAX_TOKENS)
        got = out.outputs[0]
        assert out.prompt_token_ids == prompt
        assert got.token_ids == ref_tokens and len(ref_tokens) == MAX_TOKENS
        if expect_logprobs:
            assert len(got.logprobs) == len(ref_tops) == MAX_TOKENS   # one entry per token, none missing
            for step, (entry, ref_top) in enumerate(zip(got.logprobs, ref_tops)):
                for tok, ref_lp in ref_top:
                    assert tok in entry, f"step {step}: token {tok} missing from the top-5"
                    assert abs(entry[tok].logprob - ref_lp) < LOGPROB_ATOL
                ranks = sorted(entry[t].rank for t, _ in ref_top)
                assert ranks == [1, 2, 3, 4, 5]


GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=5)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_hf(arch, model_dir):
    path = model_dir(arch)
    llm = LLM(path, kv_cache_space=0.05, max_model_len=256)
    prompts = _prompts(llm.llm_engine.vocab_size)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    _check(outputs, prompts, path)
    assert llm.llm_engine.block_manager.num_used_blocks == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_cache_hits_give_the_same_tokens(arch, model_dir):
    path = model_dir(arch)
    llm = LLM(path, kv_cache_space=0.05, max_model_len=256, enable_prefix_caching=True)
    rng = random.Random(1)
    shared = [rng.randrange(3, 300) for _ in range(40)]
    prompts = [shared + [rng.randrange(3, 300) for _ in range(n)] for n in (3, 9, 20)]
    first = llm.generate([{"prompt_token_ids": prompts[0]}], GREEDY, use_tqdm=False)
    rest = llm.generate([{"prompt_token_ids": p} for p in prompts[1:]], GREEDY, use_tqdm=False)
    assert first[0].num_cached_tokens == 0
    assert all(o.num_cached_tokens >= 32 for o in rest)  # two full 16-token blocks of the shared prefix
    _check(first + rest, prompts, path)


@pytest.mark.parametrize("arch", ARCHS)
def test_small_chunked_prefill(arch, model_dir):
    path = model_dir(arch)
    llm = LLM(path, kv_cache_space=0.05, max_model_len=256, max_num_batched_tokens=7)
    prompts = _prompts(llm.llm_engine.vocab_size, lens=(30, 5, 41))
    _check(llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False), prompts, path)


@pytest.mark.parametrize("arch", ARCHS)
def test_preemption_keeps_results(arch, model_dir):
    path = model_dir(arch)
    # 9 blocks of 16 tokens: three 45-48 token prompts fill them (3 blocks each) and every one of
    # them needs a 4th block while decoding, so someone must be preempted.
    llm = LLM(path, num_gpu_blocks_override=9, max_model_len=144, enable_prefix_caching=False)
    prompts = _prompts(llm.llm_engine.vocab_size, lens=(48, 47, 46, 45), seed=3)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=5)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert llm.llm_engine.scheduler.num_preemptions > 0
    _check(outputs, prompts, path)
    assert llm.llm_engine.block_manager.num_used_blocks == 0
