// Raw-pointer launcher of the CUDA caffe_interp kernel (csrc/ops/cuda/interp_kernel.cu).
// Torch-free: included by the .cu (built by a bare nvcc) and by the torch glue (csrc/ops/cuda/interp_cuda.cpp).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace attnscale {
namespace interp {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// One launch, a thread per output element.  x: (N, C, H, W) in NCHW order, or NHWC when channels_last;
// y: (N, C, OH, OW) in the same order.  y = l0(y) * (l0(x) * x[h0][w0] + l1(x) * x[h0][w1]) + l1(y) * (...)
// with the taps of ops/scale_merge_interp.h, each product and sum rounded to the dtype (float32 / float64:
// no FMA contraction; half types: computed in float and rounded after every operation, as PyTorch's
// elementwise ops do), the lambdas l1 rounded to the dtype and l0 = 1 - l1 in it.
cudaError_t launch_interp(DType dtype, const void* x, void* y, int64_t N, int64_t C, int H, int W, int OH, int OW,
                          bool channels_last, cudaStream_t stream);

}  // namespace cuda
}  // namespace interp
}  // namespace attnscale
