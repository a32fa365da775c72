"""The model runner: everything device-specific of one rank. It loads (and, under tensor parallelism,
shards) the model, packs the CPU decode weights, builds the CPU fused-layer op, sizes and allocates
the paged KV cache, captures the decode graphs, and runs one step: a StepInput (engine/runner_io.py:
plain arrays) in, the logits of the rows asked for out. No tokenizer, no request objects: sampling and
logprob text are the driver's (engine/step_sampling.py)."""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Optional

import numpy as np
import torch

from pagedllm import huge_pages
from pagedllm.engine.cuda_graph import CudaGraphBackend, DecodeGraphRunner, GraphBackend, capture_sizes
from pagedllm.distributed import parallel_state
from pagedllm.engine.cpu_malloc import keep_freed_memory
from pagedllm.engine.kv_cache_budget import MemoryProfile, kv_cache_bytes
from pagedllm.engine.runner_io import StepInput, build_step_input
from pagedllm.engine.scheduler import SchedulerOutput
from pagedllm.engine.swap_space import HostSwapSpace
from pagedllm.layers.attention_metadata import (AttentionMetadata, make_decode_metadata, make_prefill_metadata,
                                                set_attention_metadata)
from pagedllm.layers.linear import pack_linear_weights
from pagedllm.layers.sampler import Sampler, SamplingTensors
from pagedllm.models import cpu_decoder_layers
from pagedllm.models.utils import use_native_ops

