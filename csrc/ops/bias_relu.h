// attnscale::bias_relu and bias_relu_backward — the argument checks shared by the CPU kernels and the CUDA
// glue, so that every backend raises the same messages.
#pragma once

#include <ATen/ATen.h>

#include "ops/memory_format.h"

namespace attnscale {
namespace bias_relu {

// x (N, C, H, W) floating point, bias (C,) of x's dtype and device.
void check_forward(const at::Tensor& x, const at::Tensor& bias);

// grad and out (N, C, H, W) of one shape, dtype and device, floating point.
void check_backward(const at::Tensor& grad, const at::Tensor& out);

}  // namespace bias_relu
}  // namespace attnscale
