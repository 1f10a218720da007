// Steps 1-3 inputs of FlexPrefill on tensor cores, in ONE pass over the keys: the
// representative queries Q̂ (the last m = bs rows of q) attend every key,
// A = softmax(s Q̂ Kᵀ), without materialising A and without a separate pass for the row
// log-sum-exp. Per (head, representative row i, key block c) the kernel stores a record
//
//   M_ic                       a reference value (log2 units; the row's running max)
//   H_ic = sum 2^(x_ij - M_ic) over keys j of block c with j - c bs <= (P0 + i) mod bs
//   L_ic = the same sum over the rest of block c
//
// where x = (q.k) s log2(e) and P0 + i is the row's absolute position. A key of block c is
// at distance P0 + i - j from row i: the keys counted in H lie in slash bin
// floor((P0+i)/bs) - c, those in L in the bin below. So the records hold everything the
// finish kernel (select_kernels.cuh) needs: the row LSE, the vertical mass of every key
// block and the slash mass of every distance bin, in a fixed summation order
// (deterministic). Records: [B, Hq, NBk, 3, m] fp32 (M, H, L); per (row, split) the
// reference and the total, [B, Hq, splits, m] each, give the row LSE.
//
// No per-element max: sums are taken against the row's reference from earlier tiles and
// the exact tile max is computed only when a sum would leave (0, 2^64] (a split's first
// tile, a much larger logit): exact, since any reference works as long as nothing
// overflows, and a reference above the row's values only drops terms < 2^-126 of the max.
//
// The same kernel also writes pool(K) [B, Hkv, NBk, D] (from the K tiles in shared memory;
// the CTAs of a kv head's split pool a share of the columns each) and mean(Q̂) [B, Hq, D] (split 0).
//
// One CTA = `heads_per_cta` query heads of one GQA group x one split of `split_keys` keys;
// m / 32 warps per head, each owning 32 rows (two m16 tiles, so every B fragment feeds
// four mma). Q̂ stays in shared memory (A fragments by ldmatrix at every k-step); K
// streams through a kStages-deep cp.async ring of 64-key tiles that all the CTA's heads
// share, one __syncthreads per tile.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <type_traits>

#include "cuda/selection/device_utils.cuh"
#include "cuda/selection/select_plan.h"

