// CUDA kernel of attnscale::caffe_interp: DeepLab's Interp (bilinear, aligned corners), a thread per output
// element, NCHW or NHWC, in the order and rounding of the index_select path (attnscale.caffe._interp_blend):
// the horizontal blends of the two source rows, then the vertical blend, each product and sum rounded to
// the dtype; and of its backward caffe_interp_backward (a thread per source element gathering through the
// per-axis adjoint tables, reading the gradient through its strides).  In channels_last with C a multiple
// of 16 / sizeof(T) and aligned data, a thread per 16 bytes of channels instead (the same arithmetic per
// lane: the same bits).  No torch headers: raw pointers, sizes and a cudaStream_t (see ops/interp_cuda.h).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "ops/cuda/kernel_common.cuh"
#include "ops/interp_cuda.h"
#include "ops/scale_merge_interp.h"

namespace attnscale {
namespace interp {
namespace cuda {
namespace {

using scale_merge::interp_ratio;
using scale_merge::interp_tap;
using scale_merge::Tap;

using cuda_common::AccOf;
using cuda_common::fits_int;
using cuda_common::grid_for;
using cuda_common::kThreads;
using cuda_common::offset;
using cuda_common::unflatten;
using cuda_common::unflatten_vec;
using cuda_common::Vec;
using cuda_common::vec_applies;
using cuda_common::vec_width;

// Arithmetic of one dtype: values V (the dtype itself for float / double, float for the half types, whose
// every result is rounded back to the dtype), load / store, lambdas, product, sum.
template <typename T>
struct Arith;

template <>
struct Arith<float> {
  using V = float;
  static __device__ __forceinline__ V load(float v) { return v; }
  static __device__ __forceinline__ float store(V v) { return v; }
  static __device__ __forceinline__ V lambda(float l) { return l; }
  static __device__ __forceinline__ V one_minus(V l) { return __fsub_rn(1.f, l); }
  static __device__ __forceinline__ V mul(V a, V b) { return __fmul_rn(a, b); }
  static __device__ __forceinline__ V add(V a, V b) { return __fadd_rn(a, b); }
};

template <>
struct Arith<double> {
  using V = double;
  static __device__ __forceinline__ V load(double v) { return v; }
  static __device__ __forceinline__ double store(V v) { return v; }
  static __device__ __forceinline__ V lambda(float l) { return static_cast<double>(l); }
  static __device__ __forceinline__ V one_minus(V l) { return __dsub_rn(1.0, l); }
  static __device__ __forceinline__ V mul(V a, V b) { return __dmul_rn(a, b); }
  static __device__ __forceinline__ V add(V a, V b) { return __dadd_rn(a, b); }
};

template <typename H>
struct HalfArith {
  using V = float;
  static __device__ __forceinline__ float to_f(H v);
  static __device__ __forceinline__ H from_f(float v);
  static __device__ __forceinline__ V round(float v) { return to_f(from_f(v)); }
  static __device__ __forceinline__ V load(H v) { return to_f(v); }
  static __device__ __forceinline__ H store(V v) { return from_f(v); }  // already a value of H
  static __device__ __forceinline__ V lambda(float l) { return round(l); }
  static __device__ __forceinline__ V one_minus(V l) { return round(__fsub_rn(1.f, l)); }
  static __device__ __forceinline__ V mul(V a, V b) { return round(__fmul_rn(a, b)); }
  static __device__ __forceinline__ V add(V a, V b) { return round(__fadd_rn(a, b)); }
};
template <>
__device__ __forceinline__ float HalfArith<__half>::to_f(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ __half HalfArith<__half>::from_f(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ float HalfArith<__nv_bfloat16>::to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 HalfArith<__nv_bfloat16>::from_f(float v) { return __float2bfloat16_rn(v); }

template <>
struct Arith<__half> : HalfArith<__half> {};
template <>
struct Arith<__nv_bfloat16> : HalfArith<__nv_bfloat16> {};

template <typename T, bool NHWC>
__global__ void __launch_bounds__(kThreads) interp_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t total,
                                                          int64_t C, int H, int W, int OH, int OW, float ry, float rx) {
  using Ar = Arith<T>;
  using V = typename Ar::V;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t n, c, oy, ox;
    unflatten<int64_t, NHWC>(e, C, OH, OW, &n, &c, &oy, &ox);
    const Tap ty = interp_tap(static_cast<int>(oy), H, OH, ry), tx = interp_tap(static_cast<int>(ox), W, OW, rx);
    // element (row, col) of plane (n, c)
    const auto at = [&](int row, int col) -> V {
      return Ar::load(x[offset<int64_t, NHWC>(n, c, row, col, C, H, W)]);
    };
    const V l1x = Ar::lambda(tx.l1), l0x = Ar::one_minus(l1x);
    const V l1y = Ar::lambda(ty.l1), l0y = Ar::one_minus(l1y);
    const V top = Ar::add(Ar::mul(l0x, at(ty.i0, tx.i0)), Ar::mul(l1x, at(ty.i0, tx.i1)));
    const V bot = Ar::add(Ar::mul(l0x, at(ty.i1, tx.i0)), Ar::mul(l1x, at(ty.i1, tx.i1)));
    y[e] = Ar::store(Ar::add(Ar::mul(l0y, top), Ar::mul(l1y, bot)));
  }
}

// channels_last with C % V == 0: a thread per V consecutive channels of one output pixel (16-byte loads and
// stores), the taps and lambdas worked out once for them, each lane interp_kernel's arithmetic.
template <typename T, typename I, int V>
__global__ void __launch_bounds__(kThreads) interp_vec_kernel(const Vec<T, V>* __restrict__ x,
                                                              Vec<T, V>* __restrict__ y, I total, I CV, int H, int W,
                                                              int OH, int OW, float ry, float rx) {
  using Ar = Arith<T>;
  using A = typename Ar::V;
  for (I e = static_cast<I>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<I>(gridDim.x) * blockDim.x) {
    I n, cv, oy, ox;
    unflatten_vec<I>(e, CV, OH, OW, &n, &cv, &oy, &ox);
    const Tap ty = interp_tap(static_cast<int>(oy), H, OH, ry), tx = interp_tap(static_cast<int>(ox), W, OW, rx);
    const A l1x = Ar::lambda(tx.l1), l0x = Ar::one_minus(l1x);
    const A l1y = Ar::lambda(ty.l1), l0y = Ar::one_minus(l1y);
    const I r0 = (n * H + ty.i0) * W, r1 = (n * H + ty.i1) * W;
    const Vec<T, V> a = x[(r0 + tx.i0) * CV + cv], b = x[(r0 + tx.i1) * CV + cv];
    const Vec<T, V> c = x[(r1 + tx.i0) * CV + cv], d = x[(r1 + tx.i1) * CV + cv];
    Vec<T, V> out;
#pragma unroll
    for (int l = 0; l < V; ++l) {
      const A top = Ar::add(Ar::mul(l0x, Ar::load(a.v[l])), Ar::mul(l1x, Ar::load(b.v[l])));
      const A bot = Ar::add(Ar::mul(l0x, Ar::load(c.v[l])), Ar::mul(l1x, Ar::load(d.v[l])));
      out.v[l] = Ar::store(Ar::add(Ar::mul(l0y, top), Ar::mul(l1y, bot)));
    }
    y[e] = out;
  }
}

template <typename T>
cudaError_t launch_typed(const void* x, void* y, int64_t N, int64_t C, int H, int W, int OH, int OW, bool nhwc,
                         cudaStream_t stream) {
  const int64_t total = N * C * OH * OW;
  if (total == 0) return cudaSuccess;
  // the ratios on the host, as Caffe's GPU Interp and attnscale.caffe.interp_coefficients take them
  const float ry = interp_ratio(H, OH), rx = interp_ratio(W, OW);
  constexpr int V = vec_width<T>();
  if (vec_applies<T>(nhwc, C, {x, y})) {
    using VT = Vec<T, V>;
    const int64_t tv = total / V;
    if (fits_int(N * C * H * W) && fits_int(total))
      interp_vec_kernel<T, int, V><<<grid_for(tv), kThreads, 0, stream>>>(
          static_cast<const VT*>(x), static_cast<VT*>(y), static_cast<int>(tv), static_cast<int>(C / V), H, W, OH,
          OW, ry, rx);
    else
      interp_vec_kernel<T, int64_t, V><<<grid_for(tv), kThreads, 0, stream>>>(
          static_cast<const VT*>(x), static_cast<VT*>(y), tv, C / V, H, W, OH, OW, ry, rx);
    return cudaGetLastError();
  }
  const dim3 grid = grid_for(total);
  const T* xp = static_cast<const T*>(x);
  T* yp = static_cast<T*>(y);
  if (nhwc)
    interp_kernel<T, true><<<grid, kThreads, 0, stream>>>(xp, yp, total, C, H, W, OH, OW, ry, rx);
  else
    interp_kernel<T, false><<<grid, kThreads, 0, stream>>>(xp, yp, total, C, H, W, OH, OW, ry, rx);
  return cudaGetLastError();
}

// element strides of the gradient read by the backward (any view)
struct GradStrides {
  int64_t n, c, h, w;
};

template <typename T, bool NHWC>
__global__ void __launch_bounds__(kThreads)
    interp_backward_kernel(const T* __restrict__ g, GradStrides gs, const int64_t* __restrict__ idx_h,
                           const typename AccOf<T>::type* __restrict__ coef_h, int Th,
                           const int64_t* __restrict__ idx_w, const typename AccOf<T>::type* __restrict__ coef_w,
                           int Tw, T* __restrict__ gx, int64_t total, int64_t C, int H, int W, int OH, int OW) {
  using Ar = Arith<T>;
  using A = typename AccOf<T>::type;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t n, c, hh, ww;
    unflatten<int64_t, NHWC>(e, C, static_cast<int64_t>(H), static_cast<int64_t>(W), &n, &c, &hh, &ww);
    const int h = static_cast<int>(hh), w = static_cast<int>(ww);
    A outer = 0;
    for (int th = 0; th < Th; ++th) {
      const int64_t oh = idx_h[static_cast<int64_t>(th) * H + h];
      if (oh < 0 || oh >= OH) continue;  // an unused slot
      A inner = 0;
      for (int tw = 0; tw < Tw; ++tw) {
        const int64_t ow = idx_w[static_cast<int64_t>(tw) * W + w];
        if (ow < 0 || ow >= OW) continue;
        const int64_t off = n * gs.n + c * gs.c + oh * gs.h + ow * gs.w;
        inner = fma(static_cast<A>(Ar::load(g[off])), coef_w[static_cast<int64_t>(tw) * W + w], inner);
      }
      outer = fma(inner, coef_h[static_cast<int64_t>(th) * H + h], outer);
    }
    gx[e] = Ar::store(outer);
  }
}

// The backward with gx channels_last, C % V == 0 and the gradient's channels contiguous in V-aligned runs (a
// dense channels_last gradient, or a channel slice of one, as the attention concatenation's backward hands
// it): a thread per V channels of one source pixel, interp_backward_kernel's sums per lane.
template <typename T, typename I, int V>
__global__ void __launch_bounds__(kThreads)
    interp_backward_vec_kernel(const T* __restrict__ g, GradStrides gs, const int64_t* __restrict__ idx_h,
                               const typename AccOf<T>::type* __restrict__ coef_h, int Th,
                               const int64_t* __restrict__ idx_w, const typename AccOf<T>::type* __restrict__ coef_w,
                               int Tw, Vec<T, V>* __restrict__ gx, I total, I CV, int H, int W, int OH, int OW) {
  using Ar = Arith<T>;
  using A = typename AccOf<T>::type;
  for (I e = static_cast<I>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<I>(gridDim.x) * blockDim.x) {
    I n, cv, hh, ww;
    unflatten_vec<I>(e, CV, static_cast<I>(H), static_cast<I>(W), &n, &cv, &hh, &ww);
    const int h = static_cast<int>(hh), w = static_cast<int>(ww);
    const T* gn = g + static_cast<int64_t>(n) * gs.n + static_cast<int64_t>(cv) * V;
    A outer[V];
#pragma unroll
    for (int l = 0; l < V; ++l) outer[l] = 0;
    for (int th = 0; th < Th; ++th) {
      const int64_t oh = idx_h[static_cast<int64_t>(th) * H + h];
      if (oh < 0 || oh >= OH) continue;  // an unused slot
      A inner[V];
#pragma unroll
      for (int l = 0; l < V; ++l) inner[l] = 0;
      for (int tw = 0; tw < Tw; ++tw) {
        const int64_t ow = idx_w[static_cast<int64_t>(tw) * W + w];
        if (ow < 0 || ow >= OW) continue;
        const Vec<T, V> gv = *reinterpret_cast<const Vec<T, V>*>(gn + oh * gs.h + ow * gs.w);
        const A cw = coef_w[static_cast<int64_t>(tw) * W + w];
#pragma unroll
        for (int l = 0; l < V; ++l) inner[l] = fma(static_cast<A>(Ar::load(gv.v[l])), cw, inner[l]);
      }
      const A ch = coef_h[static_cast<int64_t>(th) * H + h];
#pragma unroll
      for (int l = 0; l < V; ++l) outer[l] = fma(inner[l], ch, outer[l]);
    }
    Vec<T, V> out;
#pragma unroll
    for (int l = 0; l < V; ++l) out.v[l] = Ar::store(outer[l]);
    gx[e] = out;
  }
}

template <typename T>
cudaError_t launch_backward_typed(const void* g, const int64_t* g_strides, const int64_t* idx_h, const void* coef_h,
                                  int Th,
                                  const int64_t* idx_w, const void* coef_w, int Tw, void* gx, int64_t N, int64_t C,
                                  int H, int W, int OH, int OW, bool nhwc, cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  const int64_t total = N * C * H * W;
  if (total == 0) return cudaSuccess;
  const dim3 grid = grid_for(total);
  const T* gp = static_cast<const T*>(g);
  const A* ch = static_cast<const A*>(coef_h);
  const A* cw = static_cast<const A*>(coef_w);
  T* xp = static_cast<T*>(gx);
  const GradStrides gs{g_strides[0], g_strides[1], g_strides[2], g_strides[3]};
  constexpr int V = vec_width<T>();
  if (vec_applies<T>(nhwc, C, {g, gx}) && gs.c == 1 && gs.n % V == 0 && gs.h % V == 0 && gs.w % V == 0) {
    using VT = Vec<T, V>;
    const int64_t tv = total / V;
    if (fits_int(total))
      interp_backward_vec_kernel<T, int, V><<<grid_for(tv), kThreads, 0, stream>>>(
          gp, gs, idx_h, ch, Th, idx_w, cw, Tw, static_cast<VT*>(gx), static_cast<int>(tv), static_cast<int>(C / V), H,
          W, OH, OW);
    else
      interp_backward_vec_kernel<T, int64_t, V><<<grid_for(tv), kThreads, 0, stream>>>(
          gp, gs, idx_h, ch, Th, idx_w, cw, Tw, static_cast<VT*>(gx), tv, C / V, H, W, OH, OW);
    return cudaGetLastError();
  }
  if (nhwc)
    interp_backward_kernel<T, true><<<grid, kThreads, 0, stream>>>(gp, gs, idx_h, ch, Th, idx_w, cw, Tw, xp, total, C,
                                                                    H, W, OH, OW);
  else
    interp_backward_kernel<T, false><<<grid, kThreads, 0, stream>>>(gp, gs, idx_h, ch, Th, idx_w, cw, Tw, xp, total,
                                                                     C, H, W, OH, OW);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_interp(DType dtype, const void* x, void* y, int64_t N, int64_t C, int H, int W, int OH, int OW,
                          bool channels_last, cudaStream_t stream) {
  ATTNSCALE_DISPATCH_DTYPE(dtype, launch_typed, x, y, N, C, H, W, OH, OW, channels_last, stream);
}

cudaError_t launch_interp_backward(DType dtype, const void* g, const int64_t* g_strides, const int64_t* idx_h,
                                   const void* coef_h, int Th, const int64_t* idx_w, const void* coef_w, int Tw,
                                   void* gx, int64_t N, int64_t C, int H, int W, int OH, int OW, bool channels_last,
                                   cudaStream_t stream) {
  ATTNSCALE_DISPATCH_DTYPE(dtype, launch_backward_typed, g, g_strides, idx_h, coef_h, Th, idx_w, coef_w, Tw, gx, N, C,
                           H, W, OH, OW, channels_last, stream);
}

}  // namespace cuda
}  // namespace interp
}  // namespace attnscale
