// CUDA kernels of attnscale::dilated_conv2d (Caffe Convolution, stride 1,
// dilation d, pad p, zero padding) that skip the taps landing on padding.
// No torch headers: kernels + launchers on raw pointers (csrc/ops/dilated_conv_cuda.h).
//
// Forward and backward-data are one implicit GEMM, "dst = A (x) src":
//   dst[n, m, y, x] = bias[m] + sum_{tap, k} A[tap][m][k] * src[n, k, y + oy(tap), x + ox(tap)]
// with out-of-image src reads equal to zero.
//   forward      : m = out channel, k = in channel,  src = x,        oy = ky*d - p
//   backward-data: m = in channel,  k = out channel, src = grad_out, oy = p - ky*d
// A block computes a 64 (m) x 64 (pixels: an 8x8 patch of one image) tile and
// skips every tap whose source rows or columns for the whole patch lie in the
// padding.  Tensor-core path: nvcuda::wmma (TF32 m16n16k8 for float32,
// bf16/fp16 m16n16k16), fp32 accumulation, bias fused in the epilogue.
//
// Backward-weight is a reduction GEMM per tap,
//   grad_w[o, c, tap] = sum_{n, y, x} grad_out[n, o, y, x] * x[n, c, y + oy(tap), x + ox(tap)],
// split over 8x8 output patches (split-K).  Each split writes its own fp32
// partial sum and a second kernel adds the splits in a fixed order: no
// atomics, deterministic.  grad_bias: one block per channel, fixed-order tree
// reduction.
//
// float64 (and float32 with TF32 disabled) use plain SIMT kernels that skip
// dead taps per output element.  Every global load is bounds-checked.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>

#include "ops/dilated_conv_cuda.h"

namespace attnscale {
namespace dilated_conv {
namespace {

using namespace nvcuda;

constexpr int kThreads = 128;        // 4 warps, 2 x 2 warp grid of 32 x 32 sub-tiles
constexpr int BM = 64;               // rows of the GEMM tile (m)
constexpr int BN = 64;               // columns of the GEMM tile (pixels, or input channels for wgrad)
constexpr int BK = 16;               // reduction step
constexpr int TH = 8, TW = 8;        // spatial patch of BN pixels
constexpr int A_LD = BK + 8;         // padded leading dimensions (wmma: multiple of 8 elements,
constexpr int B_LD = BN + 8;         // 32-byte aligned fragment pointers)
constexpr int C_LD = BN + 8;
static_assert(TH * TW == BN, "patch must hold BN pixels");
static_assert((BM * BK) % kThreads == 0 && (BK * BN) % kThreads == 0, "tile loads");

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half(v); }

// Tensor-core operand traits.
template <typename T> struct Mma;
template <> struct Mma<float> {  // TF32
  using S = float;
  static constexpr int K = 8;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
  using FragC = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;
  __device__ static S cvt(float v) { return wmma::__float_to_tf32(v); }
  __device__ static S zero() { return 0.f; }
};
template <> struct Mma<__nv_bfloat16> {
  using S = __nv_bfloat16;
  static constexpr int K = 16;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major>;
  using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
  __device__ static S cvt(__nv_bfloat16 v) { return v; }
  __device__ static S zero() { return __float2bfloat16(0.f); }
};
template <> struct Mma<__half> {
  using S = __half;
  static constexpr int K = 16;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major>;
  using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
  __device__ static S cvt(__half v) { return v; }
  __device__ static S zero() { return __float2half(0.f); }
};

// A warp's share of a block's BM x BN product: the 32 x 32 piece at (wm * 32, wn * 32), four 16 x 16
// fp32 accumulator tiles.
template <typename Tr>
__device__ __forceinline__ void zero_acc(typename Tr::FragC (&acc)[2][2]) {
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);
}

// acc += As[warp's rows][0, BK) x Bs[0, BK)[warp's columns]: one staged BK slice, Tr::K at a time.
template <typename Tr>
__device__ __forceinline__ void mma_slice(const typename Tr::S* As, const typename Tr::S* Bs, int wm, int wn,
                                          typename Tr::FragC (&acc)[2][2]) {
#pragma unroll
  for (int kk = 0; kk < BK; kk += Tr::K) {
    typename Tr::FragA fa[2];
    typename Tr::FragB fb[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], As + (wm * 32 + i * 16) * A_LD + kk, A_LD);
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], Bs + kk * B_LD + wn * 32 + j * 16, B_LD);
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
  }
}

