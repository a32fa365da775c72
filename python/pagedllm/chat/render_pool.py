"""Chat templates render in worker processes (render_worker.py) under hard limits: a time budget (the worker is
killed at the deadline), an address-space cap (RLIMIT_AS in the worker) and an output-size budget (checked while
rendering). A thread cannot be stopped from outside and the sandbox cannot interrupt a single long C call
(str.center(10**9), a loop over 10**10 items): a process can be killed, so the limits really hold, for every
template, and the calling process (the server's event loop, /health, other requests, SIGTERM) never waits on one.

RenderPool.render is blocking and thread-safe: the server calls it from a thread, LLM.chat directly. Idle workers
are kept (their compiled-template caches warm) up to max_idle; a killed or failed worker is replaced by a fresh one.
"""
from __future__ import annotations

import atexit
import json
import os
import pickle
import select
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Optional

from pagedllm.chat.sandbox import DEFAULT_MAX_OUTPUT_CHARS, TemplateFailure

_HEADER = struct.Struct("<Q")
_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "render_worker.py")
_START_TIMEOUT_S = 120.0   # a worker's start-up (python + jinja2) is not part of any render budget


@dataclass(frozen=True)
class RenderLimits:
    """What one render may use. timeout_s: wall-clock seconds from the job's hand-over to the reply;
    max_output_chars: characters of rendered text; max_memory_bytes: the worker's address space (0: no cap)."""
    timeout_s: float = 10.0
    max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS
    max_memory_bytes: int = 1 << 30

    def __post_init__(self):
        if not self.timeout_s > 0:
            raise ValueError(f"the chat template time limit must be positive, got {self.timeout_s}")
        if self.max_output_chars < 1:
            raise ValueError(f"the chat template output limit must be at least 1, got {self.max_output_chars}")


class RenderWorkerError(RuntimeError):
    """A worker could not be started or spoke out of protocol (not the template's fault)."""


class _Worker:
    def __init__(self, memory: int):
        self.memory = memory
        self.proc = subprocess.Popen([sys.executable, _WORKER, str(memory)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, close_fds=True,
                                     start_new_session=True)   # the server's SIGINT / SIGTERM are not its
        try:
            ready = self._receive(time.monotonic() + _START_TIMEOUT_S)
        except (TimeoutError, EOFError):
            self.kill()
            raise RenderWorkerError("the chat template render worker did not start") from None
        if ready != b"ready":
            self.kill()
            raise RenderWorkerError("the chat template render worker did not start")

    def _receive(self, deadline: float) -> bytes:
        fd = self.proc.stdout.fileno()
        header = self._read(fd, _HEADER.size, deadline)
        (size,) = _HEADER.unpack(header)
        return self._read(fd, size, deadline)

    @staticmethod
    def _read(fd: int, n: int, deadline: float) -> bytes:
        data = bytearray()
        while len(data) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, min(n - len(data), 1 << 20))
            if not chunk:
                raise EOFError
            data += chunk
        return bytes(data)

    def call(self, job: bytes, timeout_s: float) -> dict:
        """The worker's reply; TimeoutError (the worker is then killed) or EOFError (it died)."""
        try:
            self.proc.stdin.write(_HEADER.pack(len(job)) + job)
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise EOFError from None
        try:
            payload = self._receive(time.monotonic() + timeout_s)
        except TimeoutError:
            self.kill()
            raise
        try:
            return json.loads(payload.decode("utf-8", "surrogatepass"))
        except ValueError:
            self.kill()
            raise RenderWorkerError("the chat template render worker answered out of protocol") from None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


