// Portable (sm80+) block-sparse FlashAttention-2-style forward kernel (design.md §1 step 6).
//
// Grid: x = query head, y = query tile (reversed: the late tiles, which see the most
// keys, start first), z = batch. Heads are the fastest grid dimension so that the CTAs
// running together share key/value heads (GQA) and key ranges in L2.
//
// A CTA owns kBlockM query rows [m0, m0 + kBlockM) of one (b, h); they lie in query block
// r = m0 / bs and walk that block's selected key blocks kv_index[b, h, r, :kv_count], each
// cut into bs / kBlockN key tiles. Tiles that no row of the CTA can see (past the causal
// boundary, or past seqlen_k) are not visited. Per tile: S = Q K^T (fp32), the token-level
// causal mask where the tile crosses the boundary, online softmax in base 2, O += P V.
// K and V tiles are double-buffered with cp.async: tile t+1 loads while tile t computes.
// Framework-free.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "cuda/attention/kernel_traits.h"
#include "cuda/ptx.cuh"
#include "params.h"

namespace flexprefill {
namespace attention {

// Copy `kRows` rows of head_dim elements from global (row `row0` on, rows >= row_limit
// zero-filled) into a padded shared-memory tile, 16 bytes per thread per step, coalesced
// along each row.
template <typename Traits, int kRows>
__device__ __forceinline__ void load_tile_async(typename Traits::Element* smem,
                                                const typename Traits::Element* gbase,
                                                int64_t row_stride, int64_t row0, int64_t row_limit,
                                                int tid) {
  using Element = typename Traits::Element;
  constexpr int kChunks = Traits::kHeadDim / 8;  // 16-byte chunks per row
  constexpr int kNThreads = Traits::kNThreads;
  if constexpr (kNThreads % kChunks == 0 && kRows % (kNThreads / kChunks) == 0) {
    // Each thread copies the same chunk of every kRowStep-th row: one 64-bit address
    // computation per tile, then pointer increments.
    constexpr int kRowStep = kNThreads / kChunks;
    const int row = tid / kChunks, col = (tid % kChunks) * 8;
    const Element* src = gbase + (row0 + row) * row_stride + col;
    const int64_t src_step = kRowStep * row_stride;
    const uint32_t dst = smem_u32(smem + row * Traits::kSmemStride + col);
    constexpr uint32_t kDstStep = kRowStep * Traits::kSmemStride * 2;  // bytes
    if (row0 + kRows <= row_limit) {
#pragma unroll
      for (int i = 0; i < kRows / kRowStep; ++i, src += src_step) cp_async_16(dst + i * kDstStep, src);
    } else {
      const int64_t left = row_limit - row0 - row;  // rows of this thread still inside
#pragma unroll
      for (int i = 0; i < kRows / kRowStep; ++i, src += src_step) {
        const bool valid = i * kRowStep < left;
        cp_async_16(dst + i * kDstStep, valid ? src : gbase, valid);
      }
    }
  } else {  // head dims whose chunk count does not divide the thread count (80, 96)
    constexpr int kTotal = kRows * kChunks;
#pragma unroll
    for (int i = 0; i < (kTotal + kNThreads - 1) / kNThreads; ++i) {
      const int idx = tid + i * kNThreads;
      if (kTotal % kNThreads == 0 || idx < kTotal) {
        const int row = idx / kChunks;
        const int chunk = idx - row * kChunks;
        const bool valid = row0 + row < row_limit;
        const Element* src = valid ? gbase + (row0 + row) * row_stride + chunk * 8 : gbase;
        cp_async_16(smem_u32(smem + row * Traits::kSmemStride + chunk * 8), src, valid);
      }
    }
  }
}

template <typename Traits>
__global__ void __launch_bounds__(Traits::kNThreads)
    block_sparse_fwd_kernel(const __grid_constant__ AttentionParams p) {
  using Element = typename Traits::Element;
  constexpr int kD = Traits::kHeadDim;
  constexpr int kBM = Traits::kBlockM;
  constexpr int kBN = Traits::kBlockN;
  constexpr int kNThreads = Traits::kNThreads;
  constexpr int kStride = Traits::kSmemStride;
  constexpr int kWarpRows = kBM / Traits::kNWarps;
  constexpr int kMF = kWarpRows / 16;  // 16-row fragments per warp
  constexpr int kNF = kBN / 8;         // 8-key fragments of S
  constexpr int kDF = kD / 8;          // 8-column fragments of O
  constexpr int kKS = kD / 16;         // K steps of S = Q K^T
  constexpr int kPS = kBN / 16;        // K steps of O += P V

  extern __shared__ __align__(16) unsigned char smem_raw[];
  Element* sQ = reinterpret_cast<Element*>(smem_raw);  // [kBM][kStride], later O staging
  Element* sK = sQ + kBM * kStride;                     // [2][kBN][kStride]
  Element* sV = sK + 2 * kBN * kStride;                 // [2][kBN][kStride]

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int64_t h = blockIdx.x;
  const int64_t b = blockIdx.z;
  const int64_t m0 = (static_cast<int64_t>(gridDim.y) - 1 - blockIdx.y) * kBM;
  const int64_t hkv = h / (p.heads_q / p.heads_kv);
  const int64_t Nq = p.seqlen_q, Nk = p.seqlen_k;
  const int64_t off = Nk - Nq;  // query row i sits at absolute position off + i
  const int64_t bs = p.block_size;
  const int64_t r = m0 / bs;
  const int64_t m_rows = Nq - m0 < kBM ? Nq - m0 : kBM;
  const int64_t n_end = off + m0 + m_rows;  // keys [0, n_end) can be visible to this tile; <= Nk

  // The selected key blocks of query block r, ascending. Blocks at or past n_end are
  // invisible to every row of this tile: drop them from the end.
  const int32_t* list = p.kv_index + b * p.idx_batch_stride + h * p.idx_head_stride + r * p.idx_row_stride;
  int64_t count = p.kv_count[b * p.cnt_batch_stride + h * p.cnt_head_stride + r * p.cnt_row_stride];
  count = count < 0 ? 0 : (count > p.max_blocks ? p.max_blocks : count);  // memory safety without validate
  while (count > 0 && static_cast<int64_t>(list[count - 1]) * bs >= n_end) --count;
  const int n_sub = static_cast<int>(bs / kBN);  // key tiles per key block
  int num_tiles = 0;
  if (count > 0) {
    const int64_t last_start = static_cast<int64_t>(list[count - 1]) * bs;
    const int64_t last_tiles = (n_end - last_start + kBN - 1) / kBN;
    num_tiles = static_cast<int>((count - 1) * n_sub + (last_tiles < n_sub ? last_tiles : n_sub));
  }
  // Walks the tiles in order: (block position in the list, key tile inside the block).
  int cur_blk = 0, cur_sub = 0;
  auto next_start = [&]() -> int64_t {
    int64_t c = list[cur_blk];
    c = c < 0 ? 0 : (c >= p.num_k_blocks ? p.num_k_blocks - 1 : c);
    const int64_t start = c * bs + static_cast<int64_t>(cur_sub) * kBN;
    if (++cur_sub == n_sub) {
      cur_sub = 0;
      ++cur_blk;
    }
    return start;
  };

  const Element* q_base = static_cast<const Element*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
  const Element* k_base = static_cast<const Element*>(p.k) + b * p.k_batch_stride + hkv * p.k_head_stride;
  const Element* v_base = static_cast<const Element*>(p.v) + b * p.v_batch_stride + hkv * p.v_head_stride;

  // Per thread: rows (lane / 4) and (lane / 4 + 8) of each of its 16-row fragments.
  float acc_o[kMF][kDF][4];
  float row_max[kMF][2];
  float row_sum[kMF][2];
#pragma unroll
  for (int mf = 0; mf < kMF; ++mf) {
#pragma unroll
    for (int df = 0; df < kDF; ++df)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_o[mf][df][e] = 0.f;
    row_max[mf][0] = row_max[mf][1] = -INFINITY;
    row_sum[mf][0] = row_sum[mf][1] = 0.f;
  }

  const float scale_log2 = p.softmax_scale * static_cast<float>(M_LOG2E);
  const int warp_row0 = warp * kWarpRows;  // first tile row of this warp

  // Key starts of the current and the next tile. The index of tile t + 2 is read one
  // iteration before it is needed, so its global-memory latency stays off the path that
  // issues the loads.
  int64_t n_cur = 0, n_next = 0;
  if (num_tiles > 0) {
    n_cur = next_start();
    n_next = num_tiles > 1 ? next_start() : 0;
    load_tile_async<Traits, kBM>(sQ, q_base, p.q_row_stride, m0, Nq, tid);
    load_tile_async<Traits, kBN>(sK, k_base, p.k_row_stride, n_cur, Nk, tid);
    cp_async_commit();
    load_tile_async<Traits, kBN>(sV, v_base, p.v_row_stride, n_cur, Nk, tid);
    cp_async_commit();
  }

  // ldmatrix lane -> (row, column) offsets inside a 16x16 operand tile.
  const int a_row = (lane & 7) + ((lane >> 3) & 1) * 8, a_col = (lane >> 4) * 8;  // Q (A), V (B, trans)
  const int b_row = (lane & 7) + (lane >> 4) * 8, b_col = ((lane >> 3) & 1) * 8;  // K (B)

  for (int t = 0; t < num_tiles; ++t) {
    const int buf = t & 1;
    Element* sK_t = sK + buf * kBN * kStride;
    Element* sV_t = sV + buf * kBN * kStride;
    const int64_t n0 = n_cur;

    cp_async_wait<1>();  // Q and K_t have landed (V_t may still be in flight)
    __syncthreads();     // ... for every thread; and everyone is done with tile t-1's buffers
    if (t + 1 < num_tiles) {
      load_tile_async<Traits, kBN>(sK + (buf ^ 1) * kBN * kStride, k_base, p.k_row_stride, n_next, Nk, tid);
      cp_async_commit();
      load_tile_async<Traits, kBN>(sV + (buf ^ 1) * kBN * kStride, v_base, p.v_row_stride, n_next, Nk, tid);
      cp_async_commit();
    } else {
      cp_async_commit();  // empty groups keep the wait counts below uniform
      cp_async_commit();
    }
    n_cur = n_next;
    n_next = t + 2 < num_tiles ? next_start() : 0;

    // S = Q K^T for this warp's rows: [kMF x 16] x [kBN] in fp32.
    float acc_s[kMF][kNF][4];
#pragma unroll
    for (int mf = 0; mf < kMF; ++mf)
#pragma unroll
      for (int nf = 0; nf < kNF; ++nf)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_s[mf][nf][e] = 0.f;
#pragma unroll
    for (int ks = 0; ks < kKS; ++ks) {
      uint32_t qa[kMF][4];
#pragma unroll
      for (int mf = 0; mf < kMF; ++mf)
        ldmatrix_x4(qa[mf], smem_u32(sQ + (warp_row0 + mf * 16 + a_row) * kStride + ks * 16 + a_col));
#pragma unroll
      for (int np = 0; np < kNF / 2; ++np) {
        uint32_t kb[4];
        ldmatrix_x4(kb, smem_u32(sK_t + (np * 16 + b_row) * kStride + ks * 16 + b_col));
#pragma unroll
        for (int mf = 0; mf < kMF; ++mf) {
          mma_16816<Element>(acc_s[mf][2 * np], qa[mf], kb[0], kb[1]);
          mma_16816<Element>(acc_s[mf][2 * np + 1], qa[mf], kb[2], kb[3]);
        }
      }
    }

    // Token-level causal mask (bottom-right aligned): key n0 + c is visible to tile row i
    // iff n0 + c <= off + m0 + i, i.e. c - i <= limit. Only tiles crossing the boundary
    // (this includes the tile holding seqlen_k) need it.
    if (n0 + kBN - 1 > off + m0) {
      const int64_t limit64 = off + m0 - n0;  // > -kBN here
      const int limit = limit64 > kBN ? kBN : static_cast<int>(limit64);
#pragma unroll
      for (int mf = 0; mf < kMF; ++mf)
#pragma unroll
        for (int nf = 0; nf < kNF; ++nf)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int row = warp_row0 + mf * 16 + (lane >> 2) + (e >> 1) * 8;
            const int col = nf * 8 + (lane & 3) * 2 + (e & 1);
            if (col - row > limit) acc_s[mf][nf][e] = -INFINITY;
          }
    }

    // Online softmax (base 2). A row that has seen no key yet keeps max -inf; its
    // probabilities and correction are then exp2(-inf) = 0, never NaN.
    // O and the row sums are rescaled only when a row's max moved; once the max has
    // settled (long rows) whole warps skip the kMF * kD / 4 multiplies (exact: the
    // factor would be 1).
    float m_scaled[kMF][2], corr[kMF][2];
    bool moved = false;
#pragma unroll
    for (int mf = 0; mf < kMF; ++mf)
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        float mx = row_max[mf][hr];
#pragma unroll
        for (int nf = 0; nf < kNF; ++nf) mx = fmaxf(mx, fmaxf(acc_s[mf][nf][2 * hr], acc_s[mf][nf][2 * hr + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        m_scaled[mf][hr] = mx == -INFINITY ? 0.f : mx * scale_log2;
        const bool row_moved = mx != row_max[mf][hr];
        corr[mf][hr] = row_moved ? exp2f(row_max[mf][hr] * scale_log2 - m_scaled[mf][hr]) : 1.f;
        moved |= row_moved;
        row_max[mf][hr] = mx;
        row_sum[mf][hr] *= corr[mf][hr];
      }
    if (__any_sync(0xffffffffu, moved)) {
#pragma unroll
      for (int mf = 0; mf < kMF; ++mf)
#pragma unroll
        for (int df = 0; df < kDF; ++df)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc_o[mf][df][e] *= corr[mf][e >> 1];
    }

    // P = exp2(S * scale_log2 - m) in the input dtype, packed straight into m16n8k16 A
    // fragments (the S accumulators of two neighbouring 8-key fragments form one 16-key
    // A fragment); the row sums use the unrounded probabilities.
    uint32_t pa[kMF][kPS][4];
#pragma unroll
    for (int mf = 0; mf < kMF; ++mf)
#pragma unroll
      for (int nf = 0; nf < kNF; ++nf) {
        const float p0 = exp2f(acc_s[mf][nf][0] * scale_log2 - m_scaled[mf][0]);
        const float p1 = exp2f(acc_s[mf][nf][1] * scale_log2 - m_scaled[mf][0]);
        const float p2 = exp2f(acc_s[mf][nf][2] * scale_log2 - m_scaled[mf][1]);
        const float p3 = exp2f(acc_s[mf][nf][3] * scale_log2 - m_scaled[mf][1]);
        row_sum[mf][0] += p0 + p1;
        row_sum[mf][1] += p2 + p3;
        pa[mf][nf / 2][(nf & 1) * 2] = pack_pair<Element>(p0, p1);
        pa[mf][nf / 2][(nf & 1) * 2 + 1] = pack_pair<Element>(p2, p3);
      }

    cp_async_wait<2>();  // V_t has landed (K_{t+1}, V_{t+1} may still be in flight)
    __syncthreads();

    // O += P V: V [kBN keys][D] is the K x N operand, read transposed by ldmatrix.
#pragma unroll
    for (int kk = 0; kk < kPS; ++kk)
#pragma unroll
      for (int dp = 0; dp < kDF / 2; ++dp) {
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, smem_u32(sV_t + (kk * 16 + a_row) * kStride + dp * 16 + a_col));
#pragma unroll
        for (int mf = 0; mf < kMF; ++mf) {
          mma_16816<Element>(acc_o[mf][2 * dp], pa[mf][kk], vb[0], vb[1]);
          mma_16816<Element>(acc_o[mf][2 * dp + 1], pa[mf][kk], vb[2], vb[3]);
        }
      }
  }

  // Epilogue: O / l in the input dtype staged through shared memory (sQ) for 16-byte
  // coalesced stores; LSE = scale * max + ln(l), -inf (and O = 0) for a row that saw no key.
  cp_async_wait<0>();
  __syncthreads();
  float* lse_base = p.lse + b * p.lse_batch_stride + h * p.lse_head_stride;
#pragma unroll
  for (int mf = 0; mf < kMF; ++mf)
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      float sum = row_sum[mf][hr];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      const float inv = sum > 0.f ? 1.f / sum : 0.f;
      const int row = warp_row0 + mf * 16 + (lane >> 2) + hr * 8;
      if ((lane & 3) == 0 && row < m_rows)
        lse_base[m0 + row] = sum > 0.f ? row_max[mf][hr] * p.softmax_scale + logf(sum) : -INFINITY;
#pragma unroll
      for (int df = 0; df < kDF; ++df) {
        *reinterpret_cast<uint32_t*>(sQ + row * kStride + df * 8 + (lane & 3) * 2) =
            pack_pair<Element>(acc_o[mf][df][2 * hr] * inv, acc_o[mf][df][2 * hr + 1] * inv);
      }
    }
  __syncthreads();
  Element* o_base = static_cast<Element*>(p.out) + b * p.o_batch_stride + h * p.o_head_stride;
  constexpr int kChunks = kD / 8;
#pragma unroll
  for (int i = 0; i < (kBM * kChunks + kNThreads - 1) / kNThreads; ++i) {
    const int idx = tid + i * kNThreads;
    const int row = idx / kChunks;
    const int chunk = idx - row * kChunks;
    if ((kBM * kChunks % kNThreads == 0 || idx < kBM * kChunks) && row < m_rows) {
      *reinterpret_cast<uint4*>(o_base + (m0 + row) * p.o_row_stride + chunk * 8) =
          *reinterpret_cast<const uint4*>(sQ + row * kStride + chunk * 8);
    }
  }
}

}  // namespace attention
}  // namespace flexprefill
