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

__device__ __forceinline__ float load_half_bits(const uint16_t* p, bool is_bf16) {
  const uint16_t v = *p;
  if (is_bf16) return __uint_as_float(static_cast<uint32_t>(v) << 16);
  return __half2float(__ushort_as_half(v));
}

__device__ __forceinline__ int64_t last_causal_block_dev(int64_t r, int64_t Nq, int64_t Nk, int64_t bs) {
  const int64_t off = Nk - Nq;
  const int64_t end = r * bs + bs < Nq ? r * bs + bs : Nq;
  return (off + end - 1) / bs;
}

// Mean over rows [row0, row0 + count) of x[b, row, head, :] in fp32 (sum, then divide, as
// the reference's _pool). One thread per element of D.
__device__ __forceinline__ void mean_rows(const uint16_t* x, int64_t row_stride, int64_t row0, int64_t count,
                                          int D, bool is_bf16, float* out) {
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float s = 0.f;
#pragma unroll 8
    for (int64_t r = 0; r < count; ++r) s += load_half_bits(x + (row0 + r) * row_stride + d, is_bf16);
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
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  for (int d = threadIdx.x; d < D; d += blockDim.x) qm[d] = qhat_mean[head * D + d];
  __syncthreads();
  const float* pk = pool_k + (b * p.heads_kv + hk) * NBk * D;
  float* x = logits + head * NBk;
  float mx = -INFINITY;
  for (int64_t c = warp; c < NBk; c += nw) {
    float s = 0.f;
    for (int d = lane; d < D; d += 32) s += pk[c * D + d] * qm[d];
    s = warp_sum(s) * p.softmax_scale;
    if (lane == 0) x[c] = s;
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

// Step 4: vertical columns (blockIdx.y == 0) and slash lines (1) of every head; query-aware
// heads keep only the min-budget lines (the reference's vertical_slash(None)).
__global__ void __launch_bounds__(kSelectThreads) vs_select_kernel(const SelectParams p, const SelectPlan plan,
                                                                   const float* vert, const float* slash,
                                                                   const bool* query_aware, uint32_t* cols,
                                                                   uint32_t* lines) {
  __shared__ RadixSmem sm;
  const int64_t head = blockIdx.x;
  const bool use_gamma = !query_aware[head];
  if (blockIdx.y == 0) {
    select_top(vert + head * p.num_k_blocks, static_cast<uint32_t>(p.num_k_blocks), use_gamma, p.gamma,
               static_cast<uint32_t>(plan.min_cols), static_cast<uint32_t>(plan.max_cols),
               cols + head * plan.cols_words, sm);
  } else {
    select_top(slash + head * p.seqlen_k, static_cast<uint32_t>(p.seqlen_k), use_gamma, p.gamma,
               static_cast<uint32_t>(plan.min_lines), static_cast<uint32_t>(plan.max_lines),
               lines + head * plan.lines_words, sm);
  }
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

// The fewest estimated blocks reaching gamma (at most the causal ones). grid heads_per_wave.
__global__ void __launch_bounds__(kSelectThreads) qa_select_kernel(const SelectParams p, const SelectPlan plan,
                                                                   int64_t head0, const bool* query_aware,
                                                                   const float* est, uint32_t* qa) {
  __shared__ RadixSmem sm;
  const int64_t hw = blockIdx.x, head = head0 + hw;
  if (head >= p.batch * p.heads_q || !query_aware[head]) return;
  const uint32_t n = static_cast<uint32_t>(p.num_q_blocks * p.num_k_blocks);
  select_top(est + hw * p.num_q_blocks * p.num_k_blocks, n, true, p.gamma, 0u,
             static_cast<uint32_t>(plan.n_allowed), qa + head * plan.qa_words, sm);
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
                                const uint32_t* lines, const uint32_t* qa, bool all_causal) {
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
    const uint32_t* lw = lines + head * plan.lines_words;
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
        if (!keep) {  // a selected distance in [lo - c bs - bs + 1, hi - c bs]
          int64_t a = lo - c * bs - bs + 1, e = hi - c * bs;
          a = a > 0 ? a : 0;
          e = e < Nk - 1 ? e : Nk - 1;
          keep = a <= e && any_bit(lw, a, e);
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
  pool_keys_kernel<<<dim3(p.num_k_blocks, p.heads_kv, p.batch), 128, 0, s>>>(p, pool_k);
  return cudaGetLastError();
}
inline cudaError_t launch_qhat_mean(const SelectParams& p, const SelectPlan& plan, float* out, cudaStream_t s) {
  qhat_mean_kernel<<<dim3(p.heads_q, p.batch), 128, 0, s>>>(p, plan.rows, out);
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
                                                                            p.query_aware, w.cols, w.lines);
  return cudaGetLastError();
}
inline cudaError_t launch_pool_queries(const SelectParams& p, const SelectPlan& plan, const SelectBuffers& w,
                                       int64_t head0, cudaStream_t s) {
  pool_queries_kernel<<<dim3(p.num_q_blocks, plan.heads_per_wave), 128, 0, s>>>(p, plan, head0, p.query_aware,
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
inline cudaError_t launch_qa_select(const SelectParams& p, const SelectPlan& plan, const SelectBuffers& w,
                                    int64_t head0, cudaStream_t s) {
  qa_select_kernel<<<plan.heads_per_wave, kSelectThreads, 0, s>>>(p, plan, head0, p.query_aware, w.est, w.qa);
  return cudaGetLastError();
}
inline cudaError_t launch_assemble(const SelectParams& p, const SelectPlan& plan, const SelectBuffers* w,
                                   bool all_causal, cudaStream_t s) {
  dim3 grid((p.num_q_blocks + kAssembleRowsPerCta - 1) / kAssembleRowsPerCta, p.heads_q, p.batch);
  assemble_kernel<<<grid, 32 * kAssembleRowsPerCta, 0, s>>>(p, plan, w ? w->cols : nullptr,
                                                            w ? w->lines : nullptr, w ? w->qa : nullptr,
                                                            all_causal);
  return cudaGetLastError();
}

}  // namespace selection
}  // namespace flexprefill
