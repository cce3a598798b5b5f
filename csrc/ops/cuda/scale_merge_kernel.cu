// CUDA kernels of attnscale::scale_merge (forward: one launch; backward: one launch).
//
// No torch headers: raw pointers, sizes and a cudaStream_t (see ops/scale_merge_cuda.h).
// Element types float, __half, __nv_bfloat16; all arithmetic in fp32.
//
// Interp follows DeepLab/Caffe exactly (ops/scale_merge_interp.h): per destination index the
// two source indices and lambdas come from the float formula, and a resized value is
//   h0l * (w0l * a + w1l * b) + h1l * (w0l * c + w1l * d)
// evaluated with __fmul_rn/__fadd_rn so that no FMA contraction makes the forward and the
// backward's recomputation (max mode re-derives the winning scale) differ by a rounding.
//
// Each kernel has two instances: for at most 3 scales (the paper's share-nets; per-scale arrays 3 long,
// 64 registers in the element layout's attention backward instead of 128, so twice the occupancy) and
// for up to kMaxScales.
//
// Forward: a thread per output pixel (n, y, x) and class chunk (blockIdx.y); the per-scale taps
// and the softmax weights are computed once per thread and reused across its classes.  In max
// mode there is one chunk, so a thread sees every class of its pixel and writes the per-scale
// fraction of classes won (the weights output) without atomics.
//
// Backward: one grid over the concatenation of every score-gradient element of every scale and
// G lanes per pixel for the logit gradient, walked from its end (the longest threads first).  The
// logit gradient is a sum over all classes at each pixel; G aligned lanes of a warp split the classes
// (lane q takes q, q + G, ...) and combine their partial sums by a butterfly of warp shuffles, the same
// fixed order in every run, so the chain of dependent loads per thread is C / G classes long.
// A coarse source element gathers from the destination pixels whose bilinear footprint touches it,
// found by inverting the same float index arithmetic (binary search over the monotone tap index),
// so there are no atomics and the summation order is fixed: deterministic.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "ops/scale_merge_cuda.h"
#include "ops/scale_merge_interp.h"

