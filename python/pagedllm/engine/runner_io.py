"""The engine/runner contract: what one step sends to the model runner (StepInput) and what comes
back (logits of the rows asked for). Plain data only (numpy arrays, ints, lists): no request objects,
no tokenizer, no callables, so a StepInput pickles cheaply to tensor-parallel workers.

build_step_input (driver side) reads the scheduler's output: its block tables and, for each
scheduled sequence, only the tokens computed this step (Sequence.token_slice).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from pagedllm.engine.scheduler import ScheduledSeq, SchedulerOutput


@dataclass
class StepInput:
    input_ids: np.ndarray                 # [T] int64: prefill chunks first, then one token per decode
    positions: np.ndarray                 # [T] int64
    slot_mapping: np.ndarray              # [T] int64: block_id * block_size + offset
    num_prefills: int = 0
    prefill_query_start_loc: Optional[np.ndarray] = None  # [P + 1] int32
    prefill_seq_lens: Optional[np.ndarray] = None         # [P] int32: context after this step's chunk
    prefill_block_tables: Optional[np.ndarray] = None     # [P, width] int32
    decode_seq_lens: Optional[np.ndarray] = None          # [D] int32
    decode_block_tables: Optional[np.ndarray] = None      # [D, width] int32
    block_copies: list[tuple[int, int]] = field(default_factory=list)    # copy-on-write (src, dst)
    swap_out: list[tuple[int, list[int]]] = field(default_factory=list)  # (seq_id, device blocks) -> host
    swap_in: list[tuple[int, list[int]]] = field(default_factory=list)   # (seq_id, device blocks) <- host
    # The hidden rows whose logits come back, in groups (one LM-head call each): sampling rows,
    # each sequence's prompt-logprob rows, the speculative verification rows (step_sampling.py).
    logits_rows: list[np.ndarray] = field(default_factory=list)

    @property
    def num_prefill_tokens(self) -> int:
        return int(self.prefill_query_start_loc[-1]) if self.num_prefills else 0

    @property
    def max_prefill_query_len(self) -> int:
        return int(np.diff(self.prefill_query_start_loc).max()) if self.num_prefills else 0

    @property
    def num_decodes(self) -> int:
        return 0 if self.decode_seq_lens is None else len(self.decode_seq_lens)


def _table_array(items: list[ScheduledSeq], block_tables: dict[int, list[int]]) -> np.ndarray:
    width = max(len(block_tables[it.seq.seq_id]) for it in items)
    arr = np.zeros((len(items), width), dtype=np.int32)
    for r, it in enumerate(items):
        t = block_tables[it.seq.seq_id]
        arr[r, :len(t)] = t
    return arr


def build_step_input(sched: SchedulerOutput, block_size: int,
                     block_tables: Optional[dict[int, list[int]]] = None) -> StepInput:
    """The step's batch in O(new tokens + block table entries). block_tables: the scheduler's
    (sched.block_tables) unless given (the draft model passes the target's)."""
    tables = sched.block_tables if block_tables is None else block_tables
    ids, pos, slots = [], [], []
    for item in sched.scheduled:
        seq, s, n = item.seq, item.start, item.num_new_tokens
        known = seq.num_tokens
        ids.extend(seq.token_slice(min(s, known), min(s + n, known)))
        if s + n > known:  # speculative decoding's proposals follow the sequence's tokens
            ids.extend(item.spec_token_ids[max(s - known, 0):s + n - known])
        p = np.arange(s, s + n)
        table = np.asarray(tables[seq.seq_id], dtype=np.int64)
        pos.append(p)
        slots.append(table[p // block_size] * block_size + p % block_size)
    pf, dc = sched.prefills, sched.decodes
    step = StepInput(np.asarray(ids, dtype=np.int64), np.concatenate(pos), np.concatenate(slots),
                     num_prefills=len(pf), block_copies=list(sched.block_copies), swap_out=list(sched.swap_out),
                     swap_in=list(sched.swap_in))
    if pf:
        step.prefill_query_start_loc = np.cumsum([0] + [it.num_new_tokens for it in pf]).astype(np.int32)
        step.prefill_seq_lens = np.asarray([it.start + it.num_new_tokens for it in pf], dtype=np.int32)
        step.prefill_block_tables = _table_array(pf, tables)
    if dc:
        step.decode_seq_lens = np.asarray([it.start + 1 for it in dc], dtype=np.int32)
        step.decode_block_tables = _table_array(dc, tables)
    return step
