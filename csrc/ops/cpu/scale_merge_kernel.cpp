// CPU kernels of attnscale::scale_merge and attnscale::scale_merge_backward (float, double).
//
// Layout of the work (one pass over the data, no temporaries of size N*S*C*H*W):
// - Interp tables are built once per call: for every destination row/column its two source
//   indices and lambdas (Caffe float arithmetic, scale_merge_interp.h), and their inverse: for
//   every source row/column the contiguous range of destination indices whose footprint touches
//   it, as a first index plus a fixed-width, zero-padded weight vector.
// - A coarse plane is resized separably: horizontal pass into a small per-thread buffer of
//   H_s x W0 rows (Caffe's inner w-interpolation; with AVX2 each block of 8 outputs is one load
//   of an in-row 8-wide window and two permutes, no gathers, no padded copy), then each output
//   row is a 2-tap blend of two such rows fused into the merge (contiguous, vectorised over W;
//   attention: scales 0-2 in one pass per row).
// - Backward, per (n, class chunk) task: one sweep over the rows gives scale 0's gradient, the
//   gradient reaching every resized map (G_s, a per-thread plane) and, for attention, the dot
//   products grad . up(f_s) of the logit gradient (the resized maps are rebuilt once, in the same
//   sweep).  G_s is then gathered through the inverse tables: the vertical adjoint of each
//   source row is one fixed-width pass over the destination rows (vectorised over W); blocks of 8
//   such rows are transposed so that the horizontal adjoint runs on 8 rows at once.  No atomics,
//   fixed summation order: deterministic whatever the thread count.
// - Reductions over classes: attention's logit gradient is finished inside the task when a batch
//   item is one chunk (N >= 8), otherwise summed from per-(n, chunk) partials in chunk order; the
//   softmax weights are recomputed per batch item in the task (nothing of size N*S*H0*W0 is
//   zero-filled).  max-mode counts use per-(n, class-chunk) partial buffers (K = class_chunks(N,
//   C)).  Chunk counts depend on the shape only, never on the thread count.
// - max mode's backward recomputes the argmax scale with the very same (non-inlined) routines
//   as the forward, so the recomputed values are bit-identical and the gradient goes to the
//   scale that produced the forward value.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "ops/scale_merge.h"
#include "ops/scale_merge_interp.h"

