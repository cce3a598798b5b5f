// Raw-pointer launcher of the CUDA caffe_max_pool2d kernel (csrc/ops/cuda/max_pool_kernel.cu).
// Torch-free: included by the .cu (built by a bare nvcc) and by the torch glue (csrc/ops/cuda/max_pool_cuda.cpp).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "ops/cuda_dtype.h"

namespace attnscale {
namespace max_pool {
namespace cuda {

// One launch.  x: (N, C, H, W) contiguous in NCHW order, or in NHWC order (channels_last) when
// channels_last; y: (N, C, OH, OW) in the same order.  Output (i, j) is the maximum over rows
// max(i s - p, 0) .. min(i s - p + k, H) - 1 and the same columns (Caffe's clipped window), scanned as the
// CPU kernel does (each column's rows, then the columns, left to right), a value replacing the running
// maximum only if strictly greater (NaN never wins; a window of NaNs gives -inf).
cudaError_t launch_max_pool2d(DType dtype, const void* x, void* y, int64_t N, int64_t C, int H, int W, int OH,
                              int OW, int k, int s, int p, bool channels_last, cudaStream_t stream);

// Training forward: y as above but scanned as Caffe's MaxPoolForward (rows, then columns, of the clipped
// window), and mask (uint8, same layout): the winner's offset (h - (i s - p)) k + (w - (j s - p)) in its
// unclipped window, kMaskNone (ops/max_pool_window.h) if none.  k * k <= kMaskNone.
cudaError_t launch_max_pool2d_with_mask(DType dtype, const void* x, void* y, uint8_t* mask, int64_t N, int64_t C,
                                        int H, int W, int OH, int OW, int k, int s, int p, bool channels_last,
                                        cudaStream_t stream);

// Training backward: gx (N, C, H, W) from g and mask (N, C, OH, OW), all in one layout: each input pixel
// sums, in float (double for double), the gradients of the covering outputs whose mask names it, outputs
// in (row, column) order (Caffe's MaxPoolBackward).  Writes every element of gx.
cudaError_t launch_max_pool2d_backward(DType dtype, const void* g, const uint8_t* mask, void* gx, int64_t N,
                                       int64_t C, int H, int W, int OH, int OW, int k, int s, int p,
                                       bool channels_last, cudaStream_t stream);

}  // namespace cuda
}  // namespace max_pool
}  // namespace attnscale
