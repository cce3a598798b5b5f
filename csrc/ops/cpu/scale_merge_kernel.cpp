// CPU kernels of attnscale::scale_merge and attnscale::scale_merge_backward (float, double).
//
// Layout of the work (one pass over the data, no temporaries of size N*S*C*H*W):
// - Interp tables are built once per call: for every destination row/column its two source
//   indices and lambdas (Caffe float arithmetic, scale_merge_interp.h) and their inverse (for every
//   source row/column the contiguous range of destination indices that touch it, with weights).
// - A coarse plane is resized separably: a horizontal pass into a small per-thread buffer of
//   H_s x W0 rows (with AVX2 each block of 8 outputs is one in-row 8-wide load and two permutes,
//   with AVX-512 16 outputs), then each output row is a 2-tap blend of two such rows fused into the
//   merge.  Rows are processed in blocks of 8 (Vec8: one AVX2 register for float) or, for float rows
//   of 16 or more on AVX-512 builds, 16 (Vec16f: lane by lane the same arithmetic, so the results are
//   bit-identical); when the width does not divide W0 a last block at W0 - width overlaps its
//   neighbour, which is harmless because every such block computes pure functions of its pixels.
//   Groups of up to 5 blocks (as many as the vector registers hold: a whole 41- or 65-wide row with
//   AVX-512's 32, half a 41-wide row with AVX2's 16) stay in registers while the classes or rows loop
//   around them.
// - Forward, per (n, class chunk): the row taps of every scale come from a table built once per
//   call; per row, set up once for the chunk's classes, one pass per class accumulates all scales
//   in registers.
// - Backward (attention), per (n, class chunk) task: the chunk's coarse planes are resized
//   horizontally, then one sweep over the rows with the classes innermost keeps the dot products
//   d_s = sum_c grad_c . up(f_s)_c in registers, stores scale 0's gradient on the way and finishes
//   the logit gradient w_s (d_s - sum_t w_t d_t) right there when the chunk holds every class
//   (N >= 8); otherwise per-chunk partials are summed in chunk order.  Each coarser score map's
//   gradient is Interp^T (grad_c * w_s), with grad * w formed on the fly: the vertical adjoint in
//   one pass over the destination rows, each feeding the two source rows it touches (held in
//   registers), 8 source rows transposed, then the horizontal adjoint on 8 rows at once.  No atomics,
//   fixed summation orders, chunk counts that depend on the shape only: deterministic whatever the
//   thread count.
// - avg: grad / S for scale 0 and through Interp^T.  max: the backward recomputes the argmax
//   scale with the very same (non-inlined) routines as the forward, so the gradient goes to the
//   scale that produced the forward value; the weights are per-(n, class chunk) partial counts.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
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

  // copy: the scale's map keeps both its sizes (Caffe's Interp copies; an axis alone blends)
  void build(int in_, int out_, bool copy) {
    in = in_;
    out = out_;
    const float ratio = copy ? kInterpCopy : interp_ratio(in, out);
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
    identity = copy;
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
    win8.build(8, *this);
    win16.build(16, *this);
    // Blocks read from a padded copy of the row when win8 is not ok: i0 - base lies in [0, 7]
    // because the ratio is <= 1.
    const std::vector<int>& bx = win8.bx;
    base.assign(bx.size(), 0);
    perm.assign(bx.size() * 8, 0);
    for (size_t b = 0; b < bx.size(); ++b) {
      base[b] = i0[bx[b]];
      for (int k = 0; k < 8; ++k) {
        perm[8 * b + k] = i0[bx[b] + k] - base[b];
        TORCH_CHECK(perm[8 * b + k] >= 0 && perm[8 * b + k] < 8, "scale_merge: internal error (Interp block)");
      }
    }
  }

  // L-wide blocks of destinations starting at bx[b] = 0, L, 2L, ... and, when L does not divide
  // out, one last block starting at out - L that overlaps its neighbour (the outputs are pure
  // functions of the destination index, so computing a few twice is harmless and leaves no scalar
  // tail).  Single-load blocks: when both taps of the L outputs of every block lie in one L-wide
  // window [q[b], q[b] + L) inside the source row (ok), one load + two permutes give them without
  // copying the row into a padded buffer (whose freshly stored bytes would stall the loads).
  struct Windows {
    bool ok = false;
    std::vector<int> bx, q;
    std::vector<int32_t> p0, p1;  // tap positions in the window, L per block
    void build(int L, const Axis& a) {
      const int nb = a.out >= L ? (a.out + L - 1) / L : 0;
      ok = a.in >= L && nb > 0;
      bx.assign(nb, 0);
      q.assign(nb, 0);
      p0.assign(static_cast<size_t>(nb) * L, 0);
      p1.assign(static_cast<size_t>(nb) * L, 0);
      for (int b = 0; b < nb; ++b) bx[b] = std::min(L * b, a.out - L);
      for (int b = 0; b < nb && ok; ++b) {
        q[b] = std::min(a.i0[bx[b]], a.in - L);
        for (int k = 0; k < L; ++k) {
          p0[L * b + k] = a.i0[bx[b] + k] - q[b];
          p1[L * b + k] = a.i1[bx[b] + k] - q[b];
          if (p0[L * b + k] < 0 || p1[L * b + k] >= L) ok = false;
        }
      }
    }
  };
  Windows win8, win16;

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
      const bool copy = H[s] == H0 && W[s] == W0;
      y[s].build(H[s], H0, copy);
      x[s].build(W[s], W0, copy);
      wmax = std::max(wmax, W[s]);
      kmax = std::max(kmax, x[s].kmax);
      hoff[s] = hsize;
      hsize += static_cast<int64_t>(H[s]) * W0;
    }
  }
};

// Horizontal pass of one coarse plane: rows[r][x] = l0[x] f[r][i0[x]] + l1[x] f[r][i1[x]].
// Not inlined: the forward and the backward's recomputation must produce bit-identical values.
// With AVX2, 8 outputs are two permutes of one in-row 8-wide load when both taps of the block fit
// in one window (always for the DeepLab sizes), else of two loads from a copy of the row padded
// with its last element (f[i1] = pad[i0 + 1]); no gathers.
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
#if defined(__AVX512F__)
  if constexpr (std::is_same<T, float>::value) {
    if (ax.win16.ok) {  // as the 8-wide single-load blocks below, 16 outputs at a time
      const auto& wn = ax.win16;
      for (size_t b = 0; b < wn.bx.size(); ++b) {
        const int x = wn.bx[b];
        const __m512i i0v = _mm512_loadu_si512(wn.p0.data() + 16 * b);
        const __m512i i1v = _mm512_loadu_si512(wn.p1.data() + 16 * b);
        const __m512 l0v = _mm512_loadu_ps(l0 + x), l1v = _mm512_loadu_ps(l1 + x);
        const T* __restrict src = f + wn.q[b];
        T* __restrict d = rows + x;
        for (int r = 0; r < Hs; ++r) {
          const __m512 v = _mm512_loadu_ps(src + static_cast<int64_t>(r) * Ws);
          const __m512 o = _mm512_add_ps(_mm512_mul_ps(l0v, _mm512_permutexvar_ps(i0v, v)),
                                         _mm512_mul_ps(l1v, _mm512_permutexvar_ps(i1v, v)));
          _mm512_storeu_ps(d + static_cast<int64_t>(r) * W0, o);
        }
      }
      return;
    }
  }
