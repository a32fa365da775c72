"""The pooling HTTP API on a real uvicorn server: /v1/embeddings (official openai client and httpx), /pooling,
/classify, /score, /rerank; bad input answers a 400 and leaves the server serving; chat / completions answer
vLLM's 400 on a pooling model, the pooling routes the same on a generative one."""
import base64
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pagedllm import LLM
from pagedllm.config import EngineArgs
from pagedllm.entrypoints.openai.api_server import build_app
from pagedllm.entrypoints.openai.serving_pooling import AsyncPoolingEngine
from pooling_models import TEXTS, bert_classifier, minilm

sys.path.insert(0, str(Path(__file__).parents[1] / "entrypoints"))
from server_utils import ServerThread  # noqa: E402

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
DOCS = ["Paris is the capital of France.", "Berlin is in Germany.", "I like turtles."]
QUERY = "What is the capital of France?"


def _serve(path, **kwargs):
    engine = AsyncPoolingEngine.from_engine_args(EngineArgs(model=str(path), **kwargs))
    return engine, ServerThread(build_app(engine, served_model_names=["m"], model_path=str(path)))


@pytest.fixture(scope="module")
def embed_server():
    engine, server = _serve(minilm())
    with server:
        yield server
    engine.shutdown()


@pytest.fixture(scope="module")
def offline():
    return LLM(str(minilm()))


def _post(server, path, body):
    return httpx.post(server.url + path, json=body, timeout=120)


