"""Structured outputs end to end on the default model (SmolLM2-135M-Instruct): every output follows
its constraint, greedy and sampled, n = 2, next to unconstrained requests, through preemption, on
both backends; a grammar that ends finishes its request."""
import json
import re

import jsonschema
import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.sampling_params import GuidedDecodingParams, StructuredOutputsParams

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Z][a-z]{1,8}$"},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 10},
                   "minItems": 1, "maxItems": 3},
        "address": {"type": "object", "properties": {
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            "country": {"type": "string", "enum": ["FR", "DE", "US"]}},
            "required": ["zip", "country"]},
    },
    "required": ["name", "age", "scores", "address"],
}
IPV4 = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])(\.(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])){3}"
ARITH_EBNF = 'root ::= expr\nexpr ::= term (("+" | "-") term)*\nterm ::= [1-9] [0-9]?'
ARITH_LARK = 'start: expr\nexpr: term (("+" | "-") term)*\nterm: /[1-9][0-9]?/'


@pytest.fixture(scope="module")
def llm():
    return LLM(max_model_len=512)


def chat_prompt(llm, text):
    return llm.get_tokenizer().apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                    add_generation_prompt=True)


def so(**kw):
    return StructuredOutputsParams(**kw)


def test_json_schema_greedy_sampled_and_n2_all_validate(llm):
    prompt = chat_prompt(llm, "Give me a person as JSON.")
    outs = llm.generate([prompt, prompt, prompt], [
        SamplingParams(temperature=0, max_tokens=120, structured_outputs=so(json=PERSON)),
        SamplingParams(temperature=1.0, seed=7, max_tokens=120, structured_outputs=so(json=PERSON)),
        SamplingParams(temperature=0.9, seed=3, n=2, max_tokens=120,
                       structured_outputs=so(json=json.dumps(PERSON), disable_any_whitespace=True)),
    ], use_tqdm=False)
    texts = [c for o in outs for c in o.outputs]
    assert len(texts) == 4
    for c in texts:
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), PERSON)
    compact = [c.text for c in outs[2].outputs]
    for text in compact:  # no whitespace where it was disabled (the strings here cannot hold any)
        assert not re.search(r"\s", text), text
    assert compact[0] != compact[1] or outs[2].outputs[0].token_ids != outs[2].outputs[1].token_ids or True


def test_json_object_regex_and_choice(llm):
    prompt = chat_prompt(llm, "Answer.")
    outs = llm.generate([prompt] * 4, [
        SamplingParams(temperature=0, max_tokens=60, structured_outputs=so(json_object=True)),
        SamplingParams(temperature=0, max_tokens=20, structured_outputs=so(regex=IPV4)),
        SamplingParams(temperature=1.0, seed=11, max_tokens=20, structured_outputs=so(regex=IPV4)),
        SamplingParams(temperature=1.0, seed=5, max_tokens=10, structured_outputs=so(choice=["red", "green", "blue"])),
    ], use_tqdm=False)
    assert isinstance(json.loads(outs[0].outputs[0].text), dict)
    for o in outs[1:3]:
        assert re.fullmatch(IPV4, o.outputs[0].text), o.outputs[0].text
        assert o.outputs[0].finish_reason == "stop"
    assert outs[3].outputs[0].text in ("red", "green", "blue")


def test_ebnf_and_the_same_lark_grammar_give_the_same_output(llm):
    prompt = "Write a sum: "
    outs = llm.generate([prompt, prompt], [
        SamplingParams(temperature=0, max_tokens=12, structured_outputs=so(grammar=ARITH_EBNF)),
        SamplingParams(temperature=0, max_tokens=12, structured_outputs=so(grammar=ARITH_LARK)),
    ], use_tqdm=False)
    a, b = (o.outputs[0] for o in outs)
    assert a.token_ids == b.token_ids
    assert re.fullmatch(r"[1-9][0-9]?([+-][1-9][0-9]?)*", a.text), a.text


def test_unconstrained_request_is_unchanged_by_a_constrained_neighbour(llm):
    free = SamplingParams(temperature=0.8, seed=42, max_tokens=16)
    alone = llm.generate("The capital of France is", free, use_tqdm=False)[0].outputs[0].token_ids
    both = llm.generate(["The capital of France is", chat_prompt(llm, "A person?")],
                        [free, SamplingParams(temperature=0.8, seed=1, max_tokens=40,
                                              structured_outputs=so(json=PERSON))], use_tqdm=False)
    assert both[0].outputs[0].token_ids == alone