#endif
#if defined(__AVX2__)
  if constexpr (std::is_same<T, float>::value) {
    const int nb = static_cast<int>(ax.win8.bx.size());
    const int* __restrict bx = ax.win8.bx.data();
    if (ax.win8.ok) {
      const int* __restrict q1 = ax.win8.q.data();
      const int32_t* __restrict p0 = ax.win8.p0.data();
      const int32_t* __restrict p1 = ax.win8.p1.data();
      // blocks outer, rows inner: a block's permutes and lambdas stay in registers for all rows
      for (int b = 0; b < nb; ++b) {
        const int x = bx[b];
        const __m256i i0v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p0 + 8 * b));
        const __m256i i1v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p1 + 8 * b));
        const __m256 l0v = _mm256_loadu_ps(l0 + x), l1v = _mm256_loadu_ps(l1 + x);
        const T* __restrict src = f + q1[b];
        T* __restrict d = rows + x;
        for (int r = 0; r < Hs; ++r) {
          const __m256 v = _mm256_loadu_ps(src + static_cast<int64_t>(r) * Ws);
          const __m256 o = _mm256_add_ps(_mm256_mul_ps(l0v, _mm256_permutevar8x32_ps(v, i0v)),
                                         _mm256_mul_ps(l1v, _mm256_permutevar8x32_ps(v, i1v)));
          _mm256_storeu_ps(d + static_cast<int64_t>(r) * W0, o);
        }
      }
      return;
    }
    if (nb > 0) {
      const int* __restrict base = ax.base.data();
      const int32_t* __restrict perm = ax.perm.data();
      for (int r = 0; r < Hs; ++r) {
        const T* __restrict src = f + static_cast<int64_t>(r) * Ws;
        T* __restrict d = rows + static_cast<int64_t>(r) * W0;
        std::memcpy(pad, src, sizeof(T) * Ws);
        for (int k = 0; k < 9; ++k) pad[Ws + k] = src[Ws - 1];
        for (int b = 0; b < nb; ++b) {
          const int x = bx[b];
          const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(perm + 8 * b));
          const __m256 a = _mm256_permutevar8x32_ps(_mm256_loadu_ps(pad + base[b]), p);
          const __m256 c = _mm256_permutevar8x32_ps(_mm256_loadu_ps(pad + base[b] + 1), p);
          const __m256 v = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(l0 + x), a),
                                         _mm256_mul_ps(_mm256_loadu_ps(l1 + x), c));
          _mm256_storeu_ps(d + x, v);
        }
      }
      return;
    }
  }
#endif
  const int* __restrict i1 = ax.i1.data();
  for (int r = 0; r < Hs; ++r) {
    const T* __restrict src = f + static_cast<int64_t>(r) * Ws;
    T* __restrict d = rows + static_cast<int64_t>(r) * W0;
    for (int x = 0; x < W0; ++x) d[x] = l0[x] * src[i0[x]] + l1[x] * src[i1[x]];
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

#if defined(__AVX2__)
// In-register 8 x 8 transpose: r[i] lane j  ->  r[j] lane i.
inline void transpose8x8(__m256 r[8]) {
  __m256 u[8], v[8];
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
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(v[i], v[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(v[i], v[i + 4], 0x31);
  }
}
#endif

// Transpose an 8 x W (W a multiple of 8) block of rows with stride W into dst[x * 8 + row].
template <typename T>
inline void transpose8(const T* __restrict src, int W, T* __restrict dst) {
#if defined(__AVX2__)
  if constexpr (std::is_same<T, float>::value) {
    for (int x = 0; x < W; x += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + static_cast<int64_t>(i) * W + x);
      transpose8x8(r);
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(dst + static_cast<int64_t>(x) * 8 + i * 8, r[i]);
    }
    return;
  }
#endif
  for (int x = 0; x < W; ++x)
    for (int i = 0; i < 8; ++i) dst[static_cast<int64_t>(x) * 8 + i] = src[static_cast<int64_t>(i) * W + x];
}

// Horizontal adjoint of a block of up to 8 rows stored transposed (tt[x * 8 + lane]):
// grow[lane][j] = sum_k wpad[j][k] * tt[(first[j] + k) * 8 + lane].  Fixed summation order (k
// ascending), no atomics.  With AVX2 the sums of 8 columns j are 8 registers (lanes = rows),
// transposed back in registers and stored as 8-wide row pieces; when 8 does not divide Ws the
// last block overlaps its neighbour (each column's value is a pure function of j).
template <typename T, int K>
inline void adjoint_cols8_k(const T* __restrict tt, const int* __restrict first, const T* __restrict wp, int Ws,
                            int nrows, T* __restrict grow) {
#if defined(__AVX2__) && defined(__FMA__)
  if constexpr (std::is_same<T, float>::value) {
    if (Ws >= 8) {
      for (int jb = 0; jb < Ws; jb += 8) {
        const int j0 = std::min(jb, Ws - 8);
        __m256 acc[8];
        for (int i = 0; i < 8; ++i) {
          const int j = j0 + i;
          const float* tp = tt + static_cast<int64_t>(first[j]) * 8;
          const float* ww = wp + static_cast<int64_t>(j) * K;
          __m256 a = _mm256_mul_ps(_mm256_set1_ps(ww[0]), _mm256_loadu_ps(tp));
          for (int k = 1; k < K; ++k) a = _mm256_fmadd_ps(_mm256_set1_ps(ww[k]), _mm256_loadu_ps(tp + k * 8), a);
          acc[i] = a;
        }
        transpose8x8(acc);
        for (int l = 0; l < nrows; ++l) _mm256_storeu_ps(grow + static_cast<int64_t>(l) * Ws + j0, acc[l]);
      }
      return;
    }
  }
#endif
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

// Caffe Eltwise MAX over the scales for one row, with the CPU EltwiseLayer's rule: scale 1 wins over
// scale 0 unless scale 0 is greater (``a > b ? 0 : 1``, so also when either is NaN), a later scale
// only if strictly greater.
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
      const bool g = s == 1 ? !(bx > ux) : ux > bx;
      const T nb = g ? ux : bx;
      const T ni = g ? sv : ix;
      best[x] = nb;
      idx[x] = ni;
    }
  }
}