namespace flexprefill {
namespace selection {

struct RepParams {
  const uint16_t* q;  // [B, Nq, Hq, D] bf16 / fp16 bits
  const uint16_t* k;  // [B, Nk, Hkv, D]
  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int seqlen_q, seqlen_k, heads_q, heads_kv, rows, block_size;
  int split_keys, num_splits, num_k_blocks, heads_per_cta;
  float scale_log2;
  float* rec;        // [B, Hq, NBk, 3, m]
  float* part_ref;   // [B, Hq, splits, m]  the row's reference at the end of the split (log2 units)
  float* part_sum;   // [B, Hq, splits, m]  sum of 2^(x - ref) over the split's keys
  float* pool_k;     // [B, Hkv, NBk, D]
  float* qhat_mean;  // [B, Hq, D]
};

constexpr int kPoolPartFloats = 512;  // K pooling partials per parity: [phases][D / 2 pairs][2] <= 2 * max(256, D / 2)

// Shared-memory layout (bytes), the same on host and device.
struct RepSmem {
  int q_off, k_off, pool_off, total;
};

__host__ __device__ inline int rep_row_stride(int D) { return D + 8; }  // +16 B: no ldmatrix conflicts

__host__ __device__ inline RepSmem rep_smem_layout(int D, int m, int heads_per_cta) {
  auto up = [](int x) { return (x + 15) / 16 * 16; };
  const int ld = rep_row_stride(D), threads = heads_per_cta * m;
  RepSmem s;
  s.q_off = 0;
  s.k_off = up(heads_per_cta * m * ld * 2);
  s.pool_off = s.k_off + up(rep_stages(D) * kTileKeys * ld * 2);
  s.total = s.pool_off + 2 * kPoolPartFloats * 4;  // two parities of K-pooling partials
  (void)threads;
  return s;
}

__device__ __forceinline__ float fast_exp2(float x) {  // 2^x; -inf -> 0 (ex2.approx.ftz)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

template <bool kBf16, int kD>
__global__ void __launch_bounds__(256, rep_ctas_per_sm(kD)) rep_kernel(const RepParams p) {
  using Element = std::conditional_t<kBf16, __nv_bfloat16, __half>;
  constexpr int kStages = rep_stages(kD);
  constexpr int kSteps = kD / 16;        // k-steps of one 64-key tile
  constexpr int kChunks = kD / 8;        // 16-byte chunks per row
  constexpr int ld = kD + 8;
  extern __shared__ __align__(16) unsigned char smem[];
  const int split = blockIdx.y, b = blockIdx.z, hpc = p.heads_per_cta;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nthreads = blockDim.x;
  const int g = lane >> 2, t4 = lane & 3;
  const int m = p.rows, bs = p.block_size, bs_shift = __ffs(bs) - 1;  // bs: a power of two
  const int warps_per_head = m / kRowsPerWarp;
  const int group = p.heads_q / p.heads_kv;
  const int h_first = blockIdx.x * hpc;                    // first query head of the CTA
  const int h = h_first + warp / warps_per_head;           // this warp's query head
  const int hk = h_first / group;                          // hpc divides the group size
  // pool(K): the group / hpc CTAs of a kv head (same split) pool a share of the column
  // pairs each (all pairs in the first when the shares would not be equal).
  const int npairs = kD / 2, kv_ctas = group / hpc, kv_cta = (h_first % group) / hpc;
  const bool share = npairs % kv_ctas == 0;
  const bool pools_k = share || kv_cta == 0;
  const int npl = share ? npairs / kv_ctas : npairs, pair_begin = share ? kv_cta * npl : 0;
  const int ks = split * p.split_keys;
  const int ke = min(ks + p.split_keys, p.seqlen_k);
  const int ntile = (ke - ks + kTileKeys - 1) / kTileKeys;
  const int P0 = p.seqlen_k - m;  // absolute position of representative row 0
  const RepSmem L = rep_smem_layout(kD, m, hpc);
  uint16_t* Qs = reinterpret_cast<uint16_t*>(smem + L.q_off);
  uint16_t* Ks = reinterpret_cast<uint16_t*>(smem + L.k_off);
  float* pool_part = reinterpret_cast<float*>(smem + L.pool_off);  // [2][kPoolPartFloats]

  const uint16_t* qg = p.q + b * p.q_batch_stride + h_first * p.q_head_stride +
                       static_cast<int64_t>(p.seqlen_q - m) * p.q_row_stride;
  const uint16_t* kg = p.k + b * p.k_batch_stride + hk * p.k_head_stride;
  for (int idx = tid; idx < hpc * m * kChunks; idx += nthreads) {  // Qs row hl * m + r: head hl, row r
    const int r = idx / kChunks, c = idx - r * kChunks, hl = r / m;
    cp_async_16(smem_u32(Qs + r * ld + c * 8), qg + hl * p.q_head_stride + (r - hl * m) * p.q_row_stride + c * 8);
  }
  auto load_k = [&](int tile, int buf) {
    const int kt = ks + tile * kTileKeys;
    uint16_t* dst = Ks + buf * kTileKeys * ld;
    for (int idx = tid; idx < kTileKeys * kChunks; idx += nthreads) {
      const int r = idx / kChunks, c = idx - r * kChunks;
      const int j = kt + r;
      const bool ok = j < ke;
      cp_async_16(smem_u32(dst + r * ld + c * 8), ok ? kg + static_cast<int64_t>(j) * p.k_row_stride + c * 8 : kg,
                 ok);
    }
  };
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < ntile) load_k(s, s);
    cp_async_commit();  // group s (the first one also holds Q̂)
  }

