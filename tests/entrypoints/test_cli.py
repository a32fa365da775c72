"""The `pagedllm` command: option parsing into EngineArgs, `pagedllm chat` fed through stdin (history, /reset,
/exit), and `pagedllm serve` as a real subprocess answering the openai client."""
import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from model_factory import make_tiny_model
from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.entrypoints import cli

PYTHON_DIR = str(Path(__file__).resolve().parents[2] / "python")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return str(make_tiny_model(tmp_path_factory.mktemp("cli"), "qwen2"))


def _parse(argv):
    args = cli.build_parser().parse_args(argv)
    cli._finish_engine_args(args)
    return args


def test_engine_options_reach_engine_args():
    args = _parse(["serve", "some/model", "--max-model-len", "128", "--dtype", "float32", "--device", "cpu",
                   "--max-num-seqs", "8", "--kv-cache-space", "0.5", "--block-size", "32", "--seed", "3",
                   "--no-enable-prefix-caching", "--api-key", "k", "--served-model-name", "a", "b",
                   "--tool-call-parser", "hermes", "--max-queue-size", "5"])
    ea = cli.engine_args_from(args)
    assert (ea.model, ea.max_model_len, ea.dtype, ea.device, ea.max_num_seqs, ea.kv_cache_space, ea.block_size,
            ea.seed, ea.enable_prefix_caching) == ("some/model", 128, "float32", "cpu", 8, 0.5, 32, 3, False)
    assert (args.api_key, args.served_model_name, args.tool_call_parser, args.max_queue_size) == \
        ("k", ["a", "b"], "hermes", 5)
    assert cli.engine_args_from(_parse(["serve", "--model", "m"])).model == "m"
    defaults = cli.engine_args_from(_parse(["chat"]))
    assert defaults.model is None and defaults.enable_prefix_caching is True
    with pytest.raises(SystemExit):
        _parse(["serve", "--block-size", "x"])
    assert cli.engine_args_from(_parse(["serve", "--quantization", "gguf_int8"])).quantization == "gguf_int8"
    assert defaults.quantization is None


def test_reasoning_parser_makes_structured_outputs_reasoning_aware():
    # vLLM: a server started with a reasoning parser constrains an output only after its reasoning.
    ea = cli.engine_args_from(_parse(["serve", "--reasoning-parser", "qwen3"]))
    assert ea.structured_outputs_config == {"reasoning_parser": "qwen3"}
    ea = cli.engine_args_from(_parse(["serve", "--reasoning-parser", "granite"]))   # any <think> style
    assert ea.structured_outputs_config == {"reasoning_parser": "think"}
    ea = cli.engine_args_from(_parse(["serve", "--reasoning-parser", "qwen3", "--structured-outputs-config",
                                      '{"backend": "guidance", "reasoning_parser": "deepseek_r1"}']))
    assert ea.structured_outputs_config == {"backend": "guidance", "reasoning_parser": "deepseek_r1"}
    assert cli.engine_args_from(_parse(["serve"])).structured_outputs_config is None


def test_chat_keeps_history_resets_and_exits(model_path, monkeypatch):
    prompts = []
    real = LLMEngine.add_request

    def spy(self, request_id, prompt, params=None, **kwargs):
        prompts.append(prompt["prompt"])
        return real(self, request_id, prompt, params, **kwargs)

    monkeypatch.setattr(LLMEngine, "add_request", spy)
    args = _parse(["chat", model_path, "--device", "cpu", "--max-model-len", "256", "--chat-template",
                   "chatml_hermes_tools", "--max-tokens", "6", "--temperature", "0", "--system", "Be brief."])
    stdin = io.StringIO("Hello there\nSecond question\n/reset\nThird\n/exit\nnever read\n")
    stdout = io.StringIO()
    assert cli.run_chat(args, stdin=stdin, stdout=stdout) == 0
    assert len(prompts) == 3
    assert "Hello there" in prompts[0] and "Be brief." in prompts[0]
    # turn 2 carries turn 1 (question and answer); after /reset, turn 3 carries neither
    assert "Hello there" in prompts[1] and "Second question" in prompts[1]
    assert prompts[1].count("<|im_start|>assistant") == 2
    assert "Hello there" not in prompts[2] and "Second question" not in prompts[2] and "Be brief." in prompts[2]
    out = stdout.getvalue()
    assert "(conversation reset)" in out and "never read" not in out
    # The streamed answers on stdout are the model's greedy answers to those prompts (generated here again,
    # independently), each on its own line after the banner; each answer is carried in the next turn's prompt.
    from pagedllm import LLM, SamplingParams
    monkeypatch.undo()   # the spy off
    llm = LLM(model_path, device="cpu", max_model_len=256)
    tok = llm.get_tokenizer()
    answers = [o.outputs[0].text for o in llm.generate(
        [{"prompt_token_ids": tok.encode(p, add_special_tokens=False)} for p in prompts],
        SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)]
    assert all(answers)
    banner, rest = out.split("\n", 1)
    assert banner.startswith("pagedllm chat")
    assert rest == f"{answers[0]}\n{answers[1]}\n(conversation reset)\n{answers[2]}\n"
    assert f"<|im_start|>assistant\n{answers[0]}<|im_end|>" in prompts[1]


def test_chat_command_through_a_pipe(model_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pagedllm.entrypoints.cli", "chat", model_path, "--device", "cpu",
         "--max-model-len", "256", "--chat-template", "chatml_hermes_tools", "--max-tokens", "4"],
        input="Hi\n/reset\nHello again\n/exit\n", capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": PYTHON_DIR + os.pathsep + os.environ.get("PYTHONPATH", "")})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("pagedllm chat") and "(conversation reset)" in proc.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_subprocess(model_path):
    port = _free_port()
    env = {**os.environ, "PAGEDLLM_API_KEY": "env-key",
           "PYTHONPATH": PYTHON_DIR + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pagedllm.entrypoints.cli", "serve", model_path, "--host", "127.0.0.1", "--port",
         str(port), "--served-model-name", "tiny", "--device", "cpu", "--max-model-len", "256",
         "--num-gpu-blocks-override", "64", "--chat-template", "chatml_hermes_tools", "--log-level", "warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="env-key", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=5, extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 5
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
