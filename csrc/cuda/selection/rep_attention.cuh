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
// No per-element max: sums are taken against the row's reference (the split's first tile
// sets it to the tile's row maximum) and the exact rescaling path runs only when a sum
// would leave (0, 2^64] (a much larger logit): exact, since any reference works as long
// as nothing overflows, and a reference above the row's values only drops terms < 2^-126
// of the max.
//
// The same kernel also writes pool(K) [B, Hkv, NBk, D] (from the K tiles in shared memory;
// the CTAs of a kv head's split pool a share of the columns each; the Hopper kernel at D = 64
// sums them on the tensor cores instead: rep_sm90_pools_k_mma) and mean(Q̂) [B, Hq, D] (split 0).
//
// This file: the portable (sm80+) kernel and the code it shares with the Hopper one
// (rep_attention_sm90.cuh; rep_config picks). One CTA = `heads_per_cta` query heads of one
// GQA group x one split of `split_keys` keys; m / 32 warps per head, each owning 32 rows
// (two m16 tiles, so every B fragment feeds four mma). Q̂ stays in shared memory (A
// fragments by ldmatrix at every k-step); K streams through a kStages-deep cp.async ring
// of 64-key tiles that all the CTA's heads share, one __syncthreads per tile.
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
  float* poolq;      // [B, Hq, NBq, D] pool(Q) of every head (rep_sm90_pools_q kernels), or nullptr
  int num_q_blocks;
  int sm90;          // the wgmma kernel with 16 * sm90 rows a warp (1 or 2), or 0: mma.sync (rep_config)
};


// K pooling partials per parity of the key block for a CTA of up to `threads` threads:
// [phases][pairs][2] <= 2 max(threads, D / 2) floats.
constexpr int rep_pool_part_floats(int threads, int D) { return 2 * (threads > D / 2 ? threads : D / 2); }

// Shared-memory layout (bytes), the same on host and device.
struct RepSmem {
  int q_off, k_off, pool_off, bar_off, total;  // (bar_off: the Hopper kernel's mbarriers)
  int qp_off = 0;  // the Hopper kernel's pool(Q) buffer (rep_sm90_pools_q)
  int ones_off = 0;  // the Hopper kernel's 512 B of ones (its pooling wgmma)
};

__host__ __device__ inline int rep_row_stride(int D) { return D + 8; }  // +16 B: no ldmatrix conflicts

__host__ __device__ inline RepSmem rep_smem_layout(int D, int m, int heads_per_cta) {
  auto up = [](int x) { return (x + 15) / 16 * 16; };
  const int ld = rep_row_stride(D), threads = heads_per_cta * m;
  RepSmem s;
  s.q_off = 0;
  s.k_off = up(heads_per_cta * m * ld * 2);
  s.pool_off = s.k_off + up(rep_stages(D) * kTileKeys * ld * 2);
  s.total = s.pool_off + 2 * rep_pool_part_floats(256, D) * 4;  // two parities of K-pooling partials
  (void)threads;
  return s;
}

// mean(Q̂) [B, Hq, D] of the CTA's heads (split 0 of both kernels): thread per (head, dim),
// the m rows summed in order; bits(hl, r, d) -> the stored element of head hl's row r.
template <bool kBf16, int kD, typename Bits>
__device__ __forceinline__ void rep_qhat_mean(const RepParams& p, int b, int h_first, int hpc, int m, int tid,
                                              int nthreads, Bits bits) {
  for (int idx = tid; idx < hpc * kD; idx += nthreads) {
    const int hl = idx / kD, d = idx - hl * kD;
    float s = 0.f;
    for (int r = 0; r < m; ++r) {
      const uint16_t x = bits(hl, r, d);
      s += kBf16 ? __uint_as_float(static_cast<uint32_t>(x) << 16) : __half2float(__ushort_as_half(x));
    }
    p.qhat_mean[(static_cast<int64_t>(b) * p.heads_q + h_first + hl) * kD + d] = s / static_cast<float>(m);
  }
}