// The warp's accumulators into the block's fp32 staging tile Cs (row-major, leading dimension C_LD).
template <typename Tr>
__device__ __forceinline__ void store_acc(const typename Tr::FragC (&acc)[2][2], int wm, int wn, float* Cs) {
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(Cs + (wm * 32 + i * 16) * C_LD + wn * 32 + j * 16, acc[i][j], C_LD,
                              wmma::mem_row_major);
}

// dst = bias + A (x) src, see the file comment.
struct IgemmArgs {
  const void* src;   // (N, Kc, Hs, Ws)
  const void* a;     // [taps][M][Kc]
  const void* bias;  // (M) or null
  void* dst;         // (N, M, Hd, Wd)
  int64_t N, M, Kc, Hs, Ws, Hd, Wd, KH, KW, dilation, offset;
  int64_t sign;      // +1 forward, -1 backward-data
  int64_t tiles_y, tiles_x;
};

__device__ __forceinline__ int64_t tap_shift(const IgemmArgs& p, int64_t k) {
  return p.sign * k * p.dilation + p.offset;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) igemm_tc_kernel(IgemmArgs p) {
  using Tr = Mma<T>;
  using S = typename Tr::S;
  __shared__ __align__(32) S As[BM * A_LD];
  __shared__ __align__(32) S Bs[BK * B_LD];
  __shared__ __align__(32) float Cs[BM * C_LD];

  const T* src = static_cast<const T*>(p.src);
  const T* a = static_cast<const T*>(p.a);
  const T* bias = static_cast<const T*>(p.bias);
  T* dst = static_cast<T*>(p.dst);

  int64_t tile = blockIdx.x;
  const int64_t tx = tile % p.tiles_x;
  tile /= p.tiles_x;
  const int64_t ty = tile % p.tiles_y;
  const int64_t n = tile / p.tiles_y;
  const int64_t dy0 = ty * TH, dx0 = tx * TW;
  const int64_t dy1 = min(dy0 + TH, p.Hd), dx1 = min(dx0 + TW, p.Wd);
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * BM;
  const int tid = threadIdx.x, warp = tid / 32, wm = warp / 2, wn = warp % 2;

  typename Tr::FragC acc[2][2];
  zero_acc<Tr>(acc);

  const T* src_n = src + n * p.Kc * p.Hs * p.Ws;
  for (int64_t tap = 0; tap < p.KH * p.KW; ++tap) {
    const int64_t oy = tap_shift(p, tap / p.KW), ox = tap_shift(p, tap % p.KW);
    // Skip the tap when the whole patch reads padding (uniform over the block).
    if (dy1 - 1 + oy < 0 || dy0 + oy > p.Hs - 1 || dx1 - 1 + ox < 0 || dx0 + ox > p.Ws - 1) continue;
    const T* a_tap = a + tap * p.M * p.Kc;
    for (int64_t k0 = 0; k0 < p.Kc; k0 += BK) {
#pragma unroll
      for (int e = 0; e < BM * BK / kThreads; ++e) {
        const int idx = tid + e * kThreads, mi = idx / BK, ki = idx % BK;
        const int64_t m = m0 + mi, k = k0 + ki;
        S v = Tr::zero();
        if (m < p.M && k < p.Kc) v = Tr::cvt(a_tap[m * p.Kc + k]);
        As[mi * A_LD + ki] = v;
      }
#pragma unroll
      for (int e = 0; e < BK * BN / kThreads; ++e) {
        const int idx = tid + e * kThreads, ki = idx / BN, ni = idx % BN;
        const int64_t k = k0 + ki, dy = dy0 + ni / TW, dx = dx0 + ni % TW;
        const int64_t sy = dy + oy, sx = dx + ox;
        S v = Tr::zero();
        if (k < p.Kc && dy < p.Hd && dx < p.Wd && sy >= 0 && sy < p.Hs && sx >= 0 && sx < p.Ws)
          v = Tr::cvt(src_n[(k * p.Hs + sy) * p.Ws + sx]);
        Bs[ki * B_LD + ni] = v;
      }
      __syncthreads();
      mma_slice<Tr>(As, Bs, wm, wn, acc);
      __syncthreads();
    }
  }
  store_acc<Tr>(acc, wm, wn, Cs);
  __syncthreads();
  for (int e = 0; e < BM * BN / kThreads; ++e) {
    const int idx = tid + e * kThreads, mi = idx / BN, ni = idx % BN;
    const int64_t m = m0 + mi, dy = dy0 + ni / TW, dx = dx0 + ni % TW;
    if (m < p.M && dy < p.Hd && dx < p.Wd) {
      float v = Cs[mi * C_LD + ni];
      if (bias != nullptr) v += to_float(bias[m]);
      dst[((n * p.M + m) * p.Hd + dy) * p.Wd + dx] = from_float<T>(v);
    }
  }
}

