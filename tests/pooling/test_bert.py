"""The BERT encoder's hidden states equal transformers' BertModel, through the CPU kernels (encoder_attention,
add_layer_norm, bias_gelu; head sizes 64 and MiniLM's 32) and the plain-torch reference (EncoderAttention's other
paths are held to the reference in tests/kernels/test_encoder_ops.py); CLS pooling without Normalize from
sentence-transformers files."""
import pytest
import torch

from pagedllm import LLM, PoolingParams
from pagedllm.models.utils import native_ops
from pooling_models import TEXTS, bert_encoder, minilm

st = pytest.importorskip("sentence_transformers")


def _hf_hidden(path, texts):
    from transformers import AutoModel, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    hf = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return [hf(**tok(t, return_tensors="pt")).last_hidden_state[0] for t in texts]


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("which", ["head64", "minilm"])
def test_bert_hidden_states_match_transformers(pooling_root, native, which):
    path = bert_encoder(pooling_root) if which == "head64" else minilm()
    llm = LLM(str(path))
    with native_ops(native):
        outs = llm.encode(TEXTS, pooling_task="token_embed", pooling_params=PoolingParams(normalize=False))
    for out, ref in zip(outs, _hf_hidden(path, TEXTS)):
        torch.testing.assert_close(out.outputs.data, ref, atol=2e-5, rtol=1e-4)


def test_cls_pooling_without_normalize_matches_sentence_transformers(pooling_root):
    path = bert_encoder(pooling_root)
    llm = LLM(str(path))
    assert (llm.llm_engine.defaults.embed_pooling, llm.llm_engine.defaults.normalize) == ("CLS", False)
    ours = torch.tensor([o.outputs.embedding for o in llm.embed(TEXTS)])
    ref = st.SentenceTransformer(str(path), device="cpu").encode(TEXTS, convert_to_tensor=True)
    torch.testing.assert_close(ours, ref.float(), atol=1e-5, rtol=1e-4)


def test_pooler_config_overrides_the_files(pooling_root):
    path = bert_encoder(pooling_root)
    llm = LLM(str(path), pooler_config={"pooling_type": "MEAN", "normalize": True})
    hidden = _hf_hidden(path, TEXTS[:1])[0]
    ours = torch.tensor(llm.embed(TEXTS[0])[0].outputs.embedding)
    torch.testing.assert_close(ours, torch.nn.functional.normalize(hidden.mean(0), dim=0), atol=1e-5, rtol=1e-4)
    llm = LLM(str(path), override_pooler_config={"pooling_type": "LAST"})  # vLLM 0.10's name
    ours = torch.tensor(llm.embed(TEXTS[0])[0].outputs.embedding)
    torch.testing.assert_close(ours, hidden[-1], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="pooling_type must be one of"):
        LLM(str(path), pooler_config={"pooling_type": "MAX"})
