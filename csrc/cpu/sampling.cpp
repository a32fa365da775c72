// sample_tokens on the CPU: one row per task (at::parallel_for), O(vocab) passes per row, no sort.
// Semantics and the Philox convention: python/pagedllm/layers/sampler.py (module docstring) and
// csrc/common/philox.h. Per row:
//   1. x = logits / temperature into a row workspace, M = max x, e = exp(x - M) in place
//      (unnormalized probabilities: max e = 1, so min_p is simply e >= min_p);
//   2. thresholds as bisections on the float bits of the threshold (for e >= 0 the bit pattern
//      orders like the value), each step one vectorized pass counting / summing e >= t, finished
//      exactly on the few (<= kFinish) candidates left between the bounds;
//   3. the inverse-CDF draw in vocabulary order (chunk sums first, then a scan of one chunk).
// An optional token bitmask (structured outputs) is applied while step 1 reads the logits: a token
// whose bit is clear gets x = -inf (e = 0), and greedy / fallback argmaxes skip it, so a masked
// token is never returned unless every token is masked (then the result is the unmasked argmax's
// rule on an all -inf row: index 0).
// Inner loops are contiguous: the elementwise ones (division, exp) auto-vectorize with -O3
// -march=native, the reductions (max, count / sum above a threshold) use GCC vector extensions.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

#include "common/philox.h"
#include "cpu/fast_math.h"
#include "op_checks.h"
#include "ops.h"

namespace pagedllm::cpu {
namespace {

constexpr int64_t kFinish = 256;            // bisection stops when this few candidates remain
constexpr int64_t kChunk = 256;             // draw: chunk whose sum is computed before scanning it
constexpr float kGreedyTemperature = 1e-5f;
constexpr uint32_t kOneKey = 0x3F800000u;   // bits of 1.0f: the largest e

inline uint32_t key_of(float v) {
  uint32_t k;
  std::memcpy(&k, &v, sizeof(k));
  return k;
}

inline float float_of(uint32_t k) {
  float v;
  std::memcpy(&v, &k, sizeof(v));
  return v;
}

// GCC does not keep scalar "lane" accumulators in registers for these reductions (nor reorder
// float sums without -ffast-math), so the reduction loops use GCC/Clang vector extensions:
// 8 floats per vector, two accumulators.
typedef float vf8 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));
constexpr int kW = 8;

