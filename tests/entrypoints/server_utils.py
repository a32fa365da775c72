"""A real uvicorn server in a thread on 127.0.0.1 (a socket bound to a free port first, so no race), the tiny
models the server tests use, and a logits processor that makes the model say a given text."""
from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
from typing import Optional

import torch
import uvicorn

# Small: the tiny models' context is 512 tokens and their tokenizer spends a token on most characters.
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


class ServerThread:
    def __init__(self, app):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_keep_alive=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


def forcing(token_ids: list[int], eos_id: int):
    """A logits processor that lets through only the next of token_ids, then EOS: the model says exactly them."""
    def processor(output_ids, logits):
        step = len(output_ids)
        target = token_ids[step] if step < len(token_ids) else eos_id
        masked = torch.full_like(logits, float("-inf"))
        masked[target] = 0.0
        return masked
    return processor


class ForcedOutputs:
    """Wraps LLMEngine.add_request: a prompt that holds a registered marker gets a forcing logits processor, so
    the model answers the text registered for that marker (how the tests make a random model call a tool)."""

    def __init__(self, llm_engine):
        self.engine = llm_engine
        self.tokenizer = llm_engine.get_tokenizer()
        self.texts: dict[str, str] = {}
        self._real = llm_engine.add_request
        llm_engine.add_request = self.add_request

    def add_request(self, request_id, prompt, params=None, **kwargs):
        text = prompt.get("prompt") if isinstance(prompt, dict) else prompt
        for marker, forced in self.texts.items():
            if text and marker in text:
                ids = self.tokenizer.encode(forced, add_special_tokens=False)
                params = params.clone()
                params.logits_processors = [forcing(ids, self.tokenizer.eos_token_id)]
                params.max_tokens = max(params.max_tokens or 0, len(ids) + 2)
                break
        return self._real(request_id, prompt, params, **kwargs)


def scrape(text: str, name: str, default: Optional[float] = None) -> float:
    """The value of metric `name` (any labels) in Prometheus text; summed when several label sets match."""
    total, found = 0.0, False
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", line)
        if m:
            total += float(m.group(2))
            found = True
    if not found:
        if default is None:
            raise KeyError(name)
        return default
    return total


class Gate:
    """Wraps LLMEngine.add_request: a prompt that holds `marker` gets a logits processor that, when its request
    has one token, sets `reached` and holds the engine thread until `release` is set (at most 120 s, then it goes
    on). A test can then act while that request is certainly unfinished, however fast the machine is."""

    def __init__(self, llm_engine, marker: str = "HOLD_THE_ENGINE"):
        self.marker = marker
        self.reached = threading.Event()
        self.release = threading.Event()
        self._real = llm_engine.add_request
        llm_engine.add_request = self.add_request

    def reset(self) -> None:
        self.reached.clear()
        self.release.clear()

    def add_request(self, request_id, prompt, params=None, **kwargs):
        text = prompt.get("prompt") if isinstance(prompt, dict) else prompt
        if text and self.marker in text:
            params = params.clone()
            params.logits_processors = [*(params.logits_processors or []), self._hold]
        return self._real(request_id, prompt, params, **kwargs)

    def _hold(self, output_ids, logits):
        if len(output_ids) == 1:
            self.reached.set()
            self.release.wait(120)
        return logits


def wait_until(condition, timeout: float = 60.0, what: str = "the condition") -> None:
    """Polls condition() until it is true; fails (never hangs) after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


async def hang_up_when_held(request: asyncio.Task, held: threading.Event, engine, what: str) -> None:
    """Once the engine holds the request (held set), the client drops it (the task's connection closes);
    then waits, without blocking the event loop, until the server has aborted it (engine empty)."""
    assert await asyncio.to_thread(held.wait, 60)
    request.cancel()   # closes the connection
    try:
        await request
    except asyncio.CancelledError:
        pass
    else:
        raise AssertionError("the request finished before the client hung up")
    # The server saw the disconnect and aborted the request (it leaves the engine at the next step).
    await asyncio.to_thread(wait_until, lambda: engine.num_unfinished_requests() == 0, 60,
                            f"the server to abort the abandoned {what}")


class ServerProcess:
    """`pagedllm serve` as a real process on 127.0.0.1 (output to a file, so a full pipe never stalls it)."""

    def __init__(self, model_path: str, *args: str, log_path, start_timeout: float = 180.0):
        import os
        import subprocess
        import sys
        from pathlib import Path

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        python_dir = str(Path(__file__).resolve().parents[2] / "python")
        env = {**os.environ, "PYTHONPATH": python_dir + os.pathsep + os.environ.get("PYTHONPATH", "")}
        env.pop("PAGEDLLM_API_KEY", None)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pagedllm.entrypoints.cli", "serve", model_path, "--host", "127.0.0.1",
             "--port", str(self.port), "--served-model-name", "tiny", "--device", "cpu", *args],
            env=env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + start_timeout
        import httpx
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited at start-up:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"the server did not come up:\n{self.log()}")
            time.sleep(0.2)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self._log.close()