__device__ __forceinline__ float fast_exp2(float x) {  // 2^x; -inf -> 0 (ex2.approx.ftz)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Per-thread state of the representative rows of one thread: kSlots rows, slot s = row
// row0 + 8 s + g of the warp's rows (g = lane / 4). m_ref: the row's reference (log2 units;
// -inf until a key is seen); every sum is against 2^(m_ref or 0 while -inf). hs / ls: the
// current block's H / L; l_run: the split's total; off_row: (P0 + row) mod bs, the last
// in-block key offset counted in H. Warp-uniform: all_ref, every row of the warp has a
// reference (a reference never returns to -inf); straight, no row of the warp wraps to the
// next key block (off_row[s] = off_row[0] + 8 s).
template <int kSlots>
struct RepRows {
  float m_ref[kSlots], hs[kSlots], ls[kSlots], l_run[kSlots];
  int off_row[kSlots];
  bool all_ref, straight;

  __device__ __forceinline__ void init(int first_pos, int g, int bs) {  // first_pos = P0 + row0
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      m_ref[s] = -INFINITY;
      hs[s] = 0.f;
      ls[s] = 0.f;
      l_run[s] = 0.f;
      off_row[s] = (first_pos + 8 * s + g) & (bs - 1);  // bs is a power of two
    }
    all_ref = false;
    straight = __all_sync(0xffffffffu, off_row[kSlots - 1] == off_row[0] + 8 * (kSlots - 1));
  }
};

// Where one tile of keys lies for the epilogue.
struct RepTile {
  int kt;                // first key of the tile
  int base;              // offset of the tile in its key block
  bool first_in_block, last_in_block;
};

// Maximum of row slot s of a warp's scores over the tile (the four lanes of a quad share a row).
template <int kM16>
__device__ __forceinline__ float rep_row_max(const float (&acc)[kM16][8][4], int s) {
  float tmax = -INFINITY;
#pragma unroll
  for (int n = 0; n < 8; ++n)
#pragma unroll
    for (int x = 0; x < 2; ++x) tmax = fmaxf(tmax, acc[s >> 1][n][2 * (s & 1) + x]);
  tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 1));
  return fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 2));
}

// Sum over the four lanes of a quad of v[t4] (slot t4 < kSlots), as a reduce-scatter: two
// exchanges (kSlots = 4: three shuffles) instead of a butterfly per slot. Lanes t4 >= kSlots
// get a partial sum (not stored).
template <int kSlots>
__device__ __forceinline__ float rep_quad_scatter(const float (&v)[kSlots], int t4) {
  static_assert(kSlots == 2 || kSlots == 4, "two or four row slots");
  const bool odd = t4 & 1;
  if constexpr (kSlots == 4) {
    float k0 = odd ? v[1] : v[0];  // keep slot odd (and 2 + odd), send the other of each pair
    float k1 = odd ? v[3] : v[2];
    k0 += __shfl_xor_sync(0xffffffffu, odd ? v[0] : v[1], 1);
    k1 += __shfl_xor_sync(0xffffffffu, odd ? v[2] : v[3], 1);
    const bool hi = t4 & 2;  // keep slot t4 = 2 hi + odd
    return (hi ? k1 : k0) + __shfl_xor_sync(0xffffffffu, hi ? k0 : k1, 2);
  } else {
    float k = odd ? v[1] : v[0];
    k += __shfl_xor_sync(0xffffffffu, odd ? v[0] : v[1], 1);
    return k + __shfl_xor_sync(0xffffffffu, k, 2);
  }
}

// The sums of a tile that the diagonal crosses, slot by slot (branches outside the slot loop:
// the rows' chains interleave): per key parity x the running sum t2[x] over n; the H keys of
// parity x are its first terms (in_h(s, n, x): key 8 n + x is in slot s's H), so H is the
// running sum at the last of them (h2[x] keeps it: one select instead of a second sum).
// L = T - H: exact up to one rounding of T (H is a prefix of T's terms, so 0 <= H <= T also
// in floating point), which is negligible against the row's mass.
template <int kM16, typename InH>
__device__ __forceinline__ void rep_mixed_sums(const float (&acc)[kM16][8][4], float scale_log2,
                                               const float (&neg_ref)[2 * kM16], InH in_h, float (&t_h)[2 * kM16],
                                               float (&t_l)[2 * kM16]) {
#pragma unroll
  for (int s = 0; s < 2 * kM16; ++s) {
    float h2[2] = {0.f, 0.f}, t2[2] = {0.f, 0.f};
#pragma unroll
    for (int n = 0; n < 8; ++n)
#pragma unroll
      for (int x = 0; x < 2; ++x) {
        t2[x] += fast_exp2(fmaf(acc[s >> 1][n][2 * (s & 1) + x], scale_log2, neg_ref[s]));
        h2[x] = in_h(s, n, x) ? t2[x] : h2[x];
      }
    t_h[s] = h2[0] + h2[1];
    t_l[s] = fmaxf((t2[0] + t2[1]) - t_h[s], 0.f);
  }
}

