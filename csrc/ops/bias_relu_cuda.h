// Raw-pointer launchers of the CUDA bias_relu kernels (csrc/ops/cuda/bias_relu_kernel.cu).
// Torch-free: included by the .cu (built by a bare nvcc) and by the torch glue (csrc/ops/cuda/bias_relu_cuda.cpp).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "ops/cuda_dtype.h"

namespace attnscale {
namespace bias_relu {
namespace cuda {

// x, out: (N, C, HW) in NCHW order, or NHWC order when channels_last; bias (C,) of x's type, or float32 for a
// half-type x when bias_float32 (rounded to x's type first, as autocast's cast would).  aligned16: x and out
// are 16-byte aligned (then 16-byte vectors are used where the channel / pixel count allows).
// out = relu(round(x + bias[c])) with torch.relu's NaN rule; with a dropout ratio p in (0, 1), element e (memory
// order) times 1 / (1 - p) (rounded to x's type) where Philox's word for (seed, e) is >= floor(p 2^32), else 0
// (ops/philox.h).
cudaError_t launch_forward(DType dtype, const void* x, const void* bias, bool bias_float32, void* out, int64_t N,
                           int64_t C, int64_t HW, bool channels_last, bool aligned16, double p, uint64_t seed,
                           cudaStream_t stream);

// The backward's blocking, fixed by the sizes: the glue sizes the workspace with it.
struct BackwardPlan {
  int vec = 1;                    // elements per vector
  int block_x = 256, block_y = 1;  // threads of the masking / partial-sum kernel
  int64_t grid_x = 1, grid_y = 1;
  int64_t span = 0;               // rows (NHWC) or vectors (NCHW) per block
  int chunks = 1;                 // NCHW: blocks per (n, c) plane
  int64_t partials = 0;           // partial sums per channel
  size_t workspace_bytes = 0;     // partials * C accumulators (float; double for double)
};
BackwardPlan plan_backward(DType dtype, int64_t N, int64_t C, int64_t HW, bool channels_last, bool aligned16);

// gx = out <= 0 ? 0 : g * scale (every element written; scale = 1 / (1 - p) of the forward's dropout, else 1);
// gbias[c] = sum of gx over n and the pixels: per block a
// partial sum in the workspace ([partials][C]), then a small kernel adds them per channel in a fixed order
// (deterministic), stored in x's type, or unrounded in float32 when bias_float32.  N * HW >= 1.
cudaError_t launch_backward(const BackwardPlan& plan, DType dtype, const void* g, const void* out, void* gx,
                            void* gbias, bool bias_float32, void* workspace, int64_t N, int64_t C, int64_t HW,
                            bool channels_last, double scale, cudaStream_t stream);

}  // namespace cuda
}  // namespace bias_relu
}  // namespace attnscale
