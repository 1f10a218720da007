// Small device helpers of the selection kernels: warp and block reductions; the PTX
// building blocks (cp.async, ldmatrix, mma) are shared with attention (cuda/ptx.cuh).
// Framework-free.
#pragma once

#include <cstdint>

#include "cuda/ptx.cuh"

namespace flexprefill {
namespace selection {

// Programmatic dependent launch (sm_90+; no-ops before). pdl_wait: wait until the grids
// this one depends on have completed and their memory is visible. pdl_launch_dependents: let
// the next grid in the stream be scheduled (it waits in turn).
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
// Both, in that order: the first statement of every kernel launched with launch_chained,
// before any global memory access (select_warps_kernel alone uses the halves apart: it needs
// neither the previous grid's results nor to hold the next one back).
__device__ __forceinline__ void pdl_grid_sync() {
  pdl_wait();
  pdl_launch_dependents();
}

// The two bf16 / fp16 values packed in w (low half first) as floats (exact).
template <bool kBf16>
__device__ __forceinline__ float2 unpack2(uint32_t w) {
  if constexpr (kBf16) {
    return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
  } else {
    return make_float2(__half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu))),
                       __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16))));
  }
}

// Sum over the 32 lanes (float, double or unsigned counts); every lane gets the result.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Block-wide reductions in a fixed order (deterministic): `warp_op` reduces a warp,
// `combine` / `init` fold the warp results in warp order. `scratch` holds >= 32 entries;
// every thread gets the result.
template <typename T, typename WarpOp, typename Combine>
__device__ __forceinline__ T block_reduce(T v, T* scratch, WarpOp warp_op, Combine combine, T init) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  v = warp_op(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T total = init;
  for (int w = 0; w < nw; ++w) total = combine(total, scratch[w]);
  return total;
}
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
  return block_reduce(v, scratch, [](T x) { return warp_sum(x); }, [](T x, T y) { return x + y; }, T(0));
}
__device__ __forceinline__ float block_max(float v, float* scratch) {
  return block_reduce(v, scratch, [](float x) { return warp_max(x); }, [](float x, float y) { return fmaxf(x, y); },
                      -INFINITY);
}

}  // namespace selection
}  // namespace flexprefill
