// The kernels of the CUDA select_blocks after the one-pass tensor-core estimate
// (rep_attention.cuh): the per-head finish (row LSE, vertical / slash mass, JSD decision,
// vertical-slash selection), the query-aware estimate and selection, and the final
// assembly into FlexAttention's BlockMask layout.
// Framework-free: raw pointers, SelectParams / SelectPlan, a stream; every launcher does
// one launch and returns cudaGetLastError().
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

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

// (mx, sum) += (M, T) for sums kept as sum * 2^mx: the larger reference stays; empty
// terms (T = 0) are skipped.
__device__ __forceinline__ void log2_sum_add(float& mx, float& sum, float M, float T) {
  if (T > 0.f) {
    if (M > mx) {
      sum = sum * exp2f(mx - M) + T;
      mx = M;
    } else {
      sum += T * exp2f(M - mx);
    }
  }
}

// Steps 2-3 from the rep kernel's records, many CTAs per head: grid (ceil(NBk /
// kRecBlocks), B * Hq), kRecThreads threads. Every CTA computes
//   (a) the row LSE from the per-split (reference, sum) pairs (the first CTA of a head
//       writes it, lse2 [B, Hq, m], log2 units);
//   (b) for its key blocks c the mass counted in H and in L, apart for the rows whose
//       position is in block q0 = floor(P0 / bs) (F = 0) and in block q0 + 1 (F = 1):
//       abcd[c] = (H F=0, H F=1, L F=0, L F=1); vertical mass vert[c] = their sum / m;
//   (c) the JSD logits s pool(K)[c] . mean(Q̂) of its key blocks.
// Every sum runs in a fixed order: the result is deterministic.
constexpr int kRecThreads = 256;
constexpr int kRecBlocks = 32;  // key blocks per CTA
__global__ void __launch_bounds__(kRecThreads) finish_records_kernel(const SelectParams p, const SelectPlan plan,
                                                                     const SelectBuffers w) {
  pdl_grid_sync();
  __shared__ float lse_s[128];
  __shared__ float qm[256];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  constexpr int nwarps = kRecThreads / 32;
  const int64_t head = blockIdx.y, b = head / p.heads_q, h = head - b * p.heads_q;
  const int64_t hk = h / (p.heads_q / p.heads_kv);
  const int m = static_cast<int>(plan.rows), D = static_cast<int>(p.head_dim);
  const int64_t NBk = p.num_k_blocks, bs = p.block_size;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kRecBlocks;
  const int64_t c1 = c0 + kRecBlocks < NBk ? c0 + kRecBlocks : NBk;
  const float* rec = w.rec + head * NBk * 3 * m;
  if (plan.rep_pools_q && !qa_one_cta(p)) {
    // qa_pool's other duty when the rep kernel wrote pool(Q) (one wave, slot = head): clear
    // the head's query-aware bitmask words and its radix state for the multi-CTA selection.
    const int64_t first = static_cast<int64_t>(blockIdx.x) * kRecThreads + tid;
    const int64_t stride = static_cast<int64_t>(gridDim.x) * kRecThreads;
    for (int64_t i = first; i < plan.qa_words; i += stride) w.qa[head * plan.qa_words + i] = 0u;
    uint32_t* rs = reinterpret_cast<uint32_t*>(w.radix + head * kRadixStateBytes);
    for (int64_t i = first; i < static_cast<int64_t>(kRadixStateBytes / 4); i += stride) rs[i] = 0u;
  }

  // (a) thread -> row i = tid % m and splits g, g + ng, ... (g = tid / m, ng = kRecThreads / m;
  // eight loads in flight); online max / sum, then the ng partials in a fixed order.
  {
    __shared__ float part_m[kRecThreads], part_s[kRecThreads];
    const int i = tid % m, g = tid / m, ng = kRecThreads / m;
    const int64_t S = plan.num_splits;
    const float* pr = w.part_ref + head * S * m + i;
    const float* ps = w.part_sum + head * S * m + i;
    float mx = -INFINITY, sum = 0.f;
    constexpr int kBatch = 8;
    for (int64_t sp0 = g; sp0 < S; sp0 += kBatch * ng) {
      float rv[kBatch], sv[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int64_t sp = sp0 + u * ng;
        rv[u] = sp < S ? pr[sp * m] : 0.f;
        sv[u] = sp < S ? ps[sp * m] : 0.f;
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u) log2_sum_add(mx, sum, rv[u], sv[u]);
    }
    part_m[tid] = mx;
    part_s[tid] = sum;
    for (int d = tid; d < D; d += kRecThreads) qm[d] = w.qhat_mean[head * D + d];
    __syncthreads();
    if (tid < m) {
      float M = -INFINITY, T = 0.f;
      for (int gg = 0; gg < ng; ++gg) log2_sum_add(M, T, part_m[gg * m + tid], part_s[gg * m + tid]);
      const float l = M + log2f(T);  // every row sees key 0: T > 0
      lse_s[tid] = l;
      if (blockIdx.x == 0) w.lse2[head * m + tid] = l;
    }
    __syncthreads();
  }

  // (b) half warp -> key block; lane -> rows hl, hl + 16, ... (all loads issued first).
  const int64_t P0 = p.seqlen_k - m, q0 = P0 / bs;
  const float inv_m = 1.f / static_cast<float>(m);  // m is a power of two: exact
  float4* abcd = reinterpret_cast<float4*>(w.abcd) + head * NBk;
  float* vert = w.vert + head * NBk;
  {
    const int half = lane >> 4, hl = lane & 15;
    for (int64_t cb = c0 + 2 * warp; cb < c1; cb += 2 * nwarps) {
      const int64_t c = cb + half;
      float a0 = 0.f, a1 = 0.f, l0 = 0.f, l1 = 0.f;
      if (c < c1) {
        const float* r = rec + c * 3 * m;
        float rm[8], rh[8], rl[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const int i = hl + 16 * j;
          if (i < m) {
            rm[j] = r[i];
            rh[j] = r[m + i];
            rl[j] = r[2 * m + i];
          }
        }
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const int i = hl + 16 * j;
          if (i < m) {
            const float e = exp2f(rm[j] - lse_s[i]);
            const float wh = rh[j] * e, wl = rl[j] * e;
            if ((P0 + i) / bs > q0) {
              a1 += wh;
              l1 += wl;
            } else {
              a0 += wh;
              l0 += wl;
            }
          }
        }
      }
#pragma unroll
      for (int o = 8; o >= 1; o >>= 1) {
        a0 += __shfl_xor_sync(0xffffffffu, a0, o);
        a1 += __shfl_xor_sync(0xffffffffu, a1, o);
        l0 += __shfl_xor_sync(0xffffffffu, l0, o);
        l1 += __shfl_xor_sync(0xffffffffu, l1, o);
      }
      if (hl == 0 && c < c1) {
        abcd[c] = make_float4(a0, a1, l0, l1);
        vert[c] = ((a0 + a1) + (l0 + l1)) * inv_m;
      }
    }
  }

  // (c) warp -> key block; lane -> float4 chunks lane, lane + 32, ... of the pool(K) row.
  const float* pk = w.pool_k + (b * p.heads_kv + hk) * NBk * D;
  float* x = w.jsd_logits + head * NBk;
  for (int64_t c = c0 + warp; c < c1; c += nwarps) {
    const float4* row = reinterpret_cast<const float4*>(pk + c * D);
    float s = 0.f;
    for (int d4 = lane; d4 < D / 4; d4 += 32) {
      const float4 v = row[d4];
      s += v.x * qm[4 * d4] + v.y * qm[4 * d4 + 1] + v.z * qm[4 * d4 + 2] + v.w * qm[4 * d4 + 3];
    }
    s = warp_sum(s);
    if (lane == 0) x[c] = s * p.softmax_scale;
  }
}

