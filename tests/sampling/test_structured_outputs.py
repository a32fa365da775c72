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
                   "minItems": 1, "maxItems": 2},
        "address": {"type": "object", "properties": {
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            "country": {"type": "string", "enum": ["FR", "DE", "US"]}},
            "required": ["zip", "country"]},
    },
    "required": ["name", "age", "scores", "address"],
}
IPV4 = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])(\.(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])){3}"
pytestmark = pytest.mark.slow  # the default model on a CPU: minutes
ARITH_EBNF = 'root ::= term ("+" | "-") term\nterm ::= [1-9] [0-9]?'
ARITH_LARK = 'start: term ("+" | "-") term\nterm: /[1-9][0-9]?/'


@pytest.fixture(scope="module")
def llm():
    return LLM(max_model_len=512)


def chat_prompt(llm, text):
    return llm.get_tokenizer().apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                    add_generation_prompt=True)


def so(**kw):
    return StructuredOutputsParams(**kw)


FALLBACK_SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "multipleOf": 7, "minimum": 1,
                                                          "maximum": 99}}, "required": ["n"]}
FREE_PROMPT = "The capital of France is"
FREE = SamplingParams(temperature=0.8, seed=42, max_tokens=8)
REQUESTS: dict = {}  # the batch's (prompt, params) by name


@pytest.fixture(scope="module")
def batch(llm):
    """Every kind of constraint next to an unconstrained request, in one batch (the machine is slow:
    one batch costs one step per token of the longest output)."""
    tok = llm.get_tokenizer()
    seven = tok.encode("7", add_special_tokens=False)[0]

    def no_seven(output_ids, logits):
        logits[seven] = float("-inf")
        return logits

    person = chat_prompt(llm, "Give me a person as JSON.")
    compact = dict(json=PERSON, disable_any_whitespace=True)
    requests = {
        "person_greedy": (person, SamplingParams(temperature=0, max_tokens=90, structured_outputs=so(json=PERSON))),
        "person_sampled": (person, SamplingParams(temperature=1.0, seed=7, max_tokens=60,
                                                  structured_outputs=so(**compact))),
        "person_n2": (person, SamplingParams(temperature=0.9, seed=3, n=2, max_tokens=60,
                                             structured_outputs=so(json=json.dumps(PERSON),
                                                                   disable_any_whitespace=True))),
        "json_object": (chat_prompt(llm, 'Reply with the JSON object {"ok": true}.'),
                        SamplingParams(temperature=0, max_tokens=30,
                                       structured_outputs=so(json_object=True, disable_any_whitespace=True))),
        "ipv4_greedy": ("An IP address: ", SamplingParams(temperature=0, max_tokens=20,
                                                          structured_outputs=so(regex=IPV4))),
        "ipv4_sampled": ("An IP address: ", SamplingParams(temperature=1.0, seed=11, max_tokens=20,
                                                           structured_outputs=so(regex=IPV4))),
        "choice": (chat_prompt(llm, "A colour?"), SamplingParams(temperature=1.0, seed=5, max_tokens=10,
                                                                 structured_outputs=so(choice=["red", "green", "blue"]))),
        "ebnf": ("Write a sum: ", SamplingParams(temperature=0, max_tokens=12, structured_outputs=so(grammar=ARITH_EBNF))),
        "lark": ("Write a sum: ", SamplingParams(temperature=0, max_tokens=12, structured_outputs=so(grammar=ARITH_LARK))),
        "ends": ("Say it: ", SamplingParams(temperature=0, max_tokens=50, structured_outputs=so(regex="(abc|xyz)"))),
        # ignore_eos: the end of the grammar still ends the output
        "ends_ignore_eos": ("Say it: ", SamplingParams(temperature=0, max_tokens=50, ignore_eos=True,
                                                       structured_outputs=so(choice=["yes", "no"]))),
        "free": (FREE_PROMPT, FREE),
        "processor": ("Digits: ", SamplingParams(temperature=0, max_tokens=12, logits_processors=[no_seven],
                                                 repetition_penalty=1.3, structured_outputs=so(regex="[0-9]{8}"))),
        "stop_string": ("Digits: ", SamplingParams(temperature=0, max_tokens=12, stop=["5"],
                                                   structured_outputs=so(regex="[1-5]{8}"))),
        "fallback": (chat_prompt(llm, "A number?"), SamplingParams(
            temperature=0, max_tokens=20, structured_outputs=so(json=FALLBACK_SCHEMA, disable_any_whitespace=True))),
        "guidance": ("An IP address: ", SamplingParams(temperature=0, max_tokens=20, guided_decoding=GuidedDecodingParams(
            regex=IPV4, backend="guidance"))),
    }
    outs = llm.generate([p for p, _ in requests.values()], [sp for _, sp in requests.values()], use_tqdm=False)
    REQUESTS.update(requests)
    return dict(zip(requests, outs))


