"""The server's per-request limits through real HTTP: chat templates sent with a request (issue 12's runaway ones)
render in killable workers under a time / memory / output budget and answer 400 naming the limit, while /health
and other requests go on; tokenization happens off the event loop; --max-prompt-chars, --max-best-of and the KV
cache bound what a request may ask; lone surrogates and 600-deep nesting are 400s in plain words."""
import asyncio
import re
import threading

import httpx
import pytest

from model_factory import make_tiny_model
from pagedllm import AsyncEngineArgs, AsyncLLMEngine
from pagedllm.chat.render_pool import default_pool
from pagedllm.entrypoints.openai.api_server import build_app
from pagedllm.entrypoints.openai.limits import ServerLimits
from server_utils import ServerThread, wait_until

MODEL = "tiny"
NUM_BLOCKS = 64          # x 16 tokens
MAX_PROMPT_CHARS = 20_000
MAX_BEST_OF = 8
LIMITS = ServerLimits.build(max_prompt_chars=MAX_PROMPT_CHARS, max_best_of=MAX_BEST_OF, chat_template_timeout_s=3.0,
                            chat_template_max_memory_mb=512)
NESTED_LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x"
PYTHON_NAMES = re.compile(r"\b\w+(Error|Exception)\b|Traceback")
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("lim"), "llama")
    eng = AsyncLLMEngine.from_engine_args(
        AsyncEngineArgs(model=str(path), device="cpu", max_model_len=512, num_gpu_blocks_override=NUM_BLOCKS,
                        max_num_seqs=16, seed=0), max_queue_size=64)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    app = build_app(engine, served_model_names=[MODEL], chat_template="chatml_hermes_tools", limits=LIMITS)
    with ServerThread(app) as s:
        yield s


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def _error(r: httpx.Response, status: int = 400) -> str:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert not PYTHON_NAMES.search(error["message"]), error["message"]
    return error["message"]


def _chat(http, template=None, messages=USER, **extra):
    body = {"model": MODEL, "messages": messages, "max_tokens": 3, **extra}
    if template is not None:
        body["chat_template"] = template
    return http.post("/v1/chat/completions", json=body)


@pytest.mark.parametrize("template,words", [
    (NESTED_LOOPS, "took longer than the limit of 3 seconds"),
    ("{{ 'a' * 10**7 }}", f"over the limit of {MAX_PROMPT_CHARS} characters"),
    ("{% for i in range(10**9) %}{% endfor %}", "Range too big"),
    ("{% macro f(x) %}{{ f(x) }}{% endmacro %}{{ f(1) }}", "recursed too deeply"),
    ("{{ 'a'|center(10**9) }}", "more memory than the limit of 512 MiB"),
])
def test_request_templates_over_a_budget_answer_400(http, template, words):
    assert words in _error(_chat(http, template))
    assert _chat(http).status_code == 200   # and the next request is served


def test_a_runaway_render_blocks_neither_health_nor_other_requests(engine):
    endless = ServerLimits.build(max_prompt_chars=MAX_PROMPT_CHARS, chat_template_timeout_s=600.0,
                                 chat_template_max_memory_mb=512)
    app = build_app(engine, served_model_names=[MODEL], chat_template="chatml_hermes_tools", limits=endless)
    pool = default_pool()
    with ServerThread(app) as s:
        async def main():
            async with httpx.AsyncClient(base_url=s.url, timeout=120) as ac:
                before = set(pool._running)
                runaway = asyncio.create_task(ac.post("/v1/chat/completions", json={
                    "model": MODEL, "messages": USER, "chat_template": NESTED_LOOPS}))
                await asyncio.to_thread(wait_until, lambda: set(pool._running) - before, 60, "the runaway render")
                [worker] = set(pool._running) - before
                assert (await ac.get("/health")).status_code == 200
                other = await ac.post("/v1/chat/completions", json={"model": MODEL, "messages": USER,
                                                                    "max_tokens": 3})
                assert other.status_code == 200 and other.json()["choices"][0]["message"]["content"] is not None
                assert not runaway.done() and worker.alive()   # it runs until killed (its limit is 600 s)
                worker.proc.kill()
                return await runaway

        assert "render worker crashed" in _error(asyncio.run(main()))


