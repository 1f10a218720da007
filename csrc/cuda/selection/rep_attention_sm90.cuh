// The rep pass (rep_attention.cuh: same RepParams, records and outputs) on Hopper's warpgroup
// MMA (sm_90a), for head dims 64, 128 and 256 and m a multiple of 64.
//
// One CTA = heads_per_cta query heads of one GQA group x one split of split_keys keys, as the
// portable kernel. Per 64-key tile every warpgroup issues D / 16 asynchronous m64n64k16 wgmma
// per m64 row tile, reading the K tile straight from shared memory (128-byte swizzle,
// ring filled by TMA and shared by the CTA's heads) while its threads pool K; then the softmax sums,
// records and pooling are the shared code of rep_attention.cuh. Against the mma.sync kernel
// this removes the per-warp ldmatrix traffic and the MMA issue slots of every tile. Two
// shapes (RepSm90Shape): 32 rows a warp (two m64 tiles a warpgroup, Q̂ by descriptor,
// two CTAs per SM) up to D = 128 with m a multiple of 128; else 16 rows a warp (one CTA
// per SM; Q̂ fragments in registers up to D = 128, by descriptor at D = 256). At D = 64 with
// m = 128 the pass can also pool Q for step 5 (rep_sm90_pools_q), so that the query-aware
// step needs no pass of its own over Q; at D = 64 it pools K on the tensor cores as well
// (rep_sm90_pools_k_mma: Kᵀ x ones; no per-thread column sums or shared-memory partials).
#pragma once

#include <cuda.h>

#include "cuda/ptx_sm90.cuh"
#include "cuda/selection/rep_attention.cuh"