// SIMT implicit "GEMM": one thread per dst element, dead taps skipped per element.
template <typename T>
__global__ void igemm_simt_kernel(IgemmArgs p) {
  const T* src = static_cast<const T*>(p.src);
  const T* a = static_cast<const T*>(p.a);
  const T* bias = static_cast<const T*>(p.bias);
  T* dst = static_cast<T*>(p.dst);
  const int64_t total = p.N * p.M * p.Hd * p.Wd;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t dx = idx % p.Wd, dy = (idx / p.Wd) % p.Hd, m = (idx / (p.Wd * p.Hd)) % p.M;
    const int64_t n = idx / (p.Wd * p.Hd * p.M);
    T acc = bias != nullptr ? bias[m] : T(0);
    for (int64_t tap = 0; tap < p.KH * p.KW; ++tap) {
      const int64_t sy = dy + tap_shift(p, tap / p.KW), sx = dx + tap_shift(p, tap % p.KW);
      if (sy < 0 || sy >= p.Hs || sx < 0 || sx >= p.Ws) continue;
      const T* a_row = a + (tap * p.M + m) * p.Kc;
      const T* s = src + ((n * p.Kc) * p.Hs + sy) * p.Ws + sx;
      for (int64_t k = 0; k < p.Kc; ++k) acc += a_row[k] * s[k * p.Hs * p.Ws];
    }
    dst[idx] = acc;
  }
}

