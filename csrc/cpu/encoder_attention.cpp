// Bidirectional (non-causal) attention of encoder models on the CPU, float32, over a flat batch of whole
// sequences laid end to end (varlen: no padding, no KV cache): every query of a sequence attends to all
// keys of its own sequence and to no other's.
//
//   out[t, h, :] = sum_j softmax_j(scale * q[t, h] . k[j, h / group]) v[j, h / group]   for j in t's sequence
//
// Why not paged_prefill_attention with causal=False: that kernel is built for head sizes 64..256 only and
// needs the keys written into a scratch paged cache first; BERT-family embedders (MiniLM: 12 heads of 32)
// read q, k and v straight from the fused QKV GEMM's output here, strided, in one pass.
//
// One task = (sequence, query head): the task packs its K transposed ([head_size][L], L the sequence
// length rounded up to kLanes) into a thread-local buffer, so that the scores of one query row are
// contiguous runs of kLanes keys and P.V runs of kLanes features, accumulated for kRows query rows at once
// in GCC vectors of 8 floats that stay in registers. The rest (softmax, head-size remainders) are plain
// float loops that -O3 vectorizes for the host's SIMD width (-march; CMakeLists.txt gives this file
// -fno-trapping-math so that exp's select vectorizes), with no reassociated reductions (the row max and
// sum keep kLanes partial results). Scores, exp (fast_math.h, <= 1.4 ulp) and sums are fp32.
// Tasks are ordered head-major (task = head * num_seqs + seq): the engine sorts sequences by length, so
// a contiguous range of tasks mixes short and long sequences and the threads get even work.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include "encoder_ops.h"
#include "fast_math.h"

