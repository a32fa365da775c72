// Host launchers of the RMS norm ops (CUDA): check the tensors, then call the torch-free
// kernel launchers of layernorm_kernels.cu on the current stream. Shapes: torch_bindings.cpp.
#include <array>
#include <optional>

#include <ATen/TensorUtils.h>

#include "cuda/layernorm_kernels.h"
#include "cuda/torch_utils.h"
#include "ops.h"

namespace pagedllm::cuda {
namespace {

// t as a [rows, hidden] view of the same storage when its leading dims collapse into one strided
// dim and its last dim is contiguous; nullopt otherwise.
std::optional<at::Tensor> as_rows(const at::Tensor& t) {
  const int64_t hidden = t.size(-1);
  if (hidden > 1 && t.stride(-1) != 1) return std::nullopt;
  const int64_t rows = t.numel() / hidden;
  const std::array<int64_t, 2> shape{rows, hidden};
  if (!at::detail::computeStride(t.sizes(), t.strides(), at::IntArrayRef(shape))) return std::nullopt;
  return t.view(at::IntArrayRef(shape));
}

void check_common(const at::Tensor& x, const at::Tensor& weight, const char* name) {
  TORCH_CHECK(x.is_cuda() && weight.device() == x.device(), name,
              ": input and weight must be on the same CUDA device, got ", x.device(), " and ", weight.device());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, name, ": input must have a non-empty last dim, got shape ",
              x.sizes());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1), name, ": weight must be [hidden] = [",
              x.size(-1), "], got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), name, ": weight dtype ", weight.scalar_type(),
              " must equal the input dtype ", x.scalar_type());
}

}  // namespace

void rms_norm(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight, double epsilon) {
  check_common(input, weight, "rms_norm");
  TORCH_CHECK(out.device() == input.device(), "rms_norm: out must be on ", input.device(), ", got ", out.device());
  TORCH_CHECK(out.scalar_type() == input.scalar_type(), "rms_norm: out dtype ", out.scalar_type(),
              " must equal the input dtype ", input.scalar_type());
  TORCH_CHECK(out.sizes() == input.sizes(), "rms_norm: out shape ", out.sizes(), " must equal the input shape ",
              input.sizes());
  const DType dtype = to_dtype(input.scalar_type());
  auto out_rows = as_rows(out);
  TORCH_CHECK(out_rows.has_value(), "rms_norm: out must be viewable as [rows, hidden] with a contiguous last dim, "
              "got strides ", out.strides());
  const c10::cuda::CUDAGuard guard(input.device());
  // The input is only read: when it cannot be viewed as strided rows, a contiguous copy will do.
  auto in_rows = as_rows(input);
  const at::Tensor in2d = in_rows ? *in_rows : input.contiguous().view({-1, input.size(-1)});
  const at::Tensor w = weight.contiguous();
  PAGEDLLM_CUDA_CHECK(launch_rms_norm(dtype, out_rows->data_ptr(), in2d.const_data_ptr(), w.const_data_ptr(),
                                      in2d.size(0), in2d.size(1), in2d.stride(0), out_rows->stride(0),
                                      static_cast<float>(epsilon), current_stream()));
}

void fused_add_rms_norm(at::Tensor& input, at::Tensor& residual, const at::Tensor& weight, double epsilon) {
  check_common(input, weight, "fused_add_rms_norm");
  TORCH_CHECK(residual.device() == input.device(), "fused_add_rms_norm: residual must be on ", input.device(),
              ", got ", residual.device());
  TORCH_CHECK(residual.scalar_type() == input.scalar_type(), "fused_add_rms_norm: residual dtype ",
              residual.scalar_type(), " must equal the input dtype ", input.scalar_type());
  TORCH_CHECK(residual.sizes() == input.sizes(), "fused_add_rms_norm: residual shape ", residual.sizes(),
              " must equal the input shape ", input.sizes());
  const DType dtype = to_dtype(input.scalar_type());
  auto in_rows = as_rows(input);
  auto res_rows = as_rows(residual);
  TORCH_CHECK(in_rows && res_rows, "fused_add_rms_norm: input and residual are written in place and must be "
              "viewable as [rows, hidden] with a contiguous last dim, got strides ", input.strides(), " and ",
              residual.strides());
  if (in_rows->size(0) == 0) return;
  TORCH_CHECK(input.data_ptr() != residual.data_ptr(), "fused_add_rms_norm: input and residual must not alias");
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor w = weight.contiguous();
  PAGEDLLM_CUDA_CHECK(launch_fused_add_rms_norm(dtype, in_rows->data_ptr(), res_rows->data_ptr(), w.const_data_ptr(),
                                                in_rows->size(0), in_rows->size(1), in_rows->stride(0),
                                                res_rows->stride(0), static_cast<float>(epsilon),
                                                current_stream()));
}

}  // namespace pagedllm::cuda
