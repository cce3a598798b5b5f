// CUDA glue of attnscale::caffe_max_pool2d: the checks shared with the CPU kernel (csrc/ops/max_pool.cpp),
// dtype and layout, output allocation in the input's layout, current stream, then the raw-pointer launcher
// of csrc/ops/cuda/max_pool_kernel.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "ops/max_pool.h"
#include "ops/max_pool_cuda.h"

namespace attnscale {
namespace max_pool {
namespace {

at::Tensor caffe_max_pool2d_cuda(const at::Tensor& x_in, int64_t kernel, int64_t stride, int64_t pad, int64_t out_h,
                                 int64_t out_w) {
  kernel = check_args(x_in, kernel, stride, pad, out_h, out_w);
  cuda::DType dt;
  switch (x_in.scalar_type()) {
    case at::kFloat:
      dt = cuda::DType::kFloat32;
      break;
    case at::kHalf:
      dt = cuda::DType::kFloat16;
      break;
    case at::kBFloat16:
      dt = cuda::DType::kBFloat16;
      break;
    case at::kDouble:
      dt = cuda::DType::kFloat64;
      break;
    default:
      TORCH_CHECK_VALUE(false, "caffe_max_pool2d: x dtype ", x_in.scalar_type(),
                        " is not supported on CUDA (float32, float64, float16 or bfloat16)");
  }
  const c10::cuda::CUDAGuard guard(x_in.device());
  // channels_last input (cuDNN's faster layout for the convolutions around it): pooled in place of layout
  const bool nhwc = x_in.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  const auto fmt = nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor x = x_in.contiguous(fmt);
  at::Tensor out = at::empty({x.size(0), x.size(1), out_h, out_w}, x.options().memory_format(fmt));
  if (out.numel() == 0) return out;
  const cudaError_t err = cuda::launch_max_pool2d(
      dt, x.data_ptr(), out.data_ptr(), x.size(0), x.size(1), static_cast<int>(x.size(2)), static_cast<int>(x.size(3)),
      static_cast<int>(out_h), static_cast<int>(out_w), static_cast<int>(kernel), static_cast<int>(stride),
      static_cast<int>(pad), nhwc, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "caffe_max_pool2d: CUDA launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace
}  // namespace max_pool
}  // namespace attnscale

TORCH_LIBRARY_IMPL(attnscale, CUDA, m) {
  m.impl("caffe_max_pool2d", &attnscale::max_pool::caffe_max_pool2d_cuda);
}
