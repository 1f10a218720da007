// Steps 1-2 of FlexPrefill on tensor cores: the representative queries Q̂ (the last m = bs
// rows of q) attend every key, A = softmax(s Q̂ Kᵀ) in fp32, without materialising A.
//
//   pass 1: per (batch, query head, split of keys) the row max / sum-exp over the split
//           -> part_max, part_sum [B, Hq, splits, m]; lse_combine -> lse2 [B, Hq, m]
//   pass 2: recompute the logits, p = exp2(x - lse2), and accumulate
//           vertical mass per key block  vert  [B, Hq, NBk]  (plain stores)
//           slash mass per distance bin   slash [B, Hq, NBk]  (bin t = distances [t bs, t bs + bs);
//                                         <= 2 atomic adds per bin onto zeros, so the result
//                                         is deterministic)
//
// One CTA = `heads_per_cta` query heads of one GQA group x one split of `split_keys` keys;
// m/32 warps per head, each owning 32 rows (two m16 tiles, so every B fragment feeds four
// mma). Q̂ of the heads stays in shared memory; K streams through a double-buffered 64-key
// tile (cp.async) that all the CTA's heads share. The remaining CTAs of a group are
// adjacent in blockIdx.x, so they read the same K tiles through L2 at the same time.
// Logits are in log2 units: x = (q.k) * (s * log2 e), computed identically in both passes.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "cuda/selection/device_utils.cuh"
#include "cuda/selection/select_plan.h"

namespace flexprefill {
namespace selection {

struct RepPassParams {
  const uint16_t* q;  // [B, Nq, Hq, D] bf16 / fp16 bits
  const uint16_t* k;  // [B, Nk, Hkv, D]
  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, rows, block_size;
  int split_keys, num_splits, num_k_blocks, heads_per_cta;
  float scale_log2;
  float* part_max;    // [B, Hq, splits, m]   pass 1 out
  float* part_sum;    // [B, Hq, splits, m]   pass 1 out
  const float* lse2;  // [B, Hq, m]           pass 2 in
  float* vert;        // [B, Hq, NBk]         pass 2 out
  float* slash;       // [B, Hq, NBk]         pass 2 out (zeroed before)
};

// Shared-memory layout (bytes), the same on host and device.
struct RepSmem {
  int q_off, k_off, stage_off, wbuf_off, wvert_off, total;
};
constexpr int kStageRows = 8, kStageCols = 88;  // pre-added diagonal partials of a 32x64 tile

__host__ __device__ inline int rep_row_stride(int D) { return D + 8; }  // +16 B: no ldmatrix conflicts

__host__ __device__ inline RepSmem rep_smem_layout(int D, int m, int split_keys, int pass, int heads_per_cta) {
  auto up = [](int x) { return (x + 15) / 16 * 16; };
  const int rows = heads_per_cta * m, ld = rep_row_stride(D), nw = rows / kRowsPerWarp;
  RepSmem s;
  s.q_off = 0;
  s.k_off = up(rows * ld * 2);
  int off = s.k_off + up(2 * kTileKeys * ld * 2);
  s.stage_off = off;
  if (pass == 2) {
    off += up(nw * kStageRows * kStageCols * 4);
    s.wbuf_off = off;
    off += up(nw * (split_keys + 31) * 4);
    s.wvert_off = off;
    off += up(nw * (split_keys / kTileKeys) * 4);
  } else {
    s.wbuf_off = s.wvert_off = off;
  }
  s.total = off;
  return s;
}

template <bool kBf16, int kPass>
__global__ void __launch_bounds__(256) rep_pass_kernel(const RepPassParams p) {
  using Element = std::conditional_t<kBf16, __nv_bfloat16, __half>;
  extern __shared__ __align__(16) unsigned char smem[];
  const int split = blockIdx.y, b = blockIdx.z, hpc = p.heads_per_cta;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t4 = lane & 3;
  const int m = p.rows, D = p.head_dim, ld = rep_row_stride(D), nthreads = blockDim.x;
  const int warps_per_head = m / kRowsPerWarp;
  const int h_first = blockIdx.x * hpc;                    // first query head of the CTA
  const int h = h_first + warp / warps_per_head;           // this warp's query head
  const int hk = h_first / (p.heads_q / p.heads_kv);       // hpc divides the group size
  const int ks = split * p.split_keys;
  const int ke = min(ks + p.split_keys, p.seqlen_k);
  const int ntile = (ke - ks + kTileKeys - 1) / kTileKeys;
  const int P0 = p.seqlen_k - m;  // absolute position of representative row 0
  const RepSmem L = rep_smem_layout(D, m, p.split_keys, kPass, hpc);
  uint16_t* Qs = reinterpret_cast<uint16_t*>(smem + L.q_off);
  uint16_t* Ks = reinterpret_cast<uint16_t*>(smem + L.k_off);

  const uint16_t* qg = p.q + b * p.q_batch_stride + h_first * p.q_head_stride +
                       static_cast<int64_t>(p.seqlen_q - m) * p.q_row_stride;
  const uint16_t* kg = p.k + b * p.k_batch_stride + hk * p.k_head_stride;
  const int chunks = D / 8;  // 16-byte chunks per row
  for (int idx = tid; idx < hpc * m * chunks; idx += nthreads) {  // Qs row hl * m + r: head hl, row r
    const int r = idx / chunks, c = idx - r * chunks, hl = r / m;
    cp_async_16(smem_u32(Qs + r * ld + c * 8), qg + hl * p.q_head_stride + (r - hl * m) * p.q_row_stride + c * 8,
               true);
  }
  auto load_k = [&](int tile, int buf) {
    const int kt = ks + tile * kTileKeys;
    uint16_t* dst = Ks + buf * kTileKeys * ld;
    for (int idx = tid; idx < kTileKeys * chunks; idx += nthreads) {
      const int r = idx / chunks, c = idx - r * chunks;
      const int j = kt + r;
      const bool ok = j < ke;
      cp_async_16(smem_u32(dst + r * ld + c * 8), ok ? kg + static_cast<int64_t>(j) * p.k_row_stride + c * 8 : kg,
                 ok);
    }
  };
  load_k(0, 0);
  cp_async_commit();

  const int64_t head = static_cast<int64_t>(b) * p.heads_q + h;
  const int row0 = (warp % warps_per_head) * kRowsPerWarp;  // first representative row of this warp
  // Row slot s = 2 * mt + hf holds row row0 + 8 * s + g (mt: m16 tile, hf: upper half).
  float m_run[4], l_run[4], lse[4];
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    m_run[s] = -INFINITY;
    l_run[s] = 0.f;
    lse[s] = 0.f;
    if constexpr (kPass == 2) lse[s] = p.lse2[head * m + row0 + 8 * s + g];
  }
  float* stage = reinterpret_cast<float*>(smem + L.stage_off) + warp * kStageRows * kStageCols;
  float* wbuf = reinterpret_cast<float*>(smem + L.wbuf_off) + warp * (p.split_keys + 31);
  float* wvert = reinterpret_cast<float*>(smem + L.wvert_off) + warp * (p.split_keys / kTileKeys);
  float carry = 0.f;

