"""SpeculativeConfig: LLM(speculative_config={...}) / --speculative-config, vLLM's keys and messages."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

_METHODS = ("ngram", "draft_model")


@dataclass
class SpeculativeConfig:
    method: Optional[str] = None
    num_speculative_tokens: Optional[int] = None
    prompt_lookup_max: Optional[int] = None   # ngram: the longest suffix n-gram looked up
    prompt_lookup_min: Optional[int] = None   # ngram: the shortest
    model: Optional[str] = None               # draft_model: the draft's folder / .gguf / hub id

    @classmethod
    def from_dict(cls, config: dict) -> "SpeculativeConfig":
        if isinstance(config, SpeculativeConfig):
            return config
        if not isinstance(config, dict):
            raise ValueError(f"speculative_config must be a dict, got {type(config).__name__}.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"Unknown speculative_config key(s) {unknown}; pagedllm knows {sorted(known)}.")
        return cls(**config)

    def __post_init__(self) -> None:
        if self.method is None:
            # vLLM: a config with only a model is a draft model; with prompt_lookup_* an ngram one.
            self.method = "draft_model" if self.model is not None else "ngram"
        if self.method == "[ngram]":
            self.method = "ngram"
        if self.method not in _METHODS:
            raise ValueError(f"Unsupported speculative method: '{self.method}'. pagedllm supports {list(_METHODS)}.")
        if self.num_speculative_tokens is None:
            raise ValueError("num_speculative_tokens must be provided with speculative model unless the draft "
                             "model config contains an n_predict parameter.")
        if self.num_speculative_tokens <= 0:
            raise ValueError("Expected num_speculative_tokens to be greater than zero "
                             f"({self.num_speculative_tokens}).")
        if self.method == "ngram":
            if self.prompt_lookup_min is None and self.prompt_lookup_max is None:
                self.prompt_lookup_min = self.prompt_lookup_max = 5  # vLLM's defaults
            elif self.prompt_lookup_min is None:
                self.prompt_lookup_min = self.prompt_lookup_max
            elif self.prompt_lookup_max is None:
                self.prompt_lookup_max = self.prompt_lookup_min
            if self.prompt_lookup_min < 1:
                raise ValueError(f"prompt_lookup_min={self.prompt_lookup_min} must be > 0")
            if self.prompt_lookup_max < 1:
                raise ValueError(f"prompt_lookup_max={self.prompt_lookup_max} must be > 0")
            if self.prompt_lookup_min > self.prompt_lookup_max:
                raise ValueError(f"prompt_lookup_min={self.prompt_lookup_min} must be <= "
                                 f"prompt_lookup_max={self.prompt_lookup_max}")
        elif self.model is None:
            raise ValueError("speculative_config with method 'draft_model' needs a 'model'.")
