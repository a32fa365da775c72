"""ngram speculative decoding in the engine: greedy output token-equal to plain decoding over a batch of
mixed prompt lengths (some sequences speculating, others not), with prefix caching, preemption, stop
strings and penalties; seeded sampling repeats alone and in a batch; every rolled-back slot is freed."""
import random

import pytest

from pagedllm import LLM, SamplingParams

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}


def full_speculation(llm: LLM) -> LLM:
    """Every proposal verified in full, whatever the measured step costs (the cost-aware choice of draft
    lengths is tested in test_draft_lengths.py): these tests need rollbacks on every step."""
    llm.llm_engine.speculator.cost_aware = False
    return llm


@pytest.fixture(scope="module")
def spec(path):
    return full_speculation(LLM(path, kv_cache_space=0.05, max_model_len=256, speculative_config=NGRAM))


def _prompts():
    rng = random.Random(0)
    base = [rng.randrange(3, 400) for _ in range(12)]
    return [base * 3, [rng.randrange(3, 400) for _ in range(5)], base * 2 + base[:5],
            [rng.randrange(3, 400) for _ in range(40)], base[:7] * 4]


def _run(llm, params, prompts=None):
    prompts = prompts or _prompts()
    return [o.outputs[0] for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)]


def test_greedy_equals_plain_decoding_and_frees_every_block(plain, spec):
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, logprobs=2)
    before = spec.llm_engine.stats["spec_decode"].num_draft_tokens
    ref, got = _run(plain, params), _run(spec, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]
    for r, g in zip(ref, got):
        assert [set(e) for e in g.logprobs] == [set(e) for e in r.logprobs]
        for er, eg in zip(r.logprobs, g.logprobs):
            for tok in er:
                assert abs(er[tok].logprob - eg[tok].logprob) < 1e-3
    stats = spec.llm_engine.stats["spec_decode"]
    assert stats.num_draft_tokens > before and stats.num_accepted_tokens > 0
    assert sum(stats.accepted_per_pos) == stats.num_accepted_tokens
    assert spec.llm_engine.block_manager.num_used_blocks == 0


def test_stop_strings_max_tokens_and_penalties_match(plain, spec):
    tok = plain.get_tokenizer()
    ref0 = _run(plain, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    stop = tok.decode(ref0[0].token_ids[9:11])  # text from the middle of the first answer
    for params in (SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop]),
                   SamplingParams(temperature=0, max_tokens=7, ignore_eos=True),
                   SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, repetition_penalty=1.3,
                                  frequency_penalty=0.4, presence_penalty=0.2)):
        ref, got = _run(plain, params), _run(spec, params)
        assert [(o.token_ids, o.text, o.finish_reason) for o in got] == \
               [(o.token_ids, o.text, o.finish_reason) for o in ref]
    assert spec.llm_engine.block_manager.num_used_blocks == 0


def test_prefix_cache_hits_and_preemption(path, plain):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    ref = _run(plain, params)
    small = full_speculation(LLM(path, num_gpu_blocks_override=14, max_model_len=128,
                                 max_num_batched_tokens=128, speculative_config=NGRAM))
    got = _run(small, params)
    again = _run(small, params)  # the prompts now hit the prefix cache
    assert small.llm_engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in got] == [o.token_ids for o in ref] == [o.token_ids for o in again]
    assert small.llm_engine.block_manager.num_used_blocks == 0
    small.llm_engine.block_manager._check_invariants()


def test_seeded_sampling_repeats_alone_and_batched(spec):
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=20, ignore_eos=True, seed=7)
    prompts = _prompts()
    batched = _run(spec, params, prompts)
    alone = _run(spec, params, prompts[:1])
    assert batched[0].token_ids == alone[0].token_ids
    assert _run(spec, params, prompts)[2].token_ids == batched[2].token_ids


def test_bad_configs_raise_vllm_errors(path):
    with pytest.raises(ValueError, match="prompt_lookup_min=3 must be <= prompt_lookup_max=2"):
        LLM(path, speculative_config={"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 3,
                                      "prompt_lookup_max": 2})
    with pytest.raises(ValueError, match="greater than zero"):
        LLM(path, speculative_config={"method": "ngram", "num_speculative_tokens": 0})
    with pytest.raises(ValueError, match="Unsupported speculative method"):
        LLM(path, speculative_config={"method": "medusa", "num_speculative_tokens": 2})


def test_n_and_best_of_with_speculation(spec):
    """Forked samples speculate each on its own; seeded, they repeat; best_of ranks them by logprob."""
    params = SamplingParams(n=2, best_of=3, temperature=0.9, max_tokens=16, ignore_eos=True, seed=11)
    prompt = [{"prompt_token_ids": _prompts()[0]}]
    first = spec.generate(prompt, params, use_tqdm=False)[0]
    second = spec.generate(prompt, params, use_tqdm=False)[0]
    assert len(first.outputs) == 2
    assert [o.token_ids for o in first.outputs] == [o.token_ids for o in second.outputs]
    assert first.outputs[0].cumulative_logprob >= first.outputs[1].cumulative_logprob
    assert all(len(o.token_ids) == 16 for o in first.outputs)
    assert spec.llm_engine.block_manager.num_used_blocks == 0
