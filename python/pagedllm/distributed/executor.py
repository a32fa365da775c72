"""How the driver reaches the model: one ModelRunner in this process (tensor_parallel_size 1), or this
process as rank 0 of a tensor-parallel group whose other ranks are worker processes ("mp": spawned on
this host, the default when N > 1) or Ray actors ("ray": ray_executor.py).

Every call the engine makes on the runner goes through `collective(method, *args)`: the driver
broadcasts (method, args) (plain data: a StepInput, a block count) over gloo, then runs the same call on
its own shard; the model's all-reduces keep the ranks in step and the LM head's all-gather gives rank 0
the whole logits, which it samples alone (engine/step_sampling.py). One scheduler and block manager,
in the driver.

A worker that dies (killed, out of memory, a crash) closes its gloo sockets, so the driver's next
collective fails at once (or its liveness check before the step sees the exit): the executor then
names the rank, stops the other workers and raises WorkerDiedError; nothing waits for a timeout.
"""
from __future__ import annotations

import abc
import logging
import socket
import threading
import time
import weakref
from typing import Optional

import torch

from pagedllm.distributed import parallel_state
from pagedllm.distributed.worker import SHUTDOWN, cpu_threads, device_of, mp_main

logger = logging.getLogger(__name__)

JOIN_SECONDS = 30  # a worker told to stop has this long to exit before it is killed


class TensorParallelError(RuntimeError):
    """The tensor-parallel group is broken (the workers were stopped): the engine cannot run another step."""


class WorkerDiedError(TensorParallelError):
    """A tensor-parallel worker is gone."""


class UniProcExecutor:
    """tensor_parallel_size 1: the runner lives in this process."""

    def __init__(self, runner):
        self.runner = runner

    def collective(self, method: str, *args):
        return getattr(self.runner, method)(*args)

    def execute_model(self, step):
        return self.runner.run(step)

    def execute_decode_steps(self, step, num_steps: int, sampling):
        """Multi-step decoding (engine/multi_step.py): here only (tensor_parallel_size 1)."""
        return self.runner.run_decode_steps(step, num_steps, sampling)

    def shutdown(self) -> None:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


_active: Optional["weakref.ref"] = None  # the process's one tensor-parallel group (torch.distributed is global)


def _close_group(stop, handles: dict) -> None:
    """Tells live workers to stop (when handles["graceful"]), ends them (stop: the subclass's join /
    kill) and leaves the group. A function of plain handles, so it can run as self's finalizer."""
    if handles["graceful"] and parallel_state.tp_size() > 1:
        try:
            parallel_state.broadcast_object((SHUTDOWN, ()))
        except Exception:  # noqa: BLE001 - a worker died meanwhile: it is killed below
            handles["graceful"] = False
    try:
        stop(handles)
    finally:
        parallel_state.destroy()


