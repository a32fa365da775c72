// Rotary position embedding, CPU kernel (in place on query and key).
//
// cos_sin_cache[pos] = [cos(pos * f_0) .. cos(pos * f_{R/2-1}) | sin(pos * f_0) .. sin(pos * f_{R/2-1})],
// R = rot_dim <= head_size. For pair i (0 <= i < R/2) of each head, with (x, y) the pair:
//   neox:  x = h[i],   y = h[i + R/2]        GPT-J: x = h[2i], y = h[2i + 1]
//   x' = x cos_i - y sin_i,  y' = y cos_i + x sin_i   (fp32 math, one rounding to the dtype)
// Dims R..head_size pass through. Parallel over tokens; the cache row is converted to fp32 once
// per token and the neox pair loop is a contiguous float loop that -O3 vectorizes.
#include <algorithm>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "dispatch_utils.h"
#include "ops.h"

namespace pagedllm::cpu {
namespace {

// Where the heads of one of query / key live: token and head strides, in elements.
struct HeadLayout {
  int64_t num_heads = 0;
  int64_t token_stride = 0;
  int64_t head_stride = 0;
};

HeadLayout check_heads(const at::Tensor& t, const char* name, int64_t num_tokens, int64_t head_size,
                       at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), "rotary_embedding: ", name, " must be on the CPU, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, "rotary_embedding: ", name, " dtype ", t.scalar_type(),
              " must equal the query dtype ", dtype);
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

template <typename T, bool kNeox>
inline void rotate_head(T* h,             // [head_size], rotated in its first 2 * embed dims
                        const float* cos, // [embed]
                        const float* sin, // [embed]
                        int64_t embed) {
  if constexpr (kNeox) {
    T* hy = h + embed;
    for (int64_t i = 0; i < embed; ++i) {
      const float x = static_cast<float>(h[i]), y = static_cast<float>(hy[i]);
      h[i] = static_cast<T>(x * cos[i] - y * sin[i]);
      hy[i] = static_cast<T>(y * cos[i] + x * sin[i]);
    }
  } else {
    for (int64_t i = 0; i < embed; ++i) {
      const float x = static_cast<float>(h[2 * i]), y = static_cast<float>(h[2 * i + 1]);
      h[2 * i] = static_cast<T>(x * cos[i] - y * sin[i]);
      h[2 * i + 1] = static_cast<T>(y * cos[i] + x * sin[i]);
    }
  }
}

template <typename T, bool kNeox>
void rotary_impl(const int64_t* positions,  // [num_tokens]
                 T* query,                  // token stride q.token_stride, head stride q.head_stride
                 T* key,                    // likewise, or nullptr
                 const T* cache,            // [max_position, rot_dim]
                 int64_t num_tokens, int64_t rot_dim, HeadLayout q, HeadLayout k) {
  const int64_t embed = rot_dim / 2;
  const int64_t work_per_token = std::max<int64_t>(1, (q.num_heads + k.num_heads) * rot_dim);
  at::parallel_for(0, num_tokens, std::max<int64_t>(1, 8192 / work_per_token), [&](int64_t begin, int64_t end) {
    std::vector<float> cs(rot_dim);  // this token's cos | sin in fp32
    for (int64_t t = begin; t < end; ++t) {
      const T* row = cache + positions[t] * rot_dim;
      for (int64_t i = 0; i < rot_dim; ++i) cs[i] = static_cast<float>(row[i]);
      for (int64_t h = 0; h < q.num_heads; ++h)
        rotate_head<T, kNeox>(query + t * q.token_stride + h * q.head_stride, cs.data(), cs.data() + embed, embed);
      if (key != nullptr) {
        for (int64_t h = 0; h < k.num_heads; ++h)
          rotate_head<T, kNeox>(key + t * k.token_stride + h * k.head_stride, cs.data(), cs.data() + embed, embed);
      }
    }
  });
}

}  // namespace

void rotary_embedding(const at::Tensor& positions, at::Tensor& query, std::optional<at::Tensor> key,
                      int64_t head_size, const at::Tensor& cos_sin_cache, bool is_neox) {
  TORCH_CHECK(positions.device().is_cpu() && cos_sin_cache.device().is_cpu(),
              "rotary_embedding: positions and cos_sin_cache must be on the CPU, got ", positions.device(),
              " and ", cos_sin_cache.device());
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.dim() == 1,
              "rotary_embedding: positions must be a 1-D int64 tensor [num_tokens], got ",
              positions.scalar_type(), " ", positions.sizes());
  TORCH_CHECK(head_size > 0, "rotary_embedding: head_size must be positive, got ", head_size);
  const int64_t num_tokens = positions.size(0);
  const at::ScalarType dtype = query.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "rotary_embedding: query must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(cos_sin_cache.scalar_type() == dtype, "rotary_embedding: cos_sin_cache dtype ",
              cos_sin_cache.scalar_type(), " must equal the query dtype ", dtype,
              " (cast the cache once, e.g. cos_sin_cache.to(query.dtype))");
  TORCH_CHECK(cos_sin_cache.dim() == 2 && cos_sin_cache.is_contiguous(),
              "rotary_embedding: cos_sin_cache must be a contiguous [max_position, rot_dim] tensor, got ",
              cos_sin_cache.sizes(), " with strides ", cos_sin_cache.strides());
  const int64_t rot_dim = cos_sin_cache.size(1), max_position = cos_sin_cache.size(0);
  TORCH_CHECK(rot_dim > 0 && rot_dim % 2 == 0 && rot_dim <= head_size,
              "rotary_embedding: rot_dim (cos_sin_cache.size(1) = ", rot_dim,
              ") must be even, positive and <= head_size ", head_size);
  const HeadLayout q = check_heads(query, "query", num_tokens, head_size, dtype);
  HeadLayout k;
  if (key.has_value()) k = check_heads(*key, "key", num_tokens, head_size, dtype);
  const at::Tensor pos = positions.contiguous();
  const int64_t* p = pos.const_data_ptr<int64_t>();
  for (int64_t t = 0; t < num_tokens; ++t) {
    TORCH_CHECK(p[t] >= 0 && p[t] < max_position, "rotary_embedding: position ", p[t], " of token ", t,
                " is outside the cos_sin_cache [0, ", max_position, ")");
  }
  if (num_tokens == 0) return;
  PAGEDLLM_DISPATCH_FLOATING_TYPES(dtype, "rotary_embedding", [&] {
    scalar_t* kp = key.has_value() ? key->data_ptr<scalar_t>() : nullptr;
    if (is_neox) {
      rotary_impl<scalar_t, true>(p, query.data_ptr<scalar_t>(), kp, cos_sin_cache.const_data_ptr<scalar_t>(),
                                  num_tokens, rot_dim, q, k);
    } else {
      rotary_impl<scalar_t, false>(p, query.data_ptr<scalar_t>(), kp, cos_sin_cache.const_data_ptr<scalar_t>(),
                                   num_tokens, rot_dim, q, k);
    }
  });
}

}  // namespace pagedllm::cpu
