"""Architecture name (config.architectures[0], else config.model_type) -> model class."""
from __future__ import annotations

import importlib

# architecture -> (module under pagedllm.models, class name); imported on first use
_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("llama", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("qwen3", "Qwen3ForCausalLM"),
    "GPT2LMHeadModel": ("gpt2", "GPT2LMHeadModel"),
    # pooling models (built by pooling/engine.py, which also turns decoders into embedders / classifiers)
    "BertModel": ("bert", "BertModel"),
    "BertForSequenceClassification": ("bert", "BertForSequenceClassification"),
}

# model_type -> architecture, for configs without `architectures` (e.g. built from GGUF metadata)
_MODEL_TYPES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}


def supported_architectures() -> list[str]:
    return list(_ARCHITECTURES)


def architecture_of(config) -> str:
    """The architecture name we build for this config; ValueError naming it if unsupported."""
    architectures = list(getattr(config, "architectures", None) or [])
    for arch in architectures:
        if arch in _ARCHITECTURES:
            return arch
    model_type = getattr(config, "model_type", None)
    if not architectures and model_type in _MODEL_TYPES:
        return _MODEL_TYPES[model_type]
    named = architectures[0] if architectures else f"model_type {model_type!r}"
    raise ValueError(f"Unsupported model architecture {named}; supported architectures: "
                     f"{', '.join(_ARCHITECTURES)}")


def get_model_class(config):
    module_name, class_name = _ARCHITECTURES[architecture_of(config)]
    module = importlib.import_module(f"pagedllm.models.{module_name}")
    return getattr(module, class_name)
