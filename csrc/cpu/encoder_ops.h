// The CPU-only ops of encoder (BERT-family) models, float32 (schemas and registration:
// encoder_bindings.cpp). On CUDA and for other dtypes the layers keep plain torch.
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>

namespace pagedllm::cpu {

// out, query [n, heads, d], key, value [n, kv_heads, d] (any token / head strides, head dim contiguous);
// cu_seqlens int32 [num_seqs + 1]: the sequences laid end to end (encoder_attention.cpp).
void encoder_attention(at::Tensor& out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                       const at::Tensor& cu_seqlens, int64_t max_seq_len, double scale);
// x = LayerNorm(x + x_bias + residual) * weight + bias, in place; x, residual [rows, hidden] (add_layer_norm.cpp).
void add_layer_norm(at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight, const at::Tensor& bias,
                    const std::optional<at::Tensor>& x_bias, double epsilon);
// x = gelu(x + bias) (erf form), in place; x [rows, features], bias [features] or None (gelu.cpp).
void bias_gelu(at::Tensor& x, const std::optional<at::Tensor>& bias);

}  // namespace pagedllm::cpu
