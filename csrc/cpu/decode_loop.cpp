// decode_loop on the CPU: num_steps decode steps of a Llama-family float32 model in one call, each step's sampled
// tokens the next one's input ids (multi-step decoding: python/pagedllm/engine/multi_step.py).
//
// Why: a decode step streams every weight (~96 MB for the default model) and so evicts the caches; the Python
// and torch dispatches between two steps then run cold (the first dispatch after a step ~20 us, ~2 us warm:
// benchmarks/RESULTS.md "Eighth session"). Here the steps follow each other in C++.
//
// Each step is the Python path's, op for op: the embedding rows (F.embedding), decoder_layers, the final
// RMSNorm (fused_add_rms_norm), the LM head through the kernel Linear.forward would pick (layers_linear), and
// sample_tokens with offsets + step (Philox(seed, offset) per row: the draws of num_steps single steps). So the
// tokens are the single steps' tokens, bit for bit (python/pagedllm/models/cpu_decoder_layers.py decides when
// it applies; tests/engine/test_multi_step.py compares).
//
// input_ids, positions [n] int64: the first step's; slot_mapping [num_steps * n] int64 (step i's at
// [i n, (i + 1) n)); seq_lens [n] int32 and block_tables [n, width] int32: the first step's, covering every
// step's slots (step i attends over seq_lens + i keys). tensors / ints / floats: decoder_layers'. embedding
// [vocab, hidden] and norm_weight [hidden]: float32; head = [weight, packed, bias] with head_kind as
// decoder_layers' kinds; the sampling tensors as sample_tokens takes them (offsets: the first step's).
#include <optional>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "cpu_only_ops.h"
#include "ops.h"

namespace pagedllm::cpu {

at::Tensor decode_loop(const at::Tensor& input_ids, const at::Tensor& positions, at::TensorList tensors,
                       at::IntArrayRef ints, at::ArrayRef<double> floats, const at::Tensor& slot_mapping,
                       const at::Tensor& seq_lens, const at::Tensor& block_tables, const at::Tensor& embedding,
                       const at::Tensor& norm_weight, at::TensorList head, int64_t head_kind,
                       const at::Tensor& temperature, const at::Tensor& top_k, const at::Tensor& top_p,
                       const at::Tensor& min_p, const at::Tensor& seeds, const at::Tensor& offsets,
                       int64_t num_steps) {
  const int64_t n = input_ids.numel();
  TORCH_CHECK(num_steps >= 1, "decode_loop: num_steps must be at least 1, got ", num_steps);
  TORCH_CHECK(input_ids.device().is_cpu() && input_ids.scalar_type() == at::kLong && input_ids.dim() == 1 && n >= 1,
              "decode_loop: input_ids must be a non-empty int64 CPU tensor [num_seqs]");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.numel() == n,
              "decode_loop: positions must be int64 [num_seqs]");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1 && slot_mapping.numel() == num_steps * n,
              "decode_loop: slot_mapping must be int64 [num_steps * num_seqs]");
  TORCH_CHECK(seq_lens.numel() == n && block_tables.dim() == 2 && block_tables.size(0) == n,
              "decode_loop: seq_lens must be [num_seqs] and block_tables [num_seqs, width]");
  TORCH_CHECK(embedding.scalar_type() == at::kFloat && embedding.dim() == 2 && norm_weight.scalar_type() == at::kFloat,
              "decode_loop: the embedding [vocab, hidden] and the norm weight must be float32");
  TORCH_CHECK(head.size() == 3 && floats.size() == 2, "decode_loop: head must be [weight, packed, bias]");
  at::Tensor tokens = at::empty({num_steps, n}, input_ids.options());
  at::Tensor ids = input_ids;
  for (int64_t i = 0; i < num_steps; ++i) {
    std::vector<at::Tensor> hr =
        decoder_layers(at::index_select(embedding, 0, ids), positions + i, tensors, ints, floats,
                       slot_mapping.narrow(0, i * n, n), 0, 0, n, std::nullopt, std::nullopt, std::nullopt,
                       seq_lens + i, block_tables);
    fused_add_rms_norm(hr[0], hr[1], norm_weight, floats[0]);
    const at::Tensor logits = layers_linear(hr[0], head, head_kind, ints);
    at::Tensor out = tokens.select(0, i);
    sample_tokens(out, logits, temperature, top_k, top_p, min_p, seeds, i == 0 ? offsets : offsets + i, std::nullopt);
    ids = out;
  }
  return tokens;
}

}  // namespace pagedllm::cpu