  // Per-lane ldmatrix addresses: A rows row0 + (lane & 15), k-half lane >> 4; B keys
  // (lane & 7) + 8 * (lane >> 4), k-half (lane >> 3) & 1.
  const uint32_t q_addr = smem_u32(Qs + (warp * kRowsPerWarp + (lane & 15)) * ld + (lane >> 4) * 8);
  const int b_row = (lane & 7) + ((lane >> 4) << 3), b_col = ((lane >> 3) & 1) * 8;

  for (int tile = 0; tile < ntile; ++tile) {
    if (tile + 1 < ntile) load_k(tile + 1, (tile + 1) & 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    const uint32_t k_addr = smem_u32(Ks + (tile & 1) * kTileKeys * ld + b_row * ld + b_col);
    float acc[2][8][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int n = 0; n < 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[mt][n][e] = 0.f;

#pragma unroll 2
    for (int k0 = 0; k0 < D; k0 += 16) {
      uint32_t a0[4], a1[4];
      ldmatrix_x4(a0, q_addr + k0 * 2);
      ldmatrix_x4(a1, q_addr + (16 * ld + k0) * 2);
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        uint32_t bb[4];
        ldmatrix_x4(bb, k_addr + (np * 16 * ld + k0) * 2);
        mma_16816<Element>(acc[0][2 * np], a0, bb[0], bb[1]);
        mma_16816<Element>(acc[0][2 * np + 1], a0, bb[2], bb[3]);
        mma_16816<Element>(acc[1][2 * np], a1, bb[0], bb[1]);
        mma_16816<Element>(acc[1][2 * np + 1], a1, bb[2], bb[3]);
      }
    }

    // acc[mt][n][2 * hf + x]: row row0 + 16 mt + 8 hf + g, key kt + 8 n + 2 t4 + x.
    const int kt = ks + tile * kTileKeys;
    const bool need_mask = kt + kTileKeys - 1 > P0 + row0;  // some key past some row's position
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int s = 2 * mt + hf;
        const int pos = P0 + row0 + 8 * s + g;  // absolute position of the row
        float tmax = -INFINITY;
#pragma unroll
        for (int n = 0; n < 8; ++n)
#pragma unroll
          for (int x = 0; x < 2; ++x) {
            float v = __fmul_rn(acc[mt][n][2 * hf + x], p.scale_log2);
            if (need_mask && kt + 8 * n + 2 * t4 + x > pos) v = -INFINITY;
            if constexpr (kPass == 1) {
              tmax = fmaxf(tmax, v);
            } else {
              v = v == -INFINITY ? 0.f : exp2f(v - lse[s]);
            }
            acc[mt][n][2 * hf + x] = v;
          }
        if constexpr (kPass == 1) {
          tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 1));
          tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 2));
          const float m_new = fmaxf(m_run[s], tmax);
          const float m_use = m_new == -INFINITY ? 0.f : m_new;
          float sum = 0.f;
#pragma unroll
          for (int n = 0; n < 8; ++n)
#pragma unroll
            for (int x = 0; x < 2; ++x) sum += exp2f(acc[mt][n][2 * hf + x] - m_use);
          l_run[s] = l_run[s] * exp2f(m_run[s] - m_use) + sum;
          m_run[s] = m_new;
        }
      }

    if constexpr (kPass == 2) {
      // Vertical: this warp's mass in the tile.
      float tsum = 0.f;
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int n = 0; n < 8; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) tsum += acc[mt][n][e];
      tsum = warp_sum(tsum);
      if (lane == 0) wvert[tile] = tsum;

      // Slash: sums along the diagonals e = row - key (tile-local, e in [-63, 31]). Entries of
      // one thread on the same diagonal (rows + 8 R, keys + 8 R) are pre-added, so the
      // stage holds an 8 x 88 matrix whose diagonal e is stage[gg][gg - e + 24].
