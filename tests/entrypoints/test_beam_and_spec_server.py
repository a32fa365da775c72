"""The server's use_beam_search (n = the beam width, length_penalty: the n choices are LLM.beam_search's beams,
best first) and its speculative decoding (--speculative-config, the spec_decode counters in /metrics)."""
import asyncio
import json
import threading

import httpx
import openai
import pytest

from model_factory import make_tiny_model
from pagedllm import LLM, AsyncEngineArgs, AsyncLLMEngine
from pagedllm.entrypoints.openai.api_server import build_app
from pagedllm.sampling_params import BeamSearchParams
from server_utils import ServerThread, hang_up_when_held, wait_until

PROMPT = "The capital of France is"
NUM_BLOCKS = 200


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return str(make_tiny_model(tmp_path_factory.mktemp("beam-srv"), "llama"))


@pytest.fixture(scope="module")
def engine(model_path):
    return AsyncLLMEngine.from_engine_args(AsyncEngineArgs(model=model_path, device="cpu", max_model_len=256,
                                                           num_gpu_blocks_override=NUM_BLOCKS, seed=0))


@pytest.fixture(scope="module")
def server(engine, model_path):
    app = build_app(engine, served_model_names=["tiny"], model_path=model_path, chat_template="chatml_hermes_tools")
    with ServerThread(app) as server:
        yield server


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=300) as client:
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


# --- streamed (as vLLM: the beams are chosen, then sent as SSE chunks of the usual shape) -------------------

def _events(http, url: str, body: dict) -> list:
    """The SSE events of a streamed request: parsed chunks, then the string "[DONE]"."""
    events = []
    with http.stream("POST", url, json=body) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: "):]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def _streamed_choices(events: list, key) -> dict[int, dict]:
    """index -> {"text", "finish_reason", "chunks"} assembled from the chunks (key: a choice's text)."""
    choices: dict[int, dict] = {}
    for e in events:
        if e == "[DONE]":
            continue
        assert "error" not in e, e
        for c in e["choices"]:
            seen = choices.setdefault(c["index"], {"text": "", "finish_reason": None, "chunks": 0})
            assert seen["finish_reason"] is None, "a chunk after the choice's finish_reason"
            seen["text"] += key(c) or ""
            seen["finish_reason"] = c.get("finish_reason")
            seen["chunks"] += 1
    return choices


