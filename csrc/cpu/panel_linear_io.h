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

}  // namespace pagedllm::cpu::panel
