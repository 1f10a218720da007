// Constants of flexprefill, defined once. Python asks the ops (supported_head_dims,
// supported_block_sizes) instead of copying these numbers.
#pragma once

#include <array>
#include <cstdint>

namespace flexprefill {

// Head dims the CPU kernels accept (any model head dim up to 256 that is a multiple of 8).
constexpr int kCpuMaxHeadDim = 256;
constexpr int kCpuHeadDimMultiple = 8;
// Head dims with a compiled CUDA attention instantiation (see cuda/attention/).
constexpr std::array<int, 5> kCudaHeadDims = {64, 80, 96, 128, 256};

// Block sizes (tokens per query block and per key block).
constexpr std::array<int, 4> kCpuBlockSizes = {16, 32, 64, 128};
constexpr std::array<int, 2> kCudaBlockSizes = {64, 128};

// Step 3: probabilities are clamped to this before the Jensen-Shannon divergence.
constexpr float kJsdEps = 1e-12f;

// Step 7: chunks of at most max(2 * block_size, min_budget) queries are answered densely.
inline int64_t dense_threshold(int64_t block_size, int64_t min_budget) {
  return 2 * block_size > min_budget ? 2 * block_size : min_budget;
}

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace flexprefill
