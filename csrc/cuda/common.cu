// CUDA facts shared by the attention and selection glue.
#include <vector>

#include "checks.h"
#include "config.h"

namespace flexprefill {

// Head dims with a compiled attention instantiation. FLEXPREFILL_HEAD_DIMS (setup.py)
// narrows the build while iterating; the list then says what this build really holds.
std::vector<int64_t> cuda_head_dims() {
  std::vector<int64_t> dims;
  for (int d : kCudaHeadDims) {
#ifdef FLEXPREFILL_HEAD_DIMS_SUBSET
    bool built = false;
#define FLEXPREFILL_MARK(D) if (d == D) built = true;
#ifdef FLEXPREFILL_HDIM_64
    FLEXPREFILL_MARK(64)
#endif
#ifdef FLEXPREFILL_HDIM_80
    FLEXPREFILL_MARK(80)
#endif
#ifdef FLEXPREFILL_HDIM_96
    FLEXPREFILL_MARK(96)
#endif
#ifdef FLEXPREFILL_HDIM_128
    FLEXPREFILL_MARK(128)
#endif
#ifdef FLEXPREFILL_HDIM_256
    FLEXPREFILL_MARK(256)
#endif
#undef FLEXPREFILL_MARK
    if (!built) continue;
#endif
    dims.push_back(d);
  }
  return dims;
}

}  // namespace flexprefill
