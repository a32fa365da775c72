// One prototype per op, in two namespaces with identical signatures: pagedllm::cpu (csrc/cpu)
// and pagedllm::cuda (csrc/cuda, host launchers). torch_bindings.cpp holds the schemas and
// registers both. Shapes: see the schema comments in torch_bindings.cpp.
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>

#define PAGEDLLM_DECLARE_OPS                                                                 \
  void rms_norm(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight,          \
                double epsilon);                                                              \
  void fused_add_rms_norm(at::Tensor& input, at::Tensor& residual, const at::Tensor& weight,  \
                          double epsilon);                                                    \
  void rotary_embedding(const at::Tensor& positions, at::Tensor& query,                      \
                        std::optional<at::Tensor> key, int64_t head_size,                    \
                        const at::Tensor& cos_sin_cache, bool is_neox);                      \
  void reshape_and_cache(const at::Tensor& key, const at::Tensor& value,                     \
                         at::Tensor& key_cache, at::Tensor& value_cache,                     \
                         const at::Tensor& slot_mapping);                                    \
  void paged_attention(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache, \
                       const at::Tensor& value_cache, const at::Tensor& block_tables,        \
                       const at::Tensor& seq_lens, double scale, int64_t sliding_window);    \
  void paged_prefill_attention(at::Tensor& out, const at::Tensor& query,                     \
                               const at::Tensor& key_cache, const at::Tensor& value_cache,   \
                               const at::Tensor& block_tables,                               \
                               const at::Tensor& query_start_loc, const at::Tensor& seq_lens, \
                               int64_t max_query_len, double scale, int64_t sliding_window, \
                               bool causal);                                                 \
  void sample_tokens(at::Tensor& out, const at::Tensor& logits, const at::Tensor& temperature, \
                     const at::Tensor& top_k, const at::Tensor& top_p, const at::Tensor& min_p, \
                     const at::Tensor& seeds, const at::Tensor& offsets,              \
                     const std::optional<at::Tensor>& token_bitmask);

namespace pagedllm {
namespace cpu {
PAGEDLLM_DECLARE_OPS
}  // namespace cpu
#if defined(PAGEDLLM_WITH_CUDA) || defined(PAGEDLLM_CUDA_EMU)
namespace cuda {
PAGEDLLM_DECLARE_OPS
}  // namespace cuda
#endif
}  // namespace pagedllm