#pragma unroll
      for (int u = 0; u < 11; ++u) {
        float v[2];
#pragma unroll
        for (int x = 0; x < 2; ++x) {
          float s = 0.f;
#pragma unroll
          for (int R = 0; R < 4; ++R) {
            const int n = u - 3 + R;
            if (n >= 0 && n < 8) s += acc[R >> 1][n][2 * (R & 1) + x];
          }
          v[x] = s;
        }
        *reinterpret_cast<float2*>(stage + g * kStageCols + 8 * u + 2 * t4) = make_float2(v[0], v[1]);
      }
      __syncwarp();
      float d0 = 0.f, d1 = 0.f, d2 = 0.f;  // diagonals lane - 63, lane - 31, lane + 1
#pragma unroll
      for (int gg = 0; gg < 8; ++gg) {
        if (gg <= lane) d0 += stage[gg * kStageCols + gg - lane + 87];
        d1 += stage[gg * kStageCols + gg - lane + 55];
        if (lane <= 30 && gg >= lane - 23) d2 += stage[gg * kStageCols + gg - lane + 23];
      }
      __syncwarp();
      // Warp-local index of diagonal e of tile `tile`: e - 64 tile + 64 ntile - 1. The
      // diagonal lane - 63 of a tile is the diagonal lane + 1 of the next one (same lane).
      const int base = kTileKeys * (ntile - tile) - 1;
      wbuf[base + lane - 31] = d1;
      if (lane <= 30) {
        wbuf[base + lane + 1] = d2 + carry;
        carry = d0;
      } else {
        wbuf[base + lane - 63] = d0;
      }
    }
    __syncthreads();  // the next iteration overwrites this K buffer
  }

  if constexpr (kPass == 1) {
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      float l = l_run[s];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      if (t4 == 0) {
        const int64_t o = (head * p.num_splits + split) * m + row0 + 8 * s + g;
        p.part_max[o] = m_run[s];
        p.part_sum[o] = l;
      }
    }
  } else {
    if (lane <= 30) wbuf[lane] = carry;  // last tile's diagonal lane - 63 (base 63)
    __syncthreads();
    const float inv_m = 1.f / static_cast<float>(m);  // m is a power of two: exact
    const int nw = m / kRowsPerWarp;  // warps of one head
    const int wlen = kTileKeys * ntile + 31;  // entries per warp buffer
    const int wstride = p.split_keys + 31;
    const float* wb0 = reinterpret_cast<const float*>(smem + L.wbuf_off);
    // CTA index idx <-> distance delta = P0 - ks - 64 ntile + 1 + idx; warp w of a head
    // stores idx at idx - 32 w. Per-distance totals over the warps (fixed order) go to the
    // free K buffers, then one warp per (head, distance bin) sums them (fixed tree).
    const int delta0 = P0 - ks - kTileKeys * ntile + 1;
    float* tot = reinterpret_cast<float*>(smem + L.k_off);
    const int ntot = kTileKeys * ntile + m - 1;
    for (int idx = tid; idx < hpc * ntot; idx += nthreads) {
      const int hl = idx / ntot, e = idx - hl * ntot;
      float total = 0.f;
      for (int w = 0; w < nw; ++w) {
        const int j = e - kRowsPerWarp * w;
        if (j >= 0 && j < wlen) total += wb0[(hl * nw + w) * wstride + j];
      }
      tot[idx] = total;
    }
    __syncthreads();
    const int d_first = max(delta0, 0), d_last = min(delta0 + ntot - 1, p.seqlen_k - 1);
    if (d_first <= d_last) {
      const int bs = p.block_size, bin0 = d_first / bs, nbins = d_last / bs - bin0 + 1;
      for (int pair = warp; pair < hpc * nbins; pair += nthreads / 32) {
        const int hl = pair / nbins, bin = bin0 + pair - hl * nbins;
        const int lo = max(bin * bs, d_first), hi = min(bin * bs + bs - 1, d_last);
        float s = 0.f;
        for (int d = lo + lane; d <= hi; d += 32) s += tot[hl * ntot + d - delta0];
        s = warp_sum(s);
        const int64_t hh = static_cast<int64_t>(b) * p.heads_q + h_first + hl;
        if (lane == 0) atomicAdd(p.slash + hh * p.num_k_blocks + bin, s * inv_m);
      }
    }
    const float* wv0 = reinterpret_cast<const float*>(smem + L.wvert_off);
    const int tiles_per_block = p.block_size / kTileKeys;
    const int nblocks = (ke - ks + p.block_size - 1) / p.block_size;
    for (int idx = tid; idx < hpc * nblocks; idx += nthreads) {
      const int hl = idx / nblocks, c = idx - hl * nblocks;
      float total = 0.f;
      for (int w = 0; w < nw; ++w)
        for (int tt = 0; tt < tiles_per_block; ++tt) {
          const int tile = c * tiles_per_block + tt;
          if (tile < ntile) total += wv0[(hl * nw + w) * (p.split_keys / kTileKeys) + tile];
        }
      const int64_t hh = static_cast<int64_t>(b) * p.heads_q + h_first + hl;
      p.vert[hh * p.num_k_blocks + ks / p.block_size + c] = total * inv_m;
    }
  }
}

