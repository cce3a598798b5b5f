// CUDA glue of attnscale::caffe_interp: the checks shared with the CPU kernel (csrc/ops/interp.cpp), dtype
// and layout, the output in the input's layout, current stream, then the raw-pointer launcher of
// csrc/ops/cuda/interp_kernel.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "ops/interp.h"
#include "ops/interp_cuda.h"

namespace attnscale {
namespace interp {
namespace {

at::Tensor caffe_interp_cuda(const at::Tensor& x_in, int64_t out_h, int64_t out_w) {
  check_args(x_in, out_h, out_w);
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
      TORCH_CHECK_VALUE(false, "caffe_interp: x dtype ", x_in.scalar_type(),
                        " is not supported on CUDA (float32, float64, float16 or bfloat16)");
  }
  const c10::cuda::CUDAGuard guard(x_in.device());
  const bool nhwc = x_in.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  const auto fmt = nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor x = x_in.contiguous(fmt);
  if (x.size(2) == out_h && x.size(3) == out_w) return x.clone(fmt);  // Caffe: same size -> copy
  at::Tensor out = at::empty({x.size(0), x.size(1), out_h, out_w}, x.options().memory_format(fmt));
  if (out.numel() == 0) return out;
  const cudaError_t err = cuda::launch_interp(dt, x.data_ptr(), out.data_ptr(), x.size(0), x.size(1),
                                              static_cast<int>(x.size(2)), static_cast<int>(x.size(3)),
                                              static_cast<int>(out_h), static_cast<int>(out_w), nhwc,
                                              c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "caffe_interp: CUDA launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace
}  // namespace interp
}  // namespace attnscale

TORCH_LIBRARY_IMPL(attnscale, CUDA, m) {
  m.impl("caffe_interp", &attnscale::interp::caffe_interp_cuda);
}
