// PLACEHOLDER (skeleton): replaced by the real kernels before any commit lands.
#include "ops.h"

#include <c10/util/Exception.h>

namespace pagedllm::cuda {

void reshape_and_cache(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache, at::Tensor& value_cache, const at::Tensor& slot_mapping) {
  TORCH_CHECK(false, "reshape_and_cache (cuda) is not written yet");
}

}  // namespace pagedllm::cuda
