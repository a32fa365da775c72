"""Graceful shutdown of `pagedllm serve` (uvicorn underneath).

The first SIGTERM (or SIGINT): the listening socket closes (no new connections), requests still arriving on open
connections and /health answer 503, and the requests already running get a drain of --shutdown-drain-seconds to
finish. What is still running then is aborted: each stream ends with an error event and `data: [DONE]`, each
non-streaming request answers 503, and the process exits. A second signal exits at once.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from typing import Optional

import uvicorn

logger = logging.getLogger("pagedllm.server")

DEFAULT_DRAIN_SECONDS = 5.0
SHUTDOWN_MESSAGE = "The server is shutting down."


class ServerState:
    """What the request path needs to know about the server's life (set by DrainingServer)."""

    def __init__(self) -> None:
        self.draining = False


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine, state: ServerState,
                 drain_seconds: float = DEFAULT_DRAIN_SECONDS):
        if drain_seconds < 0:
            raise ValueError(f"--shutdown-drain-seconds must be >= 0, got {drain_seconds}")
        # uvicorn's own bound on waiting for connections: a backstop after our drain and abort.
        config.timeout_graceful_shutdown = int(drain_seconds) + 30
        super().__init__(config)
        self.engine = engine
        self.state = state
        self.drain_seconds = drain_seconds
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._drain_task: Optional[asyncio.Task] = None

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)

    def handle_exit(self, sig: int, frame) -> None:
        if self.state.draining:
            # A second signal: no more waiting. os._exit skips the interpreter's teardown, which would join
            # threads (a render in progress, the engine's step).
            logger.warning("second %s: exiting now", signal.Signals(sig).name)
            _kill_render_workers()
            os._exit(128 + sig)
        self.state.draining = True
        logger.info("%s: no new requests; %d running get %.1f s to finish", signal.Signals(sig).name,
                    self.engine.num_unfinished_requests(), self.drain_seconds)
        self.should_exit = True   # uvicorn closes the listening socket and waits for open connections
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.drain_seconds
        while self.engine.num_unfinished_requests() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = self.engine.num_unfinished_requests()
        if left:
            logger.warning("shutdown: aborting %d request(s) still running after the %.1f s drain", left,
                           self.drain_seconds)
        # Fails every request still in the engine (streams get an error event) and refuses new ones (503).
        self.engine.shutdown(timeout=0, reason=f"{SHUTDOWN_MESSAGE} The request was aborted.")
        _kill_render_workers()


def _kill_render_workers() -> None:
    from pagedllm.chat.render_pool import default_pool
    default_pool().close()