// The softmax sums of one 64-key tile from the scores of kM16 m16 row tiles of a warp:
// acc[mt][n][2 hf + x] is row slot s = 2 mt + hf (row row0 + 8 s + g), key kt + 8 n + 2 t4 + x.
// Updates the rows' references and sums; at the end of key block c stores the block's
// records (M, H, L) of the warp's 8 kM16 x 2 rows at rec_head + c 3 m (rec_head = rec +
// head NBk 3 m + row0).
template <int kM16>
__device__ __forceinline__ void rep_tile_sums(float (&acc)[kM16][8][4], RepRows<2 * kM16>& st, const RepTile& tl,
                                              int first_pos, float scale_log2, float* rec_head, int c, int m, int g,
                                              int t4) {
  constexpr int kSlots = 2 * kM16;
  const int kt = tl.kt;
  const bool need_mask = kt + kTileKeys - 1 > first_pos;  // some key past some row's position
  if (need_mask) {
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      const int pos = first_pos + 8 * s + g;  // absolute position of the row
#pragma unroll
      for (int n = 0; n < 8; ++n)
#pragma unroll
        for (int x = 0; x < 2; ++x)
          if (kt + 8 * n + 2 * t4 + x > pos) acc[s >> 1][n][2 * (s & 1) + x] = -INFINITY;
    }
  }
  if (tl.first_in_block) {
#pragma unroll
    for (int s = 0; s < kSlots; ++s) st.hs[s] = st.ls[s] = 0.f;
  }
  // Keys 8 n + x of this thread (offsets base + 2 t4 + 8 n + x in the block) count in H
  // iff 8 n + x <= lim; the tile is "mixed" for the warp when some thread-row has both.
  int lim[kSlots];
  bool mixed_own = false;
#pragma unroll
  for (int s = 0; s < kSlots; ++s) {
    lim[s] = st.off_row[s] - tl.base - 2 * t4;
    mixed_own |= lim[s] >= 0 && lim[s] < 57;
  }
  const bool mixed = __any_sync(0xffffffffu, mixed_own);

  // A row without a reference yet (the split's first tiles) takes the tile's row maximum.
  if (!st.all_ref) {
    bool no_ref = false;
#pragma unroll
    for (int s = 0; s < kSlots; ++s) no_ref |= st.m_ref[s] == -INFINITY;
    if (__any_sync(0xffffffffu, no_ref)) {
#pragma unroll
      for (int s = 0; s < kSlots; ++s) {
        const float tmax = rep_row_max<kM16>(acc, s);
        if (st.m_ref[s] == -INFINITY) st.m_ref[s] = tmax * scale_log2;  // (sums are 0 while -inf)
      }
    }
    no_ref = false;
#pragma unroll
    for (int s = 0; s < kSlots; ++s) no_ref |= st.m_ref[s] == -INFINITY;
    st.all_ref = !__any_sync(0xffffffffu, no_ref);
  }

  // Fast path: e = 2^(x - ref) against the row's reference, no max. Taken when every sum
  // stays finite and <= 2^64 and every row has a reference; otherwise (a much larger logit,
  // a row whose keys are all masked so far) the exact path below.
  float t_h[kSlots], t_l[kSlots], neg_ref[kSlots];
#pragma unroll
  for (int s = 0; s < kSlots; ++s) neg_ref[s] = -(st.m_ref[s] == -INFINITY ? 0.f : st.m_ref[s]);
  if (mixed && st.straight) {
    // lim[s] = lim[0] + 8 s: key 8 n + x is in slot s's H iff 8 (n - s) + x <= lim[0], one
    // compare per diagonal offset n - s shared by the slots (22 instead of 64 per thread).
    rep_mixed_sums<kM16>(acc, scale_log2, neg_ref, [&](int s, int n, int x) { return 8 * (n - s) + x <= lim[0]; },
                         t_h, t_l);
  } else if (mixed) {
    rep_mixed_sums<kM16>(acc, scale_log2, neg_ref, [&](int s, int n, int x) { return 8 * n + x <= lim[s]; }, t_h,
                         t_l);
  } else {
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      float t4s[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int n = 0; n < 8; ++n)
#pragma unroll
        for (int x = 0; x < 2; ++x)
          t4s[2 * (n & 1) + x] += fast_exp2(fmaf(acc[s >> 1][n][2 * (s & 1) + x], scale_log2, neg_ref[s]));
      const float t = (t4s[0] + t4s[1]) + (t4s[2] + t4s[3]);
      t_h[s] = lim[s] >= 0 ? t : 0.f;
      t_l[s] = lim[s] >= 0 ? 0.f : t;
    }
  }
  // Every slot's sum <= 2^64 when their total is (all terms >= 0; NaN fails too).
  float total = 0.f;
