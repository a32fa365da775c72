// paged_attention (decode) CUDA host launcher: checks the tensors, plans the split-KV partitions,
// allocates the workspace the plan needs and launches the kernels of attention_decode_kernels.cu.
#include <algorithm>
#include <cstdint>
#include <limits>

#include <ATen/ops/empty.h>

#include "cuda/attention_decode_kernels.h"
#include "cuda/torch_utils.h"
#include "ops.h"

namespace pagedllm::cuda {
namespace {

void check_inputs(const at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                  const at::Tensor& value_cache, const at::Tensor& block_tables,
                  const at::Tensor& seq_lens) {
  TORCH_CHECK(query.dim() == 3, "paged_attention: query must be [num_seqs, num_heads, head_size], got ",
              query.sizes());
  TORCH_CHECK(out.sizes() == query.sizes(), "paged_attention: out shape ", out.sizes(),
              " does not match query shape ", query.sizes());
  TORCH_CHECK(key_cache.dim() == 4,
              "paged_attention: key_cache must be [num_blocks, num_kv_heads, block_size, head_size], got ",
              key_cache.sizes());
  TORCH_CHECK(value_cache.sizes() == key_cache.sizes(), "paged_attention: value_cache shape ",
              value_cache.sizes(), " does not match key_cache shape ", key_cache.sizes());
  const auto dt = query.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "paged_attention: query dtype must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(out.scalar_type() == dt, "paged_attention: out dtype ", out.scalar_type(),
              " does not match query dtype ", dt);
  TORCH_CHECK(key_cache.scalar_type() == dt, "paged_attention: key_cache dtype ",
              key_cache.scalar_type(), " does not match query dtype ", dt);
  TORCH_CHECK(value_cache.scalar_type() == dt, "paged_attention: value_cache dtype ",
              value_cache.scalar_type(), " does not match query dtype ", dt);
  TORCH_CHECK(block_tables.scalar_type() == at::kInt, "paged_attention: block_tables must be int32, got ",
              block_tables.scalar_type());
  TORCH_CHECK(seq_lens.scalar_type() == at::kInt, "paged_attention: seq_lens must be int32, got ",
              seq_lens.scalar_type());
  const int64_t num_seqs = query.size(0), num_heads = query.size(1), head_size = query.size(2);
  const int64_t num_kv_heads = key_cache.size(1), block_size = key_cache.size(2);
  TORCH_CHECK(key_cache.size(3) == head_size, "paged_attention: key_cache head_size ", key_cache.size(3),
              " does not match query head_size ", head_size);
  TORCH_CHECK(head_size == 64 || head_size == 80 || head_size == 96 || head_size == 128 || head_size == 256,
              "Unsupported head size: ", head_size);
  TORCH_CHECK(block_size == 16 || block_size == 32, "Unsupported block size: ", block_size);
  TORCH_CHECK(num_kv_heads > 0 && num_heads % num_kv_heads == 0, "paged_attention: num_heads (", num_heads,
              ") must be a multiple of num_kv_heads (", num_kv_heads, ")");
  TORCH_CHECK(query.stride(2) == 1, "paged_attention: query's last dim must be contiguous");
  TORCH_CHECK(out.stride(2) == 1, "paged_attention: out's last dim must be contiguous");
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(),
              "paged_attention: key_cache and value_cache must be contiguous");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == num_seqs,
              "paged_attention: block_tables must be [num_seqs = ", num_seqs, ", max_blocks], got ",
              block_tables.sizes());
  TORCH_CHECK(block_tables.size(1) <= 1 || block_tables.stride(1) == 1,
              "paged_attention: block_tables' last dim must be contiguous");
  TORCH_CHECK(seq_lens.dim() == 1 && seq_lens.size(0) == num_seqs && seq_lens.is_contiguous(),
              "paged_attention: seq_lens must be a contiguous [num_seqs = ", num_seqs, "] tensor, got ",
              seq_lens.sizes());
}

}  // namespace

void paged_attention(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                     const at::Tensor& value_cache, const at::Tensor& block_tables,
                     const at::Tensor& seq_lens, double scale, int64_t sliding_window) {
  check_inputs(out, query, key_cache, value_cache, block_tables, seq_lens);
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

  const c10::cuda::CUDAGuard guard(query.device());
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
