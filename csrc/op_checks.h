// Device-independent input checks of the ops, one definition shared by the CPU kernels (csrc/cpu)
// and the CUDA host launchers (csrc/cuda): shapes, dtypes, strides, supported head and block sizes,
// with the error messages the tests match. What belongs to one device stays in its file: where
// the tensors must live (the CPU, one CUDA device), the 16-byte alignment and int32 limits the CUDA
// kernels need, and the CPU-only checks of metadata values (slots, positions, block ids, top_p).
// Shapes: the schema comments in torch_bindings.cpp.
#pragma once

#include <cstdint>
#include <optional>

#include <ATen/core/Tensor.h>

namespace pagedllm {

// ---- rms_norm, fused_add_rms_norm ----

// t as a [rows, hidden] view of the same storage when its leading dims collapse into one strided
// dim and its last dim is contiguous; nullopt otherwise.
std::optional<at::Tensor> as_rows(const at::Tensor& t);

// Checks input, weight and out; returns out as a [rows, hidden] view (it must be viewable: it is written).
at::Tensor check_rms_norm(const at::Tensor& out, const at::Tensor& input, const at::Tensor& weight);

// input and residual as [rows, hidden] views of their storage (both are written in place).
struct ResidualRows {
  at::Tensor input;
  at::Tensor residual;
};
// Checks input, residual and weight; input and residual must not alias unless they are empty.
ResidualRows check_fused_add_rms_norm(const at::Tensor& input, const at::Tensor& residual, const at::Tensor& weight);

// ---- rotary_embedding ----

// Where the heads of one of query / key live: token and head strides, in elements.
struct HeadLayout {
  int64_t num_heads = 0;
  int64_t token_stride = 0;
  int64_t head_stride = 0;
};
struct RotaryLayout {
  HeadLayout query;
  HeadLayout key;       // num_heads 0 without a key
  int64_t rot_dim = 0;  // cos_sin_cache.size(1)
};
RotaryLayout check_rotary_embedding(const at::Tensor& positions, const at::Tensor& query,
                                    const std::optional<at::Tensor>& key, int64_t head_size,
                                    const at::Tensor& cos_sin_cache);

// ---- reshape_and_cache ----

void check_reshape_and_cache(const at::Tensor& key, const at::Tensor& value, const at::Tensor& key_cache,
                             const at::Tensor& value_cache, const at::Tensor& slot_mapping);

// ---- paged_attention (decode), paged_prefill_attention ----

void check_paged_attention(const at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                           const at::Tensor& value_cache, const at::Tensor& block_tables,
                           const at::Tensor& seq_lens);

// Also checks that every tensor is on query's device, scale > 0 and max_query_len >= 0.
void check_paged_prefill_attention(const at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                                   const at::Tensor& value_cache, const at::Tensor& block_tables,
                                   const at::Tensor& query_start_loc, const at::Tensor& seq_lens,
                                   int64_t max_query_len, double scale);

// ---- sample_tokens ----

// Also checks that every parameter tensor is on the logits' device.
void check_sample_tokens(const at::Tensor& out, const at::Tensor& logits, const at::Tensor& temperature,
                         const at::Tensor& top_k, const at::Tensor& top_p, const at::Tensor& min_p,
                         const at::Tensor& seeds, const at::Tensor& offsets,
                         const std::optional<at::Tensor>& token_bitmask);

}  // namespace pagedllm
