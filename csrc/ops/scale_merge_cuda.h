// Raw-pointer launchers of the CUDA scale_merge kernels (csrc/ops/cuda/scale_merge_kernel.cu).
// Torch-free: included by the .cu (built by a bare nvcc) and by the torch glue
// (csrc/ops/cuda/scale_merge_cuda.cpp).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace attnscale {
namespace scale_merge {
namespace cuda {

constexpr int kMaxScales = 8;

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Mode codes match attnscale::scale_merge::Mode: 0 attention, 1 avg, 2 max.
struct Problem {
  int S = 0;                 // number of scales, 1..kMaxScales
  int64_t N = 0, C = 0;      // batch, classes
  int H[kMaxScales] = {0};   // per-scale map sizes, scale 0 the finest
  int W[kMaxScales] = {0};
  int mode = 0;
  DType dtype = DType::kFloat32;
  int logit_groups = 0;      // backward, attention: lanes per pixel of the logit gradient (a power of two
                             // up to 32); 0: the kernel's own rule
  int backward_layout = 0;   // backward: 0 a thread per gradient element; 1 a thread per pixel and class
                             // chunk (attention and avg; max mode always uses 0)
  int64_t chunk_threads = 0;  // backward, pixel layout: the class chunks are sized for about this many
                             // threads in all (fewer, longer chunks reuse each pixel's coefficients more);
                             // 0: the kernel's own rule
};

// One kernel launch.  scores: S device pointers to contiguous (N, C, H_s, W_s) maps; logits:
// contiguous (N, S, H0, W0) (attention only, else may be null); merged (N, C, H0, W0) and
// weights (N, S, H0, W0) are written.
cudaError_t launch_forward(const Problem& p, const void* const* scores, const void* logits, void* merged,
                           void* weights, cudaStream_t stream);

// One kernel launch over the outputs of all scales plus the logit gradient.  grad_weights may be
// null; grad_logits is written for attention only (may be null otherwise).  weights: the forward's
// weights output (N, S, H0, W0), or null; read instead of recomputing the softmax for attention in float32
// only (the same values there; a half / bfloat16 output is rounded, so those recompute).  No atomics.
cudaError_t launch_backward(const Problem& p, const void* grad_merged, const void* grad_weights,
                            const void* const* scores, const void* logits, const void* weights,
                            void* const* grad_scores, void* grad_logits, cudaStream_t stream);

}  // namespace cuda
}  // namespace scale_merge
}  // namespace attnscale