// Steps 3-4 per head after finish_records_kernel, one CTA per head (grid B * Hq, kSelectThreads):
//   (c) slash bin t: keys of block c seen from a row with F in bin q0 + F - c (H) and the bin
//       below (L): slash[t] = (A[q0-t] + B[q0+1-t] + C[q0-t-1] + D[q0-t]) / m;
//   (d) step 3: query_aware = sqrt(JSD(softmax(s pool(K) mean(Q̂)) || vert)) < tau (double);
//   (e) step 4: the vertical columns and slash bins (query-aware heads: the min-budget ones).
// Every sum runs in a fixed order: the result is deterministic. `part`: kFinishAll, or
// kFinishDecide ((c), (d)) and then kFinishSelect ((e), from query_aware in global memory),
// so that (e) can run beside the query-aware estimate, which needs only (d).
constexpr int kFinishAll = 0, kFinishDecide = 1, kFinishSelect = 2;
__global__ void __launch_bounds__(kSelectThreads) finish_kernel(const SelectParams p, const SelectPlan plan,
                                                                const SelectBuffers w, int part) {
  pdl_grid_sync();
  __shared__ union SelSmem {
    RadixSmem radix;
    RankSmem rank;
  } sel;
  __shared__ double red_d[32];
  __shared__ float red_f[32];
  const int tid = threadIdx.x, nthreads = blockDim.x;
  const int64_t head = blockIdx.x;
  const int m = static_cast<int>(plan.rows);
  const int64_t NBk = p.num_k_blocks, bs = p.block_size;
  const int64_t P0 = p.seqlen_k - m, q0 = P0 / bs;
  const float inv_m = 1.f / static_cast<float>(m);
  const float4* abcd = reinterpret_cast<const float4*>(w.abcd) + head * NBk;
  const float* vert = w.vert + head * NBk;

  float* slash = w.slash + head * NBk;
  bool query_aware;
  if (part == kFinishSelect) {
    if (plan.keep_all) return;
    query_aware = p.query_aware[head];
  } else {
    // (c)
    for (int64_t t = tid; t < NBk; t += nthreads) {
      float s = 0.f;
      if (q0 - t >= 0 && q0 - t < NBk) s += abcd[q0 - t].x;
      if (q0 + 1 - t >= 0 && q0 + 1 - t < NBk) s += abcd[q0 + 1 - t].y;
      if (q0 - t - 1 >= 0 && q0 - t - 1 < NBk) s += abcd[q0 - t - 1].z;
      if (q0 - t >= 0 && q0 - t < NBk) s += abcd[q0 - t].w;
      slash[t] = s * inv_m;
    }

    // (d)
    const float* x = w.jsd_logits + head * NBk;
    float mx = -INFINITY;
    for (int64_t c = tid; c < NBk; c += nthreads) mx = fmaxf(mx, x[c]);
    mx = block_max(mx, red_f);  // also orders the x[], vert[], slash[] writes before the reads below
    double z = 0.0;
    for (int64_t c = tid; c < NBk; c += nthreads) z += exp(static_cast<double>(x[c]) - mx);
    z = block_sum(z, red_d);
    double jsd = 0.0;
    const double eps = static_cast<double>(kJsdEps);
    for (int64_t c = tid; c < NBk; c += nthreads) {
      double pe = exp(static_cast<double>(x[c]) - mx) / z;
      double pt = static_cast<double>(vert[c]);
      pe = pe > eps ? pe : eps;
      pt = pt > eps ? pt : eps;
      const double mid = 0.5 * (pe + pt);
      jsd += 0.5 * pe * log(pe / mid) + 0.5 * pt * log(pt / mid);
    }
    jsd = block_sum(jsd, red_d);  // every thread gets the same value
    query_aware = sqrt(jsd > 0.0 ? jsd : 0.0) < plan.tau;
    if (tid == 0) p.query_aware[head] = query_aware;
    if (plan.keep_all || part == kFinishDecide) return;
  }

  // (e)
  const uint32_t n = static_cast<uint32_t>(NBk), kmin = static_cast<uint32_t>(plan.min_blocks),
                 kmax = static_cast<uint32_t>(plan.max_blocks);
  uint32_t* cols = w.cols + head * plan.cols_words;
  uint32_t* bins = w.bins + head * plan.cols_words;
  if (n <= kRankMax) {
    rank_select(vert, n, !query_aware, p.gamma, kmin, kmax, cols, sel.rank);
    rank_select(slash, n, !query_aware, p.gamma, kmin, kmax, bins, sel.rank);
  } else {
    select_top(vert, n, !query_aware, p.gamma, kmin, kmax, cols, sel.radix);
    __syncthreads();
    select_top(slash, n, !query_aware, p.gamma, kmin, kmax, bins, sel.radix);
  }
}

// Step 4 (finish_kernel's (e)) for short score arrays (NBk <= kWarpSelectMax), beside step 5:
// one warp per array (vertical columns or slash bins of a head), kWarpSelectCtas CTAs in all,
// launched on the main stream right after the first query-aware estimate with programmatic
// dependent launch. The estimate lets its dependents launch as soon as each of its CTAs has
// started, so this kernel's CTAs are scheduled after every estimate CTA (one per SM) and take
// SMs the estimate leaves free, instead of racing it for SMs as a side-stream kernel did (one
// CTA per head there: ~28 estimate CTAs waited behind it in about half the calls). Its inputs
// come from the decision kernel, complete before any estimate CTA passed its own wait; it
// waits for the estimate only at its end, so that the kernels after it, which wait for it,
// see the estimate complete too (without PDL, before sm_90, it simply runs after the
// estimate). The same rule and result as rank_select: the warp sorts the value bits
// descending in registers (bitonic network; lane l holds sorted positions 8 l .. 8 l + 7),
// sums them in that order in the 62-bit fixed point for kg, reads the K-th value T and takes
// the items above T and the first K - #{above T} items equal to T in index order (item
// 32 u + l is lane l's u-th; bitmask word u is the warp's ballot over u). Zero pads sort last
// and add no mass. grid kWarpSelectCtas (or fewer), 1024 threads.
constexpr uint32_t kWarpSelectMax = 256;
constexpr int kWarpSelectCtas = 2;
constexpr int kWarpSelectThreads = 1024;

