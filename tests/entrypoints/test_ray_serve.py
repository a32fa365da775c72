"""`pagedllm serve --replicas 2`: two engine replicas on Ray Serve behind one OpenAI endpoint (a local Ray instance
the CLI starts and, on SIGTERM, shuts down), driven by the official `openai` client. Every response names the
replica that served it (x-pagedllm-replica). Marked `ray` (deselect with -m "not ray"); runs by default.

Also, without starting Ray: the `serve run` builder's deployment options."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
import time
import uuid

import httpx
import openai
import pytest

from model_factory import make_tiny_model
from server_utils import ServerProcess, scrape

pytest.importorskip("ray.serve", reason="the [ray] extra (pip install pagedllm[ray]) is not installed")

REPLICA_HEADER = "x-pagedllm-replica"


def _env_of(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read()
    except OSError:   # gone, or not ours
        return b""


def _marked_processes(marker: str) -> list[int]:
    """Our processes whose environment carries marker: the CLI, Ray's daemons and workers (they inherit it)."""
    needle = f"PAGEDLLM_RAY_TEST={marker}".encode()
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and needle in _env_of(int(p)).split(b"\0")]


def _wait_gone(marker: str, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := _marked_processes(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def _kill_marked(marker: str) -> None:
    for pid in _marked_processes(marker):   # only what the fixture started
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    """The CLI with two replicas of the tiny model; torn down by SIGTERM (checked by the last test)."""
    model = make_tiny_model(tmp_path_factory.mktemp("ray"), "llama")
    marker = uuid.uuid4().hex
    os.environ["PAGEDLLM_RAY_TEST"] = marker
    try:
        # 0.5 CPU a replica: both fit a 2-core machine; small KV caches: two engines + Ray share the memory.
        server = ServerProcess(str(model), "--replicas", "2", "--ray-actor-options", '{"num_cpus": 0.5}',
                               "--max-ongoing-requests", "4", "--max-model-len", "512",
                               "--num-gpu-blocks-override", "128", "--max-num-seqs", "16",
                               "--shutdown-drain-seconds", "2", "--chat-template", "chatml_hermes_tools",
                               log_path=tmp_path_factory.mktemp("ray-log") / "serve.log", start_timeout=600)
    except BaseException:
        _kill_marked(marker)
        raise
    finally:
        del os.environ["PAGEDLLM_RAY_TEST"]
    server.marker = marker
    # /health answers once one replica is up; serve.run returns (and the CLI says so) when both are.
    deadline = time.monotonic() + 600
    while "with Ray Serve (2 replicas)" not in server.log():
        if server.proc.poll() is not None or time.monotonic() > deadline:
            _kill_marked(marker)
            server.kill()
            raise RuntimeError(f"the replicas did not all come up:\n{server.log()}")
        time.sleep(0.2)
    yield server
    if server.proc.poll() is None:   # the shutdown test did not run (deselected or failed before its signal)
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.wait(180)
        except subprocess.TimeoutExpired:
            pass
    _kill_marked(marker)
    server.kill()


@pytest.mark.ray
def test_32_concurrent_requests_are_answered_by_both_replicas(replicas):
    async def main():
        client = openai.AsyncOpenAI(base_url=replicas.url + "/v1", api_key="unused", max_retries=0, timeout=300)

        async def one(i: int):
            raw = await client.completions.with_raw_response.create(
                model="tiny", prompt=f"Request {i}: the capital of France is", max_tokens=8, temperature=0)
            completion = raw.parse()
            return raw.headers.get(REPLICA_HEADER), completion

        async def streamed():
            async with client.chat.completions.with_streaming_response.create(
                    model="tiny", messages=[{"role": "user", "content": "Hello!"}], max_tokens=8,
                    temperature=0, stream=True) as response:
                chunks = [chunk async for chunk in await response.parse()]
                return response.headers.get(REPLICA_HEADER), chunks

        results = await asyncio.gather(*(one(i) for i in range(32)), streamed())
        await client.close()
        return results[:32], results[32]

    answers, (stream_replica, chunks) = asyncio.run(main())
    assert len(answers) == 32
    for replica, completion in answers:
        assert replica, "a response without the replica header"
        assert completion.choices[0].finish_reason in ("stop", "length")
        assert completion.usage.completion_tokens >= 1
    # At most 4 requests go to one replica at once, so 32 concurrent ones cannot all land on the same one.
    assert len({replica for replica, _ in answers}) == 2
    assert stream_replica in {replica for replica, _ in answers}
    assert chunks and chunks[-1].choices[0].finish_reason in ("stop", "length")
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text


@pytest.mark.ray
def test_health_models_and_metrics_through_serve(replicas):
    health = httpx.get(replicas.url + "/health", timeout=60)
    assert health.status_code == 200 and health.headers[REPLICA_HEADER]
    models = httpx.get(replicas.url + "/v1/models", timeout=60).json()
    assert [m["id"] for m in models["data"]] == ["tiny"] and models["data"][0]["max_model_len"] == 512
    metrics = httpx.get(replicas.url + "/metrics", timeout=60)
    assert metrics.status_code == 200 and metrics.headers[REPLICA_HEADER]
    assert scrape(metrics.text, "pagedllm:num_requests_running") == 0
    bad = httpx.post(replicas.url + "/v1/completions", json={"model": "nope", "prompt": "x"}, timeout=60)
    assert bad.status_code == 404 and bad.json()["error"]["code"] == "model_not_found"


@pytest.mark.ray
def test_sigterm_shuts_serve_and_ray_down(replicas):
    """With a long stream running: the CLI exits 0 (the stream ends, finished or cut after the drain) and every
    process of its Ray instance is gone."""
    assert len(_marked_processes(replicas.marker)) >= 4   # the CLI, Ray's daemons, the two replicas at least
    first_chunk = threading.Event()
    stream_ended = threading.Event()

    def stream():
        body = {"model": "tiny", "prompt": "Count:", "max_tokens": 480, "ignore_eos": True, "stream": True}
        try:
            with httpx.stream("POST", replicas.url + "/v1/completions", json=body, timeout=300) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        first_chunk.set()
        except httpx.HTTPError:   # cut when its replica was killed after the drain
            pass
        finally:
            first_chunk.set()
            stream_ended.set()

    reader = threading.Thread(target=stream, daemon=True)
    reader.start()
    assert first_chunk.wait(300)
    replicas.proc.send_signal(signal.SIGTERM)
    assert replicas.wait(180) == 0, replicas.log()
    assert stream_ended.wait(120), "the stream neither finished nor ended with the server"
    assert _wait_gone(replicas.marker, 120) == [], "Ray processes left behind after the CLI exited"


def test_serve_run_builder_passes_options_through():
    from pagedllm.entrypoints.ray_serve import build_app
    app = build_app({"model": "/models/tiny", "replicas": "3", "device": "cpu", "max-num-seqs": "8",
                     "enable_prefix_caching": "false", "served_model_name": ["a", "b"],
                     "ray_actor_options": '{"num_cpus": 2, "memory": 1000000}'})
    deployment = app._bound_deployment
    assert deployment._deployment_config.num_replicas == 3
    assert deployment._deployment_config.max_ongoing_requests == 8
    assert deployment.ray_actor_options["num_cpus"] == 2 and deployment.ray_actor_options["memory"] == 1000000
    options = deployment.init_args[0]
    assert options["model"] == "/models/tiny" and options["max_num_seqs"] == 8
    assert options["enable_prefix_caching"] is False and options["served_model_name"] == ["a", "b"]

    scaled = build_app({"model": "/m", "device": "cpu", "replicas": 2,
                        "autoscaling_config": {"min_replicas": 1, "max_replicas": 4}})._bound_deployment
    config = scaled._deployment_config.autoscaling_config
    assert (config.min_replicas, config.max_replicas, config.initial_replicas) == (1, 4, 2)

    with pytest.raises(ValueError, match="Unknown pagedllm serve option: 'no_such_flag'"):
        build_app({"no_such_flag": "1"})
    with pytest.raises(ValueError, match="--autoscaling-config must be a JSON object"):
        build_app({"model": "/m", "device": "cpu", "autoscaling_config": "[1, 2]"})


def test_each_tensor_parallel_rank_gets_a_device():
    import argparse

    from pagedllm.entrypoints.ray_serve import deployment_options, parse_options
    args = vars(parse_options({"model": "/m", "device": "cpu"}))
    cpu = deployment_options(argparse.Namespace(**{**args, "tensor_parallel_size": 2}))
    assert cpu["ray_actor_options"] == {"num_cpus": 2}
    gpu = deployment_options(argparse.Namespace(**{**args, "device": "cuda", "tensor_parallel_size": 4}))
    assert gpu["ray_actor_options"] == {"num_gpus": 4}
