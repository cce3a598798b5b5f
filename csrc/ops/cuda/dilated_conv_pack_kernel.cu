// CUDA kernels of the GEMM path's copies (index maps in dilated_conv_pack.h, shared with the CPU
// loops in cpu/dilated_conv_pack_kernel.cpp).  One launch covers every block of a plan: blockIdx.y is
// the rectangle.  x, grad and out are channels_last, so the copies move whole channel vectors, a warp
// per vector, 16 bytes per lane where the channel count and the pointers allow it.  The plan is a
// __grid_constant__ parameter: the rectangle's fields are read where they lie, not copied per thread.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>

#include "ops/dilated_conv_cuda.h"
#include "ops/dilated_conv_pack.h"

namespace attnscale {
namespace dilated_conv {
namespace {

constexpr int kPackThreads = 256;
// Blocks per launch: about 16 per multiprocessor of an H100 in all, so that each thread copies
// many vectors (a short-lived block left the earlier copies latency-bound).
constexpr int64_t kTargetBlocks = 2048;

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

// V elements moved as one load and one store.
template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

// The copies move whole channel vectors: a block is kRows warps, each warp one vector at a time (its
// position worked out once, lanes along the channels), grid-stride over the block's vectors.
constexpr int kLanes = 32, kRows = kPackThreads / kLanes;

// Column blocks: U is the copy unit (16 bytes where the channel vector and the pointers allow), cu
// the channel vector's length in units.
template <typename U>
__global__ void __launch_bounds__(kPackThreads) pack_columns_kernel(const U* __restrict__ x, U* __restrict__ cols,
                                                                   const __grid_constant__ PackPlan p,
                                                                   int64_t elem_bytes, int64_t cu) {
  const PackRect& r = p.rects[blockIdx.y];
  const int64_t vectors = block_size(p, r) * r.taps.divisor;
  U* out = cols + r.col_offset * elem_bytes / int64_t(sizeof(U));
  for (int64_t mt = blockIdx.x * int64_t(kRows) + threadIdx.y; mt < vectors; mt += int64_t(gridDim.x) * kRows) {
    const U* src = x + column_pixel(p, r, uint32_t(mt)) * cu;
    U* dst = out + mt * cu;
    for (int64_t c = threadIdx.x; c < cu; c += kLanes) dst[c] = src[c];
  }
}

// A plan's weight blocks from the kernel (through a WeightView): block (x: a tile of kTile outputs o x
// kTile channels c, y: the rectangle) copies w[o, c] at each of the rectangle's taps through shared
// memory, reading along whichever of o and c lies closer together in the kernel (the backward's
// transposed kernel runs along o) and writing along c, the weight block's rows.  The offsets within a
// tap fit in 32 bits (make_blocks checks the kernel's size, dilated_conv_gemm.cpp's compact_weight its
// extent in memory), so the per-element work
// is a few 32-bit multiply-adds (with 64-bit index arithmetic per element and a block per tap, this
// copy of 51 MB, fc6 at N=10 in bf16, took 112 us on an H100: by our count bound by instructions).
constexpr int kTile = 32;

template <typename T>
__global__ void __launch_bounds__(kPackThreads) weight_blocks_kernel(const T* __restrict__ w, T* __restrict__ wbuf,
                                                                    const __grid_constant__ PackPlan p,
                                                                    WeightView view, bool read_along_o) {
  __shared__ T tile[kTile][kTile + 1];
  const PackRect& r = p.rects[blockIdx.y];
  const int O = int(p.O), C = int(p.C), K = int(column_width(p, r)), so = int(view.so), sc = int(view.sc);
  const int tiles_c = (C + kTile - 1) / kTile;
  const int o0 = int(blockIdx.x) / tiles_c * kTile, c0 = int(blockIdx.x) % tiles_c * kTile;
  // this thread's loads (o, c) = (o0 + li + k, c0 + lj) or (o0 + li, c0 + lj + k) for k = 0, kRows, ...
  const int li = read_along_o ? threadIdx.x : threadIdx.y, lj = read_along_o ? threadIdx.y : threadIdx.x;
  const int step_o = read_along_o ? 0 : kRows, step_c = read_along_o ? kRows : 0;
  for (uint32_t t = 0; t < r.taps.divisor; ++t) {
    const T* src = w + weight_source(r, view, 0, t, 0);
    for (int k = 0, o = o0 + li, c = c0 + lj; k < kTile; k += kRows, o += step_o, c += step_c) {
      if (o < O && c < C) tile[o - o0][c - c0] = src[o * so + c * sc];
    }
    __syncthreads();
    T* dst = wbuf + r.part_offset + int64_t(t) * C;
    for (int i = threadIdx.y; i < kTile; i += kRows) {
      if (o0 + i < O && c0 + int(threadIdx.x) < C) dst[(o0 + i) * K + c0 + threadIdx.x] = tile[i][threadIdx.x];
    }
    __syncthreads();
  }
}

// Product rows <-> output pixels, V channels per lane, a warp per pixel; TO_OUTPUT: product (+ bias)
// -> out, else out -> product.  ov: O / V.
template <typename T, int V, bool TO_OUTPUT>
__global__ void __launch_bounds__(kPackThreads) output_blocks_kernel(const T* __restrict__ src,
                                                                    const T* __restrict__ bias,
                                                                    T* __restrict__ dst,
                                                                    const __grid_constant__ PackPlan p, int64_t ov) {
  using VT = Vec<T, V>;
  const PackRect& r = p.rects[blockIdx.y];
  const int64_t M = block_size(p, r);
  for (int64_t m = blockIdx.x * int64_t(kRows) + threadIdx.y; m < M; m += int64_t(gridDim.x) * kRows) {
    const int64_t pixel = output_pixel(p, r, uint32_t(m)) * p.O, row = r.prod_offset + m * p.O;
    for (int64_t c = threadIdx.x; c < ov; c += kLanes) {
      const int64_t o = c * V;
      if (TO_OUTPUT) {
        VT v = *reinterpret_cast<const VT*>(src + row + o);
        if (bias != nullptr) {
#pragma unroll
          for (int e = 0; e < V; ++e) v.v[e] = add_bias(v.v[e], bias[o + e]);
        }
        *reinterpret_cast<VT*>(dst + pixel + o) = v;
      } else {
        *reinterpret_cast<VT*>(dst + row + o) = *reinterpret_cast<const VT*>(src + pixel + o);
      }
    }
  }
}

// The gather (out -> product) with the bias gradient: each lane also sums its NV vectors of V channels
// (o = (j * kLanes + lane) * V + e) over the rows it copies, in float; the block adds its warps' sums in
// shared memory and writes one row of O partial sums per block (partial[block][o], block = blockIdx.y *
// gridDim.x + blockIdx.x), which bias_gradient_kernel adds up.  So the gradient costs no second read of
// grad_output (ATen's reduction over N, H, W read it again: 39 us at fc6's 10x1024x41x41 in bf16).
constexpr int kSumFloats = 32;  // channels per lane: O <= kLanes * kSumFloats = 1024
constexpr int kSumBlocksPerRect = 32;

template <typename T, int V, int NV>
__global__ void __launch_bounds__(kPackThreads) gather_sum_kernel(const T* __restrict__ src, T* __restrict__ dst,
                                                                 float* __restrict__ partial,
                                                                 const __grid_constant__ PackPlan p, int64_t ov) {
  static_assert(NV * V <= kSumFloats, "a lane sums at most kSumFloats channels");
  using VT = Vec<T, V>;
  __shared__ float sums[kRows][kLanes * kSumFloats];
  const PackRect& r = p.rects[blockIdx.y];
  const int64_t M = block_size(p, r);
  float acc[NV][V];
#pragma unroll
  for (int j = 0; j < NV; ++j) {
#pragma unroll
    for (int e = 0; e < V; ++e) acc[j][e] = 0.f;
  }
  for (int64_t m = blockIdx.x * int64_t(kRows) + threadIdx.y; m < M; m += int64_t(gridDim.x) * kRows) {
    const int64_t pixel = output_pixel(p, r, uint32_t(m)) * p.O, row = r.prod_offset + m * p.O;
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int64_t c = threadIdx.x + j * kLanes;
      if (c < ov) {
        const VT v = *reinterpret_cast<const VT*>(src + pixel + c * V);
        *reinterpret_cast<VT*>(dst + row + c * V) = v;
#pragma unroll
        for (int e = 0; e < V; ++e) acc[j][e] += to_f(v.v[e]);
      }
    }
  }
#pragma unroll
  for (int j = 0; j < NV; ++j) {
#pragma unroll
    for (int e = 0; e < V; ++e) sums[threadIdx.y][(j * kLanes + threadIdx.x) * V + e] = acc[j][e];
  }
  __syncthreads();
  float* out = partial + (int64_t(blockIdx.y) * gridDim.x + blockIdx.x) * p.O;
  for (int o = threadIdx.y * kLanes + threadIdx.x; o < p.O; o += kPackThreads) {
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < kRows; ++k) s += sums[k][o];
    out[o] = s;
  }
}

// bias_grad[o] = the sum of partial[b][o] over the blocks b, in block order: a block per kLanes channels,
// its warps taking every kRows-th block's row, then added in warp order.
template <typename T>
__global__ void __launch_bounds__(kPackThreads) bias_gradient_kernel(const float* __restrict__ partial,
                                                                    int64_t blocks, int64_t O, T* __restrict__ out) {
  __shared__ float sums[kRows][kLanes];
  const int64_t o = int64_t(blockIdx.x) * kLanes + threadIdx.x;
  float s = 0.f;
  if (o < O) {
    for (int64_t b = threadIdx.y; b < blocks; b += kRows) s += partial[b * O + o];
  }
  sums[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && o < O) {
    float t = 0.f;
#pragma unroll
    for (int k = 0; k < kRows; ++k) t += sums[k][threadIdx.x];
    out[o] = from_f<T>(t);
  }
}

// The weight gradient (O, KH, KW, C) from the part blocks: a warp per row (o, ky, kx), lanes along the
// channels; each element sums the rectangles' rows (part_row) in plan order, as the CPU loop does.
template <typename A>
__global__ void __launch_bounds__(kPackThreads) weight_gradient_kernel(const A* __restrict__ parts, A* __restrict__ acc,
                                                                      const __grid_constant__ PackPlan p,
                                                                      bool accumulate) {
  const int64_t taps = p.KH * p.KW, rows = p.O * taps;
  for (int64_t row = blockIdx.x * int64_t(kRows) + threadIdx.y; row < rows; row += int64_t(gridDim.x) * kRows) {
    const int64_t o = row / taps, ky = row % taps / p.KW, kx = row % p.KW;
    A* dst = acc + row * p.C;
    for (int64_t c = threadIdx.x; c < p.C; c += kLanes) {
      A sum = A(0);
      for (int j = 0; j < p.num_rects; ++j) {
        const int64_t src = part_row(p, p.rects[j], o, ky, kx);
        if (src >= 0) sum += parts[src + c];
      }
      dst[c] = accumulate ? dst[c] + sum : sum;
    }
  }
}

// Grid of the copies: y the plan's rectangles, x enough blocks of kRows vectors for the largest
// (`vectors`), about kTargetBlocks in all.
dim3 vector_grid(const PackPlan& p, int64_t vectors) {
  const int64_t per_rect = std::max<int64_t>(1, kTargetBlocks / p.num_rects);
  const int64_t gx = std::max<int64_t>(1, std::min<int64_t>(per_rect, (vectors + kRows - 1) / kRows));
  return dim3(unsigned(gx), unsigned(p.num_rects));
}
const dim3 kVectorBlock(kLanes, kRows);

bool aligned(const void* ptr, int64_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % uint64_t(bytes) == 0; }

int64_t element_bytes(CudaDType dtype) {
  switch (dtype) {
    case CudaDType::kFloat32: return 4;
    case CudaDType::kFloat64: return 8;
    case CudaDType::kBFloat16:
    case CudaDType::kFloat16: return 2;
  }
  return 4;
}

// The widest copy unit (16, 8, 4 or 2 bytes, at least an element) that divides a row of `bytes` and
// both base pointers.  Block offsets are multiples of 16 elements plus whole rows (dilated_conv_gemm.cpp).
int64_t unit_bytes(int64_t bytes, int64_t elem, const void* a, const void* b) {
  for (int64_t u = 16; u > elem; u /= 2) {
    if (bytes % u == 0 && aligned(a, u) && aligned(b, u)) return u;
  }
  return elem;
}

template <typename U>
void columns_with_unit(const void* x, void* cols, const PackPlan& p, int64_t elem, cudaStream_t stream) {
  int64_t largest = 0;
  for (int i = 0; i < p.num_rects; ++i) largest = std::max(largest, block_size(p, p.rects[i]) * p.rects[i].taps.divisor);
  pack_columns_kernel<U><<<vector_grid(p, largest), kVectorBlock, 0, stream>>>(
      static_cast<const U*>(x), static_cast<U*>(cols), p, elem, p.C * elem / int64_t(sizeof(U)));
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

template <typename T, bool TO_OUTPUT>
void output_blocks(const void* src, const void* bias, void* dst, const PackPlan& p, cudaStream_t stream) {
  int64_t largest = 0;
  for (int i = 0; i < p.num_rects; ++i) largest = std::max(largest, block_size(p, p.rects[i]));
  constexpr int kV = 16 / sizeof(T);
  const int64_t vec_bytes = int64_t(sizeof(T)) * kV;
  if (p.O % kV == 0 && aligned(src, vec_bytes) && aligned(dst, vec_bytes)) {
    output_blocks_kernel<T, kV, TO_OUTPUT><<<vector_grid(p, largest), kVectorBlock, 0, stream>>>(
        static_cast<const T*>(src), static_cast<const T*>(bias), static_cast<T*>(dst), p, p.O / kV);
  } else {
    output_blocks_kernel<T, 1, TO_OUTPUT><<<vector_grid(p, largest), kVectorBlock, 0, stream>>>(
        static_cast<const T*>(src), static_cast<const T*>(bias), static_cast<T*>(dst), p, p.O);
  }
}

}  // namespace

cudaError_t launch_pack_columns(CudaDType dtype, const void* x, void* cols, const PackPlan& p, cudaStream_t stream) {
  if (p.num_rects == 0) return cudaSuccess;
  const int64_t elem = element_bytes(dtype);
  switch (unit_bytes(p.C * elem, elem, x, cols)) {
    case 16: columns_with_unit<uint4>(x, cols, p, elem, stream); break;
    case 8: columns_with_unit<uint2>(x, cols, p, elem, stream); break;
    case 4: columns_with_unit<uint32_t>(x, cols, p, elem, stream); break;
    default: columns_with_unit<uint16_t>(x, cols, p, elem, stream); break;
  }
  return cudaGetLastError();
}

cudaError_t launch_weight_blocks(CudaDType dtype, const void* w, const WeightView& view, void* wbuf,
                                 const PackPlan& p, cudaStream_t stream) {
  if (p.num_rects == 0 || p.O == 0 || p.C == 0) return cudaSuccess;
  const int64_t tiles = ((p.O + kTile - 1) / kTile) * ((p.C + kTile - 1) / kTile);
  const bool read_along_o = std::abs(view.so) < std::abs(view.sc);
  return dispatch(dtype, [&](auto zero) {
    using T = decltype(zero);
    weight_blocks_kernel<T><<<dim3(unsigned(tiles), unsigned(p.num_rects)), kVectorBlock, 0, stream>>>(
        static_cast<const T*>(w), static_cast<T*>(wbuf), p, view, read_along_o);
  });
}

cudaError_t launch_gather_output(CudaDType dtype, const void* grad, void* prod, const PackPlan& p,
                                 cudaStream_t stream) {
  if (p.num_rects == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto zero) { output_blocks<decltype(zero), false>(grad, nullptr, prod, p, stream); });
}

