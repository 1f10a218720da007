// CPU block-sparse attention (design.md §1 step 6): exact causal attention over the
// selected key blocks, online softmax with fp32 accumulation, parallel over
// (batch, query head, query block).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

#include "checks.h"
#include "config.h"

namespace flexprefill {

namespace {

// At most this many consecutive key blocks go into one matmul, which bounds the scratch
// memory of one query block at kChunkBlocks * block_size keys.
constexpr int32_t kChunkBlocks = 16;

}  // namespace

std::tuple<at::Tensor, at::Tensor> block_sparse_attention_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& kv_count,
    const at::Tensor& kv_index, int64_t block_size, c10::optional<double> softmax_scale, bool validate) {
  const char* op = "block_sparse_attention";
  check_qkv(op, q, k, v, block_size);
  check_selection_shapes(op, q, k, kv_count, kv_index, block_size);
  const int64_t B = q.size(0), Nq = q.size(1), Hq = q.size(2), D = q.size(3);
  const int64_t Nk = k.size(1), Hkv = k.size(2), bs = block_size;
  const int64_t NBq = cdiv(Nq, bs), NBk = cdiv(Nk, bs), off = Nk - Nq, group = Hq / Hkv;
  if (validate) check_selection_values_cpu(op, kv_count, kv_index, NBk);
  const float scale = resolve_softmax_scale(softmax_scale, D);

  // [B, Nq, Hq, D] fp32 accumulator output, cast to q's dtype at the end.
  auto out = at::zeros({B, Nq, Hq, D}, q.options().dtype(at::kFloat));
  auto lse = at::full({B, Hq, Nq}, -std::numeric_limits<float>::infinity(), q.options().dtype(at::kFloat));
  if (B == 0 || Nq == 0 || Hq == 0) return {out.to(q.scalar_type()), lse};

  const auto qf = q.to(at::kFloat);                                     // [B, Nq, Hq, D]
  const auto kf = k.to(at::kFloat).transpose(1, 2).contiguous();       // [B, Hkv, Nk, D]
  const auto vf = v.to(at::kFloat).transpose(1, 2).contiguous();       // [B, Hkv, Nk, D]
  const auto cnt = kv_count.contiguous();
  const auto idx = kv_index.contiguous();
  const int32_t* cnt_p = cnt.data_ptr<int32_t>();
  const int32_t* idx_p = idx.data_ptr<int32_t>();
  const int64_t M = idx.size(3);
  float* out_p = out.data_ptr<float>();
  float* lse_p = lse.data_ptr<float>();
  const auto fopt = at::TensorOptions().dtype(at::kFloat);
  const auto lopt = at::TensorOptions().dtype(at::kLong);
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();

  at::parallel_for(0, B * Hq * NBq, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task % NBq, h = (task / NBq) % Hq, b = task / (NBq * Hq);
      const int64_t row0 = r * bs, nr = std::min(bs, Nq - row0);
      const int32_t n = cnt_p[task];
      const int32_t* blocks = idx_p + task * M;

      const at::Tensor qb = qf[b].narrow(0, row0, nr).select(1, h);  // [nr, D]
      const at::Tensor kh = kf[b][h / group];                          // [Nk, D] contiguous
      const at::Tensor vh = vf[b][h / group];
      // Absolute positions of the rows; keys after them are masked (causal).
      const at::Tensor row_pos = at::arange(off + row0, off + row0 + nr, lopt).unsqueeze(1);  // [nr, 1]
      at::Tensor row_max = at::full({nr}, kNegInf, fopt);  // [nr]
      at::Tensor row_sum = at::zeros({nr}, fopt);          // [nr]
      at::Tensor acc = at::zeros({nr, D}, fopt);           // [nr, D]

      // Runs of consecutive selected blocks are contiguous key ranges: one matmul each.
      for (int32_t first = 0; first < n;) {
        int32_t last = first + 1;
        while (last < n && last - first < kChunkBlocks && blocks[last] == blocks[last - 1] + 1) ++last;
        const int64_t j0 = int64_t(blocks[first]) * bs, j1 = std::min(Nk, int64_t(blocks[last - 1]) * bs + bs);
        first = last;
        at::Tensor s = at::mm(qb, kh.narrow(0, j0, j1 - j0).t()).mul_(scale);  // [nr, j1 - j0]
        if (j1 - 1 > off + row0) {
          s.masked_fill_(at::arange(j0, j1, lopt).unsqueeze(0) > row_pos, kNegInf);
        }
        // Online softmax (fp32): rescale the partial sums by exp(old max - new max).
        const at::Tensor new_max = at::maximum(row_max, s.amax(1));
        const at::Tensor safe_max = new_max.masked_fill(new_max == kNegInf, 0.f);
        const at::Tensor alpha = (row_max - safe_max).exp_();
        s.sub_(safe_max.unsqueeze(1)).exp_();
        row_sum.mul_(alpha).add_(s.sum(1));
        acc.mul_(alpha.unsqueeze(1)).addmm_(s, vh.narrow(0, j0, j1 - j0));
        row_max = new_max;
      }

      const float* ap = acc.data_ptr<float>();
      const float* mp = row_max.data_ptr<float>();
      const float* lp = row_sum.data_ptr<float>();
      for (int64_t i = 0; i < nr; ++i) {
        if (!(lp[i] > 0.f)) continue;  // the row sees no key: out 0, lse -inf
        float* o = out_p + ((b * Nq + row0 + i) * Hq + h) * D;
        const float inv = 1.f / lp[i];
        for (int64_t d = 0; d < D; ++d) o[d] = ap[i * D + d] * inv;
        lse_p[(b * Hq + h) * Nq + row0 + i] = mp[i] + std::log(lp[i]);
      }
    }
  });
  return {out.to(q.scalar_type()), lse};
}

TORCH_LIBRARY_IMPL(flexprefill, CPU, m) { m.impl("block_sparse_attention", &block_sparse_attention_cpu); }

}  // namespace flexprefill
