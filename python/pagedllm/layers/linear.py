"""Linear layers, the token embedding and the LM head, with the weight loaders the shared model
loader calls (models/weight_utils.py).

Parameters are allocated uninitialised (torch.empty): every one of them is overwritten by the
checkpoint, and random init of a 7B model would cost seconds. Weights use nn.Linear's layout
[out_features, in_features]; the math is F.linear in the parameters' dtype (as HF's nn.Linear),
except for the small-M GEMMs of CPU fp32 decode steps once pack_linear_weights has run (below).
"""
from __future__ import annotations

import functools
import os
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm import _ops, cpu_features, huge_pages
from pagedllm.distributed import parallel_state

# CPU fp32 GEMMs of PACKED_MIN_ROWS..PACKED_MAX_ROWS rows go through our packed-weight kernel
# (csrc/cpu/packed_linear.cpp); MKL's GEMV is as fast for one row, and on an Intel AVX-512 host its
# cache blocking wins above 64 (benchmarks/kernels/bench_packed_linear.py, 2 cores, the default
# model's decode step: 1 row x0.95, 8 rows x1.80, 32 rows x1.50, 64 rows x1.35 against F.linear).
# On an AMD CPU with AVX-512, MKL runs its AVX2 code: on 2 Zen 5 cores F.linear made ~195 GFLOP/s
# and packed_linear ~430 from 32 to 4096 rows, the codes kernel 1.7-3.7x F.linear at 64-2048 rows
# (benchmarks/RESULTS.md, 2026-12-07 third session), so there the kernels take every row count
# (prefill included), one-row GEMVs too (MKL's made ~12 GB/s there, packed_linear ~40: a real fp32
# checkpoint's batch-1 decode went from 22 to 70 tok/s, 83% of its memory floor).
# PAGEDLLM_CPU_PACKED_MAX_ROWS overrides the row limit.
PACKED_MAX_ROWS_ENV = "PAGEDLLM_CPU_PACKED_MAX_ROWS"
NO_ROW_LIMIT = 1 << 62


def mkl_runs_avx2_code() -> bool:
    """An AMD CPU with AVX-512: MKL dispatches its AVX2 kernels there, at half our AVX-512 kernels' rate."""
    return "avx512f" in cpu_features.cpu_flags() and cpu_features.cpu_vendor() == "AuthenticAMD"


PACKED_MIN_ROWS = 1 if mkl_runs_avx2_code() else 2


def default_packed_max_rows() -> int:
    """The most rows a GEMM sends to the packed / code kernels: PAGEDLLM_CPU_PACKED_MAX_ROWS when set,
    else no limit on an AMD CPU with AVX-512, else 64."""
    env = os.environ.get(PACKED_MAX_ROWS_ENV)
    if env is not None:
        try:
            rows = int(env)
        except ValueError:
            rows = 0
        if rows < 1:
            raise ValueError(f"{PACKED_MAX_ROWS_ENV} must be a positive integer, got {env!r}")
        return min(rows, NO_ROW_LIMIT)  # the decoder_layers op takes it as an int64
    if mkl_runs_avx2_code():
        return NO_ROW_LIMIT
    return 64


PACKED_MAX_ROWS = default_packed_max_rows()
# Weights that are exactly GGUF Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 / Q4_K / Q6_K blocks
# (csrc/cpu/quantized_linear.cpp) stream their codes instead, 3-6x fewer bytes: from one row on,
# the same result bit for bit.
QUANTIZED_MIN_ROWS = 1
# The code formats pack_weight tries, fewest bytes first (GGML type ids; a weight exactly of two
# formats gives the same bits through either).
CODE_QTYPES = (2, 3, 12, 6, 7, 8, 14)  # Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q8_0, Q6_K
# PAGEDLLM_CPU_QUANTIZED_WEIGHTS=0 keeps every packed weight in fp32 (to measure what the codes bring).
QUANTIZED_ENV = "PAGEDLLM_CPU_QUANTIZED_WEIGHTS"
# Weights that are exactly bfloat16 / float16 values (a 16-bit HF checkpoint loaded as float32) stream
# those 16 bits and widen them in registers (csrc/cpu/wide16_linear.cpp): half of fp32's bytes, the
# same result bit for bit, from one row on. GGML type ids, tried after the codes.
WIDE16_QTYPES = (30, 1)  # BF16, F16
# PAGEDLLM_CPU_WIDE16_WEIGHTS=0 keeps such weights in fp32 panels (to measure what the 16 bits bring).
WIDE16_ENV = "PAGEDLLM_CPU_WIDE16_WEIGHTS"


