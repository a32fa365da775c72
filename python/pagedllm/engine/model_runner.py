"""Runs the model for one scheduled step: builds the flat token batch (prefill chunks first, then
decodes) and its attention metadata, keeps the paged KV cache, samples, computes logprobs."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from pagedllm.engine.cuda_graph import CudaGraphBackend, DecodeGraphRunner, GraphBackend, capture_sizes
from pagedllm.engine.kv_cache_budget import MemoryProfile, kv_cache_bytes
from pagedllm.engine.request_failures import sample_isolated
from pagedllm.engine.scheduler import ScheduledSeq, SchedulerOutput
from pagedllm.engine.swap_space import HostSwapSpace
from pagedllm.layers.attention_metadata import AttentionMetadata, make_prefill_metadata, set_attention_metadata
from pagedllm.models import cpu_decoder_layers
from pagedllm.sampling.processors.base import SampleRow
from pagedllm.sampling.step import SampleResult, StepSampler
from pagedllm.models.utils import use_native_ops
from pagedllm.outputs import Logprob

_GiB = 1 << 30
logger = logging.getLogger(__name__)


@dataclass
class StepResult:
    samples: dict[int, list[SampleResult]]            # seq_id -> one result (n results for a fork point)
    prompt_logprobs: dict[int, list[Optional[dict]]]  # seq_id -> entries for the positions computed this step
    failures: dict[int, BaseException] = field(default_factory=dict)  # seq_id -> its rows' sampling error
    spec_logits: dict[int, torch.Tensor] = field(default_factory=dict)  # seq_id -> [1 + drafts, vocab] (verify)


class ModelRunner:
    def __init__(self, model: torch.nn.Module, hf_config, device: torch.device, dtype: torch.dtype,
                 block_size: int, tokenizer=None, sampling_chain=None):
        self.model = model
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.sampler = StepSampler(sampling_chain, tokenizer)
        self.tokenizer = tokenizer
        attn = model.attention_layers()
        self.attn_layers = attn
        self.num_layers = len(attn)
        self.num_kv_heads = attn[0].num_kv_heads
        self.head_size = attn[0].head_size
        self.key_cache: Optional[torch.Tensor] = None      # [layers, blocks, kv_heads, block_size, head]
        self.value_cache: Optional[torch.Tensor] = None
        self.swap: Optional[HostSwapSpace] = None  # host blocks of swapped-out sequences (allocate_swap_space)
        self.graphs: Optional[DecodeGraphRunner] = None  # decode-step CUDA graphs (capture_decode_graphs)

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
        return max(kv_bytes // self.bytes_per_block, 0)

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

    def _move_blocks(self, sched: SchedulerOutput) -> None:
        """Swap-outs first (their blocks may be reused this very step), then copy-on-write, then swap-ins."""
        caches = (self.key_cache, self.value_cache)
        for seq_id, blocks in sched.swap_out:
            self.swap.swap_out(seq_id, caches, blocks)
        if sched.block_copies:
            pairs = np.asarray(sched.block_copies, dtype=np.int64)  # [n, 2]: (src, dst)
            src, dst = self._to_device([pairs[:, 0], pairs[:, 1]])
            self.key_cache[:, dst] = self.key_cache[:, src]
            self.value_cache[:, dst] = self.value_cache[:, src]
        for seq_id, blocks in sched.swap_in:
            self.swap.swap_in(seq_id, caches, blocks)

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

    def _build_batch(self, sched: SchedulerOutput, block_tables: dict[int, list[int]]):
        """The step's inputs and AttentionMetadata on the device, in O(new tokens + block table entries):
        only the tokens computed this step are read (Sequence.token_slice), and everything goes to the
        device in two copies (int64, int32) that do not wait for the device."""
        bs = self.block_size
        ids, pos, slots = [], [], []
        for item in sched.scheduled:
            seq, s, n = item.seq, item.start, item.num_new_tokens
            known = seq.num_tokens
            ids.extend(seq.token_slice(min(s, known), min(s + n, known)))
            if s + n > known:  # speculative decoding's proposals follow the sequence's tokens
                ids.extend(item.spec_token_ids[max(s - known, 0):s + n - known])
            p = np.arange(s, s + n)
            table = np.asarray(block_tables[seq.seq_id], dtype=np.int64)
            pos.append(p)
            slots.append(table[p // bs] * bs + p % bs)

        def table_array(items: list[ScheduledSeq]) -> np.ndarray:
            width = max(len(block_tables[it.seq.seq_id]) for it in items)
            arr = np.zeros((len(items), width), dtype=np.int32)
            for r, it in enumerate(items):
                t = block_tables[it.seq.seq_id]
                arr[r, :len(t)] = t
            return arr

        pf, dc = sched.prefills, sched.decodes
        i64 = [np.asarray(ids, dtype=np.int64), np.concatenate(pos), np.concatenate(slots)]
        input_ids, positions, slot_mapping = self._to_device(i64)
        i32: list[np.ndarray] = []
        if pf:
            starts = np.cumsum([0] + [it.num_new_tokens for it in pf], dtype=np.int64)
            i32 += [starts.astype(np.int32), np.asarray([it.start + it.num_new_tokens for it in pf], dtype=np.int32),
                    table_array(pf)]
        if dc:
            i32 += [np.asarray([it.start + 1 for it in dc], dtype=np.int32), table_array(dc)]
        dev32 = self._to_device(i32) if i32 else []
        pf_t, dc_t = (dev32[:3], dev32[3:]) if pf else ([None] * 3, dev32)
        md = AttentionMetadata(
            slot_mapping=slot_mapping,
            num_prefills=len(pf),
            num_prefill_tokens=int(starts[-1]) if pf else 0,
            max_prefill_query_len=max((it.num_new_tokens for it in pf), default=0),
            prefill_query_start_loc=pf_t[0],
            prefill_seq_lens=pf_t[1],
            prefill_block_tables=pf_t[2],
            num_decodes=len(dc),
            decode_seq_lens=dc_t[0] if dc else None,
            decode_block_tables=dc_t[1] if dc else None,
        )
        return input_ids, positions, md

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput, block_tables: dict[int, list[int]],
                sample_rows: dict[int, list[SampleRow]]) -> StepResult:
        """sample_rows: for each scheduled seq that samples this step, its rows (n rows at a fork point)."""
        self._move_blocks(sched)
        input_ids, positions, md = self._build_batch(sched, block_tables)
        if self.graphs is not None and self.graphs.can_run(md):
            hidden = self.graphs.run(input_ids, positions, md)
        else:
            with set_attention_metadata(md):
                hidden = self.model(input_ids, positions)

        # Which hidden rows need logits: each sampling sequence's last token, and every prompt
        # position of a sequence that asked for prompt logprobs.
        sample_idx, rows, owners = [], [], []
        spec_spans: dict[int, tuple[int, int]] = {}  # seq_id -> its verified rows (engine/spec_decode)
        prompt_lp: dict[int, tuple[int, list[int], list[int]]] = {}
        claimed: dict[str, int] = {}  # request id -> prompt positions already taken this step
        offset = 0
        for item in sched.scheduled:
            seq = item.seq
            if seq.request.params.prompt_logprobs is not None:
                plen = len(seq.prompt_token_ids)
                # Positions already reported (a recompute after preemption, or a forked sample) are skipped.
                done = len(seq.request.prompt_logprobs) - 1 if seq.request.prompt_logprobs else 0
                done = max(done, claimed.get(seq.request.request_id, 0))
                positions_here = [p for p in range(item.start, item.start + item.num_new_tokens)
                                  if done <= p < plen - 1]
                if positions_here:
                    claimed[seq.request.request_id] = positions_here[-1] + 1
                    prompt_lp[seq.seq_id] = (offset + positions_here[0] - item.start, positions_here,
                                             [seq.prompt_token_ids[p + 1] for p in positions_here])
            if item.spec_token_ids:
                spec_spans[seq.seq_id] = (offset, item.num_new_tokens)
            if item.samples and seq.seq_id in sample_rows:
                for r in sample_rows[seq.seq_id]:
                    sample_idx.append(offset + item.num_new_tokens - 1)
                    rows.append(r)
                    owners.append(seq.seq_id)
            offset += item.num_new_tokens

        samples: dict[int, list[SampleResult]] = {}
        failures: dict[int, BaseException] = {}
        if rows:
            logits = self.model.compute_logits(hidden[self._to_device([np.asarray(sample_idx, dtype=np.int64)])[0]])
            results, failed_rows = sample_isolated(self.sampler, logits, rows)  # one bad row fails its seq only
            for i, owner in enumerate(owners):
                if i in failed_rows:
                    failures.setdefault(owner, failed_rows[i])
                samples.setdefault(owner, []).append(results[i])
        prompt_results = {seq_id: self._prompt_logprobs(hidden, first, positions_here, targets, seq_id, sched)
                          for seq_id, (first, positions_here, targets) in prompt_lp.items()}
        spec_logits = {}
        if spec_spans:
            idx = torch.cat([torch.arange(o, o + n) for o, n in spec_spans.values()]).to(self.device)
            logits = self.model.compute_logits(hidden[idx]).float().cpu()
            for seq_id, part in zip(spec_spans, logits.split([n for _, n in spec_spans.values()])):
                spec_logits[seq_id] = part
        return StepResult(samples, prompt_results, failures, spec_logits)

    def _prompt_logprobs(self, hidden, first, positions_here, targets, seq_id, sched) -> list[Optional[dict]]:
        k = next(it.seq.request.params.prompt_logprobs for it in sched.scheduled if it.seq.seq_id == seq_id)
        logits = self.model.compute_logits(hidden[first:first + len(positions_here)])
        lp = torch.log_softmax(logits, dim=-1)
        tgt = self._to_device([np.asarray(targets, dtype=np.int64).reshape(-1, 1)])[0]
        chosen = lp.gather(1, tgt)
        ranks = ((lp > chosen).sum(dim=1) + 1).tolist()
        chosen = chosen.view(-1).tolist()
        top = torch.topk(lp, k, dim=1) if k else None
        entries = []
        for r, tok in enumerate(targets):
            d = {tok: Logprob(chosen[r], ranks[r], self._text(tok))}
            if top is not None:
                for j, (t, v) in enumerate(zip(top.indices[r].tolist(), top.values[r].tolist())):
                    d.setdefault(t, Logprob(v, j + 1, self._text(t)))
            entries.append(d)
        return entries

    def _text(self, token_id: int) -> Optional[str]:
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else None
