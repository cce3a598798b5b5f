// Device helpers shared by the elementwise-style CUDA kernels (max_pool_kernel.cu, interp_kernel.cu,
// bias_relu_kernel.cu): the accumulation type of an element type and the conversions, vector accesses, the
// position of a flat index in NCHW or NHWC order, and the grid-stride launch size.  No torch headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>

#include "ops/cuda_dtype.h"

namespace attnscale {
namespace cuda_common {

constexpr int kThreads = 256;

// float for float and the half types, double for double
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

// back to T: float and double as they are; the half types rounded to nearest
template <typename T>
__device__ __forceinline__ T from_acc(typename AccOf<T>::type v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// V elements loaded or stored as one access (16 bytes: one LDG.128 / STG.128 for a Vec<T, 16 / sizeof(T)>)
template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

// whether p is aligned for a Vec of `bytes` bytes
inline bool aligned_to(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// The channels_last kernels that take 16 bytes of channels per thread: their width for T, and whether they
// serve a call (channels_last, C a multiple of the width, every pointer 16-byte aligned).
template <typename T>
constexpr int vec_width() {
  return 16 / static_cast<int>(sizeof(T));
}
template <typename T>
bool vec_applies(bool nhwc, int64_t C, std::initializer_list<const void*> ptrs) {
  if (!nhwc || C % vec_width<T>() != 0) return false;
  for (const void* p : ptrs)
    if (!aligned_to(p, 16)) return false;
  return true;
}

// Position of vector v of an (N, A, B, C) channels_last tensor read as CV = C / V vectors per position:
// image n, vector cv of its channels, position (a, b).
template <typename I>
__device__ __forceinline__ void unflatten_vec(I v, I CV, I A, I B, I* n, I* cv, I* a, I* b) {
  *cv = v % CV;
  I r = v / CV;
  *b = r % B;
  r /= B;
  *a = r % A;
  *n = r / A;
}

// whether every index below `total` (plus a grid stride of grid_for's blocks) fits in an int: the kernels
// then index with int, whose divisions take fewer instructions than int64_t's
inline bool fits_int(int64_t total) { return total + (int64_t{1} << 20) * kThreads < (int64_t{1} << 31); }

// Position (n, c, a, b) of element e of an (N, C, A, B) tensor in NCHW or NHWC order.
template <typename I, bool NHWC>
__device__ __forceinline__ void unflatten(I e, I C, I A, I B, I* n, I* c, I* a, I* b) {
  if (NHWC) {  // e = ((n A + a) B + b) C + c
    *c = e % C;
    I r = e / C;
    *b = r % B;
    r /= B;
    *a = r % A;
    *n = r / A;
  } else {     // e = ((n C + c) A + a) B + b
    *b = e % B;
    I r = e / B;
    *a = r % A;
    r /= A;
    *c = r % C;
    *n = r / C;
  }
}

template <typename I, bool NHWC>
__device__ __forceinline__ I offset(I n, I c, I a, I b, I C, I A, I B) {
  return NHWC ? ((n * A + a) * B + b) * C + c : ((n * C + c) * A + a) * B + b;
}

// blocks of kThreads for `work` items, at most 2^20 (the kernels stride over the rest)
inline dim3 grid_for(int64_t work) {
  int64_t blocks = (work + kThreads - 1) / kThreads;
  if (blocks < 1) blocks = 1;
  if (blocks > (int64_t{1} << 20)) blocks = int64_t{1} << 20;
  return dim3(static_cast<unsigned>(blocks));
}

}  // namespace cuda_common
}  // namespace attnscale

// In a launcher returning cudaError_t: return FN<T>(...) for the element type T of `dtype` (an
// attnscale::DType), cudaErrorInvalidValue for an unknown one.
#define ATTNSCALE_DISPATCH_DTYPE(dtype, FN, ...)         \
  switch (dtype) {                                       \
    case ::attnscale::DType::kFloat32:                   \
      return FN<float>(__VA_ARGS__);                     \
    case ::attnscale::DType::kFloat16:                   \
      return FN<__half>(__VA_ARGS__);                    \
    case ::attnscale::DType::kBFloat16:                  \
      return FN<__nv_bfloat16>(__VA_ARGS__);             \
    case ::attnscale::DType::kFloat64:                   \
      return FN<double>(__VA_ARGS__);                    \
  }                                                      \
  return cudaErrorInvalidValue
