// CUDA glue of attnscale::dilated_conv2d: checks, then the GEMM path
// (dilated_conv_gemm.cpp, the default; its copy kernels in dilated_conv_pack_kernel.cu
// are registered here) or, with ATTNSCALE_DILATED_CONV_ALGO=direct, weight packing,
// current stream and launcher calls of the direct kernels (dilated_conv_kernel.cu).
//
// Direct kernels: float32 uses TF32 tensor cores when torch.backends.cudnn.allow_tf32
// is set (the flag F.conv2d follows), otherwise an exact fp32 SIMT path; bf16/fp16
// use tensor cores with fp32 accumulation; float64 uses the SIMT path.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "ops/dilated_conv_checks.h"
#include "ops/dilated_conv_cuda.h"
#include "ops/dilated_conv_gemm.h"
#include "ops/dilated_conv_pack.h"
#include "ops/memory_format.h"

namespace attnscale {
namespace dilated_conv {
namespace {

CudaDType cuda_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return CudaDType::kFloat32;
    case at::kDouble: return CudaDType::kFloat64;
    case at::kBFloat16: return CudaDType::kBFloat16;
    case at::kHalf: return CudaDType::kFloat16;
    default: break;
  }
  TORCH_CHECK(false, "dilated_conv2d (CUDA kernel): ", name,
              " must be float32, float64, bfloat16 or float16, got ", t.scalar_type());
  return CudaDType::kFloat32;
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "dilated_conv2d (CUDA kernel): ", name, " must be a CUDA tensor, got ", t.device());
}

bool tf32_enabled() { return at::globalContext().allowTF32CuDNN(); }

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "dilated_conv2d (CUDA kernel): ", what, " failed: ", cudaGetErrorString(err));
}

ConvShape make_shape(int64_t N, int64_t C, int64_t H, int64_t W, int64_t O, int64_t KH, int64_t KW,
                     int64_t dilation, int64_t padding) {
  return ConvShape{N, C, H, W, O, KH, KW, out_size(H, KH, dilation, padding), out_size(W, KW, dilation, padding),
                   dilation, padding};
}

// The forward on the GEMM path with its column blocks (the weight gradient's, when training).
std::tuple<at::Tensor, at::Tensor> forward_with_columns_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                             const c10::optional<at::Tensor>& bias, int64_t dilation,
                                                             int64_t padding) {
  check_forward(x, weight, bias, dilation, padding);
  check_cuda(x, "x");
  cuda_dtype(x, "x");
  c10::cuda::CUDAGuard guard(x.device());
  return gemm_forward_with_columns(x, weight, bias, dilation, padding);
}

at::Tensor forward_cuda(const at::Tensor& x_in, const at::Tensor& weight, const c10::optional<at::Tensor>& bias_in,
                        int64_t dilation, int64_t padding) {
  check_forward(x_in, weight, bias_in, dilation, padding);
  check_cuda(x_in, "x");
  const CudaDType dt = cuda_dtype(x_in, "x");
  c10::cuda::CUDAGuard guard(x_in.device());
  if (use_gemm(x_in)) return gemm_forward(x_in, weight, bias_in, dilation, padding);
  const at::Tensor x = x_in.contiguous();
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  const at::Tensor bias = has_bias ? bias_in->contiguous() : at::Tensor();
  const ConvShape s = make_shape(x.size(0), x.size(1), x.size(2), x.size(3), weight.size(0), weight.size(2),
                                 weight.size(3), dilation, padding);
  at::Tensor out = at::empty({s.N, s.O, s.Ho, s.Wo}, x.options());
  if (out.numel() == 0) return out.contiguous(layout_of(x_in));
  const at::Tensor wpack = weight.permute({2, 3, 0, 1}).contiguous();  // [KH][KW][O][C]
  check_launch(launch_dilated_conv_forward(dt, x.data_ptr(), wpack.data_ptr(), has_bias ? bias.data_ptr() : nullptr,
                                           out.data_ptr(), s, tf32_enabled(),
                                           c10::cuda::getCurrentCUDAStream().stream()),
               "forward launch");
  return out.contiguous(layout_of(x_in));  // the layout the GEMM path gives (dilated_conv_gemm.h)
}