// Sorts the 256 values v (lane l holds positions 8 l .. 8 l + 7) descending: bitonic merges
// of runs k = 2 .. 256, partner distance j within a lane's registers (j < 8) or across
// lanes (j >= 8: lane ^ j / 8, same register). A pair's lower position keeps the larger
// value in runs that end descending (position & k == 0), the smaller one otherwise.
__device__ __forceinline__ void warp_sort_desc_256(uint32_t (&v)[8], int lane) {
#pragma unroll
  for (int k = 2; k <= 256; k <<= 1) {
#pragma unroll
    for (int j = k >> 1; j > 0; j >>= 1) {
      if (j >= 8) {
        const int lj = j >> 3;
        const bool desc = ((lane * 8) & k) == 0, lower = (lane & lj) == 0;
#pragma unroll
        for (int r = 0; r < 8; ++r) {
          const uint32_t o = __shfl_xor_sync(0xffffffffu, v[r], lj);
          v[r] = lower == desc ? max(v[r], o) : min(v[r], o);
        }
      } else {
#pragma unroll
        for (int r = 0; r < 8; ++r) {
          if (r & j) continue;
          const bool desc = k >= 8 ? ((lane * 8) & k) == 0 : (r & k) == 0;
          const uint32_t hi = max(v[r], v[r | j]), lo = min(v[r], v[r | j]);
          v[r] = desc ? hi : lo;
          v[r | j] = desc ? lo : hi;
        }
      }
    }
  }
}

__global__ void __launch_bounds__(kWarpSelectThreads) select_warps_kernel(const SelectParams p,
                                                                         const SelectPlan plan,
                                                                         const SelectBuffers w) {
  pdl_launch_dependents();
  constexpr int kPerLane = kWarpSelectMax / 32;
  const int lane = threadIdx.x & 31;
  const uint32_t n = static_cast<uint32_t>(p.num_k_blocks), kmin = static_cast<uint32_t>(plan.min_blocks),
                 kmax = static_cast<uint32_t>(plan.max_blocks);
  const int64_t arrays = 2 * p.batch * p.heads_q, warps = static_cast<int64_t>(gridDim.x) * (blockDim.x >> 5);
  for (int64_t a = blockIdx.x * static_cast<int64_t>(blockDim.x >> 5) + (threadIdx.x >> 5); a < arrays; a += warps) {
    const int64_t head = a >> 1;
    const bool slash = a & 1;
    const float* x = (slash ? w.slash : w.vert) + head * p.num_k_blocks;
    uint32_t* words = (slash ? w.bins : w.cols) + head * plan.cols_words;
    const bool use_gamma = !p.query_aware[head];
    uint32_t bits[kPerLane], sorted[kPerLane];
#pragma unroll
    for (int u = 0; u < kPerLane; ++u) {
      const uint32_t i = 32 * u + lane;
      bits[u] = i < n ? item_bits(x[i]) : 0u;
      sorted[u] = bits[u];  // (any placement: the network sorts it)
    }
    warp_sort_desc_256(sorted, lane);
    uint32_t kg = 0;  // (0: no gamma rule)
    if (use_gamma) {  // kg = 1 + the first position where the running mass reaches gamma, else n
      unsigned long long local = 0;
#pragma unroll
      for (int r = 0; r < kPerLane; ++r) local += to_fixed(sorted[r]);
      unsigned long long scan = local;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const unsigned long long v = __shfl_up_sync(0xffffffffu, scan, o);
        if (lane >= o) scan += v;
      }
      unsigned long long cum = scan - local;
      uint32_t own = n;
#pragma unroll
      for (int r = 0; r < kPerLane; ++r) {
        cum += to_fixed(sorted[r]);
        if (own == n && fixed_to_float(cum) >= p.gamma) own = kPerLane * lane + r + 1;
      }
      kg = __reduce_min_sync(0xffffffffu, own);
    }
    const uint32_t K = budget_count(kg, kmin, kmax, n);
    // T = the value at sorted position K - 1; take the items above it and the first
    // K - above of those equal to it, in index order.
    uint32_t t_own = 0;
#pragma unroll
    for (int r = 0; r < kPerLane; ++r)
      if (K > 0 && kPerLane * lane + r == K - 1) t_own = sorted[r];
    const uint32_t T = __shfl_sync(0xffffffffu, t_own, K > 0 ? static_cast<int>((K - 1) / kPerLane) : 0);
    uint32_t above = 0;
#pragma unroll
    for (int r = 0; r < kPerLane; ++r) above += sorted[r] > T ? 1u : 0u;
    above = __reduce_add_sync(0xffffffffu, above);
    const uint32_t take = K - above;  // K > 0: at least one item equals T (K <= n)
    uint32_t eq_before = 0;           // items equal to T at lower indices
    const uint32_t lt_mask = (1u << lane) - 1u;
#pragma unroll
    for (int u = 0; u < kPerLane; ++u) {
      const bool valid = 32u * u + lane < n;
      const uint32_t eq = __ballot_sync(0xffffffffu, valid && bits[u] == T);
      const bool sel = K > 0 && valid && (bits[u] > T || (bits[u] == T && eq_before + __popc(eq & lt_mask) < take));
      const uint32_t word = __ballot_sync(0xffffffffu, sel);
      eq_before += __popc(eq);
      if (lane == 0 && 32u * u < n) words[u] = word;
    }
  }
  pdl_wait();  // complete only after the estimate (see above)
}

// The query-aware heads of a wave run on the lowest CTA indices: CTA row y of a step-5 kernel
// serves the wave's y-th query-aware head (heads in index order), so their CTAs spread over
// the SMs first instead of sharing SMs with CTAs that exit at once. Returns that head's
// index in the wave (hw), or -1 past the wave's query-aware heads. Every thread of the CTA
// calls it (one barrier).
__device__ __forceinline__ int64_t query_aware_slot(const SelectParams& p, const bool* query_aware, int64_t head0,
                                                    int64_t heads_per_wave, int64_t rank) {
  __shared__ int64_t slot;
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    const int64_t n = min(heads_per_wave, p.batch * p.heads_q - head0);
    int64_t seen = 0, hit = -1;
    for (int64_t base = 0; base < n && hit < 0; base += 32) {
      const unsigned m = __ballot_sync(0xffffffffu, base + lane < n && query_aware[head0 + base + lane]);
      const int c = __popc(m);
      if (rank < seen + c) hit = base + __fns(m, 0, static_cast<int>(rank - seen) + 1);
      seen += c;
    }
    if (lane == 0) slot = hit;
  }
  __syncthreads();
  return slot;
}

