// PLACEHOLDER (skeleton): replaced by the real kernels before any commit lands.
#include "ops.h"

#include <c10/util/Exception.h>

namespace pagedllm::cpu {

void rotary_embedding(const at::Tensor& positions, at::Tensor& query, std::optional<at::Tensor> key, int64_t head_size, const at::Tensor& cos_sin_cache, bool is_neox) {
  TORCH_CHECK(false, "rotary_embedding (cpu) is not written yet");
}

}  // namespace pagedllm::cpu