_GiB = 1 << 30
logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, model: torch.nn.Module, hf_config, device: torch.device, dtype: torch.dtype,
                 block_size: int, fused_layers: bool = True):
        """fused_layers: give a CPU float32 Llama-family model the one-op decoder layers
        (models/cpu_decoder_layers.py). Off under tensor parallelism: the op runs every layer in one
        call, with no room for the all-reduce each row-parallel layer needs, so the shards take the
        module loop (whose linears still use the packed / GGUF-code kernels on their shards)."""
        self.model = model
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        if fused_layers:
            cpu_decoder_layers.install(model)
        attn = model.attention_layers()
        self.attn_layers = attn
        self.num_layers = len(attn)
        self.num_kv_heads = attn[0].num_kv_heads
        self.head_size = attn[0].head_size
        self.key_cache: Optional[torch.Tensor] = None      # [layers, blocks, kv_heads, block_size, head]
        self.value_cache: Optional[torch.Tensor] = None
        self.swap: Optional[HostSwapSpace] = None  # host blocks of swapped-out sequences (allocate_swap_space)
        self.graphs: Optional[DecodeGraphRunner] = None  # decode-step CUDA graphs (capture_decode_graphs)

    @classmethod
    def load(cls, args, source, hf_config, dtype: torch.dtype, device: torch.device, rank: int = 0,
             size: int = 1) -> "ModelRunner":
        """Builds this rank's runner: the model loaded (or dummy weights), its rank's shard kept
        (distributed/shard.py), the CPU decode weights packed."""
        from pagedllm.distributed.shard import shard_model
        from pagedllm.models import loader

        if args.load_format == "dummy":
            model = loader.build_model(hf_config, dtype, device)
            with torch.no_grad():  # vLLM's range: small uniform weights, for throughput runs without a checkpoint
                for p in model.parameters():
                    p.uniform_(-1e-3, 1e-3)
        else:
            model = loader.load_model(source, hf_config, dtype, device)
        weights_dtype = loader.resolve_dtype(args.dtype, hf_config, device)
        if weights_dtype != dtype:  # a 16-bit dtype computed in fp32 on a CPU without its hardware (cpu_features.py)
            loader.round_weights(model, weights_dtype)
        shard_model(model, rank, size)
        if device.type == "cpu":
            keep_freed_memory()  # glibc: no page faults on every step's activations (cpu_malloc.py)
        int8 = args.quantization == "gguf_int8"
        if int8 and device.type != "cpu":
            raise ValueError("quantization='gguf_int8' runs on the CPU only (device='cpu').")
        packed = pack_linear_weights(model, int8)  # CPU fp32: packed weights (or their exact GGUF codes)
        if int8 and not any(getattr(m, "packed", None) is not None and m.packed.int8 for m in model.modules()):
            raise ValueError("quantization='gguf_int8' needs GGUF weights (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K or Q6_K "
                             "blocks) loaded as float32; no linear weight of this model is made of them.")
        if packed:
            logger.info("Packed %.0f MiB of linear weights for the CPU decode kernels", packed / (1 << 20))
        return cls(model, hf_config, device, dtype, args.block_size, fused_layers=size == 1)

    # -- the KV cache ---------------------------------------------------------------------------
    @property
    def bytes_per_block(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.block_size * self.head_size * elem

    def profile_num_blocks(self, gpu_memory_utilization: float, max_num_batched_tokens: int,
                           max_model_len: int, max_num_seqs: int = 0) -> int:
        """GPU: the KV blocks that fit in utilization x total memory once everything else is counted:
        memory in use on the device after a profiling prefill (weights, the CUDA context and library
        workspaces, other processes), that prefill's activation peak (a full-budget step as sequences no
        longer than max_model_len) and, when decode graphs will be captured (max_num_seqs > 0), their
        memory pool (kv_cache_budget.py). The profiling cache is released before memory is measured."""
        dev = self.device
        torch.cuda.empty_cache()
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        full, rest = divmod(max_num_batched_tokens, max_model_len)
        lens = [max_model_len] * full + ([rest] if rest else [])
        needed = sum(-(-n // self.block_size) for n in lens)
        self.allocate_kv_cache(needed)
        profile_kv = needed * self.bytes_per_block
        md = make_prefill_metadata(lens, self.block_size, dev)
        ids = torch.zeros(max_num_batched_tokens, dtype=torch.long, device=dev)
        positions = torch.cat([torch.arange(n, device=dev) for n in lens])
        with torch.inference_mode(), set_attention_metadata(md):
            hidden = self.model(ids, positions)
            torch.cuda.synchronize(dev)
            forward_peak = torch.cuda.max_memory_allocated(dev) - base - profile_kv
            self.model.compute_logits(hidden[-min(256, len(hidden)):])
        torch.cuda.synchronize(dev)
        step_peak = torch.cuda.max_memory_allocated(dev) - base - profile_kv
        del hidden, md, ids, positions
        self.release_kv_cache()  # every view of the profiling cache, or empty_cache() could not free it
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(dev)
        profile = MemoryProfile(total=total, in_use=total - free, step_peak=step_peak, forward_peak=forward_peak,
                                profiled_tokens=max_num_batched_tokens)
        kv_bytes = kv_cache_bytes(profile, gpu_memory_utilization, max_num_seqs)
        logger.info("KV cache budget: %.2f GiB (%s)", kv_bytes / _GiB, profile.describe(gpu_memory_utilization,
                                                                                        max_num_seqs))
        return parallel_state.min_over_ranks(max(kv_bytes // self.bytes_per_block, 0))

    def cpu_num_blocks(self, kv_cache_space_gib: float) -> int:
        return int(kv_cache_space_gib * _GiB // self.bytes_per_block)

    def release_kv_cache(self) -> None:
        """Drops the cache, every layer's view of it and the decode graphs that hold its address."""
        self.graphs = None
        cpu_decoder_layers.release(self.model)
        for layer in self.attn_layers:
            layer.kv_cache = None
        self.key_cache = self.value_cache = None

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.release_kv_cache()  # the old cache is freed before the new one is allocated
        shape = (self.num_layers, num_blocks, self.num_kv_heads, self.block_size, self.head_size)
        if self.device.type == "cpu":  # decode attention reads scattered blocks: huge pages spare the page walks
            self.key_cache = huge_pages.empty_tensor(shape, self.dtype)
            self.value_cache = huge_pages.empty_tensor(shape, self.dtype)
            # The blocks handed out first, faulted in now rather than by the first requests (huge_pages.py).
            first = huge_pages.prefault_count(num_blocks, 2 * self.key_cache[:, 0].nbytes)
            self.key_cache[:, :first].zero_()
            self.value_cache[:, :first].zero_()
        else:
            self.key_cache = torch.empty(shape, dtype=self.dtype, device=self.device)
            self.value_cache = torch.empty(shape, dtype=self.dtype, device=self.device)
        for i, layer in enumerate(self.attn_layers):
            layer.kv_cache = (self.key_cache[i], self.value_cache[i])

    def capture_decode_graphs(self, max_num_seqs: int, max_model_len: int,
                              backend: Optional[GraphBackend] = None) -> None:
        """Captures the decode forward for the batch sizes of capture_sizes(max_num_seqs), after the KV
        cache is allocated (the graphs hold its address). Without a backend: CUDA graphs on a CUDA
        device, nothing elsewhere (the CPU never captures)."""
        if self.key_cache is None:
            raise RuntimeError("capture_decode_graphs runs after allocate_kv_cache")
        if backend is None:
            if self.device.type != "cuda":
                return
            if use_native_ops():
                logger.info("CUDA graphs off: the plain-torch ops (PAGEDLLM_NATIVE_OPS) cannot be captured")
                return
            backend = CudaGraphBackend(self.device)
        sizes = capture_sizes(max_num_seqs)
        runner = DecodeGraphRunner(self.model, sizes, -(-max_model_len // self.block_size), self.device, backend)
        try:
            seconds = runner.capture()
        except Exception as e:
            raise RuntimeError("capturing the decode CUDA graphs failed (enforce_eager=True runs without "
                               f"them): {e}") from e
        self.graphs = runner
        logger.info("captured decode graphs for %d batch sizes (%d..%d) in %.2f s", len(sizes), sizes[0],
                    sizes[-1], seconds)

    def allocate_swap_space(self, num_blocks: int) -> None:
        """The host pool swapped-out blocks go to (swap_space.py), allocated once; none for 0 blocks."""
        block_shape = (self.num_layers, self.num_kv_heads, self.block_size, self.head_size)
        self.swap = HostSwapSpace(num_blocks, block_shape, self.dtype, self.device) if num_blocks > 0 else None

    @property
    def host_kv(self) -> dict[int, list[tuple[int, int]]]:
        """Swapped-out sequences: seq_id -> its runs of host blocks."""
        return self.swap.held if self.swap is not None else {}

    def move_blocks(self, block_copies, swap_out=(), swap_in=()) -> None:
        """Swap-outs first (their blocks may be reused this very step), then copy-on-write, then swap-ins."""
        caches = (self.key_cache, self.value_cache)
        for seq_id, blocks in swap_out:
            self.swap.swap_out(seq_id, caches, blocks)
        if block_copies:
            pairs = np.asarray(block_copies, dtype=np.int64)  # [n, 2]: (src, dst)
            src, dst = self._to_device([pairs[:, 0], pairs[:, 1]])
            self.key_cache[:, dst] = self.key_cache[:, src]
            self.value_cache[:, dst] = self.value_cache[:, src]
        for seq_id, blocks in swap_in:
            self.swap.swap_in(seq_id, caches, blocks)

    def _move_blocks(self, sched: SchedulerOutput) -> None:
        self.move_blocks(sched.block_copies, sched.swap_out, sched.swap_in)

    def drop_host_copy(self, seq_id: int) -> None:
        if self.swap is not None:
            self.swap.release(seq_id)

    # -- one step -------------------------------------------------------------------------------
    def _to_device(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        """Small host arrays of one dtype -> device tensors of the same shapes in ONE copy: concatenated
        into a pinned buffer and sent non_blocking on CUDA (no host sync); zero-copy views on the CPU."""
        flat = torch.from_numpy(np.concatenate([a.ravel() for a in arrays]))
        if self.device.type == "cuda":
            flat = flat.pin_memory().to(self.device, non_blocking=True)
        views, offset = [], 0
        for a in arrays:
            views.append(flat[offset:offset + a.size].view(a.shape))
            offset += a.size
        return views

    def _device_batch(self, step: StepInput):
        """The step's inputs and AttentionMetadata on the device, in two copies (int64, int32) that do not
        wait for the device."""
        input_ids, positions, slot_mapping = self._to_device([step.input_ids, step.positions, step.slot_mapping])
        pf, dc = step.num_prefills, step.num_decodes
        i32: list[np.ndarray] = []
        if pf:
            i32 += [step.prefill_query_start_loc, step.prefill_seq_lens, step.prefill_block_tables]
        if dc:
            i32 += [step.decode_seq_lens, step.decode_block_tables]
        dev32 = self._to_device(i32) if i32 else []
        pf_t, dc_t = (dev32[:3], dev32[3:]) if pf else ([None] * 3, dev32)
        md = AttentionMetadata(
            slot_mapping=slot_mapping,
            num_prefills=pf,
            num_prefill_tokens=step.num_prefill_tokens,
            max_prefill_query_len=step.max_prefill_query_len,
            prefill_query_start_loc=pf_t[0],
            prefill_seq_lens=pf_t[1],
            prefill_block_tables=pf_t[2],
            num_decodes=dc,
            decode_seq_lens=dc_t[0] if dc else None,
            decode_block_tables=dc_t[1] if dc else None,
        )
        return input_ids, positions, md

    def _build_batch(self, sched: SchedulerOutput, block_tables: dict[int, list[int]]):
        """sched's batch on the device with the given block tables (the draft model's: the target's)."""
        return self._device_batch(build_step_input(sched, self.block_size, block_tables))

    @torch.inference_mode()
    def run_decode_steps(self, step: StepInput, num_steps: int, sampling: SamplingTensors) -> torch.Tensor:
        """num_steps decode forwards of step's sequences in a row (engine/multi_step.py), each sampling the next
        one's input ids: step holds the first one's inputs, slot_mapping the slots of all ([num_steps * n],
        forward i's at [i n, (i + 1) n]) and block tables that cover them; sampling: the rows' SamplingTensors
        (the first forward's offsets; forward i draws at offset + i). Returns the tokens [num_steps, n] (int64,
        on the device). In one op call where it applies (models/cpu_decoder_layers.py decode_loop)."""
        self.move_blocks(step.block_copies, step.swap_out, step.swap_in)
        n = step.num_decodes
        input_ids, positions, slots = self._to_device([step.input_ids, step.positions, step.slot_mapping])
        seq_lens, tables = self._to_device([step.decode_seq_lens, step.decode_block_tables])
        if self.graphs is None:
            looped = cpu_decoder_layers.decode_loop(self.model, input_ids, positions, slots, seq_lens, tables,
                                                    sampling, num_steps)
            if looped is not None:
                return looped
        sampler, tokens = Sampler(), []
        for i in range(num_steps):
            md = make_decode_metadata(slots[i * n:(i + 1) * n], seq_lens + i, tables)
            if self.graphs is not None and self.graphs.can_run(md):
                hidden = self.graphs.run(input_ids, positions + i, md)
            else:
                with set_attention_metadata(md):
                    hidden = self.model(input_ids, positions + i)
            drawn = sampling if i == 0 else replace(sampling, offsets=sampling.offsets + i)
            input_ids = sampler(self.model.compute_logits(hidden), drawn)
            tokens.append(input_ids)
        return torch.stack(tokens)

    @torch.inference_mode()
    def run(self, step: StepInput) -> list[Optional[torch.Tensor]]:
        """One step: the blocks moved, the forward (KV written), then one float32 logits tensor
        [len(rows), vocab] per group of step.logits_rows (None for an empty group), on the device.
        Under tensor parallelism every rank runs this with the same step; the logits are whole on each."""
        self.move_blocks(step.block_copies, step.swap_out, step.swap_in)
        input_ids, positions, md = self._device_batch(step)
        if self.graphs is not None and self.graphs.can_run(md):
            hidden = self.graphs.run(input_ids, positions, md)
        else:
            with set_attention_metadata(md):
                hidden = self.model(input_ids, positions)
        out: list[Optional[torch.Tensor]] = []
        for rows in step.logits_rows:
            if len(rows) == 0:
                out.append(None)
                continue
            idx = self._to_device([np.asarray(rows, dtype=np.int64)])[0]
            out.append(self.model.compute_logits(hidden[idx]))
        return out
