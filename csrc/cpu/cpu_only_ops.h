// The CPU-only ops (no CUDA twin; schemas and registration in cpu_only_bindings.cpp), also called
// directly, without the dispatcher, by decoder_layers.cpp.
#pragma once

#include <optional>
#include <vector>

#include <ATen/core/Tensor.h>

namespace pagedllm::cpu {

at::Tensor pack_linear_weight(const at::Tensor& weight);
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                         int64_t out_features);
at::Tensor pack_quantized_linear_weight(const at::Tensor& weight, int64_t qtype);
at::Tensor quantized_linear(const at::Tensor& x, const at::Tensor& packed, int64_t qtype,
                            const std::optional<at::Tensor>& bias, int64_t out_features);
// The packed kinds (GGML type ids) of wide16_linear's panels: F16 1, BF16 30.
inline bool is_wide16_kind(int64_t kind) { return kind == 1 || kind == 30; }
at::Tensor pack_wide16_linear_weight(const at::Tensor& weight, int64_t qtype);
at::Tensor wide16_linear(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                         int64_t out_features);
// A bfloat16 model's GEMMs through AVX512_BF16 dot products (bf16_dot_linear.cpp): the packed kind, then the ops.
constexpr int64_t kBf16DotKind = 512;  // layers/linear.py BF16_DOT_KIND
at::Tensor pack_bf16_dot_linear_weight(const at::Tensor& weight);
at::Tensor bf16_dot_linear(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                           int64_t out_features);
at::Tensor pack_int8_linear_weight(const at::Tensor& codes, int64_t qtype, int64_t out_features);
std::vector<at::Tensor> quantize_rows_int8(const at::Tensor& x);
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& packed, int64_t qtype, const std::optional<at::Tensor>& bias,
                       int64_t out_features);
void silu_and_mul(at::Tensor& out, const at::Tensor& x);
// A GEMM outside the layers (the LM head) as decoder_layers runs its own (Linear.forward's choice of kernel):
// weight = [weight, packed, bias (0 elements: none)], kind and ints as decoder_layers takes them.
at::Tensor layers_linear(const at::Tensor& x, at::TensorList weight, int64_t kind, at::IntArrayRef ints);
// num_steps decode steps of a Llama-family float32 model in one call (decode_loop.cpp).
at::Tensor decode_loop(const at::Tensor& input_ids, const at::Tensor& positions, at::TensorList tensors,
                       at::IntArrayRef ints, at::ArrayRef<double> floats, const at::Tensor& slot_mapping,
                       const at::Tensor& seq_lens, const at::Tensor& block_tables, const at::Tensor& embedding,
                       const at::Tensor& norm_weight, at::TensorList head, int64_t head_kind,
                       const at::Tensor& temperature, const at::Tensor& top_k, const at::Tensor& top_p,
                       const at::Tensor& min_p, const at::Tensor& seeds, const at::Tensor& offsets, int64_t num_steps);
std::vector<at::Tensor> decoder_layers(const at::Tensor& hidden, const at::Tensor& positions, at::TensorList tensors,
                                       at::IntArrayRef ints, at::ArrayRef<double> floats,
                                       const at::Tensor& slot_mapping, int64_t num_prefill_tokens,
                                       int64_t max_prefill_query_len, int64_t num_decodes,
                                       const std::optional<at::Tensor>& prefill_query_start_loc,
                                       const std::optional<at::Tensor>& prefill_seq_lens,
                                       const std::optional<at::Tensor>& prefill_block_tables,
                                       const std::optional<at::Tensor>& decode_seq_lens,
                                       const std::optional<at::Tensor>& decode_block_tables);

}  // namespace pagedllm::cpu
