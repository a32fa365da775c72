"""Token sampling: the plain-torch reference `sample_native`, Philox4x32-10 in torch, and the
per-row parameter tensors the engine builds for the `sample_tokens` op.

Semantics (shared by sample_native, csrc/cpu/sampling.cpp and csrc/cuda/sampling_kernels.cu),
for each row of logits [batch, vocab] independently:

* temperature < 1e-5: greedy, the first index of the largest logit; no randomness is consumed.
* else probs = softmax(logits / temperature) in fp32, then three filters, each a threshold on
  the probability value (so ties at a threshold are always all kept or all dropped):
    top_k (k <= 0 or k >= vocab: off): keep probs >= the k-th largest prob.
    min_p (0: off):                    keep probs >= min_p * max_prob.
    top_p (1: off), applied to the set kept by top_k and min_p: keep probs >= t, t the largest
      value such that the kept mass at or above t reaches top_p * kept_mass (the smallest set of
      largest probs reaching top_p; every token tied with the last one taken is kept too).
* draw: u = philox_uniform(seed, offset) (see below); the token is the first index, in
  vocabulary order, whose running kept mass exceeds u * total_kept_mass. Float rounding can
  leave no such index: then the last kept token of non-zero probability is taken. A token of
  zero probability (filtered, or logit -inf) is never returned.
* rows whose largest scaled logit is not finite (all -inf, or +inf present) return the greedy
  token. NaN logits are not supported.
* token_bitmask (optional, int32 [batch, ceil(vocab / 32)]): bit (t & 31) of word t >> 5 clear =
  token t forbidden; everything above runs as if its logit were -inf (the kernels apply it as they
  read the logits, not in a separate pass).

The kernels work on unnormalized e = exp(x - max x) (so max e = 1 and min_p is the threshold
e >= min_p) and never sort; they compute the same thresholds and so pick the same token for the
same probabilities, except where float rounding puts a probability or a running mass within a
few ulps of a threshold (their sums run in other orders).

Philox convention (csrc/common/philox.h): key = the 64 bits of the seed (low word first),
counter = (offset low word, offset high word, 0, 0), u = (x0 >> 8) * 2^-24 with x0 the first
output word: 24 random bits, exact in float32. A row's draw depends only on (seed, offset).
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

GREEDY_TEMPERATURE = 1e-5  # temperature below this: greedy argmax

_M0, _M1 = 0xD2511F53, 0xCD9E8D57  # Philox4x32 round multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85  # key schedule increments
_MASK32 = 0xFFFFFFFF


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of a * m; a: int64 tensor holding uint32 values, m: a uint32 constant.
    Split m in 16-bit halves so every int64 intermediate stays below 2^50 (exact)."""
    t = a * (m & 0xFFFF)  # < 2^48
    u = a * (m >> 16)  # < 2^48
    mid = u + (t >> 16)  # a * m = mid * 2^16 + (t & 0xFFFF)
    return mid >> 16, ((mid & 0xFFFF) << 16) | (t & 0xFFFF)


