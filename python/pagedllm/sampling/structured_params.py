"""StructuredOutputsParams (vLLM's current form) and GuidedDecodingParams (vLLM 0.10's): one
constraint per request, validated in __post_init__ with vLLM's wording."""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Union

BACKENDS = ("auto", "xgrammar", "guidance")
_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass
class StructuredOutputsParams:
    json: Optional[Union[str, dict]] = None          # a JSON schema (dict or its JSON text)
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None                     # EBNF (GBNF) or Lark
    json_object: Optional[bool] = None                # any JSON object
    structural_tag: Optional[str] = None              # xgrammar's structural tag, as JSON text
    disable_fallback: bool = False
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: Optional[str] = None
    # Filled by the engine: the backend that compiled the grammar, and whether "auto" chose it.
    _backend: Optional[str] = field(default=None, init=False, repr=False, compare=False)
    _backend_was_auto: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.json_object is False:
            self.json_object = None
        count = sum(getattr(self, k) is not None for k in _KINDS)
        if count > 1:
            raise ValueError("You can only use one kind of structured outputs constraint but multiple are "
                             f"specified: {self._public_dict()}")
        if count < 1:
            raise ValueError("You must use one kind of structured outputs constraint but none are specified: "
                             f"{self._public_dict()}")
        if self.choice is not None:
            if not isinstance(self.choice, (list, tuple)) or not self.choice:
                raise ValueError("choice must be a non-empty list of strings, got "
                                 f"{self.choice!r}")
            if not all(isinstance(c, str) for c in self.choice):
                raise ValueError(f"choice must be a list of strings, got {self.choice!r}")
            self.choice = list(self.choice)
        if self.json is not None and not isinstance(self.json, (str, dict)):
            # pydantic models: their JSON schema, as vLLM accepts them
            schema_of = getattr(self.json, "model_json_schema", None)
            if schema_of is None:
                raise ValueError(f"json must be a JSON schema (a dict or its JSON text), got {type(self.json).__name__}")
            self.json = schema_of()

    def _public_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}

    @property
    def kind(self) -> str:
        return next(k for k in _KINDS if getattr(self, k) is not None)

    def schema(self) -> Optional[dict]:
        """The JSON schema as a dict (json given as text is parsed); None for the other kinds."""
        if self.json is None:
            return None
        if isinstance(self.json, dict):
            return self.json
        try:
            parsed = json.loads(self.json)
        except json.JSONDecodeError as e:
            raise ValueError(f"Invalid JSON schema: {e}") from e
        if not isinstance(parsed, (dict, bool)):
            raise ValueError("Invalid JSON schema: a schema is an object")
        return parsed if isinstance(parsed, dict) else {}

    def cache_key(self) -> str:
        """What identifies the compiled grammar (the backend is added by the compiler)."""
        kind = self.kind
        value: Any = getattr(self, kind)
        if kind == "json":
            value = self.schema()
        return json.dumps([kind, value, self.disable_any_whitespace, self.disable_additional_properties,
                           self.whitespace_pattern], sort_keys=True, default=str)


@dataclass
class GuidedDecodingParams(StructuredOutputsParams):
    """vLLM 0.10's name for the same thing; its `backend` field picks the backend of this request."""
    backend: Optional[str] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"Unsupported guided decoding backend '{self.backend}'; supported: "
                             f"{', '.join(BACKENDS)}.")


@dataclass
class StructuredOutputsConfig:
    """LLM(structured_outputs_config={...}): the engine-wide backend and the reasoning mode."""
    backend: str = "auto"
    disable_fallback: bool = False
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    # "deepseek_r1" / "qwen3" / "think": the constraint starts after the model's "</think>" (vLLM's
    # reasoning-aware structured outputs); None: from the first output token.
    reasoning_parser: Optional[str] = None

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"Invalid structured outputs backend '{self.backend}'. Supported backends: "
                             f"{', '.join(BACKENDS)}.")
        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_PARSERS:
            raise ValueError(f"reasoning_parser must be one of {sorted(REASONING_PARSERS)}, got "
                             f"{self.reasoning_parser!r}.")

    @classmethod
    def from_any(cls, value) -> "StructuredOutputsConfig":
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = set(value) - {f.name for f in fields(cls)}
            if unknown:
                raise ValueError(f"Unknown structured_outputs_config keys: {sorted(unknown)}")
            return cls(**value)
        raise ValueError(f"structured_outputs_config must be a dict, got {type(value).__name__}")


# Every supported reasoning parser marks the end of its reasoning with the same tag.
REASONING_PARSERS = {"deepseek_r1": "</think>", "qwen3": "</think>", "think": "</think>"}


def structured_of(params) -> Optional[StructuredOutputsParams]:
    """The constraint of a SamplingParams (structured_outputs, or 0.10's guided_decoding)."""
    so = getattr(params, "structured_outputs", None)
    return so if so is not None else getattr(params, "guided_decoding", None)


def normalize(params) -> None:
    """SamplingParams.__post_init__: dicts become params objects; guided_decoding becomes structured_outputs.
    Idempotent (the engine validates a clone again): after a first call both fields hold the same object."""
    so, gd = params.structured_outputs, params.guided_decoding
    if isinstance(so, dict):
        so = StructuredOutputsParams(**so)
    if isinstance(gd, dict):
        gd = GuidedDecodingParams(**gd)
    if so is not None and gd is not None and so is not gd:
        raise ValueError("Cannot set both structured_outputs and guided_decoding; use structured_outputs.")
    for value, name in ((so, "structured_outputs"), (gd, "guided_decoding")):
        if value is not None and not isinstance(value, StructuredOutputsParams):
            raise ValueError(f"{name} must be a StructuredOutputsParams, got {type(value).__name__}")
    params.structured_outputs = so if so is not None else gd
    params.guided_decoding = gd