# A model kept in bfloat16 / float16 on a CPU with that type's dot-product hardware (cpu_features): torch's
# 16-bit GEMM wins from ~32 rows (prefill), but a decode GEMM of 1-NATIVE16_MAX_ROWS rows streams the same
# 16 bits faster through wide16_linear, in fp32 math on the widened weights and activations, the result
# rounded back to the model's dtype (1 row: 8.0 vs 16.5 ms for the default model's step, 32 rows: 31.0 vs
# 28.6, on 2 Zen 5 cores; benchmarks/kernels/bench_wide16_linear.py).
NATIVE16_MAX_ROWS = 16
# A bfloat16 model on a CPU with AVX512_BF16 (the running CPU's own flags: the op checks them) takes its GEMMs
# of 1-BF16_DOT_MAX_ROWS rows through bf16 dot products instead (csrc/cpu/bf16_dot_linear.cpp: bf16
# products, fp32 sums, rounded to bf16, oneDNN's arithmetic): the default model's layer GEMMs, 2 Zen 5
# cores, 1.7-2.2x torch's bf16 GEMMs at 1-64 rows (32 rows: 545 against 310 GFLOP/s), 1.1-1.4x at 256-2048
# (benchmarks/RESULTS.md "Ninth session"). Every row count, except where AMX-BF16 exists: its tiles have
# several times the dot-product rate, and oneDNN uses them, so there more than 256 rows stay on torch's GEMM.
# decoder_layers reads its kind as BF16_DOT_KIND.
BF16_DOT_KIND = 512


def default_bf16_dot_max_rows() -> int:
    return 256 if "amx_bf16" in cpu_features.cpu_flags() else NO_ROW_LIMIT


BF16_DOT_MAX_ROWS = default_bf16_dot_max_rows()
# PAGEDLLM_CPU_BF16_DOT=0 keeps a bfloat16 model on the 16-bit panels above (to measure what the dot products bring).
BF16_DOT_ENV = "PAGEDLLM_CPU_BF16_DOT"


# The opt-in int8 mode (quantization="gguf_int8", csrc/cpu/int8_linear.cpp): the codes meet x quantized
# per block of 32 to int8, for every row count (prefill too). decoder_layers reads its kind as
# INT8_KIND + the GGML type id.
INT8_KIND = 256


class PackedWeight:
    """The CPU decode copy of a Linear / LMHead weight: fp32 panels (qtype 0), the exact GGUF codes
    of it (qtype: their GGML type id, one of CODE_QTYPES) or its exact 16-bit values (WIDE16_QTYPES);
    int8: those codes in the int8 mode's layout. act_dtype: the model's dtype (16-bit for a 16-bit model's
    own weights, which serve 1-NATIVE16_MAX_ROWS rows; qtype BF16_DOT_KIND: a bfloat16 model's weights for
    bf16_dot_linear, 1-BF16_DOT_MAX_ROWS rows)."""

    def __init__(self, data: torch.Tensor, qtype: int = 0, int8: bool = False,
                 act_dtype: torch.dtype = torch.float32):
        self.data, self.qtype, self.int8, self.act_dtype = data, qtype, int8, act_dtype
        self.min_rows = QUANTIZED_MIN_ROWS if qtype else PACKED_MIN_ROWS

    @property
    def kind(self) -> int:
        """decoder_layers' kind: 0 fp32 panels, the GGML type id of exact codes, INT8_KIND + it for int8."""
        return self.qtype + (INT8_KIND if self.int8 else 0)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def serves(self, rows: int) -> bool:
        if self.qtype == BF16_DOT_KIND:
            return 1 <= rows <= BF16_DOT_MAX_ROWS
        if self.act_dtype != torch.float32:
            return 1 <= rows <= NATIVE16_MAX_ROWS
        return rows >= 1 if self.int8 else self.min_rows <= rows <= PACKED_MAX_ROWS

    def __call__(self, x: torch.Tensor, bias: Optional[torch.Tensor], out_features: int) -> torch.Tensor:
        if self.qtype == BF16_DOT_KIND:
            return _ops.bf16_dot_linear(x, self.data, bias, out_features)
        if self.act_dtype != torch.float32:  # a 16-bit model: fp32 math, rounded back to its dtype
            y = _ops.wide16_linear(x.float(), self.data, None if bias is None else bias.float(), out_features)
            return y.to(self.act_dtype)
        if self.int8:
            return _ops.int8_linear(x, self.data, self.qtype, bias, out_features)
        if self.qtype in WIDE16_QTYPES:
            return _ops.wide16_linear(x, self.data, bias, out_features)
        if self.qtype:
            return _ops.quantized_linear(x, self.data, self.qtype, bias, out_features)
        return _ops.packed_linear(x, self.data, bias, out_features)


