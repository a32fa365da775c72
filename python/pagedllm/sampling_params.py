"""SamplingParams: vLLM 0.10's fields, defaults and validation messages."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

from pagedllm.sampling_params_validation import normalize_fields, verify_greedy_sampling, verify_values

_SAMPLING_EPS = 1e-5

from pagedllm.sampling.structured_params import GuidedDecodingParams, StructuredOutputsParams  # noqa: F401
from pagedllm.sampling.structured_params import normalize as normalize_structured_outputs

LogitsProcessor = Callable[..., Any]


@dataclass
class SamplingParams:
    n: int = 1
    best_of: Optional[int] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: Optional[int] = 16
    min_tokens: int = 0
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logits_processors: Optional[list[LogitsProcessor]] = None
    truncate_prompt_tokens: Optional[int] = None
    logit_bias: Optional[dict[int, float]] = None
    allowed_token_ids: Optional[list[int]] = None
    bad_words: Optional[list[str]] = None
    detokenize: bool = True
    structured_outputs: Optional[Any] = None   # StructuredOutputsParams (or a dict of its fields)
    guided_decoding: Optional[Any] = None      # vLLM 0.10's GuidedDecodingParams: the same thing
    # Filled by the engine: the stop token ids that come from the tokenizer / generation config (EOS ...).
    _all_stop_token_ids: set = field(default_factory=set, repr=False, compare=False)

    def __post_init__(self) -> None:
        normalize_fields(self)  # types first (ValueError, never TypeError), canonical Python values
        if self.best_of is None:
            self.best_of = self.n
        if self.top_k == 0:
            self.top_k = -1  # 0 also disables, as in vLLM
        self._verify_args()
        normalize_structured_outputs(self)
        if self.temperature < _SAMPLING_EPS:
            # Greedy: the other random-sampling knobs do not apply (vLLM resets them the same way).
            self.top_p = 1.0
            self.top_k = -1
            self.min_p = 0.0
            verify_greedy_sampling(self)
        self._all_stop_token_ids = set(self.stop_token_ids)

    def _verify_args(self) -> None:
        verify_values(self)

    @property
    def sampling_type(self) -> str:
        if self.temperature < _SAMPLING_EPS:
            return "greedy"
        return "random_seed" if self.seed is not None else "random"

    @property
    def all_stop_token_ids(self) -> set:
        return self._all_stop_token_ids

    def clone(self) -> "SamplingParams":
        # logits processors may hold state that must not be deep-copied (vLLM does the same).
        procs = self.logits_processors
        self.logits_processors = None
        try:
            cloned = copy.deepcopy(self)
        finally:
            self.logits_processors = procs
        cloned.logits_processors = procs
        return cloned


@dataclass
class BeamSearchParams:
    """LLM.beam_search's parameters (vLLM's fields and defaults). temperature is accepted as vLLM accepts it:
    beams are ranked by the raw model logprobs, so it does not change the result."""
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.beam_width, int) or self.beam_width < 1:
            raise ValueError(f"beam_width must be at least 1, got {self.beam_width}.")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if self.temperature < 0.0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}.")