// grad_w partial sums: partial[split][tap][o][c].
struct WgradArgs {
  const void* gout;  // (N, O, Ho, Wo)
  const void* x;     // (N, C, H, W)
  float* partial;
  int64_t N, O, C, H, W, Ho, Wo, KH, KW, dilation, padding;
  int64_t tiles_y, tiles_x, ctiles, splits;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) wgrad_tc_kernel(WgradArgs p) {
  using Tr = Mma<T>;
  using S = typename Tr::S;
  __shared__ __align__(32) S As[BM * A_LD];
  __shared__ __align__(32) S Bs[BK * B_LD];
  __shared__ __align__(32) float Cs[BM * C_LD];

  const T* gout = static_cast<const T*>(p.gout);
  const T* x = static_cast<const T*>(p.x);
  const int64_t o0 = (blockIdx.x / p.ctiles) * int64_t(BM), c0 = (blockIdx.x % p.ctiles) * int64_t(BN);
  const int64_t tap = blockIdx.y, split = blockIdx.z, taps = p.KH * p.KW;
  const int64_t oy = (tap / p.KW) * p.dilation - p.padding, ox = (tap % p.KW) * p.dilation - p.padding;
  const int tid = threadIdx.x, warp = tid / 32, wm = warp / 2, wn = warp % 2;

  typename Tr::FragC acc[2][2];
  zero_acc<Tr>(acc);

  const int64_t total_tiles = p.N * p.tiles_y * p.tiles_x;
  for (int64_t t = split; t < total_tiles; t += p.splits) {
    const int64_t tx = t % p.tiles_x, ty = (t / p.tiles_x) % p.tiles_y, n = t / (p.tiles_x * p.tiles_y);
    const int64_t dy0 = ty * TH, dx0 = tx * TW;
    const int64_t dy1 = min(dy0 + TH, p.Ho), dx1 = min(dx0 + TW, p.Wo);
    if (dy1 - 1 + oy < 0 || dy0 + oy > p.H - 1 || dx1 - 1 + ox < 0 || dx0 + ox > p.W - 1) continue;
    for (int sub = 0; sub < TH * TW; sub += BK) {  // BK pixels of the patch per step
#pragma unroll
      for (int e = 0; e < BM * BK / kThreads; ++e) {  // As[o][pixel] = grad_out
        const int idx = tid + e * kThreads, mi = idx / BK, ki = idx % BK;
        const int64_t o = o0 + mi, dy = dy0 + (sub + ki) / TW, dx = dx0 + (sub + ki) % TW;
        S v = Tr::zero();
        if (o < p.O && dy < p.Ho && dx < p.Wo) v = Tr::cvt(gout[((n * p.O + o) * p.Ho + dy) * p.Wo + dx]);
        As[mi * A_LD + ki] = v;
      }
#pragma unroll
      for (int e = 0; e < BK * BN / kThreads; ++e) {  // Bs[pixel][c] = x at the tap's source position
        const int idx = tid + e * kThreads, ni = idx / BK, ki = idx % BK;
        const int64_t c = c0 + ni, dy = dy0 + (sub + ki) / TW, dx = dx0 + (sub + ki) % TW;
        const int64_t sy = dy + oy, sx = dx + ox;
        S v = Tr::zero();
        if (c < p.C && dy < p.Ho && dx < p.Wo && sy >= 0 && sy < p.H && sx >= 0 && sx < p.W)
          v = Tr::cvt(x[((n * p.C + c) * p.H + sy) * p.W + sx]);
        Bs[ki * B_LD + ni] = v;
      }
      __syncthreads();
      mma_slice<Tr>(As, Bs, wm, wn, acc);
      __syncthreads();
    }
  }
  store_acc<Tr>(acc, wm, wn, Cs);
  __syncthreads();
  float* out = p.partial + (split * taps + tap) * p.O * p.C;
  for (int e = 0; e < BM * BN / kThreads; ++e) {
    const int idx = tid + e * kThreads, mi = idx / BN, ni = idx % BN;
    const int64_t o = o0 + mi, c = c0 + ni;
    if (o < p.O && c < p.C) out[o * p.C + c] = Cs[mi * C_LD + ni];
  }
}

// grad_w[o][c][tap] = sum over splits (fixed order) of partial[split][tap][o][c].
template <typename T>
__global__ void wgrad_reduce_kernel(const float* partial, T* grad_w, int64_t O, int64_t C, int64_t taps,
                                    int64_t splits) {
  const int64_t total = O * C * taps;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t tap = idx % taps, c = (idx / taps) % C, o = idx / (taps * C);
    float s = 0.f;
    for (int64_t k = 0; k < splits; ++k) s += partial[((k * taps + tap) * O + o) * C + c];
    grad_w[idx] = from_float<T>(s);
  }
}