def test_json_schema_greedy_sampled_and_n2_all_validate(batch):
    outputs = [c for k in ("person_greedy", "person_sampled", "person_n2") for c in batch[k].outputs]
    assert len(outputs) == 4
    for c in outputs:
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), PERSON)
    for c in outputs[1:]:  # no whitespace where it was disabled (the strings here cannot hold any)
        assert not re.search(r"\s", c.text), c.text
    assert "\n" in outputs[0].text  # whitespace allowed: the model indents


def test_json_object_regex_and_choice(batch):
    assert isinstance(json.loads(batch["json_object"].outputs[0].text), dict)
    for k in ("ipv4_greedy", "ipv4_sampled"):
        out = batch[k].outputs[0]
        assert re.fullmatch(IPV4, out.text) and out.finish_reason == "stop", out.text
    assert batch["choice"].outputs[0].text in ("red", "green", "blue")


def test_ebnf_and_the_same_lark_grammar_give_the_same_output(batch):
    a, b = batch["ebnf"].outputs[0], batch["lark"].outputs[0]
    assert a.token_ids == b.token_ids and a.finish_reason == "stop"
    assert re.fullmatch(r"[1-9][0-9]?[+-][1-9][0-9]?", a.text), a.text


def test_unconstrained_request_is_unchanged_by_constrained_neighbours(llm, batch):
    alone = llm.generate(FREE_PROMPT, FREE, use_tqdm=False)[0].outputs[0].token_ids
    assert batch["free"].outputs[0].token_ids == alone


def test_a_grammar_that_ends_finishes_the_request(batch):
    assert batch["ends"].outputs[0].text in ("abc", "xyz") and batch["ends"].outputs[0].finish_reason == "stop"
    out = batch["ends_ignore_eos"].outputs[0]
    assert out.text in ("yes", "no") and out.finish_reason == "stop"


def test_user_processor_penalties_and_stop_string_with_a_grammar(batch):
    """The other processors run next to the grammar: a logits processor that bans a digit, and a stop
    string that cuts the output before the grammar ends."""
    first = batch["processor"].outputs[0].text
    assert re.fullmatch("[0-9]{8}", first) and "7" not in first
    second = batch["stop_string"].outputs[0]
    assert re.fullmatch("[1-4]{0,8}", second.text) and (second.stop_reason == "5" or len(second.text) == 8)


def test_guidance_backend_and_auto_fallback(llm, batch):
    manager = llm.llm_engine.admission.manager
    assert manager.validate(so(json=PERSON)) == "xgrammar"
    assert manager.validate(so(json=FALLBACK_SCHEMA)) == "guidance"  # "auto": what xgrammar cannot do
    jsonschema.validate(json.loads(batch["fallback"].outputs[0].text), FALLBACK_SCHEMA)
    assert re.fullmatch(IPV4, batch["guidance"].outputs[0].text)


def test_errors_fail_their_own_request_in_vllm_words(llm):
    with pytest.raises(ValueError, match="The provided JSON schema contains features not supported by xgrammar"):
        llm.generate("x", SamplingParams(max_tokens=2, guided_decoding=GuidedDecodingParams(
            json={"type": "array", "uniqueItems": True}, backend="xgrammar")), use_tqdm=False)
    with pytest.raises(ValueError, match="Grammar error"):  # "auto": neither backend takes it
        llm.generate("x", SamplingParams(max_tokens=2, structured_outputs=so(grammar="root ::= (")), use_tqdm=False)
    with pytest.raises(ValueError, match="Invalid grammar specification"):
        llm.generate("x", SamplingParams(max_tokens=2, guided_decoding=GuidedDecodingParams(
            grammar="root ::= (", backend="xgrammar")), use_tqdm=False)


def test_preemption_in_the_middle_of_constrained_outputs(batch):
    """The batch's sampled JSON requests (one with n = 2) again, on a KV cache that holds fewer: the
    preempted ones recompute and resume their grammar where it was; seeded, they give the same tokens."""
    names = ["person_sampled", "person_n2"]
    tight = LLM(max_model_len=128, num_gpu_blocks_override=8, enable_prefix_caching=False)
    outs = tight.generate([REQUESTS[k][0] for k in names], [REQUESTS[k][1] for k in names], use_tqdm=False)
    assert tight.llm_engine.scheduler.num_preemptions > 0
    for name, out in zip(names, outs):
        assert [c.token_ids for c in out.outputs] == [c.token_ids for c in batch[name].outputs]
        for c in out.outputs:
            jsonschema.validate(json.loads(c.text), PERSON)


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