namespace attnscale {
namespace scale_merge {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kAttention = 0, kAvg = 1, kMax = 2;

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T>
struct Args {
  const T* f[kMaxScales];  // score maps
  const T* logits;         // (N, S, H0, W0) or null
  const T* gout;           // backward: (N, C, H0, W0)
  const T* gw;             // backward: (N, S, H0, W0) or null
  const float* wsaved;     // backward, attention, float32: the forward's weights (N, S, H0, W0), or null
  T* out;                  // forward: merged; unused in backward
  T* w;                    // forward: weights
  T* g[kMaxScales];        // backward: score grads
  T* glogits;              // backward: logit grad (attention)
  int S;
  int64_t N, C;
  int H[kMaxScales], W[kMaxScales];
  float ry[kMaxScales], rx[kMaxScales];  // Interp ratios (scale s -> scale 0)
  int64_t csz;                             // classes per chunk (forward; backward, pixel layout)
  int64_t kchunks;                         // backward, pixel layout: class chunks
  int64_t seg[kMaxScales + 2];             // backward: segment starts (scales, logits, end)
  int lgshift;                             // backward: log2 of the lanes per pixel of the logit gradient
};

// Per-pixel footprint of every coarser scale at destination (y, x).  MS: the most scales the kernel
// instance handles (3 for the paper's share-nets, kMaxScales otherwise): every per-scale array and
// unrolled loop is MS long, so the common case keeps its registers (and its occupancy).
template <int MS>
struct Foot {
  int o00[MS], o01[MS], o10[MS], o11[MS];
  float wy0[MS], wy1[MS], wx0[MS], wx1[MS];
};

template <typename T, int MS>
__device__ __forceinline__ void make_foot(const Args<T>& a, int y, int x, Foot<MS>& ft) {
  const int H0 = a.H[0], W0 = a.W[0];
#pragma unroll
  for (int s = 1; s < MS; ++s) {
    if (s < a.S) {
      const Tap ty = interp_tap(y, a.H[s], H0, a.ry[s]);
      const Tap tx = interp_tap(x, a.W[s], W0, a.rx[s]);
      const int Ws = a.W[s];
      ft.o00[s] = ty.i0 * Ws + tx.i0;
      ft.o01[s] = ty.i0 * Ws + tx.i1;
      ft.o10[s] = ty.i1 * Ws + tx.i0;
      ft.o11[s] = ty.i1 * Ws + tx.i1;
      ft.wy1[s] = ty.l1;
      ft.wy0[s] = __fsub_rn(1.f, ty.l1);
      ft.wx1[s] = tx.l1;
      ft.wx0[s] = __fsub_rn(1.f, tx.l1);
    }
  }
}

__device__ __forceinline__ float blend(float a, float b, float l0, float l1) {
  return __fadd_rn(__fmul_rn(l0, a), __fmul_rn(l1, b));
}

// Resized value of scale s (>= 1) of plane `plane` at the footprint's pixel.
template <typename T, int MS>
__device__ __forceinline__ float up_value(const Args<T>& a, const Foot<MS>& ft, int s, int64_t plane) {
  const T* f = a.f[s] + plane * static_cast<int64_t>(a.H[s]) * a.W[s];
  const float top = blend(to_f(f[ft.o00[s]]), to_f(f[ft.o01[s]]), ft.wx0[s], ft.wx1[s]);
  const float bot = blend(to_f(f[ft.o10[s]]), to_f(f[ft.o11[s]]), ft.wx0[s], ft.wx1[s]);
  return blend(top, bot, ft.wy0[s], ft.wy1[s]);
}

// Caffe Eltwise MAX with the CPU EltwiseLayer's rule (as the CPU kernel): scale 1 wins over scale 0
// unless scale 0 is greater (``a > b ? 0 : 1``), a later scale only if strictly greater.
template <typename T, int MS>
__device__ __forceinline__ int argmax_scale(const Args<T>& a, const Foot<MS>& ft, int64_t plane, int64_t p,
                                            float* best_out) {
  float best = to_f(a.f[0][plane * static_cast<int64_t>(a.H[0]) * a.W[0] + p]);
  int idx = 0;
#pragma unroll
  for (int s = 1; s < MS; ++s) {
    if (s < a.S) {
      const float u = up_value(a, ft, s, plane);
      if (s == 1 ? !(best > u) : u > best) {
        best = u;
        idx = s;
      }
    }
  }
  *best_out = best;
  return idx;
}

// Softmax over scales of the logits at pixel (n, p), fp32, max-subtracted.
template <typename T, int MS>
__device__ __forceinline__ void softmax_at(const Args<T>& a, int64_t n, int64_t p, float* w) {
  const int64_t P = static_cast<int64_t>(a.H[0]) * a.W[0];
  const T* l = a.logits + n * a.S * P + p;
  float m = to_f(l[0]);
#pragma unroll
  for (int s = 1; s < MS; ++s)
    if (s < a.S) m = fmaxf(m, to_f(l[s * P]));
  float sum = 0.f;
#pragma unroll
  for (int s = 0; s < MS; ++s) {
    if (s < a.S) {
      w[s] = expf(to_f(l[s * P]) - m);
      sum += w[s];
    }
  }
  const float inv = 1.f / sum;
#pragma unroll
  for (int s = 0; s < MS; ++s)
    if (s < a.S) w[s] *= inv;
}

template <typename T, int MODE, int MS>
__global__ void __launch_bounds__(kThreads) forward_kernel(const Args<T> a) {
  const int H0 = a.H[0], W0 = a.W[0];
  const int64_t P = static_cast<int64_t>(H0) * W0;
  const int64_t pix = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (pix >= a.N * P) return;
  const int64_t n = pix / P, p = pix % P;
  const int y = static_cast<int>(p / W0), x = static_cast<int>(p % W0);
  Foot<MS> ft;
  make_foot(a, y, x, ft);
  const int64_t c0 = blockIdx.y * a.csz;
  const int64_t c1 = (c0 + a.csz < a.C) ? c0 + a.csz : a.C;

  if (MODE == kMax) {
    int count[MS];
#pragma unroll
    for (int s = 0; s < MS; ++s) count[s] = 0;
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t plane = n * a.C + c;
      float best;
      const int idx = argmax_scale(a, ft, plane, p, &best);
#pragma unroll
      for (int s = 0; s < MS; ++s) count[s] += (s == idx) ? 1 : 0;
      a.out[plane * P + p] = from_f<T>(best);
    }
    const float inv_c = 1.f / static_cast<float>(a.C);
#pragma unroll
    for (int s = 0; s < MS; ++s)
      if (s < a.S) a.w[(n * a.S + s) * P + p] = from_f<T>(static_cast<float>(count[s]) * inv_c);
    return;
  }

