"""CUDA graphs for decode-only steps: the model forward of a batch of one-token decodes, captured
once per batch size at start-up and replayed on static input buffers (logits and sampling stay eager).

A decode batch of n sequences runs the graph of the smallest captured size bs >= n. Rows n..bs-1 are
padding: token 0 at position 0, slot -1 and sequence length 0. Both the CPU and the CUDA ops treat
slot -1 as "write nothing" (reshape_and_cache) and length 0 as "read no key, output zeros"
(paged_attention), so a padding row neither writes the KV cache nor reads it; its hidden state is
computed (row-wise ops) and dropped.

Capture safety of the decode forward (kernel path; every model of models/ is built from these):
- embedding, linears, activations, layer norms (plain torch), rms_norm / fused_add_rms_norm,
  rotary_embedding, reshape_and_cache: shapes come from the static buffers only; no host reads.
  rotary's cos_sin_cache is moved to the model's device and dtype on its first call, which the
  warm-up run before each capture makes.
- paged_attention (CUDA): the split-KV plan (partitions, grid, workspace size) is decided on the host
  from num_seqs and the block table WIDTH (max_blocks_per_seq * block_size), never from seq_lens
  values (csrc/cuda/attention_decode_kernels.cu, make_plan). The static block table is
  ceil(max_model_len / block_size) wide, so the captured plan covers every later replay; the kernel
  clamps lengths to that width and skips partitions past a sequence's end. Its fp32 workspace is
  allocated during capture from the graph pool (size from shapes only). The per-device kernel
  attributes and occupancy it queries are cached by the warm-up run, before capture.
- Attention's branches are on Python ints of the metadata (num_prefill_tokens 0, num_decodes bs),
  fixed per captured size.
- Not capturable: the plain-torch references (PAGEDLLM_NATIVE_OPS=1 / native_ops()): paged_attention_native
  reads seq_lens with .tolist() and reshape_and_cache_native masks by value. Graphs are neither captured
  nor replayed while native ops are on.
"""
from __future__ import annotations

import bisect
import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import torch

from pagedllm.layers.attention_metadata import AttentionMetadata, make_decode_metadata, set_attention_metadata
from pagedllm.models.utils import use_native_ops

logger = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, every multiple of 16 below max_num_seqs, and max_num_seqs itself: every decode batch
    of at most max_num_seqs sequences pads to the next size (fewer than 16 padding rows)."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be at least 1, got {max_num_seqs}")
    return [s for s in (1, 2, 4, 8, *range(16, max_num_seqs, 16)) if s < max_num_seqs] + [max_num_seqs]


class Graph(Protocol):
    def replay(self) -> torch.Tensor:
        """Runs the captured forward on the static buffers; returns its (static) output."""


class GraphBackend(Protocol):
    def capture(self, forward: Callable[[], torch.Tensor]) -> Graph:
        """forward() runs the model on the static buffers; capture it (after a warm-up run)."""


class CudaGraphBackend:
    """torch.cuda.CUDAGraph, all graphs in one memory pool: they never run concurrently and each
    replay's output is consumed (logits) before the next replay."""

    def __init__(self, device: torch.device):
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        self.device = device
        with torch.cuda.device(device):
            self.pool = torch.cuda.graph_pool_handle()

    def capture(self, forward: Callable[[], torch.Tensor]) -> Graph:
        with torch.cuda.device(self.device):
            forward()  # warm-up: lazy initialisation (cuBLAS, kernel attributes, caches) outside the capture
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                output = forward()
        return _CudaGraph(graph, output, self.device)


class _CudaGraph:
    def __init__(self, graph: "torch.cuda.CUDAGraph", output: torch.Tensor, device: torch.device):
        self.graph, self.output, self.device = graph, output, device

    def replay(self) -> torch.Tensor:
        with torch.cuda.device(self.device):
            self.graph.replay()
        return self.output


