// CUDA glue of attnscale::caffe_max_pool2d and of the training pair caffe_max_pool2d_with_mask /
// caffe_max_pool2d_backward: the checks shared with the CPU kernels (csrc/ops/max_pool.cpp), dtype and
// layout, outputs in the input's layout, current stream, then the raw-pointer launchers of
// csrc/ops/cuda/max_pool_kernel.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "ops/cuda/glue.h"
#include "ops/max_pool.h"
#include "ops/max_pool_cuda.h"

namespace attnscale {
namespace max_pool {
namespace {

at::Tensor caffe_max_pool2d_cuda(const at::Tensor& x_in, int64_t kernel, int64_t stride, int64_t pad, int64_t out_h,
                                 int64_t out_w) {
  kernel = check_args(x_in, kernel, stride, pad, out_h, out_w);
  const DType dt = cuda_dtype_of("caffe_max_pool2d", "x", x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto fmt = layout_of(x_in);
  const at::Tensor x = x_in.contiguous(fmt);
  at::Tensor out = at::empty({x.size(0), x.size(1), out_h, out_w}, x.options().memory_format(fmt));
  if (out.numel() == 0) return out;
  check_launch("caffe_max_pool2d",
               cuda::launch_max_pool2d(dt, x.data_ptr(), out.data_ptr(), x.size(0), x.size(1),
                                       static_cast<int>(x.size(2)), static_cast<int>(x.size(3)),
                                       static_cast<int>(out_h), static_cast<int>(out_w), static_cast<int>(kernel),
                                       static_cast<int>(stride), static_cast<int>(pad),
                                       fmt == at::MemoryFormat::ChannelsLast,
                                       c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor> caffe_max_pool2d_with_mask_cuda(const at::Tensor& x_in, int64_t kernel,
                                                                   int64_t stride, int64_t pad, int64_t out_h,
                                                                   int64_t out_w) {
  kernel = check_mask_args(x_in, kernel, stride, pad, out_h, out_w);
  const DType dt = cuda_dtype_of("caffe_max_pool2d_with_mask", "x", x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto fmt = layout_of(x_in);
  const at::Tensor x = x_in.contiguous(fmt);
  const auto opts = x.options().memory_format(fmt);
  at::Tensor out = at::empty({x.size(0), x.size(1), out_h, out_w}, opts);
  at::Tensor mask = at::empty({x.size(0), x.size(1), out_h, out_w}, opts.dtype(at::kByte));
  if (out.numel() == 0) return {out, mask};
  check_launch("caffe_max_pool2d_with_mask",
               cuda::launch_max_pool2d_with_mask(
                   dt, x.data_ptr(), out.data_ptr(), mask.data_ptr<uint8_t>(), x.size(0), x.size(1),
                   static_cast<int>(x.size(2)), static_cast<int>(x.size(3)), static_cast<int>(out_h),
                   static_cast<int>(out_w), static_cast<int>(kernel), static_cast<int>(stride), static_cast<int>(pad),
                   fmt == at::MemoryFormat::ChannelsLast, c10::cuda::getCurrentCUDAStream().stream()));
  return {out, mask};
}

at::Tensor caffe_max_pool2d_backward_cuda(const at::Tensor& grad_in, const at::Tensor& mask_in, int64_t kernel,
                                          int64_t stride, int64_t pad, int64_t in_h, int64_t in_w) {
  kernel = check_backward_args(grad_in, mask_in, kernel, stride, pad, in_h, in_w);
  const DType dt = cuda_dtype_of("caffe_max_pool2d_backward", "grad", grad_in);
  TORCH_CHECK_VALUE(grad_in.is_cuda() && mask_in.is_cuda(), "caffe_max_pool2d_backward: grad and mask must be on CUDA");
  const c10::cuda::CUDAGuard guard(grad_in.device());
  // the mask's layout is the forward input's: the gradient comes back in it
  const auto fmt = layout_of(mask_in);
  const at::Tensor g = grad_in.contiguous(fmt), mask = mask_in.contiguous(fmt);
  at::Tensor gx = at::empty({g.size(0), g.size(1), in_h, in_w}, g.options().memory_format(fmt));
  if (gx.numel() == 0) return gx;
  check_launch("caffe_max_pool2d_backward",
               cuda::launch_max_pool2d_backward(
                   dt, g.data_ptr(), mask.data_ptr<uint8_t>(), gx.data_ptr(), g.size(0), g.size(1),
                   static_cast<int>(in_h), static_cast<int>(in_w), static_cast<int>(g.size(2)),
                   static_cast<int>(g.size(3)), static_cast<int>(kernel), static_cast<int>(stride),
                   static_cast<int>(pad), fmt == at::MemoryFormat::ChannelsLast,
                   c10::cuda::getCurrentCUDAStream().stream()));
  return gx;
}

}  // namespace
}  // namespace max_pool
}  // namespace attnscale

TORCH_LIBRARY_IMPL(attnscale, CUDA, m) {
  m.impl("caffe_max_pool2d", &attnscale::max_pool::caffe_max_pool2d_cuda);
  m.impl("caffe_max_pool2d_with_mask", &attnscale::max_pool::caffe_max_pool2d_with_mask_cuda);
  m.impl("caffe_max_pool2d_backward", &attnscale::max_pool::caffe_max_pool2d_backward_cuda);
}