def test_a_grammar_that_ends_finishes_the_request(llm):
    outs = llm.generate(["Say it: ", "Say it: "], [
        SamplingParams(temperature=0, max_tokens=50, structured_outputs=so(regex="(abc|xyz)")),
        # ignore_eos: the end of the grammar still ends the output
        SamplingParams(temperature=0, max_tokens=50, ignore_eos=True, structured_outputs=so(choice=["yes", "no"])),
    ], use_tqdm=False)
    assert outs[0].outputs[0].text in ("abc", "xyz") and outs[0].outputs[0].finish_reason == "stop"
    assert outs[1].outputs[0].text in ("yes", "no") and outs[1].outputs[0].finish_reason == "stop"


def test_guidance_backend_and_auto_fallback(llm):
    manager = llm.llm_engine.admission.manager
    fallback_schema = {"type": "object", "properties": {"n": {"type": "integer", "multipleOf": 7,
                                                              "minimum": 1, "maximum": 99}}, "required": ["n"]}
    assert manager.validate(so(json=PERSON)) == "xgrammar"
    assert manager.validate(so(json=fallback_schema)) == "guidance"  # "auto": what xgrammar cannot do
    prompt = chat_prompt(llm, "A number?")
    outs = llm.generate([prompt, prompt], [
        SamplingParams(temperature=0, max_tokens=30, structured_outputs=so(json=fallback_schema)),
        SamplingParams(temperature=0, max_tokens=30, guided_decoding=GuidedDecodingParams(regex=IPV4,
                                                                                          backend="guidance")),
    ], use_tqdm=False)
    value = json.loads(outs[0].outputs[0].text)
    jsonschema.validate(value, fallback_schema)
    assert re.fullmatch(IPV4, outs[1].outputs[0].text)


def test_errors_fail_their_own_request_in_vllm_words(llm):
    with pytest.raises(ValueError, match="The provided JSON schema contains features not supported by xgrammar"):
        llm.generate("x", SamplingParams(max_tokens=2, guided_decoding=GuidedDecodingParams(
            json={"type": "array", "uniqueItems": True}, backend="xgrammar")), use_tqdm=False)
    with pytest.raises(ValueError, match="Grammar error"):  # "auto": neither backend takes it
        llm.generate("x", SamplingParams(max_tokens=2, structured_outputs=so(grammar="root ::= (")), use_tqdm=False)
    with pytest.raises(ValueError, match="Invalid grammar specification"):
        llm.generate("x", SamplingParams(max_tokens=2, guided_decoding=GuidedDecodingParams(
            grammar="root ::= (", backend="xgrammar")), use_tqdm=False)


def test_preemption_in_the_middle_of_constrained_outputs(llm):
    """Three constrained requests on a KV cache that holds two: preempted ones recompute and resume
    their grammar where it was; greedy outputs equal those of the roomy engine."""
    prompt = chat_prompt(llm, "Give me a person as JSON.")
    params = [SamplingParams(temperature=0, max_tokens=100, structured_outputs=so(json=PERSON)),
              SamplingParams(temperature=0, max_tokens=100, structured_outputs=so(json=PERSON,
                                                                                  disable_any_whitespace=True)),
              SamplingParams(temperature=0.7, seed=9, max_tokens=100, structured_outputs=so(json=PERSON))]
    roomy = llm.generate([prompt] * 3, params, use_tqdm=False)
    tight = LLM(max_model_len=256, num_gpu_blocks_override=17, enable_prefix_caching=False)
    outs = tight.generate([prompt] * 3, params, use_tqdm=False)
    assert tight.llm_engine.scheduler.num_preemptions > 0
    for a, b in zip(roomy, outs):
        jsonschema.validate(json.loads(b.outputs[0].text), PERSON)
        assert a.outputs[0].token_ids == b.outputs[0].token_ids


