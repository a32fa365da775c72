"""The "ray" executor: ranks 1..N-1 as Ray actors in one placement group (one bundle each: a CPU on
a CPU model, a GPU on CUDA), on this node or across a Ray cluster; the driver stays rank 0. Imported
only when distributed_executor_backend="ray" is chosen: the core never imports ray otherwise.

The actors run worker.serve, the same loop as the "mp" processes: the group's collectives carry the
work, Ray only places, starts and reaps them. A dead actor shows as a finished run() ref holding a
RayActorError, which is how the driver names the rank."""
from __future__ import annotations

import logging
import time
from typing import Optional

from pagedllm.distributed.executor import JOIN_SECONDS, TensorParallelExecutor

logger = logging.getLogger(__name__)

PLACEMENT_SECONDS = 120  # the placement group must be placeable within this (else: not enough resources)


def _import_ray():
    try:
        import ray
    except ImportError as e:
        raise ValueError(f"Failed to import Ray: {e}. Please install Ray with `pip install ray` "
                         "(or `pip install pagedllm[ray]`) to use distributed_executor_backend=\"ray\".") from e
    return ray


class _RayWorker:
    """The actor: one tensor-parallel rank (worker.serve) in a Ray worker process."""

    def run(self, rank, size, init_method, args, source, hf_config, dtype, device) -> None:
        from pagedllm.distributed.worker import serve

        # On CUDA Ray gives each actor one visible GPU: it is cuda:0 inside the actor.
        local = device if device.type == "cpu" else type(device)("cuda", 0)
        serve(rank, size, init_method, args, source, hf_config, dtype, local)


class RayExecutor(TensorParallelExecutor):
    backend = "ray"

    def _host(self) -> str:
        ray = _import_ray()
        if not ray.is_initialized():
            ray.init(ignore_reinit_error=True)  # a cluster named by RAY_ADDRESS, else a local instance
        return ray.util.get_node_ip_address()

    def _start_workers(self, init_method, args, source, hf_config, dtype, device) -> None:
        ray = _import_ray()
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        resource = {"GPU": 1} if device.type == "cuda" else {"CPU": 1}
        pg = placement_group([dict(resource) for _ in range(1, self.size)], strategy="PACK")
        self._handles.update(ray=ray, pg=pg, actors=[], refs=[])
        ready, _ = ray.wait([pg.ready()], timeout=PLACEMENT_SECONDS)
        if not ready:
            raise ValueError(f"The Ray cluster cannot place {self.size - 1} tensor-parallel workers of {resource} "
                             f"each within {PLACEMENT_SECONDS} s (available: {ray.available_resources()}).")
        actor_cls = ray.remote(num_cpus=resource.get("CPU", 0), num_gpus=resource.get("GPU", 0))(_RayWorker)
        for rank in range(1, self.size):
            actor = actor_cls.options(
                name=None, max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=pg,
                                                                     placement_group_bundle_index=rank - 1),
            ).remote()
            self._handles["actors"].append(actor)
            self._handles["refs"].append(actor.run.remote(rank, self.size, init_method, args, source, hf_config,
                                                          dtype, device))

    def _dead_worker(self) -> Optional[str]:
        ray = self._handles["ray"]
        refs = self._handles["refs"]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in done:
            rank = refs.index(ref) + 1
            try:
                ray.get(ref)
            except Exception as e:  # noqa: BLE001 - its death is what is reported
                return f"rank {rank} (Ray actor) died: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
            return f"rank {rank} (Ray actor) exited"
        return None

    @staticmethod
    def _stop(handles: dict) -> None:
        ray = handles.get("ray")
        if ray is None:
            return
        refs = handles.get("refs", [])
        if refs and handles["graceful"]:
            ray.wait(refs, num_returns=len(refs), timeout=JOIN_SECONDS)
        for actor in handles.get("actors", []):
            ray.kill(actor, no_restart=True)
        if handles.get("pg") is not None:
            from ray.util.placement_group import remove_placement_group
            remove_placement_group(handles["pg"])
        deadline = time.monotonic() + JOIN_SECONDS  # the actors' processes are reaped by Ray: wait for it
        while refs and time.monotonic() < deadline:
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=1)
            if len(done) == len(refs):
                break