def philox4x32(counter: Sequence[torch.Tensor], key: Sequence[torch.Tensor], rounds: int = 10):
    """Philox4x32-`rounds` over int64 tensors holding uint32 words (broadcasting); returns 4 words."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(rounds):
        if r > 0:
            k0 = (k0 + _W0) & _MASK32
            k1 = (k1 + _W1) & _MASK32
        hi0, lo0 = _mulhilo(c0, _M0)
        hi1, lo1 = _mulhilo(c2, _M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def philox_uniform(seeds: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """float32 u in [0, 1) per (seed, offset) (int64 tensors, broadcast): (x0 >> 8) * 2^-24."""
    seeds, offsets = torch.broadcast_tensors(seeds.long(), offsets.long())
    zero = torch.zeros_like(offsets)
    x0, _, _, _ = philox4x32((offsets & _MASK32, (offsets >> 32) & _MASK32, zero, zero),
                             (seeds & _MASK32, (seeds >> 32) & _MASK32))
    return (x0 >> 8).to(torch.float32) * 2.0 ** -24


def filtered_probs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                   top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """softmax(logits / temperature) with the tokens filtered by top_k, min_p and top_p set to 0
    (not renormalized), float32 [batch, vocab]. Greedy rows (temperature < 1e-5) use temperature 1."""
    vocab = logits.shape[1]
    temperature = temperature.float()
    greedy = temperature < GREEDY_TEMPERATURE
    x = logits.float() / torch.where(greedy, torch.ones_like(temperature), temperature)[:, None]
    probs = torch.softmax(x, dim=-1)
    sorted_p = probs.sort(dim=-1, descending=True).values

    k = top_k.long()[:, None]
    top_k_on = (k > 0) & (k < vocab)
    kth = sorted_p.gather(1, (k.clamp(1, vocab) - 1))  # k-th largest prob
    t_k = torch.where(top_k_on, kth, torch.zeros_like(kth))
    t_min_p = min_p.float()[:, None] * sorted_p[:, :1]
    t1 = torch.maximum(t_k, t_min_p)  # top_k and min_p: keep probs >= t1

    kept_sorted = torch.where(sorted_p >= t1, sorted_p, torch.zeros_like(sorted_p))
    cum = kept_sorted.cumsum(dim=-1)
    target = top_p.float()[:, None] * cum[:, -1:]
    first = (cum < target).sum(dim=-1, keepdim=True)  # first position whose cum mass >= target
    num_kept = (sorted_p >= t1).sum(dim=-1, keepdim=True)
    first = torch.minimum(first, (num_kept - 1).clamp(min=0))  # float edge: never past the kept set
    t_p = sorted_p.gather(1, first)
    t = torch.where(top_p.float()[:, None] < 1.0, torch.maximum(t_p, t1), t1)
    return torch.where(probs >= t, probs, torch.zeros_like(probs))


def unpack_bitmask(token_bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """int32 [batch, ceil(vocab / 32)] -> bool [batch, vocab] (True = allowed)."""
    shifts = torch.arange(32, dtype=torch.int32, device=token_bitmask.device)
    bits = (token_bitmask.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(token_bitmask.shape[0], -1)[:, :vocab].bool()


def sample_native(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor, min_p: torch.Tensor, seeds: torch.Tensor,
                  offsets: torch.Tensor, token_bitmask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Plain-torch reference of the sample_tokens op (it sorts; the kernels do not).
    logits [batch, vocab] float32; temperature, top_p, min_p [batch] float32; top_k [batch] int;
    seeds, offsets [batch] int64; token_bitmask None or int32 [batch, ceil(vocab / 32)].
    Returns [batch] int64 token ids."""
    vocab = logits.shape[1]
    logits = logits.float()
    if token_bitmask is not None:
        logits = logits.masked_fill(~unpack_bitmask(token_bitmask.to(logits.device), vocab), float("-inf"))
    greedy = temperature.float() < GREEDY_TEMPERATURE
    greedy_tokens = logits.argmax(dim=-1)  # first index of the max
    masked = filtered_probs(logits, temperature, top_k, top_p, min_p)
    running = masked.cumsum(dim=-1)
    u = philox_uniform(seeds.to(logits.device), offsets.to(logits.device))
    token = (running <= u[:, None] * running[:, -1:]).sum(dim=-1)  # first index with running > u * W
    last_kept = vocab - 1 - (masked > 0).flip(-1).int().argmax(dim=-1)
    token = torch.where(token >= vocab, last_kept, token)

    x_max = (logits / torch.where(greedy, torch.ones_like(temperature.float()), temperature.float())[:, None]).amax(dim=-1)
    degenerate = ~torch.isfinite(x_max)
    return torch.where(greedy | degenerate, greedy_tokens, token)


