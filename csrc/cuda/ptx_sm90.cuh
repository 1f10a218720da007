// Hopper (sm_90a) building blocks as inline PTX: warpgroup MMA (wgmma) with its shared-memory
// matrix descriptors, fences and waits. Usable only in code compiled for sm_90a: callers
// guard their bodies with __CUDA_ARCH_FEAT_SM90_ALL. Framework-free.
//
// Shared-memory operands use the 128-byte swizzle, K-major (the reduction dim contiguous):
// an operand of R rows x C values (b16) is stored as C / 64 column blocks of R rows x 128 B,
// each block 1024-byte aligned; the 16-byte chunk c of row r of a block lies at chunk
// c ^ (r % 8) of that row (sw128_offset). A descriptor points at the first row of 8-row
// groups 1024 B apart; a k16 step inside a block advances its start address by 32 B.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace flexprefill {
namespace sm90 {

// Byte offset of 16-byte chunk `chunk` (8 b16 values) of row `row` in a 128-byte-swizzled
// K-major operand of `rows` rows (rows % 8 == 0).
__host__ __device__ __forceinline__ uint32_t sw128_offset(int row, int chunk, int rows) {
  return static_cast<uint32_t>((chunk >> 3) * rows * 128 + row * 128 + (((chunk & 7) ^ (row & 7)) << 4));
}

// wgmma descriptor of a K-major 128-byte-swizzled operand starting at shared address `addr`,
// as its two 32-bit halves: the low word holds the start address (bits 0-13, address / 16)
// and the leading byte offset (unused for swizzled K-major: 1); the high word the stride
// byte offset (8-row groups 1024 B apart) and the swizzle mode (bits 62-63: 1 = 128 B).
// Shared addresses are < 256 KB, so offsets / 16 add to the low word without a carry out of
// the address field: keep descriptors as low words and add offsets there (32-bit math).
constexpr uint32_t kDescSw128Hi = (1024u >> 4) | (1u << 30);
__device__ __forceinline__ uint32_t desc_sw128_lo(uint32_t addr) { return ((addr & 0x3FFFFu) >> 4) | (1u << 16); }
__device__ __forceinline__ uint64_t desc_sw128_of(uint32_t lo) { return (uint64_t(kDescSw128Hi) << 32) | lo; }

// wgmma descriptor of an operand without swizzle at `addr`: 8 x 16-byte core matrices,
// `lbo` bytes apart along K, `sbo` bytes apart along M / N.
__device__ __forceinline__ uint64_t desc_plain(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return (uint64_t((sbo >> 4) & 0x3FFFu) << 32) | (((lbo >> 4) & 0x3FFFu) << 16) | ((addr & 0x3FFFFu) >> 4);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Generic-proxy writes of this thread to shared memory (cp.async, st.shared) become
// visible to the async proxy (wgmma operand reads) after a barrier.
__device__ __forceinline__ void fence_proxy_async_smem() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// mbarrier (shared::cta, 8 bytes) and the tensor-memory-access (TMA) copy completing on it.
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// Makes initialised barriers visible to the async proxy (before a barrier of the CTA).
__device__ __forceinline__ void mbar_init_fence() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }
// Arrive (count 1) announcing `bytes` of transactions for the current phase.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
// Waits until the phase with parity `parity` has completed.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}
// Box {c0, c1, c2, c3} of a 4-d tensor map (a __grid_constant__ kernel parameter) into shared
// memory at `dst`, completing `bar`'s transactions; out-of-range elements are zeros.
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const void* tmap, uint32_t bar, int c0, int c1, int c2,
                                            int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
      "[%6];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(tmap)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
      : "memory");
}

// Keeps the compiler from moving accesses of the accumulator across a wgmma wait.
__device__ __forceinline__ void fence_operands(float (&d)[4]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) asm volatile("" : "+f"(d[j])::"memory");
}
__device__ __forceinline__ void fence_operands(float (&d)[8][4]) {
#pragma unroll
  for (int n = 0; n < 8; ++n)
#pragma unroll
    for (int j = 0; j < 4; ++j) asm volatile("" : "+f"(d[n][j])::"memory");
}