// Step 5's pool(Q) for the query-aware heads of a wave [head0, head0 + heads_per_wave):
// poolq[hw, r, :] = fp32 mean of the queries of block r. Thread -> 16-byte chunk of a row
// and a row group (rows gi, gi + groups, ...: 8 loads in flight), then the groups
// combine in shared memory (fixed order). grid (NBq, heads_per_wave), kQaPoolThreads.
// With qa_zero (the multi-CTA selection) the CTAs of a head also clear its bitmask words
// (qa_words) and its radix state in `radix` (every head of the wave, query-aware or not).
constexpr int kQaPoolThreads = 256;
template <bool kBf16>
__global__ void __launch_bounds__(kQaPoolThreads) qa_pool_kernel(const SelectParams p, int64_t head0,
                                                                 const bool* query_aware, float* poolq,
                                                                 uint32_t* qa_zero, int64_t qa_words,
                                                                 unsigned char* radix) {
  pdl_grid_sync();
  __shared__ float part[kQaPoolThreads * 8];  // [groups][D]
  if (qa_zero != nullptr && head0 + blockIdx.y < p.batch * p.heads_q) {  // by wave index, every head
    const int64_t zh = head0 + blockIdx.y;
    const int64_t first = static_cast<int64_t>(blockIdx.x) * kQaPoolThreads + threadIdx.x;
    const int64_t stride = static_cast<int64_t>(gridDim.x) * kQaPoolThreads;
    for (int64_t i = first; i < qa_words; i += stride) qa_zero[zh * qa_words + i] = 0u;
    uint32_t* rs = reinterpret_cast<uint32_t*>(radix + blockIdx.y * kRadixStateBytes);
    for (int64_t i = first; i < static_cast<int64_t>(kRadixStateBytes / 4); i += stride) rs[i] = 0u;
  }
  const int64_t hw = query_aware_slot(p, query_aware, head0, gridDim.y, blockIdx.y), head = head0 + hw;
  if (hw < 0) return;
  const int64_t b = head / p.heads_q, h = head - b * p.heads_q, r = blockIdx.x, bs = p.block_size;
  const int D = static_cast<int>(p.head_dim), chunks = D / 8, groups = kQaPoolThreads / chunks;
  const int tid = threadIdx.x, c8 = tid % chunks, gi = tid / chunks;
  const int64_t row0 = r * bs;
  const int count = static_cast<int>((row0 + bs < p.seqlen_q ? row0 + bs : p.seqlen_q) - row0);
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  auto add = [&](const uint4& v) {
    const uint32_t w4[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float2 f = unpack2<kBf16>(w4[e]);
      acc[2 * e] += f.x;
      acc[2 * e + 1] += f.y;
    }
  };
  if (gi < groups) {
    const auto* src = static_cast<const uint16_t*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride +
                      (row0 + gi) * p.q_row_stride + c8 * 8;
    const int64_t step = groups * p.q_row_stride;
    for (int i = gi; i < count; i += 8 * groups, src += 8 * step) {  // rows past count load zeros
      uint4 v[8];
#pragma unroll
      for (int u = 0; u < 8; ++u)
        v[u] = i + u * groups < count ? __ldg(reinterpret_cast<const uint4*>(src + u * step)) : make_uint4(0, 0, 0, 0);
#pragma unroll
      for (int u = 0; u < 8; ++u) add(v[u]);
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) part[gi * D + c8 * 8 + e] = acc[e];
  }
  __syncthreads();
  float* out = poolq + (hw * p.num_q_blocks + r) * D;
  for (int d = tid; d < D; d += kQaPoolThreads) {
    float s = 0.f;
    for (int g = 0; g < groups; ++g) s += part[g * D + d];
    out[d] = s / static_cast<float>(count);
  }
}

struct GridRadixState {
  uint32_t mode;  // kModeMass, kModeCount, kModeDone
  uint32_t prefix, pmask, above_cnt;
  unsigned long long above_mass;
  uint32_t K;     // target rank of the count descent
  uint32_t mark;  // when done: 0 none, 1 all, 2 by threshold
  uint32_t thr_bits, tie_cnt, take, tickets;
  uint32_t mark_ticket;  // qa_mark with ties split: chunks in the order their CTAs start
};
constexpr uint32_t kModeMass = 0, kModeCount = 1, kModeDone = 2;

__device__ __forceinline__ GridRadixState* radix_state(unsigned char* ws, int64_t hw) {
  return reinterpret_cast<GridRadixState*>(ws + hw * kRadixStateBytes);
}
__device__ __forceinline__ uint32_t* radix_global_hist(unsigned char* ws, int64_t hw) {  // [3][2048]
  return reinterpret_cast<uint32_t*>(ws + hw * kRadixStateBytes + 64);
}

// Adds the CTA's histogram to the head's global one; true in the last CTA of the head to do
// so (`ctas` of them), which then holds the complete histogram in sm (and the global one is
// zeroed for the next level).
__device__ inline bool radix_publish(RadixSmem& sm, GridRadixState* st, uint32_t* gh, uint32_t ctas,
                                     uint32_t& is_last) {
  for (int b = threadIdx.x; b < kRadixBuckets; b += blockDim.x) {
    if (sm.cnt[b]) atomicAdd(gh + b, sm.cnt[b]);
    atomic_add_u64_split(gh + kRadixBuckets + b, gh + 2 * kRadixBuckets + b,
                         (static_cast<unsigned long long>(sm.mhi[b]) << 32) | sm.mlo[b]);
  }
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(&st->tickets, 1u) == ctas - 1;
  __syncthreads();
  if (!is_last) return false;
  __threadfence();
  for (int b = threadIdx.x; b < kRadixBuckets; b += blockDim.x) {
    sm.cnt[b] = __ldcg(gh + b);
    sm.mlo[b] = __ldcg(gh + kRadixBuckets + b);
    sm.mhi[b] = __ldcg(gh + 2 * kRadixBuckets + b);
    gh[b] = gh[kRadixBuckets + b] = gh[2 * kRadixBuckets + b] = 0;  // for the next level
  }
  if (threadIdx.x == 0) sm.found = 0;
  __syncthreads();
  return true;
}

