// CUDA glue of attnscale::caffe_interp and caffe_interp_backward: the checks shared with the CPU kernels
// (csrc/ops/interp.cpp), dtype and layout, the output in the input's layout, current stream, then the
// raw-pointer launchers of csrc/ops/cuda/interp_kernel.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "ops/cuda/glue.h"
#include "ops/interp.h"
#include "ops/interp_cuda.h"

namespace attnscale {
namespace interp {
namespace {

at::Tensor caffe_interp_cuda(const at::Tensor& x_in, int64_t out_h, int64_t out_w) {
  check_args(x_in, out_h, out_w);
  const DType dt = cuda_dtype_of("caffe_interp", "x", x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto fmt = layout_of(x_in);
  const at::Tensor x = x_in.contiguous(fmt);
  if (x.size(2) == out_h && x.size(3) == out_w) return x.clone(fmt);  // Caffe: same size -> copy
  at::Tensor out = at::empty({x.size(0), x.size(1), out_h, out_w}, x.options().memory_format(fmt));
  if (out.numel() == 0) return out;
  check_launch("caffe_interp", cuda::launch_interp(dt, x.data_ptr(), out.data_ptr(), x.size(0), x.size(1),
                                                   static_cast<int>(x.size(2)), static_cast<int>(x.size(3)),
                                                   static_cast<int>(out_h), static_cast<int>(out_w),
                                                   fmt == at::MemoryFormat::ChannelsLast,
                                                   c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

at::Tensor caffe_interp_backward_cuda(const at::Tensor& grad_in, const at::Tensor& idx_h, const at::Tensor& coef_h,
                                      const at::Tensor& idx_w, const at::Tensor& coef_w) {
  const auto [H, W] = check_backward_args(grad_in, idx_h, coef_h, idx_w, coef_w);
  const DType dt = cuda_dtype_of("caffe_interp_backward", "grad", grad_in);
  const c10::cuda::CUDAGuard guard(grad_in.device());
  // the gradient is read in place through its strides (a channel slice of the attention concatenation's
  // gradient needs no copy); the result is dense in the layout grad suggests
  const auto fmt = layout_of(grad_in);
  const at::Tensor& g = grad_in;
  at::Tensor gx = at::empty({g.size(0), g.size(1), H, W}, g.options().memory_format(fmt));
  if (gx.numel() == 0) return gx;
  const int64_t g_strides[4] = {g.stride(0), g.stride(1), g.stride(2), g.stride(3)};
  check_launch("caffe_interp_backward", cuda::launch_interp_backward(
      dt, g.data_ptr(), g_strides, idx_h.data_ptr<int64_t>(), coef_h.data_ptr(), static_cast<int>(idx_h.size(0)),
      idx_w.data_ptr<int64_t>(), coef_w.data_ptr(), static_cast<int>(idx_w.size(0)), gx.data_ptr(), g.size(0),
      g.size(1), static_cast<int>(H), static_cast<int>(W), static_cast<int>(g.size(2)), static_cast<int>(g.size(3)),
      fmt == at::MemoryFormat::ChannelsLast, c10::cuda::getCurrentCUDAStream().stream()));
  return gx;
}

}  // namespace
}  // namespace interp
}  // namespace attnscale

TORCH_LIBRARY_IMPL(attnscale, CUDA, m) {
  m.impl("caffe_interp", &attnscale::interp::caffe_interp_cuda);
  m.impl("caffe_interp_backward", &attnscale::interp::caffe_interp_backward_cuda);
}
