// Instantiations of the one-pass representative-query attention (rep_attention.cuh), in
// their own translation unit so they compile in parallel with the rest of the selection.
// A head dim is instantiated when its attention instantiation is built (setup.py's
// FLEXPREFILL_HEAD_DIMS), so the selection supports exactly the head dims the op accepts.
#include "cuda/attention/static_switch.h"
#include "cuda/selection/rep_attention.cuh"

namespace flexprefill {
namespace selection {

cudaError_t launch_rep_any(const RepParams& p, int batch, bool is_bf16, int head_dim, cudaStream_t stream) {
  auto go = [&](auto dim_tag) -> cudaError_t {
    constexpr int D = decltype(dim_tag)::value;
    return is_bf16 ? launch_rep<true, D>(p, batch, stream) : launch_rep<false, D>(p, batch, stream);
  };
  const int64_t head_dim_ = head_dim;
#define FLEXPREFILL_REP_CASE(D) \
  if (head_dim_ == D) return go(std::integral_constant<int, D>{});
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