  float w[MS];
  if (MODE == kAttention) {
    softmax_at<T, MS>(a, n, p, w);
  } else {
#pragma unroll
    for (int s = 0; s < MS; ++s) w[s] = 1.f / static_cast<float>(a.S);
  }
  if (blockIdx.y == 0) {
#pragma unroll
    for (int s = 0; s < MS; ++s)
      if (s < a.S) a.w[(n * a.S + s) * P + p] = from_f<T>(w[s]);
  }
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t plane = n * a.C + c;
    const float f0 = to_f(a.f[0][plane * P + p]);
    float acc = (MODE == kAttention) ? w[0] * f0 : f0;
#pragma unroll
    for (int s = 1; s < MS; ++s) {
      if (s < a.S) {
        const float u = up_value(a, ft, s, plane);
        acc = (MODE == kAttention) ? fmaf(w[s], u, acc) : acc + u;
      }
    }
    if (MODE == kAvg) acc = acc * (1.f / static_cast<float>(a.S));  // as the CPU kernel: times float(1/S)
    a.out[plane * P + p] = from_f<T>(acc);
  }
}

// The softmax weights at pixel (n, p) in the backward: the forward's own float32 output where the op was
// given it (the same values: written from softmax_at's registers unrounded), else recomputed by softmax_at.
template <typename T, int MS>
__device__ __forceinline__ void backward_softmax_at(const Args<T>& a, int64_t n, int64_t p, float* w) {
  if (a.wsaved != nullptr) {
    const int64_t P = static_cast<int64_t>(a.H[0]) * a.W[0];
#pragma unroll
    for (int s = 0; s < MS; ++s)
      if (s < a.S) w[s] = a.wsaved[(n * a.S + s) * P + p];
    return;
  }
  softmax_at<T, MS>(a, n, p, w);
}

// Weight of scale s at destination pixel p of item n (attention: softmax w_s; avg: 1/S).
template <typename T, int MODE, int MS>
__device__ __forceinline__ float dest_weight(const Args<T>& a, int s, int64_t n, int64_t p) {
  if (MODE == kAvg) return 1.f / static_cast<float>(a.S);  // Caffe Eltwise SUM backward: coeff * diff
  if (a.wsaved != nullptr) return a.wsaved[(n * a.S + s) * static_cast<int64_t>(a.H[0]) * a.W[0] + p];
  float w[MS];
  softmax_at<T, MS>(a, n, p, w);
  float ws = w[0];
#pragma unroll
  for (int t = 1; t < MS; ++t)
    if (t == s) ws = w[t];
  return ws;
}

// Gradient reaching scale s's resized map at destination (n, c, y, x).
template <typename T, int MODE, int MS>
__device__ __forceinline__ float dest_grad(const Args<T>& a, int s, int64_t n, int64_t plane, int y, int x) {
  const int64_t P = static_cast<int64_t>(a.H[0]) * a.W[0];
  const int64_t p = static_cast<int64_t>(y) * a.W[0] + x;
  const float g = to_f(a.gout[plane * P + p]);
  if (MODE != kMax) return g * dest_weight<T, MODE, MS>(a, s, n, p);
  Foot<MS> ft;
  make_foot(a, y, x, ft);
  float best;
  return argmax_scale(a, ft, plane, p, &best) == s ? g : 0.f;
}

