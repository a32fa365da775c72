"""Tensor parallelism over gloo on the CPU: TP=2 gives TP=1's greedy tokens and (within the
reordered-sum tolerance) its logprobs and prompt logprobs, for every architecture (KV heads split,
and one KV head replicated), through worker processes ("mp"); the errors; a killed worker fails the
generation at once with its rank named and leaves no worker behind; deleting the LLM stops them."""
import gc
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from pagedllm import LLM
from pagedllm.distributed.executor import MultiprocExecutor, WorkerDiedError
from pagedllm.llm import RequestErrors
from tp_testing import PROMPTS, SHAPES, alive, assert_close, engine_kwargs, greedy, make_tp_model

DEADLINE = 120.0  # seconds: generous for a loaded 2-core CI machine; only reached when something hangs


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("tp-models")


def run_greedy(path, prompts=None, **kwargs):
    llm = LLM(str(path), **engine_kwargs(**kwargs))
    try:
        return greedy(llm, prompts=prompts)
    finally:
        llm.llm_engine.shutdown()


def wait_until(condition, seconds: float = DEADLINE) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.parametrize("arch", list(SHAPES))
def test_tp2_matches_tp1(root, arch):
    path = make_tp_model(root, arch)
    want = run_greedy(path)
    got = run_greedy(path, tensor_parallel_size=2)  # "mp": the default backend
    assert_close(got, want)


def test_gguf_shards_decode_from_their_codes(tmp_path):
    """A Q4_1 GGUF: each rank keeps slices of the dequantized weights, and the slices (whole 32-value blocks)
    are still found to be Q4_1 codes, so the shards decode through quantized_linear; TP=2 equals TP=1."""
    import gguf
    import transformers as tf

    sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
    from models_testing import make_hf_model, write_llama_gguf
    from pagedllm.layers.linear import LMHead, Linear

    config = tf.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=128,
                            rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=2, tie_word_embeddings=False)
    path = tmp_path / "tiny-q4_1.gguf"
    write_llama_gguf(path, make_hf_model(config), gguf.GGMLQuantizationType.Q4_1)
    prompts = [{"prompt_token_ids": [(5 * i + 11 * j) % 250 + 3 for j in range(n)]} for i, n in enumerate((6, 23))]
    want = run_greedy(path, prompts)
    llm = LLM(str(path), **engine_kwargs(tensor_parallel_size=2))
    try:
        model = llm.llm_engine.runner.model
        assert {m.packed.qtype for m in model.modules() if isinstance(m, (Linear, LMHead))} == {3}
        assert model.model.layers[0].mlp.down_proj.weight.shape == (256, 256)  # its half of 512 input features
        got = greedy(llm, prompts=prompts)
    finally:
        llm.llm_engine.shutdown()
    assert_close(got, want)


def test_kv_heads_really_split_and_replicated(root):
    """The rank-0 shard holds half the query heads; its KV cache has num_kv_heads / 2 heads (qwen3) or the
    one replicated KV head (llama); the vocabulary is split into two padded halves."""
    for arch, kv_per_rank in (("qwen3", 1), ("llama", 1)):
        llm = LLM(str(make_tp_model(root, arch)), **engine_kwargs(tensor_parallel_size=2))
        try:
            runner = llm.llm_engine.runner
            heads, _ = SHAPES[arch]
            assert {a.num_heads for a in runner.attn_layers} == {heads // 2}
            assert runner.num_kv_heads == kv_per_rank and runner.key_cache.shape[2] == kv_per_rank
            embed = runner.model.model.embed_tokens
            assert embed.weight.shape[0] == (301 + 1) // 2 and embed.vocab_start == 0
        finally:
            llm.llm_engine.shutdown()


def test_heads_not_divisible(root):
    with pytest.raises(ValueError, match=r"Total number of attention heads \(4\) must be divisible by tensor "
                                         r"parallel size \(3\)"):
        LLM(str(make_tp_model(root, "qwen3")), **engine_kwargs(tensor_parallel_size=3))


def test_more_ranks_than_gpus(root, monkeypatch):
    from pagedllm.models import loader

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    source = loader.resolve_model(str(make_tp_model(root, "qwen3")))
    args = type("Args", (), {"tensor_parallel_size": 2})()
    with pytest.raises(ValueError, match=r"tensor_parallel_size \(2\) is larger than the number of available "
                                         r"GPUs \(1\)"):
        MultiprocExecutor(args, source, loader.load_config(source), torch.float32, torch.device("cuda"))


def test_bad_backend_and_size():
    with pytest.raises(ValueError, match="distributed_executor_backend must be one of mp or ray"):
        LLM("unused", distributed_executor_backend="threads")
    with pytest.raises(ValueError, match="tensor_parallel_size must be a positive integer"):
        LLM("unused", tensor_parallel_size=0)


def test_ray_not_installed(root, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(ValueError, match=r"Failed to import Ray.*pip install ray"):
        LLM(str(make_tp_model(root, "qwen3")), **engine_kwargs(tensor_parallel_size=2,
                                                               distributed_executor_backend="ray"))


def test_the_core_does_not_import_ray():
    code = ("import sys, pagedllm, pagedllm.engine.llm_engine, pagedllm.distributed.executor, "
            "pagedllm.entrypoints.cli; print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=DEADLINE,
                         env={**os.environ})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_killed_worker_fails_the_generation_and_leaves_no_process(root, monkeypatch):
    from pagedllm import SamplingParams

    llm = LLM(str(make_tp_model(root, "llama")), **engine_kwargs(tensor_parallel_size=2))
    executor = llm.llm_engine.executor
    pids = [p.pid for p in executor.procs]
    assert all(alive(pid) for pid in pids)
    real = executor.execute_model
    calls = {"n": 0}

    def execute_model(step):
        calls["n"] += 1
        if calls["n"] == 4:  # mid-generation: the prefill and two decode steps ran
            os.kill(pids[0], signal.SIGKILL)
            assert wait_until(lambda: not alive(pids[0]) or executor.procs[0].exitcode is not None)
        return real(step)

    monkeypatch.setattr(executor, "execute_model", execute_model)
    result = {}

    def generate():
        try:
            llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True), use_tqdm=False)
        except Exception as e:  # noqa: BLE001 - what the test looks at
            result["error"] = e

    t = threading.Thread(target=generate, daemon=True)
    t.start()
    t.join(DEADLINE)
    assert not t.is_alive(), "the generation hung after its worker was killed"
    err = result["error"]
    assert isinstance(err, RequestErrors)
    assert all("WorkerDiedError" in msg and "rank 1" in msg and "died" in msg for msg in err.errors.values())
    assert wait_until(lambda: not any(alive(pid) for pid in pids))
    assert not llm.llm_engine.has_unfinished_requests()
    with pytest.raises(RequestErrors, match="rank 1"):  # the engine stays unusable, and says why
        llm.generate(PROMPTS[:1], SamplingParams(max_tokens=2), use_tqdm=False)
    llm.llm_engine.shutdown()


