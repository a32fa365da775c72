// The argument handling shared by the CPU panel GEMMs (packed_linear.cpp, quantized_linear.cpp):
// x [..., K] float32 viewed as rows [M, K] with a contiguous last dim, the optional bias [N], and
// y [..., N] allocated.
#pragma once

#include <optional>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "panel_tile.h"

namespace pagedllm::cpu::panel {

struct LinearIO {
  at::Tensor x2;  // [M, K], last dim contiguous
  at::Tensor y;   // [..., N]
  const float* bias = nullptr;
  int64_t M = 0;
  const float* xp = nullptr;  // x2's data, row stride ldx
  int64_t ldx = 0;
  float* yp = nullptr;        // y's data, row stride N
};

// The panel count of the packed weight (its dim 0) must match ceil(N / 32); K is the packed weight's.
inline LinearIO linear_io(const char* op, const at::Tensor& x, int64_t K, int64_t N, int64_t panels,
                          const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, op, ": x has ", x.size(-1), " features, the weight expects ", K);
  TORCH_CHECK(N > 0 && (N + kPanel - 1) / kPanel == panels, op, ": out_features ", N, " does not match the packed weight's ",
              panels, " panels");
  LinearIO io;
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == at::kFloat && bias->dim() == 1 &&
                    bias->size(0) == N && bias->is_contiguous(),
                op, ": bias must be a contiguous float32 CPU tensor of ", N, " elements");
    io.bias = bias->data_ptr<float>();
  }
  io.x2 = x.reshape({-1, K});
  if (K > 0 && io.x2.stride(1) != 1) io.x2 = io.x2.contiguous();
  io.M = io.x2.size(0);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  io.y = at::empty(out_shape, x.options());
  if (io.M > 0) {
    io.xp = io.x2.data_ptr<float>();
    io.ldx = io.x2.stride(0);
    io.yp = io.y.data_ptr<float>();
  }
  return io;
}

// Every row tile of io against one chunk of a panel expanded to fp32: inputs [k0, k1) of K, laid out
// [k1 - k0, 32] (quantized_linear.cpp, wide16_linear.cpp). The tiles carry their sums across chunks
// through y (kResume / kPartial), so each output's FMA chain over k runs unbroken, as in packed_linear.
inline void chunk_tiles(const LinearIO& io, const float* chunk, int64_t k0, int64_t k1, int64_t K, int64_t N,
                        int64_t n0, int64_t n_valid) {
  const int flags = (k0 > 0 ? kResume : 0) | (k1 < K ? kPartial : 0);
  const float* bias = io.bias ? io.bias + n0 : nullptr;
  for (int64_t t = 0, tiles = num_tiles(io.M); t < tiles; ++t) {
    const int64_t m0 = tile_start(io.M, t), rows = tile_start(io.M, t + 1) - m0;
    kTiles[rows - 1](io.xp + m0 * io.ldx + k0, io.ldx, chunk, k1 - k0, bias, io.yp + m0 * N + n0, N, n_valid,
                     nullptr, 0, 0, flags);
  }
}

}  // namespace pagedllm::cpu::panel
