// attnscale::caffe_interp — the argument checks shared by the CPU kernel and the CUDA glue.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace attnscale {
namespace interp {

// x 4-D with a non-empty spatial size, a positive output size, every size below kMaxGeometry (Caffe's
// float index arithmetic).  Dtype and device are the backend's to check.
void check_args(const at::Tensor& x, int64_t out_h, int64_t out_w);

}  // namespace interp
}  // namespace attnscale
