// CPU pattern selection (design.md §1 steps 1-5 and 7), one (batch, query head) per task.
// Mirrors flexprefill/reference.py `select_head` step by step; the CUDA op computes the
// same selection.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <tuple>
#include <vector>

#include "checks.h"
#include "config.h"

namespace flexprefill {

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Keys per chunk of the representative-query logits (bounds scratch to m * kKeyChunk).
constexpr int64_t kKeyChunk = 4096;

// Indices of `scores` by descending score, ties by lower index (a stable sort), and the
// fewest leading items whose summed score reaches gamma (all items if it never does).
// The running sum is kept in double and compared in float, like torch.cumsum on CPU.
std::pair<std::vector<int64_t>, int64_t> fewest_reaching(const std::vector<float>& scores, float gamma) {
  std::vector<int64_t> order(scores.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return scores[a] > scores[b]; });
  double csum = 0.0;
  for (size_t i = 0; i < order.size(); ++i) {
    csum += scores[order[i]];
    if (static_cast<float>(csum) >= gamma) return {order, static_cast<int64_t>(i) + 1};
  }
  return {order, static_cast<int64_t>(order.size())};
}

// Mean of each block of bs rows of x [N, D] (the last block over its valid rows): [nb, D].
at::Tensor pool_blocks(const at::Tensor& x, int64_t bs) {
  const int64_t N = x.size(0), D = x.size(1), nb = cdiv(N, bs);
  auto pooled = at::empty({nb, D}, x.options());
  for (int64_t c = 0; c < nb; ++c) {
    const int64_t len = std::min(bs, N - c * bs);
    pooled[c] = x.narrow(0, c * bs, len).sum(0).div_(static_cast<double>(len));
  }
  return pooled;
}

struct HeadInputs {
  at::Tensor q;  // [Nq, D] fp32
  at::Tensor k;  // [Nk, D] fp32
};

