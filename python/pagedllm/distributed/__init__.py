"""Tensor parallelism: the process group (parallel_state.py), weight sharding (shard.py), the worker
processes and how the driver drives them (executor.py, worker.py, ray_executor.py)."""