namespace {

int64_t sum_blocks_x(const PackPlan& p) {  // the summing gather's blocks per rectangle
  int64_t largest = 0;
  for (int i = 0; i < p.num_rects; ++i) largest = std::max(largest, block_size(p, p.rects[i]));
  return std::max<int64_t>(1, std::min<int64_t>(kSumBlocksPerRect, (largest + kRows - 1) / kRows));
}

template <typename T, int V, int NV>
void gather_sum(const void* grad, void* prod, float* partial, void* bias_grad, const PackPlan& p,
                cudaStream_t stream) {
  const int64_t gx = sum_blocks_x(p);
  gather_sum_kernel<T, V, NV><<<dim3(unsigned(gx), unsigned(p.num_rects)), kVectorBlock, 0, stream>>>(
      static_cast<const T*>(grad), static_cast<T*>(prod), partial, p, p.O / V);
  bias_gradient_kernel<T><<<unsigned((p.O + kLanes - 1) / kLanes), kVectorBlock, 0, stream>>>(
      partial, gx * p.num_rects, p.O, static_cast<T*>(bias_grad));
}

// Vectors per lane of the summing gather for T: the fewest of 1, 2, 4, ... that cover O, or 0 when it
// cannot serve (float64, O past kLanes * kSumFloats or not whole 16-byte vectors, misaligned pointers).
template <typename T>
int sum_vectors(const void* grad, const void* prod, const PackPlan& p) {
  constexpr int V = 16 / sizeof(T);
  if (sizeof(T) == 8 || p.O <= 0 || p.O % V != 0 || p.O > int64_t(kLanes) * kSumFloats) return 0;
  if (!aligned(grad, 16) || !aligned(prod, 16)) return 0;
  int nv = 1;
  while (int64_t(nv) * kLanes * V < p.O) nv *= 2;
  return nv;
}

}  // namespace