namespace flexprefill {
namespace selection {

// Two shapes (kM16 m16 row tiles per warp): kM16 = 2 (D <= 128): 32 rows a warp, a
// warpgroup two m64 tiles (128 rows, A from shared memory), <= 256 threads, two CTAs per SM;
// kM16 = 1 (D = 256, or m = 64): 16 rows a warp, <= 512 threads, one CTA per SM (A from
// registers up to D = 128).
template <int kM16>
struct RepSm90Shape {
  static constexpr int kMaxThreads = kM16 == 2 ? 256 : 512;
  static constexpr int kMinThreads = 128;  // one warpgroup
  static constexpr int kCtasPerSm = kM16 == 2 ? 2 : 1;
};
constexpr int rep_sm90_stages(int D, int m16) { return m16 == 2 ? (D <= 64 ? 4 : 2) : (D <= 128 ? 4 : 2); }

// The launch shapes the kernel supports: whole warpgroups of 64 kM16 rows, and a CTA whose
// Q̂ copies give every thread rows 8 apart (threads / (D / 8) a multiple of 8).
inline bool rep_sm90_ok(int D, int m, int heads_per_cta, int m16) {
  const int threads = m * heads_per_cta * 2 / m16;
  const int max_threads = m16 == 2 ? RepSm90Shape<2>::kMaxThreads : RepSm90Shape<1>::kMaxThreads;
  return m % (64 * m16) == 0 && threads >= 128 && threads <= max_threads && (threads / (D / 8)) % 8 == 0;
}

// pool(K) on the tensor cores (the K tile's 64 values x 64 keys times ones)
// instead of the threads' column sums: the kernels of head dim 64 (one 128-byte atom a key).
__host__ __device__ constexpr bool rep_sm90_pools_k_mma(int D) { return D == 64; }

// pool(Q) of every head (RepParams::poolq) in the same pass: the kernels of 32 rows a warp at
// D = 64, where a block of Q of the CTA's heads (128-byte rows) fits in shared memory beside
// the rest at two CTAs per SM, with m = block_size = 128 (rep_config's pools_q).
__host__ __device__ constexpr bool rep_sm90_pools_q(int D, int m16) { return D == 64 && m16 == 2; }

// Shared memory from the first 1024-byte boundary of the dynamic allocation (1 KB of slack):
// the K ring (1024-byte aligned tiles), then Q̂ [atoms][hpc m rows][128 B] (swizzled), the
// pooling partials (none with rep_sm90_pools_k_mma), the pool(Q) buffer [hpc][m rows][128 B]
// (rep_sm90_pools_q), 512 B of ones (the B operand of the pooling wgmma: pool(Q) or
// rep_sm90_pools_k_mma) and the mbarriers (one per stage of the ring, then pool(Q)'s).
__host__ __device__ inline RepSmem rep_sm90_smem_layout(int D, int m, int heads_per_cta, int m16) {
  RepSmem s;
  s.k_off = 0;
  s.q_off = rep_sm90_stages(D, m16) * kTileKeys * D * 2;
  s.pool_off = s.q_off + heads_per_cta * m * D * 2;
  const int max_threads = m16 == 2 ? RepSm90Shape<2>::kMaxThreads : RepSm90Shape<1>::kMaxThreads;
  s.bar_off = s.pool_off + (rep_sm90_pools_k_mma(D) ? 0 : 2 * rep_pool_part_floats(max_threads, D) * 4);
  const bool qbuf = rep_sm90_pools_q(D, m16) && m == 128;
  if (qbuf || rep_sm90_pools_k_mma(D)) {
    s.qp_off = (s.bar_off + 1023) / 1024 * 1024;
    s.ones_off = s.qp_off + (qbuf ? heads_per_cta * m * 128 : 0);
    s.bar_off = s.ones_off + 512;
  }
  s.total = s.bar_off + (rep_sm90_stages(D, m16) + 1) * 8 + 1024;
  return s;
}

// Column sums on the tensor cores (pool(K) and pool(Q)): acc (+)= Tᵀ x ones over kSteps k16
// steps of T, 16 rows of 128 B (64 values, swizzled) a step from shared address t_addr, the
// ones [16 x 8] at ones_addr; accumulates onto acc from the first step when `accumulate`.
// Every column of the m64n8 result holds the same sums: values 16 (warp % 4) + g and + 8 in
// acc[0] and acc[2]. Issued and committed as one wgmma group.
template <typename Element, int kSteps>
__device__ __forceinline__ void rep_sm90_colsum(float (&acc)[4], uint32_t t_addr, uint32_t ones_addr,
                                                bool accumulate) {
  const uint32_t desc_t = sm90::desc_sw128_lo(t_addr);
  const uint64_t desc_ones = sm90::desc_plain(ones_addr, 128, 256);
#pragma unroll
  for (int s = 0; s < kSteps; ++s)
    sm90::Wgmma64x8<Element>::ss_ta(acc, sm90::desc_sw128_of(desc_t + s * (2048 >> 4)), desc_ones,
                                    accumulate || s > 0);
  sm90::wgmma_commit();
}

// The mean of a pooled block: row [64] fp32 gets this thread's two sums of rep_sm90_colsum
// divided by the block's `count` rows (threads with t4 = 0 of the warpgroup's four warps).
__device__ __forceinline__ void rep_sm90_store_colsum(float* row, const float (&acc)[4], float count, int warp,
                                                      int g) {
  row[16 * (warp & 3) + g] = acc[0] / count;
  row[16 * (warp & 3) + g + 8] = acc[2] / count;
}

template <bool kBf16, int kD, int kM16>
__global__ void __launch_bounds__(RepSm90Shape<kM16>::kMaxThreads, RepSm90Shape<kM16>::kCtasPerSm)
    rep_kernel_sm90(const RepParams p, const __grid_constant__ CUtensorMap tmap_k,
                    const __grid_constant__ CUtensorMap tmap_q) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Element = std::conditional_t<kBf16, __nv_bfloat16, __half>;
  using Mma = sm90::Wgmma64x64<Element>;
  using Shape = RepSm90Shape<kM16>;
  static_assert(kD % 64 == 0, "the wgmma rep kernel needs whole 128-byte swizzle atoms");
  constexpr bool kARegs = kM16 == 1 && kD <= 128;  // Q̂ fragments in registers
  constexpr int kStages = rep_sm90_stages(kD, kM16);
  constexpr int kRowsPerWarp = 16 * kM16;
  constexpr int kSteps = kD / 16;  // k16 steps of one tile
  constexpr int kChunks = kD / 8;  // 16-byte chunks per row
  constexpr int kChunkShift = kChunks == 8 ? 3 : kChunks == 16 ? 4 : 5;
  constexpr int kTileBytes = kTileKeys * kD * 2;
  static_assert(1 << kChunkShift == kChunks, "head dim 64, 128 or 256");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  // The swizzle works on address bits: the operands start at a 1024-byte boundary.
  unsigned char* smem = smem_raw + ((1024u - (smem_u32(smem_raw) & 1023u)) & 1023u);
  const int split = blockIdx.y, b = blockIdx.z, hpc = p.heads_per_cta;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nthreads = blockDim.x;
  const int g = lane >> 2, t4 = lane & 3;
  const int m = p.rows, bs = p.block_size, bs_shift = __ffs(bs) - 1;  // m = bs: a power of two
  const int qrows = hpc * m;                         // Q̂ rows of the CTA (head hl: rows hl m ..)
  const int group = p.heads_q / p.heads_kv;
  const int h_first = blockIdx.x * hpc;
  const int h = h_first + ((warp * kRowsPerWarp) >> bs_shift);  // this warp's query head
  const int hk = h_first / group;
  const int ks = split * p.split_keys;
  const int ke = min(ks + p.split_keys, p.seqlen_k);
  const int ntile = (ke - ks + kTileKeys - 1) / kTileKeys;
  const int P0 = p.seqlen_k - m;
  const RepSmem L = rep_sm90_smem_layout(kD, m, hpc, kM16);
  unsigned char* Ks = smem + L.k_off;
  unsigned char* Qs = smem + L.q_off;
  float* pool_part = reinterpret_cast<float*>(smem + L.pool_off);
  const uint32_t ks_addr = smem_u32(Ks);

