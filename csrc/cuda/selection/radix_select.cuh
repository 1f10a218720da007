// "Fewest items whose mass reaches gamma" and "top K" over a non-negative float array, by
// one CTA (kSelectThreads threads), without sorting (design.md §1 steps 4-5).
//
// Order: value descending, ties by lower index (the reference's stable descending sort).
// Non-negative floats order like their bit patterns, so a most-significant-digit radix
// descent (digits of 11, 11, 10 bits) over histograms finds
//   * the item at which the running mass first reaches gamma (mass histograms, kept in
//     62-bit fixed point so the sums are exact and independent of the summation order;
//     the reference accumulates in double and compares float(csum) >= float(gamma)), and
//   * the K-th item (count histograms),
// then one pass marks the selected items in a bitmask (ties at the threshold by index).
#pragma once

#include <cstdint>

#include "cuda/selection/device_utils.cuh"
#include "cuda/selection/select_plan.h"

namespace flexprefill {
namespace selection {

constexpr int kRadixBuckets = 2048;
constexpr double kFixedOne = 4611686018427387904.0;  // 2^62

struct RadixSmem {
  uint32_t cnt[kRadixBuckets];
  uint32_t mlo[kRadixBuckets];  // mass, low 32 bits of the fixed-point sum
  uint32_t mhi[kRadixBuckets];  // mass, high 32 bits
  uint32_t warp_cnt[32];
  unsigned long long warp_mass[32];
  uint32_t zero_cnt;
  int found;
  uint32_t bucket, bucket_cnt, above_cnt;
  unsigned long long above_mass;
  uint32_t take;
};

struct Threshold {
  bool found;          // false: the mass never reaches gamma
  uint32_t bits;       // bit pattern of the threshold value
  uint32_t above_cnt;  // items strictly above it
  uint32_t tie_cnt;    // items equal to it
  uint32_t take;       // how many of the equal items are selected (lowest indices first)
};

__device__ __forceinline__ uint32_t item_bits(float x) { return x > 0.f ? __float_as_uint(x) : 0u; }
__device__ __forceinline__ unsigned long long to_fixed(uint32_t bits) {
  return static_cast<unsigned long long>(static_cast<double>(__uint_as_float(bits)) * kFixedOne);
}
__device__ __forceinline__ float fixed_to_float(unsigned long long v) {
  return static_cast<float>(static_cast<double>(v) * (1.0 / kFixedOne));
}

// (*hi, *lo) += v atomically for a 64-bit sum kept in two 32-bit words: the carry out of
// the low word goes to the high word (the sum of the adds is exact once all have landed).
__device__ __forceinline__ void atomic_add_u64_split(uint32_t* lo, uint32_t* hi, unsigned long long v) {
  const uint32_t vlo = static_cast<uint32_t>(v);
  uint32_t vhi = static_cast<uint32_t>(v >> 32);
  if (vlo) {
    const uint32_t old = atomicAdd(lo, vlo);
    if (old + vlo < old) ++vhi;
  }
  if (vhi) atomicAdd(hi, vhi);
}

// Histogram of items whose bits match `prefix` under `pmask`, by digit (bits >> shift) &
// dmask. Every lane adds its own item with shared-memory atomics (count, and the 62-bit
// fixed-point mass as a low word whose carries go to the high word); a warp whose items all
// fall in one bucket adds them once (full-mask reductions). No match_any: reductions over a
// divergent peer mask compile to a loop over the groups. Exact zeros (masked entries) are
// counted apart in `zeros` (per thread) and land in bucket 0 at radix_hist_end.
// radix_hist_begin / radix_add for each item / radix_hist_end; radix_add is warp-collective
// (every lane calls it; `valid` false for a lane without an item).
__device__ inline void radix_hist_begin(RadixSmem& sm) {
  for (int b = threadIdx.x; b < kRadixBuckets; b += blockDim.x) {
    sm.cnt[b] = 0;
    sm.mlo[b] = 0;
    sm.mhi[b] = 0;
  }
  if (threadIdx.x == 0) {
    sm.zero_cnt = 0;
    sm.found = 0;
  }
  __syncthreads();
}
__device__ __forceinline__ void radix_add(uint32_t bits, bool valid, uint32_t prefix, uint32_t pmask, int shift,
                                          uint32_t dmask, bool with_mass, RadixSmem& sm, uint32_t& zeros) {
  constexpr uint32_t kNone = 0xffffffffu;
  const int lane = threadIdx.x & 31;
  uint32_t key = kNone;
  if (valid && (bits & pmask) == prefix) {
    if (bits == 0) ++zeros;
    else key = (bits >> shift) & dmask;
  }
  const uint32_t key0 = __shfl_sync(0xffffffffu, key, 0);
  if (__all_sync(0xffffffffu, key == key0)) {  // one bucket (or none) for the whole warp
    if (key0 == kNone) return;
    if (with_mass) {  // sums of 32 values of 21 bits fit in 32 bits
      const unsigned long long uf = to_fixed(bits);
      const uint32_t l0 = __reduce_add_sync(0xffffffffu, static_cast<uint32_t>(uf & 0x1fffffu));
      const uint32_t l1 = __reduce_add_sync(0xffffffffu, static_cast<uint32_t>((uf >> 21) & 0x1fffffu));
      const uint32_t l2 = __reduce_add_sync(0xffffffffu, static_cast<uint32_t>(uf >> 42));
      if (lane == 0) {
        const unsigned long long total = static_cast<unsigned long long>(l0) +
                                         (static_cast<unsigned long long>(l1) << 21) +
                                         (static_cast<unsigned long long>(l2) << 42);
        atomicAdd(&sm.cnt[key], 32u);
        atomic_add_u64_split(&sm.mlo[key], &sm.mhi[key], total);
      }
    } else if (lane == 0) {
      atomicAdd(&sm.cnt[key], 32u);
    }
    return;
  }
  if (key == kNone) return;
  atomicAdd(&sm.cnt[key], 1u);
  if (with_mass) atomic_add_u64_split(&sm.mlo[key], &sm.mhi[key], to_fixed(bits));
}
__device__ inline void radix_hist_end(RadixSmem& sm, uint32_t zeros) {
  zeros = warp_sum(zeros);
  if ((threadIdx.x & 31) == 0 && zeros) atomicAdd(&sm.zero_cnt, zeros);
  __syncthreads();
  if (threadIdx.x == 0) sm.cnt[0] += sm.zero_cnt;  // zero bits only match when prefix == 0
  __syncthreads();
}

// The histogram of x[begin, end).
__device__ inline void radix_histogram(const float* x, uint32_t begin, uint32_t end, uint32_t prefix,
                                       uint32_t pmask, int shift, uint32_t dmask, bool with_mass, RadixSmem& sm) {
  radix_hist_begin(sm);
  const int lane = threadIdx.x & 31;
  uint32_t zeros = 0;
  // kBatch items per lane loaded before any is processed (memory-level parallelism).
  constexpr int kBatch = 8;
  const uint32_t stride = blockDim.x;
  for (uint32_t base = begin + (threadIdx.x & ~31u); base < end; base += kBatch * stride) {  // warp-uniform
    uint32_t bits_b[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const uint32_t i = base + u * stride + lane;
      bits_b[u] = i < end ? item_bits(x[i]) : 0u;
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      if (base + u * stride >= end) break;  // warp-uniform
      radix_add(bits_b[u], base + u * stride + lane < end, prefix, pmask, shift, dmask, with_mass, sm, zeros);
    }
  }
  radix_hist_end(sm, zeros);
}

// Inclusive prefix sums over the lanes of a (count, mass) pair.
__device__ __forceinline__ void warp_inclusive_scan(uint32_t& c, unsigned long long& m, int lane) {
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const uint32_t cv = __shfl_up_sync(0xffffffffu, c, o);
    const unsigned long long mv = __shfl_up_sync(0xffffffffu, m, o);
    if (lane >= o) {
      c += cv;
      m += mv;
    }
  }
}

// Scans the buckets from the highest down and finds the one where the running total crosses:
//   by mass:  fixed_to_float(above_mass + suffix) >= gamma,
//   by count: above_cnt + suffix >= K.
// Writes sm.found / bucket / bucket_cnt / above_cnt / above_mass (for the items above it).
// Any CTA size dividing kRadixBuckets with <= 32 warps: thread t scans the buckets
// kRadixBuckets - 1 - per t downwards (per = kRadixBuckets / blockDim.x).
__device__ inline void radix_find(bool by_mass, float gamma, uint32_t K, uint32_t above_cnt,
                                  unsigned long long above_mass, RadixSmem& sm) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nw = blockDim.x >> 5;
  const int per = kRadixBuckets / blockDim.x, top = kRadixBuckets - 1 - per * tid;
  auto mass = [&](int b) { return (static_cast<unsigned long long>(sm.mhi[b]) << 32) | sm.mlo[b]; };
  uint32_t c_own = 0;
  unsigned long long m_own = 0;
  for (int j = 0; j < per; ++j) {
    c_own += sm.cnt[top - j];
    m_own += mass(top - j);
  }
  uint32_t c_scan = c_own;
  unsigned long long m_scan = m_own;
  warp_inclusive_scan(c_scan, m_scan, lane);
  if (lane == 31) {
    sm.warp_cnt[warp] = c_scan;
    sm.warp_mass[warp] = m_scan;
  }
  __syncthreads();
  if (warp == 0) {  // exclusive scan of the warp totals, in place
    const uint32_t wc = lane < nw ? sm.warp_cnt[lane] : 0u;
    const unsigned long long wm = lane < nw ? sm.warp_mass[lane] : 0ull;
    uint32_t sc = wc;
    unsigned long long sw = wm;
    warp_inclusive_scan(sc, sw, lane);
    if (lane < nw) {
      sm.warp_cnt[lane] = sc - wc;
      sm.warp_mass[lane] = sw - wm;
    }
  }
  __syncthreads();
  uint32_t c = c_scan - c_own + sm.warp_cnt[warp];  // items above this thread's buckets
  unsigned long long m = m_scan - m_own + sm.warp_mass[warp];
  auto reached = [&](uint32_t cc, unsigned long long mm) {
    return by_mass ? fixed_to_float(above_mass + mm) >= gamma : above_cnt + cc >= K;
  };
  bool before = reached(c, m);  // monotone along the scan: exactly one bucket crosses
  for (int j = 0; j < per; ++j) {
    const int bkt = top - j;
    const uint32_t cb = sm.cnt[bkt];
    const unsigned long long mb = mass(bkt);
    const bool after = reached(c + cb, m + mb);
    if (after && !before) {
      sm.found = 1;
      sm.bucket = bkt;
      sm.bucket_cnt = cb;
      sm.above_cnt = above_cnt + c;
      sm.above_mass = above_mass + m;
    }
    before = after;
    c += cb;
    m += mb;
  }
  __syncthreads();
}

