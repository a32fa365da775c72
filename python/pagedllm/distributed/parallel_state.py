"""This process's place in the tensor-parallel group and the collectives the sharded layers call.

One group of N ranks (torch.distributed: gloo on the CPU, NCCL on CUDA); rank 0 is the driver
(the engine's process), ranks 1..N-1 are workers. Control messages (each step's plain-data input)
always go over a gloo group, so they never need a device tensor. Size 1 (the default, no group):
every collective is the identity and nothing of torch.distributed is touched.
"""
from __future__ import annotations

import datetime
from typing import Any, Optional

import torch
import torch.distributed as dist

_rank, _size = 0, 1
_cpu_group: Optional[Any] = None  # gloo group for broadcast_object_list (the default group on the CPU)

# A collective waits at most this long for a peer: the backstop behind worker-death detection
# (a dead peer's closed socket normally fails the collective at once).
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)


def init(rank: int, size: int, init_method: str, device: torch.device) -> None:
    """Joins the group (every rank calls this with the same init_method and size)."""
    global _rank, _size, _cpu_group
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size,
                            timeout=COLLECTIVE_TIMEOUT)
    _rank, _size = rank, size
    _cpu_group = dist.new_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT) if backend == "nccl" else None


def destroy() -> None:
    global _rank, _size, _cpu_group
    if dist.is_initialized():
        dist.destroy_process_group()
    _rank, _size, _cpu_group = 0, 1, None


def tp_rank() -> int:
    return _rank


def tp_size() -> int:
    return _size


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum over the ranks, in place (the output of a row-parallel layer)."""
    if _size > 1:
        dist.all_reduce(x)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """[..., d] on each rank -> [..., size * d], rank order (the vocab shards of the logits)."""
    if _size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(_size)]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=-1)


def broadcast_object(obj: Any = None) -> Any:
    """Rank 0's obj on every rank (pickled over gloo)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_cpu_group)
    return box[0]


def min_over_ranks(value: int) -> int:
    """The smallest value any rank has (the KV blocks every rank can hold)."""
    if _size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=_cpu_group)
    return int(t.item())
