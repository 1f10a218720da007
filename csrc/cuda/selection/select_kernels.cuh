// The small kernels of the CUDA select_blocks around the two tensor-core passes
// (rep_attention.cuh): pooling, LSE combination, the JSD decision, the vertical-slash and
// query-aware selections, and the final assembly into FlexAttention's BlockMask layout.
// Framework-free: raw pointers, SelectParams / SelectPlan, a stream; every launcher does
// one launch and returns cudaGetLastError().
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/selection/device_utils.cuh"
#include "cuda/selection/radix_select.cuh"
#include "config.h"
#include "cuda/selection/select_plan.h"
#include "params.h"

namespace flexprefill {
namespace selection {

__device__ __forceinline__ int64_t last_causal_block_dev(int64_t r, int64_t Nq, int64_t Nk, int64_t bs) {
  const int64_t off = Nk - Nq;
  const int64_t end = r * bs + bs < Nq ? r * bs + bs : Nq;
  return (off + end - 1) / bs;
}

// Mean over rows [row0, row0 + count) of x[b, row, head, :] in fp32 (sum, then divide, as
// the reference's _pool). 16-byte loads: D / 8 threads per row, blockDim / (D / 8) rows in
// flight; the row groups are summed in a fixed order (deterministic). Rows 16-byte aligned.
constexpr int kPoolThreads = 256;
__device__ __forceinline__ void mean_rows(const uint16_t* x, int64_t row_stride, int64_t row0, int64_t count,
                                          int D, bool is_bf16, float* out) {
  __shared__ float partial[kPoolThreads * 8];  // [groups][D]
  const int chunks = D / 8, groups = kPoolThreads / chunks;
  const int c = threadIdx.x % chunks, gi = threadIdx.x / chunks;
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  if (gi < groups) {
#pragma unroll 4
    for (int64_t r = gi; r < count; r += groups) {
      const uint4 v = *reinterpret_cast<const uint4*>(x + (row0 + r) * row_stride + c * 8);
      const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        if (is_bf16) {
          acc[2 * e] += __uint_as_float(w[e] << 16);
          acc[2 * e + 1] += __uint_as_float(w[e] & 0xffff0000u);
        } else {
          acc[2 * e] += __half2float(__ushort_as_half(static_cast<unsigned short>(w[e] & 0xffffu)));
          acc[2 * e + 1] += __half2float(__ushort_as_half(static_cast<unsigned short>(w[e] >> 16)));
        }
      }
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) partial[gi * D + c * 8 + e] = acc[e];
  }
  __syncthreads();
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float s = 0.f;
    for (int g = 0; g < groups; ++g) s += partial[g * D + d];
    out[d] = s / static_cast<float>(count);
  }
}

// pool(K) [B, Hkv, NBk, D]. grid (NBk, Hkv, B).
__global__ void pool_keys_kernel(const SelectParams p, float* pool_k) {
  const int64_t c = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  const int64_t bs = p.block_size, row0 = c * bs;
  const int64_t count = (row0 + bs < p.seqlen_k ? row0 + bs : p.seqlen_k) - row0;
  const auto* k = static_cast<const uint16_t*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride;
  mean_rows(k, p.k_row_stride, row0, count, static_cast<int>(p.head_dim), p.is_bf16,
            pool_k + ((b * p.heads_kv + hk) * p.num_k_blocks + c) * p.head_dim);
}

// mean(Q̂) [B, Hq, D] over the last m rows. grid (Hq, B).
__global__ void qhat_mean_kernel(const SelectParams p, int64_t m, float* qhat_mean) {
  const int64_t h = blockIdx.x, b = blockIdx.y;
  const auto* q = static_cast<const uint16_t*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
  mean_rows(q, p.q_row_stride, p.seqlen_q - m, m, static_cast<int>(p.head_dim), p.is_bf16,
            qhat_mean + (b * p.heads_q + h) * p.head_dim);
}

