// Helpers of the CUDA glue files (csrc/ops/cuda/*_cuda.cpp) of caffe_max_pool2d, caffe_interp and bias_relu:
// a tensor's DType for the torch-free launchers, and the launch check.
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime_api.h>

#include "ops/cuda_dtype.h"
#include "ops/memory_format.h"

namespace attnscale {

// The launchers' DType of t (float32, float64, float16, bfloat16); anything else: a ValueError naming
// the op and the argument.
inline DType cuda_dtype_of(const char* op, const char* name, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kDouble:
      return DType::kFloat64;
    default:
      TORCH_CHECK_VALUE(false, op, ": ", name, " dtype ", t.scalar_type(),
                        " is not supported on CUDA (float32, float64, float16 or bfloat16)");
  }
}

inline void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
}

}  // namespace attnscale
