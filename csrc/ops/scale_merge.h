// attnscale::scale_merge — schema-level declarations shared by the CPU kernel and the CUDA glue.
// The input checks live in csrc/ops/scale_merge.cpp so that every backend raises the same
// messages ("scale_merge: scores[2] ...").
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <optional>
#include <string_view>
#include <vector>

namespace attnscale {
namespace scale_merge {

enum class Mode : int { kAttention = 0, kAvg = 1, kMax = 2 };

// The average merge's weight of each scale: Caffe's Eltwise SUM with coeff 1/S, where coeff is a float field of
// the prototxt, so a Net<double> multiplies by float(1/S) too (checked against a real Caffe:
// tests/test_caffe_reference.py).
template <typename T>
inline T avg_coefficient(int64_t S) {
  return static_cast<T>(static_cast<float>(1.0 / static_cast<double>(S)));
}

// Parses "attention" | "avg" | "max"; anything else raises naming the argument.
Mode parse_mode(std::string_view mode);

// Checks the forward arguments (non-empty list, 4-D, floating, same dtype/device, same N and C,
// coarse maps no larger than scale 0, logits (N, S, H0, W0) present for attention) and returns
// the parsed mode.  Dtype support per backend is checked by the backend.
Mode check_forward_inputs(at::TensorList scores, const std::optional<at::Tensor>& logits,
                          std::string_view mode);

// Checks the backward arguments on top of check_forward_inputs (weights: the forward's weights output, if
// given: (N, S, H0, W0) of scores[0]'s dtype and device).
Mode check_backward_inputs(const at::Tensor& grad_merged, const std::optional<at::Tensor>& grad_weights,
                           at::TensorList scores, const std::optional<at::Tensor>& logits,
                           std::string_view mode, const std::optional<at::Tensor>& weights);

// How a batch item's classes are split into chunks for the partial reductions over classes
// (max-mode counts, attention logit gradients): chunk k holds classes [k * size, min(C, (k + 1) *
// size)), about `want` chunks and never an empty one (its partial would be summed too).  Depends on
// the shape only, never on the thread count, so results are bit-identical whatever the parallelism.
struct ClassSplit {
  int64_t chunks, size;
};
inline ClassSplit split_classes(int64_t C, int64_t want) {
  want = std::max<int64_t>(1, std::min<int64_t>(C, want));
  const int64_t size = (C + want - 1) / want;
  return {(C + size - 1) / size, size};
}

}  // namespace scale_merge
}  // namespace attnscale
