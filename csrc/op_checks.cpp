// Device-independent input checks shared by the CPU and CUDA ops (see op_checks.h).
#include "op_checks.h"

#include <array>
#include <initializer_list>

#include <ATen/TensorUtils.h>
#include <c10/util/Exception.h>

namespace pagedllm {
namespace {

void check_norm_input(const at::Tensor& x, const at::Tensor& weight, const char* name) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, name, ": input must have a non-empty last dim, got shape ",
              x.sizes());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1), name, ": weight must be [hidden] = [",
              x.size(-1), "], got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), name, ": weight dtype ", weight.scalar_type(),
              " must equal the input dtype ", x.scalar_type());
}

HeadLayout check_heads(const at::Tensor& t, const char* name, int64_t num_tokens, int64_t head_size,
                       at::ScalarType dtype) {
  TORCH_CHECK(t.scalar_type() == dtype, "rotary_embedding: ", name, " dtype ", t.scalar_type(),
              " must equal the query dtype ", dtype);
  TORCH_CHECK(t.dim() == 2 || t.dim() == 3, "rotary_embedding: ", name,
              " must be [num_tokens, num_heads * head_size] or [num_tokens, num_heads, head_size], got ",
              t.sizes());
  TORCH_CHECK(t.size(0) == num_tokens, "rotary_embedding: ", name, " has ", t.size(0),
              " tokens but positions has ", num_tokens);
  HeadLayout l;
  l.token_stride = t.stride(0);
  if (t.dim() == 2) {
    TORCH_CHECK(t.size(1) % head_size == 0, "rotary_embedding: ", name, " row of ", t.size(1),
                " is not a multiple of head_size ", head_size);
    TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, "rotary_embedding: ", name,
                " must have a contiguous last dim, got strides ", t.strides());
    l.num_heads = t.size(1) / head_size;
    l.head_stride = head_size;
  } else {
    TORCH_CHECK(t.size(2) == head_size, "rotary_embedding: ", name, " head dim ", t.size(2),
                " must equal head_size ", head_size);
    TORCH_CHECK(t.stride(2) == 1, "rotary_embedding: ", name, " must have a contiguous last dim, got strides ",
                t.strides());
    l.num_heads = t.size(1);
    l.head_stride = t.stride(1);
  }
  return l;
}

// The head sizes and block sizes the attention kernels are instantiated for, and whole GQA groups.
void check_attention_sizes(const char* op, int64_t head_size, int64_t block_size, int64_t num_heads,
                           int64_t num_kv_heads) {
  TORCH_CHECK(head_size == 64 || head_size == 80 || head_size == 96 || head_size == 128 || head_size == 256,
              "Unsupported head size: ", head_size);
  TORCH_CHECK(block_size == 16 || block_size == 32, "Unsupported block size: ", block_size);
  TORCH_CHECK(num_kv_heads > 0 && num_heads % num_kv_heads == 0, op, ": num_heads (", num_heads,
              ") must be a multiple of num_kv_heads (", num_kv_heads, ")");
}

void check_param(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t batch,
                 const at::Tensor& logits) {
  TORCH_CHECK(t.device() == logits.device(), "sample_tokens: ", name, " must be on the logits' device (",
              logits.device(), "), got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, "sample_tokens: ", name, " must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == batch, "sample_tokens: ", name, " must have shape [", batch,
              "] (one value per logits row), got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "sample_tokens: ", name, " must be contiguous");
}

}  // namespace

std::optional<at::Tensor> as_rows(const at::Tensor& t) {
  const int64_t hidden = t.size(-1);
  if (hidden > 1 && t.stride(-1) != 1) return std::nullopt;
  const int64_t rows = t.numel() / hidden;
  const std::array<int64_t, 2> shape{rows, hidden};
  if (!at::detail::computeStride(t.sizes(), t.strides(), at::IntArrayRef(shape))) return std::nullopt;
  return t.view(at::IntArrayRef(shape));
}

at::Tensor check_rms_norm(const at::Tensor& out, const at::Tensor& input, const at::Tensor& weight) {
  check_norm_input(input, weight, "rms_norm");
  TORCH_CHECK(out.scalar_type() == input.scalar_type(), "rms_norm: out dtype ", out.scalar_type(),
              " must equal the input dtype ", input.scalar_type());
  TORCH_CHECK(out.sizes() == input.sizes(), "rms_norm: out shape ", out.sizes(), " must equal the input shape ",
              input.sizes());
  auto out_rows = as_rows(out);
  TORCH_CHECK(out_rows.has_value(), "rms_norm: out must be viewable as [rows, hidden] with a contiguous last dim, "
              "got strides ", out.strides());
  return *out_rows;
}

