"""One bad request harms no one else: every request is validated before it enters the engine, and a failure
inside a step (a user logits processor, a processor returning garbage, a failing sampling step, a failing
forward) fails its own request only; LLM.generate leaves the engine empty and returns the good outputs with
the errors, and the next generate() works."""
import random

import pytest
import torch

from model_factory import make_tiny_model
from pagedllm import LLM, SamplingParams
from pagedllm.llm import RequestErrors


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("m"), "llama")
    # Single steps: these tests hook the single step's forward and sampler (multi-step decoding's failures:
    # tests/engine/test_multi_step.py).
    return LLM(str(path), num_gpu_blocks_override=48, max_model_len=256, max_num_seqs=16, seed=0,
               num_scheduler_steps=1)


def _prompts(seed, n=3):
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(3, 300) for _ in range(rng.randrange(5, 30))]} for _ in range(n)]


GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def _alone(llm, prompt):
    return llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids


def _assert_empty(llm):
    engine = llm.llm_engine
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_used_blocks == 0
    assert not engine.scheduler.has_unfinished()
    assert engine.pop_request_errors() == {}


def _raises_on_third_token(output_ids, logits):
    if len(output_ids) == 3:
        raise RuntimeError("processor exploded")
    return logits


def _returns_garbage(prompt_ids, output_ids, logits):
    return "not a tensor"  # fails where the engine stores it: in the batched sampling step


def _bad_params(kind):
    p = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    if kind == "raises":
        p.logits_processors = [_raises_on_third_token]
    elif kind == "garbage":
        p.logits_processors = [_returns_garbage]
    return p


@pytest.mark.parametrize("kind,message", [
    ("raises", "RuntimeError: processor exploded"),
    ("garbage", "TypeError: "),  # the engine fails assigning a str into the logits row
])
def test_good_bad_good_keeps_both_goods(llm, kind, message):
    prompts = _prompts(1)
    expected = [_alone(llm, p) for p in prompts]
    with pytest.raises(RequestErrors) as info:
        llm.generate(prompts, [GREEDY, _bad_params(kind), GREEDY], use_tqdm=False)
    err = info.value
    assert list(err.errors) == [1]
    assert err.errors[1].startswith(message)
    assert err.outputs[1] is None
    assert [err.outputs[i].outputs[0].token_ids for i in (0, 2)] == [expected[0], expected[2]]
    _assert_empty(llm)
    assert _alone(llm, prompts[1]) == expected[1]  # a later generate works


def test_failed_sampling_step_is_pinned_on_its_row(llm, monkeypatch):
    """When the batched sampling op raises, the rows are sampled alone: the culprit fails, the others get the
    tokens they would have had (seeded random sampling included)."""
    prompts = _prompts(2, 4)
    params = [SamplingParams(temperature=0.9, seed=10 + i, max_tokens=6, ignore_eos=True) for i in range(4)]
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    sampler = llm.llm_engine.sampling.sampler
    real_call = type(sampler).__call__
    poisoned = params[2].seed

    def call(self, logits, rows):
        if any(r.seed == poisoned and r.offset == 2 for r in rows):
            raise RuntimeError("sample_tokens: bad row")
        return real_call(self, logits, rows)

    monkeypatch.setattr(type(sampler), "__call__", call)
    with pytest.raises(RequestErrors) as info:
        llm.generate(prompts, params, use_tqdm=False)
    monkeypatch.undo()
    err = info.value
    assert err.errors == {2: "RuntimeError: sample_tokens: bad row"}
    assert [err.outputs[i].outputs[0].token_ids for i in (0, 1, 3)] == [expected[0], expected[1], expected[3]]
    _assert_empty(llm)


def test_failed_forward_fails_its_requests_and_the_engine_recovers(llm, monkeypatch):
    executor = llm.llm_engine.executor
    real_execute = executor.execute_model
    calls = {"n": 0}

    def execute(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("device lost")
        return real_execute(*args, **kwargs)

    monkeypatch.setattr(executor, "execute_model", execute)
    prompts = _prompts(3)
    with pytest.raises(RequestErrors) as info:
        llm.generate(prompts, GREEDY, use_tqdm=False)
    monkeypatch.undo()
    assert set(info.value.errors.values()) == {"RuntimeError: device lost"}
    _assert_empty(llm)
    assert len(_alone(llm, prompts[0])) == 8


def test_interrupt_leaves_the_engine_empty(llm, monkeypatch):
    engine = llm.llm_engine
    real_step = engine.step
    calls = {"n": 0}

    def step():
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_step()

    monkeypatch.setattr(engine, "step", step)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(_prompts(4), GREEDY, use_tqdm=False)
    monkeypatch.undo()
    _assert_empty(llm)


def test_engine_step_hands_out_the_culprit(llm):
    """LLMEngine directly (what AsyncLLMEngine drives): the failed request leaves the engine, its error waits
    in pop_request_errors(), the others finish."""
    engine = llm.llm_engine
    prompts = _prompts(5)
    engine.add_request("ok0", prompts[0], GREEDY)
    engine.add_request("bad", prompts[1], _bad_params("raises"))
    engine.add_request("ok1", prompts[2], GREEDY)
    finished, errors = {}, {}
    for _ in range(100):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            assert out.request_id != "bad" or not out.finished
            if out.finished:
                finished[out.request_id] = out
        errors.update(engine.pop_request_errors())
    assert sorted(finished) == ["ok0", "ok1"] and list(errors) == ["bad"]
    assert isinstance(errors["bad"], RuntimeError)
    _assert_empty(llm)


def test_stale_error_never_aborts_a_later_request_with_the_same_id(llm):
    engine = llm.llm_engine
    engine.add_request("x", _prompts(6)[0], _bad_params("raises"))
    while engine.has_unfinished_requests():
        engine.step()   # fails "x"; its error is not popped yet
    engine.add_request("x", _prompts(6)[1], GREEDY)
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.finished]
    assert [len(o.outputs[0].token_ids) for o in outs] == [8]
    assert list(engine.pop_request_errors()) == ["x"]
    _assert_empty(llm)