// Descends the three digits. by_mass: the item where the running mass reaches gamma (its
// rank is above_cnt + take). Otherwise the K-th item (1 <= K <= n).
__device__ inline Threshold radix_threshold(const float* x, uint32_t n, bool by_mass, float gamma, uint32_t K,
                                            RadixSmem& sm) {
  constexpr int kShift[3] = {21, 10, 0};
  constexpr uint32_t kMask[3] = {0x7ffu, 0x7ffu, 0x3ffu};
  uint32_t prefix = 0, pmask = 0, above_cnt = 0;
  unsigned long long above_mass = 0;
  Threshold th{false, 0, 0, 0, 0};
  for (int level = 0; level < 3; ++level) {
    radix_histogram(x, 0, n, prefix, pmask, kShift[level], kMask[level], by_mass, sm);
    radix_find(by_mass, gamma, K, above_cnt, above_mass, sm);
    const int found = sm.found;
    const uint32_t bucket = sm.bucket;
    th.tie_cnt = sm.bucket_cnt;
    above_cnt = sm.above_cnt;
    above_mass = sm.above_mass;
    __syncthreads();  // everyone has read sm before it is reused
    if (!found) return th;  // only at level 0: the total never reaches gamma
    prefix |= bucket << kShift[level];
    pmask |= kMask[level] << kShift[level];
  }
  th.found = true;
  th.bits = prefix;
  th.above_cnt = above_cnt;
  if (by_mass) {
    // Fewest t in [1, tie_cnt] equal items with float(above + t v) >= gamma (monotone in t).
    if (threadIdx.x == 0) {
      const unsigned long long v = to_fixed(prefix);
      uint32_t lo = 1, hi = th.tie_cnt;
      while (lo < hi) {
        const uint32_t mid = lo + (hi - lo) / 2;
        if (fixed_to_float(above_mass + v * mid) >= gamma) hi = mid; else lo = mid + 1;
      }
      sm.take = lo;
    }
    __syncthreads();
    th.take = sm.take;
    __syncthreads();
  } else {
    th.take = K - above_cnt;
  }
  return th;
}