ResidualRows check_fused_add_rms_norm(const at::Tensor& input, const at::Tensor& residual,
                                      const at::Tensor& weight) {
  check_norm_input(input, weight, "fused_add_rms_norm");
  TORCH_CHECK(residual.scalar_type() == input.scalar_type(), "fused_add_rms_norm: residual dtype ",
              residual.scalar_type(), " must equal the input dtype ", input.scalar_type());
  TORCH_CHECK(residual.sizes() == input.sizes(), "fused_add_rms_norm: residual shape ", residual.sizes(),
              " must equal the input shape ", input.sizes());
  auto in_rows = as_rows(input);
  auto res_rows = as_rows(residual);
  TORCH_CHECK(in_rows && res_rows, "fused_add_rms_norm: input and residual are written in place and must be "
              "viewable as [rows, hidden] with a contiguous last dim, got strides ", input.strides(), " and ",
              residual.strides());
  // Empty tensors may share a (null) data pointer: there is nothing to write.
  TORCH_CHECK(in_rows->size(0) == 0 || input.data_ptr() != residual.data_ptr(),
              "fused_add_rms_norm: input and residual must not alias");
  return {*in_rows, *res_rows};
}

RotaryLayout check_rotary_embedding(const at::Tensor& positions, const at::Tensor& query,
                                    const std::optional<at::Tensor>& key, int64_t head_size,
                                    const at::Tensor& cos_sin_cache) {
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.dim() == 1,
              "rotary_embedding: positions must be a 1-D int64 tensor [num_tokens], got ",
              positions.scalar_type(), " ", positions.sizes());
  TORCH_CHECK(head_size > 0, "rotary_embedding: head_size must be positive, got ", head_size);
  const int64_t num_tokens = positions.size(0);
  const at::ScalarType dtype = query.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "rotary_embedding: query must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(cos_sin_cache.scalar_type() == dtype, "rotary_embedding: cos_sin_cache dtype ",
              cos_sin_cache.scalar_type(), " must equal the query dtype ", dtype,
              " (cast the cache once, e.g. cos_sin_cache.to(query.dtype))");
  TORCH_CHECK(cos_sin_cache.dim() == 2 && cos_sin_cache.is_contiguous(),
              "rotary_embedding: cos_sin_cache must be a contiguous [max_position, rot_dim] tensor, got ",
              cos_sin_cache.sizes(), " with strides ", cos_sin_cache.strides());
  RotaryLayout l;
  l.rot_dim = cos_sin_cache.size(1);
  TORCH_CHECK(l.rot_dim > 0 && l.rot_dim % 2 == 0 && l.rot_dim <= head_size,
              "rotary_embedding: rot_dim (cos_sin_cache.size(1) = ", l.rot_dim,
              ") must be even, positive and <= head_size ", head_size);
  l.query = check_heads(query, "query", num_tokens, head_size, dtype);
  if (key.has_value()) l.key = check_heads(*key, "key", num_tokens, head_size, dtype);
  return l;
}