  // Q̂ row r of the CTA (head r / m) sits at shared row q_slot(r): with kM16 = 2 a warpgroup's
  // 128 rows are stored as its two m64 tiles, tile mt row 16 j + i = row 32 j + 16 mt + i,
  // so that warp j of the group gets the 32 consecutive rows 32 j .. of the head.
  auto q_slot = [](int r) {
    if constexpr (kM16 == 1) {
      return r;
    } else {
      return (r & ~127) + (((r >> 4) & 1) << 6) + (((r >> 5) & 3) << 4) + (r & 15);
    }
  };
  // Copies: thread -> 16-byte chunk c of rows r0, r0 + rstep, ... (nthreads is a multiple of kChunks).
  const int cchunk = tid & (kChunks - 1), r0 = tid >> kChunkShift, rstep = nthreads >> kChunkShift;
  {  // heads outer, the thread's rows of a head (r0, r0 + rstep, ...) inner
    const uint16_t* qg = p.q + b * p.q_batch_stride + h_first * p.q_head_stride +
                         static_cast<int64_t>(p.seqlen_q - m) * p.q_row_stride + cchunk * 8;
    const int64_t qstep = static_cast<int64_t>(rstep) * p.q_row_stride;
    const uint32_t qs_addr = smem_u32(Qs);
    for (int hl = 0; hl < hpc; ++hl) {
      const uint16_t* src = qg + hl * p.q_head_stride + static_cast<int64_t>(r0) * p.q_row_stride;
      for (int r = r0; r < m; r += rstep, src += qstep)
        cp_async_16(qs_addr + sm90::sw128_offset(q_slot(hl * m + r), cchunk, qrows), src);
    }
  }
  cp_async_commit();  // Q̂
  // K tiles by TMA (tmap_k: boxes of 64 keys x 64 values, 128-byte swizzle, zeros past the
  // sequence): thread 0 issues D / 64 boxes per tile onto the stage's mbarrier.
  const uint32_t bar0 = smem_u32(smem + L.bar_off);
  auto load_k = [&](int tile, int buf) {
    const uint32_t bar = bar0 + buf * 8;
    sm90::mbar_arrive_expect_tx(bar, kTileBytes);
#pragma unroll
    for (int a = 0; a < kD / 64; ++a)
      sm90::tma_load_4d(ks_addr + buf * kTileBytes + a * (kTileKeys * 128), &tmap_k, bar, a * 64,
                        ks + tile * kTileKeys, hk, b);
  };
  // pool(Q) (rep_sm90_pools_q, m = bs = 128): the split's query blocks qb0 + j (those of its
  // key positions, Q rows counted from 0), one a key block: block j lands by TMA (box of 64
  // values x m rows x hpc heads, zeros past seqlen_q) while tiles 2j - 1 and 2j run, and at
  // tile 2j + 1 (or the split's last) warpgroup wg sums head wg's rows on the tensor cores
  // beside the tile's wgmma: Qᵀ[64 values x 16 rows] x ones[16 x 8], eight k16 steps (every
  // output column is the row sum).
  constexpr bool kPoolQ = rep_sm90_pools_q(kD, kM16);
  const bool pool_q = kPoolQ && p.poolq != nullptr;  // (uniform)
  const int qb0 = split * (p.split_keys >> bs_shift);
  const int nqb = pool_q ? max(0, min(p.num_q_blocks - qb0, p.split_keys >> bs_shift)) : 0;
  const uint32_t qbar = bar0 + kStages * 8;
  const uint32_t qp_addr = smem_u32(smem + L.qp_off);
  constexpr bool kPoolKMma = rep_sm90_pools_k_mma(kD);
  const uint32_t ones_addr = smem_u32(smem + L.ones_off);  // B of the pooling wgmma: 512 B of 1.0
  if ((pool_q || kPoolKMma) && tid < 128) {  // (visible to the wgmma after the proxy fence below)
    constexpr uint32_t kOnes = kBf16 ? 0x3F803F80u : 0x3C003C00u;  // two 1.0 values
    reinterpret_cast<uint32_t*>(smem + L.ones_off)[tid] = kOnes;
  }
  auto load_qblock = [&](int j) {
    sm90::mbar_arrive_expect_tx(qbar, hpc * m * 128);
    sm90::tma_load_4d(qp_addr, &tmap_q, qbar, 0, (qb0 + j) * bs, h_first, b);
  };
  if (tid == 0) {
    for (int s = 0; s < kStages + (kPoolQ ? 1 : 0); ++s) sm90::mbar_init(bar0 + s * 8, 1);
    sm90::mbar_init_fence();
  }
  __syncthreads();
  if (tid == 0) {
    for (int s = 0; s < kStages - 1 && s < ntile; ++s) load_k(s, s);
    if (nqb > 0) load_qblock(0);
  }