// Softmax over the S planes of one batch item's logits (l, w: S planes of P), pixels
// [p_begin, p_end), computed in float for float and double for double, max-subtracted.  Flat
// loops over pixel blocks of kSoftmaxBlock (the planes are contiguous: no row structure).
constexpr int64_t kSoftmaxBlock = 512;
template <typename T>
void softmax_pixels(const T* __restrict l, T* __restrict w, int64_t S, int64_t P, int64_t p_begin, int64_t p_end) {
  T m[kSoftmaxBlock], sum[kSoftmaxBlock];
  for (int64_t p0 = p_begin; p0 < p_end; p0 += kSoftmaxBlock) {
    const int64_t n = std::min(kSoftmaxBlock, p_end - p0);
    for (int64_t i = 0; i < n; ++i) {
      m[i] = l[p0 + i];
      sum[i] = T(0);
    }
    for (int64_t s = 1; s < S; ++s) {
      const T* __restrict ls = l + s * P + p0;
      for (int64_t i = 0; i < n; ++i) m[i] = ls[i] > m[i] ? ls[i] : m[i];
    }
    for (int64_t s = 0; s < S; ++s) {
      const T* __restrict ls = l + s * P + p0;
      T* __restrict os = w + s * P + p0;
      for (int64_t i = 0; i < n; ++i) {
        const T e = exp_nonpos(ls[i] - m[i]);
        os[i] = e;
        sum[i] += e;
      }
    }
    for (int64_t i = 0; i < n; ++i) sum[i] = T(1) / sum[i];
    for (int64_t s = 0; s < S; ++s) {
      T* __restrict os = w + s * P + p0;
      for (int64_t i = 0; i < n; ++i) os[i] *= sum[i];
    }
  }
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

// --------------------------------------------------------------------------------------------
// Eight lanes of T: one AVX2 register for float, plain loops otherwise (double, non-AVX2 builds).
// The block kernels below are written once against it; their accumulators stay in registers.
template <typename T>
struct Vec8 {
  static constexpr int kLanes = 8;
  static constexpr int kRegisters = 0;  // an array, not a register: no row-in-registers paths
  T v[8];
  static Vec8 load(const T* p) {
    Vec8 r;
    for (int l = 0; l < 8; ++l) r.v[l] = p[l];
    return r;
  }
  static Vec8 set1(T a) {
    Vec8 r;
    for (int l = 0; l < 8; ++l) r.v[l] = a;
    return r;
  }
  void store(T* p) const {
    for (int l = 0; l < 8; ++l) p[l] = v[l];
  }
  friend Vec8 operator+(const Vec8& a, const Vec8& b) {
    Vec8 r;
    for (int l = 0; l < 8; ++l) r.v[l] = a.v[l] + b.v[l];
    return r;
  }
  friend Vec8 operator-(const Vec8& a, const Vec8& b) {
    Vec8 r;
    for (int l = 0; l < 8; ++l) r.v[l] = a.v[l] - b.v[l];
    return r;
  }
  friend Vec8 operator*(const Vec8& a, const Vec8& b) {
    Vec8 r;
    for (int l = 0; l < 8; ++l) r.v[l] = a.v[l] * b.v[l];
    return r;
  }
  friend Vec8 fmadd(const Vec8& a, const Vec8& b, const Vec8& c) { return a * b + c; }  // a * b + c
};
#if defined(__AVX2__) && defined(__FMA__)
template <>
struct Vec8<float> {
  static constexpr int kLanes = 8;
  static constexpr int kRegisters = 16;  // AVX2
  __m256 v;
  static Vec8 load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static Vec8 set1(float a) { return {_mm256_set1_ps(a)}; }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  friend Vec8 operator+(const Vec8& a, const Vec8& b) { return {_mm256_add_ps(a.v, b.v)}; }
  friend Vec8 operator-(const Vec8& a, const Vec8& b) { return {_mm256_sub_ps(a.v, b.v)}; }
  friend Vec8 operator*(const Vec8& a, const Vec8& b) { return {_mm256_mul_ps(a.v, b.v)}; }
  friend Vec8 fmadd(const Vec8& a, const Vec8& b, const Vec8& c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
};
#endif

// Sixteen float lanes: one AVX-512 register.  Lane by lane the same operations as Vec8<float>, so
// the kernels give bit-identical results with either; rows of 16 or more use it (half the
// instructions on cores with 512-bit data paths), narrower rows Vec8.
#if defined(__AVX512F__)
struct Vec16f {
  static constexpr int kLanes = 16;
  static constexpr int kRegisters = 32;  // AVX-512
  __m512 v;
  static Vec16f load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static Vec16f set1(float a) { return {_mm512_set1_ps(a)}; }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  friend Vec16f operator+(const Vec16f& a, const Vec16f& b) { return {_mm512_add_ps(a.v, b.v)}; }
  friend Vec16f operator-(const Vec16f& a, const Vec16f& b) { return {_mm512_sub_ps(a.v, b.v)}; }
  friend Vec16f operator*(const Vec16f& a, const Vec16f& b) { return {_mm512_mul_ps(a.v, b.v)}; }
  friend Vec16f fmadd(const Vec16f& a, const Vec16f& b, const Vec16f& c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
};
#endif

template <typename V>
struct VecTag {
  using type = V;
};
// Calls fn(VecTag<V>()) with V the widest vector of T whose lanes fit in a row of W elements
// (Vec16f for float rows of 16 or more on AVX-512 builds), else Vec8<T>.
template <typename T, typename Fn>
inline void dispatch_vec(int W, Fn&& fn) {
#if defined(__AVX512F__)
  if constexpr (std::is_same<T, float>::value) {
    if (W >= Vec16f::kLanes) return fn(VecTag<Vec16f>());
  }
#endif
  fn(VecTag<Vec8<T>>());
}

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

// The CPU kernels keep per-scale pointers and accumulators in fixed arrays of kMaxScales.
constexpr int64_t kMaxScales = 16;

void check_cpu(at::TensorList scores, const char* op) {
  TORCH_CHECK_VALUE(static_cast<int64_t>(scores.size()) <= kMaxScales, op, ": the CPU kernel merges at most ",
                    kMaxScales, " scales, got ", scores.size());
  TORCH_CHECK_VALUE(scores[0].device().is_cpu(), op, ": CPU kernel got scores[0] on ", scores[0].device());
  const auto st = scores[0].scalar_type();
  TORCH_CHECK_VALUE(st == at::kFloat || st == at::kDouble, op,
                    ": scores dtype ", st, " is not supported on CPU (float32 or float64)");
}

// Where the values of destination row y come from, per coarse scale s: rows i0(y) and i1(y) of
// the horizontally resized plane (offsets into the per-plane scratch) and their lambdas.  Built
// once per call, entry y * S + s.
template <typename T>
struct RowTaps {
  std::vector<int64_t> ra, rb;
  std::vector<T> la, lb;
  RowTaps(const Tables<T>& tab, int S, int H0, int W0)
      : ra(static_cast<size_t>(H0) * S, 0), rb(ra.size(), 0), la(ra.size(), T(0)), lb(ra.size(), T(0)) {
    for (int y = 0; y < H0; ++y)
      for (int s = 1; s < S; ++s) {
        const Axis<T>& ay = tab.y[s];
        const size_t i = static_cast<size_t>(y) * S + s;
        ra[i] = tab.hoff[s] + static_cast<int64_t>(ay.i0[y]) * W0;
        rb[i] = tab.hoff[s] + static_cast<int64_t>(ay.i1[y]) * W0;
        la[i] = ay.l0[y];
        lb[i] = ay.l1[y];
      }
  }
};

// Calls full(x) for L-wide blocks x = 0, L, ... and, when L does not divide W, once more at
// W - L (overlapping: only for computations whose outputs are pure functions of x); rows
// narrower than L go one element at a time through one(x).
template <int L, typename Full, typename One>
inline void for_blocks(int W, Full&& full, One&& one) {
  if (W < L) {
    for (int x = 0; x < W; ++x) one(x);
    return;
  }
  for (int x = 0; x + L <= W; x += L) full(x);
  if (W % L) full(W - L);
}

// Calls fn(std::integral_constant<int, NS>) with NS = S - 1 coarse scales when S <= 4 (the
// per-scale loops are then unrolled and their pointers and lambdas kept in registers), else
// with NS = -1 (any S, runtime loops).
template <typename Fn>
inline void dispatch_coarse(int S, Fn&& fn) {
  switch (S) {
    case 1: return fn(std::integral_constant<int, 0>());
    case 2: return fn(std::integral_constant<int, 1>());
    case 3: return fn(std::integral_constant<int, 2>());
    case 4: return fn(std::integral_constant<int, 3>());
    default: return fn(std::integral_constant<int, -1>());
  }
}

// Row groups: the kernels below can hold G blocks of V (a group) in registers while the classes or rows
// loop around them, each class or row setting up its pointers once per group.  The groups cover the
// row: group g starts at xg = min(g G lanes, W - G lanes); when one group covers the whole row
// (G = ceil(W / lanes)) its last block starts at W - lanes, overlapping the one before.  Block b of a group
// starts at xg + b lanes, the last one at xg + last(xg): constant offsets but for that last block.
template <int G, int L>
struct RowGroups {
  int W;
  int count() const { return (W + G * L - 1) / (G * L); }
  int start(int g) const { return std::min(g * G * L, W - G * L > 0 ? W - G * L : 0); }
  int last(int xg) const { return std::min((G - 1) * L, W - L - xg); }  // offset of block G - 1
};

// Calls fn(std::integral_constant<int, G>) with G the number of blocks of V per group for a kernel keeping
// PerBlock registers per block and Fixed more: as many as fit in 13 of AVX2's 16 or 26 of AVX-512's 32
// vector registers, at most 5, and no more than the row needs; G = 0 (the kernels' block-by-block
// loops) for rows narrower than one block and for Vec8<double> and the other non-register types.
template <typename V, int PerBlock, int Fixed, int G = 5, typename Fn>
inline void dispatch_row_groups(int W, Fn&& fn) {
  if constexpr (G == 0) {
    fn(std::integral_constant<int, 0>());
  } else {
    constexpr int budget = V::kRegisters == 32 ? 26 : V::kRegisters == 16 ? 13 : 0;
    if constexpr (G * PerBlock + Fixed <= budget) {
      constexpr int L = V::kLanes;
      if (W >= L && (G == 1 || (W + L - 1) / L >= G)) {
        // G fits and the row has at least G blocks: G, unless the row needs fewer than the budget allows
        return fn(std::integral_constant<int, G>());
      }
    }
    dispatch_row_groups<V, PerBlock, Fixed, G - 1>(W, std::forward<Fn>(fn));
  }
}

// The merged planes of ncls consecutive classes of one batch item, row by row and the classes
// innermost, so that a row's Interp taps, lambdas and weight rows are set up once for all of them:
// attention sum_s w_s up(f_s) (accumulated in scale order), avg (sum_s up(f_s)) / S, the vertical
// Interp blend fused in.  NS coarse scales (-1: S - 1 at run time).  rows: the classes' horizontally
// resized coarse maps (class stride hsize); w: the item's S weight planes.  V: the vector type.
// G > 0: per group of G blocks of V (RowGroups), the group's weights stay in registers while the
// classes loop around it; G = 0: block by block.
template <typename T, typename V, bool Attention, int NS, int G>
void merge_rows(int S, int H0, int W0, int ncls, const T* __restrict f0, const T* rows, int64_t hsize,
                const RowTaps<T>& taps, const T* w, T inv_s, T* __restrict o) {
  constexpr int kL = NS >= 0 ? NS + 1 : static_cast<int>(kMaxScales);
  const int ns = NS >= 0 ? NS : S - 1;
  const int64_t P = static_cast<int64_t>(H0) * W0;
  for (int y = 0; y < H0; ++y) {
    const int64_t yo = static_cast<int64_t>(y) * W0;
    int64_t ra[kL], rb[kL];
    const T* ws[kL];
    T la[kL], lb[kL];
    for (int s = 0; s <= ns; ++s) {
      const size_t i = static_cast<size_t>(y) * S + s;
      ra[s] = taps.ra[i];
      rb[s] = taps.rb[i];
      la[s] = taps.la[i];
      lb[s] = taps.lb[i];
      ws[s] = Attention ? w + s * P + yo : nullptr;
    }
    if constexpr (G > 0) {
      constexpr int L = V::kLanes;
      const RowGroups<G, L> groups{W0};
      V lav[kL], lbv[kL];
      for (int s = 1; s <= ns; ++s) {
        lav[s] = V::set1(la[s]);
        lbv[s] = V::set1(lb[s]);
      }
      for (int gi = 0; gi < groups.count(); ++gi) {
        const int xg = groups.start(gi), xlast = groups.last(xg);
        V wv[G][kL];
        const T* pa[kL];
        const T* pb[kL];
        if (Attention)
          for (int b = 0; b < G; ++b)
            for (int s = 0; s <= ns; ++s) wv[b][s] = V::load(ws[s] + xg + (b < G - 1 ? b * L : xlast));
        for (int s = 1; s <= ns; ++s) {
          pa[s] = rows + ra[s] + xg;
          pb[s] = rows + rb[s] + xg;
        }
        const T* fy = f0 + yo + xg;
        T* oy = o + yo + xg;
        for (int c = 0; c < ncls; ++c, fy += P, oy += P) {
          for (int b = 0; b < G; ++b) {
            const int x = b < G - 1 ? b * L : xlast;
            V acc = Attention ? wv[b][0] * V::load(fy + x) : V::load(fy + x);
            for (int s = 1; s <= ns; ++s) {
              const V up = fmadd(lav[s], V::load(pa[s] + x), lbv[s] * V::load(pb[s] + x));
              acc = Attention ? fmadd(wv[b][s], up, acc) : acc + up;
            }
            if (!Attention && S > 1) acc = acc * V::set1(inv_s);
            acc.store(oy + x);
          }
          for (int s = 1; s <= ns; ++s) {
            pa[s] += hsize;
            pb[s] += hsize;
          }
        }
      }
      continue;
    }
    // per block of pixels the classes innermost: the block's weights and the row's lambdas stay in
    // registers, each class costs its loads, blends and one store
    auto block = [&](int x) {
      V wv[kL], lav[kL], lbv[kL];
      for (int s = 0; s <= ns; ++s) {
        if (Attention) wv[s] = V::load(ws[s] + x);
        lav[s] = V::set1(la[s]);
        lbv[s] = V::set1(lb[s]);
      }
      const T* fy = f0 + yo + x;
      T* oy = o + yo + x;
      const T* rc = rows + x;
      for (int c = 0; c < ncls; ++c, fy += P, oy += P, rc += hsize) {
        V acc = Attention ? wv[0] * V::load(fy) : V::load(fy);
        for (int s = 1; s <= ns; ++s) {
          const V up = fmadd(lav[s], V::load(rc + ra[s]), lbv[s] * V::load(rc + rb[s]));
          acc = Attention ? fmadd(wv[s], up, acc) : acc + up;
        }
        if (!Attention && S > 1) acc = acc * V::set1(inv_s);
        acc.store(oy);
      }
    };
    auto one = [&](int x) {
      for (int c = 0; c < ncls; ++c) {
        const T* fy = f0 + c * P + yo;
        const T* rc = rows + c * hsize + x;
        T acc = Attention ? ws[0][x] * fy[x] : fy[x];
        for (int s = 1; s <= ns; ++s) {
          const T up = la[s] * rc[ra[s]] + lb[s] * rc[rb[s]];
          acc += Attention ? ws[s][x] * up : up;
        }
        o[c * P + yo + x] = (!Attention && S > 1) ? acc * inv_s : acc;
      }
    };
    for_blocks<V::kLanes>(W0, block, one);
  }
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
      const int64_t nb = (P + kSoftmaxBlock - 1) / kSoftmaxBlock;
      at::parallel_for(0, N * nb, grain_for(S * kSoftmaxBlock), [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          const int64_t n = i / nb, p0 = (i % nb) * kSoftmaxBlock;
          softmax_pixels<T>(lg + n * S * P, w + n * S * P, S, P, p0, std::min(P, p0 + kSoftmaxBlock));
        }
      });
    } else {
      weights.fill_(static_cast<double>(avg_coefficient<T>(S)));
    }
    const bool attention = mode == Mode::kAttention;
    const T inv_s = avg_coefficient<T>(S);
    const RowTaps<T> taps(tab, S, H0, W0);
    // ~32 tasks: even shares for a few threads (N = 1: one class per task), and for N >= 8 chunks of
    // several classes that share each row's set-up
    const ClassSplit split = split_classes(C, (32 + N - 1) / N);
    const int64_t K = split.chunks, csz = split.size;
    at::parallel_for(0, N * K, grain_for(csz * S * P), [&](int64_t b, int64_t e) {
      // the chunk's horizontally resized coarse planes (resize_rows writes every entry: no zero fill)
      const std::unique_ptr<T[]> rows(new T[csz * tab.hsize]);
      std::vector<T> pad(tab.wmax + 16);
      for (int64_t nk = b; nk < e; ++nk) {
        const int64_t n = nk / K, c0 = (nk % K) * csz, c1 = std::min(C, c0 + csz);
        for (int64_t c = c0; c < c1; ++c)
          for (int s = 1; s < S; ++s)
            resize_rows<T>(fp[s] + (n * C + c) * tab.H[s] * tab.W[s], tab.H[s], tab.W[s], tab.x[s], W0,
                           rows.get() + (c - c0) * tab.hsize + tab.hoff[s], pad.data());
        const int ncls = static_cast<int>(c1 - c0);
        const T* f0 = fp[0] + (n * C + c0) * P;
        T* o = out + (n * C + c0) * P;
        dispatch_vec<T>(W0, [&](auto vt) {
          using V = typename decltype(vt)::type;
          dispatch_coarse(S, [&](auto ns) {
            constexpr int NS = decltype(ns)::value;
            // registers: NS + 1 weights per block, 2 NS lambdas
            dispatch_row_groups<V, NS >= 0 ? NS + 1 : 99, 2 * NS>(W0, [&](auto ng) {
              constexpr int G = decltype(ng)::value;
              if (attention) {
                merge_rows<T, V, true, NS, G>(S, H0, W0, ncls, f0, rows.get(), tab.hsize, taps, w + n * S * P,
                                              inv_s, o);
              } else {
                merge_rows<T, V, false, NS, G>(S, H0, W0, ncls, f0, rows.get(), tab.hsize, taps, nullptr, inv_s,
                                               o);
              }
            });
          });
        });
      }
    });
    return;
  }

  // max: merged values + per-(n, class chunk) counts of the winning scale.
  const ClassSplit split = split_classes(C, (16 + N - 1) / N);  // ~16 tasks
  const int64_t K = split.chunks, csz = split.size;
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
// Backward.  For a coarse scale s the gradient reaching the resized map is G_s = grad * w_s
// (attention), grad / S (avg) or grad where scale s won (max); the score map's gradient is
// Interp^T G_s, applied separably: the vertical adjoint (one pass over G's rows, every source row
// summed in a fixed order), 8 of its rows transposed, then the horizontal adjoint on 8 rows at once.
// G_s is read through a "source" giving a vector of its values at (row, x); attention and avg form
// them on the fly from grad and the weights, so no G plane is written.
template <typename T>
struct SrcWeighted {  // attention: grad * w_s
  const T* g;
  const T* w;
  int W0;
  template <typename V>
  V load(int y, int x) const {
    const int64_t o = static_cast<int64_t>(y) * W0 + x;
    return V::load(g + o) * V::load(w + o);
  }
  T at(int y, int x) const { return g[static_cast<int64_t>(y) * W0 + x] * w[static_cast<int64_t>(y) * W0 + x]; }
};
template <typename T>
struct SrcScaled {  // avg: grad / S
  const T* g;
  T c;
  int W0;
  template <typename V>
  V load(int y, int x) const { return V::load(g + static_cast<int64_t>(y) * W0 + x) * V::set1(c); }
  T at(int y, int x) const { return g[static_cast<int64_t>(y) * W0 + x] * c; }
};
template <typename T>
struct SrcPlane {  // max: a materialised G plane
  const T* G;
  int W0;
  template <typename V>
  V load(int y, int x) const { return V::load(G + static_cast<int64_t>(y) * W0 + x); }
  T at(int y, int x) const { return G[static_cast<int64_t>(y) * W0 + x]; }
};

// Interp^T of one G_s plane into the (H_s, W_s) gradient gs.  The vertical adjoint makes one pass over
// the destination rows y, each adding its weighted G row into the two source rows i0(y), i1(y) that it
// touches, kept in registers (source rows complete in order, as the ratio is <= 1): every source row
// sums its terms in increasing y, as the inverse table lists them.  It covers a group of G > 0 blocks
// of V at once (RowGroups), else (G = 0) block by block of columns (V: the vector type; rows narrower
// than its lanes column by column).  Its rows go to trow (H_s rounded up
// to 8 rows of W0s, columns >= W0 zero, rows finite); then every 8 rows are transposed into ttr
// ((W0s + kmax) x 8, zero tail: the horizontal adjoint reads past W0 with zero weights) and adjoined
// horizontally 8 rows at once.
template <typename T, typename V, int G, typename Src>
void adjoint_plane_impl(const Src& src, const Axis<T>& ay, const Axis<T>& ax, int W0, int W0s, T* __restrict trow,
                        T* __restrict ttr, T* __restrict gs) {
  const int Hs = ay.in, Ws = ax.in;
  const int* __restrict i0 = ay.i0.data();
  const int* __restrict i1 = ay.i1.data();
  const T* __restrict l0 = ay.l0.data();
  const T* __restrict l1 = ay.l1.data();
  // U: V or T; load(y) gives G at row y, store(r, u) writes source row r, fma(w, g, acc) = acc + w g
  auto stream = [&](auto zero, auto load, auto store, auto fma) {
    auto cur = zero, nxt = zero;  // source rows r and r + 1
    int r = 0;
    for (int y = 0; y < ay.out; ++y) {
      for (; r < i0[y]; ++r) {
        store(r, cur);
        cur = nxt;
        nxt = zero;
      }
      const auto gv = load(y);
      if (i1[y] == i0[y]) {  // one source row, weight (1 - l1) + l1 as in the inverse table
        cur = fma(l0[y] + l1[y], gv, cur);
      } else {
        cur = fma(l0[y], gv, cur);
        nxt = fma(l1[y], gv, nxt);
      }
    }
    for (; r < Hs; ++r) {
      store(r, cur);
      cur = nxt;
      nxt = zero;
    }
  };
  if constexpr (G > 0) {
    using Group = std::array<V, G>;
    constexpr int L = V::kLanes;
    const RowGroups<G, L> groups{W0};
    Group zero;
    zero.fill(V::set1(T(0)));
    for (int gi = 0; gi < groups.count(); ++gi) {
      const int xg = groups.start(gi), xlast = groups.last(xg);
      stream(
          zero,
          [&](int y) {
            Group g;
            for (int b = 0; b < G; ++b) g[b] = src.template load<V>(y, xg + (b < G - 1 ? b * L : xlast));
            return g;
          },
          [&](int r, const Group& u) {
            T* t = trow + static_cast<int64_t>(r) * W0s + xg;
            for (int b = 0; b < G; ++b) u[b].store(t + (b < G - 1 ? b * L : xlast));
          },
          [](T w, const Group& g, const Group& acc) {
            Group o;
            for (int b = 0; b < G; ++b) o[b] = fmadd(V::set1(w), g[b], acc[b]);
            return o;
          });
    }
  } else {
    for_blocks<V::kLanes>(
        W0,
        [&](int x) {
          stream(
              V::set1(T(0)), [&](int y) { return src.template load<V>(y, x); },
              [&](int r, const V& u) { u.store(trow + static_cast<int64_t>(r) * W0s + x); },
              [](T w, const V& g, const V& acc) { return fmadd(V::set1(w), g, acc); });
        },
        [&](int x) {
          stream(
              T(0), [&](int y) { return src.at(y, x); },
              [&](int r, T u) { trow[static_cast<int64_t>(r) * W0s + x] = u; },
              [](T w, T g, T acc) { return acc + w * g; });
        });
  }
  for (int r0 = 0; r0 < Hs; r0 += 8) {
    transpose8<T>(trow + static_cast<int64_t>(r0) * W0s, W0s, ttr);
    adjoint_cols8<T>(ttr, ax, std::min(8, Hs - r0), gs + static_cast<int64_t>(r0) * Ws);
  }
}

template <typename T, typename Src>
void adjoint_plane(const Src& src, const Axis<T>& ay, const Axis<T>& ax, int W0, int W0s, T* __restrict trow,
                   T* __restrict ttr, T* __restrict gs) {
  dispatch_vec<T>(W0, [&](auto vt) {
    using V = typename decltype(vt)::type;
    // registers: two source rows and a G row per block
    dispatch_row_groups<V, 3, 2>(W0, [&](auto ng) {
      adjoint_plane_impl<T, V, decltype(ng)::value>(src, ay, ax, W0, W0s, trow, ttr, gs);
    });
  });
}

// One class chunk of one batch item in attention mode: classes c0 .. c0 + ncls - 1, whose coarse
// planes were resized horizontally into rows + c * hsize (c relative to c0).
template <typename T>
struct AttChunk {
  const T* g;     // grad of merged, first class of the chunk
  const T* f0;    // scale 0 scores, first class
  T* g0;          // grad of scale 0, first class
  const T* rows;  // resized coarse planes, class stride hsize
  int64_t hsize;
  int ncls;
  const T* w;     // softmax weights of the item, S planes
  const T* gw;    // grad of the weights output, S planes, or null
  T* gl;          // logit gradient (S planes) when the chunk holds every class, else null
  T* dpart;       // else: the chunk's partial dot products, S planes
  const Tables<T>* tab;
  int S, W0;
  int64_t P;
};

// Row y of the attention sweep, classes innermost: per 8 pixels, the dot products
// d_s = sum_c grad_c * up(f_s)_c (classes in order) stay in registers, scale 0's gradient
// grad_c * w_0 is stored on the way, and the logit gradient w_s (d_s + gw_s - sum_t w_t (d_t + gw_t))
// is finished right there when the chunk holds every class.  NS coarse scales (-1: at run time),
// V the vector type.  G > 0: per group of G blocks of V (RowGroups) the classes loop around the group,
// so that its G x S dot products stay in registers and each class sets up its pointers once per group;
// G = 0: block by block.
template <typename T, typename V, int NS, int G>
void attention_sweep_row(const AttChunk<T>& A, int y) {
  constexpr int kL = NS >= 0 ? NS + 1 : static_cast<int>(kMaxScales);
  const int S = NS >= 0 ? NS + 1 : A.S;
  const int W0 = A.W0;
  const int64_t P = A.P, yo = static_cast<int64_t>(y) * W0;
  int64_t ra[kL], rb[kL];
  T la[kL], lb[kL];
  const T* w[kL];
  for (int s = 0; s < S; ++s) {
    w[s] = A.w + s * P + yo;
    if (s == 0) continue;
    const Axis<T>& ay = A.tab->y[s];
    ra[s] = A.tab->hoff[s] + static_cast<int64_t>(ay.i0[y]) * W0;
    rb[s] = A.tab->hoff[s] + static_cast<int64_t>(ay.i1[y]) * W0;
    la[s] = ay.l0[y];
    lb[s] = ay.l1[y];
  }
  const T* g = A.g + yo;
  const T* f0 = A.f0 + yo;
  T* g0 = A.g0 + yo;
  const T* rows = A.rows;
  const int64_t hsize = A.hsize;
  const int ncls = A.ncls;
  // The classes are 3 x ncls interleaved streams (grad, scores, scale 0's gradient), too many for
  // the hardware prefetchers; when the data comes from DRAM (large N) their latency dominates, so
  // fetch the lines of row y + 2 of every class ahead.
  if (y + 2 < A.P / W0) {
    const int64_t ahead = 2 * static_cast<int64_t>(W0), step = 64 / sizeof(T);
    const int64_t last = ahead + W0 - 1;
    for (int c = 0; c < ncls; ++c) {
      const int64_t co = static_cast<int64_t>(c) * P;
      for (int64_t q = ahead; q <= last + step - 1; q += step) {
        const int64_t o = co + std::min(q, last);
        __builtin_prefetch(g + o, 0, 3);
        __builtin_prefetch(f0 + o, 0, 3);
        __builtin_prefetch(g0 + o, 1, 3);
      }
    }
  }
  // the logit gradient of 8 or 16 pixels from their dot products d (or the chunk's partials)
  auto finish = [&](int x, V* d) {
    if (A.gl) {
      V dot = V::set1(T(0));
      for (int s = 0; s < S; ++s) {
        if (A.gw) d[s] = d[s] + V::load(A.gw + s * P + yo + x);
        dot = fmadd(V::load(w[s] + x), d[s], dot);
      }
      for (int s = 0; s < S; ++s) (V::load(w[s] + x) * (d[s] - dot)).store(A.gl + s * P + yo + x);
    } else {
      for (int s = 0; s < S; ++s) d[s].store(A.dpart + s * P + yo + x);
    }
  };
  if constexpr (G > 0) {
    constexpr int L = V::kLanes;
    const RowGroups<G, L> groups{W0};
    V lav[kL], lbv[kL];
    for (int s = 1; s < S; ++s) {
      lav[s] = V::set1(la[s]);
      lbv[s] = V::set1(lb[s]);
    }
    for (int gi = 0; gi < groups.count(); ++gi) {
      const int xg = groups.start(gi), xlast = groups.last(xg);
      V d[G][kL], w0[G];
      for (int b = 0; b < G; ++b) {
        for (int s = 0; s < S; ++s) d[b][s] = V::set1(T(0));
        w0[b] = V::load(w[0] + xg + (b < G - 1 ? b * L : xlast));
      }
      const T* pa[kL];
      const T* pb[kL];
      for (int s = 1; s < S; ++s) {
        pa[s] = rows + ra[s] + xg;
        pb[s] = rows + rb[s] + xg;
      }
      const T* gc = g + xg;
      const T* fc = f0 + xg;
      T* g0c = g0 + xg;
      for (int c = 0; c < ncls; ++c, gc += P, fc += P, g0c += P) {
        for (int b = 0; b < G; ++b) {
          const int x = b < G - 1 ? b * L : xlast;
          const V gv = V::load(gc + x);
          d[b][0] = fmadd(gv, V::load(fc + x), d[b][0]);
          (gv * w0[b]).store(g0c + x);
          for (int s = 1; s < S; ++s) {
            const V up = fmadd(lav[s], V::load(pa[s] + x), lbv[s] * V::load(pb[s] + x));
            d[b][s] = fmadd(gv, up, d[b][s]);
          }
        }
        for (int s = 1; s < S; ++s) {
          pa[s] += hsize;
          pb[s] += hsize;
        }
      }
      for (int b = 0; b < G; ++b) finish(xg + (b < G - 1 ? b * L : xlast), d[b]);
    }
    return;
  }
  auto block = [&](int x) {
    V d[kL];
    for (int s = 0; s < S; ++s) d[s] = V::set1(T(0));
    const V w0 = V::load(w[0] + x);
    const T* rc = rows + x;
    for (int c = 0; c < ncls; ++c, rc += hsize) {
      const int64_t co = static_cast<int64_t>(c) * P + x;
      const V gv = V::load(g + co);
      d[0] = fmadd(gv, V::load(f0 + co), d[0]);
      (gv * w0).store(g0 + co);
      for (int s = 1; s < S; ++s) {
        const V up = fmadd(V::set1(la[s]), V::load(rc + ra[s]), V::set1(lb[s]) * V::load(rc + rb[s]));
        d[s] = fmadd(gv, up, d[s]);
      }
    }
    finish(x, d);
  };
  auto one = [&](int x) {
    T d[kL];
    for (int s = 0; s < S; ++s) d[s] = T(0);
    const T* rc = A.rows + x;
    for (int c = 0; c < A.ncls; ++c, rc += A.hsize) {
      const int64_t co = static_cast<int64_t>(c) * P + x;
      const T gv = g[co];
      d[0] += gv * f0[co];
      g0[co] = gv * w[0][x];
      for (int s = 1; s < S; ++s) d[s] += gv * (la[s] * rc[ra[s]] + lb[s] * rc[rb[s]]);
    }
    if (A.gl) {
      T dot = T(0);
      for (int s = 0; s < S; ++s) {
        if (A.gw) d[s] += A.gw[s * P + yo + x];
        dot += w[s][x] * d[s];
      }
      for (int s = 0; s < S; ++s) A.gl[s * P + yo + x] = w[s][x] * (d[s] - dot);
    } else {
      for (int s = 0; s < S; ++s) A.dpart[s * P + yo + x] = d[s];
    }
  };
  for_blocks<V::kLanes>(W0, block, one);
}

// Logit gradient of one batch item from the per-chunk partial dot products (K chunks, summed in
// chunk order), the weights w and the weights' own gradient gw (or null):
// glogits_s = w_s (d_s + gw_s - sum_t w_t (d_t + gw_t)).
template <typename T>
void logits_grad_from_partials(const T* __restrict parts, int64_t K, const T* __restrict w, const T* __restrict gw,
                               int S, int64_t P, T* __restrict gl) {
  std::vector<T> d(static_cast<size_t>(S) * P), dot(P, T(0));
  for (int64_t i = 0; i < S * P; ++i) d[i] = parts[i];
  for (int64_t k = 1; k < K; ++k)
    for (int64_t i = 0; i < S * P; ++i) d[i] += parts[k * S * P + i];
  if (gw)
    for (int64_t i = 0; i < S * P; ++i) d[i] += gw[i];
  for (int s = 0; s < S; ++s)
    for (int64_t p = 0; p < P; ++p) dot[p] += w[s * P + p] * d[s * P + p];
  for (int s = 0; s < S; ++s)
    for (int64_t p = 0; p < P; ++p) gl[s * P + p] = w[s * P + p] * (d[s * P + p] - dot[p]);
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
  // Class chunks per batch item: attention's logit gradient needs a reduction over classes; with
  // one chunk (N >= 8) it is finished inside the task that owns the batch item, otherwise
  // per-(n, chunk) partials are summed in chunk order.  ~8 tasks for attention, ~16 otherwise.
  const ClassSplit split = split_classes(C, ((attention ? 8 : 16) + N - 1) / N);
  const int64_t K = split.chunks, csz = split.size;
  const T inv_s = avg_coefficient<T>(S);
  const T* lg = attention ? logits.data_ptr<T>() : nullptr;
  const T* gw = (attention && gw_t.defined()) ? gw_t.data_ptr<T>() : nullptr;
  T* gl = attention ? glogits.data_ptr<T>() : nullptr;
  // attention with K > 1: per-(n, chunk) partial dot products, every entry written before read
  std::unique_ptr<T[]> dots;
  if (attention && K > 1) dots.reset(new T[static_cast<size_t>(N * K * S * P)]);
  const int W0s = (W0 + 7) / 8 * 8;

  at::parallel_for(0, N * K, grain_for(csz * S * P), [&](int64_t b, int64_t e) {
    std::vector<T> pad(tab.wmax + 16);
    // columns >= W0 stay zero
    std::vector<T> trow(static_cast<size_t>((*std::max_element(tab.H.begin(), tab.H.end()) + 7) / 8 * 8) * W0s, T(0));
    std::vector<T> ttr(static_cast<size_t>(W0s + tab.kmax) * 8, T(0));  // zero tail
    // attention: the chunk's horizontally resized coarse planes and its item's softmax weights
    // (resize_rows writes every entry of rows: no zero fill)
    const std::unique_ptr<T[]> rows(new T[attention ? csz * tab.hsize : tab.hsize]);
    std::vector<T> wl(attention ? S * P : 0);
    // max: per class, the resized rows of the current output row, the argmax and the G planes
    std::vector<T> upbuf(mode == Mode::kMax ? S * W0 : 0), best(mode == Mode::kMax ? W0 : 0),
        idx(mode == Mode::kMax ? W0 : 0), gbuf(mode == Mode::kMax ? S * P : 0);
    std::vector<const T*> ups(S);
    for (int s = 1; s < S; ++s) ups[s] = upbuf.data() + static_cast<int64_t>(s) * W0;
    int64_t wl_n = -1;
    for (int64_t nk = b; nk < e; ++nk) {
      const int64_t n = nk / K, k = nk % K;
      const int64_t c0 = k * csz, c1 = std::min(C, (k + 1) * csz);
      if (attention) {
        if (wl_n != n) {  // softmax weights of batch item n (recomputed, not saved)
          softmax_pixels<T>(lg + n * S * P, wl.data(), S, P, 0, P);
          wl_n = n;
        }
        // 1) resize every class of the chunk horizontally, then one sweep over the rows with the
        //    classes innermost: scale 0's gradient and the logit gradient (or its partials)
        for (int64_t c = c0; c < c1; ++c)
          for (int s = 1; s < S; ++s)
            resize_rows<T>(fp[s] + (n * C + c) * tab.H[s] * tab.W[s], tab.H[s], tab.W[s], tab.x[s], W0,
                           rows.get() + (c - c0) * tab.hsize + tab.hoff[s], pad.data());
        const AttChunk<T> A{go + (n * C + c0) * P, fp[0] + (n * C + c0) * P, gp[0] + (n * C + c0) * P,
                            rows.get(), tab.hsize, static_cast<int>(c1 - c0), wl.data(),
                            (K == 1 && gw) ? gw + n * S * P : nullptr, K == 1 ? gl + n * S * P : nullptr,
                            K == 1 ? nullptr : dots.get() + nk * S * P, &tab, S, W0, P};
        dispatch_vec<T>(W0, [&](auto vt) {
          using V = typename decltype(vt)::type;
          dispatch_coarse(S, [&](auto ns) {
            constexpr int NS = decltype(ns)::value;
            // registers: NS + 1 dot products and scale 0's weights per block, 2 NS lambdas
            dispatch_row_groups<V, NS >= 0 ? NS + 2 : 99, 2 * NS>(W0, [&](auto ng) {
              for (int y = 0; y < H0; ++y) attention_sweep_row<T, V, NS, decltype(ng)::value>(A, y);
            });
          });
        });
        // 2) coarser scales: Interp^T (grad_c * w_s)
        for (int64_t c = c0; c < c1; ++c)
          for (int s = 1; s < S; ++s)
            adjoint_plane<T>(SrcWeighted<T>{go + (n * C + c) * P, wl.data() + s * P, W0}, tab.y[s], tab.x[s], W0,
                             W0s, trow.data(), ttr.data(), gp[s] + (n * C + c) * tab.H[s] * tab.W[s]);
        continue;
      }
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t nc = n * C + c;
        const T* g = go + nc * P;
        T* g0 = gp[0] + nc * P;
        if (mode == Mode::kAvg) {
          for (int64_t p = 0; p < P; ++p) g0[p] = g[p] * inv_s;
          for (int s = 1; s < S; ++s)
            adjoint_plane<T>(SrcScaled<T>{g, inv_s, W0}, tab.y[s], tab.x[s], W0, W0s, trow.data(), ttr.data(),
                             gp[s] + nc * tab.H[s] * tab.W[s]);
          continue;
        }
        // max: recompute the argmax scale, bit-identical to the forward's (same routines)
        const T* f0 = fp[0] + nc * P;
        for (int s = 1; s < S; ++s)
          resize_rows<T>(fp[s] + nc * tab.H[s] * tab.W[s], tab.H[s], tab.W[s], tab.x[s], W0,
                         rows.get() + tab.hoff[s], pad.data());
        for (int y = 0; y < H0; ++y) {
          const int64_t yo = static_cast<int64_t>(y) * W0;
          for (int s = 1; s < S; ++s)
            resize_row<T>(rows.get() + tab.hoff[s], W0, tab.y[s], y, upbuf.data() + static_cast<int64_t>(s) * W0);
          max_row<T>(f0 + yo, ups, W0, best.data(), idx.data());
          const T* __restrict ip = idx.data();
          const T* __restrict gy = g + yo;
          T* __restrict g0y = g0 + yo;
          for (int x = 0; x < W0; ++x) g0y[x] = (ip[x] == T(0)) ? gy[x] : T(0);
          for (int s = 1; s < S; ++s) {
            T* __restrict G = gbuf.data() + s * P + yo;
            const T sv = static_cast<T>(s);
            for (int x = 0; x < W0; ++x) G[x] = (ip[x] == sv) ? gy[x] : T(0);  // select: vectorises
          }
        }
        for (int s = 1; s < S; ++s)
          adjoint_plane<T>(SrcPlane<T>{gbuf.data() + s * P, W0}, tab.y[s], tab.x[s], W0, W0s, trow.data(),
                           ttr.data(), gp[s] + nc * tab.H[s] * tab.W[s]);
      }
    }
  });

  if (!attention || K == 1) return;
  // 3) logit gradient from the per-(n, chunk) partials, summed in chunk order.
  at::parallel_for(0, N, grain_for((K + 3) * S * P), [&](int64_t b, int64_t e) {
    std::vector<T> wl(S * P);
    for (int64_t n = b; n < e; ++n) {
      softmax_pixels<T>(lg + n * S * P, wl.data(), S, P, 0, P);
      logits_grad_from_partials<T>(dots.get() + n * K * S * P, K, wl.data(), gw ? gw + n * S * P : nullptr, S, P,
                                   gl + n * S * P);
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
    const std::optional<at::Tensor>& logits_in, c10::string_view mode_str, const std::optional<at::Tensor>& weights) {
  // weights (the forward's output) is checked but not read: the CPU kernels recompute the softmax per pixel
  const Mode mode = check_backward_inputs(grad_merged, grad_weights, scores_in, logits_in, mode_str, weights);
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
