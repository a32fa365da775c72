"""Multi-step decoding (engine/multi_step.py, csrc/cpu/decode_loop.cpp): k decode forwards in a row give the
single steps' tokens, text and finish reasons, through the one-op loop and the Python one, with no KV block
left behind; what is not plain sampling (or has company waiting) runs as single steps."""
import random
import time

import pytest

from model_factory import make_tiny_model
from pagedllm import LLM, EngineArgs, SamplingParams
from pagedllm.llm import RequestErrors
from pagedllm.engine.multi_step import OFFLINE_CPU_STEPS
from pagedllm.models import cpu_decoder_layers


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return str(make_tiny_model(tmp_path_factory.mktemp("m"), "llama"))


def _llm(path, steps, **kw):
    return LLM(path, num_gpu_blocks_override=kw.pop("blocks", 64), max_model_len=256, max_num_seqs=16, seed=0,
               num_scheduler_steps=steps, **kw)


def _workload(seed=0, n=10):
    rng = random.Random(seed)
    prompts = [{"prompt_token_ids": [rng.randrange(3, 300) for _ in range(rng.randrange(2, 40))]} for _ in range(n)]
    kinds = [dict(temperature=0.0), dict(temperature=0.9, seed=7), dict(temperature=1.0, top_k=12, seed=3),
             dict(temperature=0.8, top_p=0.7, min_p=0.05, seed=11), dict(temperature=0.0, stop=["e", "a"]),
             dict(temperature=0.0, stop_token_ids=[5, 17, 40]), dict(temperature=0.7, n=2, seed=5)]
    params = [SamplingParams(max_tokens=rng.randrange(1, 60), ignore_eos=rng.random() < 0.5, **kinds[i % len(kinds)])
              for i in range(n)]
    return prompts, params


def _outputs(llm, prompts, params):
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in o.outputs] for o in outs]


def _spy(monkeypatch, llm):
    calls = {"loop": 0, "steps": 0}
    runner = llm.llm_engine.runner
    run_steps, loop = runner.run_decode_steps, cpu_decoder_layers.decode_loop

    def counted_steps(*a, **kw):
        calls["steps"] += 1
        return run_steps(*a, **kw)

    def counted_loop(*a, **kw):
        out = loop(*a, **kw)
        calls["loop"] += out is not None
        return out

    monkeypatch.setattr(runner, "run_decode_steps", counted_steps)
    monkeypatch.setattr(cpu_decoder_layers, "decode_loop", counted_loop)
    return calls


@pytest.mark.parametrize("steps", [2, 5, 8])
def test_same_tokens_as_single_steps(model_path, monkeypatch, steps):
    prompts, params = _workload()
    single = _outputs(_llm(model_path, 1), prompts, params)
    llm = _llm(model_path, steps)
    calls = _spy(monkeypatch, llm)
    assert _outputs(llm, prompts, params) == single
    assert calls["steps"] > 0 and calls["loop"] == calls["steps"]  # every run went through the one-op loop
    bm = llm.llm_engine.block_manager
    assert bm.num_used_blocks == 0
    bm._check_invariants()


def test_python_loop_gives_the_same_tokens(model_path, monkeypatch):
    prompts, params = _workload(seed=1)
    single = _outputs(_llm(model_path, 1), prompts, params)
    llm = _llm(model_path, 6)
    monkeypatch.setattr(cpu_decoder_layers, "decode_loop", lambda *a, **kw: None)  # as for a model it does not mirror
    calls = _spy(monkeypatch, llm)
    assert _outputs(llm, prompts, params) == single
    assert calls["steps"] > 0 and calls["loop"] == 0
    assert llm.llm_engine.block_manager.num_used_blocks == 0


def test_small_cache_preempts_and_still_matches(model_path):
    """Few KV blocks: the extra slots often do not fit (single steps then) and sequences get preempted."""
    rng = random.Random(2)
    prompts = [{"prompt_token_ids": [rng.randrange(3, 300) for _ in range(rng.randrange(20, 60))]} for _ in range(12)]
    params = [SamplingParams(temperature=0.8, seed=i, max_tokens=rng.randrange(20, 80), ignore_eos=True)
              for i in range(12)]
    single = _outputs(_llm(model_path, 1, blocks=24), prompts, params)
    llm = _llm(model_path, 8, blocks=24)
    assert _outputs(llm, prompts, params) == single
    assert llm.llm_engine.scheduler.num_preemptions > 0
    assert llm.llm_engine.block_manager.num_used_blocks == 0


def test_blocks_cached_with_the_sampled_tokens(model_path):
    """The reserved slots' placeholders are replaced before the blocks are registered: a prompt made of the
    first answer hits the prefix cache."""
    llm = _llm(model_path, 8)
    prompt = list(range(10, 30))
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
                       use_tqdm=False)[0]
    again = llm.generate({"prompt_token_ids": prompt + list(out.outputs[0].token_ids)},
                         SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)[0]
    assert again.num_cached_tokens == (len(prompt) + 40 - 1) // 16 * 16


@pytest.mark.parametrize("params", [SamplingParams(max_tokens=30, logprobs=2), SamplingParams(max_tokens=30, presence_penalty=0.5),
                                    SamplingParams(max_tokens=30, min_tokens=5), SamplingParams(max_tokens=30, logit_bias={7: 2.0}),
                                    SamplingParams(max_tokens=1)])
def test_other_sampling_runs_single_steps(model_path, monkeypatch, params):
    single = _outputs(_llm(model_path, 1), [{"prompt_token_ids": [4, 5, 6]}], [params])
    llm = _llm(model_path, 8)
    calls = _spy(monkeypatch, llm)
    assert _outputs(llm, [{"prompt_token_ids": [4, 5, 6]}], [params]) == single
    assert calls["steps"] == 0


