// Host launcher of paged prefill attention on CUDA: checks the tensors, then calls the torch-free
// launcher in attention_prefill_kernels.cu on the current stream. Shapes: the
// paged_prefill_attention schema in csrc/torch_bindings.cpp.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <limits>

#include "cuda/attention_prefill_kernels.h"
#include "cuda/torch_utils.h"
#include "op_checks.h"
#include "ops.h"

namespace pagedllm::cuda {

void paged_prefill_attention(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                             const at::Tensor& value_cache, const at::Tensor& block_tables,
                             const at::Tensor& query_start_loc, const at::Tensor& seq_lens,
                             int64_t max_query_len, double scale, int64_t sliding_window, bool causal) {
  // The CPU op's tensor checks (op_checks.cpp), not the values of query_start_loc / seq_lens /
  // block_tables: reading them would need a device sync, so the kernel trusts them (q_len <=
  // max_query_len, q_len <= seq_len, block ids in range).
  check_paged_prefill_attention(out, query, key_cache, value_cache, block_tables, query_start_loc, seq_lens,
                                max_query_len, scale);
  TORCH_CHECK(causal || sliding_window <= 0, "paged_prefill_attention: a sliding window needs causal attention");
  const auto dtype = query.scalar_type();
  const int64_t num_heads = query.size(1), head_size = query.size(2);
  const int64_t num_kv_heads = key_cache.size(1), block_size = key_cache.size(2);
  const int64_t num_seqs = block_tables.size(0);
  // max_query_len >= 0 is checked above; the kernel takes it as an int.
  TORCH_CHECK(max_query_len <= std::numeric_limits<int32_t>::max(),
              "paged_prefill_attention: max_query_len must be in [0, 2^31), got ", max_query_len);
  // grid.y = heads, grid.z = sequences (65535 at most each)
  TORCH_CHECK(num_seqs <= 65535 && num_heads <= 65535,
              "paged_prefill_attention: at most 65535 sequences and 65535 heads per call");
  if (num_seqs == 0 || query.size(0) == 0 || max_query_len == 0) return;

  const DeviceGuard guard(query.device());
  // <= 0: no window; a window longer than any sequence is no window either.
  const int window = static_cast<int>(std::clamp<int64_t>(sliding_window, 0, 1 << 30));
  PAGEDLLM_CUDA_CHECK(launch_paged_prefill_attention(
      to_dtype(dtype), out.data_ptr(), query.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(),
      block_tables.data_ptr<int32_t>(), query_start_loc.data_ptr<int32_t>(), seq_lens.data_ptr<int32_t>(),
      static_cast<int>(num_seqs), static_cast<int>(num_heads), static_cast<int>(num_kv_heads),
      static_cast<int>(head_size), static_cast<int>(block_size), static_cast<int>(max_query_len),
      block_tables.stride(0), query.stride(0), query.stride(1), out.stride(0), out.stride(1),
      static_cast<float>(scale), window, causal, current_stream()));
}

}  // namespace pagedllm::cuda