// Gradient of coarse scale s's score element (plane, r, j): the weighted gather over the destination pixels
// whose bilinear footprint touches it (zero-weight taps skipped), rows then columns, a fixed order.
template <typename T, int MODE, int MS>
__device__ __forceinline__ float coarse_gather(const Args<T>& a, int s, int64_t n, int64_t plane, int r, int j) {
  const int H0 = a.H[0], W0 = a.W[0], Hs = a.H[s], Ws = a.W[s];
  int y0, y1, x0, x1;
  interp_source_range(r, Hs, H0, a.ry[s], &y0, &y1);
  interp_source_range(j, Ws, W0, a.rx[s], &x0, &x1);
  float acc = 0.f;
  for (int y = y0; y < y1; ++y) {
    const float wy = tap_weight<float>(interp_tap(y, Hs, H0, a.ry[s]), r);
    if (wy == 0.f) continue;
    float row = 0.f;
    for (int x = x0; x < x1; ++x) {
      const float wx = tap_weight<float>(interp_tap(x, Ws, W0, a.rx[s]), j);
      if (wx == 0.f) continue;
      row = fmaf(wx, dest_grad<T, MODE, MS>(a, s, n, plane, y, x), row);
    }
    acc = fmaf(wy, row, acc);
  }
  return acc;
}

// Logit gradient, element e of its segment: softmax backward of g_s = sum_c grad * up_s (+ grad_w) at a
// pixel (n, p).  The segment holds G = 2^lgshift lanes per pixel, padded to whole warps, and starts on a
// warp boundary of the reversed walk (the host pads it to a multiple of 32 and it is the first part
// walked), so every lane of a warp is here at once and the G lanes of a pixel are G aligned lanes of one
// warp: a butterfly of shuffles over them gives every lane the same sums in a fixed order.
template <typename T, int MS>
__device__ __forceinline__ void logit_grad_unit(const Args<T>& a, int64_t e) {
  const int W0 = a.W[0];
  const int64_t P = static_cast<int64_t>(a.H[0]) * W0;
  const int G = 1 << a.lgshift;
  const int64_t pix = e >> a.lgshift;
  const int q = static_cast<int>(e) & (G - 1);
  const bool live = pix < a.N * P;  // padding lanes only join the shuffles
  const int64_t n = live ? pix / P : 0, p = live ? pix % P : 0;
  float gs[MS];
#pragma unroll
  for (int t = 0; t < MS; ++t) gs[t] = 0.f;
  if (live) {
    const int y = static_cast<int>(p / W0), x = static_cast<int>(p % W0);
    Foot<MS> ft;
    make_foot(a, y, x, ft);
#pragma unroll 2
    for (int64_t c = q; c < a.C; c += G) {
      const int64_t plane = n * a.C + c;
      const float g = to_f(a.gout[plane * P + p]);
      gs[0] = fmaf(g, to_f(a.f[0][plane * P + p]), gs[0]);
#pragma unroll
      for (int t = 1; t < MS; ++t)
        if (t < a.S) gs[t] = fmaf(g, up_value(a, ft, t, plane), gs[t]);
    }
  }
  for (int o = G >> 1; o > 0; o >>= 1) {
#pragma unroll
    for (int t = 0; t < MS; ++t)
      if (t < a.S) gs[t] += __shfl_xor_sync(0xffffffffu, gs[t], o);
  }
  if (live) {
    float w[MS];
    backward_softmax_at<T, MS>(a, n, p, w);
    float dot = 0.f;
#pragma unroll
    for (int t = 0; t < MS; ++t) {
      if (t < a.S) {
        if (a.gw != nullptr) gs[t] += to_f(a.gw[(n * a.S + t) * P + p]);
        dot = fmaf(w[t], gs[t], dot);
      }
    }
#pragma unroll
    for (int t = 0; t < MS; ++t)  // lane q writes the scales t = q mod G
      if (t < a.S && (t & (G - 1)) == q) a.glogits[(n * a.S + t) * P + p] = from_f<T>(w[t] * (gs[t] - dot));
  }
}

