// LayerNorm with the residual add (and the preceding linear's bias) fused, CPU, float32, in place:
//
//   x = LayerNorm(x + x_bias + residual) * weight + bias      (x_bias optional)
//
// BERT's post-LayerNorm sublayer end (HF BertSelfOutput / BertOutput: LayerNorm(dense(h) + residual)),
// with dense run as a bias-free GEMM so that its bias add, the residual add and the norm are one pass
// over the row instead of three torch ops and two temporaries. Math as torch's layer_norm: fp32 mean,
// then the biased variance of (v - mean), rstd = 1 / sqrt(var + eps).
// Rows: [rows, hidden] views (row stride >= hidden, last dim contiguous); parallel over rows. The sums keep
// kLanes independent partial sums so that -O3 vectorizes them without reassociation.
#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include "encoder_ops.h"
#include "op_checks.h"

namespace pagedllm::cpu {
namespace {

constexpr int64_t kLanes = 16;

inline float lane_sum(const float* buf, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) acc[j] += buf[i + j];
  }
  float s = 0.f;
  for (; i < n; ++i) s += buf[i];
  for (int64_t j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

inline float centered_square_sum(const float* buf, float mean, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) {
      const float c = buf[i + j] - mean;
      acc[j] += c * c;
    }
  }
  float s = 0.f;
  for (; i < n; ++i) s += (buf[i] - mean) * (buf[i] - mean);
  for (int64_t j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

at::Tensor rows_of(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, "add_layer_norm: ", name,
              " must be a float32 CPU tensor, got ", t.scalar_type(), " on ", t.device());
  auto rows = as_rows(t);
  TORCH_CHECK(rows.has_value(), "add_layer_norm: ", name, " must be viewable as [rows, hidden] with a contiguous "
              "last dim, got sizes ", t.sizes(), " strides ", t.strides());
  return *rows;
}

at::Tensor vector_of(const at::Tensor& t, int64_t hidden, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 1 && t.size(0) == hidden,
              "add_layer_norm: ", name, " must be a float32 CPU [", hidden, "] tensor, got ", t.scalar_type(),
              " ", t.sizes(), " on ", t.device());
  return t.contiguous();
}

}  // namespace

void add_layer_norm(at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight, const at::Tensor& bias,
                    const std::optional<at::Tensor>& x_bias, double epsilon) {
  const at::Tensor xr = rows_of(x, "x");
  const at::Tensor rr = rows_of(residual, "residual");
  const int64_t rows = xr.size(0), hidden = xr.size(1);
  TORCH_CHECK(rr.sizes() == xr.sizes(), "add_layer_norm: residual ", residual.sizes(), " must match x ", x.sizes());
  TORCH_CHECK(rows == 0 || hidden == 0 || !xr.is_alias_of(rr) ||
                  xr.const_data_ptr<float>() != rr.const_data_ptr<float>(),
              "add_layer_norm: x and residual must not be the same tensor");
  const at::Tensor w = vector_of(weight, hidden, "weight");
  const at::Tensor b = vector_of(bias, hidden, "bias");
  const std::optional<at::Tensor> xb =
      x_bias.has_value() ? std::optional<at::Tensor>(vector_of(*x_bias, hidden, "x_bias")) : std::nullopt;
  if (rows == 0 || hidden == 0) return;
  float* xp = xr.data_ptr<float>();
  const float* rp = rr.const_data_ptr<float>();
  const float* wp = w.const_data_ptr<float>();
  const float* bp = b.const_data_ptr<float>();
  const float* xbp = xb.has_value() ? xb->const_data_ptr<float>() : nullptr;
  const int64_t xs = xr.stride(0), rs = rr.stride(0);
  const float eps = static_cast<float>(epsilon), inv_hidden = 1.f / static_cast<float>(hidden);
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / hidden), [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(hidden);
    for (int64_t r = r0; r < r1; ++r) {
      float* xrow = xp + r * xs;
      const float* res = rp + r * rs;
      if (xbp != nullptr) {
        for (int64_t i = 0; i < hidden; ++i) buf[i] = xrow[i] + xbp[i] + res[i];
      } else {
        for (int64_t i = 0; i < hidden; ++i) buf[i] = xrow[i] + res[i];
      }
      const float mean = lane_sum(buf.data(), hidden) * inv_hidden;
      const float var = centered_square_sum(buf.data(), mean, hidden) * inv_hidden;
      const float rstd = 1.f / std::sqrt(var + eps);
      for (int64_t i = 0; i < hidden; ++i) xrow[i] = (buf[i] - mean) * rstd * wp[i] + bp[i];
    }
  });
}

}  // namespace pagedllm::cpu
