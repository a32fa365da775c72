"""Where a model comes from and how its pieces are read.

    source = resolve_model(model)              # None (built-in default), local HF folder, .gguf file, hub id
    config = load_config(source)               # transformers PretrainedConfig
    tokenizer = load_tokenizer(source)         # transformers tokenizer (GGUF: with the chat template)
    defaults = load_generation_config(source)  # generation_config.json as a dict ({} if none)
    model = load_model(source, dtype, device)  # built from the registry, weights loaded, eval mode

iter_weights(source) yields (HF name, tensor) pairs: safetensors (sharded or not), *.bin through
torch.load(weights_only=True), or GGUF tensors (gguf_utils.py).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch

from pagedllm.models.registry import get_model_class
from pagedllm.models.gguf_utils import fix_gguf_config, iter_gguf_weights, transformers_reuses_reader

logger = logging.getLogger(__name__)

HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt"]


@dataclass(frozen=True)
class ModelSource:
    name: str      # what was asked for (hub id, path), or the default model's name
    path: Path     # the HF folder, or the .gguf file
    format: str    # "hf" or "gguf"

    @property
    def is_gguf(self) -> bool:
        return self.format == "gguf"

    @property
    def folder(self) -> Path:
        return self.path.parent if self.is_gguf else self.path


def _looks_like_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~")) or model.endswith(".gguf") or model.count("/") > 1


def _local_source(name: str, path: Path) -> ModelSource:
    if path.is_file():
        if path.suffix == ".gguf":
            return ModelSource(name, path, "gguf")
        raise ValueError(f"Model file {path} is not a .gguf file; pass a .gguf file or an HF model folder")
    if (path / "config.json").is_file():
        return ModelSource(name, path, "hf")
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSource(name, ggufs[0], "gguf")
    what = f"{len(ggufs)} .gguf files (pass one of them)" if ggufs else "no config.json and no .gguf file"
    raise ValueError(f"Model folder {path} has {what}")


def _from_hub(repo_id: str, download_dir: Optional[str] = None, revision: Optional[str] = None) -> ModelSource:
    from huggingface_hub import snapshot_download

    kwargs = dict(cache_dir=download_dir, revision=revision)
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, **kwargs))
        if not any(folder.glob("*.safetensors")):  # older repos: PyTorch .bin weights only
            folder = Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS + ["*.bin"], **kwargs))
    except Exception as e:  # offline, unreachable, unknown repo, gated ...
        raise ValueError(
            f"Could not get model {repo_id!r} from the Hugging Face Hub ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). If you are offline or the Hub is unreachable, pass a "
            f"local model folder (config.json + *.safetensors) or a .gguf file path instead, or model=None "
            f"for the built-in default model.") from e
    return ModelSource(repo_id, folder, "hf")


def resolve_model(model: Union[str, os.PathLike, ModelSource, None], download_dir: Optional[str] = None,
                  revision: Optional[str] = None) -> ModelSource:
    """None -> the built-in default (fetched once into the cache); an existing path -> that folder or
    .gguf file; anything else that looks like a hub id -> huggingface_hub.snapshot_download (into
    download_dir, at revision, when given)."""
    if isinstance(model, ModelSource):
        return model
    if model is None:
        from pagedllm.default_model import DEFAULT_MODEL_NAME, default_model_path

        return ModelSource(DEFAULT_MODEL_NAME, default_model_path(), "gguf")
    name = os.fspath(model)
    path = Path(name).expanduser()
    if path.exists():
        return _local_source(name, path)
    if _looks_like_path(name) or isinstance(model, os.PathLike):
        raise ValueError(f"Model path {name!r} does not exist")
    return _from_hub(name, download_dir, revision)


# --- config, tokenizer, generation defaults ------------------------------------------------------


def load_config(source: ModelSource):
    from transformers import AutoConfig

    if not source.is_gguf:
        return AutoConfig.from_pretrained(str(source.path))
    with transformers_reuses_reader(source.path):
        config = AutoConfig.from_pretrained(str(source.folder), gguf_file=source.path.name)
    fix_gguf_config(config, source.path)
    return config


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(source: ModelSource, tokenizer: Optional[str] = None, **kwargs):
    """The model's tokenizer, or the one named by `tokenizer` (a folder, a .gguf file or a hub id)."""
    from transformers import AutoTokenizer

    if tokenizer is not None:
        path = Path(tokenizer).expanduser()
        if path.is_file():
            source = _local_source(tokenizer, path)
        elif path.is_dir():
            ggufs = sorted(path.glob("*.gguf"))
            has_hf = any((path / f).is_file() for f in _TOKENIZER_FILES)
            source = ModelSource(tokenizer, ggufs[0], "gguf") if len(ggufs) == 1 and not has_hf else \
                ModelSource(tokenizer, path, "hf")
        else:
            try:
                return AutoTokenizer.from_pretrained(tokenizer, **kwargs)
            except Exception as e:
                raise ValueError(f"Could not load tokenizer {tokenizer!r} ({type(e).__name__}: {e}); pass a "
                                 f"local tokenizer folder or .gguf file") from e
    if source.is_gguf:
        with transformers_reuses_reader(source.path):
            return AutoTokenizer.from_pretrained(str(source.folder), gguf_file=source.path.name, **kwargs)
    return AutoTokenizer.from_pretrained(str(source.path), **kwargs)


