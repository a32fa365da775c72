// PLACEHOLDER (skeleton): replaced by the real kernels before any commit lands.
#include "ops.h"

#include <c10/util/Exception.h>

namespace pagedllm::cuda {

void paged_prefill_attention(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache, const at::Tensor& block_tables, const at::Tensor& query_start_loc, const at::Tensor& seq_lens, int64_t max_query_len, double scale, int64_t sliding_window) {
  TORCH_CHECK(false, "paged_prefill_attention (cuda) is not written yet");
}

}  // namespace pagedllm::cuda