#pragma unroll
  for (int s = 0; s < kSlots; ++s) total += t_h[s] + t_l[s];
  bool bad = !(total <= 1.8446744e19f);
  if (!st.all_ref) {
#pragma unroll
    for (int s = 0; s < kSlots; ++s) bad |= st.m_ref[s] == -INFINITY;
  }
  if (!__any_sync(0xffffffffu, bad)) {
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      st.hs[s] += t_h[s];
      st.ls[s] += t_l[s];
      st.l_run[s] += t_h[s] + t_l[s];
    }
  } else {  // exact path: the tile's row max becomes the reference (rare, warp-uniform)
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      const float tmax = rep_row_max<kM16>(acc, s);
      const float m_new = fmaxf(st.m_ref[s], tmax * scale_log2);
      const float use = m_new == -INFINITY ? 0.f : m_new;
      if (st.m_ref[s] != -INFINITY) {  // earlier sums were against m_ref (else they are 0)
        const float alpha = fast_exp2(st.m_ref[s] - use);
        st.hs[s] *= alpha;
        st.ls[s] *= alpha;
        st.l_run[s] *= alpha;
      }
      st.m_ref[s] = m_new;
      float sh = 0.f, sl = 0.f;
#pragma unroll
      for (int n = 0; n < 8; ++n)
#pragma unroll
        for (int x = 0; x < 2; ++x) {
          const float e = fast_exp2(fmaf(acc[s >> 1][n][2 * (s & 1) + x], scale_log2, -use));
          const bool in_h = 8 * n + x <= lim[s];
          sh += in_h ? e : 0.f;
          sl += in_h ? 0.f : e;
        }
      st.hs[s] += sh;
      st.ls[s] += sl;
      st.l_run[s] += sh + sl;
    }
  }

  if (tl.last_in_block) {  // reduce over the quad; lane t4 < kSlots stores slot t4 (row row0 + 8 t4 + g)
    const float hv = rep_quad_scatter<kSlots>(st.hs, t4);
    const float lv = rep_quad_scatter<kSlots>(st.ls, t4);
    float mv = 0.f;
#pragma unroll
    for (int s = 0; s < kSlots; ++s)
      if (t4 == s) mv = st.m_ref[s] == -INFINITY ? 0.f : st.m_ref[s];
    if (t4 < kSlots) {  // 8 kSlots consecutive rows per field
      float* r = rec_head + c * 3 * m + 8 * t4 + g;
      r[0] = mv;
      r[m] = hv;
      r[2 * m] = lv;
    }
  }
}

// The split's row totals (reference, sum), for the row LSE (finish kernel), at
// part_rows = part + (head splits + split) m + row0.
template <int kSlots>
__device__ __forceinline__ void rep_store_split(RepRows<kSlots>& st, float* part_ref_rows, float* part_sum_rows,
                                                int g, int t4) {
#pragma unroll
  for (int s = 0; s < kSlots; ++s) {
    st.l_run[s] += __shfl_xor_sync(0xffffffffu, st.l_run[s], 1);
    st.l_run[s] += __shfl_xor_sync(0xffffffffu, st.l_run[s], 2);
  }
  float rv = 0.f, lv = 0.f;
#pragma unroll
  for (int s = 0; s < kSlots; ++s)
    if (t4 == s) {
      rv = st.m_ref[s] == -INFINITY ? 0.f : st.m_ref[s];
      lv = st.l_run[s];
    }
  if (t4 < kSlots) {
    part_ref_rows[8 * t4 + g] = rv;
    part_sum_rows[8 * t4 + g] = lv;
  }
}