// Selection of one query head; writes kv_count [NBq], kv_index [NBq, NBk] and returns
// whether the head is query-aware.
bool select_head(const HeadInputs& in, const SelectParams& p, int32_t* kv_count, int32_t* kv_index) {
  const int64_t Nq = p.seqlen_q, Nk = p.seqlen_k, bs = p.block_size;
  const int64_t NBq = p.num_q_blocks, NBk = p.num_k_blocks, off = Nk - Nq;
  const float s = p.softmax_scale;

  // Step 1: representative queries Q̂ = the last m rows and their exact causal softmax
  // over all keys, streamed over key chunks in two passes (row statistics, then sums).
  const int64_t m = std::min(bs, Nq);
  const at::Tensor q_hat = in.q.narrow(0, Nq - m, m);  // [m, D]
  auto row_pos = [&](int64_t i) { return off + Nq - m + i; };
  std::vector<float> row_max(m, kNegInf), row_sum(m, 0.f);
  for (int64_t j0 = 0; j0 < Nk; j0 += kKeyChunk) {
    const int64_t len = std::min(kKeyChunk, Nk - j0);
    const at::Tensor l = at::mm(q_hat, in.k.narrow(0, j0, len).t()).mul_(s).contiguous();  // [m, len]
    const float* lp = l.data_ptr<float>();
    for (int64_t i = 0; i < m; ++i) {
      const int64_t vis = std::min(len, row_pos(i) - j0 + 1);  // visible keys of this row
      float mx = row_max[i];
      for (int64_t t = 0; t < vis; ++t) mx = std::max(mx, lp[i * len + t]);
      if (vis <= 0 || mx == kNegInf) continue;
      float sum = 0.f;
      for (int64_t t = 0; t < vis; ++t) sum += std::exp(lp[i * len + t] - mx);
      row_sum[i] = row_sum[i] * std::exp(row_max[i] - mx) + sum;
      row_max[i] = mx;
    }
  }

  // Step 2: vertical score of key j (mean over rows of A[:, j]) and slash score of
  // distance δ = pos_i - j (mean over rows of the attention at that distance).
  std::vector<float> vertical(Nk, 0.f), slash(Nk, 0.f);
  for (int64_t j0 = 0; j0 < Nk; j0 += kKeyChunk) {
    const int64_t len = std::min(kKeyChunk, Nk - j0);
    const at::Tensor l = at::mm(q_hat, in.k.narrow(0, j0, len).t()).mul_(s).contiguous();
    const float* lp = l.data_ptr<float>();
    for (int64_t i = 0; i < m; ++i) {
      const int64_t vis = std::min(len, row_pos(i) - j0 + 1);
      const float inv = 1.f / row_sum[i];
      for (int64_t t = 0; t < vis; ++t) {
        const float a = std::exp(lp[i * len + t] - row_max[i]) * inv;
        vertical[j0 + t] += a;
        slash[row_pos(i) - (j0 + t)] += a;
      }
    }
  }
  for (int64_t j = 0; j < Nk; ++j) {
    vertical[j] /= static_cast<float>(m);
    slash[j] /= static_cast<float>(m);
  }

  // Step 3: pattern decision, d = sqrt(JSD(ā ‖ â)) against tau (paper Eq. 4-5).
  const at::Tensor pool_k = pool_blocks(in.k, bs);  // [NBk, D]
  const at::Tensor est_t = at::softmax(at::mv(pool_k, q_hat.mean(0)).mul_(s), 0).contiguous();  // ā [NBk]
  const float* est = est_t.data_ptr<float>();
  std::vector<float> pooled_vertical(NBk, 0.f);  // â [NBk]
  for (int64_t j = 0; j < Nk; ++j) pooled_vertical[j / bs] += vertical[j];
  double jsd = 0.0;
  for (int64_t c = 0; c < NBk; ++c) {
    const double a = std::max(est[c], kJsdEps), b = std::max(pooled_vertical[c], kJsdEps);
    const double mid = 0.5 * (a + b);
    jsd += 0.5 * a * std::log(a / mid) + 0.5 * b * std::log(b / mid);
  }
  const bool query_aware = std::sqrt(std::max(jsd, 0.0)) < p.tau;

  // Step 4: vertical-slash selection at block granularity: the fewest key-block
  // columns (scored by â) and, separately, the fewest distance bins [t*bs, t*bs+bs)
  // (scored by their slash mass) reaching gamma; budgets are ceil(tokens / bs) blocks.
  // Query-aware heads keep only the min-budget blocks of each (the union of step 5).
  std::vector<float> slash_bins(NBk, 0.f);
  for (int64_t d = 0; d < Nk; ++d) slash_bins[d / bs] += slash[d];
  const int64_t min_blocks = p.min_blocks, max_blocks = p.max_blocks;
  auto keep_fewest = [&](const std::vector<float>& scores) {
    std::vector<char> chosen(NBk, 0);
    auto [order, kg] = fewest_reaching(scores, p.gamma);
    const int64_t n = query_aware ? min_blocks : std::max(min_blocks, std::min(kg, max_blocks));
    for (int64_t i = 0; i < n; ++i) chosen[order[i]] = 1;
    return chosen;
  };
  const std::vector<char> cols = keep_fewest(pooled_vertical);
  const std::vector<char> bins = keep_fewest(slash_bins);

  // Step 5: query-aware estimate: row-wise block-causal softmax of s pool(Q) pool(K)ᵀ,
  // each query block carrying 1/NBq, flattened; the fewest blocks reaching gamma.
  std::vector<char> qa_blocks;
  if (query_aware) {
    const at::Tensor pool_q = pool_blocks(in.q, bs);  // [NBq, D]
    at::Tensor logits = at::mm(pool_q, pool_k.t()).mul_(s);  // [NBq, NBk]
    int64_t allowed = 0;
    for (int64_t r = 0; r < NBq; ++r) {
      const int64_t last = (off + std::min(r * bs + bs, Nq) - 1) / bs;  // last causal block
      allowed += last + 1;
      if (last + 1 < NBk) logits[r].narrow(0, last + 1, NBk - last - 1).fill_(kNegInf);
    }
    const at::Tensor probs = at::softmax(logits, 1).div_(static_cast<double>(NBq)).contiguous();
    std::vector<float> flat(probs.data_ptr<float>(), probs.data_ptr<float>() + NBq * NBk);
    auto [order, kg] = fewest_reaching(flat, p.gamma);
    kg = std::min(kg, allowed);
    qa_blocks.assign(NBq * NBk, 0);
    for (int64_t i = 0; i < kg; ++i) qa_blocks[order[i]] = 1;
  }

  // Slash lines are covered for every row they touch: block c of query block r holds
  // a selected line iff some selected δ is in [lo - c*bs - bs + 1, hi - c*bs].
  std::vector<int64_t> line_prefix(Nk + 1, 0);
  for (int64_t d = 0; d < Nk; ++d) line_prefix[d + 1] = line_prefix[d] + bins[d / bs];
  auto lines_in = [&](int64_t a, int64_t b) -> bool {
    a = std::max<int64_t>(a, 0);
    b = std::min<int64_t>(b, Nk - 1);
    return a <= b && line_prefix[b + 1] - line_prefix[a] > 0;
  };

  for (int64_t r = 0; r < NBq; ++r) {
    const int64_t lo = off + r * bs, hi = off + std::min(r * bs + bs, Nq) - 1;
    int32_t n = 0;
    for (int64_t c = 0; c <= hi / bs; ++c) {
      const bool keep = p.gamma >= 1.f  // gamma = 1 keeps every causal block
                        || c == 0       // sink
                        || c >= lo / bs  // diagonal
                        || cols[c] || lines_in(lo - c * bs - bs + 1, hi - c * bs) ||
                        (query_aware && qa_blocks[r * NBk + c]);
      if (keep) kv_index[r * NBk + n++] = static_cast<int32_t>(c);
    }
    kv_count[r] = n;
  }
  return query_aware;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> select_blocks_cpu(
    const at::Tensor& q, const at::Tensor& k, double gamma, double tau, int64_t min_budget,
    c10::optional<int64_t> max_budget, int64_t block_size, c10::optional<double> softmax_scale) {
  const char* op = "select_blocks";
  check_qkv(op, q, k, at::Tensor(), block_size);
  check_select_args(op, gamma, tau, min_budget, max_budget);
  const int64_t B = q.size(0), Nq = q.size(1), Hq = q.size(2), D = q.size(3);
  const int64_t Nk = k.size(1), Hkv = k.size(2), bs = block_size;
  const int64_t NBq = cdiv(Nq, bs), NBk = cdiv(Nk, bs);
  const float scale = resolve_softmax_scale(softmax_scale, D);

  auto kv_count = at::zeros({B, Hq, NBq}, q.options().dtype(at::kInt));       // [B, Hq, NBq]
  auto kv_index = at::zeros({B, Hq, NBq, NBk}, q.options().dtype(at::kInt));  // [B, Hq, NBq, NBk]
  auto query_aware = at::zeros({B, Hq}, q.options().dtype(at::kBool));       // [B, Hq]
  if (B == 0 || Nq == 0 || Hq == 0) return {kv_count, kv_index, query_aware};

  const SelectParams p = make_select_params(q, k, kv_count, kv_index, query_aware, gamma, tau, min_budget,
                                            max_budget, block_size, scale);
  const int64_t off = Nk - Nq;
  if (Nq <= dense_threshold(bs, min_budget)) {
    // Step 7: short inputs are answered by dense causal attention: every causal block.
    for (int64_t bh = 0; bh < B * Hq; ++bh)
      for (int64_t r = 0; r < NBq; ++r) {
        const int64_t last = (off + std::min(r * bs + bs, Nq) - 1) / bs;
        for (int64_t c = 0; c <= last; ++c) p.kv_index[(bh * NBq + r) * NBk + c] = static_cast<int32_t>(c);
        p.kv_count[bh * NBq + r] = static_cast<int32_t>(last + 1);
      }
    return {kv_count, kv_index, query_aware};
  }

  const auto qf = q.to(at::kFloat);  // [B, Nq, Hq, D]
  const auto kf = k.to(at::kFloat);  // [B, Nk, Hkv, D]
  at::parallel_for(0, B * Hq, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / Hq, h = bh % Hq;
      HeadInputs in{qf[b].select(1, h).contiguous(), kf[b].select(1, h / (Hq / Hkv)).contiguous()};
      p.query_aware[bh] = select_head(in, p, p.kv_count + bh * NBq, p.kv_index + bh * NBq * NBk);
    }
  });
  return {kv_count, kv_index, query_aware};
}

TORCH_LIBRARY_IMPL(flexprefill, CPU, m) { m.impl("select_blocks", &select_blocks_cpu); }

}  // namespace flexprefill
