"""Memory-access counters of every CUDA kernel, run by the CUDA emulator (csrc/cuda/emu) on the CPU:
global-memory 32-byte sectors per warp request (coalescing: ideal = the request's bytes / 32) and
shared-memory wavefronts (bank conflicts) of ldmatrix per 8-row phase (ideal 1) and of 16-byte
loads / stores per warp request (ideal: one per 8 lanes). The shapes keep the
benchmarks' per-sequence geometry (heads, head size, block size, hidden, vocab) with fewer
sequences / tokens, since emulation runs each CUDA thread as a fiber; the ratios are per request.

    python benchmarks/kernels/emu_counters.py      (prints a markdown table)
"""
from __future__ import annotations

import torch

from pagedllm import _ops


def _row(name: str, shape: str, fn) -> str:
    _ops.cuda_emu_stats(reset=True)
    fn()
    s = _ops.cuda_emu_stats(reset=True)
    cells = []
    for kind, req, sec, ideal in (("cp.async", "cp_requests", "cp_sectors", "cp_ideal_sectors"),
                                  ("Vec16 / __ldg", "vec_requests", "vec_sectors", "vec_ideal_sectors")):
        if s[req]:
            cells.append(f"{kind}: {s[sec] / s[req]:.2f} (ideal {s[ideal] / s[req]:.2f}), {s[req]} requests")
    glob = "; ".join(cells) or "no counted accesses (plain scalar loads are not seen)"
    ldsm = (f"{s['ldsm_wavefronts'] / s['ldsm_phases']:.2f} (ideal 1.00)" if s["ldsm_phases"] else "-")
    vec = (f"{s['smem_wavefronts'] / s['smem_requests']:.2f} (ideal {s['smem_ideal_wavefronts'] / s['smem_requests']:.2f})"
           if s["smem_requests"] else "-")
    return f"| {name} | {shape} | {glob} | {ldsm} | {vec} |"


def _paged_kv(num_seqs, context, num_kv_heads, head_size, block_size, dtype):
    blocks_per_seq = (context + block_size - 1) // block_size
    num_blocks = num_seqs * blocks_per_seq + 1
    shape = (num_blocks, num_kv_heads, block_size, head_size)
    k, v = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    perm = torch.randperm(num_blocks - 1)[: num_seqs * blocks_per_seq] + 1
    tables = perm.view(num_seqs, blocks_per_seq).to(torch.int32)
    return k, v, tables


def main() -> None:
    torch.manual_seed(0)
    bf16 = torch.bfloat16
    rows = ["| kernel | shape (bf16) | global sectors per warp request | ldmatrix wavefronts per phase "
            "| 16-byte shared ld/st wavefronts per request |",
            "|---|---|---|---|---|"]
    with _ops.use_kernel_backend("cuda_emu", count=True):
        x, w = torch.randn(4, 4096, dtype=bf16), torch.randn(4096, dtype=bf16)
        rows.append(_row("rms_norm", "4 x 4096", lambda: _ops.rms_norm(x, w, 1e-6)))
        res = torch.randn_like(x)
        rows.append(_row("fused_add_rms_norm", "4 x 4096", lambda: _ops.fused_add_rms_norm(x, res, w, 1e-6)))

        from pagedllm.layers.rotary import RotaryEmbedding
        rope = RotaryEmbedding(128, 128, 4096, 500000.0, True, bf16)
        q, k = torch.randn(4, 32 * 128, dtype=bf16), torch.randn(4, 8 * 128, dtype=bf16)
        pos = torch.randint(0, 4096, (4,))
        rows.append(_row("rotary_embedding", "4 tokens, 32/8 x 128, neox",
                         lambda: _ops.rotary_embedding(pos, q, k, 128, rope.cos_sin_cache, True)))

        kc, vc, _ = _paged_kv(1, 64, 8, 128, 16, bf16)
        key, val = torch.randn(8, 8, 128, dtype=bf16), torch.randn(8, 8, 128, dtype=bf16)
        slots = torch.randperm(kc.shape[0] * 16)[:8]
        rows.append(_row("reshape_and_cache", "8 tokens, 8 x 128, block 16",
                         lambda: _ops.reshape_and_cache(key, val, kc, vc, slots)))

        for seqs, ctx, sms, label in ((2, 1024, 132, "one pass"), (1, 4096, 132, "split-KV")):
            kc, vc, tables = _paged_kv(seqs, ctx, 8, 128, 16, bf16)
            qd = torch.randn(seqs, 32, 128, dtype=bf16)
            lens = torch.full((seqs,), ctx, dtype=torch.int32)
            rows.append(_row("paged_attention", f"{seqs} x {ctx}, 32/8 x 128, block 16 ({label})",
                             lambda: _ops.paged_attention(qd, kc, vc, tables, lens, 128 ** -0.5)))

        n = 256
        kc, vc, tables = _paged_kv(1, n, 8, 128, 16, bf16)
        qp = torch.randn(n, 32, 128, dtype=bf16)
        _ops.reshape_and_cache(torch.randn(n, 8, 128, dtype=bf16), torch.randn(n, 8, 128, dtype=bf16), kc, vc,
                               (tables[0].long()[:, None] * 16 + torch.arange(16)).reshape(-1)[:n])
        qsl, lens = torch.tensor([0, n], dtype=torch.int32), torch.tensor([n], dtype=torch.int32)
        rows.append(_row("paged_prefill_attention", f"1 x {n} new tokens, 32/8 x 128, block 16",
                         lambda: _ops.paged_prefill_attention(qp, kc, vc, tables, qsl, lens, n, 128 ** -0.5)))

        logits = torch.randn(2, 49152)
        ones = torch.ones(2)
        rows.append(_row("sample_tokens", "2 x 49152, top-k 50, top-p 0.9",
                         lambda: _ops.sample_tokens(logits, ones, torch.full((2,), 50, dtype=torch.int32),
                                                    torch.full((2,), 0.9), torch.zeros(2),
                                                    torch.tensor([1, 2]), torch.tensor([0, 0]))))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
