// GELU (erf form, torch's F.gelu default and BERT's "gelu") with the preceding linear's bias fused, CPU,
// float32, in place:   x = gelu(x + bias),  gelu(v) = v * Phi(v) = 0.5 v erfc(-v / sqrt 2)
//
// BERT's intermediate sublayer runs as a bias-free GEMM followed by this one pass (torch: the bias add
// inside addmm, then gelu into a new tensor). erfc(z) for z >= 0 is the Chebyshev fit of Numerical
// Recipes' erfcc (fractional error < 1.2e-7 everywhere), with e^u from fast_math.h; the sign is folded
// in as Phi(v) = 1 - erfc(z) / 2 for v >= 0 and erfc(z) / 2 for v < 0, z = |v| / sqrt 2, so the small
// negative tail keeps its relative accuracy. Branch-free, no libm call: -O3 vectorizes the row loop.
#include <algorithm>
#include <cmath>
#include <optional>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include "encoder_ops.h"
#include "fast_math.h"
#include "op_checks.h"

namespace pagedllm::cpu {
namespace {

inline float gelu_erf(float v) {
  const float z = std::fabs(v) * 0.70710678118654752f;
  const float t = 1.f / (1.f + 0.5f * z);
  float p = 0.17087277f;
  p = p * t - 0.82215223f;
  p = p * t + 1.48851587f;
  p = p * t - 1.13520398f;
  p = p * t + 0.27886807f;
  p = p * t - 0.18628806f;
  p = p * t + 0.09678418f;
  p = p * t + 0.37409196f;
  p = p * t + 1.00002368f;
  p = p * t - 1.26551223f;
  // The fit's exponent is ~3e-8 above 0 at z = 0 (erfc(0) = 1): clamped, exp_nonpositive's domain.
  const float half_erfc = 0.5f * t * exp_nonpositive(std::min(p - z * z, 0.f));
  return v * (v >= 0.f ? 1.f - half_erfc : half_erfc);
}

void gelu_row(float* __restrict__ x, const float* __restrict__ bias, int64_t n) {
  if (bias != nullptr) {
    for (int64_t i = 0; i < n; ++i) x[i] = gelu_erf(x[i] + bias[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) x[i] = gelu_erf(x[i]);
  }
}

}  // namespace

void bias_gelu(at::Tensor& x, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, "bias_gelu: x must be a float32 CPU tensor, "
              "got ", x.scalar_type(), " on ", x.device());
  auto rows = as_rows(x);
  TORCH_CHECK(rows.has_value(), "bias_gelu: x must be viewable as [rows, features] with a contiguous last dim, "
              "got sizes ", x.sizes(), " strides ", x.strides());
  const int64_t n = rows->size(0), f = rows->size(1);
  at::Tensor b;
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == at::kFloat && bias->dim() == 1 &&
                    bias->size(0) == f,
                "bias_gelu: bias must be a float32 CPU [", f, "] tensor, got ", bias->scalar_type(), " ",
                bias->sizes());
    b = bias->contiguous();
  }
  if (n == 0 || f == 0) return;
  float* xp = rows->data_ptr<float>();
  const float* bp = bias.has_value() ? b.const_data_ptr<float>() : nullptr;
  const int64_t ld = rows->stride(0);
  at::parallel_for(0, n, std::max<int64_t>(1, 32768 / f), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) gelu_row(xp + r * ld, bp, f);
  });
}

}  // namespace pagedllm::cpu