// The attention instances are held to the registers they had before their logit gradient moved into
// logit_grad_unit (-Xptxas -v, sm_90): 64 for at most 3 scales (4 blocks of 256 per multiprocessor, no
// spills; 71 without the bound), 128 for up to 8 (2 blocks; 24-40 bytes of spill stores, against 166-170
// registers and 1 block without the bound).  0 leaves the other modes to ptxas.
template <int MODE, int MS>
constexpr int backward_min_blocks() {
  return MODE != kAttention ? 0 : (MS <= 3 ? 4 : 2);
}

template <typename T, int MODE, int MS>
__global__ void __launch_bounds__(kThreads, (backward_min_blocks<MODE, MS>())) backward_kernel(const Args<T> a) {
  const int64_t total = a.seg[a.S + 1];
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < total;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    // Last segment first: the logit-gradient threads (a loop over every class) and the coarsest scale's
    // (the widest gather) are the longest, so they start first instead of forming the tail.
    const int64_t i = total - 1 - k;
    int s = 0;
    while (s < a.S && i >= a.seg[s + 1]) ++s;
    const int64_t e = i - a.seg[s];
    if (s < a.S) {
      // score gradient element (n, c, r, j) of scale s
      const int Hs = a.H[s], Ws = a.W[s];
      const int64_t plane = e / (static_cast<int64_t>(Hs) * Ws);
      const int64_t q = e % (static_cast<int64_t>(Hs) * Ws);
      const int r = static_cast<int>(q / Ws), j = static_cast<int>(q % Ws);
      const int64_t n = plane / a.C;
      a.g[s][e] = from_f<T>(s == 0 ? dest_grad<T, MODE, MS>(a, 0, n, plane, r, j)
                                   : coarse_gather<T, MODE, MS>(a, s, n, plane, r, j));
    } else if (MODE == kAttention) {
      logit_grad_unit<T, MS>(a, e);
    }
  }
}

// Backward, "pixel" layout (ATTNSCALE_MERGE_BACKWARD=pixel; attention and avg): a thread per (item, pixel of
// scale s, class chunk) instead of per gradient element.  Everything that does not depend on the class
// is done once per thread: the source ranges, the footprint's Interp weights and the destination
// pixels' softmax weights (the element layout recomputes them for every class), kept as up to
// kFootAxis x kFootAxis coefficients in registers; then each class of the chunk is a dot product of those
// coefficients with its incoming gradient.  A footprint wider than kFootAxis per axis (ratios below about
// 1/2) falls back to the element layout's gather per class.  Max mode keeps the element layout (its
// weights depend on the class).  The logit gradient is the same as there.
constexpr int kFootAxis = 4;

