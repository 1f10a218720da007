// Device-side check of a selection's values (validate=True): every kv_count in
// [0, min(max_blocks, num_k_blocks)], and kv_index[b, h, r, :kv_count] in [0, num_k_blocks)
// and strictly ascending. One warp per (b, h, r) row, coalesced over the indices.
// Framework-free.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace flexprefill {
namespace attention {

// The first offence in (b, h, r, j) order is encoded as row * (max_blocks + 1) + pos, with
// pos = 0 for a bad count and j + 1 for a bad index at j; `first_error` keeps the minimum
// (initialise it to UINT64_MAX). Only the error path reads it back.
struct SelectionCheck {
  const int32_t* kv_count;  // [B, Hq, NBq]
  const int32_t* kv_index;  // [B, Hq, NBq, max_blocks], last dim contiguous
  int64_t cnt_batch_stride, cnt_head_stride, cnt_row_stride;
  int64_t idx_batch_stride, idx_head_stride, idx_row_stride;
  int64_t heads, rows_per_head, num_rows;  // num_rows = B * Hq * NBq
  int64_t max_blocks, num_k_blocks;
  unsigned long long* first_error;
};

constexpr int kValidateWarpsPerBlock = 8;

__global__ void __launch_bounds__(kValidateWarpsPerBlock * 32) validate_selection_kernel(const SelectionCheck c) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kValidateWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= c.num_rows) return;
  const int64_t r = row % c.rows_per_head;
  const int64_t h = (row / c.rows_per_head) % c.heads;
  const int64_t b = row / (c.rows_per_head * c.heads);
  const unsigned long long base = static_cast<unsigned long long>(row) * (c.max_blocks + 1);
  const int64_t n = c.kv_count[b * c.cnt_batch_stride + h * c.cnt_head_stride + r * c.cnt_row_stride];
  const int64_t n_max = c.max_blocks < c.num_k_blocks ? c.max_blocks : c.num_k_blocks;
  if (n < 0 || n > n_max) {
    if (lane == 0) atomicMin(c.first_error, base);
    return;
  }
  const int32_t* list = c.kv_index + b * c.idx_batch_stride + h * c.idx_head_stride + r * c.idx_row_stride;
  for (int64_t j0 = 0; j0 < n; j0 += 32) {
    const int64_t j = j0 + lane;
    bool bad = false;
    if (j < n) {
      const int32_t v = list[j];
      bad = v < 0 || v >= c.num_k_blocks || (j > 0 && v <= list[j - 1]);
    }
    const unsigned mask = __ballot_sync(0xffffffffu, bad);
    if (mask != 0) {
      if (lane == 0) atomicMin(c.first_error, base + static_cast<unsigned long long>(j0 + __ffs(mask)));
      return;  // __ffs is 1-based: pos = j + 1
    }
  }
}

}  // namespace attention
}  // namespace flexprefill
