// CUDA kernels of attnscale::caffe_max_pool2d (inference): a thread per output element, NCHW or NHWC;
// and of the training op caffe_max_pool2d_with_mask (a thread per output, writing a one-byte mask) and
// its backward (a thread per input element gathering from the outputs whose window covers it).  In
// channels_last with C a multiple of 16 / sizeof(T) and aligned pointers, a thread per 16 bytes of
// channels instead (the model's case: every channel count is a multiple of 64): a sixteen-byte access per
// window position where a thread per element made one of two bytes (bf16) and repeated the index arithmetic
// (several integer divisions) per element.
//
// No torch headers: raw pointers, sizes and a cudaStream_t (see ops/max_pool_cuda.h).  Unlike
// F.max_pool2d's CUDA kernel the inference kernel writes no index per output, so it moves the input once
// and the output once; the training kernel writes a byte per output where PyTorch writes an int64.  Values
// are compared in float (double for double): the order of half / bfloat16 values is kept, and the winner
// is copied, never rounded.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "ops/cuda/kernel_common.cuh"
#include "ops/max_pool_cuda.h"
#include "ops/max_pool_window.h"

namespace attnscale {
namespace max_pool {
namespace cuda {
namespace {

using cuda_common::AccOf;
using cuda_common::from_acc;
using cuda_common::grid_for;
using cuda_common::kThreads;
using cuda_common::offset;
using cuda_common::to_acc;
using cuda_common::unflatten;
using cuda_common::aligned_to;
using cuda_common::fits_int;
using cuda_common::unflatten_vec;
using cuda_common::Vec;
using cuda_common::vec_applies;
using cuda_common::vec_width;

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
  using A = typename AccOf<T>::type;
  const int64_t total = N * C * OH * OW;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t n, c, ii, jj;
    unflatten<int64_t, NHWC>(e, C, OH, OW, &n, &c, &ii, &jj);
    const int i = static_cast<int>(ii), j = static_cast<int>(jj);
    const int hs = max(i * s - p, 0), he = min(i * s - p + k, H);
    const int ws = max(j * s - p, 0), we = min(j * s - p + k, W);
    // the CPU kernel's order: each column's maximum over the window's rows, then over the columns
    A m = to_acc(minus_inf<T>());
    T mv = minus_inf<T>();
    for (int w = ws; w < we; ++w) {
      A v = to_acc(minus_inf<T>());
      T vv = minus_inf<T>();
      for (int h = hs; h < he; ++h) {
        const T t = x[offset<int64_t, NHWC>(n, c, h, w, C, H, W)];
        const A f = to_acc(t);
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

// Training forward: Caffe's MaxPoolForward scan (rows, then columns; strict '>' from -inf) with the winner's
// window offset.  I: the index type (int when every index fits, else int64_t: fewer instructions per division).
template <typename T, typename I, bool NHWC>
__global__ void __launch_bounds__(kThreads) max_pool_mask_kernel(const T* __restrict__ x, T* __restrict__ y,
                                                                 uint8_t* __restrict__ mask, I total, I C, int H,
                                                                 int W, int OH, int OW, int k, int s, int p) {
  using A = typename AccOf<T>::type;
  for (I e = static_cast<I>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<I>(gridDim.x) * blockDim.x) {
    I n, c, i, j;
    unflatten<I, NHWC>(e, C, OH, OW, &n, &c, &i, &j);
    const int h0 = static_cast<int>(i) * s - p, w0 = static_cast<int>(j) * s - p;
    const int hs = max(h0, 0), he = min(h0 + k, H), ws = max(w0, 0), we = min(w0 + k, W);
    A m = to_acc(minus_inf<T>());
    T mv = minus_inf<T>();
    int arg = kMaskNone;
    for (int h = hs; h < he; ++h)
      for (int w = ws; w < we; ++w) {
        const T t = x[offset<I, NHWC>(n, c, h, w, C, H, W)];
        const A f = to_acc(t);
        if (f > m) {
          m = f;
          mv = t;
          arg = (h - h0) * k + (w - w0);
        }
      }
    y[e] = mv;
    mask[e] = static_cast<uint8_t>(arg);
  }
}

// Training backward: Caffe's MaxPoolBackward (a gather per input element over the covering outputs, ph
// then pw), summed in float (double for double).
template <typename T, typename I, bool NHWC>
__global__ void __launch_bounds__(kThreads) max_pool_backward_kernel(const T* __restrict__ g,
                                                                     const uint8_t* __restrict__ mask,
                                                                     T* __restrict__ gx, I total, I C, int H, int W,
                                                                     int OH, int OW, int k, int s, int p) {
  using A = typename AccOf<T>::type;
  for (I e = static_cast<I>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<I>(gridDim.x) * blockDim.x) {
    I n, c, h, w;
    unflatten<I, NHWC>(e, C, H, W, &n, &c, &h, &w);
    int ilo, ihi, jlo, jhi;
    covering_outputs(static_cast<int>(h), k, s, p, OH, &ilo, &ihi);
    covering_outputs(static_cast<int>(w), k, s, p, OW, &jlo, &jhi);
    A sum = 0;
    for (int i = ilo; i < ihi; ++i)
      for (int j = jlo; j < jhi; ++j) {
        const I o = offset<I, NHWC>(n, c, i, j, C, OH, OW);
        if (mask[o] == (static_cast<int>(h) - (i * s - p)) * k + (static_cast<int>(w) - (j * s - p)))
          sum += to_acc(g[o]);
      }
    gx[e] = from_acc<T>(sum);
  }
}

// ---- channels_last with C % V == 0: a thread per V consecutive channels of one pixel (16-byte loads and
// stores of Vec<T, V>, V = vec_width<T>(); the mask as V bytes), each lane the scalar kernels' arithmetic in
// their order, so the same bits.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads) max_pool_vec_kernel(const Vec<T, V>* __restrict__ x,
                                                                Vec<T, V>* __restrict__ y, int64_t total, int64_t CV,
                                                                int H, int W, int OH, int OW, int k, int s, int p) {
  using A = typename AccOf<T>::type;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t n, cv, i, j;
    unflatten_vec<int64_t>(e, CV, OH, OW, &n, &cv, &i, &j);
    const int hs = max(static_cast<int>(i) * s - p, 0), he = min(static_cast<int>(i) * s - p + k, H);
    const int ws = max(static_cast<int>(j) * s - p, 0), we = min(static_cast<int>(j) * s - p + k, W);
    A m[V];
    Vec<T, V> out;
#pragma unroll
    for (int l = 0; l < V; ++l) m[l] = to_acc(minus_inf<T>()), out.v[l] = minus_inf<T>();
    for (int w = ws; w < we; ++w) {  // max_pool_kernel's order: each column's maximum, then over the columns
      A c[V];
      Vec<T, V> cvals;
#pragma unroll
      for (int l = 0; l < V; ++l) c[l] = to_acc(minus_inf<T>()), cvals.v[l] = minus_inf<T>();
      for (int h = hs; h < he; ++h) {
        const Vec<T, V> t = x[((n * H + h) * W + w) * CV + cv];
#pragma unroll
        for (int l = 0; l < V; ++l) {
          const A f = to_acc(t.v[l]);
          if (f > c[l]) c[l] = f, cvals.v[l] = t.v[l];
        }
      }
#pragma unroll
      for (int l = 0; l < V; ++l) {
        if (c[l] > m[l]) m[l] = c[l], out.v[l] = cvals.v[l];
      }
    }
    y[e] = out;
  }
}

template <typename T, typename I, int V>
__global__ void __launch_bounds__(kThreads) max_pool_mask_vec_kernel(const Vec<T, V>* __restrict__ x,
                                                                     Vec<T, V>* __restrict__ y,
                                                                     Vec<uint8_t, V>* __restrict__ mask, I total,
                                                                     I CV, int H, int W, int OH, int OW, int k, int s,
                                                                     int p) {
  using A = typename AccOf<T>::type;
  for (I e = static_cast<I>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<I>(gridDim.x) * blockDim.x) {
    I n, cv, i, j;
    unflatten_vec<I>(e, CV, OH, OW, &n, &cv, &i, &j);
    const int h0 = static_cast<int>(i) * s - p, w0 = static_cast<int>(j) * s - p;
    const int hs = max(h0, 0), he = min(h0 + k, H), ws = max(w0, 0), we = min(w0 + k, W);
    A m[V];
    Vec<T, V> out;
    Vec<uint8_t, V> arg;
#pragma unroll
    for (int l = 0; l < V; ++l) m[l] = to_acc(minus_inf<T>()), out.v[l] = minus_inf<T>(), arg.v[l] = kMaskNone;
    for (int h = hs; h < he; ++h)
      for (int w = ws; w < we; ++w) {
        const Vec<T, V> t = x[((n * H + h) * W + w) * CV + cv];
        const uint8_t at = static_cast<uint8_t>((h - h0) * k + (w - w0));
#pragma unroll
        for (int l = 0; l < V; ++l) {
          const A f = to_acc(t.v[l]);
          if (f > m[l]) m[l] = f, out.v[l] = t.v[l], arg.v[l] = at;
        }
      }
    y[e] = out;
    mask[e] = arg;
  }
}

template <typename T, typename I, int V>
__global__ void __launch_bounds__(kThreads) max_pool_backward_vec_kernel(const Vec<T, V>* __restrict__ g,
                                                                         const Vec<uint8_t, V>* __restrict__ mask,
                                                                         Vec<T, V>* __restrict__ gx, I total, I CV,
                                                                         int H, int W, int OH, int OW, int k, int s,
                                                                         int p) {
  using A = typename AccOf<T>::type;
  for (I e = static_cast<I>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<I>(gridDim.x) * blockDim.x) {
    I n, cv, h, w;
    unflatten_vec<I>(e, CV, H, W, &n, &cv, &h, &w);
    int ilo, ihi, jlo, jhi;
    covering_outputs(static_cast<int>(h), k, s, p, OH, &ilo, &ihi);
    covering_outputs(static_cast<int>(w), k, s, p, OW, &jlo, &jhi);
    A sum[V];
#pragma unroll
    for (int l = 0; l < V; ++l) sum[l] = 0;
    for (int i = ilo; i < ihi; ++i)
      for (int j = jlo; j < jhi; ++j) {
        const I o = ((n * OH + i) * OW + j) * CV + cv;
        const int at = (static_cast<int>(h) - (i * s - p)) * k + (static_cast<int>(w) - (j * s - p));
        const Vec<uint8_t, V> mk = mask[o];
        const Vec<T, V> gv = g[o];
#pragma unroll
        for (int l = 0; l < V; ++l) {
          if (mk.v[l] == at) sum[l] += to_acc(gv.v[l]);
        }
      }
    Vec<T, V> out;
#pragma unroll
    for (int l = 0; l < V; ++l) out.v[l] = from_acc<T>(sum[l]);
    gx[e] = out;
  }
}

template <typename T>
cudaError_t launch_mask_typed(const void* x, void* y, uint8_t* mask, int64_t N, int64_t C, int H, int W, int OH,
                              int OW, int k, int s, int p, bool nhwc, cudaStream_t stream) {
  const int64_t total = N * C * OH * OW;
  if (total == 0) return cudaSuccess;
  const T* xp = static_cast<const T*>(x);
  T* yp = static_cast<T*>(y);
  constexpr int V = vec_width<T>();
  if (vec_applies<T>(nhwc, C, {x, y}) && aligned_to(mask, V)) {
    using VT = Vec<T, V>;
    using VM = Vec<uint8_t, V>;
    const int64_t tv = total / V;
    const dim3 grid = grid_for(tv);
    if (fits_int(N * C * H * W) && fits_int(total))
      max_pool_mask_vec_kernel<T, int, V><<<grid, kThreads, 0, stream>>>(
          static_cast<const VT*>(x), static_cast<VT*>(y), reinterpret_cast<VM*>(mask), static_cast<int>(tv),
          static_cast<int>(C / V), H, W, OH, OW, k, s, p);
    else
      max_pool_mask_vec_kernel<T, int64_t, V><<<grid, kThreads, 0, stream>>>(
          static_cast<const VT*>(x), static_cast<VT*>(y), reinterpret_cast<VM*>(mask), tv, C / V, H, W, OH, OW, k,
          s, p);
    return cudaGetLastError();
  }
  const dim3 grid = grid_for(total);
  // the input's largest index bounds every index the kernel forms
  if (fits_int(N * C * H * W) && fits_int(total)) {
    const int t = static_cast<int>(total), c = static_cast<int>(C);
    if (nhwc)
      max_pool_mask_kernel<T, int, true><<<grid, kThreads, 0, stream>>>(xp, yp, mask, t, c, H, W, OH, OW, k, s, p);
    else
      max_pool_mask_kernel<T, int, false><<<grid, kThreads, 0, stream>>>(xp, yp, mask, t, c, H, W, OH, OW, k, s, p);
  } else if (nhwc) {
    max_pool_mask_kernel<T, int64_t, true><<<grid, kThreads, 0, stream>>>(xp, yp, mask, total, C, H, W, OH, OW, k, s, p);
  } else {
    max_pool_mask_kernel<T, int64_t, false><<<grid, kThreads, 0, stream>>>(xp, yp, mask, total, C, H, W, OH, OW, k, s,
                                                                          p);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_backward_typed(const void* g, const uint8_t* mask, void* gx, int64_t N, int64_t C, int H, int W,
                                  int OH, int OW, int k, int s, int p, bool nhwc, cudaStream_t stream) {
  const int64_t total = N * C * H * W;
  if (total == 0) return cudaSuccess;
  const T* gp = static_cast<const T*>(g);
  T* xp = static_cast<T*>(gx);
  constexpr int V = vec_width<T>();
  if (vec_applies<T>(nhwc, C, {g, gx}) && aligned_to(mask, V)) {
    using VT = Vec<T, V>;
    using VM = Vec<uint8_t, V>;
    const int64_t tv = total / V;
    const dim3 grid = grid_for(tv);
    if (fits_int(total) && fits_int(N * C * OH * OW))
      max_pool_backward_vec_kernel<T, int, V><<<grid, kThreads, 0, stream>>>(
          static_cast<const VT*>(g), reinterpret_cast<const VM*>(mask), static_cast<VT*>(gx), static_cast<int>(tv),
          static_cast<int>(C / V), H, W, OH, OW, k, s, p);
    else
      max_pool_backward_vec_kernel<T, int64_t, V><<<grid, kThreads, 0, stream>>>(
          static_cast<const VT*>(g), reinterpret_cast<const VM*>(mask), static_cast<VT*>(gx), tv, C / V, H, W, OH,
          OW, k, s, p);
    return cudaGetLastError();
  }
  const dim3 grid = grid_for(total);
  if (fits_int(total) && fits_int(N * C * OH * OW)) {
    const int t = static_cast<int>(total), c = static_cast<int>(C);
    if (nhwc)
      max_pool_backward_kernel<T, int, true><<<grid, kThreads, 0, stream>>>(gp, mask, xp, t, c, H, W, OH, OW, k, s, p);
    else
      max_pool_backward_kernel<T, int, false><<<grid, kThreads, 0, stream>>>(gp, mask, xp, t, c, H, W, OH, OW, k, s,
                                                                             p);
  } else if (nhwc) {
    max_pool_backward_kernel<T, int64_t, true><<<grid, kThreads, 0, stream>>>(gp, mask, xp, total, C, H, W, OH, OW, k,
                                                                              s, p);
  } else {
    max_pool_backward_kernel<T, int64_t, false><<<grid, kThreads, 0, stream>>>(gp, mask, xp, total, C, H, W, OH, OW,
                                                                               k, s, p);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_typed(const void* x, void* y, int64_t N, int64_t C, int H, int W, int OH, int OW, int k, int s,
                         int p, bool channels_last, cudaStream_t stream) {
  const int64_t total = N * C * OH * OW;
  if (total == 0) return cudaSuccess;
  constexpr int V = vec_width<T>();
  if (vec_applies<T>(channels_last, C, {x, y})) {
    max_pool_vec_kernel<T, V><<<grid_for(total / V), kThreads, 0, stream>>>(
        static_cast<const Vec<T, V>*>(x), static_cast<Vec<T, V>*>(y), total / V, C / V, H, W, OH, OW, k, s, p);
    return cudaGetLastError();
  }
  const dim3 grid = grid_for(total);
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
  ATTNSCALE_DISPATCH_DTYPE(dtype, launch_typed, x, y, N, C, H, W, OH, OW, k, s, p, channels_last, stream);
}

cudaError_t launch_max_pool2d_with_mask(DType dtype, const void* x, void* y, uint8_t* mask, int64_t N, int64_t C,
                                        int H, int W, int OH, int OW, int k, int s, int p, bool channels_last,
                                        cudaStream_t stream) {
  ATTNSCALE_DISPATCH_DTYPE(dtype, launch_mask_typed, x, y, mask, N, C, H, W, OH, OW, k, s, p, channels_last, stream);
}

cudaError_t launch_max_pool2d_backward(DType dtype, const void* g, const uint8_t* mask, void* gx, int64_t N,
                                       int64_t C, int H, int W, int OH, int OW, int k, int s, int p,
                                       bool channels_last, cudaStream_t stream) {
  ATTNSCALE_DISPATCH_DTYPE(dtype, launch_backward_typed, g, mask, gx, N, C, H, W, OH, OW, k, s, p, channels_last, stream);
}

}  // namespace cuda
}  // namespace max_pool
}  // namespace attnscale
