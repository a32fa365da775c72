"""LLM.chat end to end: the seed's example on the default model (SmolLM2-135M-Instruct), multi-turn, continue,
batches, a tool call forced through a logits processor and parsed, the GPT-2 fallback template on a tiny model."""
import json

import pytest
import torch

from model_factory import make_tiny_model
from pagedllm import LLM, ChatCompletionOutput, SamplingParams
from pagedllm.chat.template import CONTINUE_GENERATION_ERROR

GREEDY = SamplingParams(temperature=0, max_tokens=24)
SEED_MESSAGES = [{"role": "system", "content": "You are a helpful assistant."},
                 {"role": "user", "content": "What is the capital of France?"}]
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}


@pytest.fixture(scope="module")
def llm():
    return LLM(max_model_len=1024)


def forcing(token_ids, eos_id):
    """A logits processor that lets through only the next of token_ids, then EOS."""
    def processor(output_ids, logits):
        step = len(output_ids)
        target = token_ids[step] if step < len(token_ids) else eos_id
        masked = torch.full_like(logits, float("-inf"))
        masked[target] = logits[target]
        return masked
    return processor


def forced_chat(llm, text, **kwargs):
    tok = llm.get_tokenizer()
    ids = tok.encode(text, add_special_tokens=False)
    params = SamplingParams(temperature=0, max_tokens=len(ids) + 4,
                            logits_processors=[forcing(ids, tok.eos_token_id)])
    out = llm.chat(SEED_MESSAGES, params, use_tqdm=False, **kwargs)[0]
    assert out.outputs[0].text == text  # the forcing worked: the model said exactly this
    return out


# --- the seed's example and vLLM's output shape ---------------------------------------------------------

def test_seed_example_names_paris(llm):
    response = llm.chat(SEED_MESSAGES, GREEDY, use_tqdm=False)
    assert len(response) == 1 and isinstance(response[0], ChatCompletionOutput)
    out = response[0]
    assert "Paris" in out.message.content
    assert out.message.content == out.outputs[0].text  # the seed's and vLLM's reading agree
    assert out.message.role == "assistant" and out.message.tool_calls == [] and out.message.reasoning_content is None
    assert out.finish_reason == out.outputs[0].finish_reason == "stop"
    assert out.finished and "<|im_end|>" not in out.message.content


def test_prompt_is_the_models_template_tokenized_once(llm):
    tok = llm.get_tokenizer()
    out = llm.chat(SEED_MESSAGES, SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)[0]
    expected = tok.apply_chat_template(SEED_MESSAGES, tokenize=False, add_generation_prompt=True)
    assert out.prompt == expected  # the tokenizer's own template (GGUF metadata)
    assert out.prompt.endswith("<|im_start|>assistant\n")
    # no special token added on top of the ones the template wrote
    assert out.prompt_token_ids == tok.encode(expected, add_special_tokens=False)
    assert out.prompt_token_ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3


def test_multi_turn(llm):
    conversation = SEED_MESSAGES + [{"role": "assistant", "content": "The capital of France is Paris."},
                                    {"role": "user", "content": "And what is the capital of Germany?"}]
    out = llm.chat(conversation, GREEDY, use_tqdm=False)[0]
    assert "Berlin" in out.message.content
    assert out.prompt.count("<|im_start|>") == 5 and "The capital of France is Paris.<|im_end|>" in out.prompt


def test_continue_final_message(llm):
    conversation = SEED_MESSAGES + [{"role": "assistant", "content": "The capital of France is"}]
    out = llm.chat(conversation, GREEDY, use_tqdm=False, add_generation_prompt=False,
                   continue_final_message=True)[0]
    assert out.prompt.endswith("<|im_start|>assistant\nThe capital of France is")
    assert "Paris" in out.message.content and not out.message.content.startswith("The capital")
    with pytest.raises(ValueError) as e:
        llm.chat(conversation, GREEDY, use_tqdm=False, continue_final_message=True)
    assert str(e.value) == CONTINUE_GENERATION_ERROR


def test_batch_keeps_order_and_takes_a_list_of_params(llm):
    questions = ["What is the capital of France?", "Say hello.", "What is the capital of Germany?"]
    conversations = [[SEED_MESSAGES[0], {"role": "user", "content": q}] for q in questions]
    outs = llm.chat(conversations, GREEDY, use_tqdm=False)
    assert [o.prompt.split("<|im_start|>user\n")[1].split("<|im_end|>")[0] for o in outs] == questions
    assert "Paris" in outs[0].message.content and "Berlin" in outs[2].message.content
    # a batch answers as the conversations one by one do (greedy)
    assert [o.message.content for o in outs] == \
        [llm.chat(c, GREEDY, use_tqdm=False)[0].message.content for c in conversations]
    short = SamplingParams(temperature=0, max_tokens=2)
    mixed = llm.chat(conversations[1:], [short, GREEDY], use_tqdm=False)
    assert len(mixed[0].outputs[0].token_ids) == 2 and mixed[0].finish_reason == "length"
    assert mixed[1].message.content == outs[2].message.content
    with pytest.raises(ValueError, match="lengths of prompts and params must be the same"):
        llm.chat(conversations, [short, GREEDY], use_tqdm=False)


def test_list_content_parts_are_joined_for_a_string_template(llm):
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is the capital"},
                                             {"type": "text", "text": "of France?"}]}]
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)[0]
    assert "<|im_start|>user\nWhat is the capital\nof France?<|im_end|>" in out.prompt
    with pytest.raises(ValueError, match="text-only"):
        llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], use_tqdm=False)