def test_tokenization_runs_off_the_event_loop(server, engine, monkeypatch):
    tokenizer = engine.get_tokenizer()
    real_encode = tokenizer.encode
    reached, release = threading.Event(), threading.Event()

    def encode(text, *args, **kwargs):
        if "SLOW_TO_TOKENIZE" in text:
            reached.set()
            release.wait(120)
        return real_encode(text, *args, **kwargs)

    monkeypatch.setattr(tokenizer, "encode", encode)

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as ac:
            slow = asyncio.create_task(ac.post("/v1/completions", json={
                "model": MODEL, "prompt": "SLOW_TO_TOKENIZE", "max_tokens": 2}))
            try:
                assert await asyncio.to_thread(reached.wait, 60)
                assert (await ac.get("/health")).status_code == 200
                quick = await ac.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
                assert quick.status_code == 200 and not slow.done()
            finally:
                release.set()
            return await slow

    assert asyncio.run(main()).status_code == 200


def test_prompt_character_limit(http):
    assert "--max-prompt-chars" in _error(http.post("/v1/completions", json={
        "model": MODEL, "prompt": "x" * (MAX_PROMPT_CHARS + 1), "max_tokens": 2}))
    assert "--max-prompt-chars" in _error(http.post("/v1/completions", json={
        "model": MODEL, "prompt": ["hi", "y" * (MAX_PROMPT_CHARS + 1)], "max_tokens": 2}))
    assert "--max-prompt-chars" in _error(http.post("/tokenize", json={"prompt": "z" * (MAX_PROMPT_CHARS + 1)}))
    long_chat = [{"role": "user", "content": "w" * MAX_PROMPT_CHARS}]
    assert f"over the limit of {MAX_PROMPT_CHARS} characters" in _error(_chat(http, messages=long_chat))
    ok = http.post("/tokenize", json={"prompt": "z" * 1000})
    assert ok.status_code == 200 and ok.json()["count"] > 0


def test_best_of_and_n_are_capped(http):
    for body in ({"best_of": 1_000_000}, {"n": MAX_BEST_OF + 1}, {"n": 2, "best_of": 10 ** 9}):
        message = _error(http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", **body}))
        assert f"must be at most {MAX_BEST_OF} (the server's --max-best-of)" in message
        assert f"must be at most {MAX_BEST_OF}" in _error(_chat(http, **body))
    # Within the option but not within the KV cache: 8 samples of up to ~400 tokens need ~200 of its 64 blocks.
    message = _error(http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "n": 8, "max_tokens": 400}))
    assert "KV cache blocks, more than the server's 64" in message
    ok = http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "n": 2, "max_tokens": 4,
                                            "ignore_eos": True, "temperature": 1.0})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 2


@pytest.mark.parametrize("path,raw", [
    ("/v1/completions", '{"model": "tiny", "prompt": "ab\\ud800c", "max_tokens": 2}'),
    ("/v1/completions", '{"model": "tiny", "prompt": ["ok", "\\udfff"], "max_tokens": 2}'),
    ("/v1/completions", '{"model": "tiny", "prompt": "hi", "stop": ["\\ud800"], "max_tokens": 2}'),
    ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": "x\\ud800"}]}'),
    ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", '
                             '"text": "\\udc00"}]}]}'),
    ("/tokenize", '{"prompt": "\\ud800"}'),
    ("/tokenize", '{"messages": [{"role": "user", "content": "\\ud800"}]}'),
])
def test_lone_surrogates_are_a_clear_400(http, path, raw):
    r = http.post(path, content=raw.encode(), headers={"Content-Type": "application/json"})
    message = _error(r)
    assert "not valid Unicode text: it holds a lone surrogate" in message, message
    assert "surrogates not allowed" not in message


@pytest.mark.parametrize("where", ["content", "extra"])
def test_600_deep_nesting_is_a_400(http, where):
    deep = "x"
    for _ in range(600):
        deep = [deep] if where == "content" else {"a": deep}
    message = {"role": "user", "content": deep} if where == "content" else \
        {"role": "user", "content": "x", "metadata": deep}
    assert "nested more than" in _error(_chat(http, messages=[message]))