// The rule's count: K = max(kmin, min(kg, kmax)) clipped to n (kg = 0 without the gamma rule).
__device__ __forceinline__ uint32_t budget_count(uint32_t kg, uint32_t kmin, uint32_t kmax, uint32_t n) {
  uint32_t K = kg < kmax ? kg : kmax;
  if (K < kmin) K = kmin;
  return K > n ? n : K;
}

// Writes the bitmask words[begin / 32, ceil(n / 32)) of the selection (begin a multiple of
// 32): items above the threshold, and the first `take` items equal to it in index order,
// `seen` of which lie before `begin`. mode: 0 none, 1 all, 2 threshold.
__device__ inline void radix_mark(const float* x, uint32_t n, int mode, const Threshold& th, uint32_t* words,
                                  RadixSmem& sm, uint32_t begin = 0, uint32_t seen = 0) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const uint32_t n_round = (n + 31) / 32 * 32;
  if (mode != 2 || th.take == th.tie_cnt) {
    constexpr int kBatch = 8;
    for (uint32_t i0 = begin + tid; i0 < n_round; i0 += kBatch * blockDim.x) {  // loads first, then votes
      bool sel[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const uint32_t i = i0 + u * blockDim.x;
        sel[u] = i < n && (mode == 1 || (mode == 2 && item_bits(x[i]) >= th.bits));
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const uint32_t i = i0 + u * blockDim.x;
        if (i - lane >= n_round) break;  // warp-uniform
        const uint32_t w = __ballot_sync(0xffffffffu, sel[u]);
        if (lane == 0) words[i >> 5] = w;
      }
    }
    return;
  }
  // Ties split: rank the equal items in index order, one CTA-wide chunk at a time.
  for (uint32_t base = begin; base < n_round; base += blockDim.x) {
    const uint32_t i = base + tid;
    uint32_t bits = 0;
    if (i < n) bits = item_bits(x[i]);
    const bool eq = i < n && bits == th.bits;
    const uint32_t eq_ballot = __ballot_sync(0xffffffffu, eq);
    __syncthreads();
    if (lane == 0) sm.warp_cnt[warp] = __popc(eq_ballot);
    __syncthreads();
    uint32_t rank = seen + __popc(eq_ballot & ((1u << lane) - 1u));
    uint32_t chunk_total = 0;
    for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) {
      if (w < warp) rank += sm.warp_cnt[w];
      chunk_total += sm.warp_cnt[w];
    }
    const bool sel = i < n && (bits > th.bits || (eq && rank < th.take));
    const uint32_t w = __ballot_sync(0xffffffffu, sel);
    if (lane == 0 && i < n_round) words[i >> 5] = w;
    seen += chunk_total;
  }
}

