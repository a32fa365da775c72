// Emulator twins of the warp-wide PTX instructions of csrc/cuda/ptx.cuh, written from the PTX ISA's
// fragment layouts (ldmatrix: "Warp-level matrix load instruction: ldmatrix"; mma.m16n8k16:
// "Matrix Fragments for mma.m16n8k16 with floating point type").
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <set>

#include "cuda/emu/emu_runtime.h"

namespace emu {

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lanes 8i..8i+7 give the row addresses of
// matrix i. Without .trans lane l gets, of each matrix, row l/4, elements 2(l%4) and 2(l%4)+1;
// with .trans it gets (row 2(l%4), col l/4) and (row 2(l%4)+1, col l/4).
void ldmatrix_x4(uint32_t addr, uint32_t (&r)[4], bool trans, const char* file, int line) {
  const int lane = lane_id();
  exchange_slot(g_block->warps[g_cur->lin >> 5].gen, lane)[0] = addr;
  const unsigned gen = warp_collective(0xffffffffu, file, line);
  auto row_addr = [&](int m, int row) { return static_cast<uint32_t>(exchange_slot(gen, 8 * m + row)[0]); };
  for (int m = 0; m < 4; ++m) {
    for (int row = 0; row < 8; ++row) {
      const uint32_t a = row_addr(m, row);
      if (a & 15) fail(file, line, "ldmatrix: row address 0x%x (lane %d) not 16-byte aligned", a, 8 * m + row);
      if (a + 16 > g_block->smem_bytes)
        fail(file, line, "ldmatrix: row 0x%x (lane %d) outside the launch's %zu bytes of dynamic shared memory", a,
             8 * m + row, g_block->smem_bytes);
    }
  }
  auto elem = [&](int m, int row, int col) {
    uint16_t v;
    std::memcpy(&v, g_block->smem + row_addr(m, row) + 2 * col, 2);
    return v;
  };
  if (lane == 0 && config().count) {  // one 8-row phase per matrix; wavefronts = worst bank's distinct words
    for (int m = 0; m < 4; ++m) {
      std::map<int, std::set<uint32_t>> words_of_bank;
      for (int row = 0; row < 8; ++row) {
        for (int w = 0; w < 4; ++w) {
          const uint32_t word = (row_addr(m, row) >> 2) + w;
          words_of_bank[word & 31].insert(word);
        }
      }
      size_t wavefronts = 1;
      for (auto& kv : words_of_bank) wavefronts = std::max(wavefronts, kv.second.size());
      ++stats().ldsm_phases;
      stats().ldsm_wavefronts += static_cast<int64_t>(wavefronts);
    }
  }
  for (int m = 0; m < 4; ++m) {
    uint16_t lo, hi;
    if (!trans) {
      lo = elem(m, lane / 4, 2 * (lane % 4));
      hi = elem(m, lane / 4, 2 * (lane % 4) + 1);
    } else {
      lo = elem(m, 2 * (lane % 4), lane / 4);
      hi = elem(m, 2 * (lane % 4) + 1, lane / 4);
    }
    r[m] = uint32_t(lo) | (uint32_t(hi) << 16);
  }
}

namespace {
template <typename T>
float b16_to_float(uint32_t bits) {
  const uint16_t v = static_cast<uint16_t>(bits);
  T x;
  std::memcpy(static_cast<void*>(&x), &v, 2);
  return static_cast<float>(x);
}
}  // namespace

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32 (g = lane / 4, t = lane % 4):
//   A: a0 = (g, 2t..2t+1) a1 = (g+8, 2t..) a2 = (g, 2t+8..) a3 = (g+8, 2t+8..)
//   B: b0 = (k 2t..2t+1, n g) b1 = (k 2t+8..2t+9, n g)
//   C/D: c0, c1 = (g, 2t..2t+1) c2, c3 = (g+8, 2t..2t+1)
// Products are exact in fp32 (b16 x b16 fits in 24 bits); the sum order is the emulator's own
// (the hardware's is unspecified): tests hold both to the same tolerance.
template <typename T>
void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, const char* file, int line) {
  const int lane = lane_id();
  uint64_t* s = exchange_slot(g_block->warps[g_cur->lin >> 5].gen, lane);
  for (int i = 0; i < 4; ++i) s[i] = a[i];
  s[4] = b0;
  s[5] = b1;
  const unsigned gen = warp_collective(0xffffffffu, file, line);
  float A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    const uint64_t* q = exchange_slot(gen, l);
    const int g = l / 4, t = l % 4;
    auto put_a = [&](uint64_t reg, int row, int col) {
      A[row][col] = b16_to_float<T>(static_cast<uint32_t>(reg));
      A[row][col + 1] = b16_to_float<T>(static_cast<uint32_t>(reg >> 16));
    };
    put_a(q[0], g, 2 * t);
    put_a(q[1], g + 8, 2 * t);
    put_a(q[2], g, 2 * t + 8);
    put_a(q[3], g + 8, 2 * t + 8);
    B[2 * t][g] = b16_to_float<T>(static_cast<uint32_t>(q[4]));
    B[2 * t + 1][g] = b16_to_float<T>(static_cast<uint32_t>(q[4] >> 16));
    B[2 * t + 8][g] = b16_to_float<T>(static_cast<uint32_t>(q[5]));
    B[2 * t + 9][g] = b16_to_float<T>(static_cast<uint32_t>(q[5] >> 16));
  }
  const int g = lane / 4, t = lane % 4;
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
    float acc = c[e];
    for (int k = 0; k < 16; ++k) acc = std::fma(A[row][k], B[k][col], acc);
    c[e] = acc;
  }
}

template void mma_16816<__nv_bfloat16>(float (&)[4], const uint32_t (&)[4], uint32_t, uint32_t, const char*, int);
template void mma_16816<__half>(float (&)[4], const uint32_t (&)[4], uint32_t, uint32_t, const char*, int);

// ex2.approx.ftz.f32: 2^x, subnormal results flushed to +0 (the hardware is within 2 ulp).
float ex2_approx(float x) {
  const float y = std::exp2(x);
  return std::fpclassify(y) == FP_SUBNORMAL ? 0.f : y;
}

}  // namespace emu
