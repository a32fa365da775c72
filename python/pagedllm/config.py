"""EngineArgs: every option of LLM(...) / LLMEngine, validated in __post_init__."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch

QUANTIZATION_METHODS = ("gguf", "gguf_int8")


@dataclass
class EngineArgs:
    model: Optional[str] = None
    tokenizer: Optional[str] = None
    dtype: str = "auto"
    seed: Optional[int] = None
    max_model_len: Optional[int] = None
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    swap_space: float = 4               # GiB of host memory for swapped-out KV blocks (GPU only)
    kv_cache_space: Optional[float] = None  # GiB of KV cache on the CPU (default 4)
    num_gpu_blocks_override: Optional[int] = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    max_num_seqs: int = 256
    max_num_batched_tokens: Optional[int] = None
    max_logprobs: int = 20
    enforce_eager: bool = False
    tensor_parallel_size: int = 1
    distributed_executor_backend: Optional[str] = None  # "mp" (default when tensor_parallel_size > 1) or "ray"
    device: str = "auto"
    trust_remote_code: bool = False
    revision: Optional[str] = None
    tokenizer_revision: Optional[str] = None
    download_dir: Optional[str] = None
    preemption_mode: Optional[str] = None   # None: swap on GPU when swap_space > 0, else recompute
    disable_log_stats: bool = True
    load_format: str = "auto"              # "dummy": random weights from the config (benchmarks)
    skip_tokenizer_init: bool = False      # no tokenizer: token-id prompts in, token ids out (no text)
    # pooling models (pooling/config.py): runner "auto" | "generate" | "pooling"; convert "embed" | "classify" ...;
    # vLLM 0.10's task= and override_pooler_config= are accepted too
    runner: str = "auto"
    convert: Optional[str] = None
    task: Optional[str] = None
    pooler_config: Optional[object] = None
    override_pooler_config: Optional[object] = None
    structured_outputs_config: Optional[dict] = None  # {"backend": "auto" | "xgrammar" | "guidance", ...}
    guided_decoding_backend: Optional[str] = None      # vLLM 0.10's name for structured_outputs_config's backend
    speculative_config: Optional[dict] = None  # {"method": "ngram" | "draft_model", ...} (engine/spec_decode)
    # None or "gguf": a GGUF checkpoint's codes with fp32 math (exact, the default); "gguf_int8" (CPU, opt-in):
    # activations quantized per 32 inputs to int8 and integer dot products with the codes (layers/linear.py)
    quantization: Optional[str] = None
    # decode steps that run this many forwards in a row before the engine's per-token work (engine/multi_step.py);
    # None: 1, except for the offline LLM class on a CPU (multi_step.OFFLINE_CPU_STEPS)
    num_scheduler_steps: Optional[int] = None

    def __post_init__(self) -> None:
        if self.block_size not in (16, 32):
            raise ValueError(f"block_size must be 16 or 32, got {self.block_size}.")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}.")
        if self.swap_space < 0:
            raise ValueError(f"swap_space must be non-negative, got {self.swap_space}.")
        if self.kv_cache_space is not None and self.kv_cache_space <= 0:
            raise ValueError(f"kv_cache_space must be positive, got {self.kv_cache_space}.")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}.")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be at least 1, got {self.max_num_batched_tokens}.")
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be a positive integer, got {self.tensor_parallel_size!r}.")
        if self.distributed_executor_backend not in (None, "mp", "ray"):
            raise ValueError("distributed_executor_backend must be one of mp or ray, got "
                             f"{self.distributed_executor_backend!r}.")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}.")
        if self.preemption_mode not in (None, "recompute", "swap"):
            raise ValueError(f"preemption_mode must be recompute or swap, got {self.preemption_mode!r}.")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be auto or dummy, got {self.load_format!r}.")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be at least 1, got {self.max_model_len}.")
        if self.quantization is not None and self.quantization not in QUANTIZATION_METHODS:
            raise ValueError(f"Unknown quantization method: {self.quantization}. Must be one of "
                             f"{list(QUANTIZATION_METHODS)}.")
        if self.num_scheduler_steps is not None and (isinstance(self.num_scheduler_steps, bool)
                                                     or not isinstance(self.num_scheduler_steps, int)
                                                     or self.num_scheduler_steps < 1):
            raise ValueError(f"num_scheduler_steps must be a positive integer, got {self.num_scheduler_steps!r}.")
        if self.speculative_config is not None:  # validated before any model loads
            from pagedllm.engine.spec_decode.config import SpeculativeConfig
            SpeculativeConfig.from_dict(self.speculative_config)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if str(self.device).startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r} was requested but torch sees no CUDA device.")
        return torch.device(self.device)


@dataclass
class AsyncEngineArgs(EngineArgs):
    pass
