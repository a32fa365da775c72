"""How many bytes of GPU memory the KV cache may take, from one profiling prefill (the arithmetic only;
ModelRunner.profile_num_blocks measures). vLLM's rule: the engine may use gpu_memory_utilization x the
device's total memory, and everything that is not KV cache comes out of that share first."""
from __future__ import annotations

from dataclasses import dataclass

_GiB = 1 << 30


@dataclass
class MemoryProfile:
    total: int            # the device's memory
    in_use: int           # total - free once the profile step and its cache are freed: weights, CUDA context,
                          # cuBLAS / cuDNN workspaces, other processes on the device
    step_peak: int        # torch's peak above the weights during a full-budget step (the profile cache excluded)
    forward_peak: int     # the same for the model forward alone (no logits): what a graph's pool holds
    profiled_tokens: int  # tokens of that step

    def graph_pool(self, max_num_seqs: int) -> int:
        """The decode graphs share one pool, captured largest first: about the forward's activations at
        max_num_seqs tokens (activations grow linearly with the tokens of a step); 0 without graphs."""
        if max_num_seqs <= 0 or self.profiled_tokens <= 0:
            return 0
        return int(self.forward_peak * min(1.0, max_num_seqs / self.profiled_tokens))

    def describe(self, gpu_memory_utilization: float, max_num_seqs: int) -> str:
        return (f"{gpu_memory_utilization:.2f} x {self.total / _GiB:.2f} GiB, minus {self.in_use / _GiB:.2f} GiB "
                f"in use, {self.step_peak / _GiB:.2f} GiB step peak, {self.graph_pool(max_num_seqs) / _GiB:.2f} GiB "
                "graph pool")


def kv_cache_bytes(profile: MemoryProfile, gpu_memory_utilization: float, max_num_seqs: int = 0) -> int:
    """Bytes left for the KV cache (may be <= 0: then nothing fits). max_num_seqs: the largest captured
    decode graph (0 when graphs are off)."""
    return int(profile.total * gpu_memory_utilization) - profile.in_use - profile.step_peak \
        - profile.graph_pool(max_num_seqs)
