"""A draft model that proposes tokens autoregressively (speculative_config method "draft_model").

Its KV cache has the target's block count and block size and is addressed by the target's block tables:
every slot the target writes, the draft writes too (the draft runs a forward over each step's scheduled
batch before the target, its own proposal forwards write the drafts' slots, and a fully accepted
proposal gets its last token's KV written after verification). So prefix-cache hits, copy-on-write and
rollbacks of the block manager hold for both caches at once, with no per-sequence draft state.

Per step, for the sequences that speculate (N tokens, the newest at position N - 1):
  forward 1 = the scheduled batch (prefill chunks and decodes, mirrored) -> d_1 from the newest token's row;
  forward j (2..k) = d_{j-1} at position N + j - 2 (its slot reserved first) -> d_j.
d_j is the draft's greedy token at temperature 0, else a draw from q_j (the draft's processed, filtered
distribution, the same sampling row the target uses there), kept for the rejection sampler.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Callable, Optional

import torch

from pagedllm.engine.model_runner import ModelRunner
from pagedllm.engine.scheduler import ScheduledSeq, SchedulerOutput
from pagedllm.engine.spec_decode.rejection_sampler import (STREAM_DRAFT, draw, philox_uniforms, processed_argmax,
                                                           target_probs)
from pagedllm.layers.attention_metadata import set_attention_metadata
from pagedllm.sampling.processors.base import SampleRow
from pagedllm.layers.sampler import GREEDY_TEMPERATURE

logger = logging.getLogger(__name__)


class DraftModel:
    def __init__(self, runner: ModelRunner, chain=None):
        self.runner = runner
        self.chain = chain  # the engine's sampling processors (penalties, bias, token masks)

    @classmethod
    def load(cls, config, engine) -> "DraftModel":
        from pagedllm.layers.linear import pack_linear_weights
        from pagedllm.models import loader
        source = loader.resolve_model(config.model, download_dir=engine.args.download_dir)
        hf_config = loader.load_config(source)
        model = loader.load_model(source, hf_config, engine.dtype, engine.device)
        vocab = getattr(model, "vocab_size", None) or hf_config.vocab_size
        if vocab != engine.vocab_size:
            raise ValueError(f"The draft model's vocabulary ({vocab} tokens) differs from the target model's "
                             f"({engine.vocab_size}): speculative decoding needs the same vocabulary.")
        if loader.max_model_len_of(hf_config) < engine.max_model_len:
            raise ValueError(f"The draft model's max_position_embeddings ({loader.max_model_len_of(hf_config)}) "
                             f"is smaller than max_model_len ({engine.max_model_len}).")
        pack_linear_weights(model)
        runner = ModelRunner(model, hf_config, engine.device, engine.dtype, engine.args.block_size)
        runner.allocate_kv_cache(engine.block_manager.num_blocks)
        logger.info("draft model %s: %.0f MiB of KV cache", config.model,
                    runner.bytes_per_block * engine.block_manager.num_blocks / (1 << 20))
        return cls(runner, engine.admission.chain)

    def _forward(self, sched: SchedulerOutput, block_tables: Callable[[int], list[int]],
                 rows: list[int]) -> Optional[torch.Tensor]:
        """Runs the draft over sched's tokens (its KV lands in the draft cache); the logits of the given
        flat token rows."""
        tables = {it.seq.seq_id: block_tables(it.seq.seq_id) for it in sched.scheduled}
        ids, positions, md = self.runner._build_batch(sched, tables)
        with torch.inference_mode(), set_attention_metadata(md):
            hidden = self.runner.model(ids, positions)
            if not rows:
                return None
            return self.runner.model.compute_logits(hidden[torch.tensor(rows, device=hidden.device)]).float().cpu()

    def _next(self, logits: torch.Tensor, row: SampleRow, drafts: list[int]) -> tuple[int, Optional[torch.Tensor]]:
        """The draft token from one row of draft logits (after the drafts so far: a grammar masks it as it
        would mask the target there), and q (None at temperature 0)."""
        where = dict(drafts=drafts, positions=[len(drafts)])
        if row.params.temperature < GREEDY_TEMPERATURE:
            return processed_argmax(logits[None], [row], self.chain, **where)[0], None
        q = target_probs(logits[None], [row], self.chain, **where)[0]
        u = float(philox_uniforms(row.seed, [row.offset], STREAM_DRAFT)[0])
        return draw(q, u), q

    @torch.inference_mode()
    def propose(self, sched: SchedulerOutput, items: list[ScheduledSeq], wants: dict[int, int], bm,
                block_tables: Callable[[int], list[int]], sample_row: Callable) -> dict:
        """{seq_id: (drafts, q [len, vocab] or None)}. Slots of all drafts but the last are reserved here."""
        self.runner._move_blocks(sched)  # swaps and copy-on-write, as the target's cache will get them
        offsets, offset = {}, 0
        for it in sched.scheduled:
            offsets[it.seq.seq_id] = offset + it.num_new_tokens - 1
            offset += it.num_new_tokens
        logits = self._forward(sched, block_tables, [offsets[it.seq.seq_id] for it in items])
        base = {it.seq.seq_id: sample_row(it.seq) for it in items}
        drafts: dict[int, list[int]] = {it.seq.seq_id: [] for it in items}
        qs: dict[int, list] = {it.seq.seq_id: [] for it in items}
        live = list(items)
        for j in range(max(wants.values(), default=0)):
            if j > 0:  # d_j goes in at position N + j - 1: reserve its slot, then one decode step for all
                step = SchedulerOutput()
                for it in live:
                    seq_id = it.seq.seq_id
                    if not bm.can_append(seq_id, 1):
                        continue
                    copies = bm.append_slots(seq_id, drafts[seq_id][-1:])
                    if copies:
                        sched.block_copies.extend(copies)
                        self.runner._move_blocks(SchedulerOutput(block_copies=copies))
                    step.decodes.append(ScheduledSeq(it.seq, it.seq.num_tokens + j - 1, 1, list(drafts[seq_id])))
                if not step.decodes:
                    break
                logits = self._forward(step, block_tables, list(range(len(step.decodes))))
                live = step.decodes
            for r, it in enumerate(live):
                seq_id = it.seq.seq_id
                row = base[seq_id]
                row = replace(row, output_token_ids=row.output_token_ids + drafts[seq_id], offset=row.offset + j)
                tok, q = self._next(logits[r], row, drafts[seq_id])
                drafts[seq_id].append(tok)
                qs[seq_id].append(q)
            live = [it for it in live if len(drafts[it.seq.seq_id]) < wants[it.seq.seq_id]]
            if not live:
                break
        return {seq_id: (d, None if not qs[seq_id] or qs[seq_id][0] is None else torch.stack(qs[seq_id]))
                for seq_id, d in drafts.items()}

    @torch.inference_mode()
    def after_verify(self, fully_accepted: list[ScheduledSeq], block_tables: Callable[[int], list[int]]) -> None:
        """A fully accepted proposal: the draft never ran its last token, whose KV the next steps read."""
        step = SchedulerOutput(decodes=[ScheduledSeq(it.seq, it.start + len(it.spec_token_ids), 1,
                                                     list(it.spec_token_ids)) for it in fully_accepted])
        if step.decodes:
            self._forward(step, block_tables, [])
