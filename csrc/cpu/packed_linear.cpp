// packed_linear on the CPU: y = x W^T (+ bias) in fp32 for the small-M GEMMs of decode steps.
//
// Why: a decode step multiplies a few dozen rows by every weight of the model. MKL's sgemm
// runs those shapes at 100-150 GFLOP/s here (M = 4..32: slower than M = 1 by the row count),
// while the cores peak near 400 and the weights stream at ~27 GB/s. This kernel streams the
// weight once per step from a layout packed at load time (32 output features per panel,
// [panels, K, 32], contiguous along k) and keeps a 12 x 32 output tile in 24 AVX-512
// registers: per k, two weight vectors, one broadcast per row, two FMAs per row.
// Each output is one FMA chain over k in order (MKL sums in blocks: results differ in the
// last bits, as between any two GEMMs).
//
// CPU only, fp32 only: on CUDA and for other dtypes the layers call F.linear (cuBLAS / oneDNN).
// Large M (prefill) stays on MKL, whose cache blocking wins once a panel is reused by many rows
// (the threshold lives in python/pagedllm/layers/linear.py).
#include <algorithm>
#include <array>
#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include "cpu_only_ops.h"

#include "panel_linear_io.h"
#include "panel_tile.h"

namespace pagedllm::cpu {

using panel::kLine;
using panel::kPanel;
using panel::kTiles;

// weight [N, K] float32 -> packed [ceil(N / 32), K, 32]: packed[p, k, j] = weight[32 p + j, k],
// zero past N.
at::Tensor pack_linear_weight(const at::Tensor& weight) {
  TORCH_CHECK(weight.device().is_cpu(), "pack_linear_weight: the weight must be on the CPU, got ",
              weight.device());
  TORCH_CHECK(weight.scalar_type() == at::kFloat, "pack_linear_weight: only float32 weights are packed, got ",
              weight.scalar_type());
  TORCH_CHECK(weight.dim() == 2, "pack_linear_weight: weight must be [out_features, in_features], got ",
              weight.dim(), " dims");
  const at::Tensor w = weight.contiguous();
  const int64_t N = w.size(0), K = w.size(1);
  const int64_t P = (N + kPanel - 1) / kPanel;
  at::Tensor packed = at::zeros({P, K, kPanel}, w.options());
  const float* src = w.data_ptr<float>();
  float* dst = packed.data_ptr<float>();
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t j = 0; j < kPanel && p * kPanel + j < N; ++j) {
        const float* row = src + (p * kPanel + j) * K;
        float* out = dst + p * K * kPanel + j;
        for (int64_t k = 0; k < K; ++k) out[k * kPanel] = row[k];
      }
    }
  });
  return packed;
}

// x [..., K] float32 (last dim contiguous); packed from pack_linear_weight of a [N, K] weight;
// bias [N] or None. Returns y [..., N].
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                         int64_t out_features) {
  TORCH_CHECK(x.device().is_cpu() && packed.device().is_cpu(),
              "packed_linear: x and the packed weight must be on the CPU");
  TORCH_CHECK(x.scalar_type() == at::kFloat && packed.scalar_type() == at::kFloat,
              "packed_linear: float32 only, got x ", x.scalar_type(), " and weight ", packed.scalar_type());
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == kPanel && packed.is_contiguous(),
              "packed_linear: the weight must come from pack_linear_weight ([panels, K, 32], contiguous)");
  const int64_t N = out_features, K = packed.size(1);
  const panel::LinearIO io = panel::linear_io("packed_linear", x, K, N, packed.size(0), bias);
  if (io.M == 0) return io.y;
  const float* wp = packed.data_ptr<float>();
  const int64_t P = packed.size(0);
  // Threads split the panels: each weight byte is read by one thread, once per step; the rows
  // of x (a few KB each) are shared from cache.
  fetch_ahead::Plan* later = fetch_ahead::current();  // what the caller reads next (decoder_layers)
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    fetch_ahead::Cursor* ahead = panel::ahead_for(later, io.M);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * kPanel;
      const int64_t n_valid = std::min(kPanel, N - n0);
      const float* panel = wp + p * K * kPanel;
      const float* next = panel + K * kPanel;  // the next panel's 2K cache lines
      const int64_t tiles = panel::num_tiles(io.M);
      for (int64_t t = 0; t < tiles; ++t) {
        const int64_t m0 = panel::tile_start(io.M, t), rows = panel::tile_start(io.M, t + 1) - m0;
        // One tile: two lines of the next panel per k. T tiles: tile t fetches lines
        // [t * 2K / T, (t + 1) * 2K / T), at most one per k.
        const int64_t lo = t * 2 * K / tiles, hi = (t + 1) * 2 * K / tiles;
        kTiles[rows - 1](io.xp + m0 * io.ldx, io.ldx, panel, K, io.bias ? io.bias + n0 : nullptr, io.yp + m0 * N + n0, N,
                         n_valid, next + lo * kLine, tiles == 1 ? K : hi - lo, tiles == 1 ? 2 * kLine : kLine, ahead);
      }
    }
  });
  return io.y;
}

}  // namespace pagedllm::cpu
