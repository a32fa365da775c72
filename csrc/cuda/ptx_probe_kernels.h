// Micro-kernels that run each inline-PTX helper of csrc/cuda/ptx.cuh once on known inputs
// (tests/kernels/test_ptx_twins.py): on a GPU they run the instructions, in the emulator build the
// twins, and the test compares both with a reference written from the PTX ISA.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace pagedllm::cuda {

enum class PtxProbe : int32_t {
  kEx2 = 0,        // out[i] = fast_exp2(in[i]) (float bits), 32 values
  kCpAsync = 1,    // lanes copy 16-byte pieces (odd lanes: zero-fill), then wait: out = 512 bytes of smem
  kLdsm = 2,       // ldsm_x4 of a 32 x 8 b16 tile (4 matrices of 8 rows): out[lane * 4 + r]
  kLdsmTrans = 3,  // ldsm_x4_trans of the same tile
  kMmaBf16 = 4,    // mma_16816<bf16>: A (16 x 16), B (16 x 8), C (16 x 8 fp32) from in; out = D fragments
  kMmaFp16 = 5,    // mma_16816<fp16>
};

// One warp. in, out: device int32 words (bit patterns), in_words >= 384, out_words >= 128.
cudaError_t launch_ptx_probe(PtxProbe probe, int32_t* out, const int32_t* in, cudaStream_t stream);

}  // namespace pagedllm::cuda
