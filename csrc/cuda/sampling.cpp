// sample_tokens (CUDA): checks the inputs and launches csrc/cuda/sampling_kernels.cu.
// Parameter values (top_p in (0, 1], min_p in [0, 1]) are not read back here: that would cost a
// device sync per step. They are validated on the host where they are built
// (pagedllm.layers.sampler.SamplingTensors.build) and by the CPU op; the kernel clamps them.
#include <limits>

#include "cuda/sampling_kernels.h"
#include "cuda/torch_utils.h"
#include "ops.h"

namespace pagedllm::cuda {
namespace {

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

void sample_tokens(at::Tensor& out, const at::Tensor& logits, const at::Tensor& temperature,
                   const at::Tensor& top_k, const at::Tensor& top_p, const at::Tensor& min_p,
                   const at::Tensor& seeds, const at::Tensor& offsets) {
  TORCH_CHECK(logits.is_cuda(), "sample_tokens (cuda): logits must be on a CUDA device, got ", logits.device());
  TORCH_CHECK(logits.dim() == 2, "sample_tokens: logits must be 2-D [batch, vocab], got ", logits.sizes());
  TORCH_CHECK(logits.scalar_type() == at::kFloat, "sample_tokens: logits must be float32, got ",
              logits.scalar_type());
  const int64_t batch = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(vocab > 0, "sample_tokens: vocab (logits.size(1)) must be > 0");
  // int32 indices in the kernel, and tile starts (+ 8192) must not overflow.
  TORCH_CHECK(vocab <= (int64_t{1} << 30), "sample_tokens: vocab ", vocab, " too large (max 2^30)");
  TORCH_CHECK(batch <= std::numeric_limits<int32_t>::max(), "sample_tokens: batch too large");
  TORCH_CHECK(vocab == 1 || logits.stride(1) == 1, "sample_tokens: the last dim of logits must be contiguous");
  TORCH_CHECK(logits.stride(0) >= 0, "sample_tokens: negative row stride");
  check_param(out, "out", at::kLong, batch, logits);
  check_param(temperature, "temperature", at::kFloat, batch, logits);
  check_param(top_k, "top_k", at::kInt, batch, logits);
  check_param(top_p, "top_p", at::kFloat, batch, logits);
  check_param(min_p, "min_p", at::kFloat, batch, logits);
  check_param(seeds, "seeds", at::kLong, batch, logits);
  check_param(offsets, "offsets", at::kLong, batch, logits);
  if (batch == 0) return;

  const c10::cuda::CUDAGuard guard(logits.device());
  PAGEDLLM_CUDA_CHECK(launch_sample_tokens(
      out.data_ptr<int64_t>(), logits.data_ptr<float>(), temperature.data_ptr<float>(), top_k.data_ptr<int32_t>(),
      top_p.data_ptr<float>(), min_p.data_ptr<float>(), seeds.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(),
      static_cast<int>(batch), static_cast<int>(vocab), logits.stride(0), current_stream()));
}

}  // namespace pagedllm::cuda