def load_generation_config(source: ModelSource) -> dict[str, Any]:
    """generation_config.json's fields (vLLM turns them into default SamplingParams); {} if none."""
    from pagedllm.default_model import DEFAULT_MODEL_NAME, GENERATION_DEFAULTS

    if source.is_gguf:
        return dict(GENERATION_DEFAULTS) if source.name == DEFAULT_MODEL_NAME else {}
    path = source.path / "generation_config.json"
    if not path.is_file():
        return {}
    with open(path) as f:
        return json.load(f)


# --- weights ---------------------------------------------------------------------------------------


def _weight_files(folder: Path) -> tuple[str, list[Path]]:
    """("safetensors" | "bin", files) of an HF folder."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        with open(index) as f:
            return "safetensors", [folder / n for n in sorted(set(json.load(f)["weight_map"].values()))]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        # Mistral repos ship consolidated*.safetensors (other names) next to the HF ones
        hf_files = [f for f in files if not f.name.startswith("consolidated")]
        return "safetensors", hf_files or files
    index = folder / "pytorch_model.bin.index.json"
    if index.is_file():
        with open(index) as f:
            return "bin", [folder / n for n in sorted(set(json.load(f)["weight_map"].values()))]
    files = [f for f in sorted(folder.glob("*.bin"))
             if f.name not in ("training_args.bin", "optimizer.bin", "scheduler.bin")]
    if files:
        return "bin", files
    raise ValueError(f"No weights in {folder}: expected *.safetensors (or model.safetensors.index.json) or *.bin")


def _iter_hf_weights(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    kind, files = _weight_files(folder)
    for file in files:
        if kind == "safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        else:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
                state = torch.load(file, map_location="cpu", weights_only=True)
            yield from state.items()
            del state


def iter_weights(source: ModelSource, model: Optional[torch.nn.Module] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, CPU tensor) pairs. GGUF names are mapped onto the names `model` loads (a meta-device
    instance is built from the config when no model is given)."""
    if not source.is_gguf:
        return _iter_hf_weights(source.path)
    if model is None:
        config = load_config(source)
        with torch.device("meta"):
            model = get_model_class(config)(config, dtype=torch.float32)
    return iter_gguf_weights(source.path, model)


# --- building the model ------------------------------------------------------------------------------

_DTYPES = {"float32": torch.float32, "float": torch.float32, "float16": torch.float16, "half": torch.float16,
           "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def checkpoint_dtype(config) -> Optional[torch.dtype]:
    """The dtype the checkpoint declares (config.dtype / torch_dtype), None if it declares none."""
    value = getattr(config, "dtype", None)  # transformers >= 4.56 (torch_dtype is its deprecated alias)
    if isinstance(value, str):
        value = _DTYPES.get(value.lower().removeprefix("torch."))
    return value if isinstance(value, torch.dtype) else None


def resolve_dtype(dtype: Union[str, torch.dtype, None], config, device: Union[str, torch.device]) -> torch.dtype:
    """"auto" (or None): float32 on CPU; on GPU the checkpoint's half type, else bfloat16."""
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"Unsupported dtype {dtype}; use float32, float16 or bfloat16")
        return dtype
    if dtype is None or dtype == "auto":
        if torch.device(device).type == "cpu":
            return torch.float32
        ckpt = checkpoint_dtype(config) if config is not None else None
        return ckpt if ckpt in (torch.float16, torch.bfloat16) else torch.bfloat16
    try:
        return _DTYPES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"Unknown dtype {dtype!r}; use 'auto', 'float32', 'float16' or 'bfloat16'") from None


def round_weights(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Every floating parameter of model rounded to dtype's values, kept in its own dtype: what a
    16-bit dtype gives on a CPU that computes it in float32 (cpu_features.cpu_math_dtype)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != dtype:
                p.copy_(p.to(dtype))


def max_model_len_of(config) -> int:
    """The longest sequence the model was built for (max_position_embeddings / n_positions)."""
    return int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions"))


def build_model(config, dtype: torch.dtype, device: Union[str, torch.device] = "cpu") -> torch.nn.Module:
    """The registry's model for this config, parameters allocated (uninitialised) on device."""
    cls = get_model_class(config)
    with torch.device(device):
        model = cls(config, dtype=dtype)
    return model.eval()


def load_model(source: ModelSource, config=None, dtype: Union[str, torch.dtype, None] = "auto",
               device: Union[str, torch.device] = "cpu") -> torch.nn.Module:
    """build_model + every weight of the source loaded (ValueError if one is missing).
    config: load_config(source) when not given; dtype: a torch dtype or a name for resolve_dtype."""
    config = config if config is not None else load_config(source)
    model = build_model(config, resolve_dtype(dtype, config, device), device)
    with torch.no_grad():
        model.load_weights(iter_weights(source, model))
    return model


def load_hf_reference(model: Union[str, os.PathLike, ModelSource, None], dtype: torch.dtype = torch.float32,
                      device: Union[str, torch.device] = "cpu"):
    """transformers' own model for the same source (the reference of tests and benchmarks), in eval
    mode. A GGUF goes through transformers' GGUF reader (names, permutation, dequantization) without
    from_pretrained(gguf_file=...), which would need the accelerate package."""
    from transformers import AutoModelForCausalLM

    source = resolve_model(model)
    if not source.is_gguf:
        return AutoModelForCausalLM.from_pretrained(str(source.path), dtype=dtype).to(device).eval()
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = load_config(source)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with transformers_reuses_reader(source.path):
        state = load_gguf_checkpoint(str(source.path), return_tensors=True, model_to_load=hf)["tensors"]
    hf.load_state_dict(state, strict=not getattr(config, "tie_word_embeddings", False))
    if getattr(config, "tie_word_embeddings", False):
        hf.tie_weights()
    return hf.to(device=device, dtype=dtype).eval()
