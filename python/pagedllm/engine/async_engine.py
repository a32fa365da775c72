"""AsyncLLMEngine: one background thread runs LLMEngine.step() for every request (continuous batching);
asyncio callers stream cumulative RequestOutputs through per-request queues.

Threading model
- Only the engine thread touches the LLMEngine. Callers hand it work (add / abort) through a locked list
  and a condition variable; the thread wakes, applies the work, steps while requests are unfinished,
  and sleeps when idle.
- Outputs go back to the caller's event loop with loop.call_soon_threadsafe, one call per loop per step.
- Failures are per request: a ValueError from add_request (bad prompt / params) is raised by that request's
  generate() only; a failure inside a step that LLMEngine pins on one request (its logits processor, its
  sampling; engine/request_failures.py) is raised by that request's generate() only, taken from
  LLMEngine.pop_request_errors() after each step. An exception out of step() itself cannot be pinned on one
  request, so every request in the engine at that moment fails with it and is aborted (blocks freed);
  the loop itself keeps serving new requests either way.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncGenerator, Optional, Protocol

from pagedllm.config import AsyncEngineArgs, EngineArgs
from pagedllm.inputs import PromptType
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The engine already holds max_num_seqs + max_queue_size requests (the server answers 503)."""


class EngineDeadError(RuntimeError):
    """The engine was shut down."""


class StatObserver(Protocol):
    """Receives per-request timings from the engine thread (the server's Prometheus metrics)."""

    def on_first_token(self, ttft_s: float) -> None: ...

    def on_inter_token(self, itl_s: float) -> None: ...

    def on_finished(self, output: RequestOutput, e2e_s: float) -> None: ...


@dataclass(eq=False)   # hashed by identity
class _Stream:
    request_id: str
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    arrival: float = field(default_factory=time.monotonic)
    last_token_time: Optional[float] = None
    num_tokens: int = 0
    done: bool = False       # set on the engine thread once the last item was sent


_END = object()   # sentinel: the stream ends without a final output (abort)


