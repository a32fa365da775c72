"""Runs the model for one scheduled step: builds the flat token batch (prefill chunks first, then
decodes) and its attention metadata, keeps the paged KV cache, samples, computes logprobs."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from pagedllm.engine.cuda_graph import CudaGraphBackend, DecodeGraphRunner, GraphBackend, capture_sizes
from pagedllm.engine.scheduler import ScheduledSeq, SchedulerOutput
from pagedllm.layers.attention_metadata import AttentionMetadata, make_prefill_metadata, set_attention_metadata
from pagedllm.layers.logits_processing import SampleResult, SampleRow, StepSampler
from pagedllm.models.utils import use_native_ops
from pagedllm.outputs import Logprob

_GiB = 1 << 30
logger = logging.getLogger(__name__)


@dataclass
class StepResult:
    samples: dict[int, list[SampleResult]]            # seq_id -> one result (n results for a fork point)
    prompt_logprobs: dict[int, list[Optional[dict]]]  # seq_id -> entries for the positions computed this step
    spec_logits: dict[int, torch.Tensor] = field(default_factory=dict)  # seq_id -> [1 + drafts, vocab] (verify)


class ModelRunner:
    def __init__(self, model: torch.nn.Module, hf_config, device: torch.device, dtype: torch.dtype,
                 block_size: int, tokenizer=None):
        self.model = model
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.sampler = StepSampler(tokenizer)
        self.tokenizer = tokenizer
        attn = model.attention_layers()
        self.attn_layers = attn
        self.num_layers = len(attn)
        self.num_kv_heads = attn[0].num_kv_heads
        self.head_size = attn[0].head_size
        self.key_cache: Optional[torch.Tensor] = None      # [layers, blocks, kv_heads, block_size, head]
        self.value_cache: Optional[torch.Tensor] = None
        self.host_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}   # swapped-out sequences
        self.graphs: Optional[DecodeGraphRunner] = None  # decode-step CUDA graphs (capture_decode_graphs)

    # -- the KV cache ---------------------------------------------------------------------------
    @property
    def bytes_per_block(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.block_size * self.head_size * elem

    def profile_num_blocks(self, gpu_memory_utilization: float, max_num_batched_tokens: int,
                           max_model_len: int) -> int:
        """GPU: blocks that fit in utilization x total memory minus weights and the activation peak
        of a full-budget prefill (measured by running one, as sequences no longer than max_model_len)."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        full, rest = divmod(max_num_batched_tokens, max_model_len)
        lens = [max_model_len] * full + ([rest] if rest else [])
        needed = sum(-(-n // self.block_size) for n in lens)
        self.allocate_kv_cache(needed)
        md = make_prefill_metadata(lens, self.block_size, self.device)
        ids = torch.zeros(max_num_batched_tokens, dtype=torch.long, device=self.device)
        positions = torch.cat([torch.arange(n, device=self.device) for n in lens])
        with torch.inference_mode(), set_attention_metadata(md):
            hidden = self.model(ids, positions)
            self.model.compute_logits(hidden[-min(256, len(hidden)):])
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - needed * self.bytes_per_block
        self.key_cache = self.value_cache = None
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(self.device).total_memory
        free_bytes = total * gpu_memory_utilization - peak
        return max(int(free_bytes // self.bytes_per_block), 0)

    def cpu_num_blocks(self, kv_cache_space_gib: float) -> int:
        return int(kv_cache_space_gib * _GiB // self.bytes_per_block)

    def allocate_kv_cache(self, num_blocks: int) -> None:
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

    def _move_blocks(self, sched: SchedulerOutput) -> None:
        """Swap-outs first (their blocks may be reused this very step), then copy-on-write, then swap-ins."""
        for seq_id, blocks in sched.swap_out:
            idx = torch.tensor(blocks, dtype=torch.long, device=self.device)
            pin = self.device.type == "cuda"
            self.host_kv[seq_id] = (self.key_cache[:, idx].to("cpu").pin_memory() if pin else self.key_cache[:, idx].clone(),
                                    self.value_cache[:, idx].to("cpu").pin_memory() if pin else self.value_cache[:, idx].clone())
        if sched.block_copies:
            src = torch.tensor([s for s, _ in sched.block_copies], dtype=torch.long, device=self.device)
            dst = torch.tensor([d for _, d in sched.block_copies], dtype=torch.long, device=self.device)
            self.key_cache[:, dst] = self.key_cache[:, src]
            self.value_cache[:, dst] = self.value_cache[:, src]
        for seq_id, blocks in sched.swap_in:
            k, v = self.host_kv.pop(seq_id)
            if blocks:
                idx = torch.tensor(blocks, dtype=torch.long, device=self.device)
                first = k.shape[1] - len(blocks)  # leading blocks came back as prefix-cache hits
                self.key_cache[:, idx] = k[:, first:].to(self.device, non_blocking=True)
                self.value_cache[:, idx] = v[:, first:].to(self.device, non_blocking=True)

    def drop_host_copy(self, seq_id: int) -> None:
        self.host_kv.pop(seq_id, None)

    # -- one step -------------------------------------------------------------------------------
    def _build_batch(self, sched: SchedulerOutput, block_tables: dict[int, list[int]]):
        bs = self.block_size
        ids, pos, slots = [], [], []
        for item in sched.scheduled:
            seq, s, n = item.seq, item.start, item.num_new_tokens
            tokens = seq.token_ids() + item.spec_token_ids  # (speculative decoding's proposals)
            ids.extend(tokens[s:s + n])
            p = np.arange(s, s + n)
            table = np.asarray(block_tables[seq.seq_id], dtype=np.int64)
            pos.append(p)
            slots.append(table[p // bs] * bs + p % bs)
        positions = np.concatenate(pos)
        slot_mapping = np.concatenate(slots)

        def table_tensor(items: list[ScheduledSeq]) -> torch.Tensor:
            width = max(len(block_tables[it.seq.seq_id]) for it in items)
            arr = np.zeros((len(items), width), dtype=np.int32)
            for r, it in enumerate(items):
                t = block_tables[it.seq.seq_id]
                arr[r, :len(t)] = t
            return torch.from_numpy(arr).to(self.device, non_blocking=True)

        dev = self.device
        i32 = dict(dtype=torch.int32)
        pf, dc = sched.prefills, sched.decodes
        starts = np.cumsum([0] + [it.num_new_tokens for it in pf]) if pf else None
        md = AttentionMetadata(
            slot_mapping=torch.from_numpy(slot_mapping).to(dev, non_blocking=True),
            num_prefills=len(pf),
            num_prefill_tokens=int(starts[-1]) if pf else 0,
            max_prefill_query_len=max((it.num_new_tokens for it in pf), default=0),
            prefill_query_start_loc=torch.tensor(starts, **i32).to(dev) if pf else None,
            prefill_seq_lens=torch.tensor([it.start + it.num_new_tokens for it in pf], **i32).to(dev) if pf else None,
            prefill_block_tables=table_tensor(pf) if pf else None,
            num_decodes=len(dc),
            decode_seq_lens=torch.tensor([it.start + 1 for it in dc], **i32).to(dev) if dc else None,
            decode_block_tables=table_tensor(dc) if dc else None,
        )
        input_ids = torch.tensor(ids, dtype=torch.long).to(dev, non_blocking=True)
        return input_ids, torch.from_numpy(positions).to(dev, non_blocking=True), md

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
        if rows:
            logits = self.model.compute_logits(hidden[torch.tensor(sample_idx, device=self.device)])
            for owner, result in zip(owners, self.sampler(logits, rows)):
                samples.setdefault(owner, []).append(result)
        prompt_results = {seq_id: self._prompt_logprobs(hidden, first, positions_here, targets, seq_id, sched)
                          for seq_id, (first, positions_here, targets) in prompt_lp.items()}
        spec_logits = {}
        if spec_spans:
            idx = torch.cat([torch.arange(o, o + n) for o, n in spec_spans.values()]).to(self.device)
            logits = self.model.compute_logits(hidden[idx]).float().cpu()
            for seq_id, part in zip(spec_spans, logits.split([n for _, n in spec_spans.values()])):
                spec_logits[seq_id] = part
        return StepResult(samples, prompt_results, spec_logits)

    def _prompt_logprobs(self, hidden, first, positions_here, targets, seq_id, sched) -> list[Optional[dict]]:
        k = next(it.seq.request.params.prompt_logprobs for it in sched.scheduled if it.seq.seq_id == seq_id)
        logits = self.model.compute_logits(hidden[first:first + len(positions_here)])
        lp = torch.log_softmax(logits, dim=-1)
        tgt = torch.tensor(targets, device=lp.device).view(-1, 1)
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
