"""The structured-output fields of an OpenAI request -> SamplingParams.structured_outputs:
`response_format` (json_schema / json_object / text), `structured_outputs` in the body (what the
openai client sends through extra_body), vLLM 0.10's guided_json / guided_regex / guided_choice /
guided_grammar (+ guided_whitespace_pattern, guided_decoding_backend), and, for chat,
tool_choice "required" / named (pagedllm.chat.tool_choice). Errors are ValueErrors: the server
answers them as OpenAI-shaped 400s."""
from __future__ import annotations

from typing import Any, Optional

from pagedllm.chat import tool_choice as forced_tools
from pagedllm.sampling.structured_params import GuidedDecodingParams, StructuredOutputsParams

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def _extra(req, name: str) -> Any:
    return (req.model_extra or {}).get(name) if hasattr(req, "model_extra") else None


def from_response_format(response_format: Optional[dict]) -> Optional[StructuredOutputsParams]:
    if not response_format:
        return None
    kind = response_format.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if schema is None:
            raise ValueError("response_format of type json_schema needs json_schema.schema (a JSON schema).")
        if not isinstance(schema, (dict, str)):
            raise ValueError("response_format json_schema.schema must be a JSON schema object.")
        return StructuredOutputsParams(json=schema)
    if kind == "structural_tag":
        import json
        return StructuredOutputsParams(structural_tag=json.dumps({k: v for k, v in response_format.items()
                                                                   if k != "type"}))
    raise ValueError(f"response_format type must be text, json_object or json_schema, got {kind!r}.")


def _from_body(req) -> Optional[StructuredOutputsParams]:
    body = _extra(req, "structured_outputs")
    if body is None:
        return None
    if not isinstance(body, dict):
        raise ValueError("structured_outputs must be an object.")
    try:
        return StructuredOutputsParams(**body)
    except TypeError as e:  # an unknown field
        raise ValueError(f"structured_outputs: {e}") from None


def _from_guided(req) -> Optional[StructuredOutputsParams]:
    fields = {ours: _extra(req, theirs) for theirs, ours in _GUIDED.items() if _extra(req, theirs) is not None}
    if not fields:
        return None
    ws = _extra(req, "guided_whitespace_pattern")
    backend = _extra(req, "guided_decoding_backend")
    return GuidedDecodingParams(**fields, whitespace_pattern=ws, backend=backend)


def request_constraint(req, tools: Optional[list] = None) -> Optional[StructuredOutputsParams]:
    """The one constraint of a request (ValueError when it asks for more than one, or a bad one)."""
    found = [c for c in (from_response_format(getattr(req, "response_format", None)), _from_body(req),
                         _from_guided(req)) if c is not None]
    tool_choice = getattr(req, "tool_choice", None)
    if hasattr(req, "tool_choice"):
        forced = forced_tools.tool_choice_constraint(tool_choice, tools)
        if forced is not None:
            found.append(forced)
    if len(found) > 1:
        raise ValueError("You can only use one kind of structured outputs constraint but multiple are specified "
                         "(response_format, structured_outputs, guided_* and a forced tool_choice).")
    return found[0] if found else None


def apply_request_constraint(req, params, tools: Optional[list] = None) -> None:
    """Sets params.structured_outputs from the request's fields."""
    constraint = request_constraint(req, tools)
    if constraint is not None:
        params.structured_outputs = constraint
