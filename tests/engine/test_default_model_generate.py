"""The built-in default model (SmolLM2-135M-Instruct, Q4_1 GGUF): LLM.generate's greedy
continuations equal transformers' on the same GGUF, and the chat answer names Paris."""
import pytest

from hf_reference import hf_greedy
from pagedllm import LLM, SamplingParams

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


@pytest.fixture(scope="module")
def llm():
    return LLM(max_model_len=1024)


def test_greedy_matches_transformers_on_the_same_gguf(llm):
    from pagedllm.models.loader import load_hf_reference
    hf = load_hf_reference(None)
    tok = llm.get_tokenizer()
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        ref, _ = hf_greedy(hf, tok.encode(prompt), 10)
        assert out.outputs[0].token_ids == ref, prompt


def test_chat_answer_names_paris(llm):
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What is the capital of France?"}]
    prompt = llm.get_tokenizer().apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=48), use_tqdm=False)[0].outputs[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop" and "<|im_end|>" not in out.text


def test_default_sampling_params_of_the_default_model_are_greedy(llm):
    assert llm.get_default_sampling_params().temperature == 0.0
