#include "checks.h"

#include <algorithm>
#include <cmath>
#include <sstream>

#include "config.h"

namespace flexprefill {

namespace {

std::string join(const std::vector<int64_t>& xs) {
  std::ostringstream s;
  for (size_t i = 0; i < xs.size(); ++i) s << (i ? ", " : "") << xs[i];
  return s.str();
}

bool contains(const std::vector<int64_t>& xs, int64_t x) {
  return std::find(xs.begin(), xs.end(), x) != xs.end();
}

}  // namespace

#ifndef FLEXPREFILL_WITH_CUDA
std::vector<int64_t> cuda_head_dims() { return {}; }
#endif

std::vector<int64_t> supported_head_dims(c10::DeviceType device) {
  if (device == c10::DeviceType::CUDA) return cuda_head_dims();
  std::vector<int64_t> dims;
  for (int d = kCpuHeadDimMultiple; d <= kCpuMaxHeadDim; d += kCpuHeadDimMultiple) dims.push_back(d);
  return dims;
}

std::vector<int64_t> supported_block_sizes(c10::DeviceType device) {
  if (device == c10::DeviceType::CUDA) {
    if (cuda_head_dims().empty()) return {};
    return std::vector<int64_t>(kCudaBlockSizes.begin(), kCudaBlockSizes.end());
  }
  return std::vector<int64_t>(kCpuBlockSizes.begin(), kCpuBlockSizes.end());
}

void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
               int64_t block_size) {
  TORCH_CHECK(q.dim() == 4, op, ": q must have rank 4 [batch, seqlen_q, heads_q, head_dim], got shape ",
              q.sizes());
  TORCH_CHECK(k.dim() == 4, op, ": k must have rank 4 [batch, seqlen_k, heads_kv, head_dim], got shape ",
              k.sizes());
  TORCH_CHECK(q.device() == k.device(), op, ": q and k must be on the same device, got ", q.device(),
              " and ", k.device());
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), op, ": q and k must have the same dtype, got ",
              q.scalar_type(), " and ", k.scalar_type());
  if (v.defined()) {
    TORCH_CHECK(v.dim() == 4, op, ": v must have rank 4 [batch, seqlen_k, heads_kv, head_dim], got shape ",
                v.sizes());
    TORCH_CHECK(v.device() == q.device(), op, ": q and v must be on the same device, got ", q.device(),
                " and ", v.device());
    TORCH_CHECK(v.scalar_type() == q.scalar_type(), op, ": q and v must have the same dtype, got ",
                q.scalar_type(), " and ", v.scalar_type());
    TORCH_CHECK(v.sizes() == k.sizes(), op, ": k and v must have the same shape, got ", k.sizes(), " and ",
                v.sizes());
  }
  const auto dev = q.device().type();
  TORCH_CHECK(dev == c10::DeviceType::CPU || dev == c10::DeviceType::CUDA, op,
              ": tensors must be on CPU or CUDA, got ", q.device());
  const auto dt = q.scalar_type();
  if (dev == c10::DeviceType::CPU) {
    TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op,
                ": unsupported dtype ", dt, " on CPU; supported: float32, bfloat16, float16");
  } else {
    TORCH_CHECK(dt == at::kBFloat16 || dt == at::kHalf, op, ": unsupported dtype ", dt,
                " on CUDA; supported: bfloat16, float16");
  }
  TORCH_CHECK(q.size(0) == k.size(0), op, ": q and k must have the same batch size, got ", q.size(0),
              " and ", k.size(0));
  TORCH_CHECK(q.size(3) == k.size(3), op, ": q and k must have the same head_dim, got ", q.size(3), " and ",
              k.size(3));
  const int64_t hq = q.size(2), hkv = k.size(2);
  TORCH_CHECK(hkv > 0 && hq > 0 && hq % hkv == 0, op,
              ": heads_q must be a positive multiple of heads_kv (GQA/MQA), got heads_q=", hq, ", heads_kv=",
              hkv);
  TORCH_CHECK(q.size(1) <= k.size(1), op, ": seqlen_q (", q.size(1), ") must be <= seqlen_k (", k.size(1),
              "): the queries are the last seqlen_q positions of the sequence");
  const auto dims = supported_head_dims(dev);
  TORCH_CHECK(!dims.empty(), op, ": flexprefill was built without CUDA support; reinstall with a CUDA ",
              "toolchain matching torch (FLEXPREFILL_CUDA=1) to use CUDA tensors");
  TORCH_CHECK(contains(dims, q.size(3)), op, ": unsupported head_dim ", q.size(3), " on ",
              c10::DeviceTypeName(dev), "; supported: ", join(dims));
  const auto sizes = supported_block_sizes(dev);
  TORCH_CHECK(contains(sizes, block_size), op, ": unsupported block_size ", block_size, " on ",
              c10::DeviceTypeName(dev), "; supported: ", join(sizes));
  for (const at::Tensor* t : {&q, &k, &v}) {
    if (t->defined() && t->numel() > 0) {
      TORCH_CHECK(t->stride(3) == 1, op, ": the head_dim of q, k and v must be contiguous (stride 1), got strides ",
                  t->strides(), "; call .contiguous() first");
    }
  }
}

