// CUDA kernels of attnscale::bias_relu (a convolution's bias + ReLU in one pass) and bias_relu_backward
// (the masked gradient and the bias gradient's reduction in one pass, then a small deterministic sum).
//
// No torch headers: raw pointers, sizes and a cudaStream_t (see ops/bias_relu_cuda.h).  16-byte vectors
// along the channels (channels_last) or the pixels (NCHW) where the sizes and pointers allow.  Half types
// are added and summed in float (double for double), rounded once.  The dropout of training (p > 0) is drawn
// in the forward kernel (Philox4x32-10 of the seed and the element's index, ops/philox.h: the CPU kernel's
// mask) and not stored: the backward knows a dropped unit by its zero output.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "ops/bias_relu_cuda.h"
#include "ops/cuda/kernel_common.cuh"
#include "ops/philox.h"

namespace attnscale {
namespace bias_relu {
namespace cuda {
namespace {

using cuda_common::AccOf;
using cuda_common::from_acc;
using cuda_common::grid_for;
using cuda_common::kThreads;
using cuda_common::to_acc;
using cuda_common::Vec;

// the bias in T: a float32 bias of a half-type x rounded to nearest (what autocast's cast gives)
template <typename T, typename B>
__device__ __forceinline__ T bias_in(B b) {
  return from_acc<T>(to_acc(b));
}

// relu(x + b): the sum rounded to T (PyTorch's bias add), then torch.relu's value (NaN stays NaN)
template <typename T>
__device__ __forceinline__ T add_relu(T x, T b) {
  const T t = from_acc<T>(to_acc(x) + to_acc(b));
  const auto f = to_acc(t);
  return (f > 0 || f != f) ? t : from_acc<T>(0);
}

// word i of a Philox block, i in 0..3 (a select, not an indexed local array)
__device__ __forceinline__ uint32_t word(const philox::Words& r, int64_t i) {
  const int k = static_cast<int>(i & 3);
  return k == 0 ? r.w[0] : k == 1 ? r.w[1] : k == 2 ? r.w[2] : r.w[3];
}

// DROP: element e kept (times scale, rounded to T) when Philox's word for e is >= threshold, else 0.
template <typename T, typename B, int V, bool NHWC, bool DROP>
__global__ void __launch_bounds__(kThreads) forward_kernel(const T* __restrict__ x, const B* __restrict__ bias,
                                                           T* __restrict__ out, int64_t nvec, int64_t C, int64_t HW,
                                                           uint64_t seed, uint32_t threshold,
                                                           typename AccOf<T>::type scale) {
  using VT = Vec<T, V>;
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < nvec;
       v += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = v * V;
    const VT xv = reinterpret_cast<const VT*>(x)[v];
    VT o;
    if (NHWC) {  // V consecutive channels (C % V == 0)
      const B* bc = bias + e % C;
#pragma unroll
      for (int i = 0; i < V; ++i) o.v[i] = add_relu(xv.v[i], bias_in<T>(bc[i]));
    } else {     // V pixels of one channel (HW % V == 0)
      const T b = bias_in<T>(bias[(e / HW) % C]);
#pragma unroll
      for (int i = 0; i < V; ++i) o.v[i] = add_relu(xv.v[i], b);
    }
    if (DROP) {  // V is a power of two: elements e .. e + V - 1 lie in V / 4 whole blocks, or in one
      constexpr int kBlocks = V >= 4 ? V / 4 : 1;
#pragma unroll
      for (int j = 0; j < kBlocks; ++j) {
        const philox::Words r = philox::block(seed, static_cast<uint64_t>(e / 4 + j));
#pragma unroll
        for (int k = 0; k < (V >= 4 ? 4 : V); ++k) {
          T& y = o.v[j * 4 + k];
          y = word(r, e + j * 4 + k) >= threshold ? from_acc<T>(to_acc(y) * scale) : from_acc<T>(0);
        }
      }
    }
    reinterpret_cast<VT*>(out)[v] = o;
  }
}

// F.relu's backward on the saved output: out <= 0 ? 0 : g (NaN passes g), times F.dropout's scale (1 / (1 - p):
// out is 0 where the unit was dropped; 1 without dropout, exact)
template <typename T>
__device__ __forceinline__ T masked(T g, T o, typename AccOf<T>::type scale) {
  return to_acc(o) <= 0 ? from_acc<T>(0) : from_acc<T>(to_acc(g) * scale);
}

// channels_last: rows (n, h, w) of C channels.  Block (bx, by): bx vector columns of one chunk of channels
// (blockIdx.y), by threads down the rows of one span (blockIdx.x); each thread sums its columns over its
// rows, then the block adds its by partial rows in order (a thread per channel) and writes one partial per
// channel: partial[blockIdx.x][c].
template <typename T, int V>
__global__ void __launch_bounds__(kThreads) backward_nhwc_kernel(const T* __restrict__ g, const T* __restrict__ out,
                                                                 T* __restrict__ gx,
                                                                 typename AccOf<T>::type* __restrict__ partial,
                                                                 int64_t M, int64_t C, int64_t span,
                                                                 typename AccOf<T>::type scale) {
  using A = typename AccOf<T>::type;
  using VT = Vec<T, V>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* smem = reinterpret_cast<A*>(smem_raw);  // [blockDim.y][blockDim.x * V]
  const int64_t vc = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t VC = C / V;
  A acc[V];
#pragma unroll
  for (int i = 0; i < V; ++i) acc[i] = 0;
  if (vc < VC) {
    const int64_t r0 = static_cast<int64_t>(blockIdx.x) * span;
    const int64_t r1 = r0 + span < M ? r0 + span : M;
    for (int64_t r = r0 + threadIdx.y; r < r1; r += blockDim.y) {
      const int64_t v = r * VC + vc;
      const VT gv = reinterpret_cast<const VT*>(g)[v];
      const VT ov = reinterpret_cast<const VT*>(out)[v];
      VT xv;
#pragma unroll
      for (int i = 0; i < V; ++i) {
        xv.v[i] = masked(gv.v[i], ov.v[i], scale);
        acc[i] += to_acc(xv.v[i]);
      }
      reinterpret_cast<VT*>(gx)[v] = xv;
    }
  }
  const int width = blockDim.x * V;  // channels of this chunk
#pragma unroll
  for (int i = 0; i < V; ++i) smem[threadIdx.y * width + threadIdx.x * V + i] = acc[i];
  __syncthreads();
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * width;
  for (int col = threadIdx.y * blockDim.x + threadIdx.x; col < width && c0 + col < C;
       col += blockDim.x * blockDim.y) {
    A s = 0;
    for (int y = 0; y < static_cast<int>(blockDim.y); ++y) s += smem[y * width + col];
    partial[static_cast<int64_t>(blockIdx.x) * C + c0 + col] = s;
  }
}

// NCHW: a block per chunk of one (n, c) plane; its sum (warp shuffles, then the warps in order) is one
// partial of channel c: partial[n * chunks + chunk][c].
template <typename T, int V>
__global__ void __launch_bounds__(kThreads) backward_nchw_kernel(const T* __restrict__ g, const T* __restrict__ out,
                                                                 T* __restrict__ gx,
                                                                 typename AccOf<T>::type* __restrict__ partial,
                                                                 int64_t N, int64_t C, int64_t HW, int chunks,
                                                                 int64_t span, typename AccOf<T>::type scale) {
  using A = typename AccOf<T>::type;
  using VT = Vec<T, V>;
  __shared__ A warp_sums[kThreads / 32];
  const int64_t plane = blockIdx.x / chunks;
  const int chunk = static_cast<int>(blockIdx.x % chunks);
  const int64_t n = plane / C, c = plane % C;
  const int64_t hwv = HW / V;
  const int64_t v0 = chunk * span, v1 = v0 + span < hwv ? v0 + span : hwv;
  A acc = 0;
  for (int64_t v = v0 + threadIdx.x; v < v1; v += blockDim.x) {
    const int64_t q = plane * hwv + v;
    const VT gv = reinterpret_cast<const VT*>(g)[q];
    const VT ov = reinterpret_cast<const VT*>(out)[q];
    VT xv;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      xv.v[i] = masked(gv.v[i], ov.v[i], scale);
      acc += to_acc(xv.v[i]);
    }
    reinterpret_cast<VT*>(gx)[q] = xv;
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    A s = 0;
    for (int w = 0; w < kThreads / 32; ++w) s += warp_sums[w];
    partial[(n * chunks + chunk) * C + c] = s;
  }
}

// gbias[c] = the sum over k of partial[k][c]: a block per 32 channels, kSumLanes threads per channel each
// summing every kSumLanes-th partial (coalesced across the channels), then the lanes added in order; stored
// in the bias's type B (a float32 bias of a half-type map gets the float sum unrounded).
constexpr int kSumLanes = 16;

template <typename T, typename B>
__global__ void __launch_bounds__(32 * kSumLanes) bias_sum_kernel(const typename AccOf<T>::type* __restrict__ partial,
                                                                  B* __restrict__ gbias, int64_t C, int64_t K) {
  using A = typename AccOf<T>::type;
  __shared__ A lanes[kSumLanes][32];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  A s = 0;
  if (c < C)
    for (int64_t k = threadIdx.y; k < K; k += kSumLanes) s += partial[k * C + c];
  lanes[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    A t = 0;
#pragma unroll
    for (int y = 0; y < kSumLanes; ++y) t += lanes[y][threadIdx.x];
    gbias[c] = from_acc<B>(t);
  }
}

int elem_size(DType d) {
  return d == DType::kFloat64 ? 8 : d == DType::kFloat32 ? 4 : 2;
}

template <typename T, typename B, int V, bool NHWC>
void forward_launch(const T* xp, const B* bp, T* op, int64_t nvec, int64_t C, int64_t HW, bool drop, uint64_t seed,
                    uint32_t threshold, typename AccOf<T>::type scale, cudaStream_t stream) {
  const dim3 grid = grid_for(nvec);
  if (drop)
    forward_kernel<T, B, V, NHWC, true><<<grid, kThreads, 0, stream>>>(xp, bp, op, nvec, C, HW, seed, threshold, scale);
  else
    forward_kernel<T, B, V, NHWC, false><<<grid, kThreads, 0, stream>>>(xp, bp, op, nvec, C, HW, seed, threshold, scale);
}

template <typename T, typename B>
cudaError_t forward_with(const T* xp, const B* bp, T* op, int64_t total, int64_t C, int64_t HW, bool nhwc,
                         bool aligned16, double p, uint64_t seed, cudaStream_t stream) {
  constexpr int VM = 16 / sizeof(T);
  using A = typename AccOf<T>::type;
  const bool vec = aligned16 && (nhwc ? C % VM == 0 : HW % VM == 0);
  const int64_t nvec = vec ? total / VM : total;
  const philox::Dropout d = philox::dropout(p);
  const A scale = static_cast<A>(d.scale);
  if (nhwc) {
    if (vec)
      forward_launch<T, B, VM, true>(xp, bp, op, nvec, C, HW, d.on, seed, d.threshold, scale, stream);
    else
      forward_launch<T, B, 1, true>(xp, bp, op, nvec, C, HW, d.on, seed, d.threshold, scale, stream);
  } else {
    if (vec)
      forward_launch<T, B, VM, false>(xp, bp, op, nvec, C, HW, d.on, seed, d.threshold, scale, stream);
    else
      forward_launch<T, B, 1, false>(xp, bp, op, nvec, C, HW, d.on, seed, d.threshold, scale, stream);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t forward_typed(const void* x, const void* bias, void* out, int64_t N, int64_t C, int64_t HW, bool nhwc,
                          bool aligned16, bool bias_float32, double p, uint64_t seed, cudaStream_t stream) {
  const int64_t total = N * C * HW;
  if (total == 0) return cudaSuccess;
  const T* xp = static_cast<const T*>(x);
  T* op = static_cast<T*>(out);
  if (bias_float32)
    return forward_with<T, float>(xp, static_cast<const float*>(bias), op, total, C, HW, nhwc, aligned16, p, seed,
                                  stream);
  return forward_with<T, T>(xp, static_cast<const T*>(bias), op, total, C, HW, nhwc, aligned16, p, seed, stream);
}

template <typename T, int V>
cudaError_t backward_vec(const BackwardPlan& p, const T* g, const T* out, T* gx, void* gbias, bool bias_float32,
                         typename AccOf<T>::type* partial, int64_t N, int64_t C, int64_t HW, bool nhwc,
                         double scale_in, cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  const A scale = static_cast<A>(scale_in);
  if (nhwc) {
    const dim3 block(p.block_x, p.block_y);
    const dim3 grid(static_cast<unsigned>(p.grid_x), static_cast<unsigned>(p.grid_y));
    const size_t smem = static_cast<size_t>(p.block_x) * p.block_y * V * sizeof(A);
    backward_nhwc_kernel<T, V><<<grid, block, smem, stream>>>(g, out, gx, partial, N * HW, C, p.span, scale);
  } else {
    backward_nchw_kernel<T, V><<<static_cast<unsigned>(p.grid_x), kThreads, 0, stream>>>(g, out, gx, partial, N, C,
                                                                                         HW, p.chunks, p.span, scale);
  }
  if (cudaPeekAtLastError() != cudaSuccess) return cudaGetLastError();
  const dim3 sum_grid(static_cast<unsigned>((C + 31) / 32)), sum_block(32, kSumLanes);
  if (bias_float32)
    bias_sum_kernel<T, float><<<sum_grid, sum_block, 0, stream>>>(partial, static_cast<float*>(gbias), C, p.partials);
  else
    bias_sum_kernel<T, T><<<sum_grid, sum_block, 0, stream>>>(partial, static_cast<T*>(gbias), C, p.partials);
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_typed(const BackwardPlan& p, const void* g, const void* out, void* gx, void* gbias,
                           bool bias_float32, void* workspace, int64_t N, int64_t C, int64_t HW, bool nhwc,
                           double scale, cudaStream_t stream) {
  constexpr int VM = 16 / sizeof(T);
  using A = typename AccOf<T>::type;
  const T* gp = static_cast<const T*>(g);
  const T* op = static_cast<const T*>(out);
  T* xp = static_cast<T*>(gx);
  A* partial = static_cast<A*>(workspace);
  if (p.vec == VM) return backward_vec<T, VM>(p, gp, op, xp, gbias, bias_float32, partial, N, C, HW, nhwc, scale, stream);
  if (p.vec == 1) return backward_vec<T, 1>(p, gp, op, xp, gbias, bias_float32, partial, N, C, HW, nhwc, scale, stream);
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_forward(DType dtype, const void* x, const void* bias, bool bias_float32, void* out, int64_t N,
                           int64_t C, int64_t HW, bool channels_last, bool aligned16, double p, uint64_t seed,
                           cudaStream_t stream) {
  ATTNSCALE_DISPATCH_DTYPE(dtype, forward_typed, x, bias, out, N, C, HW, channels_last, aligned16, bias_float32, p,
                           seed, stream);
}

BackwardPlan plan_backward(DType dtype, int64_t N, int64_t C, int64_t HW, bool channels_last, bool aligned16) {
  BackwardPlan p;
  const int vm = 16 / elem_size(dtype);
  const size_t acc_bytes = dtype == DType::kFloat64 ? 8 : 4;
  constexpr int64_t kTargetBlocks = 1024;  // enough blocks to fill an H100 several times over
  if (channels_last) {
    p.vec = (aligned16 && C % vm == 0) ? vm : 1;
    const int64_t vc = C / p.vec, M = N * HW;
    p.block_x = static_cast<int>(std::min<int64_t>(vc, 32));
    p.block_y = kThreads / p.block_x;
    p.grid_y = (vc + p.block_x - 1) / p.block_x;
    // at least 4 rows per thread; about kTargetBlocks blocks in all
    int64_t blocks = std::min<int64_t>((M + 4 * p.block_y - 1) / (4 * p.block_y),
                                       std::max<int64_t>(1, kTargetBlocks / p.grid_y));
    blocks = std::max<int64_t>(blocks, 1);
    p.span = (M + blocks - 1) / blocks;
    p.grid_x = (M + p.span - 1) / p.span;
    p.partials = p.grid_x;
  } else {
    p.vec = (aligned16 && HW % vm == 0) ? vm : 1;
    const int64_t hwv = HW / p.vec, planes = N * C;
    int64_t chunks = planes >= kTargetBlocks
                         ? 1
                         : std::min<int64_t>((hwv + 4 * kThreads - 1) / (4 * kThreads),
                                             (kTargetBlocks + planes - 1) / planes);
    chunks = std::max<int64_t>(chunks, 1);
    p.span = (hwv + chunks - 1) / chunks;
    p.chunks = static_cast<int>((hwv + p.span - 1) / p.span);
    p.block_x = kThreads;
    p.block_y = 1;
    p.grid_x = planes * p.chunks;
    p.grid_y = 1;
    p.partials = N * p.chunks;
  }
  p.workspace_bytes = static_cast<size_t>(p.partials) * static_cast<size_t>(C) * acc_bytes;
  return p;
}

cudaError_t launch_backward(const BackwardPlan& plan, DType dtype, const void* g, const void* out, void* gx,
                            void* gbias, bool bias_float32, void* workspace, int64_t N, int64_t C, int64_t HW,
                            bool channels_last, double scale, cudaStream_t stream) {
  ATTNSCALE_DISPATCH_DTYPE(dtype, backward_typed, plan, g, out, gx, gbias, bias_float32, workspace, N, C, HW,
                           channels_last, scale, stream);
}

}  // namespace cuda
}  // namespace bias_relu
}  // namespace attnscale
