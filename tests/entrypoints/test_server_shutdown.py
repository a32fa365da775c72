"""Graceful shutdown of a real `pagedllm serve` process: SIGTERM stops accepting, running requests get the drain
(--shutdown-drain-seconds) to finish, what still runs after it is aborted (streams end with an error event, then
[DONE]; a non-streaming request answers 503) and the process exits; a second SIGTERM exits at once, even with a
runaway chat-template render in flight.

The tiny model's config is stretched to an 8192-token context so that a request of 8000 tokens is still running
whenever the test acts, on any machine (the weights are random: the length is only positions)."""
import asyncio
import json
import signal
import time
from pathlib import Path

import httpx
import pytest

from model_factory import make_tiny_model
from server_utils import ServerProcess, wait_until

NESTED_LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x"
LONG = 8000


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("shutdown"), "llama")
    config = json.loads((path / "config.json").read_text())
    config["max_position_embeddings"] = 8192
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def _serve(model_path, tmp_path, drain: float, *extra: str) -> ServerProcess:
    return ServerProcess(model_path, "--max-model-len", "8192", "--num-gpu-blocks-override", "2048",
                         "--shutdown-drain-seconds", str(drain), "--chat-template", "chatml_hermes_tools",
                         "--log-level", "info", *extra, log_path=tmp_path / "server.log")


async def _stream(ac: httpx.AsyncClient, max_tokens: int, started: asyncio.Event, events: list):
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": max_tokens, "ignore_eos": True,
            "stream": True}
    async with ac.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: "):])
                started.set()


def _refused(url: str) -> bool:
    try:
        httpx.get(url + "/health", timeout=5)
    except httpx.TransportError:
        return True
    return False


def _render_workers(pid: int) -> list[int]:
    """The chat-template render worker processes the server started."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid and b"render_worker.py" in cmdline:
            found.append(int(entry.name))
    return found


def _wait_for_log(server: ServerProcess, words: str) -> None:
    wait_until(lambda: words in server.log(), 120, f"{words!r} in the server log")


def test_sigterm_lets_running_requests_finish_then_exits(model_path, tmp_path):
    server = _serve(model_path, tmp_path, 300)
    try:
        async def main():
            async with httpx.AsyncClient(base_url=server.url, timeout=300) as ac:
                started = [asyncio.Event() for _ in range(3)]
                events = [[] for _ in range(3)]
                streams = [asyncio.create_task(_stream(ac, 300, started[i], events[i])) for i in range(3)]
                whole = asyncio.create_task(ac.post("/v1/completions", json={
                    "model": "tiny", "prompt": "Hello", "max_tokens": 300, "ignore_eos": True}))
                for e in started:
                    await asyncio.wait_for(e.wait(), 120)
                server.proc.send_signal(signal.SIGTERM)
                await asyncio.gather(*streams)
                return events, await whole

        events, whole = asyncio.run(main())
        for stream in events:   # every stream ran to its end: 300 tokens, a finish reason, [DONE]
            assert stream[-1] == "[DONE]"
            chunks = [json.loads(e) for e in stream[:-1]]
            assert "error" not in chunks[-1] and chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert whole.status_code == 200 and whole.json()["usage"]["completion_tokens"] == 300
        assert server.wait(120) == 0   # long before the 300 s drain: nothing was left to wait for
        assert _refused(server.url)
    finally:
        server.kill()


def test_after_the_drain_the_rest_is_aborted_with_an_error_event(model_path, tmp_path):
    server = _serve(model_path, tmp_path, 0.5, "--chat-template-timeout", "600")
    try:
        async def main():
            async with httpx.AsyncClient(base_url=server.url, timeout=300) as ac:
                started = [asyncio.Event() for _ in range(2)]
                events = [[] for _ in range(2)]
                streams = [asyncio.create_task(_stream(ac, LONG, started[i], events[i])) for i in range(2)]
                whole = asyncio.create_task(ac.post("/v1/completions", json={
                    "model": "tiny", "prompt": "Hello", "max_tokens": LONG, "ignore_eos": True}))
                runaway = asyncio.create_task(ac.post("/v1/chat/completions", json={
                    "model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                    "chat_template": NESTED_LOOPS}))
                for e in started:
                    await asyncio.wait_for(e.wait(), 120)
                await asyncio.to_thread(wait_until, lambda: _render_workers(server.proc.pid), 120,
                                        "the runaway render to start")
                server.proc.send_signal(signal.SIGTERM)
                await asyncio.gather(*streams)
                return events, await whole, await runaway

        events, whole, runaway = asyncio.run(main())
        for stream in events:
            assert stream[-1] == "[DONE]"
            error = json.loads(stream[-2])["error"]
            assert error["code"] == "engine_dead" and "The server is shutting down" in error["message"]
            assert len(stream) < LONG
        assert whole.status_code == 503 and "shutting down" in whole.json()["error"]["message"]
        assert runaway.status_code == 503, runaway.text
        assert server.wait(120) == 0
    finally:
        server.kill()


def test_a_second_sigterm_exits_at_once(model_path, tmp_path):
    server = _serve(model_path, tmp_path, 600, "--chat-template-timeout", "600")
    try:
        started = time.monotonic()

        async def main():
            async with httpx.AsyncClient(base_url=server.url, timeout=300) as ac:
                started_event, events = asyncio.Event(), []
                stream = asyncio.create_task(_stream(ac, LONG, started_event, events))
                await asyncio.wait_for(started_event.wait(), 120)
                server.proc.send_signal(signal.SIGTERM)
                await asyncio.to_thread(_wait_for_log, server, "running get 600.0 s to finish")
                # Draining: new connections are refused while the stream goes on.
                await asyncio.to_thread(wait_until, lambda: _refused(server.url), 60, "the listener to close")
                assert not stream.done()
                server.proc.send_signal(signal.SIGTERM)
                with pytest.raises(httpx.HTTPError):   # the connection drops without an answer
                    await stream
                return events

        events = asyncio.run(main())
        assert events and events[-1] != "[DONE]"
        assert server.wait(120) == 128 + signal.SIGTERM
        assert time.monotonic() - started < 600   # it did not wait for the drain
    finally:
        server.kill()
