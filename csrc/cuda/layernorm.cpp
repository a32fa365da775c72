// Host launchers of the RMS norm ops (CUDA): check the tensors, then call the torch-free
// kernel launchers of layernorm_kernels.cu on the current stream. Shapes: torch_bindings.cpp.
#include "cuda/layernorm_kernels.h"
#include "cuda/torch_utils.h"
#include "op_checks.h"
#include "ops.h"

namespace pagedllm::cuda {
namespace {

void check_devices(const at::Tensor& x, const at::Tensor& weight, const char* name) {
  TORCH_CHECK(on_cuda_device(x) && weight.device() == x.device(), name,
              ": input and weight must be on the same CUDA device, got ", x.device(), " and ", weight.device());
}

}  // namespace

void rms_norm(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight, double epsilon) {
  check_devices(input, weight, "rms_norm");
  TORCH_CHECK(out.device() == input.device(), "rms_norm: out must be on ", input.device(), ", got ", out.device());
  const at::Tensor out_rows = check_rms_norm(out, input, weight);  // [rows, hidden]
  const DType dtype = to_dtype(input.scalar_type());
  const DeviceGuard guard(input.device());
  // The input is only read: when it cannot be viewed as strided rows, a contiguous copy will do.
  auto in_rows = as_rows(input);
  const at::Tensor in2d = in_rows ? *in_rows : input.contiguous().view({-1, input.size(-1)});
  const at::Tensor w = weight.contiguous();
  PAGEDLLM_CUDA_CHECK(launch_rms_norm(dtype, out_rows.data_ptr(), in2d.const_data_ptr(), w.const_data_ptr(),
                                      in2d.size(0), in2d.size(1), in2d.stride(0), out_rows.stride(0),
                                      static_cast<float>(epsilon), current_stream()));
}

void fused_add_rms_norm(at::Tensor& input, at::Tensor& residual, const at::Tensor& weight, double epsilon) {
  check_devices(input, weight, "fused_add_rms_norm");
  TORCH_CHECK(residual.device() == input.device(), "fused_add_rms_norm: residual must be on ", input.device(),
              ", got ", residual.device());
  const ResidualRows r = check_fused_add_rms_norm(input, residual, weight);  // [rows, hidden] views
  const DType dtype = to_dtype(input.scalar_type());
  if (r.input.size(0) == 0) return;
  const DeviceGuard guard(input.device());
  const at::Tensor w = weight.contiguous();
  PAGEDLLM_CUDA_CHECK(launch_fused_add_rms_norm(dtype, r.input.data_ptr(), r.residual.data_ptr(), w.const_data_ptr(),
                                                r.input.size(0), r.input.size(1), r.input.stride(0),
                                                r.residual.stride(0), static_cast<float>(epsilon),
                                                current_stream()));
}

}  // namespace pagedllm::cuda
