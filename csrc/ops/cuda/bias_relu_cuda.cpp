// CUDA glue of attnscale::bias_relu / bias_relu_backward: the checks shared with the CPU kernels
// (csrc/ops/bias_relu.cpp), dtype, layout, outputs in the input's layout, the backward's workspace from the
// caching allocator, current stream, then the raw-pointer launchers of csrc/ops/cuda/bias_relu_kernel.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "ops/cuda/glue.h"
#include "ops/bias_relu.h"
#include "ops/bias_relu_cuda.h"

namespace attnscale {
namespace bias_relu {
namespace {

bool aligned16(std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs)
    if (reinterpret_cast<std::uintptr_t>(p) % 16 != 0) return false;
  return true;
}

at::Tensor bias_relu_cuda(const at::Tensor& x_in, const at::Tensor& bias_in, double p, int64_t seed) {
  check_forward(x_in, bias_in, p);
  const DType dt = cuda_dtype_of("bias_relu", "x", x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto fmt = layout_of(x_in);
  const at::Tensor x = x_in.contiguous(fmt), bias = bias_in.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(fmt));
  if (out.numel() == 0) return out;
  check_launch("bias_relu",
               cuda::launch_forward(dt, x.data_ptr(), bias.data_ptr(),
                                    bias_is_float32_of_half(x.scalar_type(), bias.scalar_type()), out.data_ptr(),
                                    x.size(0), x.size(1), x.size(2) * x.size(3), fmt == at::MemoryFormat::ChannelsLast,
                                    aligned16({x.data_ptr(), out.data_ptr()}), p, static_cast<uint64_t>(seed),
                                    c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor> bias_relu_backward_cuda(const at::Tensor& grad_in, const at::Tensor& out_in,
                                                           at::ScalarType bias_dtype, double scale) {
  check_backward(grad_in, out_in, bias_dtype, scale);
  const DType dt = cuda_dtype_of("bias_relu_backward", "out", out_in);
  const c10::cuda::CUDAGuard guard(out_in.device());
  const auto fmt = layout_of(out_in);
  const at::Tensor g = grad_in.contiguous(fmt), out = out_in.contiguous(fmt);
  at::Tensor gx = at::empty(out.sizes(), out.options().memory_format(fmt));
  at::Tensor gb = at::empty({out.size(1)}, out.options().dtype(bias_dtype));
  const int64_t N = out.size(0), C = out.size(1), HW = out.size(2) * out.size(3);
  if (C == 0) return {gx, gb};
  if (N * HW == 0) return {gx, gb.zero_()};
  const bool nhwc = fmt == at::MemoryFormat::ChannelsLast;
  const cuda::BackwardPlan plan =
      cuda::plan_backward(dt, N, C, HW, nhwc, aligned16({g.data_ptr(), out.data_ptr(), gx.data_ptr()}));
  at::Tensor workspace = at::empty({static_cast<int64_t>(plan.workspace_bytes)}, out.options().dtype(at::kByte));
  check_launch("bias_relu_backward",
               cuda::launch_backward(plan, dt, g.data_ptr(), out.data_ptr(), gx.data_ptr(), gb.data_ptr(),
                                     bias_is_float32_of_half(out.scalar_type(), bias_dtype), workspace.data_ptr(), N,
                                     C, HW, nhwc, scale, c10::cuda::getCurrentCUDAStream().stream()));
  return {gx, gb};
}

}  // namespace
}  // namespace bias_relu
}  // namespace attnscale

TORCH_LIBRARY_IMPL(attnscale, CUDA, m) {
  m.impl("bias_relu", &attnscale::bias_relu::bias_relu_cuda);
  m.impl("bias_relu_backward", &attnscale::bias_relu::bias_relu_backward_cuda);
}
