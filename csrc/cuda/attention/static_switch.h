// Compile-time dispatch of the attention kernels: runtime dtype / head dim / block size
// to template arguments. Every switch ends in a TORCH_CHECK naming what is supported.
// A head dim is dispatched only when its instantiation file is built (setup.py's
// FLEXPREFILL_HEAD_DIMS defines FLEXPREFILL_HEAD_DIMS_SUBSET and FLEXPREFILL_HDIM_<D>).
#pragma once

#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define FLEXPREFILL_DTYPE_SWITCH(IS_BF16, ELEMENT, ...) \
  [&] {                                                 \
    if (IS_BF16) {                                      \
      using ELEMENT = __nv_bfloat16;                    \
      return __VA_ARGS__();                             \
    } else {                                            \
      using ELEMENT = __half;                           \
      return __VA_ARGS__();                             \
    }                                                   \
  }()

#define FLEXPREFILL_BLOCK_SIZE_SWITCH(BS, CONST_NAME, ...)                                        \
  [&] {                                                                                           \
    if (BS == 64) {                                                                               \
      constexpr int CONST_NAME = 64;                                                              \
      return __VA_ARGS__();                                                                       \
    } else if (BS == 128) {                                                                       \
      constexpr int CONST_NAME = 128;                                                             \
      return __VA_ARGS__();                                                                       \
    }                                                                                             \
    TORCH_CHECK(false, "block_sparse_attention: unsupported block_size ", BS, " on CUDA; supported: 64, 128"); \
  }()

#define FLEXPREFILL_HDIM_CASE(D, CONST_NAME, ...) \
  if (head_dim_ == D) {                           \
    constexpr int CONST_NAME = D;                 \
    return __VA_ARGS__();                         \
  }

#if !defined(FLEXPREFILL_HEAD_DIMS_SUBSET) || defined(FLEXPREFILL_HDIM_64)
#define FLEXPREFILL_HDIM_CASE_64(C, ...) FLEXPREFILL_HDIM_CASE(64, C, __VA_ARGS__)
#else
#define FLEXPREFILL_HDIM_CASE_64(C, ...)
#endif
#if !defined(FLEXPREFILL_HEAD_DIMS_SUBSET) || defined(FLEXPREFILL_HDIM_80)
#define FLEXPREFILL_HDIM_CASE_80(C, ...) FLEXPREFILL_HDIM_CASE(80, C, __VA_ARGS__)
#else
#define FLEXPREFILL_HDIM_CASE_80(C, ...)
#endif
#if !defined(FLEXPREFILL_HEAD_DIMS_SUBSET) || defined(FLEXPREFILL_HDIM_96)
#define FLEXPREFILL_HDIM_CASE_96(C, ...) FLEXPREFILL_HDIM_CASE(96, C, __VA_ARGS__)
#else
#define FLEXPREFILL_HDIM_CASE_96(C, ...)
#endif
#if !defined(FLEXPREFILL_HEAD_DIMS_SUBSET) || defined(FLEXPREFILL_HDIM_128)
#define FLEXPREFILL_HDIM_CASE_128(C, ...) FLEXPREFILL_HDIM_CASE(128, C, __VA_ARGS__)
#else
#define FLEXPREFILL_HDIM_CASE_128(C, ...)
#endif
#if !defined(FLEXPREFILL_HEAD_DIMS_SUBSET) || defined(FLEXPREFILL_HDIM_256)
#define FLEXPREFILL_HDIM_CASE_256(C, ...) FLEXPREFILL_HDIM_CASE(256, C, __VA_ARGS__)
#else
#define FLEXPREFILL_HDIM_CASE_256(C, ...)
#endif

// SUPPORTED: the message tail naming the head dims of this build.
#define FLEXPREFILL_HEADDIM_SWITCH(HEAD_DIM, SUPPORTED, CONST_NAME, ...)                           \
  [&] {                                                                                           \
    const int64_t head_dim_ = HEAD_DIM;                                                           \
    FLEXPREFILL_HDIM_CASE_64(CONST_NAME, __VA_ARGS__)                                             \
    FLEXPREFILL_HDIM_CASE_80(CONST_NAME, __VA_ARGS__)                                             \
    FLEXPREFILL_HDIM_CASE_96(CONST_NAME, __VA_ARGS__)                                             \
    FLEXPREFILL_HDIM_CASE_128(CONST_NAME, __VA_ARGS__)                                            \
    FLEXPREFILL_HDIM_CASE_256(CONST_NAME, __VA_ARGS__)                                            \
    TORCH_CHECK(false, "block_sparse_attention: unsupported head_dim ", head_dim_,                \
                " on CUDA; supported: ", SUPPORTED);                                               \
  }()