@dataclass
class SamplingTensors:
    """The per-row parameters of one sampling step, on the logits' device (shapes: [batch])."""
    temperature: torch.Tensor  # float32
    top_k: torch.Tensor  # int32, <= 0: off
    top_p: torch.Tensor  # float32 in (0, 1], 1: off
    min_p: torch.Tensor  # float32 in [0, 1], 0: off
    seeds: torch.Tensor  # int64
    offsets: torch.Tensor  # int64: the step of the request (tokens generated so far)
    token_bitmask: Optional[torch.Tensor] = None  # int32 [batch, ceil(vocab / 32)], bit set = allowed

    @classmethod
    def build(cls, temperature: Sequence[float], top_k: Sequence[int], top_p: Sequence[float],
              min_p: Sequence[float], seeds: Sequence[int], offsets: Sequence[int],
              device: torch.device | str = "cpu", token_bitmask: Optional[torch.Tensor] = None) -> "SamplingTensors":
        """Validates the values on the host (no device sync) and copies them to `device` in one go.
        Seeds may be any 64-bit integer (unsigned ones wrap to int64: the same Philox key).
        token_bitmask: a host tensor (structured outputs), moved along with the rest."""
        n = len(temperature)
        for name, seq in (("top_k", top_k), ("top_p", top_p), ("min_p", min_p), ("seeds", seeds),
                          ("offsets", offsets)):
            if len(seq) != n:
                raise ValueError(f"{name} has {len(seq)} values, temperature has {n}")
        for i in range(n):
            if not temperature[i] >= 0.0 or temperature[i] == float("inf"):
                raise ValueError(f"temperature must be finite and >= 0, got {temperature[i]} (row {i})")
            if not 0.0 < top_p[i] <= 1.0:
                raise ValueError(f"top_p must be in (0, 1], got {top_p[i]} (row {i})")
            if not 0.0 <= min_p[i] <= 1.0:
                raise ValueError(f"min_p must be in [0, 1], got {min_p[i]} (row {i})")
            if offsets[i] < 0:
                raise ValueError(f"offsets must be >= 0, got {offsets[i]} (row {i})")
        wrapped_seeds = [_to_int64(s) for s in seeds]
        pin = torch.device(device).type == "cuda" and torch.cuda.is_available()
        host = [
            torch.tensor(temperature, dtype=torch.float32),
            torch.tensor([max(min(int(k), 2 ** 31 - 1), -1) for k in top_k], dtype=torch.int32),
            torch.tensor(top_p, dtype=torch.float32),
            torch.tensor(min_p, dtype=torch.float32),
            torch.tensor(wrapped_seeds, dtype=torch.int64),
            torch.tensor(list(offsets), dtype=torch.int64),
        ]
        if token_bitmask is not None:
            if token_bitmask.shape[0] != n:
                raise ValueError(f"token_bitmask has {token_bitmask.shape[0]} rows, temperature has {n}")
            host.append(token_bitmask)
        moved = [(t.pin_memory() if pin else t).to(device, non_blocking=pin) for t in host]
        return cls(*moved)

    def __len__(self) -> int:
        return self.temperature.shape[0]


def _to_int64(seed: int) -> int:
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    return seed - (1 << 64) if seed >= (1 << 63) else seed


def new_seed() -> int:
    """A fresh random 63-bit seed for a request that gave none."""
    return secrets.randbits(63)


class Sampler:
    """forward: the sample_tokens op; forward_native: the plain-torch reference. Both take the
    logits [batch, vocab] (float32, or cast to it) and a SamplingTensors of the same batch."""

    def forward(self, logits: torch.Tensor, params: SamplingTensors) -> torch.Tensor:
        from pagedllm import _ops

        return _ops.sample_tokens(logits.float(), params.temperature, params.top_k, params.top_p,
                                  params.min_p, params.seeds, params.offsets, params.token_bitmask)

    def forward_native(self, logits: torch.Tensor, params: SamplingTensors) -> torch.Tensor:
        return sample_native(logits, params.temperature, params.top_k, params.top_p, params.min_p,
                             params.seeds, params.offsets, params.token_bitmask)

    __call__ = forward


def seed_or_new(seed: Optional[int]) -> int:
    """The request's seed, or a fresh one when it gave none."""
    return new_seed() if seed is None else _to_int64(seed)