  const int64_t head = static_cast<int64_t>(b) * p.heads_q + h;
  const int row0 = (warp * kRowsPerWarp) & (m - 1);  // first representative row of this warp in its head
  RepRows<2 * kM16> st;
  st.init(P0 + row0, g, bs);
  float* const rec_head = p.rec + head * p.num_k_blocks * 3 * m + row0;  // (the warp's rows of block 0)
  RepKPool<kBf16, kD, Shape::kMaxThreads, Shape::kMinThreads> pool;
  pool.init(tid, nthreads, group, hpc, h_first);
  // kPoolKMma: the kv head's first CTA sums the K tiles of a block on the tensor cores
  // (kacc: values 16 (warp % 4) + g and + 8, every column the same sum); every warpgroup
  // issues them (a condition that ptxas cannot prove uniform over the warpgroup serializes
  // all its wgmma), warpgroup 0 stores.
  const bool pool_k_mma = kPoolKMma && (h_first % group) / hpc == 0;  // (CTA-uniform)
  float kacc[4] = {0.f, 0.f, 0.f, 0.f};
  if constexpr (kPoolKMma) pool.pools = false;

  cp_async_wait<0>();  // Q̂ has landed (for this thread)
  sm90::fence_proxy_async_smem();
  __syncthreads();
  if (split == 0)
    rep_qhat_mean<kBf16, kD>(p, b, h_first, hpc, m, tid, nthreads, [&](int hl, int r, int d) {
      return *reinterpret_cast<const uint16_t*>(Qs + sm90::sw128_offset(q_slot(hl * m + r), d >> 3, qrows) +
                                                (d & 7) * 2);
    });
  // A operand: the warp's 16 rows (CTA rows 16 warp ..) as m16n8k16 fragments (ldmatrix:
  // rows lane & 15, chunk 2 step + lane / 16), or the warpgroup's 64 rows by descriptor.
  constexpr int kARegSteps = kARegs ? kSteps : 1;
  uint32_t a_frag[kARegSteps][4];
  if constexpr (kARegs) {
#pragma unroll
    for (int s = 0; s < kSteps; ++s)
      ldmatrix_x4(a_frag[s], smem_u32(Qs + sm90::sw128_offset(warp * 16 + (lane & 15), 2 * s + (lane >> 4), qrows)));
  }
  // Descriptors: the start address field is the low 14 bits of (address >> 4), so steps and
  // buffers are added to it (shared addresses < 256 KB: no carry out of the field).
  const uint32_t desc_k0 = sm90::desc_sw128_lo(ks_addr);
  const int wg = __shfl_sync(0xffffffffu, warp >> 2, 0);  // (warp-uniform)
  const uint32_t desc_q0 = sm90::desc_sw128_lo(smem_u32(Qs) + wg * (64 * kM16) * 128);  // the warpgroup's rows
  const uint32_t q_atom = (qrows * 128) >> 4;  // one Q̂ column block, in descriptor units
  // pool(K): column pair pr of key r in the swizzled tile (atom pr / 32, chunk (pr / 4) % 8).
  // With nph % 8 == 0 the thread's keys share r % 8 (= kph % 8): linear addresses.
  const bool pool_linear = (pool.nph & 7) == 0;
  auto pool_pair_off = [](int r, int pr) {
    return (pr >> 5) * (kTileKeys * 128) + r * 128 + ((((pr >> 2) & 7) ^ (r & 7)) << 4) + (pr & 3) * 4;
  };

