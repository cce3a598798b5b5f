// Launchers of the CUDA kernels of attnscale::dilated_conv2d (raw pointers, no
// torch headers): implemented in csrc/ops/cuda/dilated_conv_kernel.cu, called by
// csrc/ops/cuda/dilated_conv_cuda.cpp.  All tensors are contiguous.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace attnscale {
namespace dilated_conv {

enum class CudaDType { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

// x (N, C, H, W) -> out (N, O, Ho, Wo), weight (O, C, KH, KW); stride 1.
struct ConvShape {
  int64_t N, C, H, W, O, KH, KW, Ho, Wo, dilation, padding;
};

// out = bias + conv(x).  wpack: weight packed tap-major as [KH*KW][O][C]; bias may be null.
// tensor_cores: float32 -> TF32 wmma; bf16/fp16 always use tensor cores; float64 never.
cudaError_t launch_dilated_conv_forward(CudaDType dtype, const void* x, const void* wpack, const void* bias,
                                        void* out, const ConvShape& s, bool tensor_cores, cudaStream_t stream);

// grad_x = conv^T(grad_out).  wpack_t: weight packed as [KH*KW][C][O].
cudaError_t launch_dilated_conv_backward_input(CudaDType dtype, const void* grad_out, const void* wpack_t,
                                               void* grad_x, const ConvShape& s, bool tensor_cores,
                                               cudaStream_t stream);

// Number of float elements of the split-K workspace that launch_dilated_conv_backward_weight needs
// (0 when the SIMT path is used).
int64_t dilated_conv_backward_weight_workspace(const ConvShape& s, CudaDType dtype, bool tensor_cores);

// grad_w (O, C, KH, KW) and grad_b (O) (grad_b may be null), both of `dtype`.
cudaError_t launch_dilated_conv_backward_weight(CudaDType dtype, const void* grad_out, const void* x,
                                                void* grad_w, void* grad_b, float* workspace,
                                                const ConvShape& s, bool tensor_cores, cudaStream_t stream);

struct PackPlan;  // dilated_conv_pack.h
struct WeightView;

// The GEMM path's copies (cuda/dilated_conv_pack_kernel.cu), one launch per plan: the column blocks
// from x (N, H, W, C); the weight blocks from the kernel w (through view); the product blocks from grad_output (N, Ho, Wo, O); the product blocks (+ bias,
// which may be null) into out (N, Ho, Wo, O); the weight gradient (O, KH, KW, C) from the part blocks,
// of acc_dtype (float32 or float64), written or, with accumulate, added to.
cudaError_t launch_pack_columns(CudaDType dtype, const void* x, void* cols, const PackPlan& plan, cudaStream_t stream);
cudaError_t launch_weight_blocks(CudaDType dtype, const void* w, const WeightView& view, void* wbuf,
                                 const PackPlan& plan, cudaStream_t stream);
cudaError_t launch_gather_output(CudaDType dtype, const void* grad, void* prod, const PackPlan& plan,
                                 cudaStream_t stream);
// The same gather with the bias gradient (O,) of grad_output's dtype, the sum over the plan's rows in
// float: workspace holds gather_sum_workspace(...) floats, which is 0 where this cannot serve (float64,
// O > 1024, O not in whole 16-byte vectors, misaligned pointers; then gather and sum apart).
int64_t gather_sum_workspace(CudaDType dtype, const void* grad, const void* prod, const PackPlan& plan);
cudaError_t launch_gather_output_sum(CudaDType dtype, const void* grad, void* prod, float* workspace,
                                     void* bias_grad, const PackPlan& plan, cudaStream_t stream);
cudaError_t launch_scatter_output(CudaDType dtype, const void* prod, const void* bias, void* out,
                                  const PackPlan& plan, cudaStream_t stream);
cudaError_t launch_weight_gradient(CudaDType acc_dtype, const void* parts, void* acc, const PackPlan& plan,
                                   bool accumulate, cudaStream_t stream);

}  // namespace dilated_conv
}  // namespace attnscale