// lse2 [B, Hq, m] = log2 sum_splits part_sum * 2^(part_max - M) + M.
__global__ void lse_combine_kernel(const float* part_max, const float* part_sum, int64_t rows_total, int64_t m,
                                   int64_t splits, float* lse2) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= rows_total) return;
  const int64_t head = idx / m, i = idx - head * m;
  const float* pm = part_max + head * splits * m + i;
  const float* ps = part_sum + head * splits * m + i;
  float M = -INFINITY;
  for (int64_t s = 0; s < splits; ++s) M = fmaxf(M, pm[s * m]);
  float S = 0.f;
  for (int64_t s = 0; s < splits; ++s)
    if (pm[s * m] != -INFINITY) S += ps[s * m] * exp2f(pm[s * m] - M);
  lse2[idx] = M + log2f(S);
}

// Step 3: query_aware[b, h] = sqrt(JSD(softmax(s pool(K) mean(Q̂)) || â)) < tau. grid (Hq, B),
// 256 threads. The softmax and the divergence are evaluated in double.
__global__ void jsd_kernel(const SelectParams p, const SelectPlan plan, const float* pool_k, const float* qhat_mean,
                           const float* vert, float* logits, bool* query_aware) {
  __shared__ float qm[256];
  __shared__ double red_d[32];
  __shared__ float red_f[32];
  const int64_t h = blockIdx.x, b = blockIdx.y;
  const int64_t head = b * p.heads_q + h, hk = h / (p.heads_q / p.heads_kv);
  const int D = static_cast<int>(p.head_dim);
  const int64_t NBk = p.num_k_blocks;
  for (int d = threadIdx.x; d < D; d += blockDim.x) qm[d] = qhat_mean[head * D + d];
  __syncthreads();
  const float* pk = pool_k + (b * p.heads_kv + hk) * NBk * D;
  float* x = logits + head * NBk;
  float mx = -INFINITY;
  for (int64_t c = threadIdx.x; c < NBk; c += blockDim.x) {  // one key block per thread: rows in flight
    const float4* row = reinterpret_cast<const float4*>(pk + c * D);
    float s = 0.f;
    for (int d4 = 0; d4 < D / 4; ++d4) {
      const float4 v = row[d4];
      s += v.x * qm[4 * d4] + v.y * qm[4 * d4 + 1] + v.z * qm[4 * d4 + 2] + v.w * qm[4 * d4 + 3];
    }
    s *= p.softmax_scale;
    x[c] = s;
    mx = fmaxf(mx, s);
  }
  mx = block_max(mx, red_f);  // also orders the x[] writes before the reads below
  double z = 0.0;
  for (int64_t c = threadIdx.x; c < NBk; c += blockDim.x) z += exp(static_cast<double>(x[c]) - mx);
  z = block_sum(z, red_d);
  double jsd = 0.0;
  const double eps = static_cast<double>(kJsdEps);
  const float* tv = vert + head * NBk;
  for (int64_t c = threadIdx.x; c < NBk; c += blockDim.x) {
    double pe = exp(static_cast<double>(x[c]) - mx) / z;
    double pt = static_cast<double>(tv[c]);
    pe = pe > eps ? pe : eps;
    pt = pt > eps ? pt : eps;
    const double mid = 0.5 * (pe + pt);
    jsd += 0.5 * pe * log(pe / mid) + 0.5 * pt * log(pt / mid);
  }
  jsd = block_sum(jsd, red_d);
  if (threadIdx.x == 0) query_aware[head] = sqrt(jsd > 0.0 ? jsd : 0.0) < plan.tau;
}

// Step 4: vertical columns (blockIdx.y == 0) and slash distance bins (1) of every head;
// query-aware heads keep only the min-budget ones (the reference's vertical_slash(None)).
__global__ void __launch_bounds__(kSelectThreads) vs_select_kernel(const SelectParams p, const SelectPlan plan,
                                                                   const float* vert, const float* slash,
                                                                   const bool* query_aware, uint32_t* cols,
                                                                   uint32_t* bins) {
  __shared__ RadixSmem sm;
  const int64_t head = blockIdx.x;
  const bool use_gamma = !query_aware[head];
  const float* scores = (blockIdx.y == 0 ? vert : slash) + head * p.num_k_blocks;
  uint32_t* words = (blockIdx.y == 0 ? cols : bins) + head * plan.cols_words;
  select_top(scores, static_cast<uint32_t>(p.num_k_blocks), use_gamma, p.gamma,
             static_cast<uint32_t>(plan.min_blocks), static_cast<uint32_t>(plan.max_blocks), words, sm);
}

