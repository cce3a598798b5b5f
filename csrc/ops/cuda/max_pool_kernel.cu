// CUDA kernel of attnscale::caffe_max_pool2d (inference): a thread per output element, NCHW or NHWC.
//
// No torch headers: raw pointers, sizes and a cudaStream_t (see ops/max_pool_cuda.h).  Unlike
// F.max_pool2d's CUDA kernel it writes no index per output (nothing is differentiated here), so it moves
// the input once and the output once.  Values are compared in float (double for double): the order of
// half / bfloat16 values is kept, and the winner is copied, never rounded.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "ops/max_pool_cuda.h"

namespace attnscale {
namespace max_pool {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
struct Cmp {
  using type = float;
};
template <>
struct Cmp<double> {
  using type = double;
};

__device__ __forceinline__ float cmp_value(float v) { return v; }
__device__ __forceinline__ double cmp_value(double v) { return v; }
__device__ __forceinline__ float cmp_value(__half v) { return __half2float(v); }
__device__ __forceinline__ float cmp_value(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T minus_inf();
template <>
__device__ __forceinline__ float minus_inf<float>() { return -__int_as_float(0x7f800000); }
template <>
__device__ __forceinline__ double minus_inf<double>() { return -__longlong_as_double(0x7ff0000000000000LL); }
template <>
__device__ __forceinline__ __half minus_inf<__half>() { return __ushort_as_half(0xfc00); }
template <>
__device__ __forceinline__ __nv_bfloat16 minus_inf<__nv_bfloat16>() { return __ushort_as_bfloat16(0xff80); }

template <typename T, bool NHWC>
__global__ void __launch_bounds__(kThreads) max_pool_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t N,
                                                            int64_t C, int H, int W, int OH, int OW, int k, int s,
                                                            int p) {
  using A = typename Cmp<T>::type;
  const int64_t total = N * C * OH * OW;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t n, c, r;
    int i, j;
    if (NHWC) {  // e = ((n OH + i) OW + j) C + c: neighbouring threads read neighbouring channels
      c = e % C;
      r = e / C;
      j = static_cast<int>(r % OW);
      r /= OW;
      i = static_cast<int>(r % OH);
      n = r / OH;
    } else {     // e = ((n C + c) OH + i) OW + j
      j = static_cast<int>(e % OW);
      r = e / OW;
      i = static_cast<int>(r % OH);
      r /= OH;
      c = r % C;
      n = r / C;
    }
    const int hs = max(i * s - p, 0), he = min(i * s - p + k, H);
    const int ws = max(j * s - p, 0), we = min(j * s - p + k, W);
    // the CPU kernel's order: each column's maximum over the window's rows, then over the columns
    A m = cmp_value(minus_inf<T>());
    T mv = minus_inf<T>();
    for (int w = ws; w < we; ++w) {
      A v = cmp_value(minus_inf<T>());
      T vv = minus_inf<T>();
      for (int h = hs; h < he; ++h) {
        const int64_t off = NHWC ? ((n * H + h) * W + w) * C + c : ((n * C + c) * H + h) * W + w;
        const T t = x[off];
        const A f = cmp_value(t);
        if (f > v) {
          v = f;
          vv = t;
        }
      }
      if (v > m) {
        m = v;
        mv = vv;
      }
    }
    y[e] = mv;
  }
}

template <typename T>
cudaError_t launch_typed(const void* x, void* y, int64_t N, int64_t C, int H, int W, int OH, int OW, int k, int s,
                         int p, bool channels_last, cudaStream_t stream) {
  const int64_t total = N * C * OH * OW;
  if (total == 0) return cudaSuccess;
  int64_t blocks = (total + kThreads - 1) / kThreads;
  if (blocks > (int64_t{1} << 20)) blocks = int64_t{1} << 20;  // grid-stride beyond this
  const dim3 grid(static_cast<unsigned>(blocks));
  const T* xp = static_cast<const T*>(x);
  T* yp = static_cast<T*>(y);
  if (channels_last) {
    max_pool_kernel<T, true><<<grid, kThreads, 0, stream>>>(xp, yp, N, C, H, W, OH, OW, k, s, p);
  } else {
    max_pool_kernel<T, false><<<grid, kThreads, 0, stream>>>(xp, yp, N, C, H, W, OH, OW, k, s, p);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_max_pool2d(DType dtype, const void* x, void* y, int64_t N, int64_t C, int H, int W, int OH,
                              int OW, int k, int s, int p, bool channels_last, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return launch_typed<float>(x, y, N, C, H, W, OH, OW, k, s, p, channels_last, stream);
    case DType::kFloat16:
      return launch_typed<__half>(x, y, N, C, H, W, OH, OW, k, s, p, channels_last, stream);
    case DType::kBFloat16:
      return launch_typed<__nv_bfloat16>(x, y, N, C, H, W, OH, OW, k, s, p, channels_last, stream);
    case DType::kFloat64:
      return launch_typed<double>(x, y, N, C, H, W, OH, OW, k, s, p, channels_last, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace max_pool
}  // namespace attnscale
