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

// Each block copies kRowsPerBlock rows of one block (columns: k; products: o) over a stretch of m,
// at least 4 blocks of 256 threads per multiprocessor (64 registers):
// the position of m in the image is worked out once for all those rows, and their loads are
// independent, so a thread keeps kRowsPerBlock of them in flight.  (One row per block made ~500k
// blocks of one element per thread at fc6's size: 1 ms per call on an H100, latency-bound.)
constexpr int kRowsPerBlock = 8;

template <typename T>
__global__ void __launch_bounds__(kPackThreads, 4) pack_columns_kernel(const T* __restrict__ x, T* __restrict__ cols,
                                                                    PackPlan p) {
  const PackRect& r = p.rects[blockIdx.z];
  const int64_t M = block_size(p, r), K = column_rows(p, r);
  for (int64_t k0 = int64_t(blockIdx.y) * kRowsPerBlock; k0 < K; k0 += int64_t(gridDim.y) * kRowsPerBlock) {
    const int rows = K - k0 < kRowsPerBlock ? int(K - k0) : kRowsPerBlock;
    int64_t source[kRowsPerBlock];
#pragma unroll
    for (int i = 0; i < kRowsPerBlock; ++i) source[i] = i < rows ? column_row_source(p, r, uint32_t(k0 + i)) : 0;
    T* out = cols + r.col_offset + k0 * r.ld;
    for (int64_t m = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; m < M; m += int64_t(gridDim.x) * blockDim.x) {
      const int64_t pos = block_position(r, uint32_t(m), p.C, p.H, p.W);
      T v[kRowsPerBlock];
#pragma unroll
      for (int i = 0; i < kRowsPerBlock; ++i) {
        if (i < rows) v[i] = x[source[i] + pos];
      }
#pragma unroll
      for (int i = 0; i < kRowsPerBlock; ++i) {
        if (i < rows) out[i * r.ld + m] = v[i];
      }
    }
  }
}

// Element (o, m) of the product blocks <-> out[n, o, y, x]; TO_OUTPUT: product (+ bias) -> out, else
// out -> product.
template <typename T, bool TO_OUTPUT>
__global__ void __launch_bounds__(kPackThreads, 4) output_blocks_kernel(const T* __restrict__ src,
                                                                     const T* __restrict__ bias,
                                                                     T* __restrict__ dst, PackPlan p) {
  const PackRect& r = p.rects[blockIdx.z];
  const int64_t M = block_size(p, r);
  for (int64_t o0 = int64_t(blockIdx.y) * kRowsPerBlock; o0 < p.O; o0 += int64_t(gridDim.y) * kRowsPerBlock) {
    const int rows = p.O - o0 < kRowsPerBlock ? int(p.O - o0) : kRowsPerBlock;
    const int64_t plane = p.Ho * p.Wo;
    const int64_t base = (o0 * p.Ho + r.out_y) * p.Wo + r.out_x;  // out offset of (n=0, o0, first row, column)
    const int64_t prod0 = r.prod_offset + o0 * r.ld;
    for (int64_t m = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; m < M; m += int64_t(gridDim.x) * blockDim.x) {
      const int64_t pos = base + block_position(r, uint32_t(m), p.O, p.Ho, p.Wo);
      T v[kRowsPerBlock];
#pragma unroll
      for (int i = 0; i < kRowsPerBlock; ++i) {
        if (i < rows) v[i] = TO_OUTPUT ? src[prod0 + i * r.ld + m] : src[pos + i * plane];
      }
#pragma unroll
      for (int i = 0; i < kRowsPerBlock; ++i) {
        if (i < rows) {
          if (TO_OUTPUT) {
            dst[pos + i * plane] = bias ? add_bias(v[i], bias[o0 + i]) : v[i];
          } else {
            dst[prod0 + i * r.ld + m] = v[i];
          }
        }
      }
    }
  }
}

// Grid of a plan: z the rectangles, y groups of kRowsPerBlock block rows, x stretches of m; each block
// loops over further groups and stretches.  About kTargetBlocks blocks in all, so that each thread
// copies hundreds of elements (fc6: ~440) rather than a few: short blocks left the copy latency-bound.
constexpr int64_t kTargetBlocks = 2048;

dim3 pack_grid(const PackPlan& p, int64_t rows_of_largest) {
  int64_t m_max = 1;
  for (int i = 0; i < p.num_rects; ++i) m_max = std::max(m_max, block_size(p, p.rects[i]));
  const int64_t groups = (std::max<int64_t>(rows_of_largest, 1) + kRowsPerBlock - 1) / kRowsPerBlock;
  const int64_t gy = std::min<int64_t>({groups, std::max<int64_t>(1, kTargetBlocks / p.num_rects), kMaxGridY});
  const int64_t gx = std::max<int64_t>(1, std::min<int64_t>((kTargetBlocks + gy * p.num_rects - 1) / (gy * p.num_rects),
                                                            (m_max + kPackThreads - 1) / kPackThreads));
  return dim3(unsigned(gx), unsigned(gy), unsigned(p.num_rects));
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
    output_blocks_kernel<T, false><<<pack_grid(p, p.O), kPackThreads, 0, stream>>>(
        static_cast<const T*>(grad), nullptr, static_cast<T*>(prod), p);
  });
}

cudaError_t launch_scatter_output(CudaDType dtype, const void* prod, const void* bias, void* out, const PackPlan& p,
                                  cudaStream_t stream) {
  if (p.num_rects == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto zero) {
    using T = decltype(zero);
    output_blocks_kernel<T, true><<<pack_grid(p, p.O), kPackThreads, 0, stream>>>(
        static_cast<const T*>(prod), static_cast<const T*>(bias), static_cast<T*>(out), p);
  });
}

}  // namespace dilated_conv
}  // namespace attnscale
