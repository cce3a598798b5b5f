// attnscale::scale_merge — schema-level declarations shared by the CPU kernel and the CUDA glue.
// The input checks live in csrc/ops/scale_merge.cpp so that every backend raises the same
// messages ("scale_merge: scores[2] ...").
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string_view>
#include <vector>

namespace attnscale {
namespace scale_merge {

enum class Mode : int { kAttention = 0, kAvg = 1, kMax = 2 };

// Parses "attention" | "avg" | "max"; anything else raises naming the argument.
Mode parse_mode(std::string_view mode);

// Checks the forward arguments (non-empty list, 4-D, floating, same dtype/device, same N and C,
// coarse maps no larger than scale 0, logits (N, S, H0, W0) present for attention) and returns
// the parsed mode.  Dtype support per backend is checked by the backend.
Mode check_forward_inputs(at::TensorList scores, const std::optional<at::Tensor>& logits,
                          std::string_view mode);

// Checks the backward arguments on top of check_forward_inputs.
Mode check_backward_inputs(const at::Tensor& grad_merged, const std::optional<at::Tensor>& grad_weights,
                           at::TensorList scores, const std::optional<at::Tensor>& logits,
                           std::string_view mode);

// Number of class chunks a batch item is split into for the partial reductions over classes
// (max-mode counts, attention logit gradients).  Depends on the shape only, never on the thread
// count, so results are bit-identical whatever the parallelism.
inline int64_t class_chunks(int64_t N, int64_t C) {
  const int64_t want = (16 + N - 1) / (N > 0 ? N : 1);
  return std::max<int64_t>(1, std::min<int64_t>(C, want));
}

}  // namespace scale_merge
}  // namespace attnscale
