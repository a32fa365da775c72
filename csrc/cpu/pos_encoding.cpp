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
#include "op_checks.h"
#include "ops.h"

namespace pagedllm::cpu {
namespace {

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
  TORCH_CHECK(query.device().is_cpu(), "rotary_embedding: query must be on the CPU, got ", query.device());
  if (key.has_value()) {
    TORCH_CHECK(key->device().is_cpu(), "rotary_embedding: key must be on the CPU, got ", key->device());
  }
  const RotaryLayout layout = check_rotary_embedding(positions, query, key, head_size, cos_sin_cache);
  const HeadLayout q = layout.query, k = layout.key;
  const int64_t num_tokens = positions.size(0), rot_dim = layout.rot_dim, max_position = cos_sin_cache.size(0);
  const at::ScalarType dtype = query.scalar_type();
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
