"""Draft-model speculation: the target as its own draft accepts everything (greedy and sampled); a tiny
random draft with the same vocabulary leaves greedy output token-equal to plain decoding over a batch of
mixed prompt lengths; every slot is freed."""
import random

import pytest

from model_factory import make_tiny_model
from pagedllm import LLM, SamplingParams


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    target = str(make_tiny_model(tmp_path_factory.mktemp("target"), "llama"))
    draft = str(make_tiny_model(tmp_path_factory.mktemp("draft"), "llama", seed=1))  # same tokenizer, other weights
    return target, draft


def _prompts():
    rng = random.Random(0)
    return [[rng.randrange(3, 400) for _ in range(n)] for n in (5, 17, 40, 9)]


def _run(llm, params):
    return [o.outputs[0] for o in llm.generate([{"prompt_token_ids": p} for p in _prompts()], params,
                                                use_tqdm=False)]


def _spec(target, draft, k=3, **kw):
    llm = LLM(target, kv_cache_space=0.05, max_model_len=256, **kw,
              speculative_config={"method": "draft_model", "model": draft, "num_speculative_tokens": k})
    llm.llm_engine.speculator.cost_aware = False  # drafts on every step, whatever the measured costs
    return llm


GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)


def test_target_as_its_own_draft_accepts_everything(paths):
    target, _ = paths
    ref = _run(LLM(target, kv_cache_space=0.05, max_model_len=256), GREEDY)
    llm = _spec(target, target)
    assert [o.token_ids for o in _run(llm, GREEDY)] == [o.token_ids for o in ref]
    stats = llm.llm_engine.stats["spec_decode"]
    assert stats.num_draft_tokens > 0 and stats.acceptance_rate == 1.0
    # Sampling: q == p (up to float rounding between the two forwards), so every draft is accepted.
    _run(llm, SamplingParams(temperature=0.8, max_tokens=20, ignore_eos=True, seed=3))
    assert llm.llm_engine.stats["spec_decode"].acceptance_rate > 0.99
    assert llm.llm_engine.block_manager.num_used_blocks == 0


def test_random_draft_keeps_greedy_output(paths):
    target, draft = paths
    ref = _run(LLM(target, kv_cache_space=0.05, max_model_len=256), GREEDY)
    llm = _spec(target, draft, k=4)
    assert [o.token_ids for o in _run(llm, GREEDY)] == [o.token_ids for o in ref]
    assert llm.llm_engine.stats["spec_decode"].num_drafts > 0
    assert llm.llm_engine.block_manager.num_used_blocks == 0


def test_preemption_and_prefix_cache_with_a_draft(paths):
    target, _ = paths
    ref = _run(LLM(target, kv_cache_space=0.05, max_model_len=256), GREEDY)
    small = LLM(target, num_gpu_blocks_override=9, max_model_len=64, max_num_batched_tokens=64,
                speculative_config={"method": "draft_model", "model": target, "num_speculative_tokens": 3})
    small.llm_engine.speculator.cost_aware = False
    got, again = _run(small, GREEDY), _run(small, GREEDY)
    assert small.llm_engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in got] == [o.token_ids for o in ref] == [o.token_ids for o in again]
    assert small.llm_engine.stats["spec_decode"].acceptance_rate == 1.0  # the draft cache stayed in step
    assert small.llm_engine.block_manager.num_used_blocks == 0


def test_draft_with_another_vocabulary_is_refused(paths, tmp_path):
    target, _ = paths
    other = str(make_tiny_model(tmp_path, "llama", tokenizer_kind="bytefallback"))
    with pytest.raises(ValueError, match="vocabulary"):
        _spec(target, other)
