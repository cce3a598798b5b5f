// CUDA glue of attnscale::scale_merge: checks (shared with the CPU kernel, csrc/ops/scale_merge.cpp),
// contiguity, output allocation, current stream, then the raw-pointer launchers of
// csrc/ops/cuda/scale_merge_kernel.cu.  Mirrors csrc/ops/cpu/scale_merge_kernel.cpp.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "ops/scale_merge.h"
#include "ops/scale_merge_cuda.h"

namespace attnscale {
namespace scale_merge {
namespace {

cuda::DType cuda_dtype(at::ScalarType st, const char* op) {
  switch (st) {
    case at::kFloat:
      return cuda::DType::kFloat32;
    case at::kHalf:
      return cuda::DType::kFloat16;
    case at::kBFloat16:
      return cuda::DType::kBFloat16;
    default:
      TORCH_CHECK_VALUE(false, op, ": scores dtype ", st,
                        " is not supported on CUDA (float32, float16 or bfloat16)");
  }
  return cuda::DType::kFloat32;  // unreachable
}

cuda::Problem make_problem(const std::vector<at::Tensor>& sc, Mode mode, const char* op) {
  TORCH_CHECK_VALUE(sc[0].is_cuda(), op, ": CUDA kernel got scores[0] on ", sc[0].device());
  TORCH_CHECK_VALUE(static_cast<int>(sc.size()) <= cuda::kMaxScales, op, ": at most ", cuda::kMaxScales,
                    " scales are supported on CUDA, got ", sc.size());
  cuda::Problem p;
  p.S = static_cast<int>(sc.size());
  p.N = sc[0].size(0);
  p.C = sc[0].size(1);
  for (int s = 0; s < p.S; ++s) {
    // the kernels index within one plane in 32-bit arithmetic (tap offsets i * W + j)
    TORCH_CHECK_VALUE(sc[s].size(2) * sc[s].size(3) <= std::numeric_limits<int32_t>::max(), op, ": scores[", s,
                      "] has ", sc[s].size(2), "x", sc[s].size(3), " pixels per plane, more than the CUDA kernel's ",
                      "32-bit plane indexing allows (2^31 - 1)");
    p.H[s] = static_cast<int>(sc[s].size(2));
    p.W[s] = static_cast<int>(sc[s].size(3));
  }
  p.mode = static_cast<int>(mode);
  p.dtype = cuda_dtype(sc[0].scalar_type(), op);
  return p;
}

// ATTNSCALE_MERGE_LOGIT_GROUPS: lanes per pixel of the attention backward's logit gradient, a tuning
// knob for benchmarks/merge_kernels.py (--logit-groups); unset or empty: the kernel's own rule.
int logit_groups_from_env() {
  const char* v = std::getenv("ATTNSCALE_MERGE_LOGIT_GROUPS");
  if (v == nullptr || *v == '\0') return 0;
  char* end = nullptr;
  const long g = std::strtol(v, &end, 10);
  TORCH_CHECK_VALUE(*end == '\0' && g >= 1 && g <= 32 && (g & (g - 1)) == 0,
                    "scale_merge_backward: ATTNSCALE_MERGE_LOGIT_GROUPS=", v,
                    " is not a power of two from 1 to 32");
  return static_cast<int>(g);
}

// ATTNSCALE_MERGE_BACKWARD: the backward kernel's layout, "element" (a thread per gradient element) or "pixel"
// (a thread per pixel and class chunk, attention and avg), for benchmarks/merge_kernels.py (--backward) and
// the CUDA tests.  Unset or empty: pixel for attention (measured on an H100, 2026-11-26: 1.5x / 2.1x /
// 1.06x less GPU time at N=10 / N=30 / N=1, benchmarks/RESULTS.md), element otherwise (avg not timed).
int backward_layout_from_env(Mode mode) {
  const char* v = std::getenv("ATTNSCALE_MERGE_BACKWARD");
  if (v == nullptr || *v == '\0') return mode == Mode::kAttention ? 1 : 0;
  if (std::strcmp(v, "element") == 0) return 0;
  TORCH_CHECK_VALUE(std::strcmp(v, "pixel") == 0, "scale_merge_backward: ATTNSCALE_MERGE_BACKWARD=", v,
                    " is neither 'element' nor 'pixel'");
  return 1;
}

// ATTNSCALE_MERGE_BACKWARD_THREADS: the pixel layout's class chunks sized for about this many threads in all
// (1: one chunk of every class per pixel), a tuning knob for benchmarks/merge_kernels.py (--chunk-threads);
// unset or empty: the kernel's own rule (131072).
int64_t chunk_threads_from_env() {
  const char* v = std::getenv("ATTNSCALE_MERGE_BACKWARD_THREADS");
  if (v == nullptr || *v == '\0') return 0;
  char* end = nullptr;
  const long long t = std::strtoll(v, &end, 10);
  TORCH_CHECK_VALUE(*end == '\0' && t >= 1 && t <= (1LL << 30),
                    "scale_merge_backward: ATTNSCALE_MERGE_BACKWARD_THREADS=", v, " is not an integer from 1 to 2^30");
  return static_cast<int64_t>(t);
}

std::vector<at::Tensor> contiguous_list(at::TensorList scores) {
  std::vector<at::Tensor> out;
  out.reserve(scores.size());
  for (const auto& s : scores) out.push_back(s.contiguous());
  return out;
}

std::tuple<at::Tensor, at::Tensor> scale_merge_cuda(at::TensorList scores_in,
                                                    const std::optional<at::Tensor>& logits_in,
                                                    c10::string_view mode_str) {
  const Mode mode = check_forward_inputs(scores_in, logits_in, mode_str);
  const c10::cuda::CUDAGuard guard(scores_in[0].device());
  const std::vector<at::Tensor> sc = contiguous_list(scores_in);
  const cuda::Problem p = make_problem(sc, mode, "scale_merge");
  const at::Tensor logits = mode == Mode::kAttention ? logits_in->contiguous() : at::Tensor();
  const int64_t H0 = sc[0].size(2), W0 = sc[0].size(3);
  at::Tensor merged = at::empty({p.N, p.C, H0, W0}, sc[0].options());
  at::Tensor weights = at::empty({p.N, static_cast<int64_t>(p.S), H0, W0}, sc[0].options());
  if (p.N == 0) return {merged, weights};
  std::vector<const void*> ptrs;
  for (const auto& s : sc) ptrs.push_back(s.data_ptr());
  const cudaError_t err =
      cuda::launch_forward(p, ptrs.data(), logits.defined() ? logits.data_ptr() : nullptr, merged.data_ptr(),
                           weights.data_ptr(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "scale_merge: CUDA forward launch failed: ", cudaGetErrorString(err));
  return {merged, weights};
}

std::tuple<std::vector<at::Tensor>, at::Tensor> scale_merge_backward_cuda(
    const at::Tensor& grad_merged, const std::optional<at::Tensor>& grad_weights, at::TensorList scores_in,
    const std::optional<at::Tensor>& logits_in, c10::string_view mode_str, const std::optional<at::Tensor>& weights_in) {
  const Mode mode = check_backward_inputs(grad_merged, grad_weights, scores_in, logits_in, mode_str, weights_in);
  const c10::cuda::CUDAGuard guard(scores_in[0].device());
  const std::vector<at::Tensor> sc = contiguous_list(scores_in);
  cuda::Problem p = make_problem(sc, mode, "scale_merge_backward");
  p.logit_groups = mode == Mode::kAttention ? logit_groups_from_env() : 0;
  p.backward_layout = mode != Mode::kMax ? backward_layout_from_env(mode) : 0;
  p.chunk_threads = p.backward_layout == 1 ? chunk_threads_from_env() : 0;
  const at::Tensor logits = mode == Mode::kAttention ? logits_in->contiguous() : at::Tensor();
  const at::Tensor gout = grad_merged.contiguous();
  const at::Tensor gw = (mode == Mode::kAttention && grad_weights.has_value() && grad_weights->defined())
                            ? grad_weights->contiguous()
                            : at::Tensor();
  std::vector<at::Tensor> grads;
  std::vector<const void*> ptrs;
  std::vector<void*> gptrs;
  for (const auto& s : sc) {
    grads.push_back(at::empty_like(s));
    ptrs.push_back(s.data_ptr());
    gptrs.push_back(grads.back().data_ptr());
  }
  at::Tensor glogits = mode == Mode::kAttention ? at::empty_like(logits) : at::empty({0}, sc[0].options());
  // the forward's softmax weights, read instead of recomputed (attention, float32: launch_backward)
  const at::Tensor weights = (mode == Mode::kAttention && weights_in.has_value() && weights_in->defined() &&
                              sc[0].scalar_type() == at::kFloat)
                                 ? weights_in->contiguous()
                                 : at::Tensor();
  if (p.N == 0) return {grads, glogits};
  const cudaError_t err = cuda::launch_backward(
      p, gout.data_ptr(), gw.defined() ? gw.data_ptr() : nullptr, ptrs.data(),
      logits.defined() ? logits.data_ptr() : nullptr, weights.defined() ? weights.data_ptr() : nullptr, gptrs.data(),
      mode == Mode::kAttention ? glogits.data_ptr() : nullptr, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "scale_merge_backward: CUDA launch failed: ", cudaGetErrorString(err));
  return {grads, glogits};
}

}  // namespace
}  // namespace scale_merge
}  // namespace attnscale

TORCH_LIBRARY_IMPL(attnscale, CUDA, m) {
  m.impl("scale_merge", &attnscale::scale_merge::scale_merge_cuda);
  m.impl("scale_merge_backward", &attnscale::scale_merge::scale_merge_backward_cuda);
}