namespace pagedllm::cpu {
namespace {

constexpr int64_t kLanes = 16;  // key padding and partial reductions: one or two SIMD registers of floats

static_assert(kLanes == 16, "the score and P.V tiles are two V8 vectors wide");

// 8 floats as one GCC vector: one AVX register with -march=haswell and later, two SSE registers (or
// scalars) elsewhere: the same source on every x86-64 (and any GCC / Clang target).
typedef float V8 __attribute__((vector_size(32)));
inline V8 load8(const float* p) {
  V8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store8(float* p, V8 v) { std::memcpy(p, &v, sizeof(v)); }

struct Strides {
  int64_t token, head;  // in elements; the head dim is contiguous
};

// The one inner product of both attention steps, R rows x kLanes columns accumulated in 2R vector
// registers: dst[r][0 .. 16) = out_scale(r) * sum_{t < steps} (a[r][t] * a_scale) * b[t * b_stride + 0 .. 16).
// Scores: a = the query rows, b = K^T; P.V: a = the softmax weights, b = V. out_scale: per-row (1 / sum)
// or none (nullptr).
template <int R>
inline void rank1_tile(float* const* dst, const float* const* a, float a_scale, const float* out_scale,
                       const float* b, int64_t b_stride, int64_t steps) {
  V8 lo[R], hi[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) lo[r] = hi[r] = V8{};
  for (int64_t t = 0; t < steps; ++t) {
    const float* bt = b + t * b_stride;
    const V8 b0 = load8(bt), b1 = load8(bt + 8);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const float x = a[r][t] * a_scale;
      lo[r] += x * b0;
      hi[r] += x * b1;
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    const float m = out_scale != nullptr ? out_scale[r] : 1.f;
    store8(dst[r], lo[r] * m);
    store8(dst[r] + 8, hi[r] * m);
  }
}

// Query rows [i0, i0 + R) of one task: R rows at a time so that each K / V load feeds R independent
// accumulator chains (one row alone waits on its FMA latency). scores: [R, lp].
template <int R>
void attend_rows(float* out, Strides os, const float* q, Strides qs, const float* vh, int64_t v_token,
                 int64_t start, int64_t i0, int64_t len, int64_t lp, int64_t h, int64_t d, float scale,
                 const float* kt, float* scores) {
  const float* qr[R];
  float* orow[R];
  for (int r = 0; r < R; ++r) {
    qr[r] = q + (start + i0 + r) * qs.token + h * qs.head;
    orow[r] = out + (start + i0 + r) * os.token + h * os.head;
  }
  // Scores: kLanes keys at a time, sum over the head dim c of q[r][c] * scale * K^T[c][j0 .. j0 + 16).
  for (int64_t j0 = 0; j0 < lp; j0 += kLanes) {
    float* dst[R];
    for (int r = 0; r < R; ++r) dst[r] = scores + r * lp + j0;
    rank1_tile<R>(dst, qr, scale, nullptr, kt + j0, lp, d);
  }
  float inv[R];
  for (int r = 0; r < R; ++r) {
    float* sr = scores + r * lp;
    for (int64_t j = len; j < lp; ++j) sr[j] = -std::numeric_limits<float>::infinity();
    float part[kLanes];
    for (int64_t l = 0; l < kLanes; ++l) part[l] = sr[l];
    for (int64_t j = kLanes; j < lp; j += kLanes) {
      for (int64_t l = 0; l < kLanes; ++l) part[l] = std::max(part[l], sr[j + l]);
    }
    float m = part[0];
    for (int64_t l = 1; l < kLanes; ++l) m = std::max(m, part[l]);
    for (int64_t l = 0; l < kLanes; ++l) part[l] = 0.f;
    for (int64_t j = 0; j < lp; j += kLanes) {
      for (int64_t l = 0; l < kLanes; ++l) {
        const float e = exp_nonpositive(sr[j + l] - m);  // -inf (padding) -> 0
        sr[j + l] = e;
        part[l] += e;
      }
    }
    float sum = 0.f;
    for (int64_t l = 0; l < kLanes; ++l) sum += part[l];
    inv[r] = 1.f / sum;
  }
  // P.V: kLanes output features at a time, sum over the keys j of p[r][j] * V[j][c0 .. c0 + 16); then the rest.
  const float* pr[R];
  for (int r = 0; r < R; ++r) pr[r] = scores + r * lp;
  int64_t c0 = 0;
  for (; c0 + kLanes <= d; c0 += kLanes) {
    float* dst[R];
    for (int r = 0; r < R; ++r) dst[r] = orow[r] + c0;
    rank1_tile<R>(dst, pr, 1.f, inv, vh + c0, v_token, len);
  }
  for (int r = 0; r < R; ++r) {
    for (int64_t c = c0; c < d; ++c) {
      float a = 0.f;
      for (int64_t j = 0; j < len; ++j) a += scores[r * lp + j] * vh[j * v_token + c];
      orow[r][c] = a * inv[r];
    }
  }
}

constexpr int kRows = 4;  // query rows per attend_rows pass: 4 x 2 accumulators of 8 floats stay in registers

// The task's work: sequence [start, start + len), query head h reading key/value head kvh.
void attend_sequence(float* out, Strides os,              // [n, heads, d]
                     const float* q, Strides qs,          // [n, heads, d]
                     const float* k, Strides ks,          // [n, kv_heads, d]
                     const float* v, Strides vs,          // [n, kv_heads, d]
                     int64_t start, int64_t len, int64_t h, int64_t kvh, int64_t d, float scale,
                     float* kt,       // [d, lp] scratch: K transposed
                     float* scores) { // [kRows, lp] scratch
  const int64_t lp = (len + kLanes - 1) / kLanes * kLanes;
  for (int64_t j = 0; j < len; ++j) {
    const float* kj = k + (start + j) * ks.token + kvh * ks.head;
    for (int64_t c = 0; c < d; ++c) kt[c * lp + j] = kj[c];
  }
  for (int64_t c = 0; c < d; ++c) {
    for (int64_t j = len; j < lp; ++j) kt[c * lp + j] = 0.f;  // padding keys: scores dropped
  }
  const float* vh = v + start * vs.token + kvh * vs.head;
  int64_t i = 0;
  for (; i + kRows <= len; i += kRows) {
    attend_rows<kRows>(out, os, q, qs, vh, vs.token, start, i, len, lp, h, d, scale, kt, scores);
  }
  for (; i < len; ++i) attend_rows<1>(out, os, q, qs, vh, vs.token, start, i, len, lp, h, d, scale, kt, scores);
}

void check_head_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "encoder_attention: ", name, " must be on the CPU, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "encoder_attention: float32 only, got ", name, " ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 3, "encoder_attention: ", name, " must be [num_tokens, heads, head_size], got ",
              t.sizes());
  TORCH_CHECK(t.size(2) <= 1 || t.stride(2) == 1, "encoder_attention: the head dim of ", name,
              " must be contiguous");
}

}  // namespace

