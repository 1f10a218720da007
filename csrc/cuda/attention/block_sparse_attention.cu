// CUDA glue of flexprefill::block_sparse_attention (design.md §1 step 6): checks the
// tensors, validates the selection on the device (validate=True), allocates the outputs,
// fills AttentionParams, and dispatches (dtype x head dim x block size, then the device's
// architecture) to the framework-free kernels of fwd.h.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <sstream>
#include <tuple>

#include "checks.h"
#include "config.h"
#include "cuda/attention/fwd.h"
#include "cuda/attention/static_switch.h"
#include "cuda/attention/validate_selection.cuh"

namespace flexprefill {

namespace {

constexpr const char* kOp = "block_sparse_attention";

std::string built_head_dims() {
  std::ostringstream s;
  const auto dims = cuda_head_dims();
  for (size_t i = 0; i < dims.size(); ++i) s << (i ? ", " : "") << dims[i];
  return s.str();
}

// The kernels copy rows with 16-byte cp.async: the data pointer and the strides of the
// batch / sequence / head dims (those with more than one entry) must be multiples of
// 8 elements. Other layouts are copied to a contiguous tensor first.
at::Tensor with_aligned_rows(const at::Tensor& t) {
  bool ok = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int d = 0; d < 3 && ok; ++d) ok = t.size(d) <= 1 || t.stride(d) % 8 == 0;
  return ok ? t : t.contiguous();
}

// validate=True on CUDA: one warp per (b, h, r) row finds the first offence, then one host
// sync reads it. On an offence the CPU checker rebuilds the exact message (same wording
// as the CPU backend); the error path may be slow.
void check_selection_values_cuda(const at::Tensor& kv_count, const at::Tensor& kv_index, int64_t num_k_blocks,
                                 cudaStream_t stream) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  TORCH_CHECK(capture == cudaStreamCaptureStatusNone, kOp,
              ": validate=True checks kv_count/kv_index with a host synchronisation, which is not allowed "
              "while the current CUDA stream is capturing a CUDA graph; pass validate=False under graph capture");
  const int64_t B = kv_count.size(0), H = kv_count.size(1), R = kv_count.size(2);
  const int64_t num_rows = B * H * R;
  if (num_rows == 0) return;
  // UINT64_MAX = no offence.
  auto first_error = at::full({1}, -1, kv_count.options().dtype(at::kLong));
  attention::SelectionCheck c{};
  c.kv_count = kv_count.data_ptr<int32_t>();
  c.kv_index = kv_index.data_ptr<int32_t>();
  c.cnt_batch_stride = kv_count.stride(0); c.cnt_head_stride = kv_count.stride(1);
  c.cnt_row_stride = kv_count.stride(2);
  c.idx_batch_stride = kv_index.stride(0); c.idx_head_stride = kv_index.stride(1);
  c.idx_row_stride = kv_index.stride(2);
  c.heads = H; c.rows_per_head = R; c.num_rows = num_rows;
  c.max_blocks = kv_index.size(3); c.num_k_blocks = num_k_blocks;
  c.first_error = reinterpret_cast<unsigned long long*>(first_error.data_ptr<int64_t>());
  const int64_t blocks = cdiv(num_rows, attention::kValidateWarpsPerBlock);
  attention::validate_selection_kernel<<<static_cast<unsigned>(blocks), attention::kValidateWarpsPerBlock * 32, 0,
                                         stream>>>(c);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const auto key = static_cast<uint64_t>(first_error.item<int64_t>());  // the one host sync
  if (key == std::numeric_limits<uint64_t>::max()) return;
  check_selection_values_cpu(kOp, kv_count, kv_index, num_k_blocks);  // throws the detailed message
  const int64_t row = static_cast<int64_t>(key / static_cast<uint64_t>(c.max_blocks + 1));
  TORCH_CHECK(false, kOp, ": invalid selection at kv_count/kv_index[", row / (H * R), ", ", (row / R) % H, ", ",
              row % R, "]");
}

std::tuple<at::Tensor, at::Tensor> block_sparse_attention_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                               const at::Tensor& v_in, const at::Tensor& kv_count,
                                                               const at::Tensor& kv_index_in, int64_t block_size,
                                                               c10::optional<double> softmax_scale,
                                                               bool validate) {
  check_qkv(kOp, q_in, k_in, v_in, block_size);
  check_selection_shapes(kOp, q_in, k_in, kv_count, kv_index_in, block_size);
  // The kernels read each index list as one contiguous row.
  const at::Tensor kv_index =
      kv_index_in.numel() == 0 || kv_index_in.stride(3) == 1 ? kv_index_in : kv_index_in.contiguous();
  const c10::cuda::CUDAGuard guard(q_in.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t B = q_in.size(0), Nq = q_in.size(1), Hq = q_in.size(2), D = q_in.size(3);
  const int64_t Nk = k_in.size(1);
  const float scale = resolve_softmax_scale(softmax_scale, D);
  if (validate) check_selection_values_cuda(kv_count, kv_index, cdiv(Nk, block_size), stream);

  auto out = at::empty({B, Nq, Hq, D}, q_in.options());                   // [B, Nq, Hq, D]
  auto lse = at::empty({B, Hq, Nq}, q_in.options().dtype(at::kFloat));   // [B, Hq, Nq] fp32
  if (out.numel() == 0) return {out, lse};  // B, Nq or Hq is 0: nothing to launch
  TORCH_CHECK(cdiv(Nq, attention::kMinQueryTile) <= attention::kMaxGridYZ && B <= attention::kMaxGridYZ, kOp,
              ": seqlen_q (", Nq, ") must be <= ", attention::kMaxGridYZ * attention::kMinQueryTile,
              " and batch (", B, ") <= ", attention::kMaxGridYZ, " on CUDA");
  TORCH_CHECK(Hq <= std::numeric_limits<int32_t>::max(), kOp, ": heads_q (", Hq, ") must fit in int32");

  const at::Tensor q = with_aligned_rows(q_in), k = with_aligned_rows(k_in), v = with_aligned_rows(v_in);
  const AttentionParams params =
      make_attention_params(q, k, v, kv_count, kv_index, out, lse, block_size, scale);

  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  attention::DeviceInfo dev;
  dev.cc_major = prop->major;
  dev.cc_minor = prop->minor;
  dev.max_smem_per_block = prop->sharedMemPerBlockOptin;

  // The one dispatch point. A Hopper-native kernel (wgmma/TMA, same AttentionParams) will
  // be chosen here when dev.cc_major == 9 and its instantiation is built; every other
  // device, and head dims it does not cover, take the portable sm80+ kernel.
  const cudaError_t err = FLEXPREFILL_DTYPE_SWITCH(params.is_bf16, Element, [&] {
    return FLEXPREFILL_HEADDIM_SWITCH(D, built_head_dims(), kHeadDim, [&] {
      return FLEXPREFILL_BLOCK_SIZE_SWITCH(block_size, kBlockSize, [&] {
        return attention::run_block_sparse_fwd<Element, kHeadDim, kBlockSize>(params, dev, stream);
      });
    });
  });
  TORCH_CHECK(err != cudaErrorInvalidConfiguration, kOp, ": no kernel configuration for head_dim ", D,
              " fits this device (", prop->name, ", ", dev.max_smem_per_block, " bytes of shared memory per block)");
  C10_CUDA_CHECK(err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(flexprefill, CUDA, m) { m.impl("block_sparse_attention", &block_sparse_attention_cuda); }

}  // namespace flexprefill
