// The element types of the CUDA kernels of caffe_max_pool2d, caffe_interp and bias_relu, as their torch-free
// launchers take them (scale_merge keeps its own three-type enum).  Plain C++: .cu files may include it.
#pragma once

namespace attnscale {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

}  // namespace attnscale
