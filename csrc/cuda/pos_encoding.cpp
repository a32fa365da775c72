// Host launcher of the rotary embedding op (CUDA): check the tensors, then call the torch-free
// kernel launcher of pos_encoding_kernels.cu on the current stream. Shapes: torch_bindings.cpp.
#include "cuda/pos_encoding_kernels.h"
#include "cuda/torch_utils.h"
#include "op_checks.h"
#include "ops.h"

namespace pagedllm::cuda {

void rotary_embedding(const at::Tensor& positions, at::Tensor& query, std::optional<at::Tensor> key,
                      int64_t head_size, const at::Tensor& cos_sin_cache, bool is_neox) {
  TORCH_CHECK(on_cuda_device(query), "rotary_embedding: query must be a CUDA tensor, got ", query.device());
  TORCH_CHECK(positions.device() == query.device() && cos_sin_cache.device() == query.device(),
              "rotary_embedding: positions and cos_sin_cache must be on ", query.device(), ", got ",
              positions.device(), " and ", cos_sin_cache.device());
  if (key.has_value()) {
    TORCH_CHECK(key->device() == query.device(), "rotary_embedding: key must be on ", query.device(), ", got ",
                key->device());
  }
  const RotaryLayout layout = check_rotary_embedding(positions, query, key, head_size, cos_sin_cache);
  const HeadLayout q = layout.query, k = layout.key;
  const int64_t num_tokens = positions.size(0), rot_dim = layout.rot_dim;
  const DType dtype = to_dtype(query.scalar_type());
  if (num_tokens == 0) return;
  const DeviceGuard guard(query.device());
  const at::Tensor pos = positions.contiguous();
  // Positions are not range-checked here (that would need a device sync); the kernel skips
  // tokens whose position lies outside the cache.
  PAGEDLLM_CUDA_CHECK(launch_rotary_embedding(
      dtype, pos.const_data_ptr<int64_t>(), query.data_ptr(), key.has_value() ? key->data_ptr() : nullptr,
      cos_sin_cache.const_data_ptr(), num_tokens, cos_sin_cache.size(0), rot_dim, q.num_heads, k.num_heads,
      q.token_stride, q.head_stride, k.token_stride, k.head_stride, is_neox, current_stream()));
}

}  // namespace pagedllm::cuda
