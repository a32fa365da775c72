// RMS norm and fused residual-add + RMS norm, CPU kernels.
//
// Math (HF LlamaRMSNorm order of rounding, python/pagedllm/layers/rms_norm.py):
//   h = float(x); inv = 1 / sqrt(mean(h^2) + eps); out = T(float(w) * float(T(h * inv)))
// i.e. the normalized row is rounded to the activation dtype before the weight multiply.
// Fused: r = T(float(x) + float(residual)); residual = r; x = rms_norm(r) * w.
//
// Rows: any leading dims that collapse to one strided dim ([rows, hidden], row stride >= hidden,
// last dim contiguous). Parallel over rows; the inner loops are contiguous float loops, and the
// sum of squares keeps kLanes independent partial sums so -O3 vectorizes it without reassociation.
#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "dispatch_utils.h"
#include "op_checks.h"
#include "ops.h"

namespace pagedllm::cpu {
namespace {

constexpr int64_t kLanes = 16;  // independent partial sums: one or two SIMD registers of floats

void check_devices(const at::Tensor& x, const at::Tensor& weight, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), name,
              ": all tensors must be on the CPU, got ", x.device(), " and weight on ", weight.device());
}

// Sum of squares of buf[0, n), with kLanes independent accumulators (vectorizable, deterministic).
inline float sum_squares(const float* buf, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) acc[j] += buf[i + j] * buf[i + j];
  }
  float s = 0.f;
  for (; i < n; ++i) s += buf[i] * buf[i];
  for (int64_t j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

// out_row[i] = T(float(w[i]) * float(T(buf[i] * inv)))
template <typename T>
inline void normalize_row(T* out_row, const float* buf, const T* w, float inv, int64_t hidden) {
  for (int64_t i = 0; i < hidden; ++i) {
    const float normed = static_cast<float>(static_cast<T>(buf[i] * inv));
    out_row[i] = static_cast<T>(static_cast<float>(w[i]) * normed);
  }
}

// Rows per parallel task: enough elements per task that thread start-up does not dominate.
inline int64_t grain_rows(int64_t hidden) { return std::max<int64_t>(1, 16384 / hidden); }

template <typename T>
void rms_norm_impl(T* out,           // [rows, hidden], row stride out_stride
                   const T* input,   // [rows, hidden], row stride in_stride
                   const T* weight,  // [hidden]
                   int64_t rows, int64_t hidden, int64_t in_stride, int64_t out_stride, float eps) {
  at::parallel_for(0, rows, grain_rows(hidden), [&](int64_t begin, int64_t end) {
    std::vector<float> buf(hidden);  // the row in fp32, converted once
    for (int64_t r = begin; r < end; ++r) {
      const T* x = input + r * in_stride;
      for (int64_t i = 0; i < hidden; ++i) buf[i] = static_cast<float>(x[i]);
      const float var = sum_squares(buf.data(), hidden) / static_cast<float>(hidden);
      const float inv = 1.f / std::sqrt(var + eps);
      normalize_row(out + r * out_stride, buf.data(), weight, inv, hidden);
    }
  });
}

template <typename T>
void fused_add_rms_norm_impl(T* input,     // [rows, hidden], row stride in_stride; becomes the normed row
                             T* residual,  // [rows, hidden], row stride res_stride; becomes input + residual
                             const T* weight,  // [hidden]
                             int64_t rows, int64_t hidden, int64_t in_stride, int64_t res_stride,
                             float eps) {
  at::parallel_for(0, rows, grain_rows(hidden), [&](int64_t begin, int64_t end) {
    std::vector<float> buf(hidden);
    for (int64_t r = begin; r < end; ++r) {
      T* x = input + r * in_stride;
      T* res = residual + r * res_stride;
      for (int64_t i = 0; i < hidden; ++i) {
        // The sum is rounded to T first: it is the new residual, and the norm sees the rounded value.
        const T sum = static_cast<T>(static_cast<float>(x[i]) + static_cast<float>(res[i]));
        res[i] = sum;
        buf[i] = static_cast<float>(sum);
      }
      const float var = sum_squares(buf.data(), hidden) / static_cast<float>(hidden);
      const float inv = 1.f / std::sqrt(var + eps);
      normalize_row(x, buf.data(), weight, inv, hidden);
    }
  });
}

}  // namespace

void rms_norm(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight, double epsilon) {
  check_devices(input, weight, "rms_norm");
  TORCH_CHECK(out.device().is_cpu(), "rms_norm: out must be on the CPU, got ", out.device());
  const at::Tensor out_rows = check_rms_norm(out, input, weight);  // [rows, hidden]
  // The input is only read: when it cannot be viewed as strided rows, a contiguous copy will do.
  auto in_rows = as_rows(input);
  const at::Tensor in2d = in_rows ? *in_rows : input.contiguous().view({-1, input.size(-1)});
  const at::Tensor w = weight.contiguous();
  const int64_t rows = in2d.size(0), hidden = in2d.size(1);
  if (rows == 0) return;
  PAGEDLLM_DISPATCH_FLOATING_TYPES(input.scalar_type(), "rms_norm", [&] {
    rms_norm_impl<scalar_t>(out_rows.data_ptr<scalar_t>(), in2d.const_data_ptr<scalar_t>(),
                            w.const_data_ptr<scalar_t>(), rows, hidden, in2d.stride(0),
                            out_rows.stride(0), static_cast<float>(epsilon));
  });
}

void fused_add_rms_norm(at::Tensor& input, at::Tensor& residual, const at::Tensor& weight, double epsilon) {
  check_devices(input, weight, "fused_add_rms_norm");
  TORCH_CHECK(residual.device().is_cpu(), "fused_add_rms_norm: residual must be on the CPU, got ",
              residual.device());
  const ResidualRows r = check_fused_add_rms_norm(input, residual, weight);  // [rows, hidden] views
  const int64_t rows = r.input.size(0), hidden = r.input.size(1);
  if (rows == 0) return;
  const at::Tensor w = weight.contiguous();
  PAGEDLLM_DISPATCH_FLOATING_TYPES(input.scalar_type(), "fused_add_rms_norm", [&] {
    fused_add_rms_norm_impl<scalar_t>(r.input.data_ptr<scalar_t>(), r.residual.data_ptr<scalar_t>(),
                                      w.const_data_ptr<scalar_t>(), rows, hidden, r.input.stride(0),
                                      r.residual.stride(0), static_cast<float>(epsilon));
  });
}

}  // namespace pagedllm::cpu