@pytest.mark.parametrize("n", [2, 3])
def test_streamed_completion_beams_equal_the_whole_response(http, n):
    body = {"model": "tiny", "prompt": PROMPT, "n": n, "use_beam_search": True, "length_penalty": 0.5,
            "max_tokens": 6}
    whole = http.post("/v1/completions", json=body)
    assert whole.status_code == 200, whole.text
    whole = whole.json()
    events = _events(http, "/v1/completions", {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == whole["usage"]
    assert all(e["object"] == "text_completion" and e["id"] == events[0]["id"] for e in events[:-1])
    assert all(e.get("usage") is None for e in events[:-2])
    streamed = _streamed_choices(events, lambda c: c["text"])
    assert sorted(streamed) == list(range(n))
    assert [streamed[i]["text"] for i in range(n)] == [c["text"] for c in whole["choices"]]
    assert [streamed[i]["finish_reason"] for i in range(n)] == [c["finish_reason"] for c in whole["choices"]]
    assert all(c["finish_reason"] in ("stop", "length") for c in whole["choices"])


def test_streamed_beams_of_several_prompts(http):
    """Each prompt's beams are choices i * n + beam, as in the whole response."""
    body = {"model": "tiny", "prompt": [PROMPT, "Once upon a time"], "n": 2, "use_beam_search": True,
            "max_tokens": 4}
    whole = http.post("/v1/completions", json=body).json()
    events = _events(http, "/v1/completions", {**body, "stream": True})
    streamed = _streamed_choices(events, lambda c: c["text"])
    assert sorted(streamed) == [0, 1, 2, 3]
    assert [streamed[i]["text"] for i in range(4)] == [c["text"] for c in whole["choices"]]
    assert [streamed[i]["finish_reason"] for i in range(4)] == [c["finish_reason"] for c in whole["choices"]]


@pytest.mark.parametrize("n", [2, 3])
def test_streamed_chat_beams_equal_the_whole_response(http, n):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "n": n, "use_beam_search": True,
            "max_tokens": 5}
    whole = http.post("/v1/chat/completions", json=body)
    assert whole.status_code == 200, whole.text
    whole = whole.json()
    events = _events(http, "/v1/chat/completions",
                     {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"] == [] and events[-2]["usage"] == whole["usage"]
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])
    streamed = _streamed_choices(events, lambda c: c["delta"].get("content"))
    assert sorted(streamed) == list(range(n))
    roles = {c["index"]: c["delta"]["role"] for e in events[:-2] for c in e["choices"] if "role" in c["delta"]}
    assert roles == {i: "assistant" for i in range(n)}
    assert [streamed[i]["text"] for i in range(n)] == [c["message"]["content"] for c in whole["choices"]]
    assert [streamed[i]["finish_reason"] for i in range(n)] == [c["finish_reason"] for c in whole["choices"]]


def test_streamed_beams_without_usage(http):
    body = {"model": "tiny", "prompt": PROMPT, "n": 2, "use_beam_search": True, "max_tokens": 4, "stream": True}
    events = _events(http, "/v1/completions", body)
    assert events[-1] == "[DONE]"
    assert all(e["choices"] and e.get("usage") is None for e in events[:-1])


def test_streamed_beams_through_the_openai_client(server, http):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)
    whole = http.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "n": 2, "use_beam_search": True,
                                               "max_tokens": 5}).json()
    texts, finish = {}, {}
    usage = None
    for chunk in client.completions.create(model="tiny", prompt=PROMPT, n=2, max_tokens=5, stream=True,
                                           stream_options={"include_usage": True},
                                           extra_body={"use_beam_search": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert [texts[i] for i in range(2)] == [c["text"] for c in whole["choices"]]
    assert [finish[i] for i in range(2)] == [c["finish_reason"] for c in whole["choices"]]
    assert usage is not None and usage.completion_tokens == whole["usage"]["completion_tokens"]

    messages = [{"role": "user", "content": "Hi"}]
    whole = http.post("/v1/chat/completions", json={"model": "tiny", "messages": messages, "n": 2,
                                                    "use_beam_search": True, "max_tokens": 5}).json()
    texts, finish = {}, {}
    for chunk in client.chat.completions.create(model="tiny", messages=messages, n=2, max_tokens=5, stream=True,
                                                extra_body={"use_beam_search": True}):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert [texts[i] for i in range(2)] == [c["message"]["content"] for c in whole["choices"]]
    assert [finish[i] for i in range(2)] == [c["finish_reason"] for c in whole["choices"]]


@pytest.mark.parametrize("url", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("bad, words", [
    ({"n": 33}, "--max-best-of"),                      # the server's sample limit
    ({"n": 20, "max_tokens": 200}, "KV cache blocks"),  # all the beams at full length must fit in the KV cache
    ({"temperature": -1.0}, "temperature must be non-negative"),
    ({"max_tokens": 0}, "max_tokens must be at least 1"),
])
def test_streamed_beam_search_bad_input_is_still_a_400(http, url, bad, words):
    body = {"model": "tiny", "n": 2, "use_beam_search": True, "stream": True, "max_tokens": 4, **bad}
    if url == "/v1/completions":
        body["prompt"] = PROMPT
    else:
        body["messages"] = [{"role": "user", "content": "Hi"}]
    r = http.post(url, json=body)
    assert r.status_code == 400, r.text
    assert words in r.json()["error"]["message"]


@pytest.mark.parametrize("url", ["/v1/completions", "/v1/chat/completions"])
def test_client_gone_aborts_a_streamed_beam_search(server, engine, url):
    """The client leaves while the beams are still searched: the search is aborted, every KV block comes back."""
    llm_engine = engine.engine
    reached, release = threading.Event(), threading.Event()
    real = llm_engine._advance_beams

    def held(beams):   # the engine thread stops at the first selection of this test's search
        if beams and not reached.is_set():
            reached.set()
            release.wait(120)
        return real(beams)

    generated_before = engine.snapshot["generation_tokens"]
    body = {"model": "tiny", "n": 3, "use_beam_search": True, "stream": True, "max_tokens": 200,
            "ignore_eos": True}
    if url == "/v1/completions":
        body["prompt"] = PROMPT
    else:
        body["messages"] = [{"role": "user", "content": "Hi"}]

    async def give_up():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as ac:
            async def consume():
                async with ac.stream("POST", url, json=body) as r:
                    async for _ in r.aiter_lines():
                        pass
            request = asyncio.create_task(consume())
            try:
                await hang_up_when_held(request, reached, engine, "beam search")
            finally:
                release.set()

    llm_engine._advance_beams = held
    try:
        asyncio.run(give_up())
    finally:
        release.set()
        del llm_engine._advance_beams
    wait_until(lambda: (engine.snapshot["num_unfinished_requests"] == 0 and not engine._pending
                        and engine.snapshot["num_used_blocks"] == 0), 60, "the engine to free the beams' blocks")
    assert not llm_engine.beam_searches
    assert engine.snapshot["num_free_blocks"] == NUM_BLOCKS
    assert engine.snapshot["generation_tokens"] == generated_before   # aborted, not run to its 200 tokens


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
