// Parameter structs shared by every backend (CPU, portable CUDA, and later Hopper-native
// kernels). Framework-free: raw pointers and 64-bit element strides, filled in one place
// (checks.cpp: fill_attention_params / fill_select_params).
#pragma once

#include <cstdint>

namespace flexprefill {

// Block-sparse attention (design.md §1 step 6).
struct AttentionParams {
  // Inputs. Element strides (not bytes), 64-bit: 1M tokens x 32 heads x 128 overflows int32.
  const void* q;  // [B, Nq, Hq, D]
  const void* k;  // [B, Nk, Hkv, D]
  const void* v;  // [B, Nk, Hkv, D]
  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t v_batch_stride, v_row_stride, v_head_stride;

  // Selection (FlexAttention BlockMask layout).
  const int32_t* kv_count;  // [B, Hq, NBq]
  const int32_t* kv_index;  // [B, Hq, NBq, max_blocks]
  int64_t cnt_batch_stride, cnt_head_stride, cnt_row_stride;
  int64_t idx_batch_stride, idx_head_stride, idx_row_stride;

  // Outputs.
  void* out;   // [B, Nq, Hq, D], dtype of q
  float* lse;  // [B, Hq, Nq] fp32, natural log; -inf for a row that sees no key
  int64_t o_batch_stride, o_row_stride, o_head_stride;
  int64_t lse_batch_stride, lse_head_stride;

  int64_t batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim;
  int64_t block_size;
  int64_t num_q_blocks, num_k_blocks;  // ceil(Nq / bs), ceil(Nk / bs)
  int64_t max_blocks;                  // last dim of kv_index
  float softmax_scale;
  bool is_bf16;  // CUDA: bf16 vs fp16
};

// Pattern selection (design.md §1 steps 1-5, 7).
struct SelectParams {
  const void* q;  // [B, Nq, Hq, D]
  const void* k;  // [B, Nk, Hkv, D]
  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t k_batch_stride, k_row_stride, k_head_stride;

  int32_t* kv_count;     // [B, Hq, NBq] contiguous
  int32_t* kv_index;     // [B, Hq, NBq, NBk] contiguous
  bool* query_aware;     // [B, Hq] contiguous

  int64_t batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim;
  int64_t block_size;
  int64_t num_q_blocks, num_k_blocks;
  float gamma, tau, softmax_scale;
  // Budgets converted from tokens to blocks (ceil(tokens / bs), at most NBk). They bound
  // BOTH the vertical key-block columns and the slash distance bins that a head keeps:
  // slash selection is at block granularity (bins of bs distances), see reference.py
  // step 4 and /work/main/.dev/SPEC_CHANGE.md. min_budget_tokens decides step 7.
  int64_t min_blocks;
  int64_t max_blocks;
  int64_t min_budget_tokens;
  bool is_bf16;
};

}  // namespace flexprefill
