// attnscale::bias_relu and bias_relu_backward — the argument checks shared by the CPU kernels and the CUDA
// glue, so that every backend raises the same messages.
#pragma once

#include <ATen/ATen.h>

#include "ops/memory_format.h"

namespace attnscale {
namespace bias_relu {

// x (N, C, H, W) floating point, bias (C,) on x's device, of x's dtype or float32 for a float16 / bfloat16 x;
// the dropout ratio p in [0, 1).
void check_forward(const at::Tensor& x, const at::Tensor& bias, double p);

// grad and out (N, C, H, W) of one shape, dtype and device, floating point; bias_dtype as check_forward's;
// scale (1 / (1 - p)) finite and >= 1.
void check_backward(const at::Tensor& grad, const at::Tensor& out, at::ScalarType bias_dtype, double scale);

// A float32 bias of a float16 / bfloat16 map (autocast's case: no cast kernel needed).
inline bool bias_is_float32_of_half(at::ScalarType x, at::ScalarType bias) {
  return bias == at::kFloat && (x == at::kHalf || x == at::kBFloat16);
}

}  // namespace bias_relu
}  // namespace attnscale
