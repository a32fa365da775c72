// PLACEHOLDER (skeleton): replaced by the real kernels before any commit lands.
#include "ops.h"

#include <c10/util/Exception.h>

namespace pagedllm::cuda {

void rms_norm(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight, double epsilon) {
  TORCH_CHECK(false, "rms_norm (cuda) is not written yet");
}

void fused_add_rms_norm(at::Tensor& input, at::Tensor& residual, const at::Tensor& weight, double epsilon) {
  TORCH_CHECK(false, "fused_add_rms_norm (cuda) is not written yet");
}

}  // namespace pagedllm::cuda
