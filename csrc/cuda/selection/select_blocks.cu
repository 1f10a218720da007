// CUDA glue of flexprefill::select_blocks (design.md §1 steps 1-5 and 7): checks, device
// guard, stream, workspace, and the launch sequence of the framework-free kernels in
// select_kernels.cuh / rep_attention.cuh. No host synchronisation: capturable in a CUDA graph.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <tuple>

#include "checks.h"
#include "config.h"
#include "cuda/selection/rep_attention.cuh"
#include "cuda/selection/select_kernels.cuh"
#include "cuda/selection/select_plan.h"

namespace flexprefill {

namespace {

using selection::SelectBuffers;
using selection::SelectPlan;

// The tensor-core passes copy 16-byte chunks of rows (and the Hopper one reads K through a
// TMA descriptor, which refuses zero strides): the base and the strides must allow it.
bool rows_16b_aligned(const at::Tensor& t) {
  for (int d = 0; d < 3; ++d)
    if (t.stride(d) % 8 != 0 || (t.size(d) > 1 && t.stride(d) == 0)) return false;
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

// The rep kernel and its launch shape on the current device (m representative rows).
selection::RepConfig rep_config_of(const SelectParams& p, int64_t m) {
  return selection::rep_config(*at::cuda::getCurrentDeviceProperties(), static_cast<int>(p.head_dim),
                               static_cast<int>(m), static_cast<int>(p.heads_q / p.heads_kv));
}

// A testing hook's value: the positive integer in environment variable `name` (a multiple of
// `multiple` <= `max`, counting `unit`s), or 0 when it is unset or empty; anything else is an
// error that says what the hook takes.
int64_t test_hook(const char* name, const char* unit, int64_t multiple, int64_t max) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return 0;
  char* end = nullptr;
  const long long n = std::strtoll(v, &end, 10);
  TORCH_CHECK(end != v && *end == '\0' && n > 0 && n % multiple == 0 && n <= max, name, " must be a positive ",
              multiple == 1 ? c10::str(unit) : c10::str("multiple of ", multiple, " ", unit, " (at most ", max, ")"),
              ", got '", v, "'");
  return n;
}

// Testing hooks (tests/test_cuda_selection.py; unset in normal use):
// FLEXPREFILL_TEST_QA_WAVE_BYTES replaces the step-5 scratch budget per wave of heads
// (kEstBudgetBytes), so that small inputs take the several-wave path that only long prompts
// take otherwise; FLEXPREFILL_TEST_REP_SPLIT replaces the rep kernel's keys per CTA, which the
// plan otherwise shortens until the CTAs fill the GPU (test-sized inputs would only ever run
// the shortest splits).
size_t est_budget_bytes() {
  const int64_t n = test_hook("FLEXPREFILL_TEST_QA_WAVE_BYTES", "byte count", 1, int64_t(1) << 40);
  return n > 0 ? static_cast<size_t>(n) : selection::kEstBudgetBytes;
}
int64_t rep_split_override() {
  return test_hook("FLEXPREFILL_TEST_REP_SPLIT", "keys", selection::kSplitKeysMin, int64_t(1) << 24);
}

// The plan of a call on the current device.
SelectPlan plan_of(const SelectParams& p, double gamma, double tau) {
  const selection::RepConfig rc = rep_config_of(p, std::min(p.block_size, p.seqlen_q));
  const int num_sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return selection::make_select_plan(p, gamma, tau, num_sms * rc.ctas_per_sm, rc.heads_per_cta, est_budget_bytes(),
                                     rc.pools_q, rep_split_override());
}

selection::RepParams rep_params(const SelectParams& p, const SelectPlan& plan, const SelectBuffers& w) {
  selection::RepParams r{};
  r.q = static_cast<const uint16_t*>(p.q);
  r.k = static_cast<const uint16_t*>(p.k);
  r.q_batch_stride = p.q_batch_stride; r.q_row_stride = p.q_row_stride; r.q_head_stride = p.q_head_stride;
  r.k_batch_stride = p.k_batch_stride; r.k_row_stride = p.k_row_stride; r.k_head_stride = p.k_head_stride;
  r.seqlen_q = static_cast<int>(p.seqlen_q);
  r.seqlen_k = static_cast<int>(p.seqlen_k);
  r.heads_q = static_cast<int>(p.heads_q);
  r.heads_kv = static_cast<int>(p.heads_kv);
  r.rows = static_cast<int>(plan.rows);
  r.block_size = static_cast<int>(p.block_size);
  r.split_keys = static_cast<int>(plan.split_keys);
  r.num_splits = static_cast<int>(plan.num_splits);
  r.num_k_blocks = static_cast<int>(p.num_k_blocks);
  r.scale_log2 = plan.scale_log2;
  r.rec = w.rec;
  r.part_ref = w.part_ref;
  r.part_sum = w.part_sum;
  r.pool_k = w.pool_k;
  r.qhat_mean = w.qhat_mean;
  r.poolq = plan.rep_pools_q ? w.poolq : nullptr;
  r.num_q_blocks = static_cast<int>(p.num_q_blocks);
  const selection::RepConfig rc = rep_config_of(p, r.rows);
  r.heads_per_cta = rc.heads_per_cta;
  r.sm90 = rc.sm90;
  return r;
}

// Steps 1-2 into the workspace: records, pool(K), mean(Q̂). Reads only q and k.
void launch_rep_pass(const SelectParams& p, const SelectPlan& plan, const SelectBuffers& w, cudaStream_t stream) {
  const selection::RepParams rp = rep_params(p, plan, w);
  const cudaError_t err =
      selection::launch_rep_any(rp, static_cast<int>(p.batch), p.is_bf16, static_cast<int>(p.head_dim), stream);
  // The Hopper kernel reads K through a TMA descriptor (rep_attention_sm90.cuh) that the
  // driver builds before the launch; say so if that is what failed.
  TORCH_CHECK(err != cudaErrorNotSupported,
              "select_blocks: the CUDA driver does not provide cuTensorMapEncodeTiled, which the Hopper (sm_90a) "
              "selection kernel needs to read K; update the driver (CUDA 12.0 or newer)");
  TORCH_CHECK(!(rp.sm90 && err == cudaErrorInvalidValue),
              "select_blocks: the CUDA driver refused the TMA descriptor of k (shape ", p.batch, " x ", p.seqlen_k,
              " x ", p.heads_kv, " x ", p.head_dim, ", element strides ", p.k_batch_stride, ", ", p.k_row_stride, ", ",
              p.k_head_stride, ")", rp.poolq != nullptr ? " or of q" : "",
              "; passing contiguous tensors avoids it");
  C10_CUDA_CHECK(err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Steps 2-4 from the records: lse2, vertical / slash mass, query_aware (p.query_aware) and
// the vertical-slash bitmasks (`part`: all, or the decision / the vertical-slash selection).
void launch_finish_pass(const SelectParams& p, const SelectPlan& plan, const SelectBuffers& w, cudaStream_t stream,
                        int part = selection::kFinishAll) {
  C10_CUDA_CHECK(selection::launch_finish(p, plan, w, part, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Two events for one fork / join between streams (timing disabled; destroyed with the
// object: CUDA releases an event still pending in a stream once it completes).
struct ForkJoinEvents {
  cudaEvent_t fork = nullptr, join = nullptr;
  ForkJoinEvents() {
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&fork, cudaEventDisableTiming));
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&join, cudaEventDisableTiming));
  }
  ~ForkJoinEvents() {
    cudaEventDestroy(fork);
    cudaEventDestroy(join);
  }
  ForkJoinEvents(const ForkJoinEvents&) = delete;
  ForkJoinEvents& operator=(const ForkJoinEvents&) = delete;
};

// Inputs the kernels can read: rows copied when the layout does not allow 16-byte loads.
std::pair<at::Tensor, at::Tensor> kernel_inputs(const at::Tensor& q, const at::Tensor& k) {
  return {rows_16b_aligned(q) ? q : q.contiguous(), rows_16b_aligned(k) ? k : k.contiguous()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> select_blocks_cuda(const at::Tensor& q, const at::Tensor& k,
                                                                  double gamma, double tau, int64_t min_budget,
                                                                  c10::optional<int64_t> max_budget,
                                                                  int64_t block_size,
                                                                  c10::optional<double> softmax_scale) {
  constexpr const char* op = "select_blocks";
  check_qkv(op, q, k, at::Tensor(), block_size);
  check_select_args(op, gamma, tau, min_budget, max_budget);
  const float scale = resolve_softmax_scale(softmax_scale, q.size(3));
  const c10::cuda::CUDAGuard guard(q.device());

  const int64_t B = q.size(0), Nq = q.size(1), Hq = q.size(2), Nk = k.size(1);
  const int64_t NBq = cdiv(Nq, block_size), NBk = cdiv(Nk, block_size);
  // The kernels index positions in int32 and a head's (query block, key block) pairs in uint32.
  TORCH_CHECK(Nk <= INT32_MAX && NBq * NBk <= UINT32_MAX, op, ": seqlen_k (", Nk, ") with block_size ", block_size,
              " is too long for the CUDA selection: it supports seqlen_k < 2^31 and ceil(seqlen_q / block_size) * "
              "ceil(seqlen_k / block_size) < 2^32");
  const auto opts = q.options();
  at::Tensor kv_count, kv_index, query_aware;
  SelectParams p{};
  auto allocate_outputs = [&] {
    kv_count = at::empty({B, Hq, NBq}, opts.dtype(at::kInt));       // [B, Hq, NBq] int32
    kv_index = at::empty({B, Hq, NBq, NBk}, opts.dtype(at::kInt));  // [B, Hq, NBq, NBk] int32
    query_aware = at::empty({B, Hq}, opts.dtype(at::kBool));        // [B, Hq] bool
    p.kv_count = kv_count.data_ptr<int32_t>();
    p.kv_index = kv_index.data_ptr<int32_t>();
    p.query_aware = query_aware.data_ptr<bool>();
  };
  auto stream = at::cuda::getCurrentCUDAStream();
  if (B == 0 || Hq == 0) {
    allocate_outputs();
    return {kv_count, kv_index, query_aware};
  }
  if (Nq == 0) {  // no query block; every head is (trivially) dense
    allocate_outputs();
    C10_CUDA_CHECK(cudaMemsetAsync(query_aware.data_ptr(), 0, query_aware.numel(), stream));
    return {kv_count, kv_index, query_aware};
  }

  const auto [qk, kk] = kernel_inputs(q, k);
  p = make_select_params(qk, kk, at::Tensor(), at::Tensor(), at::Tensor(), gamma, tau, min_budget, max_budget,
                         block_size, scale);  // the outputs are set by allocate_outputs
  const SelectPlan plan = plan_of(p, gamma, tau);

  if (plan.dense) {  // step 7: short inputs attend every causal block
    allocate_outputs();
    C10_CUDA_CHECK(cudaMemsetAsync(query_aware.data_ptr(), 0, query_aware.numel(), stream));
    C10_CUDA_CHECK(selection::launch_assemble(p, plan, nullptr, true, stream));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {kv_count, kv_index, query_aware};
  }

  // Scratch from the caching allocator (stream-ordered; freed when this op returns).
  at::Tensor workspace = at::empty({static_cast<int64_t>(plan.workspace_bytes)}, opts.dtype(at::kByte));
  const SelectBuffers w = selection::select_buffers(plan, workspace.data_ptr());
  // The rep pass reads only q and k: launched before the outputs are allocated, so the GPU
  // starts on it a few microseconds sooner.
  launch_rep_pass(p, plan, w, stream);
  allocate_outputs();
  // With a query-aware step, the vertical-slash selection (step 4) runs beside it: both need
  // only the decision. Up to kWarpSelectMax key blocks it is a small kernel launched right
  // after the first estimate (select_kernels.cuh: it starts once every estimate CTA has);
  // beyond, finish_kernel on a side stream. Fork and join through events (capturable in a
  // CUDA graph); the workspace stays alive for the side stream's work because the main
  // stream waits for it before anything after this op can reuse the memory.
  const bool overlap = !plan.keep_all && plan.any_query_aware;
  const bool select_warps = overlap && p.num_k_blocks <= selection::kWarpSelectMax;
  c10::optional<ForkJoinEvents> fj;
  if (overlap) {
    launch_finish_pass(p, plan, w, stream, selection::kFinishDecide);
    if (!select_warps) {
      const at::cuda::CUDAStream side = at::cuda::getStreamFromPool(false, q.device().index());
      fj.emplace();
      C10_CUDA_CHECK(cudaEventRecord(fj->fork, stream));
      C10_CUDA_CHECK(cudaStreamWaitEvent(side, fj->fork, 0));
      launch_finish_pass(p, plan, w, side, selection::kFinishSelect);
      C10_CUDA_CHECK(cudaEventRecord(fj->join, side));
    }
  } else {
    launch_finish_pass(p, plan, w, stream);
  }

  if (overlap) {
    const bool small = selection::qa_one_cta(p);
    for (int64_t wave = 0; wave < plan.waves; ++wave) {
      const int64_t head0 = wave * plan.heads_per_wave;
      // (pool(Q) also clears the multi-CTA selection's bitmask words and radix state; with
      // rep_pools_q the rep kernel wrote pool(Q) and the records kernel cleared them)
      if (!plan.rep_pools_q) {
        C10_CUDA_CHECK(selection::launch_qa_pool(p, plan, w, head0, stream));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      C10_CUDA_CHECK(selection::launch_qa_estimate(p, plan, w, head0, stream));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (select_warps && wave == 0) {
        C10_CUDA_CHECK(selection::launch_select_warps(p, plan, w, stream));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (small) {  // one CTA per head; it also zeroes the words of the other heads
        C10_CUDA_CHECK(selection::launch_qa_select_small(p, plan, w, head0, stream));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        continue;
      }
      for (int level = 1; level < 3; ++level) {  // level 0 ran in qa_estimate
        C10_CUDA_CHECK(selection::launch_qa_radix_level(p, plan, w, head0, level, stream));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      C10_CUDA_CHECK(selection::launch_qa_mark(p, plan, w, head0, stream));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  if (fj) C10_CUDA_CHECK(cudaStreamWaitEvent(stream, fj->join, 0));
  C10_CUDA_CHECK(selection::launch_assemble(p, plan, &w, plan.keep_all, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {kv_count, kv_index, query_aware};
}

// Diagnostic hook for tests: the estimate of steps 1-3 on its own, so the scores can be
// compared with the reference within a tolerance (the selection itself must match exactly).
//   lse [B, Hq, m] fp32 (natural log), vertical [B, Hq, NBk] fp32 (â), slash bins [B, Hq, NBk] fp32,
//   query_aware [B, Hq] bool; m = block_size (requires seqlen_q >= block_size).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> selection_scores_cuda(
    const at::Tensor& q, const at::Tensor& k, int64_t block_size, c10::optional<double> softmax_scale,
    double tau) {
  constexpr const char* op = "_selection_scores";
  check_qkv(op, q, k, at::Tensor(), block_size);
  check_select_args(op, 0.5, tau, 0, c10::nullopt);
  TORCH_CHECK(q.size(1) >= block_size, op, ": seqlen_q (", q.size(1), ") must be >= block_size (", block_size, ")");
  const float scale = resolve_softmax_scale(softmax_scale, q.size(3));
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), Nq = q.size(1), Hq = q.size(2), Nk = k.size(1);
  const int64_t NBq = cdiv(Nq, block_size), NBk = cdiv(Nk, block_size);
  const auto opts = q.options();
  at::Tensor kv_count = at::empty({B, Hq, NBq}, opts.dtype(at::kInt));
  at::Tensor kv_index = at::empty({B, Hq, NBq, 1}, opts.dtype(at::kInt));
  at::Tensor query_aware = at::empty({B, Hq}, opts.dtype(at::kBool));
  const auto [qk, kk] = kernel_inputs(q, k);
  SelectParams p = make_select_params(qk, kk, kv_count, kv_index, query_aware, 0.5, tau, 0, c10::nullopt,
                                      block_size, scale);
  p.min_budget_tokens = 0;
  p.min_blocks = 0;
  SelectPlan plan = plan_of(p, 0.5, tau);
  if (plan.dense) {  // the plan of a sparse call, whatever the length
    SelectParams p2 = p;
    p2.seqlen_q = 1 << 30;  // only to defeat the dense threshold in the plan
    plan = plan_of(p2, 0.5, tau);
    plan.rows = block_size;
    plan.n_allowed = 0;
  }
  at::Tensor workspace = at::empty({static_cast<int64_t>(plan.workspace_bytes)}, opts.dtype(at::kByte));
  const SelectBuffers w = selection::select_buffers(plan, workspace.data_ptr());
  auto stream = at::cuda::getCurrentCUDAStream();
  launch_rep_pass(p, plan, w, stream);
  launch_finish_pass(p, plan, w, stream);
  const auto f32 = opts.dtype(at::kFloat);
  at::Tensor lse = at::from_blob(w.lse2, {B, Hq, plan.rows}, f32).clone() * 0.6931471805599453;
  at::Tensor vertical = at::from_blob(w.vert, {B, Hq, NBk}, f32).clone();
  at::Tensor slash = at::from_blob(w.slash, {B, Hq, NBk}, f32).clone();
  return {lse, vertical, slash, query_aware};
}

}  // namespace

TORCH_LIBRARY_IMPL(flexprefill, CUDA, m) {
  m.impl("select_blocks", &select_blocks_cuda);
  m.impl("_selection_scores", &selection_scores_cuda);
}

}  // namespace flexprefill