// Host launchers (one kernel launch each; the caller checks the launch).
// Largest heads_per_cta dividing the GQA group with <= 256 threads and fitting shared memory.
inline int rep_heads_per_cta(int D, int m, int split_keys, int pass, int group, int max_smem) {
  int best = 1;
  for (int d = 1; d <= group && d * m <= 256; ++d)
    if (group % d == 0 && rep_smem_layout(D, m, split_keys, pass, d).total <= max_smem) best = d;
  return best;
}

// Host launcher (one kernel launch; the caller checks it). p.heads_per_cta must come from
// rep_heads_per_cta for this pass.
template <bool kBf16, int kPass>
cudaError_t launch_rep_pass(const RepPassParams& p, int batch, cudaStream_t stream) {
  const RepSmem L = rep_smem_layout(p.head_dim, p.rows, p.split_keys, kPass, p.heads_per_cta);
  auto kernel = rep_pass_kernel<kBf16, kPass>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, L.total);
  if (err != cudaSuccess) return err;
  dim3 grid(p.heads_q / p.heads_per_cta, p.num_splits, batch);
  kernel<<<grid, p.rows * p.heads_per_cta, L.total, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_rep_pass_any(const RepPassParams& p, int batch, bool is_bf16, int pass, cudaStream_t stream);

}  // namespace selection
}  // namespace flexprefill