  const int64_t head = static_cast<int64_t>(b) * p.heads_q + h;
  const int row0 = (warp % warps_per_head) * kRowsPerWarp;  // first representative row of this warp
  // Row slot s = 2 * mt + hf holds row row0 + 8 * s + g (mt: m16 tile, hf: upper half).
  // m_ref: the row's reference (log2 units; -inf until a key is seen); every sum is
  // against 2^(m_ref or 0 while -inf). hs / ls: the current block's H / L; l_run: the split's total.
  float m_ref[4], hs[4], ls[4], l_run[4];
  int off_row[4];  // (P0 + row) mod bs: the last in-block key offset counted in H
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    m_ref[s] = -INFINITY;
    hs[s] = 0.f;
    ls[s] = 0.f;
    l_run[s] = 0.f;
    off_row[s] = (P0 + row0 + 8 * s + g) & (bs - 1);  // bs is a power of two
  }

  // Per-lane ldmatrix addresses: A rows (lane & 15), k-half lane >> 4; B keys
  // (lane & 7) + 8 * (lane >> 4), k-half (lane >> 3) & 1.
  const uint32_t q_addr = smem_u32(Qs + (warp * kRowsPerWarp + (lane & 15)) * ld + (lane >> 4) * 8);
  const int b_row = (lane & 7) + ((lane >> 4) << 3), b_col = ((lane >> 3) & 1) * 8;

  // K pooling (pools_k CTAs, pairs [pair_begin, pair_begin + npl)): thread -> key phase kph
  // (keys kph, kph + nph, ...) and one column pair (two when the CTA has fewer threads than
  // pairs: D = 256 with 64 rows).
  const int nph = nthreads >= npl ? nthreads / npl : 1;
  const int kph = tid / npl, pr0 = tid % npl;
  bool pair_ok[2];
  pair_ok[0] = kph < nph;
  pair_ok[1] = nthreads < npl && pr0 + nthreads < npl;
  float2 pool_acc[2] = {make_float2(0.f, 0.f), make_float2(0.f, 0.f)};
  auto flush_pool = [&](int blk) {  // pool(K)[blk] from the partials of parity blk & 1
    const float* part = pool_part + (blk & 1) * kPoolPartFloats;
    const int count = min(bs, p.seqlen_k - blk * bs);
    for (int dl = tid; dl < 2 * npl; dl += nthreads) {
      float s = 0.f;
      for (int ph = 0; ph < nph; ++ph) s += part[(ph * npl + (dl >> 1)) * 2 + (dl & 1)];
      p.pool_k[((static_cast<int64_t>(b) * p.heads_kv + hk) * p.num_k_blocks + blk) * kD + 2 * pair_begin + dl] =
          s / static_cast<float>(count);
    }
  };

  cp_async_wait<kStages - 2>();  // Q̂ and tile 0 have landed (for this thread)
  __syncthreads();
  if (split == 0) {  // mean(Q̂) of the CTA's heads: thread per (head, dim), rows in order
    for (int idx = tid; idx < hpc * kD; idx += nthreads) {
      const int hl = idx / kD, d = idx - hl * kD;
      float s = 0.f;
      for (int r = 0; r < m; ++r) {
        const uint16_t bits = Qs[(hl * m + r) * ld + d];
        s += kBf16 ? __uint_as_float(static_cast<uint32_t>(bits) << 16) : __half2float(__ushort_as_half(bits));
      }
      p.qhat_mean[(static_cast<int64_t>(b) * p.heads_q + h_first + hl) * kD + d] = s / static_cast<float>(m);
    }
  }
  for (int tile = 0; tile < ntile; ++tile) {
    if (tile > 0) {
      cp_async_wait<kStages - 2>();
      __syncthreads();  // tile `tile` landed for all; everyone is done with tile - 1's buffer
    }
    {
      const int nt = tile + kStages - 1;
      if (nt < ntile) load_k(nt, nt % kStages);
      cp_async_commit();
    }
    const int buf = tile % kStages;
    const int kt = ks + tile * kTileKeys;
    const int c = kt >> bs_shift, base = kt & (bs - 1);  // key block of the tile, offset of the tile in it
    const bool first_in_block = base == 0;
    const bool last_in_block = base + kTileKeys == bs || tile == ntile - 1;
    const uint16_t* Kt = Ks + buf * kTileKeys * ld;

    if (pools_k) {  // column sums of the block, per thread column pair and key phase
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        if (!pair_ok[j]) continue;
        const int pr = pair_begin + pr0 + j * nthreads;
        for (int r = kph; r < kTileKeys; r += nph) {
          const float2 v = unpack2<kBf16>(*reinterpret_cast<const uint32_t*>(Kt + r * ld + 2 * pr));
          pool_acc[j].x += v.x;
          pool_acc[j].y += v.y;
        }
      }
      // The previous block's partials were written before this tile's barrier.
      if (first_in_block && c > ks / bs) flush_pool(c - 1);
    }