void check_select_args(const char* op, double gamma, double tau, int64_t min_budget,
                       c10::optional<int64_t> max_budget) {
  TORCH_CHECK(gamma > 0.0 && gamma <= 1.0, op, ": gamma must be in (0, 1], got ", gamma);
  TORCH_CHECK(tau >= 0.0 && std::isfinite(tau), op, ": tau must be a finite number >= 0, got ", tau);
  TORCH_CHECK(min_budget >= 0, op, ": min_budget must be >= 0 tokens, got ", min_budget);
  if (max_budget.has_value()) {
    TORCH_CHECK(*max_budget >= 1, op, ": max_budget must be >= 1 token (or None), got ", *max_budget);
    TORCH_CHECK(min_budget <= *max_budget, op, ": min_budget (", min_budget, ") must be <= max_budget (",
                *max_budget, ")");
  }
}

void check_selection_shapes(const char* op, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& kv_count, const at::Tensor& kv_index,
                            int64_t block_size) {
  const int64_t B = q.size(0), Hq = q.size(2), NBq = cdiv(q.size(1), block_size);
  TORCH_CHECK(kv_count.device() == q.device() && kv_index.device() == q.device(), op,
              ": kv_count and kv_index must be on q's device ", q.device(), ", got ", kv_count.device(),
              " and ", kv_index.device());
  TORCH_CHECK(kv_count.scalar_type() == at::kInt && kv_index.scalar_type() == at::kInt, op,
              ": kv_count and kv_index must be int32, got ", kv_count.scalar_type(), " and ",
              kv_index.scalar_type());
  TORCH_CHECK(kv_count.dim() == 3 && kv_count.size(0) == B && kv_count.size(1) == Hq &&
                  kv_count.size(2) == NBq,
              op, ": kv_count must have shape [batch, heads_q, ceil(seqlen_q / block_size)] = [", B, ", ", Hq,
              ", ", NBq, "], got ", kv_count.sizes());
  TORCH_CHECK(kv_index.dim() == 4 && kv_index.size(0) == B && kv_index.size(1) == Hq &&
                  kv_index.size(2) == NBq && (kv_index.size(3) >= 1 || NBq == 0),
              op, ": kv_index must have shape [batch, heads_q, ceil(seqlen_q / block_size), max_blocks >= 1] = [",
              B, ", ", Hq, ", ", NBq, ", *], got ", kv_index.sizes());
  (void)k;
}

void check_selection_values_cpu(const char* op, const at::Tensor& kv_count,
                                const at::Tensor& kv_index, int64_t num_k_blocks) {
  const auto cnt = kv_count.to(at::kCPU).contiguous();
  const auto idx = kv_index.to(at::kCPU).contiguous();
  const int64_t B = cnt.size(0), H = cnt.size(1), R = cnt.size(2), M = idx.size(3);
  const int32_t* c = cnt.data_ptr<int32_t>();
  const int32_t* ix = idx.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t r = 0; r < R; ++r) {
        const int64_t row = (b * H + h) * R + r;
        const int32_t n = c[row];
        TORCH_CHECK(n >= 0 && n <= std::min<int64_t>(M, num_k_blocks), op, ": kv_count[", b, ", ", h, ", ", r,
                    "] = ", n, " is out of range [0, min(max_blocks=", M, ", num_k_blocks=", num_k_blocks, ")]");
        const int32_t* list = ix + row * M;
        for (int32_t j = 0; j < n; ++j) {
          TORCH_CHECK(list[j] >= 0 && list[j] < num_k_blocks, op, ": kv_index[", b, ", ", h, ", ", r, ", ", j,
                      "] = ", list[j], " is out of range [0, ", num_k_blocks, ")");
          TORCH_CHECK(j == 0 || list[j] > list[j - 1], op, ": kv_index[", b, ", ", h, ", ", r,
                      ", :kv_count] must be strictly ascending, but entry ", j, " (", list[j],
                      ") follows ", list[j - 1]);
        }
      }
}

