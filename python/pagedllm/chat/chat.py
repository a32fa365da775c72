"""LLM.chat: render each conversation with its chat template, generate, and read the answer back into a
ChatCompletionOutput (the seed's .message / .finish_reason on top of vLLM's RequestOutput)."""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Optional, Sequence, Union

from pagedllm.chat.renderer import ChatRenderer
from pagedllm.chat.template import CONTINUE_GENERATION_ERROR, ChatTemplateContentFormatOption
from pagedllm.outputs import ChatCompletionOutput, ChatMessage, RequestOutput

# chat_template_kwargs may set these chat() arguments too (as in vLLM, where they are merged into one dict).
_CHAT_ARGUMENTS = ("add_generation_prompt", "continue_final_message", "tools", "documents", "chat_template")


def _is_conversation_list(messages) -> bool:
    """chat([conv1, conv2]) is a batch; chat([msg1, msg2]) is one conversation."""
    return (isinstance(messages, (list, tuple)) and len(messages) > 0
            and all(isinstance(m, (list, tuple)) for m in messages))


def render_conversations(tokenizer, conversations: Sequence[Sequence], *, chat_template=None,
                         chat_template_content_format: ChatTemplateContentFormatOption = "auto",
                         add_generation_prompt: bool = True, continue_final_message: bool = False,
                         tools: Optional[list] = None, documents: Optional[list] = None,
                         chat_template_kwargs: Optional[dict] = None,
                         model_type: Optional[str] = None) -> tuple[str, list[str]]:
    """(template text, one rendered prompt per conversation), through the shared ChatRenderer."""
    renderer = ChatRenderer(tokenizer, content_format=chat_template_content_format, model_type=model_type)
    template = renderer.template_for(chat_template, tools)
    prompts = [renderer.render(conv, template=template, tools=tools, documents=documents,
                               add_generation_prompt=add_generation_prompt,
                               continue_final_message=continue_final_message, chat_template_kwargs=chat_template_kwargs)
               for conv in conversations]
    return template, prompts


def to_chat_output(out: RequestOutput, parser=None) -> ChatCompletionOutput:
    """The ChatCompletionOutput of one finished request: outputs[0].text read as the assistant message
    (reasoning split off when the text closes a <think> block, tool calls parsed when a parser is given)."""
    base = {f.name: getattr(out, f.name) for f in dataclasses.fields(RequestOutput)}
    first = out.outputs[0] if out.outputs else None
    text = first.text if first is not None else ""
    finish_reason = first.finish_reason if first is not None else None
    message = ChatMessage(role="assistant", content=text)
    content = text
    if "</think>" in text:
        try:
            from pagedllm.chat.reasoning import split_reasoning
        except ImportError:
            split_reasoning = None
        if split_reasoning is not None:
            reasoning, content = split_reasoning(text)
            message.reasoning_content = reasoning
            message.content = content
    if parser is not None and content:
        try:
            result = parser.extract_tool_calls(content)
        except Exception:  # a parser that trips on malformed output must not fail the request
            result = None
        if result is not None and result.tools_called and result.tool_calls:
            message.tool_calls = list(result.tool_calls)
            message.content = result.content if result.content and result.content.strip() else None
            finish_reason = "tool_calls"
    return ChatCompletionOutput(**base, message=message, finish_reason=finish_reason)


def chat(llm, messages, sampling_params=None, *, use_tqdm: bool = True,
         chat_template: Union[str, os.PathLike, None] = None,
         chat_template_content_format: ChatTemplateContentFormatOption = "auto",
         add_generation_prompt: bool = True, continue_final_message: bool = False,
         tools: Optional[list] = None, documents: Optional[list] = None,
         chat_template_kwargs: Optional[dict] = None, tool_parser: Optional[str] = None,
         mm_processor_kwargs: Optional[dict] = None, tool_choice=None) -> list[ChatCompletionOutput]:
    """The logic of LLM.chat (see there)."""
    from pagedllm.chat import tool_choice as forced_tools
    from pagedllm.llm import RequestErrors

    if isinstance(messages, Mapping) or not isinstance(messages, (list, tuple)):
        raise TypeError("chat() takes a conversation (a list of message dicts) or a list of conversations, "
                        f"got {type(messages).__name__}")
    conversations = list(messages) if _is_conversation_list(messages) else [messages]
    if any(len(conv) == 0 for conv in conversations):
        raise ValueError("A conversation must hold at least one message.")
    kwargs = dict(chat_template_kwargs or {})
    overrides = {k: kwargs.pop(k) for k in _CHAT_ARGUMENTS if k in kwargs}
    add_generation_prompt = overrides.get("add_generation_prompt", add_generation_prompt)
    continue_final_message = overrides.get("continue_final_message", continue_final_message)
    tools = overrides.get("tools", tools)
    documents = overrides.get("documents", documents)
    chat_template = overrides.get("chat_template", chat_template)
    if add_generation_prompt and continue_final_message:
        raise ValueError(CONTINUE_GENERATION_ERROR)
    constraint = forced_tools.tool_choice_constraint(tool_choice, tools)  # "required" / named: a JSON schema
    if tool_choice == "none":
        tools = None
    # mm_processor_kwargs only concern multimodal processors; pagedllm's models are text-only.

    engine = llm.llm_engine
    tokenizer = llm.get_tokenizer()
    model_type = getattr(getattr(engine, "hf_config", None), "model_type", None)
    template, texts = render_conversations(
        tokenizer, conversations, chat_template=chat_template,
        chat_template_content_format=chat_template_content_format, add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message, tools=tools, documents=documents,
        chat_template_kwargs=kwargs, model_type=model_type)
    parser = ChatRenderer(tokenizer).tool_parser_for(template, tools, tool_parser) if constraint is None else None
    if constraint is not None:
        sampling_params = forced_tools.constrained_params(sampling_params, constraint, len(conversations),
                                                          llm.get_default_sampling_params)
    # The template already wrote the special tokens (BOS, turn markers): the tokenizer must not add them again.
    prompts = [{"prompt_token_ids": tokenizer.encode(text, add_special_tokens=False), "prompt": text}
               for text in texts]
    try:
        outputs = llm.generate(prompts, sampling_params, use_tqdm=use_tqdm)
    except RequestErrors as e:  # some conversations failed: the others' answers still come back, as chat outputs
        e.outputs = [_chat_output(o, parser, tool_choice, constraint) if o is not None else None for o in e.outputs]
        raise
    return [_chat_output(out, parser, tool_choice, constraint) for out in outputs]


def _chat_output(out: RequestOutput, parser, tool_choice, constraint) -> ChatCompletionOutput:
    result = to_chat_output(out, parser)
    if constraint is not None:  # the output is the forced tool calls' JSON
        from pagedllm.chat.tool_choice import forced_tool_message
        forced_tool_message(result, tool_choice)
    return result
