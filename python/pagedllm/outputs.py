"""Request outputs, shaped as vLLM 0.10's, plus the seed's chat output (message / finish_reason)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union


@dataclass
class Logprob:
    """The log probability of one token, its rank among the vocabulary (1 = most likely), its text."""
    logprob: float
    rank: Optional[int] = None
    decoded_token: Optional[str] = None


# One dict per position: token id -> Logprob (the sampled / prompt token plus the top-k).
SampleLogprobs = list[dict[int, Logprob]]
PromptLogprobs = list[Optional[dict[int, Logprob]]]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: Optional[float]
    logprobs: Optional[SampleLogprobs]
    finish_reason: Optional[str] = None   # "stop" | "length" | "abort" | None while running
    stop_reason: Union[int, str, None] = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    prompt_logprobs: Optional[PromptLogprobs]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: Optional[dict] = None


@dataclass
class FunctionCall:
    name: str
    arguments: str  # a JSON string


@dataclass
class ToolCall:
    id: str
    function: FunctionCall
    type: str = "function"


@dataclass
class ChatMessage:
    role: str = "assistant"
    content: Optional[str] = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    reasoning_content: Optional[str] = None


@dataclass
class ChatCompletionOutput(RequestOutput):
    """A RequestOutput (vLLM's shape: .outputs[0].text) with the seed's .message and .finish_reason."""
    message: ChatMessage = field(default_factory=ChatMessage)
    finish_reason: Optional[str] = None