namespace attnscale {
namespace scale_merge {
namespace {

#if defined(__GNUC__)
#define ATTNSCALE_NOINLINE __attribute__((noinline))
#else
#define ATTNSCALE_NOINLINE
#endif
// Short gathers vectorise into AVX2 gathers, which are slower than scalar code on many x86 cores.
#if defined(__GNUC__) && !defined(__clang__)
#define ATTNSCALE_NOVECTOR __attribute__((noinline, optimize("no-tree-vectorize")))
#else
#define ATTNSCALE_NOVECTOR ATTNSCALE_NOINLINE
#endif

// --------------------------------------------------------------------------------------------
// exp used by the softmax over scales.  Arguments are max-subtracted (<= 0).  The float version
// is branch-free so that GCC vectorises the loops that call it: x = n ln2 + r, |r| <= ln2/2,
// e^r by its degree-7 Taylor polynomial (truncation error < 6e-9 relative, below float's
// epsilon), times 2^n built in the exponent bits.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")  // lets GCC if-convert the clamp and vectorise the loops
#endif
inline float exp_nonpos(float x) {
  x = x < -87.0f ? -87.0f : x;
  const int32_t ni = static_cast<int32_t>(x * 1.44269504088896341f - 0.5f);  // round(x/ln2), x <= 0
  const float n = static_cast<float>(ni);
  const float r = (x - n * 0.693145751953125f) - n * 1.42860682030941723212e-6f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (ni + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
inline double exp_nonpos(double x) { return std::exp(x); }

// --------------------------------------------------------------------------------------------
template <typename T>
struct Axis {
  int in = 0, out = 0;
  std::vector<int> i0, i1;      // per destination index
  std::vector<T> l0, l1;        // per destination index
  std::vector<int> off, dst;    // inverse: source j -> entries [off[j], off[j+1])
  std::vector<T> wt;

  void build(int in_, int out_) {
    in = in_;
    out = out_;
    const float ratio = interp_ratio(in, out);
    i0.resize(out);
    i1.resize(out);
    l0.resize(out);
    l1.resize(out);
    std::vector<int> count(in + 1, 0);
    for (int d = 0; d < out; ++d) {
      const Tap t = interp_tap(d, in, out, ratio);
      i0[d] = t.i0;
      i1[d] = t.i1;
      l1[d] = static_cast<T>(t.l1);           // Caffe: Dtype h1lambda = h1r - h1 (float)
      l0[d] = static_cast<T>(1) - l1[d];      //        Dtype h0lambda = 1 - h1lambda
      count[t.i0 + 1]++;
      if (t.i1 != t.i0) count[t.i1 + 1]++;
    }
    off.assign(in + 1, 0);
    for (int j = 0; j < in; ++j) off[j + 1] = off[j] + count[j + 1];
    dst.resize(off[in]);
    wt.resize(off[in]);
    std::vector<int> fill(off.begin(), off.end() - 1);
    for (int d = 0; d < out; ++d) {  // increasing d: each source's list is sorted
      const Tap t = interp_tap(d, in, out, ratio);
      dst[fill[t.i0]] = d;
      wt[fill[t.i0]++] = tap_weight<T>(t, t.i0);
      if (t.i1 != t.i0) {
        dst[fill[t.i1]] = d;
        wt[fill[t.i1]++] = tap_weight<T>(t, t.i1);
      }
    }
    identity = (in == out);
    // Fixed-width inverse: the destinations of source j are the contiguous range
    // first[j] .. first[j] + kmax - 1 with weights wpad[j * kmax + k] (zero-padded).
    kmax = 1;
    for (int j = 0; j < in; ++j) kmax = std::max(kmax, off[j + 1] - off[j]);
    first.assign(in, 0);
    wpad.assign(static_cast<size_t>(in) * kmax, T(0));
    for (int j = 0; j < in; ++j) {
      if (off[j + 1] == off[j]) continue;
      first[j] = dst[off[j]];
      for (int q = off[j]; q < off[j + 1]; ++q) {
        TORCH_CHECK(dst[q] == first[j] + (q - off[j]), "scale_merge: internal error (non-contiguous Interp inverse)");
        wpad[static_cast<size_t>(j) * kmax + (q - off[j])] = wt[q];
      }
    }
    // 8-wide blocks of destinations: i0 - base lies in [0, 7] because the ratio is <= 1.
    const int nblocks = out / 8;
    base.assign(nblocks, 0);
    perm.assign(static_cast<size_t>(nblocks) * 8, 0);
    for (int b = 0; b < nblocks; ++b) {
      base[b] = i0[8 * b];
      for (int k = 0; k < 8; ++k) {
        perm[8 * b + k] = i0[8 * b + k] - base[b];
        TORCH_CHECK(perm[8 * b + k] >= 0 && perm[8 * b + k] < 8, "scale_merge: internal error (Interp block)");
      }
    }
    // Single-load blocks: both taps of the 8 outputs of block b lie in one 8-wide window
    // [q, q + 8) inside the source row, so one load + two permutes give them without copying
    // the row into a padded buffer (whose freshly stored bytes would stall the loads).
    single = in >= 8 && nblocks > 0;
    q1.assign(nblocks, 0);
    p0.assign(static_cast<size_t>(nblocks) * 8, 0);
    p1.assign(static_cast<size_t>(nblocks) * 8, 0);
    for (int b = 0; b < nblocks && single; ++b) {
      const int q = std::min(i0[8 * b], in - 8);
      q1[b] = q;
      for (int k = 0; k < 8; ++k) {
        p0[8 * b + k] = i0[8 * b + k] - q;
        p1[8 * b + k] = i1[8 * b + k] - q;
        if (p0[8 * b + k] < 0 || p1[8 * b + k] > 7) single = false;
      }
    }
  }

  bool single = false;
  std::vector<int> q1;
  std::vector<int32_t> p0, p1;

  bool identity = false;
  int kmax = 1;
  std::vector<int> first;
  std::vector<T> wpad;
  std::vector<int> base;
  std::vector<int32_t> perm;
};

template <typename T>
struct Tables {
  std::vector<Axis<T>> y, x;  // index 0 unused (scale 0 is not resized)
  std::vector<int> H, W;
  std::vector<int64_t> hoff;  // offsets of each scale's H_s x W0 buffer in the per-thread scratch
  int64_t hsize = 0;
  int wmax = 0;   // widest coarse map (pad buffer)
  int kmax = 1;   // widest fixed-width inverse along x (trow padding)
  int kmax_y = 1; // widest fixed-width inverse along y (G padding)

  explicit Tables(const std::vector<at::Tensor>& sc) {
    const int S = static_cast<int>(sc.size());
    const int H0 = static_cast<int>(sc[0].size(2)), W0 = static_cast<int>(sc[0].size(3));
    y.resize(S);
    x.resize(S);
    H.resize(S);
    W.resize(S);
    hoff.assign(S, 0);
    for (int s = 0; s < S; ++s) {
      H[s] = static_cast<int>(sc[s].size(2));
      W[s] = static_cast<int>(sc[s].size(3));
      if (s == 0) continue;
      y[s].build(H[s], H0);
      x[s].build(W[s], W0);
      wmax = std::max(wmax, W[s]);
      kmax = std::max(kmax, x[s].kmax);
      kmax_y = std::max(kmax_y, y[s].kmax);
      hoff[s] = hsize;
      hsize += static_cast<int64_t>(H[s]) * W0;
    }
  }
};

// Horizontal pass of one coarse plane: rows[r][x] = l0[x] f[r][i0[x]] + l1[x] f[r][i1[x]].
// Not inlined: the forward and the backward's recomputation must produce bit-identical values.
// Each source row is copied into `pad` (its last element repeated) so that f[i1] = pad[i0 + 1]
// for every x; with AVX2, 8 outputs are two permutes of two contiguous loads (no gathers).
template <typename T>
ATTNSCALE_NOINLINE void resize_rows(const T* __restrict f, int Hs, int Ws, const Axis<T>& ax, int W0,
                                    T* __restrict rows, T* __restrict pad) {
  const int* __restrict i0 = ax.i0.data();
  const T* __restrict l0 = ax.l0.data();
  const T* __restrict l1 = ax.l1.data();
  if (ax.identity) {
    std::memcpy(rows, f, sizeof(T) * static_cast<size_t>(Hs) * W0);
    return;
  }
  int xv = 0;
#if defined(__AVX2__)
  constexpr bool kVec = std::is_same<T, float>::value;
  if (kVec) xv = (W0 / 8) * 8;
#endif
#if defined(__AVX2__)
  if constexpr (kVec) {
    if (ax.single) {
      const int* __restrict q1 = ax.q1.data();
      const int* __restrict i1 = ax.i1.data();
      const int32_t* __restrict p0 = ax.p0.data();
      const int32_t* __restrict p1 = ax.p1.data();
      for (int r = 0; r < Hs; ++r) {
        const T* __restrict src = f + static_cast<int64_t>(r) * Ws;
        T* __restrict d = rows + static_cast<int64_t>(r) * W0;
        for (int x = 0; x < xv; x += 8) {
          const __m256 v = _mm256_loadu_ps(src + q1[x / 8]);
          const __m256 a = _mm256_permutevar8x32_ps(v, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p0 + x)));
          const __m256 c = _mm256_permutevar8x32_ps(v, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p1 + x)));
          const __m256 o = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(l0 + x), a),
                                         _mm256_mul_ps(_mm256_loadu_ps(l1 + x), c));
          _mm256_storeu_ps(d + x, o);
        }
        for (int x = xv; x < W0; ++x) d[x] = l0[x] * src[i0[x]] + l1[x] * src[i1[x]];
      }
      return;
    }
  }
#endif
  for (int r = 0; r < Hs; ++r) {
    const T* __restrict src = f + static_cast<int64_t>(r) * Ws;
    T* __restrict d = rows + static_cast<int64_t>(r) * W0;
    std::memcpy(pad, src, sizeof(T) * Ws);
    for (int k = 0; k < 9; ++k) pad[Ws + k] = src[Ws - 1];
#if defined(__AVX2__)
    if constexpr (kVec) {
      const int* __restrict base = ax.base.data();
      const int32_t* __restrict perm = ax.perm.data();
      for (int x = 0; x < xv; x += 8) {
        const int b = base[x / 8];
        const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(perm + x));
        const __m256 a = _mm256_permutevar8x32_ps(_mm256_loadu_ps(pad + b), p);
        const __m256 c = _mm256_permutevar8x32_ps(_mm256_loadu_ps(pad + b + 1), p);
        const __m256 v = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(l0 + x), a),
                                       _mm256_mul_ps(_mm256_loadu_ps(l1 + x), c));
        _mm256_storeu_ps(d + x, v);
      }
    }
