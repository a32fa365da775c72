"""Beam search results, shaped as vLLM's (vllm/beam_search.py): LLM.beam_search returns one
BeamSearchOutput per prompt, its sequences best first."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from pagedllm.outputs import Logprob


@dataclass
class BeamSearchSequence:
    tokens: list[int]                      # prompt + generated tokens (the EOS that ended it included)
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    lora_request: None = None
    cum_logprob: float = 0.0
    text: Optional[str] = None             # the generated text only
    finish_reason: Optional[str] = None    # "stop" (EOS) | "length"
    stop_reason: Union[int, str, None] = None


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]