// pool(K) of the K tiles in shared memory: the group / hpc CTAs of a kv head (same split)
// pool a share of the column pairs each (all pairs in the first when the shares would not
// be equal). Thread -> key phase kph (keys kph, kph + nph, ...) and one column pair (two
// when the CTA has fewer threads than pairs: D = 256 with 64 rows). Partials per parity of
// the key block: [2][kPartFloats] (kMaxThreads: the kernel's largest CTA).
template <bool kBf16, int kD, int kMaxThreads, int kMinThreads>
struct RepKPool {
  static constexpr int kPartFloats = rep_pool_part_floats(kMaxThreads, kD);
  static constexpr int kPairs = kMinThreads < kD / 2 ? 2 : 1;  // column pairs a thread may own
  bool pools;  // this CTA pools a share of the columns
  int npl, pair_begin, nph, kph, pr0, nthreads;
  bool pair_ok[kPairs];
  float2 acc[kPairs];

  __device__ __forceinline__ void init(int tid, int threads, int group, int hpc, int h_first) {
    constexpr int npairs = kD / 2;
    const int kv_ctas = group / hpc, kv_cta = (h_first % group) / hpc;
    const bool share = npairs % kv_ctas == 0;
    pools = share || kv_cta == 0;
    npl = share ? npairs / kv_ctas : npairs;
    pair_begin = share ? kv_cta * npl : 0;
    nthreads = threads;
    nph = threads >= npl ? threads / npl : 1;
    kph = tid / npl;
    pr0 = tid % npl;
    pair_ok[0] = kph < nph;
    if constexpr (kPairs == 2) pair_ok[1] = threads < npl && pr0 + threads < npl;
#pragma unroll
    for (int j = 0; j < kPairs; ++j) acc[j] = make_float2(0.f, 0.f);
  }
  // Column sums of one tile; word(r, pr) -> the packed pair pr (global column pair) of key r.
  template <typename Word>
  __device__ __forceinline__ void add_tile(Word word) {
#pragma unroll
    for (int j = 0; j < kPairs; ++j) {
      if (!pair_ok[j]) continue;
      const int pr = pair_begin + pr0 + j * nthreads;
      for (int r = kph; r < kTileKeys; r += nph) {
        const float2 v = unpack2<kBf16>(word(r, pr));
        acc[j].x += v.x;
        acc[j].y += v.y;
      }
    }
  }
  // The same when the pair's word of key r lies at addr(pr) + r * row_bytes (the thread's
  // keys kph + i nph): one address increment per key.
  template <typename Addr>
  __device__ __forceinline__ void add_tile_linear(Addr addr, int row_bytes) {
#pragma unroll
    for (int j = 0; j < kPairs; ++j) {
      if (!pair_ok[j]) continue;
      const unsigned char* a = addr(pair_begin + pr0 + j * nthreads) + kph * row_bytes;
      const int step = nph * row_bytes;
      auto add = [&](const unsigned char* key) {  // the pair's two values of one key
        const float2 v = unpack2<kBf16>(*reinterpret_cast<const uint32_t*>(key));
        acc[j].x += v.x;
        acc[j].y += v.y;
      };
      auto keys = [&](auto n_keys) {  // n_keys keys a thread, unrolled
#pragma unroll
        for (int i = 0; i < decltype(n_keys)::value; ++i) add(a + i * step);
      };
      if (nph == kTileKeys / 4) {  // (the usual shapes: 4 or 8 keys a thread)
        keys(std::integral_constant<int, 4>{});
      } else if (nph == kTileKeys / 8) {
        keys(std::integral_constant<int, 8>{});
      } else {
#pragma unroll 4
        for (int r = kph; r < kTileKeys; r += nph, a += step) add(a);
      }
    }
  }
  // At the end of key block c: the thread's partials to shared memory.
  __device__ __forceinline__ void stash(float* pool_part, int c) {
    float* part = pool_part + (c & 1) * kPartFloats;
#pragma unroll
    for (int j = 0; j < kPairs; ++j) {
      if (!pair_ok[j]) continue;
      const int pr = pr0 + j * nthreads;
      part[(kph * npl + pr) * 2] = acc[j].x;
      part[(kph * npl + pr) * 2 + 1] = acc[j].y;
      acc[j] = make_float2(0.f, 0.f);
    }
  }
  // pool(K)[blk] from the partials of parity blk & 1 (after a barrier).
  __device__ __forceinline__ void flush(const float* pool_part, const RepParams& p, int b, int hk, int blk,
                                        int tid) const {
    const float* part = pool_part + (blk & 1) * kPartFloats;
    const int count = min(p.block_size, p.seqlen_k - blk * p.block_size);
    for (int dl = tid; dl < 2 * npl; dl += nthreads) {
      // four independent sums (the loads do not wait on each other), then combined
      const float* src = part + (dl >> 1) * 2 + (dl & 1);
      const int step = 2 * npl;
      float s4[4] = {0.f, 0.f, 0.f, 0.f};
      int ph = 0;
      for (; ph + 4 <= nph; ph += 4) {
#pragma unroll
        for (int i = 0; i < 4; ++i) s4[i] += src[(ph + i) * step];
      }
      for (; ph < nph; ++ph) s4[0] += src[ph * step];
      const float s = (s4[0] + s4[1]) + (s4[2] + s4[3]);
      p.pool_k[((static_cast<int64_t>(b) * p.heads_kv + hk) * p.num_k_blocks + blk) * kD + 2 * pair_begin + dl] =
          s / static_cast<float>(count);
    }
  }
};

