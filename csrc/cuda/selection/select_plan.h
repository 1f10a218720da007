// Launch plan and workspace layout of the CUDA select_blocks (design.md §1 steps 1-5, 7).
// Framework-free (host only): the glue fills a SelectPlan from SelectParams, allocates
// `workspace_bytes` on the device, and the kernels read their buffers at the offsets below.
//
// Pipeline (no host synchronisation):
//   rep        one pass of softmax(s Q̂ Kᵀ) over the keys, split over CTAs: per (row, key
//              block) records [B,Hq,NBk,3,m]; also pool(K) [B,Hkv,NBk,D], mean(Q̂) [B,Hq,D],
//              and (rep_pools_q: Hopper, D = 64, bs = 128, one wave) pool(Q) [B,Hq,NBq,D]
//                                                                                  (steps 1-3)
//   finish     records: many CTAs per head: row LSE, vertical mass [B,Hq,NBk], the JSD
//              logits; then one CTA per head: slash bin mass [B,Hq,NBk], the JSD decision
//              query_aware [B,Hq], and the vertical-slash selection (column / distance-bin
//              bitmasks); with query-aware heads possible, the selection runs on a side
//              stream beside step 5 (forked after the decision, joined before assemble)
//                                                                                  (steps 2-4)
//   per wave of heads: qa_pool (pool(Q), unless the rep kernel wrote it), qa_estimate
//              (logits, row softmax), then the selection:
//              one CTA per head (qa_select_small) when NBq * NBk <= kQaSmallMax, else
//              a radix descent over many CTAs per head: level 0 in qa_estimate, levels 1
//              and 2 in qa_radix_level (2 launches), then qa_mark                  (step 5)
//   assemble   kv_count, kv_index                                                  (steps 4-7)
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "params.h"

