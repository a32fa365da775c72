// The argument handling shared by the CPU panel GEMMs (packed_linear.cpp, quantized_linear.cpp):
// x [..., K] float32 viewed as rows [M, K] with a contiguous last dim, the optional bias [N], and
// y [..., N] allocated.
#pragma once

#include <algorithm>
#include <optional>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "panel_tile.h"

namespace pagedllm::cpu::panel {

struct LinearIO {
  at::Tensor x2;  // [M, K], last dim contiguous
  at::Tensor y;   // [..., N]
  const float* bias = nullptr;
  int64_t M = 0;
  const float* xp = nullptr;  // x2's data, row stride ldx
  int64_t ldx = 0;
  float* yp = nullptr;        // y's data, row stride N
};

// The panel count of the packed weight (its dim 0) must match ceil(N / 32); K is the packed weight's.
inline LinearIO linear_io(const char* op, const at::Tensor& x, int64_t K, int64_t N, int64_t panels,
                          const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, op, ": x has ", x.size(-1), " features, the weight expects ", K);
  TORCH_CHECK(N > 0 && (N + kPanel - 1) / kPanel == panels, op, ": out_features ", N, " does not match the packed weight's ",
              panels, " panels");
  LinearIO io;
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == at::kFloat && bias->dim() == 1 &&
                    bias->size(0) == N && bias->is_contiguous(),
                op, ": bias must be a contiguous float32 CPU tensor of ", N, " elements");
    io.bias = bias->data_ptr<float>();
  }
  io.x2 = x.reshape({-1, K});
  if (K > 0 && io.x2.stride(1) != 1) io.x2 = io.x2.contiguous();
  io.M = io.x2.size(0);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  io.y = at::empty(out_shape, x.options());
  if (io.M > 0) {
    io.xp = io.x2.data_ptr<float>();
    io.ldx = io.x2.stride(0);
    io.yp = io.y.data_ptr<float>();
  }
  return io;
}

// Whether a GEMM of M rows carries a fetch-ahead plan (fetch_ahead.h), from min_rows on: GEMMs that stream
// their weights near the memory rate are only slowed by extra reads. fp32 and 16-bit panels: more rows than
// one register tile. GGUF codes from 3 rows (quantized_linear; int8_linear's VNNI pair tiles): their 3-12 row
// tiles expand 5-9 bits a weight in registers and stream well under the DRAM rate (a 4-12 sequence decode step
// 2-14% faster with the plan, 1-2 rows 1-4% slower; int8 8-32 rows 4-6%; benchmarks/RESULTS.md "Ninth session").
constexpr int64_t kFetchAheadRows = kTileRows + 1;
constexpr int64_t kCodesFetchAheadRows = 3;  // the fewest rows any kernel fetches for: decoder_layers plans from here
inline bool takes_fetch_ahead(int64_t M, int64_t min_rows = kFetchAheadRows) { return M >= min_rows; }

// The calling thread's share of the caller's fetch-ahead plan inside a GEMM's parallel region: plan is
// fetch_ahead::current() read before the region.
inline fetch_ahead::Cursor* ahead_for(fetch_ahead::Plan* plan, int64_t M, int64_t min_rows = kFetchAheadRows) {
  return plan != nullptr && takes_fetch_ahead(M, min_rows) ? plan->this_thread() : nullptr;
}

// Every row tile of io against one panel expanded to fp32, [K, 32] (quantized_linear.cpp,
// wide16_linear.cpp): the same FMA chain per output as packed_linear, so the same bits. The whole panel
// (74 KB at K = 576: L2) rather than L1-sized chunks of K carried across tiles through y: with many rows
// a chunk's slab of x (every row, a few dozen inputs) was read in short strided runs and fell out of L2
// between a panel's chunks (Q4_1, 2 cores: 1152 rows 315 -> 390 GFLOP/s, 256 rows 359 -> 404, the fp32
// panels' rate; 16-32 rows a few % faster too).
// next / next_bytes: the thread's next packed panel (nullptr for none), fetched into L2 a line per k
// during the first tile (at most 64 bytes per k in every packed format: a line per k covers it). Spread
// over the tile rather than issued in a burst while a panel is expanded: the burst overran the core's
// outstanding misses and the next expansion waited on DRAM (Q8_0 LM head, 32 rows: see RESULTS.md).
// ahead: the thread's share of what the caller reads after this GEMM (fetch_ahead.h), or nullptr.
inline void panel_tiles(const LinearIO& io, const float* panel, int64_t K, int64_t N, int64_t n0, int64_t n_valid,
                        const void* next, int64_t next_bytes, fetch_ahead::Cursor* ahead) {
  const float* bias = io.bias ? io.bias + n0 : nullptr;
  const int64_t next_lines = next == nullptr ? 0 : std::min(K, (next_bytes + 4 * kLine - 1) / (4 * kLine));
  for (int64_t t = 0, tiles = num_tiles(io.M); t < tiles; ++t) {
    const int64_t m0 = tile_start(io.M, t), rows = tile_start(io.M, t + 1) - m0;
    kTiles[rows - 1](io.xp + m0 * io.ldx, io.ldx, panel, K, bias, io.yp + m0 * N + n0, N, n_valid,
                     static_cast<const float*>(next), t == 0 ? next_lines : 0, kLine, ahead);
  }
}

}  // namespace pagedllm::cpu::panel