// End of a split (both kernels): the rows' running (reference, sum) into part_ref / part_sum,
// then pool(K) of the split's last block, last_block() (when this CTA pools and has tiles).
template <int kSlots, typename Pool, typename LastBlock>
__device__ __forceinline__ void rep_split_end(RepRows<kSlots>& st, const Pool& pool, const RepParams& p,
                                              float* pool_part, int64_t head, int split, int m, int row0, int b, int hk,
                                              int ntile, LastBlock last_block, int g, int t4, int tid) {
  {
    const int64_t o = (head * p.num_splits + split) * m + row0;
    rep_store_split(st, p.part_ref + o, p.part_sum + o, g, t4);
  }
  cp_async_wait<0>();
  if (pool.pools && ntile > 0) {  // the split's last block
    __syncthreads();
    pool.flush(pool_part, p, b, hk, last_block(), tid);
  }
}

// The portable (sm80+) kernel: mma.sync, Q̂ fragments by ldmatrix at every k-step.
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
  const int ks = split * p.split_keys;
  const int ke = min(ks + p.split_keys, p.seqlen_k);
  const int ntile = (ke - ks + kTileKeys - 1) / kTileKeys;
  const int P0 = p.seqlen_k - m;  // absolute position of representative row 0
  const RepSmem L = rep_smem_layout(kD, m, hpc);
  uint16_t* Qs = reinterpret_cast<uint16_t*>(smem + L.q_off);
  uint16_t* Ks = reinterpret_cast<uint16_t*>(smem + L.k_off);
  float* pool_part = reinterpret_cast<float*>(smem + L.pool_off);  // [2][kPartFloats]

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
  RepRows<4> st;
  st.init(P0 + row0, g, bs);
  float* const rec_head = p.rec + head * p.num_k_blocks * 3 * m + row0;  // (the warp's rows of block 0)

  // Per-lane ldmatrix addresses: A rows (lane & 15), k-half lane >> 4; B keys
  // (lane & 7) + 8 * (lane >> 4), k-half (lane >> 3) & 1.
  const uint32_t q_addr = smem_u32(Qs + (warp * kRowsPerWarp + (lane & 15)) * ld + (lane >> 4) * 8);
  const int b_row = (lane & 7) + ((lane >> 4) << 3), b_col = ((lane >> 3) & 1) * 8;

  RepKPool<kBf16, kD, 256, 32> pool;
  pool.init(tid, nthreads, group, hpc, h_first);

  cp_async_wait<kStages - 2>();  // Q̂ and tile 0 have landed (for this thread)
  __syncthreads();
  if (split == 0)
    rep_qhat_mean<kBf16, kD>(p, b, h_first, hpc, m, tid, nthreads,
                             [&](int hl, int r, int d) { return Qs[(hl * m + r) * ld + d]; });
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
    RepTile tl;
    tl.kt = ks + tile * kTileKeys;
    const int c = tl.kt >> bs_shift;  // key block of the tile
    tl.base = tl.kt & (bs - 1);       // offset of the tile in it
    tl.first_in_block = tl.base == 0;
    tl.last_in_block = tl.base + kTileKeys == bs || tile == ntile - 1;
    const uint16_t* Kt = Ks + buf * kTileKeys * ld;

    if (pool.pools) {  // column sums of the block, per thread column pair and key phase
      pool.add_tile([&](int r, int pr) { return *reinterpret_cast<const uint32_t*>(Kt + r * ld + 2 * pr); });
      // The previous block's partials were written before this tile's barrier.
      if (tl.first_in_block && c > ks / bs) pool.flush(pool_part, p, b, hk, c - 1, tid);
    }

    const uint32_t k_addr = smem_u32(Kt + b_row * ld + b_col);
    float acc[2][8][4];