// The whole rule: K = max(kmin, min(kg, kmax)) clipped to n, where kg is the fewest items
// reaching gamma (n if never) when use_gamma, else 0; then the top K items.
__device__ inline void select_top(const float* x, uint32_t n, bool use_gamma, float gamma, uint32_t kmin,
                                  uint32_t kmax, uint32_t* words, RadixSmem& sm) {
  uint32_t kg = 0;
  Threshold th{false, 0, 0, 0, 0};
  if (use_gamma) {
    th = radix_threshold(x, n, true, gamma, 0, sm);
    kg = th.found ? th.above_cnt + th.take : n;
  }
  const uint32_t K = budget_count(kg, kmin, kmax, n);
  if (K == 0) {
    radix_mark(x, n, 0, th, words, sm);
    return;
  }
  if (K == n) {
    radix_mark(x, n, 1, th, words, sm);
    return;
  }
  if (!(use_gamma && th.found && K == kg)) th = radix_threshold(x, n, false, 0.f, K, sm);
  radix_mark(x, n, 2, th, words, sm);
}

// ---------------------------------------------------------------------------------------
// The same rule for short arrays (n <= kRankMax, the vertical and slash scores of one head):
// every item's rank is counted directly (value descending, ties by lower index), the
// sorted values are summed in the same 62-bit fixed point, and the items of rank < K are
// marked. A handful of barriers instead of the radix descent's dozens.
constexpr uint32_t kRankMax = 2048;

