"""AsyncLLMEngine: streaming, continuous batching across concurrent callers, aborts and cancellation free
every block, and failures stay with the request that caused them."""
import asyncio
import time

import pytest

from model_factory import make_tiny_model
from pagedllm import AsyncEngineArgs, AsyncLLMEngine, SamplingParams
from pagedllm.engine.async_engine import QueueFullError


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("m"), "llama")
    eng = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(
        model=str(path), device="cpu", max_model_len=256, num_gpu_blocks_override=64, max_num_seqs=16, seed=0))
    yield eng
    eng.shutdown()


def _prompt(i, n=12):
    return {"prompt_token_ids": [3 + (i * 7 + k * 13) % 290 for k in range(n)]}


def _idle(engine, timeout=30.0):
    """Waits (bounded) until the engine thread holds no request and every KV block is free."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = engine.snapshot
        if s["num_unfinished_requests"] == 0 and s["num_used_blocks"] == 0 and not engine._pending:
            return True
        time.sleep(0.01)
    return False


async def _until(condition, timeout=60.0):
    """Yields to the event loop until condition() holds; fails (never hangs) after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s"
        await asyncio.sleep(0.005)


async def _collect(engine, prompt, params, rid):
    outs = [o async for o in engine.generate(prompt, params, rid)]
    return outs


def test_stream_is_cumulative_and_ends_finished(engine):
    params = SamplingParams(max_tokens=9, ignore_eos=True, temperature=0)
    outs = asyncio.run(_collect(engine, _prompt(0), params, "s0"))
    assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
    lengths = [len(o.outputs[0].token_ids) for o in outs]
    assert lengths == sorted(lengths) and lengths[-1] == 9
    final = outs[-1].outputs[0]
    for o in outs[:-1]:   # every earlier output is a prefix of the final one
        assert final.token_ids[:len(o.outputs[0].token_ids)] == o.outputs[0].token_ids
        assert final.text.startswith(o.outputs[0].text)
    assert final.finish_reason == "length"
    assert _idle(engine)


def test_concurrent_requests_match_sequential_ones(engine):
    params = SamplingParams(max_tokens=12, ignore_eos=True, temperature=0)

    async def run_all():
        return await asyncio.gather(*[_collect(engine, _prompt(i, 5 + i), params, f"c{i}") for i in range(8)])

    together = asyncio.run(run_all())
    alone = [asyncio.run(_collect(engine, _prompt(i, 5 + i), params, f"a{i}")) for i in range(8)]
    for t, a in zip(together, alone):
        assert t[-1].outputs[0].token_ids == a[-1].outputs[0].token_ids
        assert len(t[-1].outputs[0].token_ids) == 12
    assert _idle(engine)


def test_cancelling_the_consumer_aborts_and_frees_blocks(engine):
    async def main():
        seen = []

        async def consume():
            async for o in engine.generate(_prompt(1, 40), SamplingParams(max_tokens=200, ignore_eos=True), "x1"):
                seen.append(o)

        task = asyncio.create_task(consume())
        await _until(lambda: len(seen) >= 3 or task.done())
        assert not task.done()
        assert engine.snapshot["num_used_blocks"] > 0 or engine.engine.block_manager.num_used_blocks > 0
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return seen

    seen = asyncio.run(main())
    assert not seen[-1].finished
    assert _idle(engine)
    assert engine.num_unfinished_requests() == 0


def test_break_and_explicit_abort_free_blocks(engine):
    async def main():
        gen = engine.generate(_prompt(2, 30), SamplingParams(max_tokens=200, ignore_eos=True), "b1")
        async for o in gen:
            if len(o.outputs[0].token_ids) >= 2:
                break
        await gen.aclose()

        outs = []

        async def consume():
            async for o in engine.generate(_prompt(3, 30), SamplingParams(max_tokens=200, ignore_eos=True), "b2"):
                outs.append(o)

        task = asyncio.create_task(consume())
        await _until(lambda: outs or task.done())
        await engine.abort("b2")
        await asyncio.wait_for(task, 30)   # the generator ends quietly
        return outs

    outs = asyncio.run(main())
    assert outs and not outs[-1].finished
    assert _idle(engine)