// The last CTA of a level: picks the digit where the mass crosses gamma and updates the
// head's state (next level, or done with the threshold and the number of tied items taken).
__device__ inline void radix_decide(RadixSmem& sm, GridRadixState* st, int level, uint32_t n, uint32_t n_allowed,
                                    float gamma) {
  constexpr int kShift[3] = {21, 10, 0};
  constexpr uint32_t kMask[3] = {0x7ffu, 0x7ffu, 0x3ffu};
  radix_find(true, gamma, 0u, st->above_cnt, st->above_mass, sm);
  if (threadIdx.x != 0) return;
  st->tickets = 0;
  auto done = [&](uint32_t mark, uint32_t thr, uint32_t tie, uint32_t take) {
    st->mark = mark;
    st->thr_bits = thr;
    st->tie_cnt = tie;
    st->take = take;
    st->mode = kModeDone;
  };
  auto start_count = [&](uint32_t K) {  // the top K by value, K = min(kg, causal entries): qa_mark
    if (K == 0) return done(0, 0, 0, 0);
    if (K >= n) return done(1, 0, 0, 0);
    st->K = K;
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
  // Fewest t of the tied items with float(above + t v) >= gamma (monotone in t).
  const unsigned long long v = to_fixed(prefix);
  uint32_t lo = 1, hi = sm.bucket_cnt;
  while (lo < hi) {
    const uint32_t mid = lo + (hi - lo) / 2;
    if (fixed_to_float(sm.above_mass + v * mid) >= gamma) hi = mid; else lo = mid + 1;
  }
  const uint32_t kg = sm.above_cnt + lo;
  if (kg <= n_allowed) return done(2, prefix, sm.bucket_cnt, lo);
  start_count(n_allowed);
}

// Step 5's estimate, per wave of heads, for the query-aware heads: est[hw, r, :] =
// softmax over the causal key blocks of s pool(Q)[r] . pool(K) / NBq, zeros elsewhere (the
// reference's masked softmax, flattened over the head). One CTA = kQaRows query blocks of
// one head: a register-tiled fp32 product against the causal key blocks, kQaKeys of them at
// a time. Warp w owns the rows 8 (w % 4) .. + 8 and the keys 64 (w / 4) + lane + 32 j
// (j < 2) of a chunk; D passes through shared memory in slices of kQaSlice values (the
// next slice loads into registers while the current one is used), each dot product summed
// over d in order. Then the row softmax: float exponentials, double sums in a fixed order
// (a thread's keys in order, the lanes, then the row's four warps). When the CTA's causal
// key blocks fit one chunk the logits stay in registers; otherwise they pass through est.
// With `radix` (the multi-CTA selection) the CTAs also run level 0 of its radix descent:
// each adds the histogram of its rows to the head's, and the last one picks the digit
// (qa_radix_level_kernel, levels 1 and 2, follows).
// grid (ceil(NBq / kQaRows), heads_per_wave), kQaThreads threads.
constexpr int kQaRows = 32, kQaKeys = 256, kQaSlice = 32, kQaThreads = 512;
constexpr int kQaKeyWarps = kQaThreads / 32 / 4, kQaKeysPerLane = kQaKeys / 32 / kQaKeyWarps;
constexpr int kQaStride = kQaSlice + 4;  // padded rows: 16-byte reads of 8 rows in a row hit distinct banks
__global__ void __launch_bounds__(kQaThreads, 1) qa_estimate_kernel(const SelectParams p, int64_t head0,
                                                                  const bool* query_aware, const float* pool_k,
                                                                  const float* poolq, float* est,
                                                                  unsigned char* radix, uint32_t n_allowed) {
  pdl_grid_sync();
  __shared__ __align__(16) float ks[kQaKeys][kQaStride];  // a slice of the chunk's pooled keys; then RadixSmem
  __shared__ __align__(16) float qs[kQaRows][kQaStride];  // the same slice of the pooled queries
  __shared__ float red_f[kQaRows][kQaKeyWarps];
  __shared__ double red_d[kQaRows][kQaKeyWarps];
  __shared__ uint32_t is_last;
  static_assert(sizeof(ks) >= sizeof(RadixSmem), "the radix histogram reuses the key slices' memory");
  const int64_t hw = query_aware_slot(p, query_aware, head0, gridDim.y, blockIdx.y), head = head0 + hw;
  if (hw < 0) return;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, kw = warp >> 2, row0 = 8 * (warp & 3);
  const int key0 = kQaKeysPerLane * 32 * kw + lane;  // the thread's first key of a chunk (then + 32 j)
  const int64_t b = head / p.heads_q, h = head - b * p.heads_q, hk = h / (p.heads_q / p.heads_kv);
  const int64_t NBq = p.num_q_blocks, NBk = p.num_k_blocks, bs = p.block_size;
  const int D = static_cast<int>(p.head_dim);
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kQaRows;
  const int nrows = static_cast<int>(NBq - r0 < kQaRows ? NBq - r0 : kQaRows);
  // Last causal key block of each of the warp's rows (-1: no such row): r + first for a whole
  // block r (first = the last causal block of row block 0), capped by that of the last row.
  const int first = static_cast<int>(last_causal_block_dev(0, p.seqlen_q, p.seqlen_k, bs));
  const int last = static_cast<int>(last_causal_block_dev(NBq - 1, p.seqlen_q, p.seqlen_k, bs));
  int chi[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) chi[i] = row0 + i < nrows ? min(static_cast<int>(r0) + row0 + i + first, last) : -1;
  const int chi_max = min(static_cast<int>(r0) + nrows - 1 + first, last);
  const int nchunks = chi_max / kQaKeys + 1;
  const bool in_regs = nchunks == 1;
  const float* pk = pool_k + (b * p.heads_kv + hk) * NBk * D;
  const float* pq = poolq + (hw * NBq + r0) * D;
  float* e0 = est + (hw * NBq + r0 + row0) * NBk;  // the warp's first row
  const float scale_log2 = p.softmax_scale * 1.4426950408889634f;  // logits in log2 units

  // Slice loads: keys (c0 + f / 8, values d0 + 4 (f % 8)) for f = tid + kQaThreads u, and
  // query row tid / 8 (the first 256 threads); zeros past chi_max and past D.
  constexpr int kKeyF4 = kQaKeys * kQaSlice / 4 / kQaThreads;
  constexpr int kQF4 = kQaRows * kQaSlice / 4;
  float4 kreg[kKeyF4], qreg;
  auto load = [&](int c0, int d0) {
#pragma unroll
    for (int u = 0; u < kKeyF4; ++u) {
      const int f = tid + kQaThreads * u, d = d0 + 4 * (f & 7), c = c0 + (f >> 3);
      kreg[u] = c <= chi_max && d < D ? __ldg(reinterpret_cast<const float4*>(pk + static_cast<int64_t>(c) * D + d))
                                      : make_float4(0.f, 0.f, 0.f, 0.f);
    }
    const int qr = tid >> 3, d = d0 + 4 * (tid & 7);
    qreg = tid < kQF4 && qr < nrows && d < D ? *reinterpret_cast<const float4*>(pq + qr * D + d)
                                             : make_float4(0.f, 0.f, 0.f, 0.f);
  };
  auto store = [&]() {
#pragma unroll
    for (int u = 0; u < kKeyF4; ++u) {
      const int f = tid + kQaThreads * u;
      *reinterpret_cast<float4*>(&ks[f >> 3][4 * (f & 7)]) = kreg[u];
    }
    if (tid < kQF4) *reinterpret_cast<float4*>(&qs[tid >> 3][4 * (tid & 7)]) = qreg;
  };

  float acc[8][kQaKeysPerLane], mx[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) mx[i] = -INFINITY;
  for (int ch = 0; ch < nchunks; ++ch) {
    const int c0 = ch * kQaKeys;
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < kQaKeysPerLane; ++j) acc[i][j] = 0.f;
    load(c0, 0);
    for (int d0 = 0; d0 < D; d0 += kQaSlice) {
      __syncthreads();  // the previous slice's readers are done
      store();
      __syncthreads();
      if (d0 + kQaSlice < D) load(c0, d0 + kQaSlice);
#pragma unroll
      for (int d4 = 0; d4 < kQaSlice / 4; ++d4) {
        float4 kv[kQaKeysPerLane];
#pragma unroll
        for (int j = 0; j < kQaKeysPerLane; ++j) kv[j] = *reinterpret_cast<const float4*>(&ks[key0 + 32 * j][4 * d4]);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const float4 qv = *reinterpret_cast<const float4*>(&qs[row0 + i][4 * d4]);
#pragma unroll
          for (int j = 0; j < kQaKeysPerLane; ++j) {
            acc[i][j] = fmaf(qv.x, kv[j].x, acc[i][j]);
            acc[i][j] = fmaf(qv.y, kv[j].y, acc[i][j]);
            acc[i][j] = fmaf(qv.z, kv[j].z, acc[i][j]);
            acc[i][j] = fmaf(qv.w, kv[j].w, acc[i][j]);
          }
        }
      }
    }
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < kQaKeysPerLane; ++j) {
        const int c = c0 + key0 + 32 * j;
        acc[i][j] *= scale_log2;
        if (c <= chi[i]) {
          mx[i] = fmaxf(mx[i], acc[i][j]);
          if (!in_regs) e0[i * NBk + c] = acc[i][j];
        }
      }
  }
  // Row maxima over the row's warps.
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const float v = warp_max(mx[i]);
    if (lane == 0) red_f[row0 + i][kw] = v;
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    mx[i] = red_f[row0 + i][0];
    for (int w = 1; w < kQaKeyWarps; ++w) mx[i] = fmaxf(mx[i], red_f[row0 + i][w]);
  }
  // Exponentials (each thread rereads only what it wrote) and their sums.
  double z[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) z[i] = 0.0;
  for (int ch = 0; ch < nchunks; ++ch)
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < kQaKeysPerLane; ++j) {
        const int c = ch * kQaKeys + key0 + 32 * j;
        if (c <= chi[i]) {
          const float ex = exp2f((in_regs ? acc[i][j] : e0[i * NBk + c]) - mx[i]);
          if (in_regs) acc[i][j] = ex; else e0[i * NBk + c] = ex;
          z[i] += ex;
        }
      }
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const double v = warp_sum(z[i]);
    if (lane == 0) red_d[row0 + i][kw] = v;
  }
  RadixSmem& sm = *reinterpret_cast<RadixSmem*>(&ks[0][0]);
  if (radix != nullptr) radix_hist_begin(sm);  // (its barrier also publishes red_d)
  else __syncthreads();
  float zf[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    double zs = red_d[row0 + i][0];
    for (int w = 1; w < kQaKeyWarps; ++w) zs += red_d[row0 + i][w];
    zf[i] = static_cast<float>(1.0 / (zs * static_cast<double>(NBq)));
  }
  // Normalised probabilities; zeros past each row's causal blocks.
  uint32_t zeros = 0;
  for (int c0 = 0; c0 < NBk; c0 += kQaKeys)
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      if (row0 + i >= nrows) break;  // warp-uniform
#pragma unroll
      for (int j = 0; j < kQaKeysPerLane; ++j) {
        const int c = c0 + key0 + 32 * j;
        const float v = c <= chi[i] ? (in_regs ? acc[i][j] : e0[i * NBk + c]) * zf[i] : 0.f;
        if (c < NBk) e0[i * NBk + c] = v;
        if (radix != nullptr) radix_add(item_bits(v), c < NBk, 0u, 0u, 21, 0x7ffu, true, sm, zeros);
      }
    }
  if (radix == nullptr) return;
  radix_hist_end(sm, zeros);
  GridRadixState* st = radix_state(radix, hw);
  if (!radix_publish(sm, st, radix_global_hist(radix, hw), gridDim.x, is_last)) return;
  radix_decide(sm, st, 0, static_cast<uint32_t>(NBq * NBk), n_allowed, p.gamma);
}