    const uint32_t k_addr = smem_u32(Kt + b_row * ld + b_col);
    float acc[2][8][4];
#pragma unroll
    for (int st = 0; st < kSteps; ++st) {
      uint32_t a0[4], a1[4];
      ldmatrix_x4(a0, q_addr + st * 32);
      ldmatrix_x4(a1, q_addr + (16 * ld + st * 16) * 2);
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        uint32_t bb[4];
        ldmatrix_x4(bb, k_addr + (np * 16 * ld + st * 16) * 2);
        if (st == 0) {
          mma_16816_zero<Element>(acc[0][2 * np], a0, bb[0], bb[1]);
          mma_16816_zero<Element>(acc[0][2 * np + 1], a0, bb[2], bb[3]);
          mma_16816_zero<Element>(acc[1][2 * np], a1, bb[0], bb[1]);
          mma_16816_zero<Element>(acc[1][2 * np + 1], a1, bb[2], bb[3]);
        } else {
          mma_16816<Element>(acc[0][2 * np], a0, bb[0], bb[1]);
          mma_16816<Element>(acc[0][2 * np + 1], a0, bb[2], bb[3]);
          mma_16816<Element>(acc[1][2 * np], a1, bb[0], bb[1]);
          mma_16816<Element>(acc[1][2 * np + 1], a1, bb[2], bb[3]);
        }
      }
    }

    // acc[mt][n][2 * hf + x]: row row0 + 16 mt + 8 hf + g, key kt + 8 n + 2 t4 + x.
    const bool need_mask = kt + kTileKeys - 1 > P0 + row0;  // some key past some row's position
    if (need_mask) {
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        const int pos = P0 + row0 + 8 * s + g;  // absolute position of the row
#pragma unroll
        for (int n = 0; n < 8; ++n)
#pragma unroll
          for (int x = 0; x < 2; ++x)
            if (kt + 8 * n + 2 * t4 + x > pos) acc[s >> 1][n][2 * (s & 1) + x] = -INFINITY;
      }
    }
    if (first_in_block) {
#pragma unroll
      for (int s = 0; s < 4; ++s) hs[s] = ls[s] = 0.f;
    }
    // Keys 8 n + x of this thread (offsets base + 2 t4 + 8 n + x in the block) count in H
    // iff 8 n + x <= lim; the tile is "mixed" for the warp when some thread-row has both.
    int lim[4];
    bool mixed_own = false;
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      lim[s] = off_row[s] - base - 2 * t4;
      mixed_own |= lim[s] >= 0 && lim[s] < 57;
    }
    const bool mixed = __any_sync(0xffffffffu, mixed_own);

    // Fast path: e = 2^(x - ref) against the row's reference from earlier tiles, no max.
    // Taken when every sum stays finite and <= 2^64 and every row has a reference;
    // otherwise (a split's first tile, a much larger logit) the exact path below.
    float t_h[4], t_l[4];
    if (mixed) {  // (branches outside the slot loop: the four rows' chains interleave)
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        const float neg_ref = -(m_ref[s] == -INFINITY ? 0.f : m_ref[s]);
        // L = T - H: exact up to one rounding of T (H is a sub-sum of T's terms, so
        // 0 <= H <= T also in floating point), which is negligible against the row's mass.
        float h2[2] = {0.f, 0.f}, t2[2] = {0.f, 0.f};
#pragma unroll
        for (int n = 0; n < 8; ++n)
#pragma unroll
          for (int x = 0; x < 2; ++x) {
            const float e = fast_exp2(fmaf(acc[s >> 1][n][2 * (s & 1) + x], p.scale_log2, neg_ref));
            h2[x] += 8 * n + x <= lim[s] ? e : 0.f;
            t2[x] += e;
          }
        t_h[s] = h2[0] + h2[1];
        t_l[s] = fmaxf((t2[0] + t2[1]) - t_h[s], 0.f);
      }
    } else {
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        const float neg_ref = -(m_ref[s] == -INFINITY ? 0.f : m_ref[s]);
        float t4s[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int n = 0; n < 8; ++n)
#pragma unroll
          for (int x = 0; x < 2; ++x)
            t4s[2 * (n & 1) + x] += fast_exp2(fmaf(acc[s >> 1][n][2 * (s & 1) + x], p.scale_log2, neg_ref));
        const float t = (t4s[0] + t4s[1]) + (t4s[2] + t4s[3]);
        t_h[s] = lim[s] >= 0 ? t : 0.f;
        t_l[s] = lim[s] >= 0 ? 0.f : t;
      }
    }
    bool bad = false;
