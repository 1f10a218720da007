// Tile shapes of the block-sparse attention kernels and the heuristics that pick them,
// in one place. Framework-free.
#pragma once

#include <cstddef>
#include <cstdint>

namespace flexprefill {
namespace attention {

// Portable (sm80+) FlashAttention-2-style forward kernel: mma.sync m16n8k16, ldmatrix,
// cp.async. One CTA computes a tile of kBlockM query rows of one (batch, query head);
// kBlockM divides the block size, so a tile lies inside one query block and shares its
// selection. Key tiles are kBlockN wide (kBlockN divides the block size). K and V tiles
// are double-buffered. Shared-memory rows are padded by 16 bytes: with (D + 8) * 2 bytes
// per row, an odd number of 16-byte units for every D that is a multiple of 16, the 8 row
// addresses of each ldmatrix hit 8 different bank groups.
template <typename Element_, int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_>
struct FwdTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = kNWarps * 32;
  static constexpr int kStages = 2;  // K and V buffers each
  static constexpr int kSmemStride = kHeadDim + 8;  // elements per shared-memory row
  static constexpr size_t kSmemBytes =
      static_cast<size_t>(kBlockM + 2 * kStages * kBlockN) * kSmemStride * 2;  // 2 = sizeof(b16)

  static_assert(kHeadDim % 16 == 0, "head_dim must be a multiple of 16 (m16n8k16 K steps)");
  static_assert(kBlockM % (16 * kNWarps) == 0, "each warp owns whole 16-row MMA fragments");
  static_assert(kBlockN % 16 == 0, "key tiles are whole 16-key MMA K steps");
  static_assert((kHeadDim / 8) % 2 == 0, "ldmatrix.x4 loads pairs of 8-column fragments");
};

// Large tile: 128 query rows, used when the block size allows it and it fits the device's
// shared memory (H100/H200: all head dims; A100: up to D=128; sm86/sm89: up to D=96).
// D=256 uses 8 warps so that each warp's O accumulator (16 x 256 fp32) stays in registers.
template <typename Element, int kHeadDim>
using FwdTraitsLarge = FwdTraits<Element, kHeadDim, 128, 64, kHeadDim >= 256 ? 8 : 4>;

// Small tile: 64 query rows, 4 warps; block size 64, and the fallback where the large
// tile does not fit (its shared memory, (64 + 4 * kBlockN) * (D + 8) * 2 bytes, is at most
// 99 KB, the opt-in limit of sm86/sm89).
template <typename Element, int kHeadDim>
using FwdTraitsSmall = FwdTraits<Element, kHeadDim, 64, kHeadDim >= 256 ? 32 : 64, 4>;

// The heuristic: the large tile when its rows and key tiles divide the block size and the
// device gives a block its shared memory; otherwise the small tile (the caller checks
// that the small one fits).
template <typename Large>
inline bool use_large_tile(int64_t block_size, size_t max_smem_per_block) {
  return block_size % Large::kBlockM == 0 && block_size % Large::kBlockN == 0 &&
         Large::kSmemBytes <= max_smem_per_block;
}

}  // namespace attention
}  // namespace flexprefill
