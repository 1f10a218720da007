// Instantiations of the one-pass representative-query attention (rep_attention.cuh and its
// wgmma form rep_attention_sm90.cuh), in their own translation unit so they compile in
// parallel with the rest of the selection. A head dim is instantiated when its attention
// instantiation is built (setup.py's FLEXPREFILL_HEAD_DIMS), so the selection supports
// exactly the head dims the op accepts.
#include <algorithm>

#include "cuda/selection/rep_attention_sm90.cuh"

namespace flexprefill {
namespace selection {

namespace {

template <int D>
cudaError_t launch_dim(const RepParams& p, int batch, bool is_bf16, cudaStream_t stream) {
  if constexpr (D % 64 == 0) {  // rep_config picks 2 only up to D = 128
    if constexpr (D <= 128) {
      if (p.sm90 == 2)
        return is_bf16 ? launch_rep_sm90<true, D, 2>(p, batch, stream) : launch_rep_sm90<false, D, 2>(p, batch, stream);
    }
    if (p.sm90 == 1)
      return is_bf16 ? launch_rep_sm90<true, D, 1>(p, batch, stream) : launch_rep_sm90<false, D, 1>(p, batch, stream);
  }
  if (p.sm90) return cudaErrorInvalidValue;
  return is_bf16 ? launch_rep<true, D>(p, batch, stream) : launch_rep<false, D>(p, batch, stream);
}

// A 4-d tensor map of 16-bit values, 128-byte swizzle: dims innermost first, strides (in
// elements) of dims 1-3; a dim of extent 1 gets any valid stride (it is never stepped).
cudaError_t encode_4d(CUtensorMap* map, const uint16_t* base, const int64_t (&dim)[4], const int64_t (&stride)[3],
                      const cuuint32_t (&box)[4]) {
  using Encode = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                              const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                              CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
  static const Encode encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult status;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &status) !=
            cudaSuccess ||
        status != cudaDriverEntryPointSuccess)
      fn = nullptr;
    return reinterpret_cast<Encode>(fn);
  }();
  if (encode == nullptr) return cudaErrorNotSupported;
  cuuint64_t dims[4], strides[3];
  for (int i = 0; i < 4; ++i) dims[i] = static_cast<cuuint64_t>(dim[i]);
  for (int i = 0; i < 3; ++i) {
    const int64_t bytes = stride[i] * 2;
    strides[i] = dims[i + 1] == 1 ? 16 : static_cast<cuuint64_t>(bytes);
    if (dims[i + 1] != 1 && (bytes <= 0 || bytes % 16 != 0)) return cudaErrorInvalidValue;
  }
  const cuuint32_t elem[4] = {1, 1, 1, 1};
  const CUresult r = encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT16, 4, const_cast<uint16_t*>(base), dims, strides, box,
                            elem, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

}  // namespace

cudaError_t make_k_tensor_map(CUtensorMap* map, const RepParams& p, int batch, int head_dim) {
  // D, keys, kv heads, batch
  return encode_4d(map, p.k, {head_dim, p.seqlen_k, p.heads_kv, batch},
                   {p.k_row_stride, p.k_head_stride, p.k_batch_stride},
                   {64, static_cast<cuuint32_t>(kTileKeys), 1, 1});
}

cudaError_t make_q_tensor_map(CUtensorMap* map, const RepParams& p, int batch) {
  // D (64), query rows, query heads, batch
  return encode_4d(map, p.q, {64, p.seqlen_q, p.heads_q, batch}, {p.q_row_stride, p.q_head_stride, p.q_batch_stride},
                   {64, static_cast<cuuint32_t>(p.rows), static_cast<cuuint32_t>(p.heads_per_cta), 1});
}

RepConfig rep_config(const cudaDeviceProp& prop, int head_dim, int m, int group) {
  RepConfig c;
#if defined(FLEXPREFILL_SM90A)
  if (prop.major == 9 && prop.minor == 0 && head_dim % 64 == 0) {
    // 32 rows a warp (two CTAs per SM) where it fits, else 16 rows a warp.
    for (int m16 = head_dim <= 128 ? 2 : 1; m16 >= 1; --m16) {
      int best = 0;
      for (int d = 1; d <= group; ++d)
        if (group % d == 0 && rep_sm90_ok(head_dim, m, d, m16) &&
            rep_sm90_smem_layout(head_dim, m, d, m16).total <= static_cast<int>(prop.sharedMemPerBlockOptin))
          best = d;
      if (best == 0) continue;
      c.sm90 = m16;
      c.heads_per_cta = best;
      c.pools_q = rep_sm90_pools_q(head_dim, m16) && m == 128;
      const int threads = 2 * m * best / m16;
      const int by_regs = 65536 / (128 * threads);  // <= 128 registers a thread
      const int by_smem = static_cast<int>(prop.sharedMemPerMultiprocessor) /
                          (rep_sm90_smem_layout(head_dim, m, best, m16).total +
                           static_cast<int>(prop.reservedSharedMemPerBlock));
      c.ctas_per_sm = std::max(1, std::min(by_regs, by_smem));
      return c;
    }
  }
#endif
  c.heads_per_cta = rep_heads_per_cta(head_dim, m, group, static_cast<int>(prop.sharedMemPerBlockOptin));
  c.ctas_per_sm = rep_ctas_per_sm(head_dim);
  return c;
}

cudaError_t launch_rep_any(const RepParams& p, int batch, bool is_bf16, int head_dim, cudaStream_t stream) {
#define FLEXPREFILL_REP_CASE(D) \
  if (head_dim == D) return launch_dim<D>(p, batch, is_bf16, stream);
#if !defined(FLEXPREFILL_HEAD_DIMS_SUBSET) || defined(FLEXPREFILL_HDIM_64)
  FLEXPREFILL_REP_CASE(64)
#endif
#if !defined(FLEXPREFILL_HEAD_DIMS_SUBSET) || defined(FLEXPREFILL_HDIM_80)
  FLEXPREFILL_REP_CASE(80)
#endif
#if !defined(FLEXPREFILL_HEAD_DIMS_SUBSET) || defined(FLEXPREFILL_HDIM_96)
  FLEXPREFILL_REP_CASE(96)
#endif
#if !defined(FLEXPREFILL_HEAD_DIMS_SUBSET) || defined(FLEXPREFILL_HDIM_128)
  FLEXPREFILL_REP_CASE(128)
#endif
#if !defined(FLEXPREFILL_HEAD_DIMS_SUBSET) || defined(FLEXPREFILL_HDIM_256)
  FLEXPREFILL_REP_CASE(256)
#endif
#undef FLEXPREFILL_REP_CASE
  return cudaErrorInvalidValue;
}

}  // namespace selection
}  // namespace flexprefill