#pragma unroll
    for (int s = 0; s < 4; ++s)  // 2^64; NaN fails too
      bad |= !(t_h[s] + t_l[s] <= 1.8446744e19f) || m_ref[s] == -INFINITY;
    if (!__any_sync(0xffffffffu, bad)) {
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        hs[s] += t_h[s];
        ls[s] += t_l[s];
        l_run[s] += t_h[s] + t_l[s];
      }
    } else {  // exact path: the tile's row max becomes the reference (rare, warp-uniform)
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        float tmax = -INFINITY;
#pragma unroll
        for (int n = 0; n < 8; ++n)
#pragma unroll
          for (int x = 0; x < 2; ++x) tmax = fmaxf(tmax, acc[s >> 1][n][2 * (s & 1) + x]);
        tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 1));
        tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 2));
        const float m_new = fmaxf(m_ref[s], tmax * p.scale_log2);
        const float use = m_new == -INFINITY ? 0.f : m_new;
        if (m_ref[s] != -INFINITY) {  // earlier sums were against m_ref (else they are 0)
          const float alpha = fast_exp2(m_ref[s] - use);
          hs[s] *= alpha;
          ls[s] *= alpha;
          l_run[s] *= alpha;
        }
        m_ref[s] = m_new;
        float sh = 0.f, sl = 0.f;
#pragma unroll
        for (int n = 0; n < 8; ++n)
#pragma unroll
          for (int x = 0; x < 2; ++x) {
            const float e = fast_exp2(fmaf(acc[s >> 1][n][2 * (s & 1) + x], p.scale_log2, -use));
            const bool in_h = 8 * n + x <= lim[s];
            sh += in_h ? e : 0.f;
            sl += in_h ? 0.f : e;
          }
        hs[s] += sh;
        ls[s] += sl;
        l_run[s] += sh + sl;
      }
    }

    if (last_in_block) {  // reduce over the quad and store the block's records
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        hs[s] += __shfl_xor_sync(0xffffffffu, hs[s], 1);
        hs[s] += __shfl_xor_sync(0xffffffffu, hs[s], 2);
        ls[s] += __shfl_xor_sync(0xffffffffu, ls[s], 1);
        ls[s] += __shfl_xor_sync(0xffffffffu, ls[s], 2);
      }
      // Lane t4 stores slot t4 (row row0 + 8 t4 + g): 32 consecutive rows per field.
      float mv = 0.f, hv = 0.f, lv = 0.f;
