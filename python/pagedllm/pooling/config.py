"""Which pooling tasks a model serves, and how it pools by default.

Defaults, as vLLM picks them: a model folder with sentence-transformers files (modules.json with a Pooling
module and 1_Pooling/config.json, a Normalize module) gives the embedding pooling type and normalize;
otherwise per task: embed = LAST + normalize for decoders, CLS + normalize for encoders; classify /
score = the classifier head on LAST (decoders) or [CLS] (BERT's pooler), with activation; reward = ALL,
no activation. pooler_config (or 0.10's override_pooler_config) overrides any of them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional, Union

POOLING_TYPES = ("LAST", "MEAN", "CLS", "ALL")
RUNNERS = ("auto", "generate", "pooling")
CONVERTS = ("auto", "none", "embed", "classify", "reward")
TASKS_0_10 = {"embed": "embed", "embedding": "embed", "classify": "classify", "score": "classify",
              "reward": "reward"}


@dataclass
class PoolerConfig:
    pooling_type: Optional[str] = None
    normalize: Optional[bool] = None
    use_activation: Optional[bool] = None
    softmax: Optional[bool] = None      # 0.10's name
    activation: Optional[bool] = None   # 0.10's name
    dimensions: Optional[int] = None    # default output dimensions (matryoshka models)

    def __post_init__(self) -> None:
        if self.pooling_type is not None:
            self.pooling_type = str(self.pooling_type).upper()
            if self.pooling_type not in POOLING_TYPES:
                raise ValueError(f"pooling_type must be one of {list(POOLING_TYPES)}, got {self.pooling_type!r}")
        if self.use_activation is None:
            self.use_activation = self.softmax if self.softmax is not None else self.activation

    @classmethod
    def from_any(cls, value: Union[None, dict, "PoolerConfig", Any]) -> "PoolerConfig":
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            value = json.loads(value)
        if not isinstance(value, dict):
            value = {f.name: getattr(value, f.name) for f in fields(cls) if hasattr(value, f.name)}
        unknown = sorted(set(value) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"Unknown pooler_config field(s): {', '.join(unknown)}")
        return cls(**value)


@dataclass
class PoolingDefaults:
    """What the engine fills in for a request that leaves a field unset."""
    embed_pooling: str
    classify_pooling: str
    normalize: bool
    use_activation: bool
    dimensions: Optional[int] = None


_ST_MODES = (("pooling_mode_cls_token", "CLS"), ("pooling_mode_mean_tokens", "MEAN"),
             ("pooling_mode_lasttoken", "LAST"))


def sentence_transformers_defaults(folder: Optional[Path]) -> dict:
    """{"pooling_type", "normalize"} from a sentence-transformers folder ({} when it is not one).
    ValueError for a pooling mode pagedllm cannot reproduce (max, mean_sqrt_len, weighted ...)."""
    if folder is None or not (folder / "modules.json").is_file():
        return {}
    with open(folder / "modules.json") as f:
        modules = json.load(f)
    found: dict = {"normalize": any(m.get("type", "").endswith(".Normalize") for m in modules)}
    for m in modules:
        if not m.get("type", "").endswith(".Pooling"):
            continue
        path = folder / m.get("path", "") / "config.json"
        if not path.is_file():
            continue
        with open(path) as f:
            cfg = json.load(f)
        modes = [name for key, name in _ST_MODES if cfg.get(key)]
        others = [k for k, v in cfg.items() if k.startswith("pooling_mode_") and v and
                  k not in dict(_ST_MODES)]
        if others or len(modes) > 1:
            raise ValueError(f"sentence-transformers pooling {others + modes} is not supported; "
                             f"pagedllm pools with one of CLS, MEAN, LAST")
        if modes:
            found["pooling_type"] = modes[0]
    return found


def sentence_transformers_max_seq_length(folder: Optional[Path]) -> Optional[int]:
    path = folder / "sentence_bert_config.json" if folder is not None else None
    if path is None or not path.is_file():
        return None
    with open(path) as f:
        return json.load(f).get("max_seq_length")


def resolve_defaults(folder: Optional[Path], is_encoder: bool, override: PoolerConfig) -> PoolingDefaults:
    st = sentence_transformers_defaults(folder)
    embed_pooling = override.pooling_type or st.get("pooling_type") or ("CLS" if is_encoder else "LAST")
    classify_pooling = override.pooling_type or ("CLS" if is_encoder else "LAST")
    normalize = override.normalize if override.normalize is not None else st.get("normalize", True)
    use_activation = override.use_activation if override.use_activation is not None else True
    return PoolingDefaults(embed_pooling, classify_pooling, bool(normalize), bool(use_activation),
                           override.dimensions)