template <typename T, int MODE, int MS>
__global__ void __launch_bounds__(kThreads) backward_pixel_kernel(const Args<T> a) {
  const int H0 = a.H[0], W0 = a.W[0];
  const int64_t P = static_cast<int64_t>(H0) * W0;
  const int64_t total = a.seg[a.S + 1];
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < total;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = total - 1 - k;  // the logit gradient (a loop over classes) and coarse scales first
    int s = 0;
    while (s < a.S && i >= a.seg[s + 1]) ++s;
    const int64_t e = i - a.seg[s];
    if (s == a.S) {
      if (MODE == kAttention) logit_grad_unit<T, MS>(a, e);
      continue;
    }
    // unit (n, chunk, pixel q of scale s), pixels fastest: a warp reads neighbouring pixels of one class
    const int Hs = a.H[s], Ws = a.W[s];
    const int64_t Ps = static_cast<int64_t>(Hs) * Ws;
    const int64_t q = e % Ps, nk = e / Ps;
    const int64_t n = nk / a.kchunks, c0 = (nk % a.kchunks) * a.csz;
    const int64_t c1 = (c0 + a.csz < a.C) ? c0 + a.csz : a.C;
    const T* go = a.gout + n * a.C * P;   // class c at go + c * P
    T* gs = a.g[s] + n * a.C * Ps + q;    // class c at gs[c * Ps]
    if (s == 0) {
      const float wgt = dest_weight<T, MODE, MS>(a, 0, n, q);
      for (int64_t c = c0; c < c1; ++c) gs[c * Ps] = from_f<T>(to_f(go[c * P + q]) * wgt);
      continue;
    }
    const int r = static_cast<int>(q / Ws), j = static_cast<int>(q % Ws);
    int y0, y1, x0, x1;
    interp_source_range(r, Hs, H0, a.ry[s], &y0, &y1);
    interp_source_range(j, Ws, W0, a.rx[s], &x0, &x1);
    if (y1 - y0 > kFootAxis || x1 - x0 > kFootAxis) {  // a wide footprint: the element layout's gather
      for (int64_t c = c0; c < c1; ++c)
        gs[c * Ps] = from_f<T>(coarse_gather<T, MODE, MS>(a, s, n, n * a.C + c, r, j));
      continue;
    }
    // the footprint's coefficients wy * wx * w_s(y, x) at destination offsets base + v * W0 + u, and the
    // mask of the taps that touch this pixel (wy * wx != 0): the element layout's skip rule, so that a
    // non-finite gradient still spreads where only the softmax weight is 0
    float coef[kFootAxis * kFootAxis];
    unsigned mask = 0;
    float wx[kFootAxis];
#pragma unroll
    for (int u = 0; u < kFootAxis; ++u)
      wx[u] = (x0 + u < x1) ? tap_weight<float>(interp_tap(x0 + u, Ws, W0, a.rx[s]), j) : 0.f;
    const int64_t base = static_cast<int64_t>(y0) * W0 + x0;
#pragma unroll
    for (int v = 0; v < kFootAxis; ++v) {
      const float wy = (y0 + v < y1) ? tap_weight<float>(interp_tap(y0 + v, Hs, H0, a.ry[s]), r) : 0.f;
#pragma unroll
      for (int u = 0; u < kFootAxis; ++u) {
        const float w = wy * wx[u];
        coef[v * kFootAxis + u] = w != 0.f ? w * dest_weight<T, MODE, MS>(a, s, n, base + v * W0 + u) : 0.f;
        mask |= (w != 0.f ? 1u : 0u) << (v * kFootAxis + u);
      }
    }
    for (int64_t c = c0; c < c1; ++c) {
      const T* gc = go + c * P + base;
      float acc = 0.f;
#pragma unroll
      for (int v = 0; v < kFootAxis; ++v) {
#pragma unroll
        for (int u = 0; u < kFootAxis; ++u)
          if (mask & (1u << (v * kFootAxis + u)))
            acc = fmaf(coef[v * kFootAxis + u], to_f(gc[v * W0 + u]), acc);
      }
      gs[c * Ps] = from_f<T>(acc);
    }
  }
}