@dataclass
class DecodeBuffers:
    """The graphs' static inputs; the graph of size bs reads the first bs rows."""
    input_ids: torch.Tensor     # [max_bs] int64
    positions: torch.Tensor     # [max_bs] int64
    slot_mapping: torch.Tensor  # [max_bs] int64; -1: padding, nothing written
    seq_lens: torch.Tensor      # [max_bs] int32, including the new token; 0: padding, nothing read
    block_tables: torch.Tensor  # [max_bs, max_blocks_per_seq] int32

    @classmethod
    def allocate(cls, max_bs: int, max_blocks_per_seq: int, device: torch.device) -> "DecodeBuffers":
        i64, i32 = dict(dtype=torch.int64, device=device), dict(dtype=torch.int32, device=device)
        return cls(torch.zeros(max_bs, **i64), torch.zeros(max_bs, **i64), torch.full((max_bs,), -1, **i64),
                   torch.zeros(max_bs, **i32), torch.zeros(max_bs, max_blocks_per_seq, **i32))

    def metadata(self, bs: int) -> AttentionMetadata:
        """Views of the first bs rows; the block table keeps its full width (see the module docstring)."""
        return make_decode_metadata(self.slot_mapping[:bs], self.seq_lens[:bs], self.block_tables[:bs])

    def fill(self, input_ids: torch.Tensor, positions: torch.Tensor, md: AttentionMetadata, bs: int) -> None:
        """Copies the step's n = md.num_decodes rows in and makes rows n..bs-1 padding (a larger earlier
        batch may have left real slots and lengths there). Columns of a block-table row past the step's
        width, and the rows of padding, may hold stale block ids: no kernel reads them (a row reads only
        the blocks of its first seq_len tokens)."""
        n = md.num_decodes
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(md.slot_mapping)
        self.seq_lens[:n].copy_(md.decode_seq_lens)
        self.block_tables[:n, :md.decode_block_tables.shape[1]].copy_(md.decode_block_tables)
        if bs > n:
            self.input_ids[n:bs].zero_()
            self.positions[n:bs].zero_()
            self.slot_mapping[n:bs].fill_(-1)
            self.seq_lens[n:bs].zero_()


class DecodeGraphRunner:
    """Captures model(input_ids, positions) for decode batches of each size in `sizes` and replays the
    smallest one that holds a step's decodes. backend: CudaGraphBackend, or a test double."""

    def __init__(self, model: torch.nn.Module, sizes: list[int], max_blocks_per_seq: int, device: torch.device,
                 backend: GraphBackend):
        self.model = model
        self.sizes = sorted(set(sizes))
        self.max_batch = self.sizes[-1]
        self.max_blocks_per_seq = max_blocks_per_seq
        self.backend = backend
        self.buffers = DecodeBuffers.allocate(self.max_batch, max_blocks_per_seq, device)
        self.graphs: dict[int, Graph] = {}
        self.num_replays = 0
        self.capture_seconds = 0.0

    def capture(self) -> float:
        """Captures every size, largest first (the smaller graphs then fit in the memory the largest left
        in the shared pool), with the buffers holding padding only (no KV written). Returns seconds taken."""
        start = time.perf_counter()
        with torch.inference_mode():
            for bs in reversed(self.sizes):
                self.graphs[bs] = self.backend.capture(self._forward(bs))
        self.capture_seconds = time.perf_counter() - start
        return self.capture_seconds

    def _forward(self, bs: int) -> Callable[[], torch.Tensor]:
        md = self.buffers.metadata(bs)
        input_ids, positions = self.buffers.input_ids[:bs], self.buffers.positions[:bs]

        def forward() -> torch.Tensor:
            with set_attention_metadata(md):
                return self.model(input_ids, positions)
        return forward

    def padded_size(self, n: int) -> Optional[int]:
        i = bisect.bisect_left(self.sizes, n)
        return self.sizes[i] if i < len(self.sizes) else None

    def can_run(self, md: AttentionMetadata) -> bool:
        """A decode-only step that a captured size holds, with block tables no wider than the static one."""
        return (bool(self.graphs) and md.num_prefill_tokens == 0 and 0 < md.num_decodes <= self.max_batch
                and md.decode_block_tables.shape[1] <= self.max_blocks_per_seq and not use_native_ops())

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, md: AttentionMetadata) -> torch.Tensor:
        """hidden states [n, hidden] of the step's n decodes (a view of the graph's static output: use it
        before the next replay)."""
        bs = self.padded_size(md.num_decodes)
        self.buffers.fill(input_ids, positions, md, bs)
        self.num_replays += 1
        return self.graphs[bs].replay()[:md.num_decodes]