#endif
    for (int x = xv; x < W0; ++x) d[x] = l0[x] * pad[i0[x]] + l1[x] * pad[i0[x] + 1];
  }
}

// Vertical blend for destination row y: up[x] = l0[y] rows[i0[y]][x] + l1[y] rows[i1[y]][x].
template <typename T>
ATTNSCALE_NOINLINE void resize_row(const T* __restrict rows, int W0, const Axis<T>& ay, int y,
                                   T* __restrict up) {
  const T* __restrict a = rows + static_cast<int64_t>(ay.i0[y]) * W0;
  const T* __restrict b = rows + static_cast<int64_t>(ay.i1[y]) * W0;
  const T la = ay.l0[y], lb = ay.l1[y];
  for (int x = 0; x < W0; ++x) up[x] = la * a[x] + lb * b[x];
}

// Horizontal adjoint of one row: grow[j] = sum_k wpad[j][k] * t[first[j] + k] (fixed width,
// zero-padded weights; t must have kmax readable entries past W0).  A gather with a fixed
// summation order: no atomics, deterministic.
template <typename T, int K>
inline void adjoint_cols_k(const T* __restrict t, const int* __restrict first, const T* __restrict wp, int Ws,
                           T* __restrict grow) {
  for (int j = 0; j < Ws; ++j) {
    const T* __restrict tt = t + first[j];
    const T* __restrict ww = wp + static_cast<int64_t>(j) * K;
    T acc = T(0);
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) acc += ww[k] * tt[k];
    grow[j] = acc;
  }
}

template <typename T>
ATTNSCALE_NOVECTOR void adjoint_cols(const T* __restrict t, const Axis<T>& ax, T* __restrict grow) {
  const int Ws = ax.in;
  const int* first = ax.first.data();
  const T* wp = ax.wpad.data();
  switch (ax.kmax) {
    case 1: return adjoint_cols_k<T, 1>(t, first, wp, Ws, grow);
    case 2: return adjoint_cols_k<T, 2>(t, first, wp, Ws, grow);
    case 3: return adjoint_cols_k<T, 3>(t, first, wp, Ws, grow);
    case 4: return adjoint_cols_k<T, 4>(t, first, wp, Ws, grow);
    case 5: return adjoint_cols_k<T, 5>(t, first, wp, Ws, grow);
    case 6: return adjoint_cols_k<T, 6>(t, first, wp, Ws, grow);
    default: break;
  }
  const int K = ax.kmax;
  for (int j = 0; j < Ws; ++j) {
    T acc = T(0);
    for (int k = 0; k < K; ++k) acc += wp[static_cast<int64_t>(j) * K + k] * t[first[j] + k];
    grow[j] = acc;
  }
}

// Vertical adjoint of source row r: t[x] = sum_k wpad[r][k] * G[first[r] + k][x].  One pass
// over x (vectorised), fixed summation order.  G needs kmax readable zero rows past H0.
template <typename T, int K>
inline void vertical_adjoint_k(const T* __restrict G, int W0, const T* __restrict ww, int64_t y0,
                               T* __restrict t) {
  const T* __restrict g0 = G + y0 * W0;
  for (int x = 0; x < W0; ++x) {
    T acc = ww[0] * g0[x];
    for (int k = 1; k < K; ++k) acc += ww[k] * g0[static_cast<int64_t>(k) * W0 + x];
    t[x] = acc;
  }
}

template <typename T>
inline void vertical_adjoint(const T* __restrict G, int W0, const Axis<T>& ay, int r, T* __restrict t) {
  const int K = ay.kmax;
  const T* ww = ay.wpad.data() + static_cast<int64_t>(r) * K;
  const int64_t y0 = ay.first[r];
  switch (K) {
    case 1: return vertical_adjoint_k<T, 1>(G, W0, ww, y0, t);
    case 2: return vertical_adjoint_k<T, 2>(G, W0, ww, y0, t);
    case 3: return vertical_adjoint_k<T, 3>(G, W0, ww, y0, t);
    case 4: return vertical_adjoint_k<T, 4>(G, W0, ww, y0, t);
    case 5: return vertical_adjoint_k<T, 5>(G, W0, ww, y0, t);
    case 6: return vertical_adjoint_k<T, 6>(G, W0, ww, y0, t);
    default: break;
  }
  for (int x = 0; x < W0; ++x) {
    T acc = T(0);
    for (int k = 0; k < K; ++k) acc += ww[k] * G[(y0 + k) * W0 + x];
    t[x] = acc;
  }
}