def test_bad_request_raises_to_its_caller_only(engine):
    async def main():
        good = asyncio.create_task(_collect(engine, _prompt(4), SamplingParams(max_tokens=20, ignore_eos=True), "g"))
        with pytest.raises(ValueError, match=r"The decoder prompt \(length 300\) is longer than the maximum model"):
            await _collect(engine, {"prompt_token_ids": [5] * 300}, SamplingParams(), "bad")
        with pytest.raises(ValueError, match="Token id 100000 is out of vocabulary"):
            await _collect(engine, {"prompt_token_ids": [5, 100000]}, SamplingParams(), "bad2")
        return await good

    outs = asyncio.run(main())
    assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 20
    assert _idle(engine)


def test_duplicate_request_id_is_rejected(engine):
    async def main():
        gen = engine.generate(_prompt(5), SamplingParams(max_tokens=50, ignore_eos=True), "dup")
        first = await gen.__anext__()
        with pytest.raises(ValueError, match="already running"):
            await _collect(engine, _prompt(6), SamplingParams(), "dup")
        await gen.aclose()
        return first

    assert not asyncio.run(main()).finished
    assert _idle(engine)


def test_crashing_logits_processor_fails_only_its_request(engine):
    def boom(output_ids, logits):
        if len(output_ids) == 3:
            raise RuntimeError("processor exploded")
        return logits

    async def main():
        others = [asyncio.create_task(_collect(engine, _prompt(10 + i), SamplingParams(max_tokens=15, ignore_eos=True),
                                               f"ok{i}")) for i in range(4)]
        with pytest.raises(RuntimeError, match="processor exploded"):
            await _collect(engine, _prompt(9), SamplingParams(max_tokens=15, ignore_eos=True,
                                                              logits_processors=[boom]), "boom")
        return await asyncio.gather(*others)

    results = asyncio.run(main())
    assert all(r[-1].finished and len(r[-1].outputs[0].token_ids) == 15 for r in results)
    assert _idle(engine)
    # The loop still serves new requests.
    again = asyncio.run(_collect(engine, _prompt(20), SamplingParams(max_tokens=4, ignore_eos=True), "after"))
    assert len(again[-1].outputs[0].token_ids) == 4


def test_step_exception_fails_inflight_requests_and_loop_goes_on(engine, monkeypatch):
    real_step = engine.engine.step
    calls = {"n": 0}

    def flaky_step():
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("step blew up")
        return real_step()

    monkeypatch.setattr(engine.engine, "step", flaky_step)

    async def main():
        with pytest.raises(RuntimeError, match="step blew up"):
            await _collect(engine, _prompt(30), SamplingParams(max_tokens=30, ignore_eos=True), "f1")

    asyncio.run(main())
    assert _idle(engine)
    outs = asyncio.run(_collect(engine, _prompt(31), SamplingParams(max_tokens=6, ignore_eos=True), "f2"))
    assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 6
    assert engine.is_running


def test_queue_full(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("q"), "qwen2")
    eng = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(model=str(path), device="cpu", max_model_len=128,
                                                          num_gpu_blocks_override=32, max_num_seqs=1),
                                          max_queue_size=1)
    try:
        async def main():
            long = SamplingParams(max_tokens=100, ignore_eos=True)
            gens = [eng.generate(_prompt(i), long, f"q{i}") for i in range(2)]
            firsts = [asyncio.create_task(g.__anext__()) for g in gens]
            await asyncio.sleep(0)   # both submitted
            with pytest.raises(QueueFullError):
                await _collect(eng, _prompt(3), long, "q3")
            await asyncio.gather(*firsts)
            for g in gens:
                await g.aclose()

        asyncio.run(main())
        assert _idle(eng)
        outs = asyncio.run(_collect(eng, _prompt(4), SamplingParams(max_tokens=3, ignore_eos=True), "q4"))
        assert len(outs[-1].outputs[0].token_ids) == 3
    finally:
        eng.shutdown()