def test_openai_client_embeddings(embed_server, offline):
    client = openai.OpenAI(base_url=embed_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    resp = client.embeddings.create(model="m", input=TEXTS)  # the client asks for base64 and decodes it
    ref = torch.tensor([o.outputs.embedding for o in offline.embed(TEXTS)])
    got = torch.tensor([d.embedding for d in resp.data])
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
    assert [d.index for d in resp.data] == list(range(len(TEXTS)))
    n_tokens = sum(len(o.prompt_token_ids) for o in offline.embed(TEXTS))
    assert resp.usage.prompt_tokens == resp.usage.total_tokens == n_tokens
    one = client.embeddings.create(model="m", input="Hello world", encoding_format="float")
    torch.testing.assert_close(torch.tensor(one.data[0].embedding), ref[0], atol=1e-6, rtol=1e-5)


def test_embeddings_inputs_and_formats(embed_server, offline):
    tok = offline.get_tokenizer()
    ids = [tok(t)["input_ids"] for t in TEXTS[:2]]
    ref = torch.tensor([o.outputs.embedding for o in offline.embed(TEXTS[:2])])
    by_ids = _post(embed_server, "/v1/embeddings", {"input": ids}).json()
    torch.testing.assert_close(torch.tensor([d["embedding"] for d in by_ids["data"]]), ref, atol=1e-6, rtol=1e-5)
    one_ids = _post(embed_server, "/v1/embeddings", {"input": ids[1]}).json()
    torch.testing.assert_close(torch.tensor(one_ids["data"][0]["embedding"]), ref[1], atol=1e-6, rtol=1e-5)
    b64 = _post(embed_server, "/v1/embeddings", {"input": TEXTS[0], "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), dtype="<f4")
    torch.testing.assert_close(torch.from_numpy(decoded.copy()), ref[0], atol=1e-6, rtol=1e-5)
    cut = _post(embed_server, "/v1/embeddings", {"input": TEXTS[3], "truncate_prompt_tokens": 4}).json()
    assert cut["usage"]["prompt_tokens"] == 4


def test_a_list_of_texts_is_tokenized_in_one_call(embed_server, offline, monkeypatch):
    """The server encodes a request's texts with one tokenizer call (as LLM.embed does), with the same
    results as one text at a time; a text-pair score request too."""
    calls = []
    from pagedllm.pooling.engine import PoolingEngine
    real = PoolingEngine.encode_texts
    monkeypatch.setattr(PoolingEngine, "encode_texts",
                        lambda self, texts, pairs=None: calls.append(len(texts)) or real(self, texts, pairs))
    got = _post(embed_server, "/v1/embeddings", {"input": TEXTS, "encoding_format": "float"}).json()
    assert calls == [len(TEXTS)]
    singles = [_post(embed_server, "/v1/embeddings", {"input": t, "encoding_format": "float"}).json() for t in TEXTS]
    assert calls == [len(TEXTS)]  # one text: no batch call
    torch.testing.assert_close(torch.tensor([d["embedding"] for d in got["data"]]),
                               torch.tensor([r["data"][0]["embedding"] for r in singles]), atol=1e-6, rtol=1e-5)
    assert got["usage"]["prompt_tokens"] == sum(r["usage"]["prompt_tokens"] for r in singles)


@pytest.mark.parametrize("body,match", [
    ({"input": []}, "Input cannot be empty"),
    ({"input": "word " * 400}, "maximum context length is 256 tokens. However, you requested 402 tokens"),
    ({"input": "hi", "encoding_format": "int8"}, "encoding_format"),
    ({"input": "hi", "dimensions": 100000}, "does not support matryoshka"),
    ({"input": [[101, 10 ** 7]]}, "out of vocabulary"),
])
def test_bad_embedding_requests_are_400_and_the_server_goes_on(embed_server, body, match):
    resp = _post(embed_server, "/v1/embeddings", body)
    assert resp.status_code == 400, resp.text
    assert match in resp.json()["error"]["message"]
    ok = _post(embed_server, "/v1/embeddings", {"input": "still serving"})
    assert ok.status_code == 200 and len(ok.json()["data"][0]["embedding"]) == 384


def test_openai_client_bad_request(embed_server):
    client = openai.OpenAI(base_url=embed_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.embeddings.create(model="m", input="word " * 400)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="other", input="hi")


def test_concurrent_requests_each_get_their_own_results(embed_server, offline):
    """Requests queued together run in shared forwards; each gets back exactly its own embeddings."""
    from concurrent.futures import ThreadPoolExecutor
    inputs = [TEXTS[i % len(TEXTS)] + " #" * i for i in range(12)]
    ref = {t: torch.tensor(o.outputs.embedding) for t, o in zip(inputs, offline.embed(inputs))}

    def one(text):
        resp = _post(embed_server, "/v1/embeddings", {"input": [text, "fixed"]})
        assert resp.status_code == 200, resp.text
        return text, resp.json()["data"]

    with ThreadPoolExecutor(6) as pool:
        for text, data in pool.map(one, inputs):
            torch.testing.assert_close(torch.tensor(data[0]["embedding"]), ref[text], atol=1e-5, rtol=1e-4)
            assert data[1]["index"] == 1


def test_chat_and_completions_answer_a_pooling_model_with_400(embed_server):
    chat = _post(embed_server, "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 400
    assert chat.json()["error"]["message"] == "The model does not support Chat Completions API"
    comp = _post(embed_server, "/v1/completions", {"model": "m", "prompt": "hi"})
    assert comp.status_code == 400 and "Completions API" in comp.json()["error"]["message"]


def test_bi_encoder_score_and_rerank(embed_server, offline):
    ref = [o.outputs.score for o in offline.score(QUERY, DOCS)]
    for path in ("/score", "/v1/score"):
        got = _post(embed_server, path, {"text_1": QUERY, "text_2": DOCS}).json()
        assert [d["index"] for d in got["data"]] == [0, 1, 2]
        torch.testing.assert_close(torch.tensor([d["score"] for d in got["data"]]), torch.tensor(ref))
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        got = _post(embed_server, path, {"query": QUERY, "documents": DOCS, "top_n": 2}).json()
        order = sorted(range(3), key=lambda i: -ref[i])[:2]
        assert [r["index"] for r in got["results"]] == order
        assert got["results"][0]["document"]["text"] == DOCS[order[0]]
        assert got["results"][0]["relevance_score"] == pytest.approx(ref[order[0]], abs=1e-6)
    bad = _post(embed_server, "/score", {"text_1": DOCS[:2], "text_2": DOCS})
    assert bad.status_code == 400 and "1:1, 1:N or N:N" in bad.json()["error"]["message"]


def test_pooling_route(embed_server, offline):
    got = _post(embed_server, "/pooling", {"input": TEXTS[1], "task": "token_embed"}).json()
    data = torch.tensor(got["data"][0]["data"])
    ref = offline.encode(TEXTS[1], pooling_task="token_embed")[0].outputs.data
    torch.testing.assert_close(data, ref, atol=1e-6, rtol=1e-5)


def test_cross_encoder_server(pooling_root):
    path = bert_classifier(pooling_root, num_labels=1)
    offline = LLM(str(path), task="score")
    ref = [o.outputs.score for o in offline.score(QUERY, DOCS)]
    engine, server = _serve(path, runner="pooling")
    try:
        with server:
            got = _post(server, "/v1/rerank", {"query": QUERY, "documents": DOCS}).json()
            assert [r["index"] for r in got["results"]] == sorted(range(3), key=lambda i: -ref[i])
            scores = {r["index"]: r["relevance_score"] for r in got["results"]}
            torch.testing.assert_close(torch.tensor([scores[i] for i in range(3)]), torch.tensor(ref))
            cls = _post(server, "/classify", {"input": DOCS[0]}).json()
            assert cls["data"][0]["num_classes"] == 1
            emb = _post(server, "/v1/embeddings", {"input": "hi"})
            assert emb.status_code == 400 and "Embedding API is not supported" in emb.json()["error"]["message"]
    finally:
        engine.shutdown()


def test_generative_server_answers_pooling_routes_with_400(pooling_root):
    from model_factory import make_tiny_model
    from pagedllm.config import AsyncEngineArgs
    from pagedllm.engine.async_engine import AsyncLLMEngine
    engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(model=str(make_tiny_model(pooling_root, "llama")),
                                                             kv_cache_space=0.05))
    try:
        with ServerThread(build_app(engine, served_model_names=["m"])) as server:
            resp = _post(server, "/v1/embeddings", {"model": "m", "input": "hi"})
            assert resp.status_code == 400
            assert resp.json()["error"]["message"] == "The model does not support Embeddings API"
    finally:
        engine.shutdown()