at::Tensor backward_input_cuda(const at::Tensor& grad_out_in, const at::Tensor& weight, int64_t dilation,
                               int64_t padding) {
  check_grad_output(grad_out_in, weight, "weight");
  check_cuda(grad_out_in, "grad_output");
  TORCH_CHECK(weight.dim() == 4, "dilated_conv2d backward: weight must be 4-D, got ", weight.dim(), "-D");
  TORCH_CHECK(grad_out_in.size(1) == weight.size(0), "dilated_conv2d backward: grad_output has ",
              grad_out_in.size(1), " channels but weight has ", weight.size(0), " output channels");
  check_kernel_size(weight.size(2), weight.size(3));
  check_params(dilation, padding);
  const CudaDType dt = cuda_dtype(grad_out_in, "grad_output");
  const int64_t KH = weight.size(2), KW = weight.size(3);
  const int64_t H = grad_out_in.size(2) - 2 * padding + dilation * (KH - 1);
  const int64_t W = grad_out_in.size(3) - 2 * padding + dilation * (KW - 1);
  TORCH_CHECK(H >= 1 && W >= 1, "dilated_conv2d backward: grad_output spatial size ", grad_out_in.sizes(),
              " implies an input size (", H, ", ", W, ") < 1");
  c10::cuda::CUDAGuard guard(grad_out_in.device());
  if (use_gemm(grad_out_in)) return gemm_backward_input(grad_out_in, weight, dilation, padding);
  const at::Tensor go = grad_out_in.contiguous();
  const ConvShape s = make_shape(go.size(0), weight.size(1), H, W, weight.size(0), KH, KW, dilation, padding);
  if (s.N == 0 || s.C == 0 || s.O == 0) {
    return at::zeros({s.N, s.C, s.H, s.W}, go.options().memory_format(layout_of(grad_out_in)));
  }
  at::Tensor gx = at::empty({s.N, s.C, s.H, s.W}, go.options());
  const at::Tensor wpack_t = weight.permute({2, 3, 1, 0}).contiguous();  // [KH][KW][C][O]
  check_launch(launch_dilated_conv_backward_input(dt, go.data_ptr(), wpack_t.data_ptr(), gx.data_ptr(), s,
                                                  tf32_enabled(), c10::cuda::getCurrentCUDAStream().stream()),
               "backward-input launch");
  return gx.contiguous(layout_of(grad_out_in));
}

std::tuple<at::Tensor, at::Tensor> backward_weight_cuda(const at::Tensor& grad_out_in, const at::Tensor& x_in,
                                                        int64_t kernel_h, int64_t kernel_w, int64_t dilation,
                                                        int64_t padding, const c10::optional<at::Tensor>& columns) {
  check_grad_output(grad_out_in, x_in, "x");
  check_cuda(x_in, "x");
  TORCH_CHECK(x_in.dim() == 4, "dilated_conv2d backward: x must be 4-D, got ", x_in.dim(), "-D");
  check_kernel_size(kernel_h, kernel_w);
  check_params(dilation, padding);
  check_output_size(x_in.size(2), x_in.size(3), kernel_h, kernel_w, dilation, padding);
  const CudaDType dt = cuda_dtype(x_in, "x");
  const ConvShape s = make_shape(x_in.size(0), x_in.size(1), x_in.size(2), x_in.size(3), grad_out_in.size(1),
                                 kernel_h, kernel_w, dilation, padding);
  TORCH_CHECK(grad_out_in.size(0) == s.N && grad_out_in.size(2) == s.Ho && grad_out_in.size(3) == s.Wo,
              "dilated_conv2d backward: grad_output has shape ", grad_out_in.sizes(), " but x ", x_in.sizes(),
              " gives an output of (", s.N, ", ", s.O, ", ", s.Ho, ", ", s.Wo, ")");
  c10::cuda::CUDAGuard guard(x_in.device());
  if (columns.has_value() && columns->defined()) {
    check_columns(*columns, x_in, grad_out_in.size(1), kernel_h, kernel_w, dilation, padding);
  }
  if (use_gemm(x_in)) return gemm_backward_weight(grad_out_in, x_in, kernel_h, kernel_w, dilation, padding, columns);
  const at::Tensor go = grad_out_in.contiguous();
  const at::Tensor x = x_in.contiguous();
  if (s.N == 0) {
    return {at::zeros({s.O, s.C, s.KH, s.KW}, go.options()), at::zeros({s.O}, go.options())};
  }
  if (s.C == 0 || s.O == 0) {  // an empty weight: nothing to launch (the split-K sizing divides by O * C)
    return {at::zeros({s.O, s.C, s.KH, s.KW}, go.options()), go.sum({0, 2, 3})};
  }
  at::Tensor gw = at::empty({s.O, s.C, s.KH, s.KW}, go.options());
  at::Tensor gb = at::empty({s.O}, go.options());
  const bool tf32 = tf32_enabled();
  const int64_t ws = dilated_conv_backward_weight_workspace(s, dt, tf32);
  at::Tensor workspace = at::empty({ws > 0 ? ws : 1}, go.options().dtype(at::kFloat));
  check_launch(launch_dilated_conv_backward_weight(dt, go.data_ptr(), x.data_ptr(), gw.data_ptr(), gb.data_ptr(),
                                                   workspace.data_ptr<float>(), s, tf32,
                                                   c10::cuda::getCurrentCUDAStream().stream()),
               "backward-weight launch");
  return {gw, gb};
}