def test_waiting_requests_are_not_held_back(model_path):
    """A decode step with a request waiting for admission (max_num_seqs 1 here) runs alone: k forwards would
    hold the newcomer back; once nothing waits, the same decode takes k forwards."""
    llm = LLM(model_path, num_gpu_blocks_override=64, max_model_len=256, max_num_seqs=1, num_scheduler_steps=8)
    engine = llm.llm_engine
    engine.add_request("a", {"prompt_token_ids": [3, 4, 5]}, SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()                                   # a's prefill
    seq = engine.requests["a"].seqs[0]
    rows = {seq.seq_id: engine._sample_rows(seq)}
    engine.add_request("b", {"prompt_token_ids": [6, 7]}, SamplingParams(max_tokens=5))
    assert engine.multi_step.steps(engine.scheduler.schedule(), rows, engine._plain_request) == 1
    engine.abort_request("b")
    assert engine.multi_step.steps(engine.scheduler.schedule(), rows, engine._plain_request) == 8
    engine.abort_request("a")
    assert engine.block_manager.num_used_blocks == 0


def test_failed_forwards_fail_their_requests_and_the_engine_recovers(model_path, monkeypatch):
    llm = _llm(model_path, 8)
    engine = llm.llm_engine
    prompts, params = _workload(seed=3, n=4)
    expected = _outputs(llm, prompts, params)

    def broken(*a, **kw):
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine.executor, "execute_decode_steps", broken)
    with pytest.raises(RequestErrors) as info:
        llm.generate(prompts, params, use_tqdm=False)
    assert set(info.value.errors.values()) == {"RuntimeError: device lost"}
    assert not engine.has_unfinished_requests() and engine.block_manager.num_used_blocks == 0
    monkeypatch.undo()
    assert _outputs(llm, prompts, params) == expected


def test_a_failure_inside_the_burst_fails_its_request_alone(model_path, monkeypatch):
    """A sequence whose third token fails (e.g. its detokenization) fails alone; the others keep every token."""
    llm = _llm(model_path, 8)
    engine = llm.llm_engine
    prompts = [{"prompt_token_ids": [3 + i, 40, 50 + i]} for i in range(3)]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    expected = _outputs(llm, prompts, params)
    append = engine._append

    def failing(seq, sample):
        if seq.request.prompt_token_ids[0] == 4 and len(seq.output_token_ids) == 2:  # the second prompt's
            raise RuntimeError("detokenizer exploded")
        append(seq, sample)

    monkeypatch.setattr(engine, "_append", failing)
    with pytest.raises(RequestErrors) as info:
        llm.generate(prompts, params, use_tqdm=False)
    err = info.value
    assert err.errors == {1: "RuntimeError: detokenizer exploded"}
    assert [_outputs_of(err.outputs[i]) for i in (0, 2)] == [expected[0], expected[2]]
    assert engine.block_manager.num_used_blocks == 0


def _outputs_of(out):
    return [(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in out.outputs]


def test_the_offline_default_and_the_server_default(model_path):
    assert _llm(model_path, None).llm_engine.multi_step.k == OFFLINE_CPU_STEPS
    from pagedllm import LLMEngine
    engine = LLMEngine(EngineArgs(model=model_path, num_gpu_blocks_override=32, max_model_len=128))
    assert engine.multi_step is None


@pytest.mark.parametrize("value", [0, -3, 2.5, True, "8"])
def test_num_scheduler_steps_validated(value):
    with pytest.raises(ValueError, match="num_scheduler_steps must be a positive integer"):
        EngineArgs(num_scheduler_steps=value)


def test_async_engine_streams_bursts_of_the_same_tokens(model_path):
    """The server's engine with --num-scheduler-steps: cumulative outputs in bursts of up to k tokens, concurrent
    requests finish with the single steps' tokens and text, every block freed."""
    import asyncio

    from pagedllm import AsyncEngineArgs, AsyncLLMEngine

    prompts, params = _workload(seed=4, n=6)
    params = [SamplingParams(temperature=p.temperature, seed=p.seed, top_k=p.top_k, top_p=p.top_p, stop=p.stop,
                             max_tokens=p.max_tokens, ignore_eos=p.ignore_eos) for p in params]  # n = 1 each
    expected = _outputs(_llm(model_path, 1), prompts, params)
    engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(model=model_path, device="cpu", max_model_len=256,
                                                             num_gpu_blocks_override=64, seed=0,
                                                             num_scheduler_steps=4))
    try:
        async def one(i):
            return [o async for o in engine.generate(prompts[i], params[i], f"r{i}")]

        async def run_all():
            return await asyncio.gather(*[one(i) for i in range(len(prompts))])

        streams = asyncio.run(run_all())
        for stream, want in zip(streams, expected):
            final = stream[-1]
            assert final.finished and _outputs_of(final) == want
            lengths = [len(o.outputs[0].token_ids) for o in stream]
            assert lengths == sorted(lengths)
            for o in stream[:-1]:
                assert final.outputs[0].token_ids[:len(o.outputs[0].token_ids)] == o.outputs[0].token_ids
        assert any(b - a > 1 for s in streams for a, b in zip([0] + [len(o.outputs[0].token_ids) for o in s],
                                                              [len(o.outputs[0].token_ids) for o in s]))
        deadline = time.monotonic() + 60  # the engine thread's last step may still be returning
        while engine.snapshot["num_used_blocks"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.snapshot["num_used_blocks"] == 0
    finally:
        engine.shutdown()
