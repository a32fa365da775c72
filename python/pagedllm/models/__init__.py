"""Models (one file per family, built from pagedllm.layers) and their loading.

The model runner's entry points: resolve_model, load_config, load_tokenizer, load_generation_config,
resolve_dtype, load_model (build_model + load_weights(iter_weights(...))), max_model_len_of."""
from pagedllm.models.loader import (ModelSource, build_model, iter_weights, load_config, load_generation_config,
                                    load_model, load_tokenizer, max_model_len_of, resolve_dtype, resolve_model)
from pagedllm.models.registry import get_model_class, supported_architectures

__all__ = ["ModelSource", "build_model", "get_model_class", "iter_weights", "load_config", "load_generation_config",
           "load_model", "load_tokenizer", "max_model_len_of", "resolve_dtype", "resolve_model",
           "supported_architectures"]