#pragma unroll
      for (int s = 0; s < 4; ++s)
        if (t4 == s) {
          mv = m_ref[s] == -INFINITY ? 0.f : m_ref[s];
          hv = hs[s];
          lv = ls[s];
        }
      float* r = p.rec + ((head * p.num_k_blocks + c) * 3) * m + row0 + 8 * t4 + g;
      r[0] = mv;
      r[m] = hv;
      r[2 * m] = lv;
    }
    if (pools_k && last_in_block) {
      float* part = pool_part + (c & 1) * kPoolPartFloats;
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        if (!pair_ok[j]) continue;
        const int pr = pr0 + j * nthreads;
        part[(kph * npl + pr) * 2] = pool_acc[j].x;
        part[(kph * npl + pr) * 2 + 1] = pool_acc[j].y;
        pool_acc[j] = make_float2(0.f, 0.f);
      }
    }
  }
  // The split's row totals, for the row LSE (finish kernel).
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    l_run[s] += __shfl_xor_sync(0xffffffffu, l_run[s], 1);
    l_run[s] += __shfl_xor_sync(0xffffffffu, l_run[s], 2);
  }
  {
    float rv = 0.f, lv = 0.f;
#pragma unroll
    for (int s = 0; s < 4; ++s)
      if (t4 == s) {
        rv = m_ref[s] == -INFINITY ? 0.f : m_ref[s];
        lv = l_run[s];
      }
    const int64_t o = (head * p.num_splits + split) * m + row0 + 8 * t4 + g;
    p.part_ref[o] = rv;
    p.part_sum[o] = lv;
  }
  cp_async_wait<0>();
  if (pools_k && ntile > 0) {  // the split's last block
    __syncthreads();
    flush_pool((ks + (ntile - 1) * kTileKeys) / bs);
  }
}

// Largest heads_per_cta dividing the GQA group with <= 256 threads and fitting shared memory.
inline int rep_heads_per_cta(int D, int m, int group, int max_smem) {
  int best = 1;
  for (int d = 1; d <= group && d * m <= 256; ++d)
    if (group % d == 0 && rep_smem_layout(D, m, d).total <= max_smem) best = d;
  return best;
}

// Host launcher (one kernel launch; the caller checks it). p.heads_per_cta must come from
// rep_heads_per_cta.
template <bool kBf16, int kD>
cudaError_t launch_rep(const RepParams& p, int batch, cudaStream_t stream) {
  const RepSmem L = rep_smem_layout(kD, p.rows, p.heads_per_cta);
  auto kernel = rep_kernel<kBf16, kD>;
  // The shared-memory limit is raised to the device's opt-in maximum once per device (the
  // same value from every thread), not on every call.
  static std::atomic<uint64_t> raised{0};  // bit d: done on device d (d < 64)
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (dev >= 64 || !((raised.load(std::memory_order_acquire) >> dev) & 1u)) {
    int optin = 0;
    err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    if (err != cudaSuccess) return err;
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, optin);
    if (err != cudaSuccess) return err;
    if (dev < 64) raised.fetch_or(uint64_t(1) << dev, std::memory_order_acq_rel);
  }
  dim3 grid(p.heads_q / p.heads_per_cta, p.num_splits, batch);
  kernel<<<grid, p.rows * p.heads_per_cta, L.total, stream>>>(p);
  return cudaGetLastError();
}

// Dispatch on dtype and head dim (rep_attention.cu); cudaErrorInvalidValue for a head dim
// without an instantiation (the op's checks refuse those first).
cudaError_t launch_rep_any(const RepParams& p, int batch, bool is_bf16, int head_dim, cudaStream_t stream);

}  // namespace selection
}  // namespace flexprefill
