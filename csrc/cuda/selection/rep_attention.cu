// Instantiations of the two tensor-core passes (rep_attention.cuh), in their own
// translation unit so they compile in parallel with the rest of the selection.
#include "cuda/selection/rep_attention.cuh"

namespace flexprefill {
namespace selection {

cudaError_t launch_rep_pass_any(const RepPassParams& p, int batch, bool is_bf16, int pass, cudaStream_t stream) {
  if (is_bf16) return pass == 1 ? launch_rep_pass<true, 1>(p, batch, stream) : launch_rep_pass<true, 2>(p, batch, stream);
  return pass == 1 ? launch_rep_pass<false, 1>(p, batch, stream) : launch_rep_pass<false, 2>(p, batch, stream);
}

}  // namespace selection
}  // namespace flexprefill