namespace flexprefill {
namespace selection {

constexpr int kTileKeys = 64;             // keys per tensor-core tile of the rep kernel
constexpr int kRowsPerWarp = 32;          // representative rows per warp (two m16 tiles)
constexpr int kSplitKeysMax = 2048;       // keys per CTA of the rep kernel (a multiple of every bs)
constexpr int kSplitKeysMin = 256;
constexpr int64_t kQaSmallMax = 16384;    // estimate entries per head selected by one CTA
constexpr int64_t kQaChunkMin = 4096, kQaChunkMax = 32768;  // entries per CTA of the multi-CTA selection
constexpr int64_t kQaCtasPerHead = 16;    // ... aiming at this many CTAs per head
constexpr int kSelectThreads = 1024;      // CTA of the radix selections
constexpr int kAssembleRowsPerCta = 4;    // one warp per query block
constexpr size_t kRadixStateBytes = 64 + 3 * 2048 * 4;  // step-5 radix state + global histogram per head
constexpr size_t kEstBudgetBytes = size_t(48) << 20;  // step-5 estimate scratch per wave (<= 64 MiB in all at 128k)

// The portable rep kernel's occupancy by head dim (rep_attention_sm90.cuh has its own): up
// to D = 128 two CTAs share an SM (<= 128 registers a thread: twice the warps to hide the
// latency of the exponentials' dependency chains); D = 256 keeps one. The K ring is as
// deep as shared memory allows for that occupancy.
constexpr int rep_ctas_per_sm(int D) { return D <= 128 ? 2 : 1; }
constexpr int rep_stages(int D) { return D > 96 && D <= 128 ? 2 : 4; }

inline size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

struct SelectPlan {
  bool dense = false;     // step 7: every causal block, query_aware false
  bool keep_all = false;  // gamma >= 1: every causal block (query_aware still computed)
  bool any_query_aware = true;  // tau > 0
  int64_t rows = 0;       // representative rows m = min(bs, Nq) (= bs on the sparse path)
  int64_t split_keys = 0, num_splits = 0;
  int64_t min_blocks = 0, max_blocks = 0;  // budgets of columns and of slash bins
  int64_t n_allowed = 0;  // causal (query block, key block) pairs of one head
  int64_t heads_per_wave = 0, waves = 0;
  bool rep_pools_q = false;  // the rep kernel writes pool(Q) of every head (one wave; qa_pool skipped)
  int64_t qa_chunk = 0;   // entries per CTA of the multi-CTA query-aware selection (a multiple of 32)
  double tau = 0.0;
  float scale_log2 = 0.f;
  int64_t cols_words = 0, qa_words = 0;  // uint32 words per head (columns and bins: NBk bits)
  // Workspace offsets in bytes. Persistent buffers (everything that step 4 reads or writes,
  // since it runs beside step 5), then phase 1 (the rep kernel's records and the finish
  // kernel) and phase 2 (the query-aware estimate), which alias.
  size_t off_pool_k = 0, off_qhat_mean = 0, off_jsd_logits = 0, off_vert = 0;
  size_t off_cols = 0, off_bins = 0, off_qa = 0;
  size_t off_rec = 0, off_part_ref = 0, off_part_sum = 0, off_abcd = 0, off_lse2 = 0, off_slash = 0;
  size_t off_poolq = 0, off_est = 0, off_radix = 0;
  size_t workspace_bytes = 0;
};

// Device pointers into the workspace.
struct SelectBuffers {
  float* pool_k;       // [B, Hkv, NBk, D]
  float* qhat_mean;    // [B, Hq, D]
  float* jsd_logits;   // [B, Hq, NBk]
  float* vert;         // [B, Hq, NBk]   vertical mass per key block (â)
  uint32_t* cols;      // [B, Hq, cols_words]   selected key-block columns
  uint32_t* bins;      // [B, Hq, cols_words]   selected slash distance bins [t bs, t bs + bs)
  uint32_t* qa;        // [B, Hq, qa_words]     query-aware blocks, flat index r * NBk + c
  float* rec;          // [B, Hq, NBk, 3, m]     per (key block, row): M, H, L (rep_attention.cuh)
  float* part_ref;     // [B, Hq, num_splits, m] per (split, row): reference and sum (rep_attention.cuh)
  float* part_sum;     // [B, Hq, num_splits, m]
  float* abcd;         // [B, Hq, NBk, 4]        per key block: H and L mass of the two row groups
  float* lse2;         // [B, Hq, m]             (log2 units)
  float* slash;        // [B, Hq, NBk]           slash mass per distance bin
  float* poolq;        // [heads_per_wave, NBq, D]  pool(Q) of the query-aware heads (rep_pools_q: of all)
  float* est;          // [heads_per_wave, NBq, NBk]
  unsigned char* radix;  // [heads_per_wave, kRadixStateBytes]
};

inline SelectBuffers select_buffers(const SelectPlan& plan, void* workspace) {
  auto* base = static_cast<unsigned char*>(workspace);
  auto f = [&](size_t off) { return reinterpret_cast<float*>(base + off); };
  auto u = [&](size_t off) { return reinterpret_cast<uint32_t*>(base + off); };
  return SelectBuffers{f(plan.off_pool_k),   f(plan.off_qhat_mean), f(plan.off_jsd_logits),
                       f(plan.off_vert),     u(plan.off_cols),      u(plan.off_bins),
                       u(plan.off_qa),       f(plan.off_rec),       f(plan.off_part_ref),
                       f(plan.off_part_sum), f(plan.off_abcd),
                       f(plan.off_lse2),     f(plan.off_slash),
                       f(plan.off_poolq),    f(plan.off_est),       base + plan.off_radix};
}

// Step 5 selects a head's query-aware blocks on one CTA (qa_select_small) up to kQaSmallMax
// estimate entries; beyond, with the multi-CTA radix descent (qa_estimate's level 0,
// qa_radix_level, qa_mark), whose bitmask words and radix state start cleared.
#if defined(__CUDACC__)
__host__ __device__
#endif
inline bool qa_one_cta(const SelectParams& p) { return p.num_q_blocks * p.num_k_blocks <= kQaSmallMax; }

// Causal key-block bound of query block r: hi_r // bs (reference `_block_rows`).
inline int64_t last_causal_block(int64_t r, int64_t Nq, int64_t Nk, int64_t bs) {
  const int64_t off = Nk - Nq;
  return (off + std::min(r * bs + bs, Nq) - 1) / bs;
}

// rep_slots: CTAs of the rep kernel resident on the GPU at once; rep_heads_per_cta: query
// heads per CTA of it (both from rep_config); est_budget_bytes: step-5 scratch of one wave of
// heads (tests lower it to reach the several-wave path on short inputs); rep_pools_q: the rep
// kernel can write pool(Q) of every head (rep_config's pools_q), used when step 5 runs in one
// wave (then poolq and the radix state are persistent buffers, zeroed by the records kernel);
// rep_split_keys: keys per CTA of the rep kernel when nonzero (tests: a multiple of
// kSplitKeysMin), else the rule below.
inline SelectPlan make_select_plan(const SelectParams& p, double gamma, double tau, int rep_slots,
                                   int rep_heads_per_cta, size_t est_budget_bytes = kEstBudgetBytes,
                                   bool rep_pools_q = false, int64_t rep_split_keys = 0) {
  SelectPlan plan;
  const int64_t bs = p.block_size, Nq = p.seqlen_q, Nk = p.seqlen_k;
  const int64_t NBq = p.num_q_blocks, NBk = p.num_k_blocks;
  const int64_t BH = p.batch * p.heads_q;
  plan.dense = Nq <= std::max<int64_t>(2 * bs, p.min_budget_tokens);
  plan.keep_all = gamma >= 1.0;
  plan.any_query_aware = tau > 0.0;
  plan.tau = tau;
  plan.scale_log2 = p.softmax_scale * 1.4426950408889634f;
  if (plan.dense) return plan;

  plan.rows = std::min(bs, Nq);
  int64_t split = kSplitKeysMax;
  auto cdiv = [](int64_t a, int64_t b) { return (a + b - 1) / b; };
  // CTAs of the rep kernel: BH / rep_heads_per_cta per split (heads of a GQA group share a
  // CTA); shorter splits until they fill 90% of the resident slots once (every CTA first
  // loads Q̂: longer splits amortise it).
  const int64_t per_cta = std::max(1, rep_heads_per_cta);
  const int64_t slots = rep_slots;
  while (split > kSplitKeysMin && 10 * (BH / per_cta) * cdiv(Nk, split) < 9 * slots) split /= 2;
  if (rep_split_keys > 0) split = rep_split_keys;
  plan.split_keys = split;
  plan.num_splits = cdiv(Nk, split);

  plan.min_blocks = p.min_blocks;
  plan.max_blocks = p.max_blocks;
  plan.n_allowed = 0;
  for (int64_t r = 0; r < NBq; ++r) plan.n_allowed += last_causal_block(r, Nq, Nk, bs) + 1;

  plan.cols_words = cdiv(NBk, 32);
  plan.qa_chunk = std::min(kQaChunkMax, std::max(kQaChunkMin, cdiv(cdiv(NBq * NBk, kQaCtasPerHead), 32) * 32));
  plan.qa_words = cdiv(NBq * NBk, 32);

  const int64_t D = p.head_dim, m = plan.rows;
  const bool step5 = plan.any_query_aware && !plan.keep_all;
  const size_t per_head = sizeof(float) * NBq * (NBk + D) + kRadixStateBytes;
  if (step5) {
    plan.heads_per_wave = std::max<int64_t>(1, std::min<int64_t>(BH, est_budget_bytes / per_head));
    plan.waves = cdiv(BH, plan.heads_per_wave);
    plan.rep_pools_q = rep_pools_q && plan.waves == 1;
  }
  size_t off = 0;
  auto take = [&](size_t bytes) {
    size_t at = off;
    off = align_up(off + bytes, 256);
    return at;
  };
  plan.off_pool_k = take(sizeof(float) * p.batch * p.heads_kv * NBk * D);
  plan.off_qhat_mean = take(sizeof(float) * BH * D);
  plan.off_jsd_logits = take(sizeof(float) * BH * NBk);
  plan.off_vert = take(sizeof(float) * BH * NBk);
  plan.off_cols = take(sizeof(uint32_t) * BH * plan.cols_words);
  plan.off_bins = take(sizeof(uint32_t) * BH * plan.cols_words);
  plan.off_qa = take(plan.any_query_aware ? sizeof(uint32_t) * BH * plan.qa_words : 0);
  plan.off_slash = take(sizeof(float) * BH * NBk);  // read by step 4 beside step 5
  if (plan.rep_pools_q) {  // written in phase 1 (heads_per_wave = BH)
    plan.off_poolq = take(sizeof(float) * BH * NBq * D);
    plan.off_radix = take(kRadixStateBytes * BH);
  }
  const size_t phase_start = off;
  plan.off_rec = take(sizeof(float) * BH * NBk * 3 * m);
  plan.off_part_ref = take(sizeof(float) * BH * plan.num_splits * m);
  plan.off_part_sum = take(sizeof(float) * BH * plan.num_splits * m);
  plan.off_abcd = take(sizeof(float) * BH * NBk * 4);
  plan.off_lse2 = take(sizeof(float) * BH * m);
  const size_t phase1_end = off;

  off = phase_start;
  if (step5) {
    if (!plan.rep_pools_q) plan.off_poolq = take(sizeof(float) * plan.heads_per_wave * NBq * D);
    plan.off_est = take(sizeof(float) * plan.heads_per_wave * NBq * NBk);
    if (!plan.rep_pools_q) plan.off_radix = take(kRadixStateBytes * plan.heads_per_wave);
  }
  plan.workspace_bytes = std::max(off, phase1_end);
  return plan;
}

}  // namespace selection
}  // namespace flexprefill
