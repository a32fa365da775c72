"""PoolingParams: what a pooling request asks for (vLLM's names; 0.10's softmax / activation accepted).

Each pooling task takes only its own parameters (vLLM's rule):
    embed, token_embed:       dimensions, normalize
    classify, score, token_classify (reward): use_activation
truncate_prompt_tokens (any task) keeps the last k prompt tokens; -1 means the model's maximum length.
Unset fields (None) take the model's defaults (its pooler config) when the engine resolves the request.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

POOLING_TASKS = ("embed", "classify", "score", "token_embed", "token_classify", "encode")
_TASK_PARAMETERS = {"embed": ("dimensions", "normalize"), "token_embed": ("dimensions", "normalize"),
                    "classify": ("use_activation",), "score": ("use_activation",),
                    "token_classify": ("use_activation",)}


@dataclass
class PoolingParams:
    truncate_prompt_tokens: Optional[int] = None
    dimensions: Optional[int] = None
    normalize: Optional[bool] = None
    use_activation: Optional[bool] = None
    softmax: Optional[bool] = None      # vLLM 0.10's name for use_activation (classify)
    activation: Optional[bool] = None   # vLLM 0.10's name for use_activation (score / classify)
    task: Optional[str] = None          # set by LLM.embed / classify / ... (or encode's pooling_task)

    def __post_init__(self) -> None:
        if self.use_activation is None:
            self.use_activation = self.softmax if self.softmax is not None else self.activation
        t = self.truncate_prompt_tokens
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or (t < 1 and t != -1)):
            raise ValueError(f"truncate_prompt_tokens must be >= 1 or -1, got {t}")
        if self.dimensions is not None and (isinstance(self.dimensions, bool) or not isinstance(self.dimensions, int)):
            raise ValueError(f"dimensions must be an integer, got {self.dimensions!r}")
        if self.task is not None and self.task not in POOLING_TASKS:
            raise ValueError(f"Unknown pooling task {self.task!r}; one of {', '.join(POOLING_TASKS)}")

    def clone(self) -> "PoolingParams":
        return replace(self)

    def verify(self, task: str) -> None:
        """ValueError when a parameter is set that `task` does not take (vLLM's wording)."""
        if self.task is not None and self.task != task and task != "encode":
            raise ValueError(f"You cannot overwrite {self.task=!r} with {task=!r}!")
        valid = _TASK_PARAMETERS.get(task, ())
        invalid = [name for name in ("dimensions", "normalize", "use_activation")
                   if getattr(self, name) is not None and name not in valid]
        if invalid:
            raise ValueError(f"Task {task} only supports {list(valid)} parameters, does not support "
                             f"{invalid} parameters")
