// Window arithmetic of Caffe's MAX pooling shared by the CPU loops and the CUDA kernels of the training
// op (attnscale::caffe_max_pool2d_with_mask and its backward).  Torch-free.
#pragma once

#include "ops/host_device.h"

namespace attnscale {
namespace max_pool {

// The training op's mask: per output, the winner's offset in its unclipped window, (h - (i s - p)) k +
// (w - (j s - p)), one byte instead of Caffe's int / PyTorch's int64 index; kMaskNone where nothing beat
// the starting -inf (a window of NaNs or -infs: Caffe's maxidx -1, whose gradient goes nowhere).
constexpr int kMaskNone = 255;

// Outputs [lo, hi) along one axis whose window covers input position h (Caffe's MaxPoolBackward:
// phstart = h + pad < kernel ? 0 : (h + pad - kernel) / stride + 1, phend = min((h + pad) / stride + 1, O)).
ATTNSCALE_HD void covering_outputs(int h, int k, int s, int p, int O, int* lo, int* hi) {
  *lo = (h + p < k) ? 0 : (h + p - k) / s + 1;
  const int e = (h + p) / s + 1;
  *hi = e < O ? e : O;
}

}  // namespace max_pool
}  // namespace attnscale