def pack_weight(weight: torch.Tensor, fp32_panels: bool = True, wide16_panels: bool = True,
                int8: bool = False) -> Optional[PackedWeight]:
    """The exact GGUF codes of weight in the first of CODE_QTYPES it is made of (int8: in the int8 mode's
    layout), else its exact 16-bit panels (when wide16_panels), else fp32 panels (when fp32_panels);
    None when none applies."""
    if int8 or os.environ.get(QUANTIZED_ENV, "1") != "0":
        for qtype in CODE_QTYPES:
            codes = _ops.pack_quantized_linear_weight(weight, qtype)
            if codes.numel() and int8:
                return PackedWeight(_ops.pack_int8_linear_weight(codes, qtype, weight.shape[0]), qtype, int8=True)
            if codes.numel():
                return PackedWeight(codes, qtype)
    if wide16_panels and os.environ.get(WIDE16_ENV, "1") != "0":
        for qtype in WIDE16_QTYPES:
            panels = _ops.pack_wide16_linear_weight(weight, qtype)
            if panels.numel():
                return PackedWeight(panels, qtype)
    return PackedWeight(_ops.pack_linear_weight(weight)) if fp32_panels else None


@functools.lru_cache(maxsize=1)
def bf16_dot_available() -> bool:
    """Whether this CPU runs bf16_dot_linear (AVX512_BF16, the running CPU's own flags)."""
    return _ops.pack_bf16_dot_linear_weight(torch.ones(1, 2, dtype=torch.bfloat16)).numel() > 0


