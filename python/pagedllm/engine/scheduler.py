"""Continuous batching: which sequences run this step and how many of their tokens.

Policy (FCFS by arrival, then sample index):
- Running sequences first, in order: each gets its remaining tokens (one for a decode; the rest of
  its prompt, chunked to the token budget, for a prefill). When a new slot cannot be reserved, the
  latest-arrived running sequence is preempted (possibly the one being scheduled).
- Preemption: by swapping its KV blocks to host memory when swap is on and host space is left,
  otherwise by recompute (its blocks are freed; it re-enters the waiting queue with every token it
  already sampled, and its prefill then covers prompt + outputs, hitting the prefix cache where it can).
- Then, when nothing was preempted this step: swapped sequences come back, then waiting ones are
  admitted while the token budget and max_num_seqs allow. A waiting sequence is admitted whole
  (its slots are all reserved at admission); its prefix-cache hits start it with those tokens computed.
No tensors here: the step's plan (SchedulerOutput) goes to the model runner.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Optional

from pagedllm.engine.block_manager import BlockManager
from pagedllm.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    start: int              # first position whose KV this step computes
    num_new_tokens: int
    spec_token_ids: list[int] = field(default_factory=list)  # proposed tokens verified after the newest one

    @property
    def samples(self) -> bool:
        """This chunk reaches the sequence's last token, so its next token is sampled."""
        return self.start + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    prefills: list[ScheduledSeq] = field(default_factory=list)   # chunks of more than one token
    decodes: list[ScheduledSeq] = field(default_factory=list)    # exactly one token
    block_copies: list[tuple[int, int]] = field(default_factory=list)      # copy-on-write (src, dst)
    swap_out: list[tuple[int, list[int]]] = field(default_factory=list)    # (seq_id, device blocks) -> host
    swap_in: list[tuple[int, list[int]]] = field(default_factory=list)     # (seq_id, device blocks) <- host
    preempted: list[Sequence] = field(default_factory=list)
    block_tables: dict[int, list[int]] = field(default_factory=dict)     # seq_id -> its blocks (each scheduled seq)

    @property
    def scheduled(self) -> list[ScheduledSeq]:
        return self.prefills + self.decodes

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