template <typename T>
Args<T> make_args(const Problem& p) {
  Args<T> a{};
  a.S = p.S;
  a.N = p.N;
  a.C = p.C;
  for (int s = 0; s < kMaxScales; ++s) {
    a.H[s] = s < p.S ? p.H[s] : 1;
    a.W[s] = s < p.S ? p.W[s] : 1;
    const bool copy = a.H[s] == p.H[0] && a.W[s] == p.W[0];  // Caffe copies only when both sizes match
    a.ry[s] = copy ? kInterpCopy : interp_ratio(a.H[s], p.H[0]);
    a.rx[s] = copy ? kInterpCopy : interp_ratio(a.W[s], p.W[0]);
  }
  return a;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Lanes per pixel of the attention backward's logit gradient when Problem::logit_groups is 0: 2 while
// the logit pixels are few (at most 2^15) and every lane keeps at least 4 classes, else 1.  From
// benchmarks/merge_kernels.py --logit-groups 1 2 4 8 on an H100 (2026-11-26, RESULTS.md): with the pixel
// layout 2 lanes were best at N=1 (65x65) and N=10 (41x41), 1 lane at N=30; more lanes were slower.
int default_logit_groups(int64_t pixels, int64_t C) {
  return (pixels <= (int64_t{1} << 15) && C >= 8) ? 2 : 1;
}

// The instance for at most kFewScales scales where S allows (the paper's 2- and 3-scale nets), else the
// general one.
constexpr int kFewScales = 3;
template <typename T>
void launch(void (*few)(Args<T>), void (*general)(Args<T>), const Args<T>& a, dim3 grid, cudaStream_t stream) {
  (a.S <= kFewScales ? few : general)<<<grid, kThreads, 0, stream>>>(a);
}

template <typename T>
cudaError_t forward_typed(const Problem& p, const void* const* scores, const void* logits, void* merged,
                          void* weights, cudaStream_t stream) {
  Args<T> a = make_args<T>(p);
  for (int s = 0; s < p.S; ++s) a.f[s] = static_cast<const T*>(scores[s]);
  a.logits = static_cast<const T*>(logits);
  a.out = static_cast<T*>(merged);
  a.w = static_cast<T*>(weights);
  const int64_t pixels = p.N * static_cast<int64_t>(p.H[0]) * p.W[0];
  if (pixels == 0) return cudaSuccess;
  // Class chunks: enough threads to fill the device (~128k), one chunk in max mode.
  int64_t chunks = 1;
  if (p.mode != kMax) {
    chunks = ceil_div(131072, pixels);
    if (chunks > p.C) chunks = p.C;
    if (chunks > 65535) chunks = 65535;
    if (chunks < 1) chunks = 1;
  }
  a.csz = ceil_div(p.C, chunks);
  chunks = ceil_div(p.C, a.csz);
  const dim3 grid(static_cast<unsigned>(ceil_div(pixels, kThreads)), static_cast<unsigned>(chunks));
  switch (p.mode) {
    case kAttention:
      launch<T>(forward_kernel<T, kAttention, kFewScales>, forward_kernel<T, kAttention, kMaxScales>, a, grid, stream);
      break;
    case kAvg:
      launch<T>(forward_kernel<T, kAvg, kFewScales>, forward_kernel<T, kAvg, kMaxScales>, a, grid, stream);
      break;
    default:
      launch<T>(forward_kernel<T, kMax, kFewScales>, forward_kernel<T, kMax, kMaxScales>, a, grid, stream);
      break;
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_typed(const Problem& p, const void* grad_merged, const void* grad_weights,
                           const void* const* scores, const void* logits, const float* weights,
                           void* const* grad_scores, void* grad_logits, cudaStream_t stream) {
  Args<T> a = make_args<T>(p);
  for (int s = 0; s < p.S; ++s) {
    a.f[s] = static_cast<const T*>(scores[s]);
    a.g[s] = static_cast<T*>(grad_scores[s]);
  }
  a.logits = static_cast<const T*>(logits);
  a.gout = static_cast<const T*>(grad_merged);
  a.gw = static_cast<const T*>(grad_weights);
  a.glogits = static_cast<T*>(grad_logits);
  a.wsaved = p.mode == kAttention ? weights : nullptr;
  // Layout: a thread per gradient element, or (Problem::backward_layout 1; attention and avg) a thread per
  // pixel and class chunk, the chunks sized as the forward's: enough threads to fill the device (~128k).
  const bool pixel = p.backward_layout == 1 && p.mode != kMax;
  a.csz = p.C;
  a.kchunks = 1;
  if (pixel && p.C > 0) {
    int64_t pixels = 0;
    for (int s = 0; s < p.S; ++s) pixels += p.N * static_cast<int64_t>(p.H[s]) * p.W[s];
    int64_t chunks = ceil_div(p.chunk_threads > 0 ? p.chunk_threads : 131072, pixels > 0 ? pixels : 1);
    if (chunks > p.C) chunks = p.C;
    if (chunks < 1) chunks = 1;
    a.csz = ceil_div(p.C, chunks);
    a.kchunks = ceil_div(p.C, a.csz);
  }
  const int64_t units = pixel ? (p.C > 0 ? a.kchunks : 0) : p.C;  // per pixel of every scale
  a.seg[0] = 0;
  for (int s = 0; s < p.S; ++s) a.seg[s + 1] = a.seg[s] + p.N * units * static_cast<int64_t>(p.H[s]) * p.W[s];
  const int64_t logit_pixels = p.mode == kAttention ? p.N * static_cast<int64_t>(p.H[0]) * p.W[0] : 0;
  const int groups = p.logit_groups > 0 ? p.logit_groups : default_logit_groups(logit_pixels, p.C);
  if (groups > 32 || (groups & (groups - 1)) != 0) return cudaErrorInvalidValue;
  a.lgshift = 0;
  while ((1 << a.lgshift) < groups) ++a.lgshift;
  // whole warps: the walk is reversed, so the logit segment is walked first and starts on a warp boundary
  a.seg[p.S + 1] = a.seg[p.S] + ceil_div(logit_pixels * groups, 32) * 32;
  const int64_t total = a.seg[p.S + 1];
  if (total == 0) return cudaSuccess;
  int64_t blocks = ceil_div(total, kThreads);
  if (blocks > (int64_t{1} << 20)) blocks = int64_t{1} << 20;  // grid-stride beyond this
  const dim3 grid(static_cast<unsigned>(blocks));
  switch (p.mode) {
    case kAttention:
      if (pixel) {
        launch<T>(backward_pixel_kernel<T, kAttention, kFewScales>, backward_pixel_kernel<T, kAttention, kMaxScales>,
                  a, grid, stream);
      } else {
        launch<T>(backward_kernel<T, kAttention, kFewScales>, backward_kernel<T, kAttention, kMaxScales>, a, grid,
                  stream);
      }
      break;
    case kAvg:
      if (pixel) {
        launch<T>(backward_pixel_kernel<T, kAvg, kFewScales>, backward_pixel_kernel<T, kAvg, kMaxScales>, a, grid,
                  stream);
      } else {
        launch<T>(backward_kernel<T, kAvg, kFewScales>, backward_kernel<T, kAvg, kMaxScales>, a, grid, stream);
      }
      break;
    default:
      launch<T>(backward_kernel<T, kMax, kFewScales>, backward_kernel<T, kMax, kMaxScales>, a, grid, stream);
      break;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_forward(const Problem& p, const void* const* scores, const void* logits, void* merged,
                           void* weights, cudaStream_t stream) {
  if (p.S < 1 || p.S > kMaxScales) return cudaErrorInvalidValue;
  switch (p.dtype) {
    case DType::kFloat32:
      return forward_typed<float>(p, scores, logits, merged, weights, stream);
    case DType::kFloat16:
      return forward_typed<__half>(p, scores, logits, merged, weights, stream);
    case DType::kBFloat16:
      return forward_typed<__nv_bfloat16>(p, scores, logits, merged, weights, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_backward(const Problem& p, const void* grad_merged, const void* grad_weights,
                            const void* const* scores, const void* logits, const void* weights,
                            void* const* grad_scores, void* grad_logits, cudaStream_t stream) {
  if (p.S < 1 || p.S > kMaxScales) return cudaErrorInvalidValue;
  switch (p.dtype) {
    case DType::kFloat32:
      return backward_typed<float>(p, grad_merged, grad_weights, scores, logits, static_cast<const float*>(weights),
                                   grad_scores, grad_logits, stream);
    case DType::kFloat16:  // weights rounded to half: recomputed in fp32 instead
      return backward_typed<__half>(p, grad_merged, grad_weights, scores, logits, nullptr, grad_scores, grad_logits,
                                    stream);
    case DType::kBFloat16:
      return backward_typed<__nv_bfloat16>(p, grad_merged, grad_weights, scores, logits, nullptr, grad_scores,
                                           grad_logits, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace scale_merge
}  // namespace attnscale