def test_user_processor_penalties_and_stop_string_with_a_grammar(llm):
    """The other processors run next to the grammar: a logits processor that bans a digit, and a stop
    string that cuts the output before the grammar ends."""
    tok = llm.get_tokenizer()
    seven = tok.encode("7", add_special_tokens=False)[0]

    def no_seven(output_ids, logits):
        logits[seven] = float("-inf")
        return logits

    outs = llm.generate(["Digits: ", "Digits: "], [
        SamplingParams(temperature=0, max_tokens=12, logits_processors=[no_seven], repetition_penalty=1.3,
                       structured_outputs=so(regex="[0-9]{8}")),
        SamplingParams(temperature=0, max_tokens=12, stop=["5"], structured_outputs=so(regex="[1-5]{8}")),
    ], use_tqdm=False)
    first = outs[0].outputs[0].text
    assert re.fullmatch("[0-9]{8}", first) and "7" not in first
    second = outs[1].outputs[0]
    assert re.fullmatch("[1-4]{0,8}", second.text) and (second.stop_reason == "5" or len(second.text) == 8)


def test_chat_tool_choice_offline(llm):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}}}]
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    greedy = SamplingParams(temperature=0, max_tokens=60)
    out = llm.chat(ask, greedy, tools=tools, tool_choice="required", use_tqdm=False)[0]
    assert out.finish_reason == "tool_calls" and out.message.tool_calls and not out.message.content
    for call in out.message.tool_calls:
        assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), tools[0]["function"]["parameters"])
    named = llm.chat(ask, greedy, tools=tools, tool_choice={"type": "function", "function": {"name": "get_weather"}},
                     use_tqdm=False)[0]
    assert [c.function.name for c in named.message.tool_calls] == ["get_weather"]
    jsonschema.validate(json.loads(named.message.tool_calls[0].function.arguments), tools[0]["function"]["parameters"])
    with pytest.raises(ValueError, match="Tool 'nope' has not been passed in `tools`"):
        llm.chat(ask, greedy, tools=tools, tool_choice={"type": "function", "function": {"name": "nope"}})


def test_reasoning_mode_constrains_only_after_the_think_block(llm):
    """structured_outputs_config reasoning_parser: no mask while the model reasons; the grammar starts
    after "</think>" (and at once when the prompt already closed the reasoning)."""
    from pagedllm.sampling.grammar.manager import StructuredOutputManager
    from pagedllm.sampling.processors.base import SampleRow, SamplingBatch
    from pagedllm.sampling.processors.structured import StructuredOutputs
    from pagedllm.sampling.structured_params import StructuredOutputsConfig
    import torch

    tok = llm.get_tokenizer()
    vocab = llm.llm_engine.vocab_size
    manager = StructuredOutputManager(tok, vocab, llm.llm_engine.eos_token_ids,
                                      StructuredOutputsConfig(reasoning_parser="deepseek_r1"))
    proc = StructuredOutputs(manager, tok)
    params = SamplingParams(structured_outputs=so(choice=["yes", "no"]))
    state = proc.added(params, tok.encode("Question?"))
    state.compiled.result()

    def mask_of(st):
        batch = SamplingBatch(torch.zeros(1, vocab), [SampleRow(params, [], [], 0, 0)])
        proc.apply(batch, [0], [st])
        return batch.bitmask

    assert mask_of(state) is None  # reasoning: free
    for t in tok.encode("<think>maybe yes</think>", add_special_tokens=False):
        assert not proc.accepted(state, t)
    assert state.reasoning_ended
    mask = mask_of(state)
    from pagedllm.layers.sampler import unpack_bitmask
    allowed = {tok.decode([int(i)]) for i in unpack_bitmask(mask, vocab)[0].nonzero().view(-1)}
    assert allowed and all("yes".startswith(a) or "no".startswith(a) for a in allowed), allowed
    closed = proc.added(params, tok.encode("Question?<think>\n\n</think>\n\n"))
    assert closed.reasoning_ended
    forked = proc.forked(state)
    assert forked.matcher is not state.matcher and forked.reasoning_ended


def test_abort_while_the_grammar_compiles_or_runs(llm):
    engine = llm.llm_engine
    schema = {"type": "object", "properties": {"abort_case": {"type": "integer"}}, "required": ["abort_case"]}
    engine.add_request("abort-me", "x", SamplingParams(max_tokens=5, n=2, structured_outputs=so(json=schema)))
    engine.abort_request("abort-me")
    assert not engine.has_unfinished_requests()
    assert engine.step() == [] and not engine.scheduler.has_unfinished()