  // A barrier at the first tile of every key block (pool(K)'s partials and the pool(Q) buffer
  // need one there) and, when the ring is at least two tiles deeper than a block, none between:
  // at a barrier tile every warp is done with the earlier tiles, so thread 0 refills all their
  // stages (tiles up to tile + kStages - 1) and every tile is issued >= kStages - sync_every
  // >= 2 tiles ahead. Shallower rings keep a barrier (and a refill) at every tile.
  constexpr bool kBlockSync = kStages >= 4;
  const int tiles_per_block = max(1, bs / kTileKeys);
  const int sync_every = kBlockSync && kStages - tiles_per_block >= 2 ? tiles_per_block : 1;
  int issued = min(kStages - 1, ntile);  // (thread 0, kBlockSync) tiles [0, issued) are loading
  for (int tile = 0; tile < ntile; ++tile) {
    const bool sync_tile = (tile & (sync_every - 1)) == 0;  // (uniform; splits start at a block; a power of two)
    if (tile > 0 && sync_tile) __syncthreads();  // everyone is done with the tiles before `tile`
    if (tid == 0 && sync_tile) {
      if constexpr (kBlockSync) {
        for (const int upto = min(tile + kStages, ntile); issued < upto; ++issued) load_k(issued, issued % kStages);
      } else {
        const int nt = tile + kStages - 1;
        if (nt < ntile) load_k(nt, nt % kStages);
      }
      // (pool(Q): even tiles start a block at bs = 128, so they are barrier tiles)
      if (kPoolQ && tile > 0 && (tile & 1) == 0 && (tile >> 1) < nqb) load_qblock(tile >> 1);  // buffer free
    }
    const int buf = tile % kStages;
    sm90::mbar_wait(bar0 + buf * 8, (tile / kStages) & 1);  // tile `tile` has landed
    RepTile tl;
    tl.kt = ks + tile * kTileKeys;
    const int c = tl.kt >> bs_shift;
    tl.base = tl.kt & (bs - 1);
    tl.first_in_block = tl.base == 0;
    tl.last_in_block = tl.base + kTileKeys == bs || tile == ntile - 1;

    // acc[mt]: the warpgroup's m64 tile mt (rows 64 mt ..); this warp's rows 16 (warp % 4) + 64 mt ..
    float acc[kM16][8][4];
    const uint32_t desc_k = desc_k0 + buf * (kTileBytes >> 4);
    sm90::wgmma_fence();
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
      // k16 step s: atom s / 4 (a column block of rows x 128 B), 32 B into it per step.
      const uint64_t desc_b = sm90::desc_sw128_of(desc_k + (((s >> 2) * kTileKeys * 128 + (s & 3) * 32) >> 4));
      if constexpr (kARegs) {
        Mma::rs(acc[0], a_frag[s], desc_b, s > 0);
      } else {
#pragma unroll
        for (int mt = 0; mt < kM16; ++mt) {
          const uint64_t desc_a =
              sm90::desc_sw128_of(desc_q0 + (s >> 2) * q_atom + ((mt * 64 * 128 + (s & 3) * 32) >> 4));
          Mma::ss(acc[mt], desc_a, desc_b, s > 0);
        }
      }
    }
    sm90::wgmma_commit();  // (its own group: the last score wgmma carries the commit)
    if (pool_k_mma)  // pool(K): Kᵀ [64 values x 16 keys] x ones [16 x 8] per k16 step
      rep_sm90_colsum<Element, kTileKeys / 16>(kacc, ks_addr + buf * kTileBytes, ones_addr, !tl.first_in_block);
    // pool(Q) at tile 2j + 1 (or the split's last); stored before the softmax sums.
    float pacc[4];
    const int qj = tile >> 1;
    const bool pool_now = kPoolQ && qj < nqb && tile == min(2 * qj + 1, ntile - 1);  // (uniform)
    if (pool_now) {
      sm90::mbar_wait(qbar, qj & 1);
      rep_sm90_colsum<Element, 8>(pacc, qp_addr + wg * (m * 128), ones_addr, false);
    }
    // pool(K) while the tensor cores run (plain shared loads of the swizzled tile).
    if (pool.pools) {
      const unsigned char* Kt = Ks + buf * kTileBytes;
      if (pool_linear) {
        const int kph7 = pool.kph & 7;
        pool.add_tile_linear([&](int pr) { return Kt + pool_pair_off(kph7, pr) - kph7 * 128; }, 128);
      } else {
        pool.add_tile([&](int r, int pr) { return *reinterpret_cast<const uint32_t*>(Kt + pool_pair_off(r, pr)); });
      }
      if (tl.first_in_block && c > (ks >> bs_shift)) pool.flush(pool_part, p, b, hk, c - 1, tid);
    }
    sm90::wgmma_wait<0>();
#pragma unroll
    for (int mt = 0; mt < kM16; ++mt) sm90::fence_operands(acc[mt]);
    if (pool_k_mma && tl.last_in_block) {
      sm90::fence_operands(kacc);
      if (warp < 4 && t4 == 0)  // block c of the kv head
        rep_sm90_store_colsum(p.pool_k + ((static_cast<int64_t>(b) * p.heads_kv + hk) * p.num_k_blocks + c) * kD,
                              kacc, static_cast<float>(min(bs, p.seqlen_k - c * bs)), warp, g);
    }
    if (pool_now) {
      sm90::fence_operands(pacc);
      if (t4 == 0) {  // block qb of the warp's head
        const int qb = qb0 + qj;
        rep_sm90_store_colsum(p.poolq + ((static_cast<int64_t>(b) * p.heads_q + h) * p.num_q_blocks + qb) * kD,
                              pacc, static_cast<float>(min(bs, p.seqlen_q - qb * bs)), warp, g);
      }
    }
    rep_tile_sums<kM16>(acc, st, tl, P0 + row0, p.scale_log2, rec_head, c, m, g, t4);
    if (pool.pools && tl.last_in_block) pool.stash(pool_part, c);
  }
  rep_split_end(st, pool, p, pool_part, head, split, m, row0, b, hk, ntile,
                [&] { return (ks + (ntile - 1) * kTileKeys) >> bs_shift; }, g, t4, tid);
#elif defined(__CUDA_ARCH__)
  __trap();  // compiled without sm_90a: the host never launches this (rep_config)
#endif
}