// SIMT grad_w: one thread per weight element, summing only the live output positions of its tap.
template <typename T>
__global__ void wgrad_simt_kernel(const T* gout, const T* x, T* grad_w, int64_t N, int64_t O, int64_t C,
                                  int64_t H, int64_t W, int64_t Ho, int64_t Wo, int64_t KH, int64_t KW,
                                  int64_t dilation, int64_t padding) {
  const int64_t total = O * C * KH * KW;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t kx = idx % KW, ky = (idx / KW) % KH, c = (idx / (KW * KH)) % C, o = idx / (KW * KH * C);
    const int64_t oy = ky * dilation - padding, ox = kx * dilation - padding;
    const int64_t y0 = max(int64_t(0), -oy), y1 = min(Ho, H - oy);
    const int64_t x0 = max(int64_t(0), -ox), x1 = min(Wo, W - ox);
    T acc = T(0);
    for (int64_t n = 0; n < N; ++n) {
      const T* g = gout + (n * O + o) * Ho * Wo;
      const T* xs = x + (n * C + c) * H * W;
      for (int64_t y = y0; y < y1; ++y)
        for (int64_t xx = x0; xx < x1; ++xx) acc += g[y * Wo + xx] * xs[(y + oy) * W + xx + ox];
    }
    grad_w[idx] = acc;
  }
}

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ double from_acc(double v, double*) { return v; }
template <typename T> __device__ __forceinline__ T from_acc(float v, T*) { return from_float<T>(v); }

constexpr int kBiasThreads = 256;

