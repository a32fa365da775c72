"""Classification equals transformers' *ForSequenceClassification; score equals sentence-transformers'
CrossEncoder (pairs) and the cosine of embeddings (bi-encoders); reward and encode shapes."""
import pytest
import torch
import torch.nn.functional as F

from pagedllm import LLM, PoolingParams
from pooling_models import TEXTS, bert_classifier, decoder_classifier, minilm

st = pytest.importorskip("sentence_transformers")
PAIR_QUERY = "What is the capital of France?"
DOCS = ["Paris is the capital of France.", "Berlin is in Germany.", "I like turtles.", "France: Paris"]


def _hf_logits(path, texts, pairs=None):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    hf = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for i, t in enumerate(texts):  # one at a time: no padding for the reference to mask
            enc = tok(t, pairs[i], return_tensors="pt") if pairs else tok(t, return_tensors="pt")
            out.append(hf(**enc).logits[0])
    return torch.stack(out)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_decoder_classifier_matches_transformers(pooling_root, arch):
    path = decoder_classifier(pooling_root, arch, num_labels=3)
    texts = ["Hello world! How are you today?", "The capital of France is Paris.", "def add(a, b):"]
    llm = LLM(str(path))  # runner auto: *ForSequenceClassification is a pooling model
    outs = llm.classify(texts)
    probs = torch.tensor([o.outputs.probs for o in outs])
    ref = torch.softmax(_hf_logits(path, texts), dim=-1)
    torch.testing.assert_close(probs, ref, atol=1e-5, rtol=1e-4)
    assert outs[0].outputs.num_classes == 3
    raw = torch.tensor([o.outputs.probs for o in llm.classify(texts, pooling_params=PoolingParams(use_activation=False))])
    torch.testing.assert_close(raw, _hf_logits(path, texts), atol=1e-4, rtol=1e-4)


def test_bert_classifier_matches_transformers(pooling_root):
    path = bert_classifier(pooling_root, num_labels=3)
    llm = LLM(str(path))
    probs = torch.tensor([o.outputs.probs for o in llm.classify(TEXTS)])
    torch.testing.assert_close(probs, torch.softmax(_hf_logits(path, TEXTS), dim=-1), atol=1e-5, rtol=1e-4)
    # vLLM 0.10's names for the same: task="classify", softmax=
    llm = LLM(str(path), task="classify")
    raw = torch.tensor([o.outputs.probs for o in llm.classify(TEXTS, pooling_params=PoolingParams(softmax=False))])
    torch.testing.assert_close(raw, _hf_logits(path, TEXTS), atol=1e-4, rtol=1e-4)


def test_cross_encoder_score_matches_sentence_transformers(pooling_root):
    path = bert_classifier(pooling_root, num_labels=1)
    llm = LLM(str(path), task="score")
    ours = [o.outputs.score for o in llm.score(PAIR_QUERY, DOCS)]
    ce = st.CrossEncoder(str(path), device="cpu")
    ref = ce.predict([(PAIR_QUERY, d) for d in DOCS], convert_to_tensor=True).float()
    torch.testing.assert_close(torch.tensor(ours), ref, atol=1e-5, rtol=1e-4)
    # N:N pairs the lists element-wise; 1:1 is one score
    nn_scores = [o.outputs.score for o in llm.score([PAIR_QUERY] * 2, DOCS[:2])]
    torch.testing.assert_close(torch.tensor(nn_scores), ref[:2], atol=1e-5, rtol=1e-4)
    assert len(llm.score(PAIR_QUERY, DOCS[0])) == 1
    with pytest.raises(ValueError, match="Input lengths must be either 1:1, 1:N or N:N"):
        llm.score(DOCS[:2], DOCS[:3])
    with pytest.raises(ValueError, match="At least one text_pair element must be given"):
        llm.score(PAIR_QUERY, [])


def test_bi_encoder_score_is_the_cosine_of_embeddings():
    llm = LLM(str(minilm()))
    scores = torch.tensor([o.outputs.score for o in llm.score(PAIR_QUERY, DOCS)])
    model = st.SentenceTransformer(str(minilm()), device="cpu")
    q = model.encode([PAIR_QUERY], convert_to_tensor=True)
    d = model.encode(DOCS, convert_to_tensor=True)
    torch.testing.assert_close(scores, F.cosine_similarity(q, d), atol=1e-5, rtol=1e-4)
    assert scores.argmax().item() == 0


def test_reward_is_the_head_on_every_token(pooling_root):
    path = decoder_classifier(pooling_root, "llama", num_labels=1)
    llm = LLM(str(path), task="reward")
    text = "The capital of France is Paris."
    out = llm.reward(text)[0]
    n = len(out.prompt_token_ids)
    assert tuple(out.outputs.data.shape) == (n, 1)
    # the last token's reward is the classifier's logit (no activation)
    logit = _hf_logits(path, [text])[0]
    torch.testing.assert_close(out.outputs.data[-1], logit, atol=1e-4, rtol=1e-4)


def test_encode_with_pooling_tasks():
    llm = LLM(str(minilm()))
    emb = llm.encode(TEXTS[:2], pooling_task="embed")
    assert tuple(emb[0].outputs.data.shape) == (384,)
    tok = llm.encode(TEXTS[1], pooling_task="token_embed")[0]
    assert tuple(tok.outputs.data.shape) == (len(tok.prompt_token_ids), 384)
    # mean of the (unnormalized) token embeddings is the unnormalized sentence embedding
    raw_tok = llm.encode(TEXTS[1], pooling_task="token_embed", pooling_params=PoolingParams(normalize=False))[0]
    raw = llm.embed(TEXTS[1], pooling_params=PoolingParams(normalize=False))[0].outputs.embedding
    torch.testing.assert_close(raw_tok.outputs.data.mean(0), torch.tensor(raw), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="Classification API is not supported"):
        llm.encode("hi", pooling_task="classify")


def test_serve_flags_reach_the_pooling_engine(pooling_root):
    """`pagedllm serve MODEL --runner pooling --pooler-config JSON` (and 0.10's --task) pick the pooling engine."""
    from pagedllm.entrypoints import cli
    from pagedllm.pooling.engine import PoolingEngine, wants_pooling
    path = str(bert_classifier(pooling_root, num_labels=3))
    args = cli.build_parser().parse_args(["serve", path, "--runner", "pooling",
                                          "--pooler-config", '{"use_activation": false}'])
    engine_args = cli.engine_args_from(args)
    assert wants_pooling(engine_args)
    engine = PoolingEngine(engine_args)
    assert engine.defaults.use_activation is False
    old = cli.engine_args_from(cli.build_parser().parse_args(["serve", path, "--task", "score"]))
    assert wants_pooling(old) and old.task == "score"
    gen = cli.engine_args_from(cli.build_parser().parse_args(["serve", path, "--runner", "generate"]))
    assert not wants_pooling(gen)