// Transpose an 8 x W (W a multiple of 8) block of rows with stride W into dst[x * 8 + row].
template <typename T>
inline void transpose8(const T* __restrict src, int W, T* __restrict dst) {
#if defined(__AVX2__)
  if constexpr (std::is_same<T, float>::value) {
    for (int x = 0; x < W; x += 8) {
      __m256 r[8], u[8], v[8];
      for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + static_cast<int64_t>(i) * W + x);
      for (int i = 0; i < 8; i += 2) {
        u[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        u[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
      }
      v[0] = _mm256_shuffle_ps(u[0], u[2], 0x44);
      v[1] = _mm256_shuffle_ps(u[0], u[2], 0xEE);
      v[2] = _mm256_shuffle_ps(u[1], u[3], 0x44);
      v[3] = _mm256_shuffle_ps(u[1], u[3], 0xEE);
      v[4] = _mm256_shuffle_ps(u[4], u[6], 0x44);
      v[5] = _mm256_shuffle_ps(u[4], u[6], 0xEE);
      v[6] = _mm256_shuffle_ps(u[5], u[7], 0x44);
      v[7] = _mm256_shuffle_ps(u[5], u[7], 0xEE);
      T* d = dst + static_cast<int64_t>(x) * 8;
      for (int i = 0; i < 4; ++i) {
        _mm256_storeu_ps(d + i * 8, _mm256_permute2f128_ps(v[i], v[i + 4], 0x20));
        _mm256_storeu_ps(d + (i + 4) * 8, _mm256_permute2f128_ps(v[i], v[i + 4], 0x31));
      }
    }
    return;
  }
#endif
  for (int x = 0; x < W; ++x)
    for (int i = 0; i < 8; ++i) dst[static_cast<int64_t>(x) * 8 + i] = src[static_cast<int64_t>(i) * W + x];
}

// Horizontal adjoint of a block of up to 8 rows stored transposed (tt[x * 8 + lane]):
// grow[lane][j] = sum_k wpad[j][k] * tt[(first[j] + k) * 8 + lane].  The inner loop over the 8
// lanes is contiguous and vectorises; fixed summation order (k ascending), no atomics.
template <typename T, int K>
inline void adjoint_cols8_k(const T* __restrict tt, const int* __restrict first, const T* __restrict wp, int Ws,
                            int nrows, T* __restrict grow) {
  for (int j = 0; j < Ws; ++j) {
    T acc[8] = {T(0), T(0), T(0), T(0), T(0), T(0), T(0), T(0)};
    const T* __restrict tp = tt + static_cast<int64_t>(first[j]) * 8;
    const T* __restrict ww = wp + static_cast<int64_t>(j) * K;
    for (int k = 0; k < K; ++k) {
      const T wk = ww[k];
      for (int l = 0; l < 8; ++l) acc[l] += wk * tp[k * 8 + l];
    }
    for (int l = 0; l < nrows; ++l) grow[static_cast<int64_t>(l) * Ws + j] = acc[l];
  }
}

template <typename T>
ATTNSCALE_NOINLINE void adjoint_cols8(const T* __restrict tt, const Axis<T>& ax, int nrows, T* __restrict grow) {
  const int Ws = ax.in;
  const int* first = ax.first.data();
  const T* wp = ax.wpad.data();
  switch (ax.kmax) {
    case 1: return adjoint_cols8_k<T, 1>(tt, first, wp, Ws, nrows, grow);
    case 2: return adjoint_cols8_k<T, 2>(tt, first, wp, Ws, nrows, grow);
    case 3: return adjoint_cols8_k<T, 3>(tt, first, wp, Ws, nrows, grow);
    case 4: return adjoint_cols8_k<T, 4>(tt, first, wp, Ws, nrows, grow);
    case 5: return adjoint_cols8_k<T, 5>(tt, first, wp, Ws, nrows, grow);
    case 6: return adjoint_cols8_k<T, 6>(tt, first, wp, Ws, nrows, grow);
    default: break;
  }
  const int K = ax.kmax;
  for (int j = 0; j < Ws; ++j) {
    for (int l = 0; l < nrows; ++l) {
      T acc = T(0);
      for (int k = 0; k < K; ++k)
        acc += wp[static_cast<int64_t>(j) * K + k] * tt[static_cast<int64_t>(first[j] + k) * 8 + l];
      grow[static_cast<int64_t>(l) * Ws + j] = acc;
    }
  }
}

// Caffe Eltwise MAX over the scales for one row: later scale wins only if strictly greater.
// Not inlined for the same reason as resize_rows.
template <typename T>
ATTNSCALE_NOINLINE void max_row(const T* __restrict f0row, const std::vector<const T*>& ups, int W0,
                                T* __restrict best, T* __restrict idx) {
  for (int x = 0; x < W0; ++x) {
    best[x] = f0row[x];
    idx[x] = T(0);
  }
  for (size_t s = 1; s < ups.size(); ++s) {
    const T* __restrict u = ups[s];
    const T sv = static_cast<T>(s);
    for (int x = 0; x < W0; ++x) {  // loads first, unconditional stores: blends, no masked stores
      const T ux = u[x], bx = best[x], ix = idx[x];
      const bool g = ux > bx;
      const T nb = g ? ux : bx;
      const T ni = g ? sv : ix;
      best[x] = nb;
      idx[x] = ni;
    }
  }
}

// Softmax over S of the logits (computed in float for float, double for double), rows
// [row_begin, row_end) of the flattened (N*H0) rows.
template <typename T>
void softmax_rows(const T* logits, T* w, int64_t S, int64_t H0, int64_t W0, int64_t row_begin,
                  int64_t row_end) {
  const int64_t P = H0 * W0;
  std::vector<T> m(W0), sum(W0);
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t n = row / H0, y = row % H0;
    const T* l = logits + n * S * P + y * W0;
    T* o = w + n * S * P + y * W0;
    T* __restrict mp = m.data();
    T* __restrict sp = sum.data();
    for (int64_t x = 0; x < W0; ++x) {
      mp[x] = l[x];
      sp[x] = T(0);
    }
    for (int64_t s = 1; s < S; ++s) {
      const T* __restrict ls = l + s * P;
      for (int64_t x = 0; x < W0; ++x) mp[x] = ls[x] > mp[x] ? ls[x] : mp[x];
    }
    for (int64_t s = 0; s < S; ++s) {
      const T* __restrict ls = l + s * P;
      T* __restrict os = o + s * P;
      for (int64_t x = 0; x < W0; ++x) {
        os[x] = exp_nonpos(ls[x] - mp[x]);
        sp[x] += os[x];
      }
    }
    for (int64_t x = 0; x < W0; ++x) sp[x] = T(1) / sp[x];
    for (int64_t s = 0; s < S; ++s) {
      T* __restrict os = o + s * P;
      for (int64_t x = 0; x < W0; ++x) os[x] *= sp[x];
    }
  }
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

// at::parallel_for grain (in tasks) such that a chunk carries at least ~kMinWork elements of
// work: tiny problems run inline instead of paying for a parallel region.
constexpr int64_t kMinWork = 32768;
inline int64_t grain_for(int64_t work_per_task) {
  return std::max<int64_t>(1, kMinWork / std::max<int64_t>(1, work_per_task));
}

std::vector<at::Tensor> contiguous_list(at::TensorList scores) {
  std::vector<at::Tensor> out;
  out.reserve(scores.size());
  for (const auto& s : scores) out.push_back(s.contiguous());
  return out;
}

void check_cpu(at::TensorList scores, const char* op) {
  TORCH_CHECK_VALUE(scores[0].device().is_cpu(), op, ": CPU kernel got scores[0] on ", scores[0].device());
  const auto st = scores[0].scalar_type();
  TORCH_CHECK_VALUE(st == at::kFloat || st == at::kDouble, op,
                    ": scores dtype ", st, " is not supported on CPU (float32 or float64)");
}

// --------------------------------------------------------------------------------------------
template <typename T>
void forward_impl(const std::vector<at::Tensor>& sc, const at::Tensor& logits, Mode mode,
                  at::Tensor& merged, at::Tensor& weights) {
  const int S = static_cast<int>(sc.size());
  const int64_t N = sc[0].size(0), C = sc[0].size(1);
  const int H0 = static_cast<int>(sc[0].size(2)), W0 = static_cast<int>(sc[0].size(3));
  const int64_t P = static_cast<int64_t>(H0) * W0;
  const Tables<T> tab(sc);
  std::vector<const T*> fp(S);
  for (int s = 0; s < S; ++s) fp[s] = sc[s].data_ptr<T>();
  T* out = merged.data_ptr<T>();
  T* w = weights.data_ptr<T>();

  if (mode != Mode::kMax) {
    if (mode == Mode::kAttention) {
      const T* lg = logits.data_ptr<T>();
      at::parallel_for(0, N * H0, grain_for(S * W0), [&](int64_t b, int64_t e) { softmax_rows<T>(lg, w, S, H0, W0, b, e); });
    } else {
      weights.fill_(1.0 / S);
    }
    const T inv_s = static_cast<T>(1.0 / S);
    at::parallel_for(0, N * C, grain_for(S * P), [&](int64_t b, int64_t e) {
      std::vector<T> rows(tab.hsize), pad(tab.wmax + 16);
      for (int64_t nc = b; nc < e; ++nc) {
        const int64_t n = nc / C;
        for (int s = 1; s < S; ++s)
          resize_rows<T>(fp[s] + nc * tab.H[s] * tab.W[s], tab.H[s], tab.W[s], tab.x[s], W0,
                         rows.data() + tab.hoff[s], pad.data());
        for (int y = 0; y < H0; ++y) {
          const int64_t yo = static_cast<int64_t>(y) * W0;
          T* __restrict o = out + nc * P + yo;
          const T* __restrict f0 = fp[0] + nc * P + yo;
          // one pass per scale, the vertical Interp blend fused into the accumulation
          if (S == 1) {
            for (int x = 0; x < W0; ++x) o[x] = f0[x];
            continue;
          }
          int s_from = 1;
          if (mode == Mode::kAttention && S >= 3) {  // scales 0, 1, 2 in one pass over the row
            const Axis<T>& ay1 = tab.y[1];
            const Axis<T>& ay2 = tab.y[2];
            const T* __restrict a1 = rows.data() + tab.hoff[1] + static_cast<int64_t>(ay1.i0[y]) * W0;
            const T* __restrict b1 = rows.data() + tab.hoff[1] + static_cast<int64_t>(ay1.i1[y]) * W0;
            const T* __restrict a2 = rows.data() + tab.hoff[2] + static_cast<int64_t>(ay2.i0[y]) * W0;
            const T* __restrict b2 = rows.data() + tab.hoff[2] + static_cast<int64_t>(ay2.i1[y]) * W0;
            const T la1 = ay1.l0[y], lb1 = ay1.l1[y], la2 = ay2.l0[y], lb2 = ay2.l1[y];
            const T* __restrict w0 = w + n * S * P + yo;
            const T* __restrict w1 = w0 + P;
            const T* __restrict w2 = w0 + 2 * P;
            for (int x = 0; x < W0; ++x) {
              const T acc = w0[x] * f0[x] + w1[x] * (la1 * a1[x] + lb1 * b1[x]);
              o[x] = acc + w2[x] * (la2 * a2[x] + lb2 * b2[x]);
            }
            s_from = 3;
          }
          for (int s = s_from; s < S; ++s) {
            const Axis<T>& ay = tab.y[s];
            const T* __restrict a = rows.data() + tab.hoff[s] + static_cast<int64_t>(ay.i0[y]) * W0;
            const T* __restrict b = rows.data() + tab.hoff[s] + static_cast<int64_t>(ay.i1[y]) * W0;
            const T la = ay.l0[y], lb = ay.l1[y];
            if (mode == Mode::kAttention) {
              const T* __restrict ws = w + (n * S + s) * P + yo;
              if (s == 1) {
                const T* __restrict w0 = w + n * S * P + yo;
                for (int x = 0; x < W0; ++x) o[x] = w0[x] * f0[x] + ws[x] * (la * a[x] + lb * b[x]);
              } else {
                for (int x = 0; x < W0; ++x) o[x] += ws[x] * (la * a[x] + lb * b[x]);
              }
            } else {
              const bool last = s == S - 1;
              if (s == 1 && last) {
                for (int x = 0; x < W0; ++x) o[x] = (f0[x] + (la * a[x] + lb * b[x])) * inv_s;
              } else if (s == 1) {
                for (int x = 0; x < W0; ++x) o[x] = f0[x] + (la * a[x] + lb * b[x]);
              } else if (last) {
                for (int x = 0; x < W0; ++x) o[x] = (o[x] + (la * a[x] + lb * b[x])) * inv_s;
              } else {
                for (int x = 0; x < W0; ++x) o[x] += la * a[x] + lb * b[x];
              }
            }
          }
        }
      }
    });
    return;
  }

  // max: merged values + per-(n, class chunk) counts of the winning scale.
  const int64_t K = class_chunks(N, C);
  const int64_t csz = (C + K - 1) / K;
  std::vector<T> counts(static_cast<size_t>(N * K * S * P), T(0));
  at::parallel_for(0, N * K, grain_for(csz * S * P), [&](int64_t b, int64_t e) {
    std::vector<T> rows(tab.hsize), upbuf(static_cast<size_t>(S) * W0), pad(tab.wmax + 16);
    std::vector<const T*> ups(S);
    std::vector<T> idx(W0);
    for (int s = 1; s < S; ++s) ups[s] = upbuf.data() + static_cast<int64_t>(s) * W0;
    for (int64_t nk = b; nk < e; ++nk) {
      const int64_t n = nk / K, k = nk % K;
      T* cnt = counts.data() + nk * S * P;
      for (int64_t c = k * csz; c < std::min(C, (k + 1) * csz); ++c) {
        const int64_t nc = n * C + c;
        for (int s = 1; s < S; ++s)
          resize_rows<T>(fp[s] + nc * tab.H[s] * tab.W[s], tab.H[s], tab.W[s], tab.x[s], W0,
                         rows.data() + tab.hoff[s], pad.data());
        for (int y = 0; y < H0; ++y) {
          for (int s = 1; s < S; ++s)
            resize_row<T>(rows.data() + tab.hoff[s], W0, tab.y[s], y, upbuf.data() + static_cast<int64_t>(s) * W0);
          max_row<T>(fp[0] + nc * P + static_cast<int64_t>(y) * W0, ups, W0,
                     out + nc * P + static_cast<int64_t>(y) * W0, idx.data());
          const T* __restrict ip = idx.data();
          for (int s = 0; s < S; ++s) {
            T* __restrict cs = cnt + s * P + static_cast<int64_t>(y) * W0;
            const T sv = static_cast<T>(s);
            for (int x = 0; x < W0; ++x) cs[x] += (ip[x] == sv) ? T(1) : T(0);
          }
        }
      }
    }
  });
  const T inv_c = static_cast<T>(1.0 / static_cast<double>(C));
  at::parallel_for(0, N * S, grain_for(K * P), [&](int64_t b, int64_t e) {
    for (int64_t ns = b; ns < e; ++ns) {
      const int64_t n = ns / S, s = ns % S;
      T* __restrict o = w + ns * P;
      for (int64_t p = 0; p < P; ++p) o[p] = T(0);
      for (int64_t k = 0; k < K; ++k) {
        const T* __restrict cs = counts.data() + ((n * K + k) * S + s) * P;
        for (int64_t p = 0; p < P; ++p) o[p] += cs[p];
      }
      for (int64_t p = 0; p < P; ++p) o[p] *= inv_c;
    }
  });
}

// --------------------------------------------------------------------------------------------
// One row y of the attention backward sweep for one (n, c) plane: scale 0's gradient
// g0 = grad * w_0, the gradient reaching each resized map G_s = grad * w_s, and the per-scale
// dot products d_s (+)= grad * up(f_s) (First: the first class of the chunk, "=" instead of
// "+=").  Scales 1 and 2 share scale 0's pass over the row.
template <typename T>
struct AttRowArgs {
  const T* g;      // grad of merged, plane (H0, W0)
  const T* f0;     // scale 0 scores, plane
  const T* w;      // softmax weights of batch item n, S planes
  T* g0;           // grad of scale 0, plane
  T* d;            // dot products, S planes
  T* gbuf;         // G_s at gbuf + s * gplane
  int64_t gplane;
  const T* rows;   // horizontally resized coarse planes
  const Tables<T>* tab;
  int S, W0;
  int64_t P;
};

// Row kernels with __restrict parameters (so that GCC vectorises them without alias checks).
template <typename T, bool First>
inline void att_row_dots3(const T* __restrict gy, const T* __restrict fy, const T* __restrict a1,
                          const T* __restrict b1, T la1, T lb1, const T* __restrict a2, const T* __restrict b2,
                          T la2, T lb2, T* __restrict d0, T* __restrict d1, T* __restrict d2, int W0) {
  for (int x = 0; x < W0; ++x) {
    const T gv = gy[x];
    const T v0 = gv * fy[x];
    const T v1 = gv * (la1 * a1[x] + lb1 * b1[x]);
    const T v2 = gv * (la2 * a2[x] + lb2 * b2[x]);
    if (First) {
      d0[x] = v0;
      d1[x] = v1;
      d2[x] = v2;
    } else {
      d0[x] += v0;
      d1[x] += v1;
      d2[x] += v2;
    }
  }
}

template <typename T>
inline void att_row_scale3(const T* __restrict gy, const T* __restrict w0, const T* __restrict w1,
                           const T* __restrict w2, T* __restrict g0, T* __restrict G1, T* __restrict G2, int W0) {
  for (int x = 0; x < W0; ++x) {
    const T gv = gy[x];
    g0[x] = gv * w0[x];
    G1[x] = gv * w1[x];
    G2[x] = gv * w2[x];
  }
}

template <typename T, bool First>
inline void att_row_one(const T* __restrict gy, const T* __restrict a, const T* __restrict b, T la, T lb,
                        const T* __restrict ws, T* __restrict ds, T* __restrict G, int W0) {
  for (int x = 0; x < W0; ++x) {
    const T v = gy[x] * (la * a[x] + lb * b[x]);
    if (First) {
      ds[x] = v;
    } else {
      ds[x] += v;
    }
    G[x] = gy[x] * ws[x];
  }
}

template <typename T, bool First>
inline void att_row_zero(const T* __restrict gy, const T* __restrict fy, const T* __restrict w0, T* __restrict d0,
                         T* __restrict g0, int W0) {
  for (int x = 0; x < W0; ++x) {
    const T v = gy[x] * fy[x];
    if (First) {
      d0[x] = v;
    } else {
      d0[x] += v;
    }
    g0[x] = gy[x] * w0[x];
  }
}

template <typename T, bool First>
inline void attention_backward_row(const AttRowArgs<T>& r, int y) {
  const int W0 = r.W0;
  const int64_t yo = static_cast<int64_t>(y) * W0, P = r.P;
  const T* gy = r.g + yo;
  const T* w0 = r.w + yo;
  T* d0 = r.d + yo;
  auto tap = [&](int s, const T*& a, const T*& b, T& la, T& lb) {
    const Axis<T>& ay = r.tab->y[s];
    a = r.rows + r.tab->hoff[s] + static_cast<int64_t>(ay.i0[y]) * W0;
    b = r.rows + r.tab->hoff[s] + static_cast<int64_t>(ay.i1[y]) * W0;
    la = ay.l0[y];
    lb = ay.l1[y];
  };
  int s_from = 1;
  if (r.S >= 3) {  // scales 0, 1, 2 share the passes over the row
    const T *a1, *b1, *a2, *b2;
    T la1, lb1, la2, lb2;
    tap(1, a1, b1, la1, lb1);
    tap(2, a2, b2, la2, lb2);
    att_row_dots3<T, First>(gy, r.f0 + yo, a1, b1, la1, lb1, a2, b2, la2, lb2, d0, d0 + P, d0 + 2 * P, W0);
    att_row_scale3<T>(gy, w0, w0 + P, w0 + 2 * P, r.g0 + yo, r.gbuf + r.gplane + yo, r.gbuf + 2 * r.gplane + yo, W0);
    s_from = 3;
  } else {
    att_row_zero<T, First>(gy, r.f0 + yo, w0, d0, r.g0 + yo, W0);
  }
  for (int s = s_from; s < r.S; ++s) {
    const T *a, *b;
    T la, lb;
    tap(s, a, b, la, lb);
    att_row_one<T, First>(gy, a, b, la, lb, w0 + static_cast<int64_t>(s) * P, d0 + static_cast<int64_t>(s) * P,
                          r.gbuf + s * r.gplane + yo, W0);
  }
}

// --------------------------------------------------------------------------------------------
// Logit gradient of one batch item from the per-scale dot products d_s = sum_c grad * up(f_s)
// (S planes of P, modified in place: the weights' own gradient gw is added to them) and the
// softmax weights w (S planes of P): glogits_s = w_s * (d_s - sum_t w_t d_t).
template <typename T>
void logits_grad_item(T* __restrict d, const T* __restrict w, const T* __restrict gw, int S, int64_t P,
                      T* __restrict dot, T* __restrict o) {
  if (gw)
    for (int64_t i = 0; i < static_cast<int64_t>(S) * P; ++i) d[i] += gw[i];
  for (int64_t p = 0; p < P; ++p) dot[p] = w[p] * d[p];
  for (int s = 1; s < S; ++s) {
    const T* __restrict ws = w + static_cast<int64_t>(s) * P;
    const T* __restrict ds = d + static_cast<int64_t>(s) * P;
    for (int64_t p = 0; p < P; ++p) dot[p] += ws[p] * ds[p];
  }
  for (int s = 0; s < S; ++s) {
    const T* __restrict ws = w + static_cast<int64_t>(s) * P;
    const T* __restrict ds = d + static_cast<int64_t>(s) * P;
    T* __restrict os = o + static_cast<int64_t>(s) * P;
    for (int64_t p = 0; p < P; ++p) os[p] = ws[p] * (ds[p] - dot[p]);
  }
}

// Number of class chunks per batch item for the attention backward: the logit gradient needs a
// reduction over classes; with one chunk (N >= 8) it is finished inside the task that owns the
// batch item, otherwise per-(n, chunk) partials are summed in a fixed order.  Depends on the
// shape only, never on the thread count.
inline int64_t attention_class_chunks(int64_t N, int64_t C) {
  return std::max<int64_t>(1, std::min<int64_t>(C, (8 + N - 1) / std::max<int64_t>(1, N)));
}

template <typename T>
void backward_impl(const at::Tensor& gout_t, const at::Tensor& gw_t, const std::vector<at::Tensor>& sc,
                   const at::Tensor& logits, Mode mode, std::vector<at::Tensor>& grads,
                   at::Tensor& glogits) {
  const int S = static_cast<int>(sc.size());
  const int64_t N = sc[0].size(0), C = sc[0].size(1);
  const int H0 = static_cast<int>(sc[0].size(2)), W0 = static_cast<int>(sc[0].size(3));
  const int64_t P = static_cast<int64_t>(H0) * W0;
  const Tables<T> tab(sc);
  std::vector<const T*> fp(S);
  std::vector<T*> gp(S);
  for (int s = 0; s < S; ++s) {
    fp[s] = sc[s].data_ptr<T>();
    gp[s] = grads[s].data_ptr<T>();
  }
  const T* go = gout_t.data_ptr<T>();
  const bool attention = mode == Mode::kAttention;
  const int64_t K = attention ? attention_class_chunks(N, C) : class_chunks(N, C);
  const int64_t csz = (C + K - 1) / K;
  const T inv_s = static_cast<T>(1.0 / S);
  const T* lg = attention ? logits.data_ptr<T>() : nullptr;
  const T* gw = (attention && gw_t.defined()) ? gw_t.data_ptr<T>() : nullptr;
  T* gl = attention ? glogits.data_ptr<T>() : nullptr;
  // attention with K > 1: per-(n, chunk) partial dot products, every entry written before read
  std::unique_ptr<T[]> dots;
  if (attention && K > 1) dots.reset(new T[static_cast<size_t>(N * K * S * P)]);
  const int64_t gplane = static_cast<int64_t>(H0 + tab.kmax_y) * W0;  // rows past H0 stay zero

  at::parallel_for(0, N * K, grain_for(csz * S * P), [&](int64_t b, int64_t e) {
    std::vector<T> rows(tab.hsize), upbuf(static_cast<size_t>(S) * W0), best(W0), pad(tab.wmax + 16);
    std::vector<const T*> ups(S);
    std::vector<T> idx(mode == Mode::kMax ? W0 : 0);
    const int W0s = (W0 + 7) / 8 * 8;
    std::vector<T> trow(static_cast<size_t>(8) * W0s, T(0));  // 8-row block; columns >= W0 stay zero
    std::vector<T> gbuf(static_cast<size_t>(std::max(S, 2)) * gplane, T(0));  // avg uses plane 1
    std::vector<T> ttr(static_cast<size_t>(W0s + tab.kmax) * 8, T(0));  // zero tail: adjoint reads past W0
    std::vector<T> wl(attention ? S * P : 0), dl(attention ? S * P : 0), dot(attention ? P : 0);
    int64_t wl_n = -1;
    for (int s = 1; s < S; ++s) ups[s] = upbuf.data() + static_cast<int64_t>(s) * W0;
    for (int64_t nk = b; nk < e; ++nk) {
      const int64_t n = nk / K, k = nk % K;
      const int64_t c0 = k * csz, c1 = std::min(C, (k + 1) * csz);
      if (attention && wl_n != n) {  // softmax weights of batch item n (recomputed, not saved)
        softmax_rows<T>(lg + n * S * P, wl.data(), S, H0, W0, 0, H0);
        wl_n = n;
      }
      const T* w = wl.data();
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t nc = n * C + c;
        const T* g = go + nc * P;
        const T* f0 = fp[0] + nc * P;
        T* g0 = gp[0] + nc * P;
        if (mode != Mode::kAvg)
          for (int s = 1; s < S; ++s)
            resize_rows<T>(fp[s] + nc * tab.H[s] * tab.W[s], tab.H[s], tab.W[s], tab.x[s], W0,
                           rows.data() + tab.hoff[s], pad.data());
        // 1) one sweep over the rows: scale 0's gradient, the gradient reaching every resized
        //    map (G_s), and (attention) the dot products grad . up(f_s) for the logit gradient,
        //    the vertical Interp blend fused in; (max) the argmax scale, bit-identical to the
        //    forward's.
        if (attention) {
          const AttRowArgs<T> ra{g, f0, w, g0, dl.data(), gbuf.data(), gplane, rows.data(), &tab, S, W0, P};
          if (c == c0) {
            for (int y = 0; y < H0; ++y) attention_backward_row<T, true>(ra, y);
          } else {
            for (int y = 0; y < H0; ++y) attention_backward_row<T, false>(ra, y);
          }
        } else if (mode == Mode::kAvg) {
          T* __restrict G = gbuf.data() + gplane;  // the same for every coarse scale
          for (int64_t p = 0; p < P; ++p) {
            const T v = g[p] * inv_s;
            g0[p] = v;
            G[p] = v;
          }
        } else {
          for (int y = 0; y < H0; ++y) {
            const int64_t yo = static_cast<int64_t>(y) * W0;
            for (int s = 1; s < S; ++s)
              resize_row<T>(rows.data() + tab.hoff[s], W0, tab.y[s], y, upbuf.data() + static_cast<int64_t>(s) * W0);
            max_row<T>(f0 + yo, ups, W0, best.data(), idx.data());
            const T* __restrict ip = idx.data();
            const T* __restrict gy = g + yo;
            T* __restrict g0y = g0 + yo;
            for (int x = 0; x < W0; ++x) g0y[x] = (ip[x] == T(0)) ? gy[x] : T(0);
            for (int s = 1; s < S; ++s) {
              T* __restrict G = gbuf.data() + s * gplane + yo;
              const T sv = static_cast<T>(s);
              for (int x = 0; x < W0; ++x) G[x] = (ip[x] == sv) ? gy[x] : T(0);  // select: vectorises
            }
          }
        }
        // 2) coarser scales: gather G_s through the inverse Interp tables.
        for (int s = 1; s < S; ++s) {
          const Axis<T>& ay = tab.y[s];
          const Axis<T>& ax = tab.x[s];
          const int Hs = tab.H[s], Ws = tab.W[s];
          T* gs = gp[s] + nc * Hs * Ws;
          const T* G = gbuf.data() + (mode == Mode::kAvg ? 1 : s) * gplane;
          T* __restrict t = trow.data();
          T* __restrict tt = ttr.data();
          for (int r = 0; r < Hs; ++r) {
            const int lane = r % 8;
            // vertical adjoint: row `lane` of the 8-row block = sum_k wpad[r][k] * G[first[r] + k]
            vertical_adjoint<T>(G, W0, ay, r, t + static_cast<int64_t>(lane) * W0s);
            if (lane == 7 || r == Hs - 1) {
              // transpose the block (8 x W0s -> W0s x 8); the horizontal adjoint then runs on 8 rows at once
              transpose8<T>(t, W0s, tt);
              adjoint_cols8<T>(tt, ax, lane + 1, gs + static_cast<int64_t>(r - lane) * Ws);
            }
          }
        }
      }
      if (attention) {
        if (K == 1) {  // 3) the logit gradient of batch item n, while its data is hot
          logits_grad_item<T>(dl.data(), w, gw ? gw + n * S * P : nullptr, S, P, dot.data(), gl + n * S * P);
        } else {
          std::memcpy(dots.get() + nk * S * P, dl.data(), sizeof(T) * static_cast<size_t>(S * P));
        }
      }
    }
  });

  if (!attention || K == 1) return;
  // 3) logit gradient from the per-(n, chunk) partials, summed in chunk order.
  at::parallel_for(0, N, grain_for((K + 3) * S * P), [&](int64_t b, int64_t e) {
    std::vector<T> wl(S * P), dsum(S * P), dot(P);
    for (int64_t n = b; n < e; ++n) {
      softmax_rows<T>(lg + n * S * P, wl.data(), S, H0, W0, 0, H0);
      T* __restrict d = dsum.data();
      const T* __restrict d0 = dots.get() + n * K * S * P;
      for (int64_t i = 0; i < S * P; ++i) d[i] = d0[i];
      for (int64_t k = 1; k < K; ++k) {
        const T* __restrict dk = dots.get() + (n * K + k) * S * P;
        for (int64_t i = 0; i < S * P; ++i) d[i] += dk[i];
      }
      logits_grad_item<T>(d, wl.data(), gw ? gw + n * S * P : nullptr, S, P, dot.data(), gl + n * S * P);
    }
  });
}
// --------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> scale_merge_cpu(at::TensorList scores_in,
                                                   const std::optional<at::Tensor>& logits_in,
                                                   c10::string_view mode_str) {
  const Mode mode = check_forward_inputs(scores_in, logits_in, mode_str);
  check_cpu(scores_in, "scale_merge");
  const std::vector<at::Tensor> sc = contiguous_list(scores_in);
  const at::Tensor logits = mode == Mode::kAttention ? logits_in->contiguous() : at::Tensor();
  const int64_t N = sc[0].size(0), C = sc[0].size(1), H0 = sc[0].size(2), W0 = sc[0].size(3);
  const int64_t S = static_cast<int64_t>(sc.size());
  at::Tensor merged = at::empty({N, C, H0, W0}, sc[0].options());
  at::Tensor weights = at::empty({N, S, H0, W0}, sc[0].options());
  if (N == 0) return {merged, weights};
  AT_DISPATCH_FLOATING_TYPES(sc[0].scalar_type(), "scale_merge_cpu",
                             [&] { forward_impl<scalar_t>(sc, logits, mode, merged, weights); });
  return {merged, weights};
}

