// The CPU-only ops (registered with TORCH_LIBRARY_FRAGMENT in their own files, no CUDA twin), for
// the C++ callers that chain them without the dispatcher (decoder_layers.cpp).
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>

namespace pagedllm::cpu {

at::Tensor pack_linear_weight(const at::Tensor& weight);
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                         int64_t out_features);
at::Tensor pack_quantized_linear_weight(const at::Tensor& weight, int64_t bits);
at::Tensor quantized_linear(const at::Tensor& x, const at::Tensor& packed, int64_t bits,
                            const std::optional<at::Tensor>& bias, int64_t out_features);
void silu_and_mul(at::Tensor& out, const at::Tensor& x);

}  // namespace pagedllm::cpu