// The fewest estimated blocks reaching gamma (at most the causal ones) of one head by one
// CTA, when NBq * NBk <= kQaSmallMax; heads that are not query-aware get zero words.
// grid (heads_per_wave), kSelectThreads threads.
__global__ void __launch_bounds__(kSelectThreads) qa_select_small_kernel(const SelectParams p, const SelectPlan plan,
                                                                         int64_t head0, const bool* query_aware,
                                                                         const float* est, uint32_t* qa) {
  pdl_grid_sync();
  __shared__ RadixSmem sm;
  const int64_t hw = blockIdx.x, head = head0 + hw;
  if (head >= p.batch * p.heads_q) return;
  uint32_t* words = qa + head * plan.qa_words;
  if (!query_aware[head]) {
    for (int64_t i = threadIdx.x; i < plan.qa_words; i += blockDim.x) words[i] = 0u;
    return;
  }
  const uint32_t n = static_cast<uint32_t>(p.num_q_blocks * p.num_k_blocks);
  select_top(est + hw * static_cast<int64_t>(n), n, true, p.gamma, 0u, static_cast<uint32_t>(plan.n_allowed),
             words, sm);
}

// Larger estimates: many CTAs per head.
// The fewest estimated blocks reaching gamma (at most the causal ones), over the
// NBq * NBk flattened estimate of each head, by many CTAs per head: one launch per radix
// level of the mass descent; every CTA adds its chunk's histogram to the head's global one
// and the last CTA to finish picks the digit and updates the head's state. A final launch
// writes the bitmask. The kept blocks are at most the positive (causal) estimates, so the
// causal budget only cuts when the mass never reaches gamma (float rounding of a gamma
// within ~1e-7 of 1): then qa_mark takes the top n_allowed by count on one CTA.
// grid (ceil(n / plan.qa_chunk), heads_per_wave), kSelectThreads threads.
__global__ void __launch_bounds__(kSelectThreads) qa_radix_level_kernel(const SelectParams p, const SelectPlan plan,
                                                                        int64_t head0, const bool* query_aware,
                                                                        const float* est, unsigned char* ws,
                                                                        int level) {
  pdl_grid_sync();
  __shared__ RadixSmem sm;
  __shared__ uint32_t is_last;
  constexpr int kShift[3] = {21, 10, 0};
  constexpr uint32_t kMask[3] = {0x7ffu, 0x7ffu, 0x3ffu};
  const int64_t hw = query_aware_slot(p, query_aware, head0, gridDim.y, blockIdx.y);
  if (hw < 0) return;
  GridRadixState* st = radix_state(ws, hw);
  uint32_t* gh = radix_global_hist(ws, hw);
  if (st->mode != kModeMass) return;
  const uint32_t n = static_cast<uint32_t>(p.num_q_blocks * p.num_k_blocks);
  const uint32_t chunk = static_cast<uint32_t>(plan.qa_chunk);
  const uint32_t begin = blockIdx.x * chunk, end = min(begin + chunk, n);
  const float* x = est + hw * static_cast<int64_t>(n);
  radix_histogram(x, begin, end, st->prefix, st->pmask, kShift[level], kMask[level], true, sm);
  if (!radix_publish(sm, st, gh, gridDim.x, is_last)) return;
  radix_decide(sm, st, level, n, static_cast<uint32_t>(plan.n_allowed), p.gamma);
}