class TensorParallelExecutor(abc.ABC):
    """Rank 0 of a tensor-parallel group; subclasses start and watch the workers."""

    backend = ""

    def __init__(self, args, source, hf_config, dtype, device: torch.device):
        from pagedllm.distributed.shard import check_divisible
        from pagedllm.engine.model_runner import ModelRunner

        global _active
        size = args.tensor_parallel_size
        check_divisible(hf_config, size)
        if device.type == "cuda" and size > torch.cuda.device_count() and self.backend == "mp":
            raise ValueError(f"tensor_parallel_size ({size}) is larger than the number of available GPUs "
                             f"({torch.cuda.device_count()}).")
        if _active is not None and _active() is not None and not _active().closed:
            raise RuntimeError("A tensor-parallel engine is already running in this process; shut it down "
                               "(LLMEngine.shutdown(), or delete the LLM) before starting another.")
        self.size = size
        self.closed = False
        self.dead: Optional[str] = None
        init_method = f"tcp://{self._host()}:{free_port()}"
        self._handles = {"graceful": True}
        self._start_workers(init_method, args, source, hf_config, dtype, device)
        self._finalizer = weakref.finalize(self, _close_group, self._stop, self._handles)
        try:
            self._join(init_method, device_of(device, 0))
            if device.type == "cpu":
                cpu_threads(size)
            self.runner = ModelRunner.load(args, source, hf_config, dtype, device_of(device, 0), 0, size)
        except BaseException:
            self.shutdown()
            raise
        _active = weakref.ref(self)

    # -- subclasses ------------------------------------------------------------------------------
    def _host(self) -> str:
        return "127.0.0.1"

    @abc.abstractmethod
    def _start_workers(self, init_method, args, source, hf_config, dtype, device) -> None:
        """Starts ranks 1..N-1; puts what _stop needs into self._handles (never self: a finalizer uses it)."""

    @abc.abstractmethod
    def _dead_worker(self) -> Optional[str]:
        """'rank R (...) ...' for a worker that has exited, else None."""

    @staticmethod
    @abc.abstractmethod
    def _stop(handles: dict) -> None:
        """Waits up to JOIN_SECONDS for the workers to exit (none when not handles["graceful"]), then kills."""

    # -- the group -------------------------------------------------------------------------------
    def _join(self, init_method: str, device: torch.device) -> None:
        """Joins the group; a worker that dies before joining fails this at once, not after a timeout."""
        failure: list[BaseException] = []

        def join():
            try:
                parallel_state.init(0, self.size, init_method, device)
            except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
                failure.append(e)

        t = threading.Thread(target=join, name="pagedllm-tp-join", daemon=True)
        t.start()
        while t.is_alive():
            t.join(0.1)
            dead = self._dead_worker()
            if dead is not None and t.is_alive():
                self.dead = dead
                raise WorkerDiedError(f"Tensor-parallel worker {dead} before joining the group")
        if failure:
            raise failure[0]

    def collective(self, method: str, *args):
        """(method, args) to every worker, then the same call here; its result (rank 0's)."""
        if self.closed:
            if self.dead is not None:
                raise WorkerDiedError(f"Tensor-parallel worker {self.dead}")
            raise TensorParallelError("The tensor-parallel executor was shut down")
        dead = self._dead_worker()
        try:
            if dead is None:
                parallel_state.broadcast_object((method, args))
                return getattr(self.runner, method)(*args)
        except Exception as e:
            dead = self._wait_for_death()
            if dead is None:
                # Rank 0 failed alone, maybe between two collectives of the forward: the workers may be waiting
                # in one that will never come, so the group cannot be trusted with another step.
                logger.error("tensor-parallel rank 0 failed in %s: stopping the workers", method)
                self.shutdown(graceful=False)
                raise TensorParallelError(f"Tensor-parallel rank 0 failed in {method} ({type(e).__name__}: {e}); "
                                          "the workers were stopped") from e
            self._died(dead)
            raise WorkerDiedError(f"Tensor-parallel worker {dead}; the other workers were stopped") from e
        self._died(dead)
        raise WorkerDiedError(f"Tensor-parallel worker {dead}; the other workers were stopped")

    def execute_model(self, step):
        return self.collective("run", step)

    def _wait_for_death(self, seconds: float = 10.0) -> Optional[str]:
        """After a failed collective: which worker exited (a killed peer may take a moment to be reaped)."""
        deadline = time.monotonic() + seconds
        while True:
            dead = self._dead_worker()
            if dead is not None or time.monotonic() > deadline:
                return dead
            time.sleep(0.05)

    def _died(self, dead: str) -> None:
        self.dead = dead
        logger.error("tensor-parallel worker %s: stopping the others", dead)
        self.shutdown(graceful=False)

    def shutdown(self, graceful: bool = True) -> None:
        """Stops every worker (told to stop first when they are all alive, then killed after
        JOIN_SECONDS) and leaves the group. Idempotent; also run at garbage collection / exit."""
        if self.closed:
            return
        self.closed = True
        self._handles["graceful"] = graceful and self.dead is None and self._dead_worker() is None
        self._finalizer()


class MultiprocExecutor(TensorParallelExecutor):
    """Workers as processes on this host (torch.multiprocessing, spawn)."""

    backend = "mp"

    def _start_workers(self, init_method, args, source, hf_config, dtype, device) -> None:
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.procs = self._handles["procs"] = []
        for rank in range(1, self.size):
            p = ctx.Process(target=mp_main, args=(rank, self.size, init_method, args, source, hf_config, dtype,
                                                  device),
                            name=f"pagedllm-tp-worker-{rank}", daemon=True)
            p.start()
            self.procs.append(p)

    def _dead_worker(self) -> Optional[str]:
        for rank, p in enumerate(self.procs, start=1):
            if p.exitcode is not None:
                return f"rank {rank} (pid {p.pid}) died with exit code {p.exitcode}"
        return None

    @staticmethod
    def _stop(handles: dict) -> None:
        procs = handles.get("procs", [])
        deadline = time.monotonic() + (JOIN_SECONDS if handles["graceful"] else 0)
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.exitcode is None:
                p.kill()
                p.join()


def make_executor(args, source, hf_config, dtype, device: torch.device):
    """The executor for args.tensor_parallel_size and args.distributed_executor_backend."""
    from pagedllm.engine.model_runner import ModelRunner

    if args.tensor_parallel_size == 1:
        return UniProcExecutor(ModelRunner.load(args, source, hf_config, dtype, device))
    backend = args.distributed_executor_backend or "mp"
    if backend == "ray":
        from pagedllm.distributed.ray_executor import RayExecutor
        return RayExecutor(args, source, hf_config, dtype, device)
    return MultiprocExecutor(args, source, hf_config, dtype, device)