def pack_16bit_weight(weight: torch.Tensor) -> Optional[PackedWeight]:
    """A bfloat16 weight's input-pair panels for bf16_dot_linear where the CPU has AVX512_BF16 (unless
    PAGEDLLM_CPU_BF16_DOT=0); else a bfloat16 / float16 weight's own bits as 16-bit panels for the model's
    decode GEMMs (exact by construction); None when PAGEDLLM_CPU_WIDE16_WEIGHTS=0."""
    if weight.dtype == torch.bfloat16 and os.environ.get(BF16_DOT_ENV, "1") != "0":
        dot = _ops.pack_bf16_dot_linear_weight(weight)
        if dot.numel():
            return PackedWeight(dot, BF16_DOT_KIND, act_dtype=weight.dtype)
    if os.environ.get(WIDE16_ENV, "1") == "0":
        return None
    qtype = 30 if weight.dtype == torch.bfloat16 else 1
    panels = _ops.pack_wide16_linear_weight(weight.float(), qtype)
    return PackedWeight(panels, qtype, act_dtype=weight.dtype) if panels.numel() else None


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
            packed: Optional[PackedWeight]) -> torch.Tensor:
    # The packed copy is CPU-only: an input on another device (a model moved after packing) takes F.linear.
    if packed is not None and x.device == packed.data.device and x.shape[-1] and packed.serves(x.numel() // x.shape[-1]):
        return packed(x, bias, weight.shape[0])
    return F.linear(x, weight, bias)


def bias_free_linear(x: torch.Tensor, layer: "Linear") -> torch.Tensor:
    """x W^T of a Linear without its bias (the caller adds it in a fused pass), through the packed /
    code kernels where they serve x, as Linear.forward would."""
    return _linear(x, layer.weight, None, layer.packed)


def _copy_checked(param: torch.Tensor, loaded: torch.Tensor, name: str) -> None:
    if tuple(param.shape) != tuple(loaded.shape):
        raise ValueError(f"{name}: checkpoint tensor has shape {tuple(loaded.shape)}, "
                         f"the model expects {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(loaded)


class Linear(nn.Module):
    """y = x W^T + b, W: [output_size, input_size]."""

    packed: Optional[PackedWeight] = None  # set by pack_linear_weights (CPU fp32 only)
    # Row-parallel (distributed/shard.py): the input features are split over the ranks, the partial
    # outputs summed by an all-reduce (the bias is kept on rank 0 only, so it is added once).
    tp_reduce: bool = False

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.input_size, self.output_size = input_size, output_size
        self.weight = nn.Parameter(torch.empty(output_size, input_size, dtype=dtype), requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(output_size, dtype=dtype), requires_grad=False)
                     if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _linear(x, self.weight, self.bias, self.packed)
        return parallel_state.all_reduce(y) if self.tp_reduce else y

    def extra_repr(self) -> str:
        return f"in={self.input_size}, out={self.output_size}, bias={self.bias is not None}"


class MergedLinear(Linear):
    """Several projections of the same input in one matmul: the output is the concatenation of
    the shards (e.g. [q | k | v] or [gate | up]). Shard i of the checkpoint is loaded into rows
    [offset_i, offset_i + output_sizes[i]) of the weight (and bias)."""

    def __init__(self, input_size: int, output_sizes: Sequence[int], bias: bool = False,
                 dtype: Optional[torch.dtype] = None):
        super().__init__(input_size, sum(output_sizes), bias, dtype)
        self.output_sizes = list(output_sizes)
        self.offsets = [sum(self.output_sizes[:i]) for i in range(len(self.output_sizes))]

    def load_shard(self, param_name: str, loaded: torch.Tensor, shard: int) -> None:
        """param_name: "weight" or "bias"; shard: the index in the packed list."""
        param = getattr(self, param_name)
        rows = param.narrow(0, self.offsets[shard], self.output_sizes[shard])
        _copy_checked(rows, loaded, f"{param_name} shard {shard}")

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Views of each shard's columns of y [..., sum(output_sizes)]."""
        return y.split(self.output_sizes, dim=-1)


class QKVLinear(MergedLinear):
    """[q | k | v] projection: num_heads query heads and num_kv_heads key / value heads."""

    def __init__(self, hidden_size: int, head_size: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, dtype: Optional[torch.dtype] = None):
        self.q_size, self.kv_size = num_heads * head_size, num_kv_heads * head_size
        super().__init__(hidden_size, [self.q_size, self.kv_size, self.kv_size], bias, dtype)


class VocabEmbedding(nn.Module):
    """Token embedding [vocab_size, hidden]; also the weight of a tied LM head.
    Vocab-parallel (distributed/shard.py): this rank holds rows [vocab_start, vocab_start + rows) of
    the table; the other ids give zeros here and the all-reduce sums in the rank that holds them."""

    vocab_start: Optional[int] = None  # set when sharded

    def __init__(self, vocab_size: int, hidden_size: int, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size, dtype=dtype), requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.vocab_start is None:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        mine = (local >= 0) & (local < self.weight.shape[0])
        out = F.embedding(torch.where(mine, local, 0), self.weight)
        out.mul_(mine.unsqueeze(-1).to(out.dtype))
        return parallel_state.all_reduce(out)

    def extra_repr(self) -> str:
        return f"{self.vocab_size}, {self.hidden_size}"


class LMHead(nn.Module):
    """logits = hidden @ W^T in the model dtype (as HF's lm_head), returned as float32.
    tie_to: the embedding whose weight is shared (tie_word_embeddings); then the head has no
    parameter of its own and the checkpoint's lm_head.weight, if any, is skipped."""

    packed: Optional[PackedWeight] = None  # set by pack_linear_weights (CPU fp32 only)
    # Vocab-parallel (distributed/shard.py): each rank computes the logits of its rows of the vocabulary
    # (shard_rows of them, the last shard zero-padded), gathered into the full [n, vocab_size] row.
    shard_rows: Optional[int] = None

    def __init__(self, vocab_size: int, hidden_size: int, dtype: Optional[torch.dtype] = None,
                 tie_to: Optional[VocabEmbedding] = None):
        super().__init__()
        self.vocab_size = vocab_size
        self.tied = tie_to is not None
        if tie_to is not None:
            self._tied = [tie_to]  # a list, so the embedding is not registered twice as a submodule
        else:
            self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size, dtype=dtype), requires_grad=False)

    @property
    def head_weight(self) -> torch.Tensor:
        return self._tied[0].weight if self.tied else self.weight

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = _linear(hidden_states, self.head_weight, None, self.packed).float()
        if self.shard_rows is None:
            return logits
        if logits.shape[-1] < self.shard_rows:  # the last shard of a vocabulary that N does not divide
            logits = F.pad(logits, (0, self.shard_rows - logits.shape[-1]))
        return parallel_state.all_gather_last_dim(logits)[..., :self.vocab_size]

    def extra_repr(self) -> str:
        return f"vocab={self.vocab_size}, tied={self.tied}"