// Step 5, per wave of heads [head0, head0 + heads_per_wave): pool(Q) of the query-aware ones.
// grid (NBq, heads_per_wave).
__global__ void pool_queries_kernel(const SelectParams p, const SelectPlan plan, int64_t head0,
                                    const bool* query_aware, float* pool_q) {
  const int64_t hw = blockIdx.y, head = head0 + hw, r = blockIdx.x;
  if (head >= p.batch * p.heads_q || !query_aware[head]) return;
  const int64_t b = head / p.heads_q, h = head - b * p.heads_q, bs = p.block_size;
  const int64_t row0 = r * bs;
  const int64_t count = (row0 + bs < p.seqlen_q ? row0 + bs : p.seqlen_q) - row0;
  const auto* q = static_cast<const uint16_t*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
  mean_rows(q, p.q_row_stride, row0, count, static_cast<int>(p.head_dim), p.is_bf16,
            pool_q + (hw * p.num_q_blocks + r) * p.head_dim);
}

// est[hw, r, c] = s pool(Q)[r] . pool(K)[c] for causal blocks, fp32 (64 x 64 tile per CTA,
// 256 threads, 4 x 4 outputs each). grid (ceil(NBk/64), ceil(NBq/64), heads_per_wave).
__global__ void __launch_bounds__(256) qa_logits_kernel(const SelectParams p, int64_t head0,
                                                        const bool* query_aware, const float* pool_q,
                                                        const float* pool_k, float* est) {
  __shared__ float As[32][65];
  __shared__ float Bs[32][65];
  const int64_t hw = blockIdx.z, head = head0 + hw;
  if (head >= p.batch * p.heads_q || !query_aware[head]) return;
  const int64_t b = head / p.heads_q, h = head - b * p.heads_q, hk = h / (p.heads_q / p.heads_kv);
  const int64_t NBq = p.num_q_blocks, NBk = p.num_k_blocks, D = p.head_dim;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * 64, c0 = static_cast<int64_t>(blockIdx.x) * 64;
  const int64_t r_last = r0 + 63 < NBq - 1 ? r0 + 63 : NBq - 1;
  if (c0 > last_causal_block_dev(r_last, p.seqlen_q, p.seqlen_k, p.block_size)) return;
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  const float* pq = pool_q + hw * NBq * D;
  const float* pk = pool_k + (b * p.heads_kv + hk) * NBk * D;
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
  for (int64_t d0 = 0; d0 < D; d0 += 32) {
    for (int idx = threadIdx.x; idx < 64 * 32; idx += blockDim.x) {
      const int rr = idx >> 5, dd = idx & 31;
      const int64_t r = r0 + rr, c = c0 + rr, d = d0 + dd;
      As[dd][rr] = (r < NBq && d < D) ? pq[r * D + d] : 0.f;
      Bs[dd][rr] = (c < NBk && d < D) ? pk[c * D + d] : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int dd = 0; dd < 32; ++dd) {
      float a[4], bb[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = As[dd][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) bb[j] = Bs[dd][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], bb[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t r = r0 + ty + 16 * i;
    if (r >= NBq) continue;
    const int64_t chi = last_causal_block_dev(r, p.seqlen_q, p.seqlen_k, p.block_size);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t c = c0 + tx + 16 * j;
      if (c <= chi) est[(hw * NBq + r) * NBk + c] = acc[i][j] * p.softmax_scale;
    }
  }
}

// In place: est[hw, r, :] = softmax over the causal blocks / NBq, zeros elsewhere (the
// reference's masked softmax, flattened over the head). grid (NBq, heads_per_wave), 128 threads.
__global__ void qa_softmax_kernel(const SelectParams p, int64_t head0, const bool* query_aware, float* est) {
  __shared__ double red_d[32];
  __shared__ float red_f[32];
  const int64_t hw = blockIdx.y, head = head0 + hw, r = blockIdx.x;
  if (head >= p.batch * p.heads_q || !query_aware[head]) return;
  const int64_t NBk = p.num_k_blocks;
  const int64_t chi = last_causal_block_dev(r, p.seqlen_q, p.seqlen_k, p.block_size);
  float* x = est + (hw * p.num_q_blocks + r) * NBk;
  float mx = -INFINITY;
  for (int64_t c = threadIdx.x; c <= chi; c += blockDim.x) mx = fmaxf(mx, x[c]);
  mx = block_max(mx, red_f);
  double z = 0.0;
  for (int64_t c = threadIdx.x; c <= chi; c += blockDim.x) z += exp(static_cast<double>(x[c]) - mx);
  z = block_sum(z, red_d);
  const double norm = 1.0 / (z * static_cast<double>(p.num_q_blocks));
  for (int64_t c = threadIdx.x; c < NBk; c += blockDim.x)
    x[c] = c <= chi ? static_cast<float>(exp(static_cast<double>(x[c]) - mx) * norm) : 0.f;
}

// The fewest estimated blocks reaching gamma (at most the causal ones), over the
// NBq * NBk flattened estimate of each head, by many CTAs per head: one launch per radix
// level (first by mass, then -- only when the budget cuts -- by count); every CTA adds its
// chunk's histogram to the head's global one and the last CTA to finish picks the digit
// and updates the head's state. A final launch writes the bitmask.
struct GridRadixState {
  uint32_t mode;  // kModeMass, kModeCount, kModeDone
  uint32_t prefix, pmask, above_cnt;
  unsigned long long above_mass;
  uint32_t K;     // target rank of the count descent
  uint32_t mark;  // when done: 0 none, 1 all, 2 by threshold
  uint32_t thr_bits, tie_cnt, take, tickets;
};
constexpr uint32_t kModeMass = 0, kModeCount = 1, kModeDone = 2;
constexpr uint32_t kGridChunk = 32768;  // estimate entries per CTA

__device__ __forceinline__ GridRadixState* radix_state(unsigned char* ws, int64_t hw) {
  return reinterpret_cast<GridRadixState*>(ws + hw * kRadixStateBytes);
}
__device__ __forceinline__ uint32_t* radix_global_hist(unsigned char* ws, int64_t hw) {  // [3][2048]
  return reinterpret_cast<uint32_t*>(ws + hw * kRadixStateBytes + 64);
}

// grid (ceil(n / kGridChunk), heads_per_wave), kSelectThreads threads.
__global__ void __launch_bounds__(kSelectThreads) qa_radix_level_kernel(const SelectParams p, const SelectPlan plan,
                                                                        int64_t head0, const bool* query_aware,
                                                                        const float* est, unsigned char* ws,
                                                                        int level, uint32_t want_mode) {
  __shared__ RadixSmem sm;
  __shared__ uint32_t is_last;
  constexpr int kShift[3] = {21, 10, 0};
  constexpr uint32_t kMask[3] = {0x7ffu, 0x7ffu, 0x3ffu};
  const int64_t hw = blockIdx.y, head = head0 + hw;
  if (head >= p.batch * p.heads_q || !query_aware[head]) return;
  GridRadixState* st = radix_state(ws, hw);
  uint32_t* gh = radix_global_hist(ws, hw);
  const uint32_t mode = st->mode;
  if (mode != want_mode) return;
  const uint32_t n = static_cast<uint32_t>(p.num_q_blocks * p.num_k_blocks);
  const uint32_t begin = blockIdx.x * kGridChunk, end = min(begin + kGridChunk, n);
  const float* x = est + hw * static_cast<int64_t>(n);
  const bool by_mass = mode == kModeMass;
  radix_histogram(x, begin, end, st->prefix, st->pmask, kShift[level], kMask[level], by_mass, sm);
  for (int b = threadIdx.x; b < kRadixBuckets; b += blockDim.x) {
    if (sm.cnt[b]) atomicAdd(gh + b, sm.cnt[b]);
    const uint32_t lo = sm.mlo[b];
    uint32_t hi = sm.mhi[b];
    if (lo) {
      const uint32_t old = atomicAdd(gh + kRadixBuckets + b, lo);
      if (old + lo < old) ++hi;
    }
    if (hi) atomicAdd(gh + 2 * kRadixBuckets + b, hi);
  }
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(&st->tickets, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  for (int b = threadIdx.x; b < kRadixBuckets; b += blockDim.x) {
    sm.cnt[b] = __ldcg(gh + b);
    sm.mlo[b] = __ldcg(gh + kRadixBuckets + b);
    sm.mhi[b] = __ldcg(gh + 2 * kRadixBuckets + b);
    gh[b] = gh[kRadixBuckets + b] = gh[2 * kRadixBuckets + b] = 0;  // for the next level
  }
  if (threadIdx.x == 0) sm.found = 0;
  __syncthreads();
  radix_find(by_mass, p.gamma, st->K, st->above_cnt, st->above_mass, sm);
  if (threadIdx.x != 0) return;
  st->tickets = 0;
  const uint32_t n_allowed = static_cast<uint32_t>(plan.n_allowed);
  auto done = [&](uint32_t mark, uint32_t thr, uint32_t tie, uint32_t take) {
    st->mark = mark;
    st->thr_bits = thr;
    st->tie_cnt = tie;
    st->take = take;
    st->mode = kModeDone;
  };
  auto start_count = [&](uint32_t K) {  // the top K by value, K = min(kg, causal entries)
    if (K == 0) return done(0, 0, 0, 0);
    if (K >= n) return done(1, 0, 0, 0);
    st->K = K;
    st->prefix = st->pmask = st->above_cnt = 0;
    st->above_mass = 0;
    st->mode = kModeCount;
  };
  if (!sm.found) return start_count(n < n_allowed ? n : n_allowed);  // mass never reaches gamma: kg = n
  const uint32_t prefix = st->prefix | (sm.bucket << kShift[level]);
  if (level < 2) {
    st->prefix = prefix;
    st->pmask |= kMask[level] << kShift[level];
    st->above_cnt = sm.above_cnt;
    st->above_mass = sm.above_mass;
    return;
  }
  if (!by_mass) return done(2, prefix, sm.bucket_cnt, st->K - sm.above_cnt);
  // Fewest t of the tied items with float(above + t v) >= gamma (monotone in t).
  const unsigned long long v = to_fixed(prefix);
  uint32_t lo = 1, hi = sm.bucket_cnt;
  while (lo < hi) {
    const uint32_t mid = lo + (hi - lo) / 2;
    if (fixed_to_float(sm.above_mass + v * mid) >= p.gamma) hi = mid; else lo = mid + 1;
  }
  const uint32_t kg = sm.above_cnt + lo;
  if (kg <= n_allowed) return done(2, prefix, sm.bucket_cnt, lo);
  start_count(n_allowed);
}

// Bitmask of the selection. grid (ceil(n / kGridChunk), heads_per_wave), kSelectThreads.
__global__ void __launch_bounds__(kSelectThreads) qa_mark_kernel(const SelectParams p, const SelectPlan plan,
                                                                 int64_t head0, const bool* query_aware,
                                                                 const float* est, unsigned char* ws, uint32_t* qa) {
  __shared__ RadixSmem sm;
  const int64_t hw = blockIdx.y, head = head0 + hw;
  if (head >= p.batch * p.heads_q || !query_aware[head]) return;
  const GridRadixState* st = radix_state(ws, hw);
  const uint32_t mark = st->mark, thr = st->thr_bits, take = st->take, tie = st->tie_cnt;
  const uint32_t n = static_cast<uint32_t>(p.num_q_blocks * p.num_k_blocks);
  const float* x = est + hw * static_cast<int64_t>(n);
  uint32_t* words = qa + head * plan.qa_words;
  if (mark == 2 && take < tie) {  // ties split at the threshold: rank them in index order (rare)
    if (blockIdx.x == 0) radix_mark(x, n, 2, Threshold{true, thr, 0, tie, take}, words, sm);
    return;
  }
  const uint32_t begin = blockIdx.x * kGridChunk, end = min(begin + kGridChunk, n);
  const uint32_t end_round = (end + 31) / 32 * 32;
  const int lane = threadIdx.x & 31;
  for (uint32_t base = begin + (threadIdx.x & ~31u); base < end_round; base += blockDim.x) {
    const uint32_t i = base + lane;
    const bool sel = i < end && (mark == 1 || (mark == 2 && item_bits(x[i]) >= thr));
    const uint32_t w = __ballot_sync(0xffffffffu, sel);
    if (lane == 0) words[base >> 5] = w;
  }
}

__device__ __forceinline__ bool any_bit(const uint32_t* words, int64_t a, int64_t b) {
  for (int64_t w = a >> 5; w <= (b >> 5); ++w) {
    uint32_t v = words[w];
    if (w == (a >> 5)) v &= ~0u << (a & 31);
    if (w == (b >> 5) && (b & 31) != 31) v &= (1u << ((b & 31) + 1)) - 1u;
    if (v) return true;
  }
  return false;
}

// Steps 4-7 together: kv_count [B, Hq, NBq], kv_index [B, Hq, NBq, NBk] (ascending, then
// zeros). One warp per query block; grid (ceil(NBq / 4), Hq, B), 128 threads.
__global__ void assemble_kernel(const SelectParams p, const SelectPlan plan, const uint32_t* cols,
                                const uint32_t* bins, const uint32_t* qa, bool all_causal) {
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kAssembleRowsPerCta + (threadIdx.x >> 5);
  if (r >= p.num_q_blocks) return;
  const int64_t h = blockIdx.y, b = blockIdx.z, head = b * p.heads_q + h;
  const int64_t bs = p.block_size, Nq = p.seqlen_q, Nk = p.seqlen_k, NBk = p.num_k_blocks;
  const int64_t lo = Nk - Nq + r * bs;
  const int64_t hi = Nk - Nq + (r * bs + bs < Nq ? r * bs + bs : Nq) - 1;
  const int64_t chi = hi / bs, clo = lo / bs;
  const int64_t row = head * p.num_q_blocks + r;
  int32_t* out = p.kv_index + row * NBk;
  int64_t count = 0;
  if (all_causal) {
    for (int64_t c = lane; c < NBk; c += 32) out[c] = c <= chi ? static_cast<int32_t>(c) : 0;
    count = chi + 1;
  } else {
    const uint32_t* cw = cols + head * plan.cols_words;
    const uint32_t* tw = bins + head * plan.cols_words;
    const uint32_t* qw = plan.any_query_aware ? qa + head * plan.qa_words : nullptr;
    for (int64_t c0 = 0; c0 <= chi; c0 += 32) {
      const int64_t c = c0 + lane;
      bool keep = false;
      if (c <= chi) {
        keep = c == 0 || c >= clo || ((cw[c >> 5] >> (c & 31)) & 1u);
        if (!keep && qw) {
          const int64_t f = r * NBk + c;
          keep = (qw[f >> 5] >> (f & 31)) & 1u;
        }
        if (!keep) {  // a selected distance in [lo - c bs - bs + 1, hi - c bs] (bins of bs)
          int64_t a = lo - c * bs - bs + 1, e = hi - c * bs;
          a = a > 0 ? a : 0;
          e = e < Nk - 1 ? e : Nk - 1;
          keep = a <= e && any_bit(tw, a / bs, e / bs);
        }
      }
      const uint32_t ballot = __ballot_sync(0xffffffffu, keep);
      if (keep) out[count + __popc(ballot & ((1u << lane) - 1u))] = static_cast<int32_t>(c);
      count += __popc(ballot);
    }
    for (int64_t j = count + lane; j < NBk; j += 32) out[j] = 0;
  }
  if (lane == 0) p.kv_count[row] = static_cast<int32_t>(count);
}

// ---------------------------------------------------------------------------------------
// Launchers.

inline cudaError_t launch_pool_keys(const SelectParams& p, float* pool_k, cudaStream_t s) {
  pool_keys_kernel<<<dim3(p.num_k_blocks, p.heads_kv, p.batch), kPoolThreads, 0, s>>>(p, pool_k);
  return cudaGetLastError();
}
inline cudaError_t launch_qhat_mean(const SelectParams& p, const SelectPlan& plan, float* out, cudaStream_t s) {
  qhat_mean_kernel<<<dim3(p.heads_q, p.batch), kPoolThreads, 0, s>>>(p, plan.rows, out);
  return cudaGetLastError();
}
inline cudaError_t launch_lse_combine(const SelectParams& p, const SelectPlan& plan, const SelectBuffers& w,
                                      cudaStream_t s) {
  const int64_t total = p.batch * p.heads_q * plan.rows;
  lse_combine_kernel<<<(total + 255) / 256, 256, 0, s>>>(w.part_max, w.part_sum, total, plan.rows,
                                                          plan.num_splits, w.lse2);
  return cudaGetLastError();
}
inline cudaError_t launch_jsd(const SelectParams& p, const SelectPlan& plan, const SelectBuffers& w,
                              cudaStream_t s) {
  jsd_kernel<<<dim3(p.heads_q, p.batch), 256, 0, s>>>(p, plan, w.pool_k, w.qhat_mean, w.vert, w.jsd_logits,
                                                       p.query_aware);
  return cudaGetLastError();
}
inline cudaError_t launch_vs_select(const SelectParams& p, const SelectPlan& plan, const SelectBuffers& w,
                                    cudaStream_t s) {
  vs_select_kernel<<<dim3(p.batch * p.heads_q, 2), kSelectThreads, 0, s>>>(p, plan, w.vert, w.slash,
                                                                            p.query_aware, w.cols, w.bins);
  return cudaGetLastError();
}
inline cudaError_t launch_pool_queries(const SelectParams& p, const SelectPlan& plan, const SelectBuffers& w,
                                       int64_t head0, cudaStream_t s) {
  pool_queries_kernel<<<dim3(p.num_q_blocks, plan.heads_per_wave), kPoolThreads, 0, s>>>(p, plan, head0, p.query_aware,
                                                                                 w.pool_q);
  return cudaGetLastError();
}
inline cudaError_t launch_qa_logits(const SelectParams& p, const SelectPlan& plan, const SelectBuffers& w,
                                    int64_t head0, cudaStream_t s) {
  dim3 grid((p.num_k_blocks + 63) / 64, (p.num_q_blocks + 63) / 64, plan.heads_per_wave);
  qa_logits_kernel<<<grid, 256, 0, s>>>(p, head0, p.query_aware, w.pool_q, w.pool_k, w.est);
  return cudaGetLastError();
}
inline cudaError_t launch_qa_softmax(const SelectParams& p, const SelectPlan& plan, const SelectBuffers& w,
                                     int64_t head0, cudaStream_t s) {
  qa_softmax_kernel<<<dim3(p.num_q_blocks, plan.heads_per_wave), 128, 0, s>>>(p, head0, p.query_aware, w.est);
  return cudaGetLastError();
}
inline cudaError_t launch_qa_radix_level(const SelectParams& p, const SelectPlan& plan, const SelectBuffers& w,
                                         int64_t head0, int level, uint32_t mode, cudaStream_t s) {
  const int64_t n = p.num_q_blocks * p.num_k_blocks;
  dim3 grid((n + kGridChunk - 1) / kGridChunk, plan.heads_per_wave);
  qa_radix_level_kernel<<<grid, kSelectThreads, 0, s>>>(p, plan, head0, p.query_aware, w.est, w.radix, level, mode);
  return cudaGetLastError();
}
inline cudaError_t launch_qa_mark(const SelectParams& p, const SelectPlan& plan, const SelectBuffers& w,
                                  int64_t head0, cudaStream_t s) {
  const int64_t n = p.num_q_blocks * p.num_k_blocks;
  dim3 grid((n + kGridChunk - 1) / kGridChunk, plan.heads_per_wave);
  qa_mark_kernel<<<grid, kSelectThreads, 0, s>>>(p, plan, head0, p.query_aware, w.est, w.radix, w.qa);
  return cudaGetLastError();
}
inline cudaError_t launch_assemble(const SelectParams& p, const SelectPlan& plan, const SelectBuffers* w,
                                   bool all_causal, cudaStream_t s) {
  dim3 grid((p.num_q_blocks + kAssembleRowsPerCta - 1) / kAssembleRowsPerCta, p.heads_q, p.batch);
  assemble_kernel<<<grid, 32 * kAssembleRowsPerCta, 0, s>>>(p, plan, w ? w->cols : nullptr,
                                                            w ? w->bins : nullptr, w ? w->qa : nullptr,
                                                            all_causal);
  return cudaGetLastError();
}

}  // namespace selection
}  // namespace flexprefill
