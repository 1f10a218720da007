// Framework-free entry points of the block-sparse attention forward kernels: raw
// pointers in AttentionParams, a stream, an error code back. The glue
// (block_sparse_attention.cu) checks tensors and dispatches; the kernels never see ATen.
#pragma once

#include <cuda_runtime.h>

#include "params.h"

namespace flexprefill {
namespace attention {

// What the kernel heuristics need to know about the device the launch goes to.
struct DeviceInfo {
  int cc_major = 8;                // compute capability
  int cc_minor = 0;
  size_t max_smem_per_block = 0;   // opt-in limit (cudaDevAttrMaxSharedMemoryPerBlockOptin)
};

// Portable sm80+ kernel (mma.sync). One explicit instantiation per (Element, kHeadDim,
// kBlockSize) lives in instantiations/fwd_hdim<D>_<dtype>.cu.
// Element is __nv_bfloat16 or __half. Writes p.out [B, Nq, Hq, D] and p.lse [B, Hq, Nq].
template <typename Element, int kHeadDim, int kBlockSize>
cudaError_t run_block_sparse_fwd(const AttentionParams& p, const DeviceInfo& dev, cudaStream_t stream);

// Largest grid the portable kernel accepts: query tiles of one (batch, head) go on grid
// dimension y (at most 65535 tiles of >= 64 rows), the batch on z.
constexpr int64_t kMaxGridYZ = 65535;
constexpr int64_t kMinQueryTile = 64;

}  // namespace attention
}  // namespace flexprefill
