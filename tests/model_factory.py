"""Tiny random models of every supported architecture, saved as HF folders (config.json,
model.safetensors, tokenizer files) in a temp dir: what the engine and model tests load.
Model hubs are unreachable in CI, so everything here is built locally in a second or two."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

_CORPUS = [
    "The capital of France is Paris. The capital of Germany is Berlin. ",
    "Hello world! How are you today? I am fine, thank you. ",
    "你好，世界。今天天气很好。 中文测试 ",
    "Emoji: 😀 🎉 🚀 👍 and accents: café, naïve, über. ",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n",
    "<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}</tool_call> ",
]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@functools.lru_cache(maxsize=None)
def _tokenizer_json(kind: str, vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    if kind == "bytelevel":   # GPT-2 / Llama-3 / Qwen / SmolLM style
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    elif kind == "bytefallback":  # Llama-2 / Mistral style: "▁" spaces, <0xNN> byte tokens for unknown chars
        tok = Tokenizer(models.BPE(byte_fallback=True, unk_token=None))
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
        alphabet = []
    else:
        raise ValueError(kind)
    special = SPECIAL_TOKENS + ([f"<0x{b:02X}>" for b in range(256)] if kind == "bytefallback" else [])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS * 20, trainer)
    spec = json.loads(tok.to_str())
    # The trainer registers the byte tokens as special added tokens; in real byte-fallback tokenizers
    # they are ordinary vocabulary entries (so skip_special_tokens keeps them).
    spec["added_tokens"] = [t for t in spec["added_tokens"] if not t["content"].startswith("<0x")]
    return json.dumps(spec)


def make_tokenizer(kind: str = "bytelevel", vocab_size: int = 512):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer.from_str(_tokenizer_json(kind, vocab_size))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token=None)


def tiny_config(arch: str, vocab_size: int):
    import transformers as tf
    common = dict(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                  bos_token_id=0, eos_token_id=2, tie_word_embeddings=False)
    if arch == "llama":
        return tf.LlamaConfig(**common, rope_theta=10000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64})
    if arch == "mistral":
        return tf.MistralConfig(**common, sliding_window=24, rope_theta=10000.0)
    if arch == "qwen2":
        return tf.Qwen2Config(**{**common, "tie_word_embeddings": True}, rope_theta=1e6)
    if arch == "qwen3":
        return tf.Qwen3Config(**common, head_dim=64, rope_theta=1e6)
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=vocab_size, n_embd=128, n_layer=2, n_head=2, n_positions=512,
                             bos_token_id=0, eos_token_id=2)
    raise ValueError(arch)


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gpt2"]


def make_tiny_model(root: Path, arch: str, tokenizer_kind: str = "bytelevel", seed: int = 0,
                    dtype: torch.dtype = torch.float32) -> Path:
    """An HF model folder with random weights saved in dtype (its config's dtype too) and a trained
    tokenizer; returns its path."""
    from transformers import AutoModelForCausalLM
    suffix = "" if dtype == torch.float32 else "-" + str(dtype).removeprefix("torch.")
    path = Path(root) / f"tiny-{arch}-{tokenizer_kind}{suffix}"
    if (path / "config.json").exists():
        return path
    tokenizer = make_tokenizer(tokenizer_kind)
    config = tiny_config(arch, len(tokenizer))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger weights than the default init: less flat logits, fewer near-ties
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
    model.to(dtype).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