int64_t gather_sum_workspace(CudaDType dtype, const void* grad, const void* prod, const PackPlan& p) {
  if (p.num_rects == 0) return 0;
  int nv = 0;
  switch (dtype) {
    case CudaDType::kFloat32: nv = sum_vectors<float>(grad, prod, p); break;
    case CudaDType::kBFloat16: nv = sum_vectors<__nv_bfloat16>(grad, prod, p); break;
    case CudaDType::kFloat16: nv = sum_vectors<__half>(grad, prod, p); break;
    case CudaDType::kFloat64: break;
  }
  return nv == 0 ? 0 : sum_blocks_x(p) * p.num_rects * p.O;
}

cudaError_t launch_gather_output_sum(CudaDType dtype, const void* grad, void* prod, float* workspace,
                                     void* bias_grad, const PackPlan& p, cudaStream_t stream) {
  const auto launch = [&](auto zero) {
    using T = decltype(zero);
    constexpr int V = 16 / sizeof(T);
    switch (sum_vectors<T>(grad, prod, p)) {  // NV * V <= kSumFloats: sum_vectors returns no more than that
      case 1: gather_sum<T, V, 1>(grad, prod, workspace, bias_grad, p, stream); return cudaGetLastError();
      case 2: gather_sum<T, V, 2>(grad, prod, workspace, bias_grad, p, stream); return cudaGetLastError();
      case 4: gather_sum<T, V, 4>(grad, prod, workspace, bias_grad, p, stream); return cudaGetLastError();
      case 8:
        if constexpr (8 * V <= kSumFloats) {
          gather_sum<T, V, 8>(grad, prod, workspace, bias_grad, p, stream);
          return cudaGetLastError();
        }
        break;
      default: break;
    }
    return cudaErrorInvalidValue;  // gather_sum_workspace said 0: the caller must gather and sum apart
  };
  switch (dtype) {
    case CudaDType::kFloat32: return launch(float{});
    case CudaDType::kBFloat16: return launch(__nv_bfloat16{});
    case CudaDType::kFloat16: return launch(__half{});
    case CudaDType::kFloat64: break;
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_scatter_output(CudaDType dtype, const void* prod, const void* bias, void* out, const PackPlan& p,
                                  cudaStream_t stream) {
  if (p.num_rects == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto zero) { output_blocks<decltype(zero), true>(prod, bias, out, p, stream); });
}

cudaError_t launch_weight_gradient(CudaDType acc_dtype, const void* parts, void* acc, const PackPlan& p,
                                   bool accumulate, cudaStream_t stream) {
  const int64_t rows = p.O * p.KH * p.KW;
  if (rows == 0 || p.C == 0) return cudaSuccess;
  const unsigned blocks = unsigned(std::min<int64_t>(65535, (rows + kRows - 1) / kRows));
  if (acc_dtype == CudaDType::kFloat64) {
    weight_gradient_kernel<double><<<blocks, kVectorBlock, 0, stream>>>(static_cast<const double*>(parts),
                                                                        static_cast<double*>(acc), p, accumulate);
  } else {
    weight_gradient_kernel<float><<<blocks, kVectorBlock, 0, stream>>>(static_cast<const float*>(parts),
                                                                       static_cast<float*>(acc), p, accumulate);
  }
  return cudaGetLastError();
}

}  // namespace dilated_conv
}  // namespace attnscale