std::tuple<std::vector<at::Tensor>, at::Tensor> scale_merge_backward_cpu(
    const at::Tensor& grad_merged, const std::optional<at::Tensor>& grad_weights, at::TensorList scores_in,
    const std::optional<at::Tensor>& logits_in, c10::string_view mode_str) {
  const Mode mode = check_backward_inputs(grad_merged, grad_weights, scores_in, logits_in, mode_str);
  check_cpu(scores_in, "scale_merge_backward");
  const std::vector<at::Tensor> sc = contiguous_list(scores_in);
  const at::Tensor logits = mode == Mode::kAttention ? logits_in->contiguous() : at::Tensor();
  const at::Tensor gout = grad_merged.contiguous();
  const at::Tensor gw = (mode == Mode::kAttention && grad_weights.has_value() && grad_weights->defined())
                            ? grad_weights->contiguous()
                            : at::Tensor();
  std::vector<at::Tensor> grads;
  for (const auto& s : sc) grads.push_back(at::empty_like(s));
  at::Tensor glogits = mode == Mode::kAttention ? at::empty_like(logits) : at::empty({0}, sc[0].options());
  if (sc[0].size(0) == 0) return {grads, glogits};
  AT_DISPATCH_FLOATING_TYPES(sc[0].scalar_type(), "scale_merge_backward_cpu", [&] {
    backward_impl<scalar_t>(gout, gw, sc, logits, mode, grads, glogits);
  });
  return {grads, glogits};
}

}  // namespace
}  // namespace scale_merge
}  // namespace attnscale

TORCH_LIBRARY_IMPL(attnscale, CPU, m) {
  m.impl("scale_merge", &attnscale::scale_merge::scale_merge_cpu);
  m.impl("scale_merge_backward", &attnscale::scale_merge::scale_merge_backward_cpu);
}
