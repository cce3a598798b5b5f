// See gemm.h.
#include "ops/cpu/gemm.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <optional>

namespace attnscale {
namespace cpu_gemm {
namespace {

// Below this many multiply-adds the BLAS: oneDNN's per-call cost (primitive lookup, the reorder of
// W) is then a visible part of the product.
constexpr int64_t kOneDnnMin = int64_t(1) << 22;

// PyTorch's oneDNN linear, if this PyTorch has it with the schema onednn_mm calls it by:
// (Tensor X, Tensor W, Tensor? B, str attr, Scalar?[] scalars, str? algorithm) -> Tensor.
std::optional<c10::OperatorHandle> linear_op() {
  static const std::optional<c10::OperatorHandle> op = []() -> std::optional<c10::OperatorHandle> {
    auto h = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
    if (!h.has_value() || !h->hasKernelForDispatchKey(c10::DispatchKey::CPU)) return std::nullopt;
    const auto& args = h->schema().arguments();
    const char* names[] = {"X", "W", "B", "attr", "scalars", "algorithm"};
    if (args.size() != 6 || h->schema().returns().size() != 1) return std::nullopt;
    for (size_t i = 0; i < 6; ++i)
      if (args[i].name() != names[i]) return std::nullopt;
    return h;
  }();
  return op;
}

bool cpu_has_avx512() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

Backend initial_backend() {
  const char* env = std::getenv("ATTNSCALE_CPU_GEMM");
  if (env != nullptr && *env != '\0') {
    if (std::strcmp(env, "blas") == 0) return Backend::kBlas;
    TORCH_CHECK(std::strcmp(env, "onednn") == 0, "ATTNSCALE_CPU_GEMM must be 'blas' or 'onednn', got '", env, "'");
    TORCH_CHECK(onednn_available(), "ATTNSCALE_CPU_GEMM=onednn: this PyTorch has no mkldnn::_linear_pointwise");
    return Backend::kOneDnn;
  }
  return cpu_has_avx512() && onednn_available() ? Backend::kOneDnn : Backend::kBlas;
}

std::atomic<int>& current() {
  static std::atomic<int> b{static_cast<int>(initial_backend())};
  return b;
}

// a @ b by oneDNN: Y = X W^T with X = a (made row-major if it is not) and W = b^T, a view when b is
// dense (row- or column-major), else a copy: oneDNN takes a W with gaps between its rows by a
// reference path (2.7 s instead of 4 ms for 512 x 512 x 1000).
at::Tensor onednn_mm(const at::Tensor& a, const at::Tensor& b) {
  torch::jit::Stack stack;
  stack.reserve(6);
  stack.emplace_back(a.stride(1) == 1 ? a : a.contiguous());
  stack.emplace_back(b.is_contiguous() || b.t().is_contiguous() ? b.t() : b.contiguous().t());
  stack.emplace_back(c10::IValue());
  stack.emplace_back(std::string("none"));
  stack.emplace_back(c10::List<std::optional<at::Scalar>>());
  stack.emplace_back(c10::IValue());
  linear_op()->callBoxed(&stack);
  return stack.back().toTensor();
}

}  // namespace

bool onednn_available() { return linear_op().has_value(); }

const char* name(Backend b) { return b == Backend::kOneDnn ? "onednn" : "blas"; }

Backend backend() { return static_cast<Backend>(current().load(std::memory_order_relaxed)); }

bool uses_onednn(at::ScalarType dtype) { return dtype == at::kFloat && backend() == Backend::kOneDnn; }

Backend set_backend(Backend b) {
  TORCH_CHECK(b != Backend::kOneDnn || onednn_available(),
              "attnscale: oneDNN GEMMs need PyTorch's mkldnn::_linear_pointwise, which this PyTorch lacks");
  return static_cast<Backend>(current().exchange(static_cast<int>(b)));
}

void matmul_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  if (uses_onednn(out.scalar_type()) && M * N * K >= kOneDnnMin) {
    const at::Tensor y = onednn_mm(a, b);
    if (accumulate) out.add_(y);
    else out.copy_(y);
    return;
  }
  if (accumulate) out.addmm_(a, b);
  else at::mm_out(out, a, b);
}

std::vector<at::Tensor> batched_products(const at::Tensor& a, const at::Tensor& b, at::Tensor& out) {
  const int64_t M = a.size(1), K = a.size(2), N = b.size(2);
  std::vector<at::Tensor> prods;
  prods.reserve(static_cast<size_t>(a.size(0)));
  const bool onednn = uses_onednn(out.scalar_type()) && M * N * K >= kOneDnnMin;
  if (!onednn) at::bmm_out(out, a, b);
  for (int64_t i = 0; i < a.size(0); ++i)
    prods.push_back(onednn ? onednn_mm(a.select(0, i), b.select(0, i)) : out.select(0, i));
  return prods;
}

}  // namespace cpu_gemm
}  // namespace attnscale