#pragma unroll
    for (int st_ = 0; st_ < kSteps; ++st_) {
      uint32_t a0[4], a1[4];
      ldmatrix_x4(a0, q_addr + st_ * 32);
      ldmatrix_x4(a1, q_addr + (16 * ld + st_ * 16) * 2);
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        uint32_t bb[4];
        ldmatrix_x4(bb, k_addr + (np * 16 * ld + st_ * 16) * 2);
        if (st_ == 0) {
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
    rep_tile_sums<2>(acc, st, tl, P0 + row0, p.scale_log2, rec_head, c, m, g, t4);
    if (pool.pools && tl.last_in_block) pool.stash(pool_part, c);
  }
  rep_split_end(st, pool, p, pool_part, head, split, m, row0, b, hk, ntile,
                [&] { return (ks + (ntile - 1) * kTileKeys) / bs; }, g, t4, tid);
}

// Largest heads_per_cta dividing the GQA group with <= 256 threads and fitting shared memory.
inline int rep_heads_per_cta(int D, int m, int group, int max_smem) {
  int best = 1;
  for (int d = 1; d <= group && d * m <= 256; ++d)
    if (group % d == 0 && rep_smem_layout(D, m, d).total <= max_smem) best = d;
  return best;
}

// Raises `kernel`'s dynamic shared-memory limit to the device's opt-in maximum (less the
// kernel's static shared memory: asking for more fails with invalid value) once per device
// (`raised`, bit d: done on device d < 64; the same value from every thread), not on every
// call.
inline cudaError_t raise_smem_limit_once(const void* kernel, std::atomic<uint64_t>& raised) {
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (dev < 64 && ((raised.load(std::memory_order_acquire) >> dev) & 1u)) return cudaSuccess;
  int optin = 0;
  err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err != cudaSuccess) return err;
  cudaFuncAttributes fa{};  // the limit covers the dynamic part: the opt-in maximum less static smem
  err = cudaFuncGetAttributes(&fa, kernel);
  if (err != cudaSuccess) return err;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             optin - static_cast<int>(fa.sharedSizeBytes));
  if (err != cudaSuccess) return err;
  if (dev < 64) raised.fetch_or(uint64_t(1) << dev, std::memory_order_acq_rel);
  return cudaSuccess;
}

// Host launcher (one kernel launch; the caller checks it). p.heads_per_cta must come from
// rep_config.
template <bool kBf16, int kD>
cudaError_t launch_rep(const RepParams& p, int batch, cudaStream_t stream) {
  const RepSmem L = rep_smem_layout(kD, p.rows, p.heads_per_cta);
  auto kernel = rep_kernel<kBf16, kD>;
  static std::atomic<uint64_t> raised{0};
  cudaError_t err = raise_smem_limit_once(reinterpret_cast<const void*>(kernel), raised);
  if (err != cudaSuccess) return err;
  dim3 grid(p.heads_q / p.heads_per_cta, p.num_splits, batch);
  kernel<<<grid, p.rows * p.heads_per_cta, L.total, stream>>>(p);
  return cudaGetLastError();
}

// Which rep kernel runs on a device, and its launch shape: the wgmma kernel
// (rep_attention_sm90.cuh) on sm_90 when the build has sm_90a code (FLEXPREFILL_SM90A), the
// head dim is a multiple of 64 and m of 64; else the portable mma.sync kernel.
struct RepConfig {
  int sm90 = 0;  // RepParams::sm90
  int heads_per_cta = 1;
  int ctas_per_sm = 1;  // resident CTAs per SM (the plan's split rule)
  bool pools_q = false;  // the kernel can also write pool(Q) of every head (RepParams::poolq)
};
RepConfig rep_config(const cudaDeviceProp& prop, int head_dim, int m, int group);

// Dispatch on p.sm90, dtype and head dim (rep_attention.cu); cudaErrorInvalidValue for a
// head dim without an instantiation (the op's checks refuse those first).
cudaError_t launch_rep_any(const RepParams& p, int batch, bool is_bf16, int head_dim, cudaStream_t stream);

}  // namespace selection
}  // namespace flexprefill
