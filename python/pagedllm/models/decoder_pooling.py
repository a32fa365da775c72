"""Decoder models (Llama, Mistral, Qwen2, Qwen3) as pooling models: the same LlamaModel body, with
    *ForEmbedding                 no head: pooled hidden states are the embeddings (LAST or MEAN)
    *ForSequenceClassification    HF's `score` head (Linear hidden -> num_labels, no bias) on the pooled token
Both load HF checkpoints of the causal LM (model.* names, lm_head skipped) or of the bare *Model
(names without the model. prefix, as sentence-transformers saves them) through the declared mapping.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from pagedllm.layers.attention import Attention
from pagedllm.layers.linear import Linear
from pagedllm.models.llama import LlamaForCausalLM, LlamaModel
from pagedllm.models.weight_utils import load_weights


class _DecoderPoolingModel(nn.Module):
    base: type = LlamaForCausalLM   # gives attention_options and the packed mapping
    is_encoder = False
    packed_modules_mapping = LlamaForCausalLM.packed_modules_mapping

    def __init__(self, config, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.config = config
        self.dtype = dtype or torch.get_default_dtype()
        self.model = LlamaModel(config, self.dtype, **self.base.attention_options(config))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, token_type_ids=None) -> torch.Tensor:
        """input_ids, positions: [num_tokens] -> final-normed hidden states [num_tokens, hidden]."""
        return self.model(input_ids, positions)

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_weights(self, weights)


class DecoderForEmbedding(_DecoderPoolingModel):
    weight_renames = ((r"^(?!model\.)", "model."),)  # bare *Model checkpoints
    skip_weights = (r"rotary_emb\.inv_freq$", r"^model\.lm_head\.", r"^model\.score\.")


class DecoderForSequenceClassification(_DecoderPoolingModel):
    skip_weights = (r"rotary_emb\.inv_freq$", r"^lm_head\.")
    first_token_classifier = False

    def __init__(self, config, dtype: Optional[torch.dtype] = None):
        super().__init__(config, dtype)
        self.score = Linear(config.hidden_size, config.num_labels, False, self.dtype)

    def classify(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, hidden] (each sequence's pooled token) -> [n, num_labels] float32 logits."""
        return self.score(hidden).float()


def _bases() -> dict[str, type]:
    from pagedllm.models.llama import MistralForCausalLM
    from pagedllm.models.qwen2 import Qwen2ForCausalLM
    from pagedllm.models.qwen3 import Qwen3ForCausalLM
    return {"Llama": LlamaForCausalLM, "Mistral": MistralForCausalLM, "Qwen2": Qwen2ForCausalLM,
            "Qwen3": Qwen3ForCausalLM}


_SUFFIXES = ("ForCausalLM", "ForSequenceClassification", "ForRewardModel", "Model")


def decoder_family(arch: str) -> Optional[str]:
    """"Qwen2" for Qwen2ForCausalLM / Qwen2ForSequenceClassification / Qwen2Model ..., None if not ours."""
    for suffix in _SUFFIXES:
        if arch.endswith(suffix) and arch[: -len(suffix)] in _bases():
            return arch[: -len(suffix)]
    return None


def pooling_class(family: str, kind: str) -> type:
    """kind: "embed" or "classify" -> a class built on that family's causal LM."""
    base = _bases()[family]
    parent = DecoderForEmbedding if kind == "embed" else DecoderForSequenceClassification
    name = f"{family}{'ForEmbedding' if kind == 'embed' else 'ForSequenceClassification'}"
    return type(name, (parent,), {"base": base, "packed_modules_mapping": base.packed_modules_mapping})
