// Bounds on the geometry arguments of the ops (padding, dilation, kernel, stride, output sizes).
// Real values are tiny (DeepLab's largest is fc6's dilation and padding of 12); the bound keeps every
// index expression of the kernels inside int64 (and int, where a kernel loops in int), so a huge
// argument is an error naming it instead of a wrapped product.  Plain C++: .cu files may include it.
#pragma once

#include <cstdint>

namespace attnscale {

constexpr int64_t kMaxGeometry = int64_t{1} << 24;

}  // namespace attnscale
