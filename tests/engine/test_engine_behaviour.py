"""Engine behaviour a user sees: many requests through a small cache, aborts, bad requests failing
alone, seeded sampling independent of the batch, n > 1, stop conditions, validation wording."""
import random

import pytest

from model_factory import make_tiny_model
from pagedllm import LLM, EngineArgs, LLMEngine, SamplingParams
from pagedllm.llm import RequestErrors


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("m"), "llama")
    return LLM(str(path), num_gpu_blocks_override=40, max_model_len=256, max_num_seqs=32, seed=0)


def _ids(rng, n, vocab=300):
    return {"prompt_token_ids": [rng.randrange(3, vocab) for _ in range(n)]}


def test_200_requests_through_a_small_cache(llm):
    rng = random.Random(0)
    prompts = [_ids(rng, rng.randrange(1, 120)) for _ in range(200)]
    params = [SamplingParams(temperature=0.8, max_tokens=rng.randrange(1, 40), ignore_eos=True, seed=i)
              for i in range(200)]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.request_id for o in outputs] == sorted((o.request_id for o in outputs), key=int)
    for out, prompt, p in zip(outputs, prompts, params):
        assert out.finished
        assert out.prompt_token_ids == prompt["prompt_token_ids"]
        assert len(out.outputs[0].token_ids) == p.max_tokens
        assert out.outputs[0].finish_reason == "length"
    assert llm.llm_engine.block_manager.num_used_blocks == 0


def test_abort_frees_every_block(llm):
    engine = llm.llm_engine
    rng = random.Random(1)
    for i in range(6):
        engine.add_request(f"a{i}", _ids(rng, 30 + i), SamplingParams(max_tokens=100, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.block_manager.num_used_blocks > 0
    engine.abort_request(["a0", "a1", "a2"])
    engine.abort_request("a3")
    engine.abort_request(["a4", "a5", "does-not-exist"])
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_used_blocks == 0


def test_bad_request_fails_alone(llm):
    rng = random.Random(2)
    good = [_ids(rng, 10), _ids(rng, 20)]
    too_long = _ids(rng, 300)
    with pytest.raises(ValueError, match=r"The decoder prompt \(length 300\) is longer than the maximum model "
                                         r"length of 256") as info:
        llm.generate([good[0], too_long, good[1]], SamplingParams(max_tokens=5, ignore_eos=True), use_tqdm=False)
    err = info.value
    assert isinstance(err, RequestErrors) and list(err.errors) == [1]
    assert err.outputs[1] is None
    assert [len(o.outputs[0].token_ids) for o in (err.outputs[0], err.outputs[2])] == [5, 5]
    assert llm.llm_engine.block_manager.num_used_blocks == 0


@pytest.mark.parametrize("prompt,message", [
    ({"prompt_token_ids": []}, "The decoder prompt cannot be empty"),
    ({"prompt_token_ids": [1, 2, 10 ** 6]}, "Token id 1000000 is out of vocabulary"),
])
def test_engine_validation_wording(llm, prompt, message):
    with pytest.raises(ValueError, match=message):
        llm.llm_engine.add_request("bad", prompt, SamplingParams())
    assert "bad" not in llm.llm_engine.requests


def test_seeded_sampling_is_independent_of_the_batch(llm):
    rng = random.Random(3)
    target = _ids(rng, 25)
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=20, ignore_eos=True)
    alone = llm.generate([target], params, use_tqdm=False)[0].outputs[0].token_ids
    others = [_ids(rng, rng.randrange(5, 60)) for _ in range(7)]
    other_params = [SamplingParams(temperature=0.7, max_tokens=rng.randrange(5, 30), ignore_eos=True) for _ in others]
    mixed = llm.generate(others[:3] + [target] + others[3:], other_params[:3] + [params] + other_params[3:],
                         use_tqdm=False)
    assert mixed[3].outputs[0].token_ids == alone
    unseeded = SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)
    a, b = llm.generate([target, target], unseeded, use_tqdm=False)
    assert a.outputs[0].token_ids != b.outputs[0].token_ids  # 20 free draws each: equal only by a fluke


def test_n_samples_share_the_prompt_and_differ(llm):
    rng = random.Random(4)
    out = llm.generate([_ids(rng, 37)], SamplingParams(n=4, temperature=1.0, max_tokens=10, ignore_eos=True, seed=5),
                       use_tqdm=False)[0]
    assert [o.index for o in out.outputs] == [0, 1, 2, 3]
    assert all(len(o.token_ids) == 10 for o in out.outputs)
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    assert llm.llm_engine.block_manager.num_used_blocks == 0


def test_greedy_n_is_refused_with_vllms_words():
    # Every greedy sample would be the same sequence (vLLM's _verify_greedy_sampling).
    with pytest.raises(ValueError, match=r"^n must be 1 when using greedy sampling, got 3\.$"):
        SamplingParams(n=3, temperature=0, max_tokens=6)


def test_stop_token_ids_and_min_tokens(llm):
    prompt = {"prompt_token_ids": [5, 6, 7, 8, 9]}
    free = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)[0]
    toks = free.outputs[0].token_ids
    stop_tok = toks[3]
    first = toks.index(stop_tok)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                                stop_token_ids=[stop_tok]), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == toks[:first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_tok
    # min_tokens: the stop token is masked until min_tokens tokens exist, so the text runs on past it.
    m = first + 3
    held = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, min_tokens=m,
                                                 stop_token_ids=[stop_tok]), use_tqdm=False)[0].outputs[0]
    assert held.token_ids[:first] == toks[:first]
    assert len(held.token_ids) >= m and stop_tok not in held.token_ids[:m]
    if held.finish_reason == "stop":   # a later stop token still stops it
        assert held.token_ids[-1] == stop_tok and stop_tok not in held.token_ids[:-1][m:]
    else:
        assert held.finish_reason == "length" and len(held.token_ids) == 20


def test_unknown_llm_argument_is_a_type_error():
    with pytest.raises(TypeError, match="unexpected keyword argument 'not_an_option'"):
        LLM(model="x", not_an_option=1)


def test_lengths_must_match(llm):
    with pytest.raises(ValueError, match="The lengths of prompts and params must be the same."):
        llm.generate(["a", "b"], [SamplingParams()], use_tqdm=False)


def test_engine_api(tmp_path):
    path = make_tiny_model(tmp_path, "qwen2")
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(path), num_gpu_blocks_override=20, max_model_len=128))
    engine.add_request("r1", "Hello world", SamplingParams(max_tokens=4, ignore_eos=True))
    engine.add_request("r2", {"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=2, ignore_eos=True))
    finished = {}
    steps = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        steps += 1
    assert steps == 4
    assert len(finished["r1"].outputs[0].token_ids) == 4 and finished["r1"].prompt == "Hello world"
    assert len(finished["r2"].outputs[0].token_ids) == 2
    with pytest.raises(ValueError, match="max_model_len"):
        LLMEngine.from_engine_args(EngineArgs(model=str(path), num_gpu_blocks_override=4, max_model_len=128))