struct RankSmem {
  alignas(16) uint32_t bits[kRankMax];  // item bits, index order (zero padded)
  uint32_t rank[kRankMax];    // item rank, index order
  uint32_t sorted[kRankMax];  // item bits, rank order
  unsigned long long warp_tot[32];
  uint32_t kg;
};

__device__ inline void rank_select(const float* x, uint32_t n, bool use_gamma, float gamma, uint32_t kmin,
                                   uint32_t kmax, uint32_t* words, RankSmem& sm) {
  const uint32_t tid = threadIdx.x, nthreads = blockDim.x, lane = tid & 31, warp = tid >> 5;
  __syncthreads();  // a previous call may still read sm
  // tpi threads (a power of two <= 32) count the rank of one item together: sub-thread s
  // reads the groups of four items 4 (t tpi + s) .. + 3 (adjacent 16-byte loads across the
  // sub-threads); the items are padded with zeros up to a multiple of 4 tpi (a zero pad
  // never ranks above an item: it is not greater, and equal ones have a larger index).
  uint32_t tpi = 1;
  while (tpi < 32 && tpi * 2 * n <= nthreads) tpi *= 2;
  const uint32_t groups = (n + 4 * tpi - 1) / (4 * tpi);  // groups of four per sub-thread
  for (uint32_t i = tid; i < 4 * tpi * groups; i += nthreads) sm.bits[i] = i < n ? item_bits(x[i]) : 0u;
  if (tid == 0) sm.kg = n;
  __syncthreads();
  const uint32_t per_pass = nthreads / tpi, sub = tid % tpi;
  for (uint32_t i0 = 0; i0 < n; i0 += per_pass) {  // uniform: every lane reaches the shuffles
    const uint32_t i = i0 + tid / tpi;
    uint32_t r = 0;
    if (i < n) {
      const uint32_t bi = sm.bits[i];
      const uint4* quads = reinterpret_cast<const uint4*>(sm.bits);
      for (uint32_t t = 0; t < groups; ++t) {
        const uint32_t g = t * tpi + sub, j = 4 * g;
        const uint4 b4 = quads[g];
        r += (b4.x > bi || (b4.x == bi && j < i)) ? 1u : 0u;
        r += (b4.y > bi || (b4.y == bi && j + 1 < i)) ? 1u : 0u;
        r += (b4.z > bi || (b4.z == bi && j + 2 < i)) ? 1u : 0u;
        r += (b4.w > bi || (b4.w == bi && j + 3 < i)) ? 1u : 0u;
      }
    }
    for (uint32_t o = 1; o < tpi; o <<= 1) r += __shfl_xor_sync(0xffffffffu, r, o);
    if (i < n && sub == 0) {
      sm.rank[i] = r;
      sm.sorted[r] = sm.bits[i];
    }
  }
  __syncthreads();
  if (use_gamma) {  // kg = 1 + the first rank where the running mass reaches gamma
    const uint32_t per = (n + nthreads - 1) / nthreads, p0 = tid * per;
    unsigned long long local = 0;
    for (uint32_t k = 0; k < per; ++k)
      if (p0 + k < n) local += to_fixed(sm.sorted[p0 + k]);
    unsigned long long scan = local;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const unsigned long long v = __shfl_up_sync(0xffffffffu, scan, o);
      if (static_cast<int>(lane) >= o) scan += v;
    }
    if (lane == 31) sm.warp_tot[warp] = scan;
    __syncthreads();
    unsigned long long cum = scan - local;
    for (uint32_t w = 0; w < warp; ++w) cum += sm.warp_tot[w];
    for (uint32_t k = 0; k < per; ++k) {
      if (p0 + k >= n) break;
      cum += to_fixed(sm.sorted[p0 + k]);
      if (fixed_to_float(cum) >= gamma) {
        atomicMin(&sm.kg, p0 + k + 1);
        break;
      }
    }
    __syncthreads();
  }
  const uint32_t kg = use_gamma ? sm.kg : 0u;
  const uint32_t K = budget_count(kg, kmin, kmax, n);
  const uint32_t n_round = (n + 31) / 32 * 32;
  for (uint32_t i = tid; i < n_round; i += nthreads) {
    const bool sel = i < n && sm.rank[i] < K;
    const uint32_t w = __ballot_sync(0xffffffffu, sel);
    if (lane == 0) words[i >> 5] = w;
  }
}

}  // namespace selection
}  // namespace flexprefill
