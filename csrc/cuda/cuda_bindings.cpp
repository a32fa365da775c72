// Registers the CUDA implementations of the ops defined in csrc/torch_bindings.cpp.
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY_IMPL(_C, CUDA, m) {
  m.impl("rms_norm", &pagedllm::cuda::rms_norm);
  m.impl("fused_add_rms_norm", &pagedllm::cuda::fused_add_rms_norm);
  m.impl("rotary_embedding", &pagedllm::cuda::rotary_embedding);
  m.impl("reshape_and_cache", &pagedllm::cuda::reshape_and_cache);
  m.impl("paged_attention", &pagedllm::cuda::paged_attention);
  m.impl("paged_prefill_attention", &pagedllm::cuda::paged_prefill_attention);
  m.impl("sample_tokens", &pagedllm::cuda::sample_tokens);
}
