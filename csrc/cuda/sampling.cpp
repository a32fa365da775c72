// PLACEHOLDER (skeleton): replaced by the real kernels before any commit lands.
#include "ops.h"

#include <c10/util/Exception.h>

namespace pagedllm::cuda {

void sample_tokens(at::Tensor& out, const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k, const at::Tensor& top_p, const at::Tensor& min_p, const at::Tensor& seeds, const at::Tensor& offsets) {
  TORCH_CHECK(false, "sample_tokens (cuda) is not written yet");
}

}  // namespace pagedllm::cuda