class AsyncLLMEngine:
    def __init__(self, engine, *, max_queue_size: Optional[int] = None, start_engine_loop: bool = True):
        """engine: an LLMEngine. max_queue_size: how many requests may wait beyond the max_num_seqs that can
        run at once before generate() raises QueueFullError (None: unbounded)."""
        self.engine = engine
        self.max_queue_size = max_queue_size
        self.stat_observers: list[StatObserver] = []
        self._streams: dict[str, _Stream] = {}          # every request not yet finished (owned by callers' side)
        self._lock = threading.Condition()
        self._pending: list[tuple] = []                 # ("add", stream, prompt, params) | ("abort", request_id)
        self._stopped = False
        self._stop_reason = "The engine was shut down."
        self._thread: Optional[threading.Thread] = None
        self.snapshot = self._take_snapshot()
        if start_engine_loop:
            self.start()

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs, *, max_queue_size: Optional[int] = None,
                         start_engine_loop: bool = True) -> "AsyncLLMEngine":
        from pagedllm.engine.llm_engine import LLMEngine
        return cls(LLMEngine.from_engine_args(engine_args), max_queue_size=max_queue_size,
                   start_engine_loop=start_engine_loop)

    # -- the public API -------------------------------------------------------------------------
    def get_tokenizer(self):
        return self.engine.get_tokenizer()

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def get_default_sampling_params(self) -> SamplingParams:
        return self.engine.get_default_sampling_params()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopped

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="pagedllm-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0, reason: str = "The engine was shut down.") -> None:
        """Stop the engine thread; unfinished requests end with EngineDeadError(reason), new ones are refused
        with it. Waits up to timeout seconds for the thread (0: returns at once, the thread stops after its
        current step)."""
        with self._lock:
            self._stop_reason = reason
            self._stopped = True
            self._lock.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def num_unfinished_requests(self) -> int:
        return len(self._streams)

    async def generate(self, prompt: PromptType, sampling_params: Optional[SamplingParams],
                       request_id: str, **_ignored) -> AsyncGenerator[RequestOutput, None]:
        """Yields cumulative RequestOutputs of request_id; the last one has finished=True. Raises the
        request's own error (ValueError for a bad prompt or params). Leaving the loop early (break, task
        cancelled, client gone) aborts the request and frees its KV blocks."""
        stream = self._submit(prompt, sampling_params, request_id)
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self._abort_nowait(request_id)

    async def abort(self, request_id: str) -> None:
        """Abort a request: its generate() ends without a finished output, its blocks are freed."""
        self._abort_nowait(request_id)

    # -- hand-off to the engine thread ----------------------------------------------------------
    def _submit(self, prompt, params: Optional[SamplingParams], request_id: str) -> _Stream:
        if self._stopped:
            raise EngineDeadError(self._stop_reason)
        if request_id in self._streams:
            raise ValueError(f"Request id {request_id} already running.")
        if self.max_queue_size is not None:
            limit = self.engine.scheduler.max_num_seqs + self.max_queue_size
            if len(self._streams) >= limit:
                raise QueueFullError(f"The server is busy: {len(self._streams)} requests are queued or running "
                                     f"(limit {limit}). Retry later.")
        stream = _Stream(request_id, asyncio.get_running_loop())
        self._streams[request_id] = stream
        with self._lock:
            self._pending.append(("add", stream, prompt, params))
            self._lock.notify()
        return stream

    def _abort_nowait(self, request_id: str) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is None:
            return
        with self._lock:
            self._pending.append(("abort", request_id))
            self._lock.notify()
        # The caller stops listening; make sure a waiting generate() (explicit abort) wakes up.
        stream.queue.put_nowait(_END)

    # -- the engine thread ----------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        live: dict[str, _Stream] = {}     # requests inside the LLMEngine (engine-thread view)
        while True:
            with self._lock:
                while not self._pending and not engine.has_unfinished_requests() and not self._stopped:
                    self._lock.wait()
                pending, self._pending = self._pending, []
                stopped = self._stopped
            if stopped:
                self._fail_all(live, EngineDeadError(self._stop_reason))
                for op in pending:
                    if op[0] == "add":
                        self._deliver({op[1]: EngineDeadError(self._stop_reason)})
                self.snapshot = self._take_snapshot()
                return
            try:
                for op in pending:
                    self._apply(op, live)
                if engine.has_unfinished_requests():
                    self._step(live)
            except Exception as e:  # noqa: BLE001 - a bug here must not kill the loop either
                logger.exception("engine loop iteration failed; failing the %d requests in the engine", len(live))
                self._fail_all(live, e)
            self.snapshot = self._take_snapshot()

    def _apply(self, op: tuple, live: dict[str, _Stream]) -> None:
        if op[0] == "abort":
            rid = op[1]
            stream = live.pop(rid, None)
            if stream is not None:
                stream.done = True
            try:
                self.engine.abort_request(rid)
            except Exception:  # noqa: BLE001 - an abort must never stop the loop
                logger.exception("abort of request %s failed", rid)
            return
        _, stream, prompt, params = op
        if stream.done or self._streams.get(stream.request_id) is not stream:
            return  # aborted before it reached the engine
        try:
            self.engine.add_request(stream.request_id, prompt, params)
        except Exception as e:  # noqa: BLE001 - a bad request fails alone (ValueError for bad input)
            self._deliver({stream: e})
            return
        live[stream.request_id] = stream

    def _step(self, live: dict[str, _Stream]) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:  # noqa: BLE001 - no single request to blame: fail them all, keep looping
            logger.exception("engine step failed; failing the %d requests in the engine", len(live))
            self._fail_all(live, e)
            return
        now = time.monotonic()
        failed = self.engine.pop_request_errors()  # requests that failed alone (already aborted)
        items: dict[_Stream, Any] = {}
        for out in outputs:
            stream = live.get(out.request_id)
            if stream is None:
                continue
            if out.request_id in failed:
                continue
            self._observe(stream, out, now)
            items[stream] = out
            if out.finished:
                live.pop(out.request_id, None)
        for rid, exc in failed.items():
            stream = live.pop(rid, None)
            if stream is not None:
                items[stream] = exc
        self._deliver(items)

    def _fail_all(self, live: dict[str, _Stream], exc: BaseException) -> None:
        items = {}
        for rid, stream in list(live.items()):
            try:
                self.engine.abort_request(rid)
            except Exception:  # noqa: BLE001
                logger.exception("abort of request %s failed", rid)
            items[stream] = exc
        live.clear()
        self.engine.pop_request_errors()
        self._deliver(items)

    def _observe(self, stream: _Stream, out: RequestOutput, now: float) -> None:
        n = max((len(o.token_ids) for o in out.outputs), default=0)
        if n > stream.num_tokens:
            if stream.num_tokens == 0:
                for obs in self.stat_observers:
                    obs.on_first_token(now - stream.arrival)
            elif stream.last_token_time is not None:
                for obs in self.stat_observers:
                    obs.on_inter_token(now - stream.last_token_time)
            stream.num_tokens, stream.last_token_time = n, now
        out.metrics = {"arrival_time": stream.arrival, "last_token_time": stream.last_token_time}
        if out.finished:
            for obs in self.stat_observers:
                obs.on_finished(out, now - stream.arrival)

    def _deliver(self, items: dict) -> None:
        """Hand each stream its item on the stream's event loop (one call_soon_threadsafe per loop)."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for stream, item in items.items():
            if isinstance(item, BaseException) or getattr(item, "finished", False):
                stream.done = True
            by_loop.setdefault(stream.loop, []).append((stream, item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(self._put_batch, batch)
            except RuntimeError:  # the caller's loop is closed: nobody listens any more
                for stream, _ in batch:
                    if not stream.done:
                        with self._lock:
                            self._pending.append(("abort", stream.request_id))

    def _put_batch(self, batch: list) -> None:
        # Runs on the caller's event loop.
        for stream, item in batch:
            if self._streams.get(stream.request_id) is not stream:
                continue  # aborted meanwhile
            if stream.done and (isinstance(item, BaseException) or getattr(item, "finished", False)):
                del self._streams[stream.request_id]
            stream.queue.put_nowait(item)

    def _take_snapshot(self) -> dict:
        """Engine state for /metrics, computed on the engine thread (consistent, lock-free to read)."""
        e = self.engine
        sched, bm = e.scheduler, e.block_manager
        return {
            "num_requests_running": len({s.request.request_id for s in sched.running}),
            "num_requests_waiting": len({s.request.request_id for s in sched.waiting}),
            "num_requests_swapped": len({s.request.request_id for s in sched.swapped}),
            "num_unfinished_requests": e.get_num_unfinished_requests(),
            "kv_cache_usage": bm.usage,
            "num_used_blocks": bm.num_used_blocks,
            "num_free_blocks": bm.num_free_blocks,
            "num_blocks": bm.num_blocks,
            "num_preemptions": sched.num_preemptions,
            "prompt_tokens": e.stats["prompt_tokens"],
            "generation_tokens": e.stats["generation_tokens"],
            "spec_decode": e.stats["spec_decode"].as_dict() if "spec_decode" in e.stats else None,
        }


__all__ = ["AsyncLLMEngine", "AsyncEngineArgs", "QueueFullError", "EngineDeadError"]