void encoder_attention(at::Tensor& out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                       const at::Tensor& cu_seqlens, int64_t max_seq_len, double scale) {
  check_head_tensor(out, "out");
  check_head_tensor(query, "query");
  check_head_tensor(key, "key");
  check_head_tensor(value, "value");
  const int64_t n = query.size(0), heads = query.size(1), d = query.size(2), kv_heads = key.size(1);
  TORCH_CHECK(out.sizes() == query.sizes(), "encoder_attention: out ", out.sizes(), " must match query ",
              query.sizes());
  TORCH_CHECK(key.sizes() == value.sizes() && key.size(0) == n && key.size(2) == d,
              "encoder_attention: key and value must be [", n, ", kv_heads, ", d, "], got ", key.sizes(),
              " and ", value.sizes());
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, "encoder_attention: ", heads,
              " query heads are not a multiple of ", kv_heads, " key/value heads");
  TORCH_CHECK(cu_seqlens.device().is_cpu() && cu_seqlens.scalar_type() == at::kInt && cu_seqlens.dim() == 1 &&
                  cu_seqlens.size(0) >= 1,
              "encoder_attention: cu_seqlens must be a CPU int32 [num_seqs + 1] tensor");
  const at::Tensor starts = cu_seqlens.contiguous();
  const int32_t* cu = starts.const_data_ptr<int32_t>();
  const int64_t num_seqs = starts.size(0) - 1;
  TORCH_CHECK(cu[0] == 0 && cu[num_seqs] == n, "encoder_attention: cu_seqlens must run from 0 to ", n);
  for (int64_t s = 0; s < num_seqs; ++s) {
    TORCH_CHECK(cu[s + 1] >= cu[s] && cu[s + 1] - cu[s] <= max_seq_len,
                "encoder_attention: sequence ", s, " has length ", cu[s + 1] - cu[s], ", outside [0, ",
                max_seq_len, "]");
  }
  if (n == 0 || heads == 0 || d == 0) return;

  float* o = out.data_ptr<float>();
  const float* qp = query.const_data_ptr<float>();
  const float* kp = key.const_data_ptr<float>();
  const float* vp = value.const_data_ptr<float>();
  const Strides os{out.stride(0), out.stride(1)}, qs{query.stride(0), query.stride(1)},
      ks{key.stride(0), key.stride(1)}, vs{value.stride(0), value.stride(1)};
  const int64_t group = heads / kv_heads;
  const int64_t lp_max = (max_seq_len + kLanes - 1) / kLanes * kLanes;
  const float sc = static_cast<float>(scale);
  const int64_t tasks = heads * num_seqs;
  // Grain: tasks of the shortest sequences are ~ len^2 * d FLOPs each; a few dozen per chunk keep the
  // parallel region worth waking the other threads for, and head-major order spreads the long ones.
  at::parallel_for(0, tasks, 16, [&](int64_t t0, int64_t t1) {
    std::vector<float> scratch(d * lp_max + kRows * lp_max);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t h = t / num_seqs, s = t % num_seqs;
      const int64_t start = cu[s], len = cu[s + 1] - cu[s];
      if (len == 0) continue;
      attend_sequence(o, os, qp, qs, kp, ks, vp, vs, start, len, h, h / group, d, sc, scratch.data(),
                      scratch.data() + d * lp_max);
    }
  });
}

}  // namespace pagedllm::cpu
