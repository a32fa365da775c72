// paged_attention (decode) CUDA host launcher: checks the tensors, plans the split-KV partitions,
// allocates the workspace the plan needs and launches the kernels of attention_decode_kernels.cu.
#include <algorithm>
#include <cstdint>
#include <limits>

#include <ATen/ops/empty.h>

#include "cuda/attention_decode_kernels.h"
#include "cuda/torch_utils.h"
#include "op_checks.h"
#include "ops.h"

namespace pagedllm::cuda {

void paged_attention(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                     const at::Tensor& value_cache, const at::Tensor& block_tables,
                     const at::Tensor& seq_lens, double scale, int64_t sliding_window) {
  check_paged_attention(out, query, key_cache, value_cache, block_tables, seq_lens);
  for (const at::Tensor* t : {static_cast<const at::Tensor*>(&out), &key_cache, &value_cache,
                              &block_tables, &seq_lens}) {
    TORCH_CHECK(t->device() == query.device(), "paged_attention (cuda): every tensor must be on ",
                query.device(), ", got one on ", t->device());
  }
  // The kernel copies the caches in 16-byte pieces (every row offset is a multiple of 16 bytes).
  auto aligned16 = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  TORCH_CHECK(aligned16(key_cache.data_ptr()) && aligned16(value_cache.data_ptr()),
              "paged_attention: key_cache and value_cache must start at 16-byte aligned addresses");
  constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(block_tables.size(1) * key_cache.size(2) < kIntMax / 2,
              "paged_attention: block_tables has too many columns (", block_tables.size(1), ")");
  TORCH_CHECK(query.size(0) < kIntMax && query.size(1) <= 65535,
              "paged_attention: too many sequences or heads");
  const int num_seqs = static_cast<int>(query.size(0));
  if (num_seqs == 0) return;

  const DeviceGuard guard(query.device());
  PagedAttentionParams p;
  p.num_seqs = num_seqs;
  p.num_heads = static_cast<int>(query.size(1));
  p.num_kv_heads = static_cast<int>(key_cache.size(1));
  p.head_size = static_cast<int>(query.size(2));
  p.block_size = static_cast<int>(key_cache.size(2));
  p.max_blocks_per_seq = static_cast<int>(block_tables.size(1));
  p.q_stride_seq = query.stride(0);
  p.q_stride_head = query.stride(1);
  p.out_stride_seq = out.stride(0);
  p.out_stride_head = out.stride(1);
  p.bt_stride_seq = block_tables.stride(0);
  p.scale = static_cast<float>(scale);
  p.sliding_window = sliding_window > 0 ? static_cast<int>(std::min<int64_t>(sliding_window, kIntMax)) : 0;

  const DType dtype = to_dtype(query.scalar_type());
  // The plan (partitions, grid, workspace size) depends on shapes only: num_seqs and the block table
  // width, never on seq_lens values (no device sync). CUDA graphs rely on it: the decode graphs pass
  // block tables ceil(max_model_len / block_size) wide, so the captured launch covers every replay
  // (python/pagedllm/engine/cuda_graph.py). Under capture the workspace below comes from the graph's pool.
  PagedAttentionPlan plan;
  PAGEDLLM_CUDA_CHECK(plan_paged_attention(dtype, p, &plan));

  // Split-KV workspace, one fp32 allocation: tmp_out [num_seqs, num_heads, parts, head_size],
  // then max_logits and exp_sums [num_seqs, num_heads, parts]. The caching allocator makes this
  // cheap, and freeing it at return is stream-ordered after the kernels.
  at::Tensor workspace;
  float *tmp_out = nullptr, *max_logits = nullptr, *exp_sums = nullptr;
  if (plan.num_partitions > 1) {
    const int64_t rows = static_cast<int64_t>(num_seqs) * p.num_heads * plan.num_partitions;
    workspace = at::empty({rows * (p.head_size + 2)}, query.options().dtype(at::kFloat));
    tmp_out = workspace.data_ptr<float>();
    max_logits = tmp_out + rows * p.head_size;
    exp_sums = max_logits + rows;
  }
  PAGEDLLM_CUDA_CHECK(launch_paged_attention(
      dtype, out.data_ptr(), query.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(),
      block_tables.data_ptr<int32_t>(), seq_lens.data_ptr<int32_t>(), tmp_out, max_logits, exp_sums, p,
      plan, current_stream()));
}

}  // namespace pagedllm::cuda
