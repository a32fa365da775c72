"""The server's use_beam_search (n = the beam width, length_penalty: the n choices are LLM.beam_search's beams,
best first) and its speculative decoding (--speculative-config, the spec_decode counters in /metrics)."""
import httpx
import pytest

from model_factory import make_tiny_model
from pagedllm import LLM, AsyncEngineArgs, AsyncLLMEngine
from pagedllm.entrypoints.openai.api_server import build_app
from pagedllm.sampling_params import BeamSearchParams
from server_utils import ServerThread

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return str(make_tiny_model(tmp_path_factory.mktemp("beam-srv"), "llama"))


@pytest.fixture(scope="module")
def http(model_path):
    engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(model=model_path, device="cpu", max_model_len=256,
                                                             num_gpu_blocks_override=200, seed=0))
    app = build_app(engine, served_model_names=["tiny"], model_path=model_path, chat_template="chatml_hermes_tools")
    with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=300) as client:
        yield client


def test_completion_beams_are_llm_beam_search(http, model_path):
    body = {"model": "tiny", "prompt": PROMPT, "n": 3, "use_beam_search": True, "length_penalty": 0.5,
            "max_tokens": 6}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    ref = LLM(model_path, kv_cache_space=0.05, max_model_len=256).beam_search(
        [PROMPT], BeamSearchParams(beam_width=3, max_tokens=6, length_penalty=0.5))[0]
    assert [c["index"] for c in choices] == [0, 1, 2]
    assert [c["text"] for c in choices] == [s.text for s in ref.sequences]
    assert [c["finish_reason"] for c in choices] == [s.finish_reason for s in ref.sequences]


def test_chat_beams(http):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "n": 2, "use_beam_search": True,
            "max_tokens": 5}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 2


def test_streamed_beam_search_is_a_400(http):
    body = {"model": "tiny", "prompt": PROMPT, "n": 2, "use_beam_search": True, "stream": True, "max_tokens": 4}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 400 and "streaming" in r.json()["error"]["message"]


def test_serve_parses_speculative_config():
    from pagedllm.entrypoints import cli
    args = cli.build_parser().parse_args(
        ["serve", "m", "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}'])
    assert cli.engine_args_from(args).speculative_config == {"method": "ngram", "num_speculative_tokens": 3}


def test_spec_decode_counters_in_metrics(model_path):
    engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(
        model=model_path, device="cpu", max_model_len=256, num_gpu_blocks_override=100,
        speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1}))
    app = build_app(engine, served_model_names=["tiny"], model_path=model_path)
    prompt = "Hello world! Hello world! Hello world! Hello"
    with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=300) as client:
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 12,
                                                 "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        text = client.get("/metrics").text
    stats = engine.engine.stats["spec_decode"]
    assert stats.num_drafts > 0
    assert f'pagedllm:spec_decode_num_draft_tokens_total{{model_name="tiny"}} {float(stats.num_draft_tokens)}' in text
    assert 'pagedllm:spec_decode_num_accepted_tokens_per_pos_total{model_name="tiny",position="0"}' in text