def _order(seq: Sequence) -> tuple[int, int]:
    return (seq.request.arrival, seq.index)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 enable_chunked_prefill: bool = True, swap_capacity_blocks: int = 0):
        self.bm = block_manager
        self.block_size = block_manager.block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chunked = enable_chunked_prefill
        self.swap_capacity_blocks = swap_capacity_blocks
        self.swapped_blocks = 0
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.swapped: list[Sequence] = []
        self._swapped_sizes: dict[int, int] = {}
        self.num_preemptions = 0

    # -- queues ---------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self._insert(self.waiting, seq)

    @staticmethod
    def _insert(queue: list[Sequence], seq: Sequence) -> None:
        keys = [_order(s) for s in queue]
        queue.insert(bisect.bisect(keys, _order(seq)), seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running) + len(self.swapped)

    # -- one step -------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if not self._reserve_running(seq, out):
                continue  # seq itself was preempted; running[i] is now the next one
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            self._emit(out, seq, n)
            budget -= n
            i += 1
        if not out.preempted:
            budget = self._admit_swapped(out, budget)
            self._admit_waiting(out, budget)
        self.fill_block_tables(out)
        return out

    def fill_block_tables(self, out: SchedulerOutput) -> None:
        """out.block_tables for every scheduled sequence (again after speculative proposals reserved slots)."""
        out.block_tables = {it.seq.seq_id: list(self.bm.get_block_table(it.seq.seq_id)) for it in out.scheduled}

    def _reserve_running(self, seq: Sequence, out: SchedulerOutput) -> bool:
        """Reserve KV slots for the tokens of seq that have none yet (the newest sampled token),
        preempting the latest-arrived running sequences until they fit. False if seq was preempted."""
        missing = seq.num_tokens - self.bm.num_tokens(seq.seq_id)
        if missing <= 0:
            return True
        while not self.bm.can_append(seq.seq_id, missing):
            victim = self.running[-1]
            self._preempt(victim, out)
            if victim is seq:
                return False
        out.block_copies.extend(self.bm.append_slots(seq.seq_id, seq.token_slice(seq.num_tokens - missing,
                                                                                 seq.num_tokens)))
        return True

    def _emit(self, out: SchedulerOutput, seq: Sequence, n: int) -> None:
        if n <= 0:
            return  # a beam waiting for its siblings' logprobs (engine/beam_search.py) has nothing to compute
        item = ScheduledSeq(seq, seq.num_computed_tokens, n)
        (out.decodes if n == 1 else out.prefills).append(item)

    def _salt(self, seq: Sequence) -> Optional[str]:
        req = seq.request
        return self.bm.salt_for(req.cache_salt, req.params.prompt_logprobs is not None, seq.seq_id)

    def _can_allocate(self, seq: Sequence) -> bool:
        tokens = seq.token_ids()
        if self.bm.can_allocate(tokens, self._salt(seq)):
            return True
        # Alone, a sequence may use the watermark blocks too: otherwise one that needs almost the
        # whole cache would wait forever.
        needed = -(-len(tokens) // self.block_size)
        return not self.running and needed <= self.bm.num_free_blocks

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            remaining_if_no_hit = seq.num_tokens
            if not self.chunked and remaining_if_no_hit > budget and out.scheduled:
                break  # without chunked prefill a prompt runs whole, in a step of its own if need be
            if not self._can_allocate(seq):
                break
            self.waiting.pop(0)
            num_cached = self.bm.allocate(seq.seq_id, seq.token_ids(), self._salt(seq))
            if seq.num_computed_tokens == 0 and not seq.output_token_ids:
                seq.num_cached_tokens = num_cached  # first admission: what RequestOutput reports
            seq.num_computed_tokens = num_cached
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            n = seq.num_tokens - num_cached
            if self.chunked:
                n = min(n, budget)
            self._emit(out, seq, n)
            budget -= n

    def _admit_swapped(self, out: SchedulerOutput, budget: int) -> int:
        while self.swapped and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.swapped[0]
            if not self._can_allocate(seq):
                break
            self.swapped.pop(0)
            num_cached = self.bm.allocate(seq.seq_id, seq.token_ids(), self._salt(seq))
            table = self.bm.get_block_table(seq.seq_id)
            first = num_cached // self.block_size
            last = -(-seq.num_computed_tokens // self.block_size)
            out.swap_in.append((seq.seq_id, list(table[first:last])))
            self.swapped_blocks -= self._swapped_sizes.pop(seq.seq_id)
            self.bm.mark_computed(seq.seq_id, seq.num_computed_tokens)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            self._emit(out, seq, n)
            budget -= n
        return budget

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.num_preemptions += 1
        out.preempted.append(seq)
        table = list(self.bm.get_block_table(seq.seq_id))
        computed_blocks = -(-seq.num_computed_tokens // self.block_size)
        if computed_blocks and self.swapped_blocks + computed_blocks <= self.swap_capacity_blocks:
            out.swap_out.append((seq.seq_id, table[:computed_blocks]))
            self.swapped_blocks += computed_blocks
            self._swapped_sizes[seq.seq_id] = computed_blocks
            self.bm.free(seq.seq_id)
            seq.status = SequenceStatus.SWAPPED
            self._insert(self.swapped, seq)
        else:
            self.bm.free(seq.seq_id)
            seq.num_computed_tokens = 0
            self._insert(self.waiting, seq)
            seq.status = SequenceStatus.WAITING

    # -- after the model ran --------------------------------------------------------------------
    def commit(self, out: SchedulerOutput) -> None:
        """The step's KV is in the cache: advance each sequence and let its full blocks be hit."""
        for item in out.scheduled:
            item.seq.num_computed_tokens = item.start + item.num_new_tokens
            self.bm.mark_computed(item.seq.seq_id, item.seq.num_computed_tokens)

    def fork(self, parent: Sequence, children: list[Sequence]) -> None:
        """n > 1: the children share every block of the parent (copy-on-write later)."""
        at = self.running.index(parent) + 1
        for child in children:
            self.bm.fork(parent.seq_id, child.seq_id)
            child.num_computed_tokens = parent.num_computed_tokens
            child.num_cached_tokens = parent.num_cached_tokens
            child.status = SequenceStatus.RUNNING
        self.running[at:at] = children

    def finish(self, seq: Sequence, reason: str, stop_reason=None) -> None:
        """Remove seq from every queue and free its blocks (and its host copy, via the caller)."""
        if seq.status == SequenceStatus.FINISHED:
            return
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.bm.free(seq.seq_id)
        elif seq.status == SequenceStatus.WAITING:
            self.waiting.remove(seq)
        elif seq.status == SequenceStatus.SWAPPED:
            self.swapped.remove(seq)
            self.swapped_blocks -= self._swapped_sizes.pop(seq.seq_id)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
