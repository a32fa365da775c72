// Schemas and CPU registrations of the CPU-only ops (no CUDA twin: on CUDA the layers use cuBLAS,
// torch's elementwise ops and the module loop). Prototypes: cpu_only_ops.h.
#include <torch/library.h>

#include "cpu_only_ops.h"

TORCH_LIBRARY_FRAGMENT(_C, m) {
  // fp32 decode GEMM (packed_linear.cpp). weight [N, K] -> packed [ceil(N / 32), K, 32].
  m.def("pack_linear_weight(Tensor weight) -> Tensor");
  // x [..., K], packed from pack_linear_weight, bias [N] or None -> [..., N].
  m.def("packed_linear(Tensor x, Tensor packed, Tensor? bias, int out_features) -> Tensor");
  // Decode GEMM over the exact GGUF codes of fp32 weights (quantized_linear.cpp, bit-identical to packed_linear).
  // qtype: the GGML type id of the blocks (Q4_0 2, Q4_1 3, Q5_0 6, Q5_1 7, Q8_0 8, Q4_K 12, Q6_K 14).
  // weight [N, K] -> uint8 [ceil(N / 32), K / 32, block bytes], or empty when not exactly quantized.
  m.def("pack_quantized_linear_weight(Tensor weight, int qtype) -> Tensor");
  // x [..., K], packed from pack_quantized_linear_weight, bias [N] or None -> [..., N].
  m.def("quantized_linear(Tensor x, Tensor packed, int qtype, Tensor? bias, int out_features) -> Tensor");
  // Decode GEMM over the 16-bit panels of fp32 weights that are exactly bf16 / fp16 values (wide16_linear.cpp,
  // bit-identical to packed_linear). qtype: 30 (BF16) or 1 (F16), GGML's type ids.
  // weight [N, K] -> bfloat16 / float16 [ceil(N / 32), K, 32], or empty when not exactly of that format.
  m.def("pack_wide16_linear_weight(Tensor weight, int qtype) -> Tensor");
  // x [..., K], packed from pack_wide16_linear_weight, bias [N] or None -> [..., N].
  m.def("wide16_linear(Tensor x, Tensor packed, Tensor? bias, int out_features) -> Tensor");
  // A bfloat16 model's GEMMs through AVX512_BF16 dot products (bf16_dot_linear.cpp: bf16 products, fp32 sums).
  // weight [N, K] bfloat16 -> [ceil(N / 32), ceil(K / 2), 64], or empty on a CPU without AVX512_BF16.
  m.def("pack_bf16_dot_linear_weight(Tensor weight) -> Tensor");
  // x [..., K] bfloat16, packed from pack_bf16_dot_linear_weight, bias [N] or None -> bfloat16 [..., N].
  m.def("bf16_dot_linear(Tensor x, Tensor packed, Tensor? bias, int out_features) -> Tensor");
  // The opt-in int8 mode (int8_linear.cpp): x quantized per 32 inputs to int8, integer dot products with
  // the codes. codes from pack_quantized_linear_weight -> uint8 [ceil(N / 8), K / 32, block bytes].
  m.def("pack_int8_linear_weight(Tensor codes, int qtype, int out_features) -> Tensor");
  // x [..., K] -> [q int8 [M, K], d float [M, K / 32], sums int32 [M, K / 32, 2]] (int8_linear's quantization).
  m.def("quantize_rows_int8(Tensor x) -> Tensor[]");
  // x [..., K], packed from pack_int8_linear_weight, bias [N] or None -> [..., N].
  m.def("int8_linear(Tensor x, Tensor packed, int qtype, Tensor? bias, int out_features) -> Tensor");
  // out [rows, d] = silu(x[:, :d]) * x[:, d:], x [rows, 2 d], float32 (activation.cpp).
  m.def("silu_and_mul(Tensor! out, Tensor x) -> ()");
  // The Llama-family decoder layers of one step (argument layout: decoder_layers.cpp).
  m.def(
      "decoder_layers(Tensor hidden, Tensor positions, Tensor[] tensors, int[] ints, float[] floats, "
      "Tensor slot_mapping, int num_prefill_tokens, int max_prefill_query_len, int num_decodes, "
      "Tensor? prefill_query_start_loc, Tensor? prefill_seq_lens, Tensor? prefill_block_tables, "
      "Tensor? decode_seq_lens, Tensor? decode_block_tables) -> Tensor[]");
  // num_steps decode steps in one call: embedding, decoder_layers, final norm, LM head, sample_tokens
  // (decode_loop.cpp) -> the tokens [num_steps, num_seqs].
  m.def(
      "decode_loop(Tensor input_ids, Tensor positions, Tensor[] tensors, int[] ints, float[] floats, "
      "Tensor slot_mapping, Tensor seq_lens, Tensor block_tables, Tensor embedding, Tensor norm_weight, "
      "Tensor[] head, int head_kind, Tensor temperature, Tensor top_k, Tensor top_p, Tensor min_p, "
      "Tensor seeds, Tensor offsets, int num_steps) -> Tensor");
}

TORCH_LIBRARY_IMPL(_C, CPU, m) {
  m.impl("pack_linear_weight", &pagedllm::cpu::pack_linear_weight);
  m.impl("packed_linear", &pagedllm::cpu::packed_linear);
  m.impl("pack_quantized_linear_weight", &pagedllm::cpu::pack_quantized_linear_weight);
  m.impl("quantized_linear", &pagedllm::cpu::quantized_linear);
  m.impl("pack_wide16_linear_weight", &pagedllm::cpu::pack_wide16_linear_weight);
  m.impl("wide16_linear", &pagedllm::cpu::wide16_linear);
  m.impl("pack_bf16_dot_linear_weight", &pagedllm::cpu::pack_bf16_dot_linear_weight);
  m.impl("bf16_dot_linear", &pagedllm::cpu::bf16_dot_linear);
  m.impl("pack_int8_linear_weight", &pagedllm::cpu::pack_int8_linear_weight);
  m.impl("quantize_rows_int8", &pagedllm::cpu::quantize_rows_int8);
  m.impl("int8_linear", &pagedllm::cpu::int8_linear);
  m.impl("silu_and_mul", &pagedllm::cpu::silu_and_mul);
  m.impl("decoder_layers", &pagedllm::cpu::decoder_layers);
  m.impl("decode_loop", &pagedllm::cpu::decode_loop);
}
