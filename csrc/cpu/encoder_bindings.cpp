// Schemas and CPU registrations of the encoder ops (BERT-family pooling models; prototypes: encoder_ops.h).
// CPU only: on CUDA python/pagedllm/models/bert.py keeps torch's ops and EncoderAttention its own paths.
#include <torch/library.h>

#include "encoder_ops.h"

TORCH_LIBRARY_FRAGMENT(_C, m) {
  // out, query [n, heads, d], key, value [n, kv_heads, d], cu_seqlens int32 [num_seqs + 1]: bidirectional
  // attention within each sequence of the flat batch (encoder_attention.cpp).
  m.def("encoder_attention(Tensor! out, Tensor query, Tensor key, Tensor value, Tensor cu_seqlens, "
        "int max_seq_len, float scale) -> ()");
  // x [rows, hidden] = LayerNorm(x + x_bias + residual) * weight + bias, in place (add_layer_norm.cpp).
  m.def("add_layer_norm(Tensor! x, Tensor residual, Tensor weight, Tensor bias, Tensor? x_bias, float eps) -> ()");
  // x [rows, features] = gelu(x + bias), erf form, in place (gelu.cpp).
  m.def("bias_gelu(Tensor! x, Tensor? bias) -> ()");
}

TORCH_LIBRARY_IMPL(_C, CPU, m) {
  m.impl("encoder_attention", &pagedllm::cpu::encoder_attention);
  m.impl("add_layer_norm", &pagedllm::cpu::add_layer_norm);
  m.impl("bias_gelu", &pagedllm::cpu::bias_gelu);
}
