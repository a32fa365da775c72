"""GGUF files: one parsed reader per file, shared with transformers' GGUF config / tokenizer code;
config fix-ups; tensors dequantized by the gguf package and renamed to HF names through gguf's tensor
name maps, llama.cpp's q/k row permutation undone (as transformers' GGUF loader does)."""
from __future__ import annotations

import functools
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from pagedllm.models.weight_utils import checkpoint_names

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=4)
def _cached_gguf_reader(path: str, mtime_ns: int, size: int):
    from gguf.gguf_reader import GGUFReader  # the class itself, never the stand-in below

    return GGUFReader(path)


def gguf_reader(path: Path):
    """One parsed GGUFReader (memory-mapped) per file, shared by load_config, load_tokenizer and
    iter_weights (parsing the metadata of a 50k-token vocabulary takes seconds)."""
    path = Path(path).resolve()
    st = path.stat()  # a rewritten file is parsed again
    return _cached_gguf_reader(str(path), st.st_mtime_ns, st.st_size)


@contextmanager
def transformers_reuses_reader(path: Path) -> Iterator[None]:
    """transformers' GGUF code imports gguf.GGUFReader at call time and parses the file again for
    the config and again for the tokenizer: hand it our parsed reader of this file instead."""
    import gguf

    original, target = gguf.GGUFReader, Path(path).resolve()

    def reader(p, *args, **kwargs):
        if not args and not kwargs and Path(p).resolve() == target:
            return gguf_reader(target)
        return original(p, *args, **kwargs)

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = original


def gguf_field(reader, key: str, default=None):
    """A scalar or string metadata value of a GGUF file."""
    field = reader.fields.get(key)
    if field is None or not field.data:
        return default
    value = field.parts[field.data[0]]
    if field.types and field.types[0].name == "STRING":
        return bytes(value).decode()
    return value.tolist()[0]


def fix_gguf_config(config, path: Path) -> None:
    """In place on the config transformers built from the GGUF metadata."""
    # What transformers' GGUF config reader misses. head_dim: it reads it only from llama's
    # rope.dimension_count, Qwen3 (head_dim != hidden / heads) needs attention.key_length.
    reader = gguf_reader(path)
    arch = gguf_field(reader, "general.architecture")
    key_length = gguf_field(reader, f"{arch}.attention.key_length")
    if key_length and getattr(config, "model_type", None) in ("llama", "mistral", "qwen2", "qwen3"):
        config.head_dim = int(key_length)
    # GPT-2: transformers maps context_length to n_ctx; the position table has n_positions rows
    context_length = gguf_field(reader, f"{arch}.context_length")
    if context_length and getattr(config, "model_type", None) == "gpt2":
        config.n_positions = int(context_length)


def _reverse_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's convert_hf_to_gguf permute of q / k rows (as transformers' LlamaTensorProcessor)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


# GGUF tensors stored in nn.Linear layout that HF keeps as Conv1D ([in, out]), per GGUF architecture
_GGUF_TRANSPOSED = {"gpt2": ("attn_qkv.weight", "attn_output.weight", "ffn_up.weight", "ffn_down.weight")}


def iter_gguf_weights(path: Path, model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    import gguf

    reader = gguf_reader(path)
    arch = gguf_field(reader, "general.architecture")
    arch_ids = [k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch]
    if not arch_ids:
        raise ValueError(f"GGUF architecture {arch!r} is unknown to the gguf package")
    config = model.config
    name_map = gguf.get_tensor_name_map(arch_ids[0], config.num_hidden_layers)
    to_hf: dict[str, str] = {}
    for hf_name in checkpoint_names(model):
        base, suffix = hf_name.rsplit(".", 1)
        gguf_base = name_map.get_name(base)
        if gguf_base is not None:
            to_hf[f"{gguf_base}.{suffix}"] = hf_name
    n_head = config.num_attention_heads
    n_kv_head = getattr(config, "num_key_value_heads", None) or n_head
    for tensor in reader.tensors:
        hf_name = to_hf.get(tensor.name)
        if hf_name is None:
            logger.info("GGUF tensor %s has no parameter in %s; skipped", tensor.name, type(model).__name__)
            continue
        w = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        if arch == "llama":  # llama.cpp permutes q / k rows for its rope layout
            if ".attn_q." in tensor.name:
                w = _reverse_permute(w, n_head)
            elif ".attn_k." in tensor.name:
                w = _reverse_permute(w, n_kv_head)
        if tensor.name.endswith(_GGUF_TRANSPOSED.get(arch, ())):
            w = w.T
        yield hf_name, torch.from_numpy(np.array(w, dtype=np.float32, order="C"))