inline vf8 load8(const float* p) {
  vf8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Largest value (NaN ignored).
float max_of(const float* v, int64_t n) {
  const float ninf = -std::numeric_limits<float>::infinity();
  vf8 a = vf8{} + ninf, b = a;
  int64_t i = 0;
  for (; i + 2 * kW <= n; i += 2 * kW) {
    const vf8 x = load8(v + i), y = load8(v + i + kW);
    a = x > a ? x : a;
    b = y > b ? y : b;
  }
  a = b > a ? b : a;
  float m = ninf;
  for (int j = 0; j < kW; ++j) m = a[j] > m ? a[j] : m;
  for (; i < n; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

struct CountMass {
  int64_t count;
  float mass;
};

// Number and sum of the e[i] >= t.
CountMass count_mass_ge(const float* e, int64_t n, float t) {
  const vf8 tv = vf8{} + t, zero = vf8{};
  vf8 m0 = zero, m1 = zero;
  vi8 c0 = vi8{}, c1 = vi8{};
  int64_t i = 0;
  for (; i + 2 * kW <= n; i += 2 * kW) {
    const vf8 x = load8(e + i), y = load8(e + i + kW);
    const vi8 kx = x >= tv, ky = y >= tv;  // -1 where kept
    m0 += kx ? x : zero;
    m1 += ky ? y : zero;
    c0 -= kx;
    c1 -= ky;
  }
  m0 += m1;
  c0 += c1;
  CountMass r{0, 0.0f};
  for (int j = 0; j < kW; ++j) {
    r.count += c0[j];
    r.mass += m0[j];
  }
  for (; i < n; ++i) {
    if (e[i] >= t) {
      r.count += 1;
      r.mass += e[i];
    }
  }
  return r;
}

// The largest threshold key K >= floor_key such that F(K) >= target, F(K) = the number
// (by_mass false) or the sum (by_mass true) of the e >= float_of(K). Requires F(floor_key) >= target
// > 0. K is the key of an element (or floor_key when rounding leaves none reaching the target).
// Bisection on the key with F(lo) >= target > F(hi), finished exactly on the elements in [lo, hi).
uint32_t select_threshold(const float* e, int64_t n, uint32_t floor_key, bool by_mass, double target) {
  auto value = [&](const CountMass& cm) { return by_mass ? static_cast<double>(cm.mass) : static_cast<double>(cm.count); };
  uint32_t lo = floor_key, hi = kOneKey + 1;
  CountMass at_lo = count_mass_ge(e, n, float_of(lo));
  CountMass at_hi{0, 0.0f};  // nothing is above 1
  if (!(value(at_lo) >= target)) return lo;  // rounding edge: keep everything above the floor
  while (hi - lo > 1 && at_lo.count - at_hi.count > kFinish) {
    const uint32_t mid = lo + (hi - lo) / 2;
    const CountMass at_mid = count_mass_ge(e, n, float_of(mid));
    if (value(at_mid) >= target) {
      lo = mid;
      at_lo = at_mid;
    } else {
      hi = mid;
      at_hi = at_mid;
    }
  }
  if (hi - lo == 1) return lo;  // every element in [lo, hi) has the key lo
  // Exact finish: the elements with lo <= e < hi, largest first, on top of F(hi).
  const float lo_f = float_of(lo), hi_f = float_of(hi);
  std::vector<float> cand;
  cand.reserve(static_cast<size_t>(at_lo.count - at_hi.count));
  for (int64_t i = 0; i < n; ++i)
    if (e[i] >= lo_f && e[i] < hi_f) cand.push_back(e[i]);
  std::sort(cand.begin(), cand.end(), std::greater<float>());
  double acc = value(at_hi);
  for (const float v : cand) {
    acc += by_mass ? static_cast<double>(v) : 1.0;
    if (acc >= target) return key_of(v);
  }
  return cand.empty() ? lo : key_of(cand.back());
}

// Greedy: the first index of the largest value (NaN never wins). The search tests chunks of 64
// with a vectorizable OR before scanning the one chunk that holds it.
int64_t argmax_first(const float* v, int64_t n) {
  const float m = max_of(v, n);
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    int any = 0;
    for (int j = 0; j < 64; ++j) any |= v[i + j] == m;
    if (any) break;
  }
  for (; i < n; ++i)
    if (v[i] == m) return i;
  return 0;
}

inline bool allowed(const int32_t* mask, int64_t i) {
  return (static_cast<uint32_t>(mask[i >> 5]) >> (i & 31)) & 1u;
}

// argmax_first of the row with the tokens the mask forbids read as -inf (mask nullptr: no mask).
int64_t argmax_first_masked(const float* v, int64_t n, const int32_t* mask) {
  if (mask == nullptr) return argmax_first(v, n);
  const float ninf = -std::numeric_limits<float>::infinity();
  float m = ninf;
  for (int64_t i = 0; i < n; ++i)
    if (allowed(mask, i) && v[i] > m) m = v[i];
  for (int64_t i = 0; i < n; ++i)
    if ((allowed(mask, i) ? v[i] : ninf) == m) return i;
  return 0;
}

int64_t sample_row(const float* logits, int64_t vocab, float temperature, int64_t top_k, float top_p,
                   float min_p, int64_t seed, int64_t offset, const int32_t* mask, float* e) {
  if (temperature < kGreedyTemperature) return argmax_first_masked(logits, vocab, mask);

  if (mask == nullptr) {
    for (int64_t i = 0; i < vocab; ++i) e[i] = logits[i] / temperature;
  } else {  // the mask joins the first read of the logits: no separate pass
    const float ninf = -std::numeric_limits<float>::infinity();
    for (int64_t w = 0; w * 32 < vocab; ++w) {
      const uint32_t bits = static_cast<uint32_t>(mask[w]);
      const int64_t end = std::min<int64_t>(vocab, (w + 1) * 32);
      for (int64_t i = w * 32; i < end; ++i) e[i] = (bits >> (i & 31)) & 1u ? logits[i] / temperature : ninf;
    }
  }
  const float m = max_of(e, vocab);
  if (!std::isfinite(m)) return argmax_first_masked(logits, vocab, mask);  // all -inf, +inf, or overflow
  for (int64_t i = 0; i < vocab; ++i) e[i] = exp_nonpositive(e[i] - m);  // e in [0, 1], max 1

  // top_k and min_p: keep e >= t1.
  float t1 = min_p;  // 0 keeps everything
  const bool top_k_on = top_k > 0 && top_k < vocab;
  if (top_k_on) {
    const CountMass ge_min_p = count_mass_ge(e, vocab, min_p);
    if (ge_min_p.count > top_k)  // the k-th largest is >= min_p: top_k binds
      t1 = float_of(select_threshold(e, vocab, key_of(min_p), false, static_cast<double>(top_k)));
  }
  // top_p over the kept set: keep e >= t, the largest t with mass(e >= t) >= top_p * mass(e >= t1).
  float t = t1;
  if (top_p < 1.0f) {
    const CountMass kept = count_mass_ge(e, vocab, t1);
    const float target = top_p * kept.mass;
    t = float_of(select_threshold(e, vocab, key_of(t1), true, static_cast<double>(target)));
  }

  // Draw: the first index whose running kept mass exceeds u * W.
  const float total = count_mass_ge(e, vocab, t).mass;
  const float target = philox_uniform(seed, offset) * total;
  float running = 0.0f;
  for (int64_t begin = 0; begin < vocab; begin += kChunk) {
    const int64_t end = std::min(vocab, begin + kChunk);
    const float chunk = count_mass_ge(e + begin, end - begin, t).mass;
    if (running + chunk > target) {
      float r = running;
      for (int64_t i = begin; i < end; ++i) {
        const float v = e[i] >= t ? e[i] : 0.0f;
        r += v;
        if (v > 0.0f && r > target) return i;
      }
      running = r;  // rounding: the in-order sum did not reach the target, go on
    } else {
      running += chunk;
    }
  }
  for (int64_t i = vocab - 1; i >= 0; --i)  // rounding edge: the last kept token of non-zero mass
    if (e[i] >= t && e[i] > 0.0f) return i;
  return argmax_first_masked(logits, vocab, mask);
}

}  // namespace

void sample_tokens(at::Tensor& out, const at::Tensor& logits, const at::Tensor& temperature,
                   const at::Tensor& top_k, const at::Tensor& top_p, const at::Tensor& min_p,
                   const at::Tensor& seeds, const at::Tensor& offsets,
                   const std::optional<at::Tensor>& token_bitmask) {
  TORCH_CHECK(logits.device().is_cpu(), "sample_tokens (cpu): logits must be on the CPU, got ", logits.device());
  check_sample_tokens(out, logits, temperature, top_k, top_p, min_p, seeds, offsets, token_bitmask);
  const int64_t batch = logits.size(0), vocab = logits.size(1);

  const float* temperature_p = temperature.data_ptr<float>();  // [batch]
  const int32_t* top_k_p = top_k.data_ptr<int32_t>();          // [batch]
  const float* top_p_p = top_p.data_ptr<float>();              // [batch]
  const float* min_p_p = min_p.data_ptr<float>();              // [batch]
  const int64_t* seeds_p = seeds.data_ptr<int64_t>();          // [batch]
  const int64_t* offsets_p = offsets.data_ptr<int64_t>();      // [batch]
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(top_p_p[b] > 0.0f && top_p_p[b] <= 1.0f, "sample_tokens: top_p must be in (0, 1], got ",
                top_p_p[b], " in row ", b);
    TORCH_CHECK(min_p_p[b] >= 0.0f && min_p_p[b] <= 1.0f, "sample_tokens: min_p must be in [0, 1], got ",
                min_p_p[b], " in row ", b);
  }
  if (batch == 0) return;

  const float* logits_p = logits.data_ptr<float>();  // [batch, vocab], row stride logits.stride(0)
  int64_t* out_p = out.data_ptr<int64_t>();          // [batch]
  const int64_t row_stride = logits.stride(0);
  // [batch, ceil(vocab / 32)], row stride mask_stride; nullptr: no mask
  const int32_t* mask_p = token_bitmask.has_value() ? token_bitmask->data_ptr<int32_t>() : nullptr;
  const int64_t mask_stride = token_bitmask.has_value() ? token_bitmask->stride(0) : 0;
  // One row per task: a row is O(vocab) work, and each worker reuses one [vocab] workspace.
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> workspace(static_cast<size_t>(vocab));
    for (int64_t b = begin; b < end; ++b) {
      out_p[b] = sample_row(logits_p + b * row_stride, vocab, temperature_p[b], top_k_p[b], top_p_p[b],
                            min_p_p[b], seeds_p[b], offsets_p[b],
                            mask_p != nullptr ? mask_p + b * mask_stride : nullptr, workspace.data());
    }
  });
}

}  // namespace pagedllm::cpu
