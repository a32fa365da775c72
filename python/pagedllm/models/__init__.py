"""Models (one file per family, built from pagedllm.layers) and their loading.

The engine's entry points (all in loader): resolve_model, load_config, load_tokenizer,
load_generation_config, checkpoint_dtype / resolve_dtype, load_model (build_model +
load_weights(iter_weights(...))), load_hf_reference (transformers' model, for tests and benchmarks)."""
from pagedllm.models.loader import (ModelSource, build_model, checkpoint_dtype, iter_weights, load_config,
                                    load_generation_config, load_hf_reference, load_model, load_tokenizer,
                                    max_model_len_of, resolve_dtype, resolve_model)
from pagedllm.models.registry import get_model_class, supported_architectures

__all__ = ["ModelSource", "build_model", "checkpoint_dtype", "get_model_class", "iter_weights", "load_config",
           "load_generation_config", "load_hf_reference", "load_model", "load_tokenizer", "max_model_len_of",
           "resolve_dtype", "resolve_model", "supported_architectures"]