@pytest.mark.parametrize("prompt,message", [
    ({"prompt_token_ids": [5, 1.5, 7]}, "prompt_token_ids must contain only integers, got 1.5."),
    ({"prompt_token_ids": [5, True]}, "prompt_token_ids must contain only integers, got True."),
    ({"prompt_token_ids": "abc"}, "prompt_token_ids must be a list of integers, got str."),
    ({"prompt_token_ids": [5, 6], "cache_salt": 123}, "cache_salt must be a string, got int."),
    ({"prompt": 123}, "A text prompt must be a string, got int."),
    ("a\ud800b", "The prompt is not valid Unicode: it contains a lone surrogate at position 1"),
    (42, "A prompt is a str, a TextPrompt or a TokensPrompt, got int."),
])
def test_bad_prompts_fail_at_add_request(llm, prompt, message):
    with pytest.raises(ValueError) as info:
        llm.llm_engine.add_request("bad", prompt, GREEDY)
    assert str(info.value).startswith(message)
    assert "bad" not in llm.llm_engine.requests


def _mutated(**fields):
    p = SamplingParams(max_tokens=4)
    for k, v in fields.items():
        setattr(p, k, v)  # after construction: __post_init__ never saw these values
    return p


@pytest.mark.parametrize("params,message", [
    (_mutated(temperature=float("nan")), "temperature must be a finite number, got nan."),
    (_mutated(temperature=float("inf")), "temperature must be a finite number, got inf."),
    (_mutated(stop=[1, 2]), "stop must contain only strings, got [1, 2]."),
    (_mutated(bad_words=[1]), "bad_words must contain only strings, got [1]."),
    (SamplingParams(stop_token_ids=[10 ** 6]),
     "token_id(s) [1000000] in stop_token_ids contain out-of-vocab token ids. Vocabulary size: "),
])
def test_params_changed_after_construction_are_checked_again(llm, params, message):
    prompts = _prompts(7)
    with pytest.raises(RequestErrors) as info:
        llm.generate(prompts, [GREEDY, params, GREEDY], use_tqdm=False)
    assert list(info.value.errors) == [1] and info.value.errors[1].startswith(message)
    assert all(info.value.outputs[i] is not None for i in (0, 2))
    _assert_empty(llm)


def test_processors_see_torch_rows(llm):
    """The guard keeps a processor's signature: both forms still steer the output."""
    seen = []

    def two(output_ids, logits):
        seen.append(isinstance(logits, torch.Tensor))
        logits[:] = -1e9
        logits[42] = 0
        return logits

    out = llm.generate(_prompts(8, 1), SamplingParams(max_tokens=3, logits_processors=[two]), use_tqdm=False)
    assert out[0].outputs[0].token_ids == [42, 42, 42] and all(seen)


def test_async_engine_callers_get_their_own_errors(llm):
    """Through AsyncLLMEngine (the server's engine): a bad prompt's ValueError and a failing processor reach only
    their own generate(); the good requests beside them finish with the tokens they get alone."""
    import asyncio

    from pagedllm import AsyncLLMEngine

    prompts = _prompts(9, 2)
    expected = [_alone(llm, p) for p in prompts]
    engine = AsyncLLMEngine(llm.llm_engine)

    async def collect(prompt, params, rid):
        try:
            return [o async for o in engine.generate(prompt, params, rid)][-1].outputs[0].token_ids
        except Exception as e:  # noqa: BLE001 - the test looks at which request got what
            return e

    async def main():
        return await asyncio.gather(
            collect(prompts[0], GREEDY, "good0"),
            collect({"prompt_token_ids": [5, 1.5]}, GREEDY, "float-ids"),
            collect({"prompt_token_ids": [5, 6], "cache_salt": 123}, GREEDY, "salt"),
            collect(prompts[1], _bad_params("raises"), "processor"),
            collect(prompts[1], GREEDY, "good1"))

    try:
        good0, float_ids, salt, processor, good1 = asyncio.run(main())
    finally:
        engine.shutdown()
    assert [good0, good1] == expected
    assert isinstance(float_ids, ValueError) and "prompt_token_ids must contain only integers" in str(float_ids)
    assert isinstance(salt, ValueError) and str(salt) == "cache_salt must be a string, got int."
    assert isinstance(processor, RuntimeError) and str(processor) == "processor exploded"
    _assert_empty(llm)