// Bitmask of the selection. grid (ceil(n / plan.qa_chunk), heads_per_wave), kSelectThreads.
__global__ void __launch_bounds__(kSelectThreads) qa_mark_kernel(const SelectParams p, const SelectPlan plan,
                                                                 int64_t head0, const bool* query_aware,
                                                                 const float* est, unsigned char* ws, uint32_t* qa) {
  pdl_grid_sync();
  __shared__ RadixSmem sm;
  const int64_t hw = query_aware_slot(p, query_aware, head0, gridDim.y, blockIdx.y), head = head0 + hw;
  if (hw < 0) return;
  GridRadixState* st = radix_state(ws, hw);
  const uint32_t n = static_cast<uint32_t>(p.num_q_blocks * p.num_k_blocks);
  const float* x = est + hw * static_cast<int64_t>(n);
  uint32_t* words = qa + head * plan.qa_words;
  if (st->mode == kModeCount) {
    // The top K by value (the mass never reached gamma: only when gamma is within float
    // rounding of 1): one CTA descends the count digits and marks the whole head.
    if (blockIdx.x == 0) {
      const Threshold th = radix_threshold(x, n, false, 0.f, st->K, sm);
      radix_mark(x, n, 2, th, words, sm);
    }
    return;
  }
  const uint32_t mark = st->mark, thr = st->thr_bits, take = st->take, tie = st->tie_cnt;
  const uint32_t chunk = static_cast<uint32_t>(plan.qa_chunk);
  if (mark == 2 && take < tie) {
    // Ties split at the threshold: the equal items are ranked in index order across the
    // chunks. The CTAs take chunks in the order they start (a ticket) and each publishes
    // the inclusive count of equal items up to its chunk once its predecessor has (the
    // predecessor is running: no deadlock); the counts live in the head's global
    // histogram, free after the descent (<= kRadixBuckets * 3 / 2 chunks, else one CTA).
    const uint32_t nchunks = (n + chunk - 1) / chunk;
    if (nchunks > kRadixBuckets * 3 / 2) {
      if (blockIdx.x == 0) radix_mark(x, n, 2, Threshold{true, thr, 0, tie, take}, words, sm);
      return;
    }
    __shared__ uint32_t chunk_id, before;
    if (threadIdx.x == 0) chunk_id = atomicAdd(&st->mark_ticket, 1u);
    __syncthreads();
    const uint32_t j = chunk_id, begin = j * chunk, end = min(begin + chunk, n);
    uint32_t here = 0;
    for (uint32_t i = begin + threadIdx.x; i < end; i += blockDim.x) here += item_bits(x[i]) == thr ? 1u : 0u;
    here = block_sum(here, sm.warp_cnt);
    if (threadIdx.x == 0) {
      auto* prefix = reinterpret_cast<unsigned long long*>(radix_global_hist(ws, hw));  // (1 << 32) | count
      unsigned long long prev = 0;
      if (j > 0) {
        do {
          prev = atomicAdd(prefix + j - 1, 0ull);
        } while ((prev >> 32) == 0);
      }
      const uint32_t prev_cnt = static_cast<uint32_t>(prev);
      atomicExch(prefix + j, (1ull << 32) | (prev_cnt + here));
      before = prev_cnt;
    }
    __syncthreads();
    radix_mark(x, end, 2, Threshold{true, thr, 0, tie, take}, words, sm, begin, before);
    return;
  }
  const uint32_t begin = blockIdx.x * chunk, end = min(begin + chunk, n);
  const uint32_t end_round = (end + 31) / 32 * 32;
  const int lane = threadIdx.x & 31;
  for (uint32_t base = begin + (threadIdx.x & ~31u); base < end_round; base += blockDim.x) {
    const uint32_t i = base + lane;
    const bool sel = i < end && (mark == 1 || (mark == 2 && item_bits(x[i]) >= thr));
    const uint32_t w = __ballot_sync(0xffffffffu, sel);
    if (lane == 0) words[base >> 5] = w;
  }
}

// Steps 4-7 together: kv_count [B, Hq, NBq], kv_index [B, Hq, NBq, NBk] (ascending, then
// zeros). One warp per query block; grid (ceil(NBq / 4), Hq, B), 128 threads. Each lane owns
// 8 consecutive columns of a 256-column chunk, so a chunk's bitmask loads are issued at once
// (one round trip per chunk instead of one per 32 columns); the kept columns are ranked by a
// warp scan, staged in shared memory and stored coalesced. 32-bit positions (the op limits
// lengths to int32) and shifts for the block size (a power of two).
constexpr int kAssembleChunk = 256;  // columns per warp pass: 32 lanes x 8

// Bits [i, i + 8) of a bitmask of `nwords` words (bits past the end read as 0).
__device__ __forceinline__ uint32_t bits8_at(const uint32_t* words, int64_t nwords, int64_t i) {
  const int64_t w = i >> 5;
  const uint32_t lo = __ldg(words + w);
  const uint32_t hi = (i & 31) > 24 && w + 1 < nwords ? __ldg(words + w + 1) : 0u;
  return __funnelshift_r(lo, hi, static_cast<uint32_t>(i & 31)) & 0xffu;
}

__global__ void assemble_kernel(const SelectParams p, const SelectPlan plan, const uint32_t* cols,
                                const uint32_t* bins, const uint32_t* qa, bool all_causal) {
  __shared__ int32_t stage[kAssembleRowsPerCta][kAssembleChunk];
  pdl_grid_sync();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int r = static_cast<int>(blockIdx.x) * kAssembleRowsPerCta + warp;
  if (r >= p.num_q_blocks) return;
  const int64_t h = blockIdx.y, b = blockIdx.z, head = b * p.heads_q + h;
  const int bs = static_cast<int>(p.block_size), sh = __ffs(bs) - 1;
  const int Nq = static_cast<int>(p.seqlen_q), Nk = static_cast<int>(p.seqlen_k);
  const int NBk = static_cast<int>(p.num_k_blocks);
  const int lo = Nk - Nq + r * bs;
  const int hi = Nk - Nq + (r * bs + bs < Nq ? r * bs + bs : Nq) - 1;
  const int chi = hi >> sh, clo = lo >> sh;
  const int64_t row = head * p.num_q_blocks + r;
  int32_t* out = p.kv_index + row * NBk;
  int count = 0;
  if (all_causal) {
    for (int c = lane; c < NBk; c += 32) out[c] = c <= chi ? c : 0;
    count = chi + 1;
  } else {
    const uint32_t* cw = cols + head * plan.cols_words;
    const uint32_t* tw = bins + head * plan.cols_words;
    const uint32_t* qw = plan.any_query_aware ? qa + head * plan.qa_words : nullptr;
    int32_t* srow = stage[warp];
    // Slash bins of column c: distances [lo - c bs - bs + 1, hi - c bs] (clamped), i.e.
    // bins [t0(c), t1(c)] (x, y), both non-increasing in c, at most 3 per column.
    auto bin_range = [&](int c) {
      const int a = max(lo - c * bs - bs + 1, 0), e = min(hi - c * bs, Nk - 1);
      return make_int2(a >> sh, a <= e ? e >> sh : (a >> sh) - 1);
    };
    for (int c0 = 0; c0 <= chi; c0 += kAssembleChunk) {
      const int cb = c0 + lane * 8;  // this lane's first column (a multiple of 8)
      uint32_t keep = 0;             // bit j: column cb + j is kept
      if (cb <= chi) {
        const int last = min(cb + 7, chi);
        const uint32_t colb = (__ldg(cw + (cb >> 5)) >> (cb & 31)) & 0xffu;
        const uint32_t qb = qw ? bits8_at(qw, plan.qa_words, static_cast<int64_t>(r) * NBk + cb) : 0u;
        // Every bin of the lane's columns lies in [t0(last), t1(cb)] (<= 11 bins: hi - lo <
        // bs): a 64-bit window of two words from t0(last)'s word holds them.
        const int w0 = bin_range(last).x >> 5;
        const uint32_t b_lo = __ldg(tw + w0);
        const uint32_t b_hi = w0 + 1 < plan.cols_words ? __ldg(tw + w0 + 1) : 0u;
        const unsigned long long win = (static_cast<unsigned long long>(b_hi) << 32) | b_lo;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const int c = cb + j;
          const int2 t = bin_range(c);
          const int t0 = t.x, t1 = t.y;
          bool bin = false;
          if (c <= last && t1 >= t0) {  // t0 >= t0(last), t1 <= t1(cb) <= t0(last) + 10
            const int s0 = t0 - w0 * 32, len = t1 - t0 + 1;  // so s0 >= 0 and s0 + len <= 42
            bin = ((win >> s0) & ((1ull << len) - 1ull)) != 0ull;
          }
          const bool k = c <= chi && (c == 0 || c >= clo || ((colb >> j) & 1u) || ((qb >> j) & 1u) || bin);
          keep |= static_cast<uint32_t>(k) << j;
        }
      }
      const int n = __popc(keep);
      int incl = n;  // inclusive warp scan of the lanes' counts
#pragma unroll
      for (int d = 1; d < 32; d <<= 1) {
        const int v = __shfl_up_sync(0xffffffffu, incl, d);
        if (lane >= d) incl += v;
      }
      const int total = __shfl_sync(0xffffffffu, incl, 31);
      int at = incl - n;
      for (uint32_t m = keep; m; m &= m - 1u) srow[at++] = cb + __ffs(m) - 1;
      __syncwarp();
      for (int j = lane; j < total; j += 32) out[count + j] = srow[j];
      __syncwarp();
      count += total;
    }
    for (int j = count + lane; j < NBk; j += 32) out[j] = 0;
  }
  if (lane == 0) p.kv_count[row] = count;
}

