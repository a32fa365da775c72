"""Tool-call parsers: one file per format behind a registry (hermes, llama3_json, mistral, pythonic), and auto
(any of them, recognised in the output)."""
from pagedllm.chat.tool_parsers.base import (DeltaMessage, DeltaToolCall, ExtractedToolCalls, ToolParser,
                                             make_tool_call_id)
from pagedllm.chat.tool_parsers.registry import (get_tool_parser, list_tool_parsers, pick_tool_parser,
                                                 register_tool_parser)
from pagedllm.chat.tool_parsers import auto, hermes, llama3_json, mistral, pythonic  # noqa: F401  (registers them)

__all__ = ["DeltaMessage", "DeltaToolCall", "ExtractedToolCalls", "ToolParser", "make_tool_call_id",
           "get_tool_parser", "list_tool_parsers", "pick_tool_parser", "register_tool_parser"]