_pack_generation = 0  # counts pack / repack calls: what caches of the packed copies compare against


def pack_generation() -> int:
    return _pack_generation


def _packed_anew() -> None:
    global _pack_generation
    _pack_generation += 1


def pack_linear_weights(model: nn.Module, int8: bool = False) -> int:
    """Give every Linear and LMHead of a CPU float32 model a packed copy of its weight for the
    decode-sized GEMMs (the original stays for prefill-sized ones and for the tied embedding).
    Call once the final weights are loaded. Returns the bytes added (0: nothing to pack).
    Codes (at most 10/32 of the weight) are always taken; 16-bit panels when a 16-bit copy of every
    weight, fp32 panels when an fp32 copy, takes at most half of the memory still available. int8
    (quantization="gguf_int8"): the codes go to the int8 kernel for every row count; weights that are
    not codes keep the exact paths. A bfloat16 / float16 model (kept 16-bit on a CPU with that type's
    hardware) gets its own weights as 16-bit panels when a copy takes at most half of that memory."""
    mods = [(m, _matmul_weight(m)) for m in model.modules() if isinstance(m, (Linear, LMHead))]
    mods = [(m, w) for m, w in mods if w.device.type == "cpu"]
    layers = [(m, w) for m, w in mods if w.dtype == torch.float32]
    layers16 = [(m, w) for m, w in mods if w.dtype in (torch.bfloat16, torch.float16) and not int8]
    fp32_bytes, available = sum(w.numel() * 4 for _, w in layers), _available_memory()
    for m, w in layers:
        m.packed = pack_weight(w, fp32_bytes <= available // 2, fp32_bytes // 2 <= available // 2, int8)
    if sum(w.numel() * 2 for _, w in layers16) <= available // 2:
        for m, w in layers16:
            m.packed = pack_16bit_weight(w)
    _into_huge_pages([m.packed for m, _ in layers + layers16 if m.packed is not None])
    _packed_anew()
    return sum(m.packed.nbytes for m, _ in layers + layers16 if m.packed is not None)


def repack_linear_weights(model: nn.Module) -> None:
    """After new weights were loaded into a model that has packed copies: pack them again."""
    mods = [m for m in model.modules() if isinstance(m, (Linear, LMHead)) and m.packed is not None]
    for m in mods:
        w = _matmul_weight(m)
        m.packed = pack_16bit_weight(w) if m.packed.act_dtype != torch.float32 else pack_weight(w, int8=m.packed.int8)
    _into_huge_pages([m.packed for m in mods if m.packed is not None])
    _packed_anew()


def _into_huge_pages(packs: list[PackedWeight]) -> None:
    """Moves the packed copies (what every decode step streams) into one buffer of huge pages
    (pagedllm/huge_pages.py)."""
    if not huge_pages.enabled():
        return
    arena = huge_pages.Arena(sum(huge_pages.footprint(p.data) for p in packs))
    for p in packs:
        p.data = arena.copy_in(p.data)


def _matmul_weight(m: nn.Module) -> torch.Tensor:
    """The [out, in] weight a Linear or LMHead multiplies by (a tied head's is the embedding's)."""
    return m.head_weight if isinstance(m, LMHead) else m.weight


def _available_memory() -> int:
    """MemAvailable (free + reclaimable page cache); free pages alone where /proc is absent."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
