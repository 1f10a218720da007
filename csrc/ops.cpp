// Every schema of the flexprefill library, and the fused op built from the two others.
// Backends register their kernels with TORCH_LIBRARY_IMPL next to the kernels
// (cpu/*.cpp, cuda/**/*.cu); the fake (meta) kernels live in flexprefill/ops.py.
#include <Python.h>
#include <torch/library.h>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <tuple>

#include "checks.h"

// `from flexprefill import _C` loads this library (and so runs the registrations below)
// without pybind11, so the module builds against the limited Python API.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace flexprefill {

namespace {

c10::DeviceType parse_device_type(c10::string_view name) {
  if (name == "cpu") return c10::DeviceType::CPU;
  if (name == "cuda") return c10::DeviceType::CUDA;
  TORCH_CHECK(false, "unsupported device type '", name, "'; supported: 'cpu', 'cuda'");
}

std::vector<int64_t> head_dims_op(c10::string_view device_type) {
  return supported_head_dims(parse_device_type(device_type));
}

std::vector<int64_t> block_sizes_op(c10::string_view device_type) {
  return supported_block_sizes(parse_device_type(device_type));
}

// The fused op: select (steps 1-5, 7), then attend (step 6). Device-generic: it calls the
// two ops through the dispatcher, so each backend only implements those.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> flex_prefill_attention(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double gamma, double tau,
    int64_t min_budget, c10::optional<int64_t> max_budget, int64_t block_size,
    c10::optional<double> softmax_scale) {
  check_qkv("flex_prefill_attention", q, k, v, block_size);
  static auto select = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("flexprefill::select_blocks", "")
                           .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                               const at::Tensor&, const at::Tensor&, double, double, int64_t,
                               c10::optional<int64_t>, int64_t, c10::optional<double>)>();
  static auto attend = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("flexprefill::block_sparse_attention", "")
                           .typed<std::tuple<at::Tensor, at::Tensor>(
                               const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const at::Tensor&, const at::Tensor&, int64_t,
                               c10::optional<double>, bool)>();
  auto [kv_count, kv_index, query_aware] =
      select.call(q, k, gamma, tau, min_budget, max_budget, block_size, softmax_scale);
  // The selection was just built by our own op: skip the index validation (it would
  // synchronise the host on CUDA).
  auto [out, lse] = attend.call(q, k, v, kv_count, kv_index, block_size, softmax_scale, false);
  return {out, lse, kv_count, kv_index, query_aware};
}

}  // namespace

TORCH_LIBRARY(flexprefill, m) {
  // Steps 1-5 and 7 of FlexPrefill: per query head, the key blocks each query block keeps.
  //   q [B, Nq, Hq, D], k [B, Nk, Hkv, D]  ->
  //   kv_count [B, Hq, NBq] int32, kv_index [B, Hq, NBq, NBk] int32, query_aware [B, Hq] bool
  m.def(
      "select_blocks(Tensor q, Tensor k, float gamma, float tau, int min_budget, int? max_budget, "
      "int block_size, float? softmax_scale) -> (Tensor kv_count, Tensor kv_index, Tensor query_aware)");
  // Step 6: exact causal attention over the selected key blocks.
  //   out [B, Nq, Hq, D] (q's dtype), lse [B, Hq, Nq] fp32 (natural log)
  // validate=True checks kv_count/kv_index values (on CUDA this synchronises the host).
  m.def(
      "block_sparse_attention(Tensor q, Tensor k, Tensor v, Tensor kv_count, Tensor kv_index, "
      "int block_size, float? softmax_scale, bool validate=True) -> (Tensor out, Tensor lse)");
  // select_blocks followed by block_sparse_attention.
  m.def(
      "flex_prefill_attention(Tensor q, Tensor k, Tensor v, float gamma, float tau, int min_budget, "
      "int? max_budget, int block_size, float? softmax_scale) -> (Tensor out, Tensor lse, "
      "Tensor kv_count, Tensor kv_index, Tensor query_aware)");
  // Internal, CUDA only (tests): the estimate of steps 1-3 alone for the last block_size
  // queries: lse [B, Hq, bs] fp32, vertical and slash-bin scores [B, Hq, NBk] fp32, query_aware.
  m.def(
      "_selection_scores(Tensor q, Tensor k, int block_size, float? softmax_scale, float tau) -> "
      "(Tensor lse, Tensor vertical, Tensor slash, Tensor query_aware)");
  // What this build supports on a device type ('cpu' or 'cuda').
  m.def("supported_head_dims(str device_type) -> int[]", &head_dims_op);
  m.def("supported_block_sizes(str device_type) -> int[]", &block_sizes_op);
}

TORCH_LIBRARY_IMPL(flexprefill, CPU, m) { m.impl("flex_prefill_attention", &flex_prefill_attention); }
TORCH_LIBRARY_IMPL(flexprefill, CUDA, m) { m.impl("flex_prefill_attention", &flex_prefill_attention); }

#ifndef FLEXPREFILL_WITH_CUDA
namespace {
[[noreturn]] void no_cuda() {
  TORCH_CHECK(false, "flexprefill was built without CUDA support; reinstall with a CUDA toolchain ",
              "matching torch (FLEXPREFILL_CUDA=1) to use CUDA tensors");
}
std::tuple<at::Tensor, at::Tensor, at::Tensor> select_no_cuda(const at::Tensor&, const at::Tensor&, double,
                                                              double, int64_t, c10::optional<int64_t>,
                                                              int64_t, c10::optional<double>) {
  no_cuda();
}
std::tuple<at::Tensor, at::Tensor> attend_no_cuda(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                  const at::Tensor&, const at::Tensor&, int64_t,
                                                  c10::optional<double>, bool) {
  no_cuda();
}
}  // namespace
TORCH_LIBRARY_IMPL(flexprefill, CUDA, m) {
  m.impl("select_blocks", &select_no_cuda);
  m.impl("block_sparse_attention", &attend_no_cuda);
}
#endif

}  // namespace flexprefill
