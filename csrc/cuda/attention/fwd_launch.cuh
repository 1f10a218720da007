// Launchers of the portable forward kernel. Included only by the generated instantiation
// files (instantiations/fwd_hdim<D>_<dtype>.cu), one per (head dim, dtype), so each
// kernel compiles once. Framework-free: returns a cudaError_t.
#pragma once

#include <cuda_runtime.h>

#include "cuda/attention/fwd.h"
#include "cuda/attention/fwd_kernel.cuh"
#include "cuda/attention/kernel_traits.h"

namespace flexprefill {
namespace attention {

template <typename Traits>
cudaError_t launch_block_sparse_fwd(const AttentionParams& p, cudaStream_t stream) {
  auto kernel = &block_sparse_fwd_kernel<Traits>;
  constexpr size_t smem = Traits::kSmemBytes;
  if (smem > 48 * 1024) {
    // Needed once per device; cheap enough to repeat at every launch.
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  const int64_t m_tiles = (p.seqlen_q + Traits::kBlockM - 1) / Traits::kBlockM;
  if (m_tiles > kMaxGridYZ || p.batch > kMaxGridYZ) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(p.heads_q), static_cast<unsigned>(m_tiles),
                  static_cast<unsigned>(p.batch));
  kernel<<<grid, Traits::kNThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

// Tile heuristic (kernel_traits.h, use_large_tile): 128-row tiles when the block size is a
// multiple of 128 and the device has the shared memory for them, 64-row tiles otherwise.
template <typename Element, int kHeadDim, int kBlockSize>
cudaError_t run_block_sparse_fwd(const AttentionParams& p, const DeviceInfo& dev, cudaStream_t stream) {
  using Large = FwdTraitsLarge<Element, kHeadDim>;
  using Small = FwdTraitsSmall<Element, kHeadDim>;
  static_assert(kBlockSize % Small::kBlockM == 0 && kBlockSize % Small::kBlockN == 0,
                "block size must be a multiple of the small tile");
  if constexpr (kBlockSize % Large::kBlockM == 0 && kBlockSize % Large::kBlockN == 0) {
    if (use_large_tile<Large>(kBlockSize, dev.max_smem_per_block)) return launch_block_sparse_fwd<Large>(p, stream);
  }
  if (Small::kSmemBytes > dev.max_smem_per_block) return cudaErrorInvalidConfiguration;
  return launch_block_sparse_fwd<Small>(p, stream);
}

}  // namespace attention
}  // namespace flexprefill