// d[64 x 64] (+)= A[64 x 16] B[16 x 64] on a warpgroup, fp32 accumulate. d[n][j] of warp w
// of the group: row 16 w + g + 8 (j >> 1), column 8 n + 2 t4 + (j & 1) (g = lane / 4,
// t4 = lane % 4), as the m16n8 accumulators of mma.sync. `rs`: A from registers (the
// m16n8k16 A fragment of the warp's 16 rows); `ss`: A from a descriptor. B from a
// descriptor (K-major: B's 64 columns are rows of 16 values in shared memory).
template <typename Element>
struct Wgmma64x64;

#define FLEXPREFILL_WGMMA_D32                                                                                  \
  "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]),       \
      "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]),   \
      "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]),   \
      "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),   \
      "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
#define FLEXPREFILL_WGMMA_R32                                                                                  \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, " \
  "%23, %24, %25, %26, %27, %28, %29, %30, %31}"

#define FLEXPREFILL_WGMMA_64x64(Element, T)                                                                    \
  template <>                                                                                                  \
  struct Wgmma64x64<Element> {                                                                                 \
    __device__ __forceinline__ static void rs(float (&d)[8][4], const uint32_t (&a)[4], uint64_t desc_b,       \
                                              int accumulate) {                                               \
      asm volatile(                                                                                            \
          "{\n.reg .pred p;\nsetp.ne.b32 p, %36, 0;\n"                                                        \
          "wgmma.mma_async.sync.aligned.m64n64k16.f32." T "." T " " FLEXPREFILL_WGMMA_R32                      \
          ", {%32, %33, %34, %35}, %37, p, 1, 1, 0;\n}\n"                                                     \
          : FLEXPREFILL_WGMMA_D32                                                                              \
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(accumulate), "l"(desc_b));                         \
    }                                                                                                          \
    __device__ __forceinline__ static void ss(float (&d)[8][4], uint64_t desc_a, uint64_t desc_b,             \
                                              int accumulate) {                                               \
      asm volatile(                                                                                            \
          "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                                        \
          "wgmma.mma_async.sync.aligned.m64n64k16.f32." T "." T " " FLEXPREFILL_WGMMA_R32                      \
          ", %32, %33, p, 1, 1, 0, 0;\n}\n"                                                                   \
          : FLEXPREFILL_WGMMA_D32                                                                              \
          : "l"(desc_a), "l"(desc_b), "r"(accumulate));                                                        \
    }                                                                                                          \
  };
FLEXPREFILL_WGMMA_64x64(__nv_bfloat16, "bf16")
FLEXPREFILL_WGMMA_64x64(__half, "f16")
#undef FLEXPREFILL_WGMMA_64x64

// d[64 x 8] (+)= A[64 x 16] B[16 x 8] on a warpgroup, fp32 accumulate, A M-major (`ss_ta`:
// A's 16 K rows are rows of 64 values, a 128-byte-swizzled tile: the descriptor of
// desc_sw128_of, k16 steps 2048 B apart) and B K-major by descriptor. d[j] of warp w of the
// group: row 16 w + g + 8 (j >> 1), column 2 t4 + (j & 1).
template <typename Element>
struct Wgmma64x8;
#define FLEXPREFILL_WGMMA_64x8(Element, T)                                                                     \
  template <>                                                                                                  \
  struct Wgmma64x8<Element> {                                                                                  \
    __device__ __forceinline__ static void ss_ta(float (&d)[4], uint64_t desc_a, uint64_t desc_b,              \
                                                 int accumulate) {                                            \
      asm volatile(                                                                                            \
          "{\n.reg .pred p;\nsetp.ne.b32 p, %6, 0;\n"                                                          \
          "wgmma.mma_async.sync.aligned.m64n8k16.f32." T "." T " {%0, %1, %2, %3}, %4, %5, p, 1, 1, 1, 0;\n}\n" \
          : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                                     \
          : "l"(desc_a), "l"(desc_b), "r"(accumulate));                                                        \
    }                                                                                                          \
  };
FLEXPREFILL_WGMMA_64x8(__nv_bfloat16, "bf16")
FLEXPREFILL_WGMMA_64x8(__half, "f16")
#undef FLEXPREFILL_WGMMA_64x8
#undef FLEXPREFILL_WGMMA_R32
#undef FLEXPREFILL_WGMMA_D32

}  // namespace sm90
}  // namespace flexprefill
