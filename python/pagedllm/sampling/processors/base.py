"""The one per-request hook of the sampling step. Every feature that changes what may be sampled
(penalties, logit bias, allowed tokens, bad words, min_tokens, user logits processors, structured
outputs) is a SamplingProcessor, and the engine drives them all the same way:

  added(params, prompt_token_ids) -> state | None   when a request is added (None: not used by it)
  apply(batch, rows, states)                        once per step, batched over the rows that use it
  accepted(state, token_id) -> bool                 after each sampled token (True: the sequence ends)
  forked(state) -> state                            when n > 1 samples split from one prefill

A sequence's states live in one SequenceSampling (engine: Sequence.sampling_state), so preemption
and recompute keep them: they follow the tokens already sampled, never the KV cache.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from pagedllm.sampling_params import SamplingParams


@dataclass
class SampleRow:
    """What the sampler needs to know about one row of logits."""
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    seed: int
    offset: int                 # how many tokens this sequence sampled before: the Philox counter
    stop_token_ids: frozenset = frozenset()   # EOS and stop_token_ids (masked until min_tokens)
    state: Optional["SequenceSampling"] = None  # the sequence's processor states (None: no processor)


class SamplingBatch:
    """One step's logits as the processors see them. `logits` is a private copy made on first
    write (the raw logits stay for logprobs); `bitmask` (int32 [rows, ceil(vocab / 32)], bit set =
    allowed) is allocated all-allowed on first use and goes into the sample_tokens op."""

    def __init__(self, raw_logits: torch.Tensor, rows: list[SampleRow]):
        self.raw = raw_logits
        self.rows = rows
        self.vocab = raw_logits.shape[1]
        self._logits: Optional[torch.Tensor] = None
        self.bitmask: Optional[torch.Tensor] = None

    @property
    def logits(self) -> torch.Tensor:
        if self._logits is None:
            self._logits = self.raw.clone(memory_format=torch.contiguous_format)  # flat views (index_add_)
        return self._logits

    @property
    def processed(self) -> torch.Tensor:
        return self.raw if self._logits is None else self._logits

    def token_bitmask(self) -> torch.Tensor:
        """Host-side bitmask (filled by CPU matchers; moved to the logits' device by the sampler)."""
        if self.bitmask is None:
            words = (self.vocab + 31) // 32
            self.bitmask = torch.full((len(self.rows), words), -1, dtype=torch.int32)
        return self.bitmask


class SamplingProcessor(ABC):
    name: str

    @abstractmethod
    def added(self, params: SamplingParams, prompt_token_ids: list[int]) -> Optional[Any]:
        """The per-sequence state of a new request, or None when the request does not use this processor."""

    @abstractmethod
    def apply(self, batch: SamplingBatch, rows: list[int], states: list[Any]) -> None:
        """Edit batch.logits / batch.token_bitmask() for the given row indices (their states alongside)."""

    def accepted(self, state: Any, token_id: int) -> bool:
        """A token was sampled for the sequence; True asks the engine to finish it (reason "stop")."""
        return False

    def forked(self, state: Any) -> Any:
        """The state of a new sample forked from this one (stateless processors share it)."""
        return state

    def ready(self, state: Any) -> bool:
        """False while the request cannot be scheduled yet (a grammar still compiling)."""
        return True

    def apply_drafts(self, batch: SamplingBatch, rows: list[int], state: Any, drafts: list[int],
                     positions: list[int]) -> int:
        """Speculative decoding: the given rows of batch belong to one sequence, row rows[i] at position
        positions[i] of its proposal (drafts[:positions[i]] come before it, and its SampleRow's
        output_token_ids hold them). Edit those rows as plain decoding would edit them there; return how
        many leading drafts may be emitted at all (len(drafts) unless the processor's state forbids).
        The default applies `apply`: a processor whose state does not follow the tokens needs no more."""
        self.apply(batch, rows, [state] * len(rows))
        return len(drafts)

    def valid_drafts(self, state: Any, drafts: list[int]) -> int:
        """How many leading drafts may be emitted (proposals are trimmed there); the state is unchanged."""
        return len(drafts)


@dataclass
class SequenceSampling:
    """One sequence's states, one per processor it uses (processor index -> state)."""
    states: dict[int, Any] = field(default_factory=dict)


class ProcessorChain:
    """The engine's processors in vLLM's order, and the four calls over all of them."""

    def __init__(self, processors: list[SamplingProcessor]):
        self.processors = processors

    def added(self, params: SamplingParams, prompt_token_ids: list[int]) -> Optional[SequenceSampling]:
        states = {}
        for i, proc in enumerate(self.processors):
            st = proc.added(params, prompt_token_ids)
            if st is not None:
                states[i] = st
        return SequenceSampling(states) if states else None

    def apply(self, batch: SamplingBatch) -> None:
        for i, proc in enumerate(self.processors):
            idx, states = [], []
            for r, row in enumerate(batch.rows):
                st = row.state.states.get(i) if row.state is not None else None
                if st is not None:
                    idx.append(r)
                    states.append(st)
            if idx:
                proc.apply(batch, idx, states)

    def apply_drafts(self, batch: SamplingBatch, drafts: list[int], positions: Optional[list[int]] = None) -> int:
        """batch.rows are positions of one sequence's speculative step (row r at positions[r], default r:
        drafts[:positions[r]] precede it); every processor edits them as plain decoding would there.
        Returns how many leading drafts may be emitted."""
        positions = list(range(len(batch.rows))) if positions is None else positions
        seq_state = batch.rows[0].state
        valid = len(drafts)
        if seq_state is None:
            return valid
        rows = list(range(len(batch.rows)))
        for i, st in sorted(seq_state.states.items()):  # the processors' order, as apply
            valid = min(valid, self.processors[i].apply_drafts(batch, rows, st, drafts, positions))
        return valid

    def valid_drafts(self, seq_state: Optional[SequenceSampling], drafts: list[int]) -> int:
        if seq_state is None:
            return len(drafts)
        return min([len(drafts)] + [self.processors[i].valid_drafts(st, drafts) for i, st in seq_state.states.items()])

    def accepted(self, seq_state: Optional[SequenceSampling], token_id: int) -> bool:
        if seq_state is None:
            return False
        finish = False
        for i, st in seq_state.states.items():
            finish |= self.processors[i].accepted(st, token_id)
        return finish

    def forked(self, seq_state: Optional[SequenceSampling]) -> Optional[SequenceSampling]:
        if seq_state is None:
            return None
        return SequenceSampling({i: self.processors[i].forked(st) for i, st in seq_state.states.items()})

    def ready(self, seq_state: Optional[SequenceSampling]) -> bool:
        return seq_state is None or all(self.processors[i].ready(st) for i, st in seq_state.states.items())
