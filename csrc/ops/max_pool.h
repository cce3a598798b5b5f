// attnscale::caffe_max_pool2d — the argument checks shared by the CPU kernel and the CUDA glue, so that
// every backend raises the same messages ("caffe_max_pool2d: ...").
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "ops/max_pool_window.h"

namespace attnscale {
namespace max_pool {

// Checks x (4-D), the geometry (kernel >= 1, stride >= 1, 0 <= pad < kernel, all bounded by kMaxGeometry),
// a non-empty input and output, and that every window holds an input pixel (Caffe's size rule guarantees
// it).  Returns the kernel clipped to max(H, W) + pad (a window reaching past the image is clipped to it
// anyway, so the windows are the same).  Dtype and device are the backend's to check.
int64_t check_args(const at::Tensor& x, int64_t kernel, int64_t stride, int64_t pad, int64_t out_h, int64_t out_w);

// caffe_ave_pool2d: the checks of check_args; returns the kernel as given (AVE's divisor counts the padding the
// whole window reaches, so it is not clipped).
int64_t check_ave_args(const at::Tensor& x, int64_t kernel, int64_t stride, int64_t pad, int64_t out_h,
                       int64_t out_w);

// caffe_max_pool2d_with_mask (training): check_args, then that the window offsets fit the uint8 mask
// (clipped kernel^2 <= kMaskNone).  Returns the clipped kernel.
int64_t check_mask_args(const at::Tensor& x, int64_t kernel, int64_t stride, int64_t pad, int64_t out_h,
                        int64_t out_w);

// caffe_max_pool2d_backward: grad (N, C, OH, OW) floating point and mask (uint8) of one shape and device,
// the geometry as in check_mask_args for an input of (in_h, in_w) (whose Caffe output must be (OH, OW)).
// Returns the clipped kernel.  Dtype and device support are the backend's to check.
int64_t check_backward_args(const at::Tensor& grad, const at::Tensor& mask, int64_t kernel, int64_t stride,
                            int64_t pad, int64_t in_h, int64_t in_w);

}  // namespace max_pool
}  // namespace attnscale