// ---------------------------------------------------------------------------------------
// Launchers.

// A kernel launch that may start while the previous kernel of the stream drains (programmatic
// dependent launch on sm_90+: the kernel's first statement is pdl_grid_sync, which waits for
// that kernel to complete). Hides the launch gap between the dependent kernels of the chain.
template <typename... KArgs, typename... Args>
cudaError_t launch_chained(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t s,
                           Args&&... args) {
  int dev = 0, major = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  if (e != cudaSuccess) return e;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = s;
  cfg.attrs = attr;
  cfg.numAttrs = major >= 9 ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

// part kFinishAll / kFinishDecide: the records kernel, then finish_kernel; kFinishSelect:
// finish_kernel's step 4 alone (beyond kWarpSelectMax key blocks: launch_select_warps below).
inline cudaError_t launch_finish(const SelectParams& p, const SelectPlan& plan, const SelectBuffers& w, int part,
                                 cudaStream_t s) {
  if (part != kFinishSelect) {
    const dim3 grid((p.num_k_blocks + kRecBlocks - 1) / kRecBlocks, p.batch * p.heads_q);
    const cudaError_t e = launch_chained(finish_records_kernel, grid, kRecThreads, 0, s, p, plan, w);
    if (e != cudaSuccess) return e;
  }
  return launch_chained(finish_kernel, dim3(p.batch * p.heads_q), kSelectThreads, 0, s, p, plan, w, part);
}
// Step 4 up to kWarpSelectMax key blocks: right after the first qa_estimate launch, same stream.
inline cudaError_t launch_select_warps(const SelectParams& p, const SelectPlan& plan, const SelectBuffers& w,
                                       cudaStream_t s) {
  const int64_t ctas = (2 * p.batch * p.heads_q + kWarpSelectThreads / 32 - 1) / (kWarpSelectThreads / 32);
  return launch_chained(select_warps_kernel, dim3(ctas < kWarpSelectCtas ? ctas : kWarpSelectCtas),
                        kWarpSelectThreads, 0, s, p, plan, w);
}
inline cudaError_t launch_qa_pool(const SelectParams& p, const SelectPlan& plan, const SelectBuffers& w, int64_t head0,
                                  cudaStream_t s) {
  const dim3 grid(p.num_q_blocks, plan.heads_per_wave);
  const bool small = qa_one_cta(p);  // qa_select_small clears its own words
  return launch_chained(p.is_bf16 ? qa_pool_kernel<true> : qa_pool_kernel<false>, grid, kQaPoolThreads, 0, s, p,
                        head0, static_cast<const bool*>(p.query_aware), w.poolq, small ? nullptr : w.qa,
                        static_cast<int64_t>(plan.qa_words), w.radix);
}
inline cudaError_t launch_qa_estimate(const SelectParams& p, const SelectPlan& plan, const SelectBuffers& w,
                                      int64_t head0, cudaStream_t s) {
  const dim3 grid((p.num_q_blocks + kQaRows - 1) / kQaRows, plan.heads_per_wave);
  const bool small = qa_one_cta(p);  // qa_select_small: no radix levels
  return launch_chained(qa_estimate_kernel, grid, kQaThreads, 0, s, p, head0, static_cast<const bool*>(p.query_aware),
                        static_cast<const float*>(w.pool_k), static_cast<const float*>(w.poolq), w.est,
                        small ? nullptr : w.radix, static_cast<uint32_t>(plan.n_allowed));
}
inline cudaError_t launch_qa_select_small(const SelectParams& p, const SelectPlan& plan, const SelectBuffers& w,
                                          int64_t head0, cudaStream_t s) {
  return launch_chained(qa_select_small_kernel, dim3(plan.heads_per_wave), kSelectThreads, 0, s, p, plan, head0,
                        static_cast<const bool*>(p.query_aware), static_cast<const float*>(w.est), w.qa);
}
inline cudaError_t launch_qa_radix_level(const SelectParams& p, const SelectPlan& plan, const SelectBuffers& w,
                                         int64_t head0, int level, cudaStream_t s) {
  const int64_t n = p.num_q_blocks * p.num_k_blocks;
  dim3 grid((n + plan.qa_chunk - 1) / plan.qa_chunk, plan.heads_per_wave);
  return launch_chained(qa_radix_level_kernel, grid, kSelectThreads, 0, s, p, plan, head0,
                        static_cast<const bool*>(p.query_aware), static_cast<const float*>(w.est), w.radix, level);
}
inline cudaError_t launch_qa_mark(const SelectParams& p, const SelectPlan& plan, const SelectBuffers& w,
                                  int64_t head0, cudaStream_t s) {
  const int64_t n = p.num_q_blocks * p.num_k_blocks;
  dim3 grid((n + plan.qa_chunk - 1) / plan.qa_chunk, plan.heads_per_wave);
  return launch_chained(qa_mark_kernel, grid, kSelectThreads, 0, s, p, plan, head0,
                        static_cast<const bool*>(p.query_aware), static_cast<const float*>(w.est), w.radix, w.qa);
}
inline cudaError_t launch_assemble(const SelectParams& p, const SelectPlan& plan, const SelectBuffers* w,
                                   bool all_causal, cudaStream_t s) {
  dim3 grid((p.num_q_blocks + kAssembleRowsPerCta - 1) / kAssembleRowsPerCta, p.heads_q, p.batch);
  return launch_chained(assemble_kernel, grid, 32 * kAssembleRowsPerCta, 0, s, p, plan,
                        static_cast<const uint32_t*>(w ? w->cols : nullptr),
                        static_cast<const uint32_t*>(w ? w->bins : nullptr),
                        static_cast<const uint32_t*>(w ? w->qa : nullptr), all_causal);
}

}  // namespace selection
}  // namespace flexprefill
