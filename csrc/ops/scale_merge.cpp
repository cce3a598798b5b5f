// attnscale::scale_merge — schema and input checks.
//
// Fused "merge the scales" step of Attention to Scale (Chen et al., CVPR 2016, Sec. 3.2):
// every coarser score map is resized to scale 0's size with DeepLab's Interp (bilinear,
// aligned corners, float index arithmetic) on the fly, never materialised, and merged by
//   attention: out = sum_s softmax_s(logits)_s * up(f_s)
//   avg:       out = mean_s up(f_s)                      (Caffe Eltwise SUM, coeff 1/S)
//   max:       out = max_s up(f_s)                       (Caffe's CPU Eltwise MAX: scale 1 beats
//                                                         scale 0 unless 0 > 1, later ones only
//                                                         if strictly greater)
// The backward pass is a separate registered op (scale_merge_backward) so that it can be
// opchecked and so that the autograd kernel (csrc/ops/autograd/scale_merge_autograd.cpp) stays a
// thin wrapper.
#include "ops/scale_merge.h"

#include <torch/library.h>

#include <string>

namespace attnscale {
namespace scale_merge {

Mode parse_mode(std::string_view mode) {
  if (mode == "attention") return Mode::kAttention;
  if (mode == "avg") return Mode::kAvg;
  if (mode == "max") return Mode::kMax;
  TORCH_CHECK_VALUE(false, "scale_merge: mode must be one of 'attention', 'avg', 'max', got '",
                    std::string(mode), "'");
  return Mode::kAttention;  // unreachable
}

Mode check_forward_inputs(at::TensorList scores, const std::optional<at::Tensor>& logits,
                          std::string_view mode_str) {
  const Mode mode = parse_mode(mode_str);
  TORCH_CHECK_VALUE(!scores.empty(), "scale_merge: scores is an empty list (need at least one scale)");
  const int64_t S = static_cast<int64_t>(scores.size());
  for (int64_t s = 0; s < S; ++s) {
    const at::Tensor& f = scores[s];
    TORCH_CHECK_VALUE(f.defined(), "scale_merge: scores[", s, "] is undefined");
    TORCH_CHECK_VALUE(f.dim() == 4, "scale_merge: scores[", s, "] must be 4-D (N, C, H, W), got ",
                      f.dim(), "-D with shape ", f.sizes());
    TORCH_CHECK_VALUE(at::isFloatingType(f.scalar_type()), "scale_merge: scores[", s,
                      "] must have a floating dtype, got ", f.scalar_type());
  }
  const at::Tensor& f0 = scores[0];
  for (int64_t s = 1; s < S; ++s) {
    const at::Tensor& f = scores[s];
    TORCH_CHECK_VALUE(f.scalar_type() == f0.scalar_type(), "scale_merge: scores[", s, "] has dtype ",
                      f.scalar_type(), " but scores[0] has ", f0.scalar_type(), " (mixed dtypes)");
    TORCH_CHECK_VALUE(f.device() == f0.device(), "scale_merge: scores[", s, "] is on ", f.device(),
                      " but scores[0] is on ", f0.device(), " (mixed devices)");
    TORCH_CHECK_VALUE(f.size(0) == f0.size(0), "scale_merge: scores[", s, "] has batch size N=",
                      f.size(0), " but scores[0] has N=", f0.size(0));
    TORCH_CHECK_VALUE(f.size(1) == f0.size(1), "scale_merge: scores[", s, "] has C=", f.size(1),
                      " classes but scores[0] has C=", f0.size(1));
    TORCH_CHECK_VALUE(f.size(2) <= f0.size(2) && f.size(3) <= f0.size(3), "scale_merge: scores[", s,
                      "] is ", f.size(2), "x", f.size(3), ", larger than scores[0] (", f0.size(2), "x",
                      f0.size(3), "); scale 0 must be the finest map");
  }
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK_VALUE(scores[s].size(2) >= 1 && scores[s].size(3) >= 1, "scale_merge: scores[", s,
                      "] has an empty spatial size ", scores[s].sizes());
  }
  TORCH_CHECK_VALUE(f0.size(1) >= 1, "scale_merge: scores[0] has C=0 classes");
  TORCH_CHECK_VALUE(f0.size(2) < (1 << 24) && f0.size(3) < (1 << 24),
                    "scale_merge: scores[0] spatial size too large for float index arithmetic");
  if (mode == Mode::kAttention) {
    TORCH_CHECK_VALUE(logits.has_value() && logits->defined(),
                      "scale_merge: mode='attention' needs logits of shape (N, S, H0, W0)");
    const at::Tensor& l = *logits;
    TORCH_CHECK_VALUE(l.dim() == 4, "scale_merge: logits must be 4-D (N, S, H0, W0), got ", l.dim(),
                      "-D with shape ", l.sizes());
    TORCH_CHECK_VALUE(l.scalar_type() == f0.scalar_type(), "scale_merge: logits has dtype ",
                      l.scalar_type(), " but scores[0] has ", f0.scalar_type(), " (mixed dtypes)");
    TORCH_CHECK_VALUE(l.device() == f0.device(), "scale_merge: logits is on ", l.device(),
                      " but scores[0] is on ", f0.device(), " (mixed devices)");
    TORCH_CHECK_VALUE(l.size(0) == f0.size(0) && l.size(1) == S && l.size(2) == f0.size(2) &&
                          l.size(3) == f0.size(3),
                      "scale_merge: logits has shape ", l.sizes(), " but expected (N, S, H0, W0) = (",
                      f0.size(0), ", ", S, ", ", f0.size(2), ", ", f0.size(3), ") (S = len(scores))");
  }
  return mode;
}

Mode check_backward_inputs(const at::Tensor& grad_merged, const std::optional<at::Tensor>& grad_weights,
                           at::TensorList scores, const std::optional<at::Tensor>& logits,
                           std::string_view mode_str, const std::optional<at::Tensor>& weights) {
  const Mode mode = check_forward_inputs(scores, logits, mode_str);
  const at::Tensor& f0 = scores[0];
  const int64_t S = static_cast<int64_t>(scores.size());
  TORCH_CHECK_VALUE(grad_merged.defined(), "scale_merge_backward: grad_merged is undefined");
  TORCH_CHECK_VALUE(grad_merged.sizes() == f0.sizes(), "scale_merge_backward: grad_merged has shape ",
                    grad_merged.sizes(), " but merged has shape ", f0.sizes());
  TORCH_CHECK_VALUE(grad_merged.scalar_type() == f0.scalar_type() && grad_merged.device() == f0.device(),
                    "scale_merge_backward: grad_merged must have the dtype/device of scores[0]");
  if (grad_weights.has_value() && grad_weights->defined()) {
    const at::Tensor& gw = *grad_weights;
    TORCH_CHECK_VALUE(gw.dim() == 4 && gw.size(0) == f0.size(0) && gw.size(1) == S &&
                          gw.size(2) == f0.size(2) && gw.size(3) == f0.size(3),
                      "scale_merge_backward: grad_weights has shape ", gw.sizes(),
                      " but weights have shape (N, S, H0, W0)");
    TORCH_CHECK_VALUE(gw.scalar_type() == f0.scalar_type() && gw.device() == f0.device(),
                      "scale_merge_backward: grad_weights must have the dtype/device of scores[0]");
  }
  if (weights.has_value() && weights->defined()) {
    const at::Tensor& w = *weights;
    TORCH_CHECK_VALUE(w.dim() == 4 && w.size(0) == f0.size(0) && w.size(1) == S && w.size(2) == f0.size(2) &&
                          w.size(3) == f0.size(3),
                      "scale_merge_backward: weights (the forward's weights output) has shape ", w.sizes(),
                      " but should have shape (N, S, H0, W0)");
    TORCH_CHECK_VALUE(w.scalar_type() == f0.scalar_type() && w.device() == f0.device(),
                      "scale_merge_backward: weights must have the dtype/device of scores[0]");
  }
  return mode;
}

}  // namespace scale_merge
}  // namespace attnscale

TORCH_LIBRARY_FRAGMENT(attnscale, m) {
  // (no default for mode: the Python entry point attnscale.ops.scale_merge is the one place that
  // defaults it)
  m.def("scale_merge(Tensor[] scores, Tensor? logits, str mode) -> (Tensor, Tensor)");
  // grads for every score map at its own resolution, then the logits grad (an empty tensor
  // unless mode == 'attention').
  // weights: the forward's weights output, optional; the CUDA kernels read the attention softmax from it
  // in float32 instead of recomputing it (the same values), the CPU kernels recompute.
  m.def(
      "scale_merge_backward(Tensor grad_merged, Tensor? grad_weights, Tensor[] scores, Tensor? logits, "
      "str mode, Tensor? weights=None) -> (Tensor[], Tensor)");
}
