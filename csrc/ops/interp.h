// attnscale::caffe_interp — the argument checks shared by the CPU kernel and the CUDA glue.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <utility>

namespace attnscale {
namespace interp {

// x 4-D with a non-empty spatial size, a positive output size, every size below kMaxGeometry (Caffe's
// float index arithmetic).  Dtype and device are the backend's to check.
void check_args(const at::Tensor& x, int64_t out_h, int64_t out_w);

// caffe_interp_backward: grad (N, C, OH, OW) floating point; per axis an index table (T, in) int64 and a
// weight table of its shape, float32 (float64 for a float64 grad), all on grad's device, contiguous.
// Returns (in_h, in_w).  The index values (0 .. out, out for an unused slot) are the caller's: a kernel
// skips any outside [0, out).
std::pair<int64_t, int64_t> check_backward_args(const at::Tensor& grad, const at::Tensor& idx_h,
                                                const at::Tensor& coef_h, const at::Tensor& idx_w,
                                                const at::Tensor& coef_w);

}  // namespace interp
}  // namespace attnscale
