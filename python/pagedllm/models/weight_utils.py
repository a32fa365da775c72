"""The one load_weights of every model: checkpoint (HF) names -> our parameters, driven by data
each model class declares, never by per-checkpoint code:

    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
        checkpoint tensor "....q_proj.weight" is shard 0 of our "....qkv_proj.weight" (load_shard of the module)
    weight_renames = ((regex, replacement), ...)   applied to each checkpoint name first
    skip_weights = (regex, ...)                    checkpoint names that are not parameters (buffers of old checkpoints)
    transposed_weights = (suffix, ...)             stored as [in, out] (GPT-2's Conv1D): transposed on load

A tied LM head (tie_word_embeddings) has no parameter: a checkpoint's lm_head.weight is then skipped.
"""
from __future__ import annotations

import logging
import re
from typing import Iterable

import torch
from torch import nn

from pagedllm.layers.linear import repack_linear_weights

logger = logging.getLogger(__name__)


def _lm_head_tied(model: nn.Module) -> bool:
    head = getattr(model, "lm_head", None)
    return bool(getattr(head, "tied", False))


def load_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
    """Copy the checkpoint's tensors into the model (converting to each parameter's dtype and device).
    Returns the names of our parameters that were loaded. Raises ValueError if a parameter (or one
    shard of a packed one) got no tensor, or a tensor's shape does not fit."""
    packed: dict[str, list[str]] = getattr(model, "packed_modules_mapping", {})
    renames = [(re.compile(p), r) for p, r in getattr(model, "weight_renames", ())]
    skips = [re.compile(p) for p in getattr(model, "skip_weights", ())]
    transposed = tuple(getattr(model, "transposed_weights", ()))
    params = dict(model.named_parameters())
    tied = _lm_head_tied(model)
    shards_loaded: dict[str, set[int]] = {}
    unexpected: list[str] = []

    for name, tensor in weights:
        for pattern, replacement in renames:
            name = pattern.sub(replacement, name)
        if any(p.search(name) for p in skips) or (tied and name == "lm_head.weight"):
            continue
        if transposed and name.endswith(transposed):
            tensor = tensor.t()
        target, shard = name, None
        for packed_name, subs in packed.items():
            for i, sub in enumerate(subs):
                if f".{sub}." in name:
                    target, shard = name.replace(f".{sub}.", f".{packed_name}."), i
                    break
            if shard is not None:
                break
        if target not in params:
            unexpected.append(name)
            continue
        module_name, param_name = target.rsplit(".", 1)
        if shard is not None:
            model.get_submodule(module_name).load_shard(param_name, tensor, shard)
        else:
            param = params[target]
            if tuple(param.shape) != tuple(tensor.shape):
                raise ValueError(f"{name}: checkpoint tensor has shape {tuple(tensor.shape)}, "
                                 f"the model expects {tuple(param.shape)}")
            with torch.no_grad():
                param.copy_(tensor)
        if shard is None:  # the whole parameter (a checkpoint that stores it packed already)
            shards_loaded[target] = set(range(len(getattr(model.get_submodule(module_name), "output_sizes", [0]))))
        else:
            shards_loaded.setdefault(target, set()).add(shard)

    missing = []
    for target in params:
        module_name, _ = target.rsplit(".", 1)
        module = model.get_submodule(module_name)
        need = len(getattr(module, "output_sizes", [0]))
        got = shards_loaded.get(target, set())
        if len(got) < need:
            missing.append(target if need == 1 else f"{target} (shards {sorted(set(range(need)) - got)})")
    if missing:
        raise ValueError(f"The checkpoint has no weights for {len(missing)} parameter(s) of "
                         f"{type(model).__name__}: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
    if unexpected:
        logger.warning("Ignored %d checkpoint tensor(s) that %s has no parameter for: %s", len(unexpected),
                       type(model).__name__, ", ".join(unexpected[:10]))
    repack_linear_weights(model)  # a reload into a running CPU engine: its packed copies follow
    return set(shards_loaded)


def checkpoint_names(model: nn.Module) -> list[str]:
    """The HF checkpoint names this model loads: our parameter names with packed modules expanded
    (qkv_proj -> q_proj, k_proj, v_proj). Used to map GGUF tensor names onto HF names."""
    packed: dict[str, list[str]] = getattr(model, "packed_modules_mapping", {})
    names = []
    for name, _ in model.named_parameters():
        for packed_name, subs in packed.items():
            if f".{packed_name}." in name:
                names.extend(name.replace(f".{packed_name}.", f".{sub}.") for sub in subs)
                break
        else:
            names.append(name)
    return names
