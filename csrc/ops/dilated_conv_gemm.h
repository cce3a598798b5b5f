// attnscale::dilated_conv2d as GEMMs over rectangles of live taps, written with ATen ops and five
// copy kernels per device (PackKernels below), so one implementation serves every device: at::bmm is
// cuBLAS on a GPU (tensor cores, fp32 accumulation) and MKL on a CPU.  The CUDA dispatch uses it by
// default; the CPU dispatch keeps its own kernel (cpu/dilated_conv_kernel.cpp, cache-blocked and
// threaded, 1.2-1.5x faster there) unless asked.  Callers run the argument checks
// (dilated_conv_checks.h) first.  The outputs of a CUDA call keep the layout of x (forward) or
// grad_output (input gradient), channels_last or NCHW (layout_of, memory_format.h); on a CPU they
// are NCHW, as the direct kernel's.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <array>
#include <tuple>
#include <vector>

namespace attnscale {
namespace dilated_conv {

struct PackPlan;    // dilated_conv_pack.h
struct WeightView;

// The copies around the matrix products, per device: the column blocks from x, the weight blocks
// from the kernel w (read through view), the product blocks from grad_output (and, where the device
// can and bias_grad is not null, the bias gradient, the sum of the plan's rows, into *bias_grad: true
// then), the product blocks (+ bias, which may be undefined) into out, and the weight gradient
// (O, KH, KW, C) from the part blocks (written, or added to when accumulate).  x, grad and out
// channels_last, everything else contiguous; all of the op's dtype but parts and the weight
// gradient, which are float32 for bfloat16 / float16.
struct PackKernels {
  void (*columns)(const at::Tensor& x, at::Tensor& cols, const PackPlan& plan);
  void (*weights)(const at::Tensor& w, const WeightView& view, at::Tensor& wbuf, const PackPlan& plan);
  bool (*gather_output)(const at::Tensor& grad, at::Tensor& prod, at::Tensor* bias_grad, const PackPlan& plan);
  void (*scatter_output)(const at::Tensor& prod, const at::Tensor& bias, at::Tensor& out, const PackPlan& plan);
  void (*weight_gradient)(const at::Tensor& parts, at::Tensor& acc, const PackPlan& plan, bool accumulate);
};
const PackKernels& cpu_pack_kernels();  // cpu/dilated_conv_pack_kernel.cpp
// The CUDA glue (cuda/dilated_conv_cuda.cpp) registers its kernels when the library loads.
void register_cuda_pack_kernels(const PackKernels* kernels);

// ATTNSCALE_DILATED_CONV_ALGO = "gemm" | "direct" picks the implementation for every call; unset or
// empty: "gemm" on CUDA, "direct" (the hand-written kernels) on a CPU.  Any other value is an error.
bool use_gemm(const at::Tensor& t);

at::Tensor gemm_forward(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                        int64_t dilation, int64_t padding);
// The forward and its column blocks (column_count elements of x's dtype), which the weight gradient of
// the same x may take instead of packing them again (columns in gemm_backward_weight).
std::tuple<at::Tensor, at::Tensor> gemm_forward_with_columns(const at::Tensor& x, const at::Tensor& weight,
                                                             const c10::optional<at::Tensor>& bias, int64_t dilation,
                                                             int64_t padding);
// Elements of the column blocks of x (N, C, H, W) for a kernel (O, C, KH, KW): 0 when there are none.
int64_t column_count(int64_t N, int64_t C, int64_t H, int64_t W, int64_t O, int64_t KH, int64_t KW, int64_t dilation,
                     int64_t padding);
// The groups of those blocks in buffer order, as (members, pixels, taps): the count is, group by group,
// the running total rounded up to 16 plus members * N * pixels * taps * C (0 when N, C or O is 0), which
// the Python fake evaluates with symbolic N and C.
std::vector<std::array<int64_t, 3>> column_groups(int64_t H, int64_t W, int64_t KH, int64_t KW, int64_t dilation,
                                                  int64_t padding);
// Callers of the weight gradient check kept columns (both paths: the direct kernels ignore them): the
// 1-D contiguous column blocks of x for an (O, C, KH, KW) kernel, x's dtype and device.
void check_columns(const at::Tensor& columns, const at::Tensor& x, int64_t O, int64_t KH, int64_t KW,
                   int64_t dilation, int64_t padding);
at::Tensor gemm_backward_input(const at::Tensor& grad_output, const at::Tensor& weight, int64_t dilation,
                               int64_t padding);
std::tuple<at::Tensor, at::Tensor> gemm_backward_weight(const at::Tensor& grad_output, const at::Tensor& x,
                                                        int64_t kernel_h, int64_t kernel_w, int64_t dilation,
                                                        int64_t padding, const c10::optional<at::Tensor>& columns);

}  // namespace dilated_conv
}  // namespace attnscale
