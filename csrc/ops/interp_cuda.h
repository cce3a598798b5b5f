// Raw-pointer launcher of the CUDA caffe_interp kernel (csrc/ops/cuda/interp_kernel.cu).
// Torch-free: included by the .cu (built by a bare nvcc) and by the torch glue (csrc/ops/cuda/interp_cuda.cpp).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "ops/cuda_dtype.h"

namespace attnscale {
namespace interp {
namespace cuda {

// One launch, a thread per output element.  x: (N, C, H, W) in NCHW order, or NHWC when channels_last;
// y: (N, C, OH, OW) in the same order.  y = l0(y) * (l0(x) * x[h0][w0] + l1(x) * x[h0][w1]) + l1(y) * (...)
// with the taps of ops/scale_merge_interp.h, each product and sum rounded to the dtype (float32 / float64:
// no FMA contraction; half types: computed in float and rounded after every operation, as PyTorch's
// elementwise ops do), the lambdas l1 rounded to the dtype and l0 = 1 - l1 in it.
cudaError_t launch_interp(DType dtype, const void* x, void* y, int64_t N, int64_t C, int H, int W, int OH, int OW,
                          bool channels_last, cudaStream_t stream);

// The backward (attnscale::caffe_interp_backward): gx (N, C, H, W) from g (N, C, OH, OW), both in NCHW or
// both in NHWC order, through per-axis tables idx (T, in) int64 / coef (T, in) (float; double for
// double): gx[h][w] = sum over th of coef_h[th][h] * (sum over tw of coef_w[tw][w] * g[idx_h[th][h]][idx_w[tw][w]]),
// slots in order by fused multiply-adds in float (double for double), slots whose index is outside
// [0, out) skipped; half types rounded once at the end.
// g is read through its element strides g_strides[0..3] (N, C, OH, OW): any view, e.g. a channel slice of
// a concatenation's gradient, without a copy; gx (N, C, H, W) is written densely, NHWC or NCHW.
cudaError_t launch_interp_backward(DType dtype, const void* g, const int64_t* g_strides, const int64_t* idx_h,
                                   const void* coef_h, int Th, const int64_t* idx_w, const void* coef_w, int Tw,
                                   void* gx, int64_t N, int64_t C, int H, int W, int OH, int OW, bool channels_last,
                                   cudaStream_t stream);

}  // namespace cuda
}  // namespace interp
}  // namespace attnscale
