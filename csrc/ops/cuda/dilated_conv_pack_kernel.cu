// CUDA kernels of the GEMM path's copies (index maps in dilated_conv_pack.h, shared with the CPU
// loops in cpu/dilated_conv_pack_kernel.cpp).  One launch covers every block of a plan: blockIdx.z
// is the rectangle, blockIdx.y (grid-stride) the block row, threads run along the row, so reads and
// writes go along image rows.  All tensors are contiguous.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "ops/dilated_conv_cuda.h"
#include "ops/dilated_conv_pack.h"

namespace attnscale {
namespace dilated_conv {
namespace {

constexpr int kPackThreads = 256;
constexpr int kMaxGridY = 65535;

template <typename T> __device__ __forceinline__ float to_f(T v) { return float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v) { return T(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half(v); }

template <typename T>
__device__ __forceinline__ T add_bias(T v, T b) { return from_f<T>(to_f(v) + to_f(b)); }
template <>
__device__ __forceinline__ double add_bias<double>(double v, double b) { return v + b; }

template <typename T>
__global__ void __launch_bounds__(kPackThreads) pack_columns_kernel(const T* __restrict__ x, T* __restrict__ cols,
                                                                    PackPlan p) {
  const PackRect& r = p.rects[blockIdx.z];
  const int64_t M = block_size(p, r), K = column_rows(p, r);
  for (int64_t k = blockIdx.y; k < K; k += gridDim.y) {
    const int64_t row_source = column_row_source(p, r, uint32_t(k));
    T* out = cols + r.col_offset + k * M;
    for (int64_t m = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; m < M; m += int64_t(gridDim.x) * blockDim.x) {
      out[m] = x[column_source(p, r, row_source, uint32_t(m))];
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kPackThreads) gather_output_kernel(const T* __restrict__ grad, T* __restrict__ prod,
                                                                     PackPlan p) {
  const PackRect& r = p.rects[blockIdx.z];
  const int64_t M = block_size(p, r);
  for (int64_t o = blockIdx.y; o < p.O; o += gridDim.y) {
    T* out = prod + r.prod_offset + o * M;
    for (int64_t m = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; m < M; m += int64_t(gridDim.x) * blockDim.x) {
      out[m] = grad[output_offset(p, r, o, uint32_t(m))];
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kPackThreads) scatter_output_kernel(const T* __restrict__ prod,
                                                                      const T* __restrict__ bias,
                                                                      T* __restrict__ out, PackPlan p) {
  const PackRect& r = p.rects[blockIdx.z];
  const int64_t M = block_size(p, r);
  for (int64_t o = blockIdx.y; o < p.O; o += gridDim.y) {
    const T* in = prod + r.prod_offset + o * M;
    for (int64_t m = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; m < M; m += int64_t(gridDim.x) * blockDim.x) {
      const T v = in[m];
      out[output_offset(p, r, o, uint32_t(m))] = bias ? add_bias(v, bias[o]) : v;
    }
  }
}

// Grid of a plan: x covers the largest block's M (at most 64 blocks of threads; the loop covers
// the rest), y the block rows (grid-stride beyond 65535), z the rectangles.
dim3 pack_grid(const PackPlan& p, int64_t rows_of_largest) {
  int64_t m_max = 1;
  for (int i = 0; i < p.num_rects; ++i) m_max = std::max(m_max, block_size(p, p.rects[i]));
  const int64_t gx = std::min<int64_t>((m_max + kPackThreads - 1) / kPackThreads, 64);
  return dim3(unsigned(gx), unsigned(std::min<int64_t>(std::max<int64_t>(rows_of_largest, 1), kMaxGridY)),
              unsigned(p.num_rects));
}

template <typename F>
cudaError_t dispatch(CudaDType dtype, const F& f) {
  switch (dtype) {
    case CudaDType::kFloat32: f(float{}); break;
    case CudaDType::kFloat64: f(double{}); break;
    case CudaDType::kBFloat16: f(__nv_bfloat16{}); break;
    case CudaDType::kFloat16: f(__half{}); break;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_pack_columns(CudaDType dtype, const void* x, void* cols, const PackPlan& p, cudaStream_t stream) {
  if (p.num_rects == 0) return cudaSuccess;
  int64_t k_max = 0;
  for (int i = 0; i < p.num_rects; ++i) k_max = std::max(k_max, column_rows(p, p.rects[i]));
  return dispatch(dtype, [&](auto zero) {
    using T = decltype(zero);
    pack_columns_kernel<T><<<pack_grid(p, k_max), kPackThreads, 0, stream>>>(static_cast<const T*>(x),
                                                                            static_cast<T*>(cols), p);
  });
}

cudaError_t launch_gather_output(CudaDType dtype, const void* grad, void* prod, const PackPlan& p,
                                 cudaStream_t stream) {
  if (p.num_rects == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto zero) {
    using T = decltype(zero);
    gather_output_kernel<T><<<pack_grid(p, p.O), kPackThreads, 0, stream>>>(static_cast<const T*>(grad),
                                                                           static_cast<T*>(prod), p);
  });
}

cudaError_t launch_scatter_output(CudaDType dtype, const void* prod, const void* bias, void* out, const PackPlan& p,
                                  cudaStream_t stream) {
  if (p.num_rects == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto zero) {
    using T = decltype(zero);
    scatter_output_kernel<T><<<pack_grid(p, p.O), kPackThreads, 0, stream>>>(
        static_cast<const T*>(prod), static_cast<const T*>(bias), static_cast<T*>(out), p);
  });
}

}  // namespace dilated_conv
}  // namespace attnscale