void check_reshape_and_cache(const at::Tensor& key, const at::Tensor& value, const at::Tensor& key_cache,
                             const at::Tensor& value_cache, const at::Tensor& slot_mapping) {
  TORCH_CHECK(key.dim() == 3 && value.sizes() == key.sizes(),
              "reshape_and_cache: key and value must both be [num_tokens, num_kv_heads, head_size], got ",
              key.sizes(), " and ", value.sizes());
  TORCH_CHECK(value.scalar_type() == key.scalar_type(), "reshape_and_cache: value dtype ", value.scalar_type(),
              " must equal the key dtype ", key.scalar_type());
  TORCH_CHECK(key.stride(2) == 1 && value.stride(2) == 1,
              "reshape_and_cache: key and value need a contiguous head_size dim, got strides ", key.strides(),
              " and ", value.strides());
  const int64_t num_kv_heads = key.size(1), head_size = key.size(2);
  TORCH_CHECK(key_cache.dim() == 4 && key_cache.size(1) == num_kv_heads && key_cache.size(3) == head_size,
              "reshape_and_cache: key_cache must be [num_blocks, ", num_kv_heads, ", block_size, ", head_size,
              "], got ", key_cache.sizes());
  TORCH_CHECK(value_cache.sizes() == key_cache.sizes(), "reshape_and_cache: value_cache shape ",
              value_cache.sizes(), " must equal the key_cache shape ", key_cache.sizes());
  TORCH_CHECK(key_cache.scalar_type() == key.scalar_type() && value_cache.scalar_type() == key.scalar_type(),
              "reshape_and_cache: cache dtypes (", key_cache.scalar_type(), ", ", value_cache.scalar_type(),
              ") must equal the key dtype ", key.scalar_type());
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(),
              "reshape_and_cache: key_cache and value_cache must be contiguous");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1,
              "reshape_and_cache: slot_mapping must be a 1-D int64 tensor, got ", slot_mapping.scalar_type(), " ",
              slot_mapping.sizes());
  TORCH_CHECK(slot_mapping.size(0) <= key.size(0), "reshape_and_cache: slot_mapping has ", slot_mapping.size(0),
              " entries but key has only ", key.size(0), " tokens");
}

void check_paged_attention(const at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
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
  check_attention_sizes("paged_attention", head_size, block_size, num_heads, num_kv_heads);
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

void check_paged_prefill_attention(const at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                                   const at::Tensor& value_cache, const at::Tensor& block_tables,
                                   const at::Tensor& query_start_loc, const at::Tensor& seq_lens,
                                   int64_t max_query_len, double scale) {
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
  check_attention_sizes("paged_prefill_attention", head_size, block_size, num_heads, num_kv_heads);
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
  TORCH_CHECK(max_query_len >= 0, "paged_prefill_attention: max_query_len must be >= 0");
}

void check_sample_tokens(const at::Tensor& out, const at::Tensor& logits, const at::Tensor& temperature,
                         const at::Tensor& top_k, const at::Tensor& top_p, const at::Tensor& min_p,
                         const at::Tensor& seeds, const at::Tensor& offsets,
                         const std::optional<at::Tensor>& token_bitmask) {
  TORCH_CHECK(logits.dim() == 2, "sample_tokens: logits must be 2-D [batch, vocab], got ", logits.sizes());
  TORCH_CHECK(logits.scalar_type() == at::kFloat, "sample_tokens: logits must be float32, got ",
              logits.scalar_type());
  const int64_t batch = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(vocab > 0, "sample_tokens: vocab (logits.size(1)) must be > 0");
  TORCH_CHECK(vocab == 1 || logits.stride(1) == 1, "sample_tokens: the last dim of logits must be contiguous");
  TORCH_CHECK(logits.stride(0) >= 0, "sample_tokens: negative row stride");
  check_param(out, "out", at::kLong, batch, logits);
  check_param(temperature, "temperature", at::kFloat, batch, logits);
  check_param(top_k, "top_k", at::kInt, batch, logits);
  check_param(top_p, "top_p", at::kFloat, batch, logits);
  check_param(min_p, "min_p", at::kFloat, batch, logits);
  check_param(seeds, "seeds", at::kLong, batch, logits);
  check_param(offsets, "offsets", at::kLong, batch, logits);
  if (token_bitmask.has_value()) {
    const at::Tensor& m = *token_bitmask;
    const int64_t words = (vocab + 31) / 32;
    TORCH_CHECK(m.device() == logits.device(), "sample_tokens: token_bitmask must be on the logits' device (",
                logits.device(), "), got ", m.device());
    TORCH_CHECK(m.scalar_type() == at::kInt, "sample_tokens: token_bitmask must be int32, got ", m.scalar_type());
    TORCH_CHECK(m.dim() == 2 && m.size(0) == batch && m.size(1) == words, "sample_tokens: token_bitmask must have "
                "shape [", batch, ", ", words, "] (ceil(vocab / 32) words per row), got ", m.sizes());
    TORCH_CHECK(m.stride(1) == 1 || words == 1, "sample_tokens: the last dim of token_bitmask must be contiguous");
    TORCH_CHECK(m.stride(0) >= 0, "sample_tokens: token_bitmask has a negative row stride");
  }
}

}  // namespace pagedllm
