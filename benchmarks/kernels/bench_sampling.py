"""sample_tokens vs sample_native (softmax + sort + cumsum in plain torch).

Floor: one read of the fp32 logits, batch * vocab * 4 bytes, at the measured copy bandwidth.
The kernel reads them twice in the usual case (min_p > 0: max/sum, then count/histogram/collect),
three times with top_k or top_p alone, more for very large kept sets (see sampling_kernels.cu).

Validation first, for every row: the kernel's token has non-zero filtered probability, and the
reference's running kept mass brackets u * W at that token (within 1e-4 * W: float rounding can
move a draw across a boundary when the kept set has ~1e5 tokens, so exact agreement is reported,
not required, except for greedy rows).

  python benchmarks/kernels/bench_sampling.py                 # cuda: 256 x 151936
  python benchmarks/kernels/bench_sampling.py --device cpu    # 32 x 49152
"""
from __future__ import annotations

import torch

from common import parse_args, report, time_fn
from pagedllm import _ops
from pagedllm.layers.sampler import filtered_probs, philox_uniform, sample_native

CONFIGS = [  # name, temperature, top_k, top_p, min_p
    ("k50_p0.9_minp0.05", 0.8, 50, 0.9, 0.05),
    ("temperature_only", 1.0, 0, 1.0, 0.0),
    ("top_p0.95", 1.0, 0, 0.95, 0.0),
    ("top_k50", 0.7, 50, 1.0, 0.0),
    ("greedy", 0.0, 0, 1.0, 0.0),
]


def make_logits(batch: int, vocab: int, device: str) -> torch.Tensor:
    """LLM-like rows: a broad normal body and a handful of strong candidates."""
    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(batch, vocab, device=device, generator=gen) * 2.5
    top = torch.randint(0, vocab, (batch, 8), device=device, generator=gen)
    logits.scatter_add_(1, top, 6.0 + 4.0 * torch.rand(batch, 8, device=device, generator=gen))
    return logits


def validate(tokens, logits, temperature, top_k, top_p, min_p, seeds, offsets) -> float:
    ref = sample_native(logits, temperature, top_k, top_p, min_p, seeds, offsets)
    greedy = temperature < 1e-5
    assert torch.equal(tokens[greedy], ref[greedy]), "greedy rows differ from argmax"
    rows = ~greedy
    if rows.any():
        masked = filtered_probs(logits[rows], temperature[rows], top_k[rows], top_p[rows], min_p[rows]).double()
        tok = tokens[rows]
        picked = masked.gather(1, tok[:, None])[:, 0]
        assert bool((picked > 0).all()), "a token of zero filtered probability was drawn"
        cum = masked.cumsum(dim=-1)
        total = cum[:, -1]
        target = philox_uniform(seeds[rows], offsets[rows]).double() * total
        after = cum.gather(1, tok[:, None])[:, 0]
        before = after - picked
        tol = 1e-4 * total
        assert bool(((before <= target + tol) & (after >= target - tol)).all()), "draw not at u * W"
    return float((tokens == ref).float().mean())


def main() -> None:
    args = parse_args("sample_tokens (temperature, top-k, top-p, min-p, Philox) vs the sort-based reference")
    device = args.device
    shapes = [(256, 151936)] if device == "cuda" else [(32, 49152)]
    if args.quick and device == "cpu":
        shapes = [(8, 49152)]
    configs = CONFIGS[:1] if args.quick else CONFIGS
    for batch, vocab in shapes:
        logits = make_logits(batch, vocab, device)
        for name, t, k, p, mp in configs:
            temperature = torch.full((batch,), t, device=device)
            top_k = torch.full((batch,), k, dtype=torch.int32, device=device)
            top_p = torch.full((batch,), p, device=device)
            min_p = torch.full((batch,), mp, device=device)
            seeds = torch.arange(batch, dtype=torch.int64, device=device) * 7919 + 1
            offsets = torch.full((batch,), 3, dtype=torch.int64, device=device)
            op_args = (logits, temperature, top_k, top_p, min_p, seeds, offsets)
            agree = validate(_ops.sample_tokens(*op_args), *op_args)
            seconds = time_fn(lambda: _ops.sample_tokens(*op_args), device, args.iters)
            native = time_fn(lambda: sample_native(*op_args), device, max(3, args.iters // 5))
            report("sample_tokens", f"{batch}x{vocab} {name} (agree {agree:.0%})", seconds,
                   bytes_moved=batch * vocab * 4, native_seconds=native, device=device)


if __name__ == "__main__":
    main()