def test_a_failure_on_rank_0_stops_the_workers(root, monkeypatch):
    """Rank 0 failing inside a step may leave the workers inside a collective: the group is not reused, the
    workers are stopped and every request gets the error."""
    from pagedllm import SamplingParams

    llm = LLM(str(make_tp_model(root, "qwen2")), **engine_kwargs(tensor_parallel_size=2))
    executor = llm.llm_engine.executor
    pids = [p.pid for p in executor.procs]
    real, calls = executor.runner.run, {"n": 0}

    def run(step):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("device lost on rank 0")
        return real(step)

    monkeypatch.setattr(executor.runner, "run", run)
    with pytest.raises(RequestErrors) as info:
        llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)
    assert all("rank 0 failed" in msg and "device lost on rank 0" in msg for msg in info.value.errors.values())
    assert wait_until(lambda: not any(alive(pid) for pid in pids))
    assert executor.closed
    llm.llm_engine.shutdown()  # idempotent


def test_deleting_the_llm_stops_the_workers(root):
    llm = LLM(str(make_tp_model(root, "qwen2")), **engine_kwargs(tensor_parallel_size=2))
    pids = [p.pid for p in llm.llm_engine.executor.procs]
    assert all(alive(pid) for pid in pids)
    del llm
    gc.collect()
    assert wait_until(lambda: not any(alive(pid) for pid in pids))


@pytest.mark.parametrize("end", ["exit", "kill"])
def test_worker_processes_end_with_the_driver(root, end):
    """A driver that exits normally stops its workers (told to stop at exit) and exits 0; one killed outright
    (no cleanup at all) takes them along too (PR_SET_PDEATHSIG)."""
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
            "from tp_testing import engine_kwargs\n"
            "from pagedllm import LLM\n"
            f"llm = LLM({str(make_tp_model(root, 'llama'))!r}, **engine_kwargs(tensor_parallel_size=2))\n"
            "print(*[p.pid for p in llm.llm_engine.executor.procs], flush=True)\n"
            "sys.stdin.readline()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(x) for x in proc.stdout.readline().split()]
        assert pids and all(alive(pid) for pid in pids)
        if end == "kill":
            proc.kill()
        else:
            proc.stdin.write("\n")
            proc.stdin.flush()
        assert proc.wait(DEADLINE) == (0 if end == "exit" else -signal.SIGKILL)
        assert wait_until(lambda: not any(alive(pid) for pid in pids))
    finally:
        proc.kill()


def test_serve_flags_reach_the_engine_args():
    from pagedllm.entrypoints.cli import build_parser, engine_args_from

    args = build_parser().parse_args(["serve", "some-model", "--tensor-parallel-size", "2",
                                      "--distributed-executor-backend", "ray"])
    engine_args = engine_args_from(args)
    assert (engine_args.tensor_parallel_size, engine_args.distributed_executor_backend) == (2, "ray")