// The TMA descriptors (rep_attention.cu) of K [B, Nk, Hkv, D] (boxes of 64 keys x 64 values)
// and of Q [B, Nq, Hq, D] for pool(Q) (boxes of 64 values x m rows x heads_per_cta heads),
// with the 128-byte swizzle. cudaErrorInvalidValue when the driver refuses the strides.
cudaError_t make_k_tensor_map(CUtensorMap* map, const RepParams& p, int batch, int head_dim);
cudaError_t make_q_tensor_map(CUtensorMap* map, const RepParams& p, int batch);

template <bool kBf16, int kD, int kM16>
cudaError_t launch_rep_sm90(const RepParams& p, int batch, cudaStream_t stream) {
  const RepSmem L = rep_sm90_smem_layout(kD, p.rows, p.heads_per_cta, kM16);
  auto kernel = rep_kernel_sm90<kBf16, kD, kM16>;
  static std::atomic<uint64_t> raised{0};
  cudaError_t err = raise_smem_limit_once(reinterpret_cast<const void*>(kernel), raised);
  if (err != cudaSuccess) return err;
  CUtensorMap tmap, tmap_q;
  err = make_k_tensor_map(&tmap, p, batch, kD);
  if (err != cudaSuccess) return err;
  if (p.poolq != nullptr) {  // (rep_config's pools_q)
    if (!rep_sm90_pools_q(kD, kM16) || p.rows != 128 || p.block_size != 128) return cudaErrorInvalidValue;
    err = make_q_tensor_map(&tmap_q, p, batch);
    if (err != cudaSuccess) return err;
  } else {
    tmap_q = tmap;  // (not read)
  }
  dim3 grid(p.heads_q / p.heads_per_cta, p.num_splits, batch);
  kernel<<<grid, 2 * p.rows * p.heads_per_cta / kM16, L.total, stream>>>(p, tmap, tmap_q);
  return cudaGetLastError();
}

}  // namespace selection
}  // namespace flexprefill