float resolve_softmax_scale(c10::optional<double> softmax_scale, int64_t head_dim) {
  if (!softmax_scale.has_value()) return 1.0f / std::sqrt(static_cast<float>(head_dim));
  TORCH_CHECK(std::isfinite(*softmax_scale) && *softmax_scale > 0.0,
              "softmax_scale must be a finite number > 0 (or None for 1/sqrt(head_dim)), got ", *softmax_scale);
  return static_cast<float>(*softmax_scale);
}

AttentionParams make_attention_params(const at::Tensor& q, const at::Tensor& k,
                                      const at::Tensor& v, const at::Tensor& kv_count,
                                      const at::Tensor& kv_index, const at::Tensor& out,
                                      const at::Tensor& lse, int64_t block_size,
                                      float softmax_scale) {
  AttentionParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_batch_stride = q.stride(0); p.q_row_stride = q.stride(1); p.q_head_stride = q.stride(2);
  p.k_batch_stride = k.stride(0); p.k_row_stride = k.stride(1); p.k_head_stride = k.stride(2);
  p.v_batch_stride = v.stride(0); p.v_row_stride = v.stride(1); p.v_head_stride = v.stride(2);
  p.kv_count = kv_count.data_ptr<int32_t>();
  p.kv_index = kv_index.data_ptr<int32_t>();
  p.cnt_batch_stride = kv_count.stride(0); p.cnt_head_stride = kv_count.stride(1);
  p.cnt_row_stride = kv_count.stride(2);
  p.idx_batch_stride = kv_index.stride(0); p.idx_head_stride = kv_index.stride(1);
  p.idx_row_stride = kv_index.stride(2);
  TORCH_CHECK(kv_index.numel() == 0 || kv_index.stride(3) == 1,
              "kv_index must be contiguous in its last dim, got strides ", kv_index.strides());
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.o_batch_stride = out.stride(0); p.o_row_stride = out.stride(1); p.o_head_stride = out.stride(2);
  p.lse_batch_stride = lse.stride(0); p.lse_head_stride = lse.stride(1);
  p.batch = q.size(0); p.seqlen_q = q.size(1); p.seqlen_k = k.size(1);
  p.heads_q = q.size(2); p.heads_kv = k.size(2); p.head_dim = q.size(3);
  p.block_size = block_size;
  p.num_q_blocks = cdiv(p.seqlen_q, block_size);
  p.num_k_blocks = cdiv(p.seqlen_k, block_size);
  p.max_blocks = kv_index.size(3);
  p.softmax_scale = softmax_scale;
  p.is_bf16 = q.scalar_type() == at::kBFloat16;
  return p;
}

SelectParams make_select_params(const at::Tensor& q, const at::Tensor& k,
                                const at::Tensor& kv_count, const at::Tensor& kv_index,
                                const at::Tensor& query_aware, double gamma, double tau,
                                int64_t min_budget, c10::optional<int64_t> max_budget,
                                int64_t block_size, float softmax_scale) {
  SelectParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.q_batch_stride = q.stride(0); p.q_row_stride = q.stride(1); p.q_head_stride = q.stride(2);
  p.k_batch_stride = k.stride(0); p.k_row_stride = k.stride(1); p.k_head_stride = k.stride(2);
  // Undefined outputs leave null pointers (a caller that allocates them later sets them).
  p.kv_count = kv_count.defined() ? kv_count.data_ptr<int32_t>() : nullptr;
  p.kv_index = kv_index.defined() ? kv_index.data_ptr<int32_t>() : nullptr;
  p.query_aware = query_aware.defined() ? query_aware.data_ptr<bool>() : nullptr;
  p.batch = q.size(0); p.seqlen_q = q.size(1); p.seqlen_k = k.size(1);
  p.heads_q = q.size(2); p.heads_kv = k.size(2); p.head_dim = q.size(3);
  p.block_size = block_size;
  p.num_q_blocks = cdiv(p.seqlen_q, block_size);
  p.num_k_blocks = cdiv(p.seqlen_k, block_size);
  p.gamma = static_cast<float>(gamma);
  p.tau = static_cast<float>(tau);
  p.softmax_scale = softmax_scale;
  p.min_budget_tokens = min_budget;
  p.min_blocks = std::min(cdiv(min_budget, block_size), p.num_k_blocks);
  p.max_blocks = max_budget.has_value() ? std::min(cdiv(*max_budget, block_size), p.num_k_blocks) : p.num_k_blocks;
  p.is_bf16 = q.scalar_type() == at::kBFloat16;
  return p;
}

}  // namespace flexprefill
