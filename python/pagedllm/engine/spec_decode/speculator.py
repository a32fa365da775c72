"""The engine's speculative step, around the scheduler's plan and the model runner's forward:

1. propose(sched): for each decoding sequence that may speculate, up to k proposed tokens; their KV
   slots are reserved (block manager append_slots) and the item becomes a multi-token step
   (ScheduledSeq.spec_token_ids): the target verifies all of them in the same forward, as a prefill
   chunk over the cached KV.
2. verify(sched, spec_logits): rejection sampling (rejection_sampler.py) on the k + 1 rows of logits;
   the rejected drafts' slots are dropped (block manager truncate) and the item shrinks to the accepted
   tokens, so the scheduler's commit marks only real tokens computed (and prefix-cacheable).
The engine then appends the emitted tokens one by one (stop checks, detokenization as usual).
A structured output speculates too: at verification its matcher walks the drafts (row j gets the mask after
drafts[:j], the mask plain decoding would use there) and rolls back, and the emitted tokens then advance it
as plain decoding's do. Prompt-lookup drafts are cut at the first token the grammar refuses.

A sequence does not speculate when: it asks for user logits processors (their state would see tokens
that get rolled back), it is a beam, the step's token budget, max_tokens or the
context length leave no room, or its KV blocks for the drafts are not free (no preemption for drafts).

How many drafts a sequence verifies is a cost decision (draft_lengths.py): each sequence's recent
acceptance rate gives the expected extra tokens of its i-th draft, the step cost model (cost_model.py,
seconds = fixed + per_token * tokens, fitted online on the steps this speculator timed: proposal, forward
and verification) gives what verifying it costs, and a draft is taken only when it raises the step's
expected tokens per second. So at batch 1 (a step mostly fixed cost) sequences speculate freely, at
batch 8 on a CPU only well-predicted ones do, and a batch whose expected gain is below the verification
cost runs as plain decoding. The output never depends on this: only the speed does.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from pagedllm.engine.scheduler import SchedulerOutput
from pagedllm.engine.sequence import Sequence
from pagedllm.engine.spec_decode.config import SpeculativeConfig
from pagedllm.engine.spec_decode.cost_model import StepCostModel
from pagedllm.engine.spec_decode.draft_lengths import AcceptanceRate, choose_draft_lengths
from pagedllm.engine.spec_decode.ngram_proposer import propose_ngram
from pagedllm.engine.spec_decode.rejection_sampler import greedy_targets, verify
from pagedllm.layers.sampler import GREEDY_TEMPERATURE
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
    """User logits processors keep state the rolled-back drafts would have passed through (vLLM excludes
    them too). A structured output speculates: its matcher walks the drafts at verification and rolls back."""
    return not seq.request.params.logits_processors


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
        self.cost = StepCostModel()  # seconds of a decode / verify step by its token count
        self.pooled = AcceptanceRate(decay=0.98)  # every sequence's rounds: the prior of a new sequence's rate
        self._timing: Optional[tuple[float, int]] = None  # (start, tokens) of the step being timed
        self.clock = time.perf_counter
        self.cost_aware = True  # False: verify every proposal in full (tests that need drafts every step)

    def _room(self, seq: Sequence) -> int:
        """How many drafts seq can take this step (k, the context length and max_tokens allowing)."""
        params = seq.request.params
        k = min(self.k, self.max_model_len - seq.num_tokens)
        if params.max_tokens is not None:
            k = min(k, params.max_tokens - len(seq.output_token_ids) - 1)  # k + 1 tokens may come out
        return k

    def acceptance(self, seq: Sequence) -> AcceptanceRate:
        """seq's acceptance estimate; a new one starts from the engine's recent acceptance over all
        sequences (a task whose drafts keep being accepted lets its new requests speculate at once)."""
        rate = seq.__dict__.get("_spec_acceptance")
        if rate is None:
            rate = seq.__dict__["_spec_acceptance"] = AcceptanceRate(prior=self.pooled.rate)
        return rate

    def _valid_prefix(self, seq: Sequence, drafts: list[int]) -> list[int]:
        """drafts up to the first a grammar refuses (its rejection is certain) and to one that ends the
        grammar. Outputs do not change: greedy verification would stop there, and the random path draws
        the same token from the same counter whether it rejects there or takes it as the bonus."""
        if drafts and self.chain is not None and seq.sampling_state is not None:
            drafts = drafts[:self.chain.valid_drafts(seq.sampling_state, drafts)]
        return drafts

    # -- 1. proposals --------------------------------------------------------------------------------------
    def propose(self, sched: SchedulerOutput, eligible: Callable[[Sequence], bool],
                block_tables: Callable[[int], list[int]], sample_row: Callable[[Sequence], SampleRow]) -> None:
        started = self.clock()
        self._timing = None
        timed = not sched.prefills  # a prompt chunk costs differently: such steps teach the cost model nothing
        rooms = {it.seq.seq_id: self._room(it.seq) for it in sched.decodes
                 if eligible(it.seq) and may_speculate(it.seq)}
        rooms = {seq_id: k for seq_id, k in rooms.items() if k > 0}
        by_id = {it.seq.seq_id: it for it in sched.decodes}
        ngram: dict[int, list[int]] = {}
        if self.draft is None:  # prompt lookup is cheap: look first, then decide on what was found
            c = self.config
            ngram = {seq_id: self._valid_prefix(by_id[seq_id].seq, propose_ngram(
                by_id[seq_id].seq.token_ids(), k, c.prompt_lookup_min, c.prompt_lookup_max))
                for seq_id, k in rooms.items()}
            rooms = {seq_id: len(d) for seq_id, d in ngram.items() if d}
        candidates = [(seq_id, self.acceptance(by_id[seq_id].seq).rate, k) for seq_id, k in rooms.items()]
        budget = self.max_num_batched_tokens - sched.num_tokens
        if self.cost_aware:
            cost = self.cost.coefficients() or (self.cost.fixed_tokens, 1.0)
            wants = choose_draft_lengths(candidates, sched.num_tokens,
                                         sum(1 for it in sched.scheduled if it.samples), cost, budget)
        else:  # every proposal in full, while the token budget lasts
            wants = {}
            for seq_id, _, k in candidates:
                if min(k, budget) > 0:
                    wants[seq_id] = min(k, budget)
                    budget -= wants[seq_id]
        for seq_id in rooms:
            if seq_id not in wants:
                self.acceptance(by_id[seq_id].seq).skipped()
        items = [it for it in sched.decodes if it.seq.seq_id in wants]
        if self.draft is not None:  # (runs even with no proposal wanted: its cache mirrors every step)
            proposals = self.draft.propose(sched, items, wants, self.bm, block_tables, sample_row)
        else:
            proposals = {seq_id: (ngram[seq_id][:n], None) for seq_id, n in wants.items()}
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
        self._timing = (started, sched.num_tokens) if timed else None

    # -- 2. verification -----------------------------------------------------------------------------------
    def verify(self, sched: SchedulerOutput, spec_logits: dict[int, torch.Tensor],
               sample_row: Callable[[Sequence], SampleRow],
               block_tables: Callable[[int], list[int]]) -> dict[int, list[SampleResult]]:
        """The emitted tokens of every speculating sequence; rolls back the rejected drafts' slots.
        Called after every step's forward (with or without drafts): it also times the step."""
        out: dict[int, list[SampleResult]] = {}
        fully_accepted = []
        items = [it for it in sched.prefills if it.spec_token_ids]
        rows = {it.seq.seq_id: sample_row(it.seq) for it in items}
        # Plain greedy rows (no sampling processor) need only the argmax: one call for all of them.
        plain = [it.seq.seq_id for it in items
                 if rows[it.seq.seq_id].params.temperature < GREEDY_TEMPERATURE and rows[it.seq.seq_id].state is None]
        targets = greedy_targets([spec_logits[seq_id] for seq_id in plain])
        targets = dict(zip(plain, targets))
        for item in items:
            seq = item.seq
            drafts = item.spec_token_ids
            results, accepted = verify(spec_logits[seq.seq_id], drafts, rows[seq.seq_id], self.chain,
                                       self._draft_probs.pop(seq.seq_id, None), targets.get(seq.seq_id))
            self.stats.observe(len(drafts), accepted)
            self.acceptance(seq).observe(len(drafts), accepted)
            self.pooled.observe(len(drafts), accepted)
            self.bm.truncate(seq.seq_id, seq.num_tokens + accepted)
            item.num_new_tokens = 1 + accepted
            item.spec_token_ids = drafts[:accepted]
            out[seq.seq_id] = results
            if accepted == len(drafts):
                fully_accepted.append(item)
        if self.draft is not None:
            self.draft.after_verify(fully_accepted, block_tables)
        if self._timing is not None:
            started, num_tokens = self._timing
            self.cost.observe(num_tokens, self.clock() - started)
            self._timing = None
        return out
