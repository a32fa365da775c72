"""A tensor-parallel worker (ranks 1..N-1): joins the group, loads its shard through the same
ModelRunner.load as the driver, then runs whatever the driver broadcasts (allocate the KV cache, run a
step, ...) until told to stop. Its results are the collectives inside the model (the all-reduces and
the logits all-gather): a worker returns nothing to the driver. Used by the "mp" executor (as a
spawned process) and the "ray" executor (inside an actor)."""
from __future__ import annotations

import ctypes
import logging
import os
import signal

import torch

from pagedllm.distributed import parallel_state

logger = logging.getLogger(__name__)

SHUTDOWN = "shutdown"


def die_with_parent() -> None:
    """Linux: this process gets SIGKILL when its parent dies (no orphan worker if the driver is killed)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def cpu_threads(size: int) -> None:
    """The host's cores shared out between the ranks of this host."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))


def device_of(device: torch.device, rank: int) -> torch.device:
    return torch.device("cuda", rank) if device.type == "cuda" and device.index is None else device


def serve(rank: int, size: int, init_method: str, args, source, hf_config, dtype, device: torch.device) -> None:
    """The worker's whole life: join, load, obey, leave."""
    from pagedllm.engine.model_runner import ModelRunner

    if device.type == "cpu":
        cpu_threads(size)
    else:
        torch.cuda.set_device(device)
    parallel_state.init(rank, size, init_method, device)
    try:
        runner = ModelRunner.load(args, source, hf_config, dtype, device, rank, size)
        while True:
            method, call_args = parallel_state.broadcast_object()
            if method == SHUTDOWN:
                break
            getattr(runner, method)(*call_args)
    finally:
        parallel_state.destroy()


def mp_main(rank: int, size: int, init_method: str, args, source, hf_config, dtype, device) -> None:
    """The "mp" executor's process target (torch.multiprocessing spawn)."""
    die_with_parent()
    serve(rank, size, init_method, args, source, hf_config, dtype, device_of(device, rank))