// grad_b[o] = sum_{n, y, x} grad_out[n, o, y, x]; one block per channel, fixed-order tree reduction.
template <typename T>
__global__ void __launch_bounds__(kBiasThreads) bias_grad_kernel(const T* gout, T* grad_b, int64_t N, int64_t O,
                                                                  int64_t HW) {
  using Acc = typename AccOf<T>::type;
  __shared__ Acc red[kBiasThreads];
  const int64_t o = blockIdx.x;
  Acc s = Acc(0);
  for (int64_t i = threadIdx.x; i < N * HW; i += kBiasThreads) {
    const int64_t n = i / HW, j = i % HW;
    s += to_acc(gout[(n * O + o) * HW + j]);
  }
  red[threadIdx.x] = s;
  __syncthreads();
  for (int stride = kBiasThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) red[threadIdx.x] += red[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) grad_b[o] = from_acc(red[0], static_cast<T*>(nullptr));
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int simt_blocks(int64_t total, int threads) {
  const int64_t b = ceil_div(total, threads);
  return static_cast<int>(b < (int64_t(1) << 20) ? (b > 0 ? b : 1) : (int64_t(1) << 20));
}

template <typename T>
cudaError_t run_igemm(const IgemmArgs& p, bool tensor_cores, cudaStream_t stream) {
  if (tensor_cores) {
    const int64_t gx = p.N * p.tiles_y * p.tiles_x, gy = ceil_div(p.M, BM);
    if (gx > 2147483647LL || gy > 65535) return cudaErrorInvalidConfiguration;
    igemm_tc_kernel<T><<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), kThreads, 0, stream>>>(p);
  } else {
    return cudaErrorInvalidValue;  // tensor-core types only reach here with tensor_cores
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t run_igemm_simt(const IgemmArgs& p, cudaStream_t stream) {
  igemm_simt_kernel<T><<<simt_blocks(p.N * p.M * p.Hd * p.Wd, 256), 256, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t dispatch_igemm(CudaDType dtype, const IgemmArgs& p, bool tensor_cores, cudaStream_t stream) {
  if (p.N == 0 || p.M == 0 || p.Hd == 0 || p.Wd == 0) return cudaSuccess;
  switch (dtype) {
    case CudaDType::kFloat32:
      return tensor_cores ? run_igemm<float>(p, true, stream) : run_igemm_simt<float>(p, stream);
    case CudaDType::kFloat64:
      return run_igemm_simt<double>(p, stream);
    case CudaDType::kBFloat16:
      return run_igemm<__nv_bfloat16>(p, true, stream);
    case CudaDType::kFloat16:
      return run_igemm<__half>(p, true, stream);
  }
  return cudaErrorInvalidValue;
}

bool uses_tensor_cores(CudaDType dtype, bool tensor_cores) {
  return dtype == CudaDType::kBFloat16 || dtype == CudaDType::kFloat16 ||
         (dtype == CudaDType::kFloat32 && tensor_cores);
}

// Split-K factor of the tensor-core grad_w kernel: enough blocks to fill the GPU,
// workspace capped at 256 MiB.
int64_t wgrad_splits(const ConvShape& s) {
  const int64_t taps = s.KH * s.KW;
  const int64_t base = ceil_div(s.O, BM) * ceil_div(s.C, BN) * taps;
  const int64_t tiles = s.N * ceil_div(s.Ho, TH) * ceil_div(s.Wo, TW);
  if (base == 0 || tiles == 0) return 1;  // empty weight or output: nothing to split
  int64_t splits = ceil_div(1024, base);
  if (splits > tiles) splits = tiles;
  const int64_t cap = (int64_t(256) << 20) / int64_t(sizeof(float)) / (taps * s.O * s.C > 0 ? taps * s.O * s.C : 1);
  if (splits > cap) splits = cap;
  if (splits > 65535) splits = 65535;
  return splits < 1 ? 1 : splits;
}

template <typename T>
cudaError_t run_wgrad_tc(const T* gout, const T* x, T* grad_w, float* workspace, const ConvShape& s,
                         cudaStream_t stream) {
  WgradArgs p{gout, x, workspace, s.N, s.O, s.C, s.H, s.W, s.Ho, s.Wo, s.KH, s.KW, s.dilation, s.padding,
              ceil_div(s.Ho, TH), ceil_div(s.Wo, TW), ceil_div(s.C, BN), wgrad_splits(s)};
  const int64_t gx = ceil_div(s.O, BM) * p.ctiles, taps = s.KH * s.KW;
  if (gx > 2147483647LL || taps > 65535) return cudaErrorInvalidConfiguration;
  wgrad_tc_kernel<T><<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(taps), static_cast<unsigned>(p.splits)),
                       kThreads, 0, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  wgrad_reduce_kernel<T><<<simt_blocks(s.O * s.C * taps, 256), 256, 0, stream>>>(workspace, grad_w, s.O, s.C,
                                                                                 taps, p.splits);
  return cudaGetLastError();
}

template <typename T>
cudaError_t run_wgrad_simt(const T* gout, const T* x, T* grad_w, const ConvShape& s, cudaStream_t stream) {
  wgrad_simt_kernel<T><<<simt_blocks(s.O * s.C * s.KH * s.KW, 256), 256, 0, stream>>>(
      gout, x, grad_w, s.N, s.O, s.C, s.H, s.W, s.Ho, s.Wo, s.KH, s.KW, s.dilation, s.padding);
  return cudaGetLastError();
}

template <typename T>
cudaError_t run_bias_grad(const T* gout, T* grad_b, const ConvShape& s, cudaStream_t stream) {
  if (grad_b == nullptr || s.O == 0) return cudaSuccess;
  if (s.O > 2147483647LL) return cudaErrorInvalidConfiguration;
  bias_grad_kernel<T><<<static_cast<unsigned>(s.O), kBiasThreads, 0, stream>>>(gout, grad_b, s.N, s.O, s.Ho * s.Wo);
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_weight_typed(const void* gout, const void* x, void* grad_w, void* grad_b, float* workspace,
                                  const ConvShape& s, bool tc, cudaStream_t stream) {
  const T* g = static_cast<const T*>(gout);
  const T* xs = static_cast<const T*>(x);
  cudaError_t err = cudaSuccess;
  if (s.O * s.C * s.KH * s.KW > 0) {
    err = tc ? run_wgrad_tc<T>(g, xs, static_cast<T*>(grad_w), workspace, s, stream)
             : run_wgrad_simt<T>(g, xs, static_cast<T*>(grad_w), s, stream);
    if (err != cudaSuccess) return err;
  }
  return run_bias_grad<T>(g, static_cast<T*>(grad_b), s, stream);
}

// run_wgrad_tc has no double instantiation (no double tensor cores).
template <>
cudaError_t backward_weight_typed<double>(const void* gout, const void* x, void* grad_w, void* grad_b,
                                          float*, const ConvShape& s, bool, cudaStream_t stream) {
  const double* g = static_cast<const double*>(gout);
  cudaError_t err = cudaSuccess;
  if (s.O * s.C * s.KH * s.KW > 0) {
    err = run_wgrad_simt<double>(g, static_cast<const double*>(x), static_cast<double*>(grad_w), s, stream);
    if (err != cudaSuccess) return err;
  }
  return run_bias_grad<double>(g, static_cast<double*>(grad_b), s, stream);
}

// bf16 / fp16 have no SIMT wgrad instantiation: they always take the tensor-core path.
template <typename T>
cudaError_t backward_weight_tc_only(const void* gout, const void* x, void* grad_w, void* grad_b, float* workspace,
                                    const ConvShape& s, cudaStream_t stream) {
  const T* g = static_cast<const T*>(gout);
  if (s.O * s.C * s.KH * s.KW > 0) {
    cudaError_t err = run_wgrad_tc<T>(g, static_cast<const T*>(x), static_cast<T*>(grad_w), workspace, s, stream);
    if (err != cudaSuccess) return err;
  }
  return run_bias_grad<T>(g, static_cast<T*>(grad_b), s, stream);
}

}  // namespace

cudaError_t launch_dilated_conv_forward(CudaDType dtype, const void* x, const void* wpack, const void* bias,
                                        void* out, const ConvShape& s, bool tensor_cores, cudaStream_t stream) {
  IgemmArgs p{x, wpack, bias, out, s.N, s.O, s.C, s.H, s.W, s.Ho, s.Wo, s.KH, s.KW, s.dilation, -s.padding,
              +1, ceil_div(s.Ho, TH), ceil_div(s.Wo, TW)};
  return dispatch_igemm(dtype, p, tensor_cores, stream);
}

cudaError_t launch_dilated_conv_backward_input(CudaDType dtype, const void* grad_out, const void* wpack_t,
                                               void* grad_x, const ConvShape& s, bool tensor_cores,
                                               cudaStream_t stream) {
  IgemmArgs p{grad_out, wpack_t, nullptr, grad_x, s.N, s.C, s.O, s.Ho, s.Wo, s.H, s.W, s.KH, s.KW, s.dilation,
              +s.padding, -1, ceil_div(s.H, TH), ceil_div(s.W, TW)};
  return dispatch_igemm(dtype, p, tensor_cores, stream);
}

int64_t dilated_conv_backward_weight_workspace(const ConvShape& s, CudaDType dtype, bool tensor_cores) {
  if (!uses_tensor_cores(dtype, tensor_cores)) return 0;
  return wgrad_splits(s) * s.KH * s.KW * s.O * s.C;
}

cudaError_t launch_dilated_conv_backward_weight(CudaDType dtype, const void* grad_out, const void* x,
                                                void* grad_w, void* grad_b, float* workspace,
                                                const ConvShape& s, bool tensor_cores, cudaStream_t stream) {
  const bool tc = uses_tensor_cores(dtype, tensor_cores);
  if (tc && workspace == nullptr && dilated_conv_backward_weight_workspace(s, dtype, tensor_cores) > 0)
    return cudaErrorInvalidValue;
  switch (dtype) {
    case CudaDType::kFloat32:
      return backward_weight_typed<float>(grad_out, x, grad_w, grad_b, workspace, s, tc, stream);
    case CudaDType::kFloat64:
      return backward_weight_typed<double>(grad_out, x, grad_w, grad_b, workspace, s, false, stream);
    case CudaDType::kBFloat16:
      return backward_weight_tc_only<__nv_bfloat16>(grad_out, x, grad_w, grad_b, workspace, s, stream);
    case CudaDType::kFloat16:
      return backward_weight_tc_only<__half>(grad_out, x, grad_w, grad_b, workspace, s, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace dilated_conv
}  // namespace attnscale