def test_template_argument_path_documents_and_kwargs(llm, tmp_path):
    path = tmp_path / "tpl.jinja"
    path.write_text("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                    "{% if documents %}<|im_start|>system\n{% for d in documents %}{{ d.title }}: {{ d.text }}\n"
                    "{% endfor %}<|im_end|>\n{% endif %}{{ '<|im_start|>' + speaker + '\n' }}")
    docs = [{"title": "Atlas", "text": "The capital of France is Paris."}]
    out = llm.chat(SEED_MESSAGES, SamplingParams(temperature=0, max_tokens=2), use_tqdm=False,
                   chat_template=str(path), documents=docs, chat_template_kwargs={"speaker": "assistant"})[0]
    assert "Atlas: The capital of France is Paris.\n" in out.prompt
    assert out.prompt.endswith("<|im_start|>assistant\n")
    shipped = llm.chat(SEED_MESSAGES, SamplingParams(temperature=0, max_tokens=2), use_tqdm=False,
                       chat_template="chatml_hermes_tools", documents=docs)[0]
    assert '{"title": "Atlas", "text": "The capital of France is Paris."}' in shipped.prompt


def test_bad_input(llm):
    with pytest.raises(ValueError, match="at least one message"):
        llm.chat([], use_tqdm=False)
    with pytest.raises(TypeError, match="list of message dicts"):
        llm.chat({"role": "user", "content": "hi"}, use_tqdm=False)


# --- tool calls and reasoning, the model's output forced ------------------------------------------------

TOOL_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'


def test_tool_call_parsed_end_to_end(llm):
    out = forced_chat(llm, TOOL_CALL, tools=[WEATHER_TOOL], chat_template="chatml_hermes_tools")
    assert "<tools>\n" + json.dumps(WEATHER_TOOL) in out.prompt  # the tools reached the template
    [call] = out.message.tool_calls
    assert call.type == "function" and call.id
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}
    assert out.message.content is None
    assert out.finish_reason == "tool_calls" and out.outputs[0].finish_reason == "stop"


def test_tool_call_with_text_before_it_and_an_explicit_parser(llm):
    out = forced_chat(llm, "Let me check.\n" + TOOL_CALL, tool_parser="hermes")  # no tools, parser named
    assert out.message.content.strip() == "Let me check."
    assert [c.function.name for c in out.message.tool_calls] == ["get_weather"]
    assert out.finish_reason == "tool_calls"


def test_no_tools_no_parser_leaves_the_text_alone(llm):
    out = forced_chat(llm, TOOL_CALL)  # neither tools nor tool_parser: nothing is parsed
    assert out.message.content == TOOL_CALL and out.message.tool_calls == [] and out.finish_reason == "stop"


def test_malformed_tool_call_stays_content(llm):
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'
    out = forced_chat(llm, text, tools=[WEATHER_TOOL], chat_template="chatml_hermes_tools")
    assert out.message.tool_calls == [] and out.finish_reason == "stop"
    assert out.message.content == text


@pytest.mark.parametrize("text,expected_content", [
    (TOOL_CALL, None),
    ('{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}', None),
    ('Checking.[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]', "Checking."),
    ("[get_weather(city='Paris', unit='celsius')]", None),
])
def test_tool_call_found_in_any_format_when_the_template_names_none(llm, text, expected_content):
    from pagedllm.chat.tool_parsers.registry import pick_tool_parser
    assert pick_tool_parser(llm.get_tokenizer().chat_template) is None   # the default model's template names none
    out = forced_chat(llm, text, tools=[WEATHER_TOOL])
    [call] = out.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}
    assert out.message.content == expected_content and out.finish_reason == "tool_calls"


def test_reasoning_is_split_off(llm):
    out = forced_chat(llm, "<think>\nFrance's capital is Paris.\n</think>\n\nParis.")
    assert out.message.reasoning_content == "France's capital is Paris."
    assert out.message.content == "Paris."
    assert out.finish_reason == "stop"


# --- tiny models: the GPT-2 fallback template, and a model with none ------------------------------------

@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny-chat")


def test_gpt2_gets_the_eos_template(tiny_root):
    llm = LLM(str(make_tiny_model(tiny_root, "gpt2")), kv_cache_space=0.05, max_model_len=256)
    tok = llm.get_tokenizer()
    assert not tok.chat_template
    conversation = [{"role": "system", "content": "ignored"}, {"role": "user", "content": "Hello world!"},
                    {"role": "assistant", "content": "I am fine."}, {"role": "user", "content": "How are you?"}]
    out = llm.chat(conversation, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)[0]
    eos = tok.eos_token
    assert out.prompt == f"Hello world!{eos}I am fine.{eos}How are you?{eos}"
    assert out.prompt_token_ids == tok.encode(out.prompt, add_special_tokens=False)
    assert out.message.content == out.outputs[0].text and len(out.outputs[0].token_ids) == 3


def test_model_without_template_says_how_to_pass_one(tiny_root):
    llm = LLM(str(make_tiny_model(tiny_root, "llama")), kv_cache_space=0.05, max_model_len=256)
    with pytest.raises(ValueError, match="chat_template="):
        llm.chat([{"role": "user", "content": "Hello"}], use_tqdm=False)
    out = llm.chat([{"role": "user", "content": "Hello"}], SamplingParams(temperature=0, max_tokens=2),
                   use_tqdm=False, chat_template="llama3_json_tools")[0]
    assert out.prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
