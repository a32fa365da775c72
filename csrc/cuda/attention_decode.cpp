// PLACEHOLDER (skeleton): replaced by the real kernels before any commit lands.
#include "ops.h"

#include <c10/util/Exception.h>

namespace pagedllm::cuda {

void paged_attention(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache, const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale, int64_t sliding_window) {
  TORCH_CHECK(false, "paged_attention (cuda) is not written yet");
}

}  // namespace pagedllm::cuda
