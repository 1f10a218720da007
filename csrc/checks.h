// Input validation and parameter filling shared by every backend. Each check names what
// was wrong and what is supported.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <vector>

#include "params.h"

namespace flexprefill {

// Head dims / block sizes supported for tensors of this device type.
std::vector<int64_t> supported_head_dims(c10::DeviceType device);
std::vector<int64_t> supported_block_sizes(c10::DeviceType device);
// Implemented by the CUDA glue (cuda/dispatch.cu); empty lists in a build without CUDA.
std::vector<int64_t> cuda_head_dims();

// q [B, Nq, Hq, D], k and v [B, Nk, Hkv, D] (v may be undefined): ranks, shapes,
// devices, dtypes, strides (last dim contiguous), head dim, block size, Nq <= Nk, GQA.
void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
               int64_t block_size);

// Selection hyper-parameters: gamma in (0, 1], tau >= 0, 0 <= min_budget <= max_budget.
void check_select_args(const char* op, double gamma, double tau, int64_t min_budget,
                       c10::optional<int64_t> max_budget);

// kv_count [B, Hq, NBq] int32 and kv_index [B, Hq, NBq, >=1] int32 on q's device.
void check_selection_shapes(const char* op, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& kv_count, const at::Tensor& kv_index,
                            int64_t block_size);

// Contents of a selection (host tensors): every count in [0, NBk], indices in range and
// strictly ascending. Reports the first offending (b, h, r).
void check_selection_values_cpu(const char* op, const at::Tensor& kv_count,
                                const at::Tensor& kv_index, int64_t num_k_blocks);

float resolve_softmax_scale(c10::optional<double> softmax_scale, int64_t head_dim);

AttentionParams make_attention_params(const at::Tensor& q, const at::Tensor& k,
                                      const at::Tensor& v, const at::Tensor& kv_count,
                                      const at::Tensor& kv_index, const at::Tensor& out,
                                      const at::Tensor& lse, int64_t block_size,
                                      float softmax_scale);

SelectParams make_select_params(const at::Tensor& q, const at::Tensor& k,
                                const at::Tensor& kv_count, const at::Tensor& kv_index,
                                const at::Tensor& query_aware, double gamma, double tau,
                                int64_t min_budget, c10::optional<int64_t> max_budget,
                                int64_t block_size, float softmax_scale);

}  // namespace flexprefill
