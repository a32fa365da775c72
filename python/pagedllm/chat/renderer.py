"""One chooser of chat template and tool-call parser, and one renderer, for every chat entry point: offline
LLM.chat (chat/chat.py), the server's /v1/chat/completions (serving_chat.py) and `pagedllm chat` (cli.py).

Template: the call's chat_template, else the renderer's default (the server's --chat-template), else the
tokenizer's own, else the one pagedllm ships for the model type (template.resolve_chat_template). A template that
comes with a server request is used as template text only, never as a file path or a shipped name.
Tool parser: a parser named for the call is always used; otherwise, only when tools are given: the renderer's
default (the server's --tool-call-parser), else the format the template's text names (pick_tool_parser), else
AutoToolParser, which recognises each known format in the output (tool_parsers/auto.py says how).
"""
from __future__ import annotations

import os
from typing import Any, Optional, Sequence, Union

from pagedllm.chat.template import (ChatTemplateContentFormatOption, prepare_messages, render_chat_template,
                                    resolve_chat_template, resolve_content_format, special_token_vars)
from pagedllm.chat.render_pool import RenderLimits
from pagedllm.chat.tool_parsers.auto import AutoToolParser
from pagedllm.chat.tool_parsers.base import ToolParser
from pagedllm.chat.tool_parsers.registry import get_tool_parser, pick_tool_parser


class ChatRenderer:
    def __init__(self, tokenizer, *, chat_template: Union[str, os.PathLike, None] = None,
                 tool_parser: Optional[str] = None, content_format: ChatTemplateContentFormatOption = "auto",
                 model_type: Optional[str] = None):
        if tool_parser is not None:
            get_tool_parser(tool_parser)   # an unknown name fails now, listing the known ones
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.tool_parser = tool_parser
        self.content_format = content_format
        self.model_type = model_type

    def template_for(self, chat_template: Union[str, os.PathLike, None] = None, tools: Optional[list] = None, *,
                     template_text_only: bool = False) -> str:
        """The template text. template_text_only: chat_template (from a request) is the text itself."""
        if chat_template is not None and template_text_only:
            return chat_template
        chosen = chat_template if chat_template is not None else self.chat_template
        return resolve_chat_template(self.tokenizer, chosen, tools=tools, model_type=self.model_type)

    def render(self, conversation: Sequence, *, template: str, tools: Optional[list] = None,
               documents: Optional[list] = None, add_generation_prompt: bool = True,
               continue_final_message: bool = False, chat_template_kwargs: Optional[dict] = None,
               content_format: Optional[ChatTemplateContentFormatOption] = None,
               limits: Optional[RenderLimits] = None) -> str:
        """One conversation rendered with template (template_for's text), under limits (the process default when
        None: render_pool.py)."""
        fmt = resolve_content_format(template, content_format or self.content_format)
        variables = {**special_token_vars(self.tokenizer), **(chat_template_kwargs or {})}
        return render_chat_template(template, prepare_messages(conversation, fmt), tools=tools, documents=documents,
                                    add_generation_prompt=add_generation_prompt,
                                    continue_final_message=continue_final_message, limits=limits, **variables)

    def tool_parser_for(self, template: str, tools: Optional[list], name: Optional[str] = None
                        ) -> Optional[ToolParser]:
        """A fresh parser instance for one request's output, or None (no tools and no parser named)."""
        if name is None:
            if not tools:
                return None
            name = self.tool_parser or pick_tool_parser(template)
        cls: Any = AutoToolParser if name is None else get_tool_parser(name)
        return cls(self.tokenizer)