// The GEMM path's copies (dilated_conv_gemm.cpp; kernels in dilated_conv_pack_kernel.cu).
cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void pack_columns_cuda(const at::Tensor& x, at::Tensor& cols, const PackPlan& plan) {
  check_launch(launch_pack_columns(cuda_dtype(x, "x"), x.data_ptr(), cols.data_ptr(), plan, stream()),
               "column packing launch");
}

void weights_cuda(const at::Tensor& w, const WeightView& view, at::Tensor& wbuf, const PackPlan& plan) {
  check_launch(launch_weight_blocks(cuda_dtype(w, "weight"), w.data_ptr(), view, wbuf.data_ptr(), plan, stream()),
               "weight packing launch");
}

bool gather_output_cuda(const at::Tensor& grad, at::Tensor& prod, at::Tensor* bias_grad, const PackPlan& plan) {
  const CudaDType dt = cuda_dtype(grad, "grad_output");
  const int64_t ws = bias_grad != nullptr ? gather_sum_workspace(dt, grad.data_ptr(), prod.data_ptr(), plan) : 0;
  if (ws > 0) {
    at::Tensor partial = at::empty({ws}, grad.options().dtype(at::kFloat));
    *bias_grad = at::empty({plan.O}, grad.options());
    check_launch(launch_gather_output_sum(dt, grad.data_ptr(), prod.data_ptr(), partial.data_ptr<float>(),
                                          bias_grad->data_ptr(), plan, stream()),
                 "grad_output packing and bias gradient launch");
    return true;
  }
  check_launch(launch_gather_output(dt, grad.data_ptr(), prod.data_ptr(), plan, stream()), "grad_output packing launch");
  return false;
}

void scatter_output_cuda(const at::Tensor& prod, const at::Tensor& bias, at::Tensor& out, const PackPlan& plan) {
  check_launch(launch_scatter_output(cuda_dtype(prod, "x"), prod.data_ptr(), bias.defined() ? bias.data_ptr() : nullptr,
                                     out.data_ptr(), plan, stream()),
               "output unpacking launch");
}

void weight_gradient_cuda(const at::Tensor& parts, at::Tensor& acc, const PackPlan& plan, bool accumulate) {
  check_launch(launch_weight_gradient(cuda_dtype(acc, "weight gradient"), parts.data_ptr(), acc.data_ptr(), plan,
                                      accumulate, stream()),
               "weight gradient launch");
}

const PackKernels kCudaPackKernels{&pack_columns_cuda, &weights_cuda, &gather_output_cuda, &scatter_output_cuda,
                                   &weight_gradient_cuda};

struct RegisterPackKernels {
  RegisterPackKernels() { register_cuda_pack_kernels(&kCudaPackKernels); }
} register_pack_kernels;

}  // namespace

TORCH_LIBRARY_IMPL(attnscale, CUDA, m) {
  m.impl("dilated_conv2d", &forward_cuda);
  m.impl("dilated_conv2d_backward_input", &backward_input_cuda);
  m.impl("dilated_conv2d_backward_weight", &backward_weight_cuda);
  m.impl("dilated_conv2d_with_columns", &forward_with_columns_cuda);
}

}  // namespace dilated_conv
}  // namespace attnscale
