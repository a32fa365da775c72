"""Requests and their sequences: pure bookkeeping, no tensors (the scheduler's data model)."""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Any, Optional

from pagedllm.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"      # not admitted yet, or preempted by recompute
    RUNNING = "running"
    SWAPPED = "swapped"      # preempted with its KV copied to host memory
    FINISHED = "finished"


_seq_ids = itertools.count()


@dataclass
class Sequence:
    """One generated continuation. Its token list is prompt + output; the KV of the first
    num_computed_tokens tokens is in the cache."""
    request: "Request"
    index: int                         # position in RequestOutput.outputs (before best_of pruning)
    seed: int                          # Philox key of this sequence's draws
    output_token_ids: list[int] = field(default_factory=list)
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0         # prefix-cache hit length at admission
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: Optional[str] = None
    stop_reason: object = None
    cumulative_logprob: float = 0.0
    logprobs: Optional[list] = None    # SampleLogprobs when requested
    # Incremental detokenization state (engine/detokenizer.py).
    output_text: str = ""
    tokens: Optional[list[str]] = None
    prefix_offset: int = 0
    read_offset: int = 0
    _detok_ids: int = 0                # output tokens already fed to the detokenizer
    sampling_state: Any = None         # its sampling processors' states (pagedllm.sampling.processors.base)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.request.prompt_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.request.prompt_token_ids) + len(self.output_token_ids)

    def token_ids(self) -> list[int]:
        """A new list of every token: O(context). Per-step code uses token_slice."""
        return self.request.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, stop: int) -> list[int]:
        """token_ids()[start:stop] (0 <= start <= stop) without building the whole list: O(stop - start)."""
        prompt = self.request.prompt_token_ids
        p = len(prompt)
        if stop <= p:
            return prompt[start:stop]
        if start >= p:
            return self.output_token_ids[start - p:stop - p]
        return prompt[start:] + self.output_token_ids[:stop - p]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def is_prefill(self) -> bool:
        """True while more than the newest token still lacks KV (a prompt or a recompute)."""
        return self.num_tokens - self.num_computed_tokens > 1


@dataclass
class Request:
    """What add_request received: one prompt, one SamplingParams, and n (or best_of) sequences.
    n > 1: a single sequence runs the prefill; at its first sampled token it forks into the rest."""
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: int
    seed: int
    cache_salt: Optional[str] = None
    seqs: list[Sequence] = field(default_factory=list)
    prompt_logprobs: Optional[list] = None
    aborted: bool = False

    def __post_init__(self) -> None:
        if not self.seqs:
            self.seqs.append(Sequence(self, 0, self.seed))

    @property
    def num_samples(self) -> int:
        return self.params.best_of or self.params.n

    @property
    def is_finished(self) -> bool:
        # Before the fork only the parent exists; the fork happens in the step of its first token.
        done = all(s.is_finished for s in self.seqs)
        return self.aborted and done or done and len(self.seqs) == self.num_samples

    def unfinished_seqs(self) -> list[Sequence]:
        return [s for s in self.seqs if not s.is_finished]
