"""The server's per-request limits (each a `pagedllm serve` option, README "Server options"): prompt characters,
samples per request (n / best_of) against the option and against the KV cache, chat-template render budgets,
and text that is not valid Unicode. Every violation is a ValueError worded for the client (a 400)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from pydantic import BaseModel

from pagedllm.chat.render_pool import RenderLimits

DEFAULT_MAX_PROMPT_CHARS = 1_000_000   # > any 200K-token context in practice (~1-4 chars a token)
DEFAULT_MAX_BEST_OF = 32


@dataclass(frozen=True)
class ServerLimits:
    max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS
    max_best_of: int = DEFAULT_MAX_BEST_OF
    render: RenderLimits = field(default_factory=RenderLimits)

    @classmethod
    def build(cls, max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS, max_best_of: int = DEFAULT_MAX_BEST_OF,
              chat_template_timeout_s: float = RenderLimits.timeout_s,
              chat_template_max_memory_mb: int = RenderLimits.max_memory_bytes >> 20) -> "ServerLimits":
        """The rendered chat prompt is a prompt: its output budget is max_prompt_chars."""
        if max_prompt_chars < 1:
            raise ValueError(f"--max-prompt-chars must be at least 1, got {max_prompt_chars}")
        if max_best_of < 1:
            raise ValueError(f"--max-best-of must be at least 1, got {max_best_of}")
        return cls(max_prompt_chars, max_best_of,
                   RenderLimits(timeout_s=chat_template_timeout_s, max_output_chars=max_prompt_chars,
                                max_memory_bytes=max(0, chat_template_max_memory_mb) << 20))

    def check_prompt_chars(self, text: str, what: str = "prompt") -> None:
        if len(text) > self.max_prompt_chars:
            raise ValueError(f"The {what} is {len(text)} characters long, over the server's limit of "
                             f"{self.max_prompt_chars} characters (--max-prompt-chars).")

    def check_samples(self, n: Optional[int], best_of: Optional[int]) -> None:
        count, name = _samples(n, best_of)
        if count > self.max_best_of:
            raise ValueError(f"{name} must be at most {self.max_best_of} (the server's --max-best-of), got {count}.")


def _samples(n: Optional[int], best_of: Optional[int]) -> tuple[int, str]:
    n = n if isinstance(n, int) else 1
    if isinstance(best_of, int) and best_of > n:
        return best_of, "best_of"
    return n, "n"


def check_kv_capacity(num_prompt_tokens: int, max_tokens: Optional[int], n: Optional[int], best_of: Optional[int],
                      block_size: int, num_blocks: int) -> None:
    """All the samples of one request, each at its full length, must fit in the KV cache at once (the prompt's full
    blocks shared): otherwise the request could only run by preempting its own samples over and over."""
    count, name = _samples(n, best_of)
    if count <= 1 or max_tokens is None:
        return
    shared = num_prompt_tokens // block_size
    per_sample = -(-(num_prompt_tokens + max_tokens) // block_size) - shared
    needed = shared + count * per_sample
    if needed > num_blocks:
        raise ValueError(f"{name}={count} samples of up to {num_prompt_tokens + max_tokens} tokens need {needed} KV "
                         f"cache blocks, more than the server's {num_blocks}: lower {name} or max_tokens.")


def check_text(value: Any, where: str = "") -> None:
    """ValueError when a string anywhere in value is not valid Unicode (a lone surrogate such as "\\ud800", which
    JSON can escape but no tokenizer can encode)."""
    stack = [(value, where)]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"{path or 'The request'} is not valid Unicode text: it holds a lone surrogate "
                                 f"({item[e.start]!r} at character {e.start}).") from None
        elif isinstance(item, dict):
            for k, v in item.items():
                check_text(k, path)
                stack.append((v, f"{path}.{k}" if path else str(k)))
        elif isinstance(item, (list, tuple)):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(item))
        elif isinstance(item, BaseModel):   # a parsed request: its fields and its extra fields
            fields = {k: v for k, v in vars(item).items() if not k.startswith("_")}
            stack.append(({**fields, **(item.model_extra or {})}, path))