class RenderPool:
    def __init__(self, max_workers: int = 4, max_idle: int = 2):
        self.max_workers = max_workers
        self.max_idle = max_idle
        self._idle: list[_Worker] = []
        self._running: set[_Worker] = set()   # handed out to a render
        self._busy = 0
        self._closed = False
        self._cond = threading.Condition()
        self._pid = os.getpid()   # a forked child must not kill its parent's workers (inherited atexit)

    def render(self, template: str, variables: dict, limits: Optional[RenderLimits] = None) -> str:
        """The rendered text. TemplateFailure for the template's own problems (syntax, sandbox, errors, a
        limit reached: kind "timeout", "memory", "output_limit")."""
        limits = limits or _default_limits
        job = pickle.dumps({"template": template, "variables": variables,
                            "max_output_chars": limits.max_output_chars, "timeout_s": limits.timeout_s},
                           protocol=pickle.HIGHEST_PROTOCOL)
        worker = self._acquire(limits)
        try:
            reply = worker.call(job, limits.timeout_s)
            if reply.get("kind") == "memory":
                worker.kill()   # it may be fragmented near its cap: the next render gets a fresh one
        except TimeoutError:
            raise TemplateFailure("timeout", "The chat template took longer than the limit of "
                                             f"{limits.timeout_s:g} seconds to render.") from None
        except EOFError:
            worker.kill()
            if self._closed:
                raise RenderWorkerError("the chat template renderer is shut down") from None
            raise TemplateFailure("memory", _memory_message(limits)) from None
        finally:
            self._release(worker)
        if "text" in reply:
            return reply["text"]
        if reply.get("kind") == "memory":
            raise TemplateFailure("memory", _memory_message(limits))
        raise TemplateFailure(str(reply.get("kind")), str(reply.get("message")))

    def _acquire(self, limits: RenderLimits) -> _Worker:
        deadline = time.monotonic() + limits.timeout_s + _START_TIMEOUT_S
        with self._cond:
            while True:
                if self._closed:
                    raise RenderWorkerError("the chat template renderer is shut down")
                for w in [w for w in self._idle if not w.alive()]:
                    self._idle.remove(w)
                    w.kill()
                for i, w in enumerate(self._idle):
                    if w.memory == limits.max_memory_bytes and w.alive():
                        self._busy += 1
                        self._running.add(w)
                        return self._idle.pop(i)
                if self._busy + len(self._idle) < self.max_workers or self._idle:
                    if self._busy + len(self._idle) >= self.max_workers:
                        self._idle.pop(0).kill()   # an idle worker with other limits makes room
                    self._busy += 1
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TemplateFailure("timeout", "Every chat template render worker stayed busy for longer than "
                                                     f"the limit of {limits.timeout_s:g} seconds.")
                self._cond.wait(left)
        try:
            worker = _Worker(limits.max_memory_bytes)
        except BaseException:
            with self._cond:
                self._busy -= 1
                self._cond.notify()
            raise
        with self._cond:
            self._running.add(worker)
            closed = self._closed
        if closed:
            worker.kill()
        return worker

    def _release(self, worker: _Worker) -> None:
        with self._cond:
            self._busy -= 1
            self._running.discard(worker)
            keep = worker.alive() and not self._closed and len(self._idle) < self.max_idle
            if keep:
                self._idle.append(worker)
            self._cond.notify()
        if not keep:
            worker.kill()

    def close(self) -> None:
        """Kill every worker (a render in progress then fails); later renders are refused."""
        if os.getpid() != self._pid:
            return
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            running = list(self._running)
            self._cond.notify_all()
        for w in idle:
            w.kill()
        for w in running:
            if w.alive():
                w.proc.kill()   # the render's own thread reaps it

    def num_workers(self) -> int:
        with self._cond:
            return self._busy + len(self._idle)


def _memory_message(limits: RenderLimits) -> str:
    return ("The chat template needed more memory than the limit of "
            f"{limits.max_memory_bytes >> 20} MiB to render (or its render worker crashed).")


_default_pool: Optional[RenderPool] = None
_default_limits = RenderLimits()


def set_default_limits(limits: RenderLimits) -> None:
    """The limits of every render that names none (`pagedllm serve` sets its options here, so that every chat
    render in the server process honours them)."""
    global _default_limits
    _default_limits = limits
_default_lock = threading.Lock()


_default_pid: Optional[int] = None


def default_pool() -> RenderPool:
    """The process-wide pool (LLM.chat and the server share it). A forked child gets a pool of its own: the
    workers it inherited talk to its parent."""
    global _default_pool, _default_pid
    with _default_lock:
        if _default_pool is None or _default_pid != os.getpid():
            _default_pool, _default_pid = RenderPool(), os.getpid()
            atexit.register(_default_pool.close)
        return _default_pool
