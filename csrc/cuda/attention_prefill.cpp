// Host launcher of paged prefill attention on CUDA: checks the tensors, then calls the torch-free
// launcher in attention_prefill_kernels.cu on the current stream. Shapes: the
// paged_prefill_attention schema in csrc/torch_bindings.cpp.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <limits>

#include "cuda/attention_prefill_kernels.h"
#include "cuda/torch_utils.h"
#include "ops.h"

namespace pagedllm::cuda {

void paged_prefill_attention(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                             const at::Tensor& value_cache, const at::Tensor& block_tables,
                             const at::Tensor& query_start_loc, const at::Tensor& seq_lens,
                             int64_t max_query_len, double scale, int64_t sliding_window) {
  // The same checks as the CPU op, except the values of query_start_loc / seq_lens / block_tables:
  // reading them would need a device sync, so the kernel trusts them (q_len <= max_query_len,
  // q_len <= seq_len, block ids in range).
  TORCH_CHECK(query.dim() == 3, "paged_prefill_attention: query must be [num_tokens, num_heads, head_size], got ",
              query.sizes());
  TORCH_CHECK(out.sizes() == query.sizes(), "paged_prefill_attention: out shape ", out.sizes(),
              " must equal query shape ", query.sizes());
  const auto dtype = query.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "paged_prefill_attention: query must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(out.scalar_type() == dtype && key_cache.scalar_type() == dtype && value_cache.scalar_type() == dtype,
              "paged_prefill_attention: out, key_cache and value_cache must have query's dtype ", dtype);
  TORCH_CHECK(query.stride(2) == 1 && out.stride(2) == 1,
              "paged_prefill_attention: the head_size dim of query and out must be contiguous");
  TORCH_CHECK(key_cache.dim() == 4 && key_cache.sizes() == value_cache.sizes(),
              "paged_prefill_attention: key_cache and value_cache must both be [num_blocks, num_kv_heads, "
              "block_size, head_size], got ", key_cache.sizes(), " and ", value_cache.sizes());
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(),
              "paged_prefill_attention: key_cache and value_cache must be contiguous");
  const int64_t num_heads = query.size(1), head_size = query.size(2);
  const int64_t num_kv_heads = key_cache.size(1), block_size = key_cache.size(2);
  TORCH_CHECK(key_cache.size(3) == head_size, "paged_prefill_attention: cache head_size ", key_cache.size(3),
              " != query head_size ", head_size);
  TORCH_CHECK(head_size == 64 || head_size == 80 || head_size == 96 || head_size == 128 || head_size == 256,
              "Unsupported head size: ", head_size);
  TORCH_CHECK(block_size == 16 || block_size == 32, "Unsupported block size: ", block_size);
  TORCH_CHECK(num_kv_heads > 0 && num_heads % num_kv_heads == 0, "paged_prefill_attention: num_heads (", num_heads,
              ") must be a multiple of num_kv_heads (", num_kv_heads, ")");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.scalar_type() == at::kInt && block_tables.stride(1) == 1,
              "paged_prefill_attention: block_tables must be [num_seqs, max_blocks] int32 with contiguous rows");
  const int64_t num_seqs = block_tables.size(0);
  TORCH_CHECK(query_start_loc.dim() == 1 && query_start_loc.scalar_type() == at::kInt &&
                  query_start_loc.is_contiguous() && query_start_loc.size(0) == num_seqs + 1,
              "paged_prefill_attention: query_start_loc must be a contiguous int32 [num_seqs + 1] = [", num_seqs + 1,
              "], got ", query_start_loc.scalar_type(), " ", query_start_loc.sizes());
  TORCH_CHECK(seq_lens.dim() == 1 && seq_lens.scalar_type() == at::kInt && seq_lens.is_contiguous() &&
                  seq_lens.size(0) == num_seqs,
              "paged_prefill_attention: seq_lens must be a contiguous int32 [num_seqs] = [", num_seqs, "], got ",
              seq_lens.scalar_type(), " ", seq_lens.sizes());
  for (const at::Tensor* t : {static_cast<const at::Tensor*>(&out), &key_cache, &value_cache, &block_tables,
                              &query_start_loc, &seq_lens})
    TORCH_CHECK(t->device() == query.device(), "paged_prefill_attention: all tensors must be on ", query.device(),
                ", got one on ", t->device());
  TORCH_CHECK(scale > 0, "paged_prefill_attention: scale must be positive, got ", scale);
  TORCH_CHECK(max_query_len >= 0 && max_query_len <= std::numeric_limits<int32_t>::max(),
              "paged_prefill_attention: max_query_len must be in [0, 2^31), got ", max_query_len);
  // grid.y = heads, grid.z = sequences (65535 at most each)
  TORCH_CHECK(num_seqs <= 65535 && num_heads <= 65535,
              "paged_prefill_attention: at most 65535 sequences and 65535 heads per call");
  if (num_seqs == 0 || query.size(0) == 0 || max_query_len == 0) return;

  const c10::cuda::CUDAGuard guard(query.device());
  // <= 0: no window; a window longer than any sequence is no window either.
  const int window = static_cast<int>(std::clamp<int64_t>(sliding_window, 0, 1 << 30));
  PAGEDLLM_CUDA_CHECK(launch_paged_prefill_attention(
      to_dtype(dtype), out.data_ptr(), query.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(),
      block_tables.data_ptr<int32_t>(), query_start_loc.data_ptr<int32_t>(), seq_lens.data_ptr<int32_t>(),
      static_cast<int>(num_seqs), static_cast<int>(num_heads), static_cast<int>(num_kv_heads),
      static_cast<int>(head_size), static_cast<int>(block_size), static_cast<int>(max_query_len),
      block_tables.stride(0), query.stride(0), query.stride(1), out.stride(0), out.stride(1),
      static_cast<float>(scale), window, current_stream()));
}

}  // namespace pagedllm::cuda
