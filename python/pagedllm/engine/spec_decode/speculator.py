"""The engine's speculative step, around the scheduler's plan and the model runner's forward:

1. propose(sched): for each decoding sequence that may speculate, up to k proposed tokens; their KV
   slots are reserved (block manager append_slots) and the item becomes a multi-token step
   (ScheduledSeq.spec_token_ids): the target verifies all of them in the same forward, as a prefill
   chunk over the cached KV.
2. verify(sched, spec_logits): rejection sampling (rejection_sampler.py) on the k + 1 rows of logits;
   the rejected drafts' slots are dropped (block manager truncate) and the item shrinks to the accepted
   tokens, so the scheduler's commit marks only real tokens computed (and prefix-cacheable).
The engine then appends the emitted tokens one by one (stop checks, detokenization as usual).

A sequence does not speculate when: it asks for user logits processors or a structured output (their
state would see tokens that get rolled back), it is a beam, the step's token budget, max_tokens or the
context length leave no room, or its KV blocks for the drafts are not free (no preemption for drafts).

Proposal length adapts per sequence (verifying a token costs about as much as decoding one on a CPU at
batch 8): after a partly rejected round a sequence proposes accepted + 1 tokens next, after a fully
accepted one k again; a round with nothing accepted also pauses its proposals for 1, 2, 4 .. 16 steps
(doubling while rounds keep failing). The output never depends on this: only the speed does.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from pagedllm.engine.scheduler import SchedulerOutput
from pagedllm.engine.sequence import Sequence
from pagedllm.engine.spec_decode.config import SpeculativeConfig
from pagedllm.engine.spec_decode.ngram_proposer import propose_ngram
from pagedllm.engine.spec_decode.rejection_sampler import verify
from pagedllm.sampling.processors.base import SampleRow
from pagedllm.sampling.step import SampleResult


@dataclass
class SpecDecodeStats:
    """vLLM's spec-decode counters: verification rounds, proposed tokens, accepted tokens (in all and by
    position: accepted_per_pos[i] counts rounds whose i-th draft was accepted)."""
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)

    def observe(self, num_proposed: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_proposed
        self.num_accepted_tokens += num_accepted
        for i in range(num_accepted):
            self.accepted_per_pos[i] += 1

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    def as_dict(self) -> dict:
        return {"num_drafts": self.num_drafts, "num_draft_tokens": self.num_draft_tokens,
                "num_accepted_tokens": self.num_accepted_tokens, "accepted_per_pos": list(self.accepted_per_pos),
                "acceptance_rate": self.acceptance_rate}


def may_speculate(seq: Sequence) -> bool:
    p = seq.request.params
    return not p.logits_processors and getattr(p, "structured_outputs", None) is None \
        and getattr(p, "guided_decoding", None) is None


class Speculator:
    def __init__(self, config: SpeculativeConfig, block_manager, max_model_len: int, max_num_batched_tokens: int,
                 chain=None, draft=None):
        self.config = config
        self.k = config.num_speculative_tokens
        self.bm = block_manager
        self.max_model_len = max_model_len
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chain = chain  # the engine's sampling processors, applied to the verified positions too
        self.draft = draft   # a DraftModel (draft_model.py) for method "draft_model"
        self.stats = SpecDecodeStats(accepted_per_pos=[0] * self.k)
        self._draft_probs: dict[int, Optional[torch.Tensor]] = {}

    def _room(self, seq: Sequence) -> int:
        """How many drafts seq can take this step."""
        params = seq.request.params
        state = seq.__dict__.setdefault("_spec_state", [self.k, 0, 0])  # [next k, steps to pause, last pause]
        if state[1] > 0:
            state[1] -= 1
            return 0
        k = min(state[0], self.max_model_len - seq.num_tokens)
        if params.max_tokens is not None:
            k = min(k, params.max_tokens - len(seq.output_token_ids) - 1)  # k + 1 tokens may come out
        return k

    # -- 1. proposals --------------------------------------------------------------------------------------
    def propose(self, sched: SchedulerOutput, eligible: Callable[[Sequence], bool],
                block_tables: Callable[[int], list[int]], sample_row: Callable[[Sequence], SampleRow]) -> None:
        budget = self.max_num_batched_tokens - sched.num_tokens
        wants: dict[int, int] = {}
        for item in sched.decodes:
            seq = item.seq
            if budget <= 0:
                break
            if not (eligible(seq) and may_speculate(seq)):
                continue
            k = min(self._room(seq), budget)
            if k > 0:
                wants[seq.seq_id] = k
                budget -= k
        items = [it for it in sched.decodes if it.seq.seq_id in wants]
        if self.draft is not None:  # (runs even with no proposal wanted: its cache mirrors every step)
            proposals = self.draft.propose(sched, items, wants, self.bm, block_tables, sample_row)
        elif not wants:
            return
        else:
            c = self.config
            proposals = {it.seq.seq_id: (propose_ngram(it.seq.token_ids(), wants[it.seq.seq_id],
                                                       c.prompt_lookup_min, c.prompt_lookup_max), None)
                         for it in items}
        for item in items:
            seq_id = item.seq.seq_id
            drafts, probs = proposals.get(seq_id, ([], None))
            if not drafts:
                continue
            have = self.bm.num_tokens(seq_id) - item.seq.num_tokens  # slots a draft model already reserved
            if have < len(drafts):
                if not self.bm.can_append(seq_id, len(drafts) - have):
                    self.bm.truncate(seq_id, item.seq.num_tokens)
                    continue
                sched.block_copies.extend(self.bm.append_slots(seq_id, drafts[have:]))
            item.spec_token_ids = list(drafts)
            item.num_new_tokens = 1 + len(drafts)
            self._draft_probs[seq_id] = probs
        moved = [it for it in sched.decodes if it.spec_token_ids]
        sched.decodes[:] = [it for it in sched.decodes if not it.spec_token_ids]
        sched.prefills.extend(moved)  # a multi-token step: prefill attention over the cached KV

    def _adapt(self, seq: Sequence, proposed: int, accepted: int) -> None:
        state = seq.__dict__.setdefault("_spec_state", [self.k, 0, 0])
        state[0] = self.k if accepted == proposed else accepted + 1
        if accepted == 0:
            state[2] = min(16, max(1, 2 * state[2]))
            state[1] = state[2]
        else:
            state[2] = 0

    # -- 2. verification -----------------------------------------------------------------------------------
    def verify(self, sched: SchedulerOutput, spec_logits: dict[int, torch.Tensor],
               sample_row: Callable[[Sequence], SampleRow],
               block_tables: Callable[[int], list[int]]) -> dict[int, list[SampleResult]]:
        """The emitted tokens of every speculating sequence; rolls back the rejected drafts' slots."""
        out: dict[int, list[SampleResult]] = {}
        fully_accepted = []
        for item in sched.prefills:
            if not item.spec_token_ids:
                continue
            seq = item.seq
            drafts = item.spec_token_ids
            results, accepted = verify(spec_logits[seq.seq_id], drafts, sample_row(seq), self.chain,
                                       self._draft_probs.pop(seq.seq_id, None))
            self.stats.observe(len(drafts), accepted)
            self._adapt(seq, len(drafts), accepted)
            self.bm.truncate(seq.seq_id, seq.num_tokens + accepted)
            item.num_new_tokens = 1 + accepted
            item.spec_token_ids = drafts[:accepted]
            out[seq.seq_id] = results
            if accepted == len(drafts):
                fully_accepted.append(item)
        if self.draft is not None:
            self.draft.after_verify(fully_accepted, block_tables)
        return out
