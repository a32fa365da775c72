// dtype / head-size / bool switches shared by the CPU kernels and the CUDA host launchers.
#pragma once

#include <ATen/Dispatch.h>

// float32, float16, bfloat16: the activation / KV dtypes the ops accept.
#define PAGEDLLM_DISPATCH_FLOATING_TYPES(TYPE, NAME, ...)              \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                       \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

// Only the head sizes shipped models need are instantiated (DESIGN.md, Boundaries).
#define PAGEDLLM_DISPATCH_HEAD_SIZE(HEAD_SIZE, CONST_NAME, ...)                  \
  [&] {                                                                          \
    switch (HEAD_SIZE) {                                                         \
      case 64: { constexpr int CONST_NAME = 64; return __VA_ARGS__(); }          \
      case 80: { constexpr int CONST_NAME = 80; return __VA_ARGS__(); }          \
      case 96: { constexpr int CONST_NAME = 96; return __VA_ARGS__(); }          \
      case 128: { constexpr int CONST_NAME = 128; return __VA_ARGS__(); }        \
      case 256: { constexpr int CONST_NAME = 256; return __VA_ARGS__(); }        \
      default: TORCH_CHECK(false, "Unsupported head size: ", HEAD_SIZE);         \
    }                                                                            \
  }()

#define PAGEDLLM_DISPATCH_BLOCK_SIZE(BLOCK_SIZE, CONST_NAME, ...)                \
  [&] {                                                                          \
    switch (BLOCK_SIZE) {                                                        \
      case 16: { constexpr int CONST_NAME = 16; return __VA_ARGS__(); }          \
      case 32: { constexpr int CONST_NAME = 32; return __VA_ARGS__(); }          \
      default: TORCH_CHECK(false, "Unsupported block size: ", BLOCK_SIZE);       \
    }                                                                            \
  }()
