// Host launcher of the rotary embedding op (CUDA): check the tensors, then call the torch-free
// kernel launcher of pos_encoding_kernels.cu on the current stream. Shapes: torch_bindings.cpp.
#include "cuda/pos_encoding_kernels.h"
#include "cuda/torch_utils.h"
#include "ops.h"

namespace pagedllm::cuda {
namespace {

// Where the heads of one of query / key live: token and head strides, in elements.
struct HeadLayout {
  int64_t num_heads = 0;
  int64_t token_stride = 0;
  int64_t head_stride = 0;
};

HeadLayout check_heads(const at::Tensor& t, const char* name, int64_t num_tokens, int64_t head_size,
                       const at::Tensor& query) {
  TORCH_CHECK(t.device() == query.device(), "rotary_embedding: ", name, " must be on ", query.device(), ", got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == query.scalar_type(), "rotary_embedding: ", name, " dtype ", t.scalar_type(),
              " must equal the query dtype ", query.scalar_type());
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

}  // namespace

void rotary_embedding(const at::Tensor& positions, at::Tensor& query, std::optional<at::Tensor> key,
                      int64_t head_size, const at::Tensor& cos_sin_cache, bool is_neox) {
  TORCH_CHECK(query.is_cuda(), "rotary_embedding: query must be a CUDA tensor, got ", query.device());
  TORCH_CHECK(positions.device() == query.device() && cos_sin_cache.device() == query.device(),
              "rotary_embedding: positions and cos_sin_cache must be on ", query.device(), ", got ",
              positions.device(), " and ", cos_sin_cache.device());
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.dim() == 1,
              "rotary_embedding: positions must be a 1-D int64 tensor [num_tokens], got ",
              positions.scalar_type(), " ", positions.sizes());
  TORCH_CHECK(head_size > 0, "rotary_embedding: head_size must be positive, got ", head_size);
  const DType dtype = to_dtype(query.scalar_type());
  TORCH_CHECK(cos_sin_cache.scalar_type() == query.scalar_type(), "rotary_embedding: cos_sin_cache dtype ",
              cos_sin_cache.scalar_type(), " must equal the query dtype ", query.scalar_type(),
              " (cast the cache once, e.g. cos_sin_cache.to(query.dtype))");
  TORCH_CHECK(cos_sin_cache.dim() == 2 && cos_sin_cache.is_contiguous(),
              "rotary_embedding: cos_sin_cache must be a contiguous [max_position, rot_dim] tensor, got ",
              cos_sin_cache.sizes(), " with strides ", cos_sin_cache.strides());
  const int64_t rot_dim = cos_sin_cache.size(1);
  TORCH_CHECK(rot_dim > 0 && rot_dim % 2 == 0 && rot_dim <= head_size,
              "rotary_embedding: rot_dim (cos_sin_cache.size(1) = ", rot_dim,
              ") must be even, positive and <= head_size ", head_size);
  const int64_t num_tokens = positions.size(0);
  const HeadLayout q = check_heads(query, "query", num_tokens, head_size, query);
  HeadLayout k;
  if (key.has_value()) k = check_heads(*key, "key", num_tokens, head_size, query);
  if (num_tokens == 0) return;
  const c10::cuda::CUDAGuard guard(query.device());
  const at::Tensor pos = positions.contiguous();
  // Positions are not range-checked here (that would need a device sync); the kernel skips
  // tokens whose position lies outside the cache.
  PAGEDLLM_CUDA_CHECK(launch_rotary_embedding(
      dtype, pos.const_data_ptr<int64_t>(), query.data_ptr(), key.has_value() ? key->data_ptr() : nullptr,
      cos_sin_cache.const_data_ptr(), num_tokens, cos_sin_cache.size(0), rot_dim, q.num_heads, k.num_heads,
      q.token_stride, q.head_stride, k.token_stride, k.head_stride, is_neox, current_stream()));
}

}  // namespace pagedllm::cuda
