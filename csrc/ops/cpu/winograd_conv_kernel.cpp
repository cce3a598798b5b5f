// CPU kernel of attnscale::winograd_conv2d: Winograd F(2x2, 3x3) and F(4x4, 3x3) convolution, stride 1,
// zero padding.
//
// F(2x2, 3x3): output tile (ty, tx) covers output rows 2ty, 2ty + 1 and columns 2tx, 2tx + 1; it reads
// the 4x4 input tile at rows 2ty - p .. 2ty - p + 3, columns 2tx - p .. 2tx - p + 3 (zero outside).
//   input transform   V = B^T d B,   B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]
//   products          M_ij = U_ij V_ij summed over input channels: 16 GEMMs (out x in) @ (in x tiles)
//   output transform  Y = A^T M A,   A^T = [1 1 1 0; 0 1 -1 -1]
// F(4x4, 3x3) likewise with 6x6 input tiles at stride 4 and 36 GEMMs (matrices further down).
// Dilation d (padding d q) by the d x d polyphase components x[a::d, b::d], each an undilated convolution
// with padding q whose outputs are the pixels (a + i d, b + j d): their tile rows follow one another in
// the bands below (see forward_impl).
// The image is processed in bands of tile rows; per band the input transform writes V (P, C, tiles),
// P GEMMs compute M_q (K, tiles) (ops/cpu/gemm.h), and the output transform adds the bias and writes the band's
// output rows.  Each transform is a loop over one channel's rows (parallel over channels) whose inner
// loops run over contiguous arrays, so the compiler vectorises them: the input rows are split into
// their even and odd columns (F(4x4): their 4 column phases) first, which turns the strided tile reads
// into unit-stride ones.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "ops/cpu/even_odd.h"
#include "ops/cpu/gemm.h"
#include "ops/winograd_conv.h"

namespace attnscale {
namespace winograd {
namespace {

// A plane of T: element (r, c) at p[r * rs + c * cs] for r in [0, h), c in [0, w).  One channel of an image
// (rs = its width, cs = 1) or one polyphase component of it, x[a::d, b::d] (rs = d * width, cs = d).
template <typename T>
struct Plane {
  T* p;
  int h, w;
  int64_t rs;
  int cs;
};

// prow[q] = x[row][q - pad] for q in [0, n): one input row with its zero padding (all zero outside
// the plane).  Input planes have dense rows (cs = 1: a dilated layer's input is split into its components
// first).
template <typename T>
inline void padded_row(const Plane<const T>& x, int pad, int row, int n, T* __restrict prow) {
  std::fill(prow, prow + n, T(0));
  if (row < 0 || row >= x.h) return;
  const int lo = std::min(pad, n), hi = std::min(n, x.w + pad);
  const T* __restrict src = x.p + static_cast<int64_t>(row) * x.rs;
  if (hi > lo) std::copy(src + (lo - pad), src + (hi - pad), prow + lo);
}

// torch.relu's value: 0 for v < 0, v otherwise (NaN propagates: the comparison is false).
template <typename T>
inline T relu_of(T v) {
  return v < T(0) ? T(0) : v;
}

// One output row from its NP column phases: orow[(NP t + b) cs] = ys[b][t] for the Wo columns, through the
// fused ReLU when asked (torch.relu's values, NaN stays NaN).
template <int NP, typename T>
inline void store_phases(const T* const ys[NP], int Wo, bool relu, T* __restrict orow, int cs) {
  const int full = Wo / NP;
  const auto val = [relu](T v) { return relu ? relu_of(v) : v; };  // loop-invariant: unswitched by the compiler
  if (cs == 1) {
    for (int t = 0; t < full; ++t)
      for (int b = 0; b < NP; ++b) orow[NP * t + b] = val(ys[b][t]);
  } else {
    for (int t = 0; t < full; ++t)
      for (int b = 0; b < NP; ++b) orow[static_cast<int64_t>(NP * t + b) * cs] = val(ys[b][t]);
  }
  for (int b = 0; b < Wo - NP * full; ++b) orow[static_cast<int64_t>(NP * full + b) * cs] = val(ys[b][full]);
}

// Input transform of tile rows [ty0, ty1) of one input plane x (a channel or a component of it) into V:
// entry (i * 4 + j) of tile (ty, tx) at V[(i * 4 + j) * v_plane + (ty - ty0) * Tw + tx].
template <typename T>
void input_transform_rows(const Plane<const T>& x, int pad, int ty0, int ty1, int Tw,
                          T* __restrict V, int64_t v_plane, std::vector<T>& buf) {
  const int L = Tw + 1;  // tile tx reads even/odd columns tx and tx + 1
  buf.resize(static_cast<size_t>(12) * L);
  T* prow = buf.data();                                // one padded input row (2 L)
  T* ev[4];
  T* od[4];
  for (int r = 0; r < 4; ++r) {
    ev[r] = buf.data() + static_cast<size_t>(2 + r) * L;
    od[r] = buf.data() + static_cast<size_t>(6 + r) * L;
  }
  T* ue = prow;                                        // one transformed row, even columns (reuses prow)
  T* uo = prow + L;                                    // and odd columns
  for (int ty = ty0; ty < ty1; ++ty) {
    for (int r = 0; r < 4; ++r) {
      padded_row(x, pad, 2 * ty - pad + r, 2 * L, prow);
      split_even_odd(prow, L, ev[r], od[r]);
    }
    const int64_t to = static_cast<int64_t>(ty - ty0) * Tw;
    for (int i = 0; i < 4; ++i) {
      // row i of B^T d: d0 - d2, d1 + d2, d2 - d1, d1 - d3
      const int a = i == 0 ? 0 : 1, b = i == 0 ? 2 : (i == 3 ? 3 : 2);
      const T sa = i == 2 ? T(-1) : T(1), sb = (i == 1 || i == 2) ? T(1) : T(-1);
      {
        const T* __restrict ea = ev[a];
        const T* __restrict eb = ev[b];
        const T* __restrict oa = od[a];
        const T* __restrict ob = od[b];
        for (int t = 0; t < L; ++t) {
          ue[t] = sa * ea[t] + sb * eb[t];
          uo[t] = sa * oa[t] + sb * ob[t];
        }
      }
      // columns: (row) B: c0 - c2, c1 + c2, c2 - c1, c1 - c3 with c0 = ue[t], c1 = uo[t],
      // c2 = ue[t + 1], c3 = uo[t + 1]
      T* __restrict v0 = V + (4 * i + 0) * v_plane + to;
      T* __restrict v1 = V + (4 * i + 1) * v_plane + to;
      T* __restrict v2 = V + (4 * i + 2) * v_plane + to;
      T* __restrict v3 = V + (4 * i + 3) * v_plane + to;
      const T* __restrict e = ue;
      const T* __restrict o = uo;
      for (int t = 0; t < Tw; ++t) {
        v0[t] = e[t] - e[t + 1];
        v1[t] = o[t] + e[t + 1];
        v2[t] = e[t + 1] - o[t];
        v3[t] = o[t] - o[t + 1];
      }
    }
  }
}

// Output transform of tile rows [ty0, ty1) of one output plane (a channel, or a component of it, of
// size out.h x out.w): Y = A^T M A + bias.  Entry q of the band's tile t of channel k is planes[q][off + t]
// (off = k * tiles + the rows' first tile in the band).
template <typename T>
void output_transform_rows(const T* const* planes, int64_t off, int ty0, int ty1, int Tw, T bias, bool relu,
                           const Plane<T>& out, std::vector<T>& buf) {
  buf.resize(static_cast<size_t>(4) * Tw);
  T* y00 = buf.data();
  T* y01 = y00 + Tw;
  T* y10 = y01 + Tw;
  T* y11 = y10 + Tw;
  for (int ty = ty0; ty < ty1; ++ty) {
    const int64_t to = static_cast<int64_t>(ty - ty0) * Tw;
    const T* m[16];
    for (int q = 0; q < 16; ++q) m[q] = planes[q] + off + to;
    {
      T* __restrict a00 = y00;
      T* __restrict a01 = y01;
      T* __restrict a10 = y10;
      T* __restrict a11 = y11;
      for (int t = 0; t < Tw; ++t) {
        T r0[4], r1[4];
        for (int j = 0; j < 4; ++j) {  // rows of A^T M
          r0[j] = m[j][t] + m[4 + j][t] + m[8 + j][t];
          r1[j] = m[4 + j][t] - m[8 + j][t] - m[12 + j][t];
        }
        a00[t] = r0[0] + r0[1] + r0[2] + bias;
        a01[t] = r0[1] - r0[2] - r0[3] + bias;
        a10[t] = r1[0] + r1[1] + r1[2] + bias;
        a11[t] = r1[1] - r1[2] - r1[3] + bias;
      }
    }
    for (int dy = 0; dy < 2; ++dy) {
      const int y = 2 * ty + dy;
      if (y >= out.h) break;
      const T* ys[2] = {dy == 0 ? y00 : y10, dy == 0 ? y01 : y11};
      store_phases<2>(ys, out.w, relu, out.p + static_cast<int64_t>(y) * out.rs, out.cs);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// F(4x4, 3x3): 6x6 input tiles at stride 4 (points 0, +-1, +-2, infinity).
//   B^T = [4 0 -5 0 1 0; 0 -4 -4 1 1 0; 0 4 -4 -1 1 0; 0 -2 -1 2 1 0; 0 2 -1 -2 1 0; 0 4 0 -5 0 1]
//   A^T = [1 1 1 1 1 0; 0 1 -1 2 -2 0; 0 1 1 4 4 0; 0 1 -1 8 -8 1]
//   G   = [1/4 0 0; -1/6 -1/6 -1/6; -1/6 1/6 -1/6; 1/24 1/12 1/6; 1/24 -1/12 1/6; 0 0 1]
// One 1-D B^T over n lanes: out_i[t] = sum_r B^T[i][r] d_r[t].
template <typename T>
inline void bt6(const T* const d[6], T* const o[6], int n) {
  const T* __restrict d0 = d[0];
  const T* __restrict d1 = d[1];
  const T* __restrict d2 = d[2];
  const T* __restrict d3 = d[3];
  const T* __restrict d4 = d[4];
  const T* __restrict d5 = d[5];
  T* __restrict o0 = o[0];
  T* __restrict o1 = o[1];
  T* __restrict o2 = o[2];
  T* __restrict o3 = o[3];
  T* __restrict o4 = o[4];
  T* __restrict o5 = o[5];
  for (int t = 0; t < n; ++t) {
    const T a = d4[t] - T(4) * d2[t], b = d3[t] - T(4) * d1[t];  // rows 1, 2: d4 - 4 d2 -+ (4 d1 - d3)
    const T c = d4[t] - d2[t], e = T(2) * (d3[t] - d1[t]);       // rows 3, 4: d4 - d2 +- 2 (d3 - d1)
    o0[t] = T(4) * d0[t] - T(5) * d2[t] + d4[t];
    o1[t] = a + b;
    o2[t] = a - b;
    o3[t] = c + e;
    o4[t] = c - e;
    o5[t] = T(4) * d1[t] - T(5) * d3[t] + d5[t];
  }
}

// Input transform of tile rows [ty0, ty1) of one input plane into V: entry (6 i + j) of tile (ty, tx) at
// V[(6 i + j) * v_plane + (ty - ty0) * Tw + tx].  Each of the tile row's 6 input rows is copied into a
// zero-padded row (padded_row) and split into its 4 column phases (x[4 t + m]); B^T runs over the rows on the phase
// arrays, then over the columns: tile tx's columns are phases 0..3 at t = tx and phases 0, 1 at tx + 1.
template <typename T>
void input_transform_rows4(const Plane<const T>& x, int pad, int ty0, int ty1, int Tw,
                           T* __restrict V, int64_t v_plane, std::vector<T>& buf) {
  const int L = Tw + 1;             // phase entries per row
  const int R = 4 * L;              // padded row
  const int E = 2 * L;              // its even / odd halves
  buf.resize(static_cast<size_t>(R + 2 * E + 6 * 4 * L + 6 * 4 * L));
  T* prow = buf.data();
  T* ev = prow + R;
  T* od = ev + E;
  T* ph = od + E;                   // ph[(r * 4 + m) * L + t]: input row r, phase m
  T* uu = ph + 6 * 4 * L;           // uu[(i * 4 + m) * L + t]: B^T over the rows
  for (int ty = ty0; ty < ty1; ++ty) {
    for (int r = 0; r < 6; ++r) {
      T* p0 = ph + static_cast<size_t>(r * 4) * L;
      padded_row(x, pad, 4 * ty - pad + r, 4 * L, prow);
      split_even_odd(prow, 2 * L, ev, od);                  // x[2u], x[2u + 1]
      split_even_odd(ev, L, p0 + 0 * L, p0 + 2 * L);        // phases 0, 2
      split_even_odd(od, L, p0 + 1 * L, p0 + 3 * L);        // phases 1, 3
    }
    for (int m = 0; m < 4; ++m) {
      const T* d[6];
      T* o[6];
      for (int r = 0; r < 6; ++r) {
        d[r] = ph + static_cast<size_t>(r * 4 + m) * L;
        o[r] = uu + static_cast<size_t>(r * 4 + m) * L;
      }
      bt6(d, o, L);
    }
    const int64_t to = static_cast<int64_t>(ty - ty0) * Tw;
    for (int i = 0; i < 6; ++i) {
      const T* u = uu + static_cast<size_t>(i * 4) * L;
      const T* d[6] = {u, u + L, u + 2 * L, u + 3 * L, u + 1, u + L + 1};
      T* o[6];
      for (int j = 0; j < 6; ++j) o[j] = V + (6 * i + j) * v_plane + to;
      bt6(d, o, Tw);
    }
  }
}

// Output transform of tile rows [ty0, ty1) of one output plane: Y = A^T M A + bias, planes and off as in
// output_transform_rows.
template <typename T>
void output_transform_rows4(const T* const* planes, int64_t off, int ty0, int ty1, int Tw, T bias, bool relu,
                            const Plane<T>& out, std::vector<T>& buf) {
  buf.resize(static_cast<size_t>(24 + 16) * Tw);
  T* rr = buf.data();        // rr[(a * 6 + j) * Tw + t]: row a of A^T M
  T* yy = rr + 24 * Tw;      // yy[(a * 4 + b) * Tw + t]
  for (int ty = ty0; ty < ty1; ++ty) {
    const int64_t to = static_cast<int64_t>(ty - ty0) * Tw;
    for (int j = 0; j < 6; ++j) {
      const T* __restrict m0 = planes[0 + j] + off + to;
      const T* __restrict m1 = planes[6 + j] + off + to;
      const T* __restrict m2 = planes[12 + j] + off + to;
      const T* __restrict m3 = planes[18 + j] + off + to;
      const T* __restrict m4 = planes[24 + j] + off + to;
      const T* __restrict m5 = planes[30 + j] + off + to;
      T* __restrict r0 = rr + (0 * 6 + j) * Tw;
      T* __restrict r1 = rr + (1 * 6 + j) * Tw;
      T* __restrict r2 = rr + (2 * 6 + j) * Tw;
      T* __restrict r3 = rr + (3 * 6 + j) * Tw;
      for (int t = 0; t < Tw; ++t) {
        const T s12 = m1[t] + m2[t], d12 = m1[t] - m2[t], s34 = m3[t] + m4[t], d34 = m3[t] - m4[t];
        r0[t] = m0[t] + s12 + s34;
        r1[t] = d12 + T(2) * d34;
        r2[t] = s12 + T(4) * s34;
        r3[t] = d12 + T(8) * d34 + m5[t];
      }
    }
    for (int a = 0; a < 4; ++a) {
      const T* __restrict q0 = rr + (a * 6 + 0) * Tw;
      const T* __restrict q1 = rr + (a * 6 + 1) * Tw;
      const T* __restrict q2 = rr + (a * 6 + 2) * Tw;
      const T* __restrict q3 = rr + (a * 6 + 3) * Tw;
      const T* __restrict q4 = rr + (a * 6 + 4) * Tw;
      const T* __restrict q5 = rr + (a * 6 + 5) * Tw;
      T* __restrict y0 = yy + (a * 4 + 0) * Tw;
      T* __restrict y1 = yy + (a * 4 + 1) * Tw;
      T* __restrict y2 = yy + (a * 4 + 2) * Tw;
      T* __restrict y3 = yy + (a * 4 + 3) * Tw;
      for (int t = 0; t < Tw; ++t) {
        const T s12 = q1[t] + q2[t], d12 = q1[t] - q2[t], s34 = q3[t] + q4[t], d34 = q3[t] - q4[t];
        y0[t] = q0[t] + s12 + s34 + bias;
        y1[t] = d12 + T(2) * d34 + bias;
        y2[t] = s12 + T(4) * s34 + bias;
        y3[t] = d12 + T(8) * d34 + q5[t] + bias;
      }
    }
    for (int a = 0; a < 4; ++a) {
      const int y = 4 * ty + a;
      if (y >= out.h) break;
      const T* ys[4] = {yy + (a * 4 + 0) * Tw, yy + (a * 4 + 1) * Tw, yy + (a * 4 + 2) * Tw, yy + (a * 4 + 3) * Tw};
      store_phases<4>(ys, out.w, relu, out.p + static_cast<int64_t>(y) * out.rs, out.cs);
    }
  }
}

// Tile rows per band: V and M of a band take about kBandBytes together (a share of L3), and at least
// kMinTiles tiles so that the GEMMs stay wide enough for MKL's kernels (tuned on a 2-core Zen 3 with
// the VGG-16 shapes: the speed is flat within ~10 % from 4 to 8 MiB and from 256 to 512 tiles).
constexpr int64_t kBandBytes = 8 << 20;
constexpr int kMinTiles = 384;
// With oneDNN products, bands of at least this many multiply-adds per product: the 64- and 128-channel
// layers' narrower bands ran 15-20 % slower (a 2-core Zen 5; the larger layers are unchanged).
constexpr int64_t kOneDnnProductMacs = int64_t(1) << 24;

// One polyphase component (a, b) of a dilated convolution (d > 1, padding d q): the output pixels (a + i d,
// b + j d) read only x[a::d, b::d], through the undilated 3x3 kernel with padding q.  With d = 1 the one
// component is the image.  first: its first tile row among all components' (the "virtual" tile rows that
// the bands run over).
struct Component {
  int a, b;
  int h, w;    // its input rows and columns
  int ho, wo;  // its output rows and columns
  int th;      // its tile rows
  int first;
  int64_t at;  // its offset in a channel of the split input (the components one after another)
};

// One channel of x (H, W) split into its d x d polyphase components, each dense (h, w) at dst + c.at: the
// transforms then read unit-stride rows.  d = 2 through split_even_odd (the even and odd columns of a row
// at once).
template <typename T>
void split_components(const T* __restrict x, int H, int W, int d, const std::vector<Component>& comps,
                      T* __restrict dst) {
  if (d == 2) {
    for (int a = 0; a < 2; ++a) {
      const Component& c0 = comps[2 * a];
      const Component& c1 = comps[2 * a + 1];
      for (int i = 0; i < c0.h; ++i) {
        const T* row = x + static_cast<int64_t>(a + 2 * i) * W;
        split_even_odd(row, c1.w, dst + c0.at + static_cast<int64_t>(i) * c0.w, dst + c1.at + static_cast<int64_t>(i) * c1.w);
        if (c0.w > c1.w) dst[c0.at + static_cast<int64_t>(i) * c0.w + c1.w] = row[2 * c1.w];  // odd W: one more even
      }
    }
    return;
  }
  for (const Component& c : comps)
    for (int i = 0; i < c.h; ++i) {
      const T* row = x + static_cast<int64_t>(c.a + d * i) * W + c.b;
      T* o = dst + c.at + static_cast<int64_t>(i) * c.w;
      for (int j = 0; j < c.w; ++j) o[j] = row[static_cast<int64_t>(j) * d];
    }
}

// Tile = 2: F(2x2, 3x3), 16 planes; Tile = 4: F(4x4, 3x3), 36 planes.  Dilation d: each image's channels
// are split into their d x d components once (split_components), the components' tile rows follow one
// another in the bands, so that every product spans all of them (as wide as the undilated layer's), and
// the output transform writes each component's pixels in place (every d-th row and column).
template <typename T, int Tile>
void forward_impl(const at::Tensor& x, const at::Tensor& U, const at::Tensor& bias, int pad, int d, bool relu,
                  at::Tensor& out) {
  constexpr int P = (Tile + 2) * (Tile + 2);
  constexpr auto input_transform = Tile == 2 ? &input_transform_rows<T> : &input_transform_rows4<T>;
  constexpr auto output_transform = Tile == 2 ? &output_transform_rows<T> : &output_transform_rows4<T>;
  const int64_t N = x.size(0), C = x.size(1);
  const int H = static_cast<int>(x.size(2)), W = static_cast<int>(x.size(3));
  const int64_t K = U.size(1);
  const int Ho = static_cast<int>(out.size(2)), Wo = static_cast<int>(out.size(3));
  const int q = pad / d;
  std::vector<Component> comps;
  int Th = 0;        // tile rows of all components
  int64_t at = 0;    // entries of all components: H W
  for (int a = 0; a < d; ++a)
    for (int b = 0; b < d; ++b) {
      Component c{a, b, (H - a + d - 1) / d, (W - b + d - 1) / d, 0, 0, 0, Th, at};
      at += static_cast<int64_t>(c.h) * c.w;
      c.ho = c.h + 2 * q - 2;
      c.wo = c.w + 2 * q - 2;
      TORCH_CHECK(c.ho >= 1 && c.wo >= 1, "winograd_conv2d: internal error (a polyphase component without output)");
      c.th = (c.ho + Tile - 1) / Tile;
      Th += c.th;
      comps.push_back(c);
    }
  const int Tw = (comps[0].wo + Tile - 1) / Tile;  // the widest component's (b = 0); narrower ones store fewer
  const int64_t per_row = P * (C + K) * static_cast<int64_t>(Tw) * static_cast<int64_t>(sizeof(T));
  int band = static_cast<int>(std::max<int64_t>(1, kBandBytes / per_row));
  band = std::max(band, (kMinTiles + Tw - 1) / Tw);
  if (cpu_gemm::uses_onednn(x.scalar_type())) {
    const int64_t tiles = (kOneDnnProductMacs + K * C - 1) / (K * C);
    band = static_cast<int>(std::max<int64_t>(band, std::min<int64_t>(Th, (tiles + Tw - 1) / Tw)));
  }
  band = std::min(band, Th);
  const int64_t pb = static_cast<int64_t>(band) * Tw;  // tiles per full band
  at::Tensor Vt = at::empty({P * C * pb}, x.options());
  at::Tensor Mt = at::empty({P * K * pb}, x.options());
  const T* xp = x.data_ptr<T>();
  const T* bp = bias.defined() ? bias.data_ptr<T>() : nullptr;
  T* op = out.data_ptr<T>();
  T* vp = Vt.data_ptr<T>();
  const int64_t grain_c = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, P * pb));
  // d > 1: each image's channels split into their components first (strided reads there, once)
  at::Tensor Xs = d > 1 ? at::empty({C * H * W}, x.options()) : at::Tensor();
  T* xs = d > 1 ? Xs.data_ptr<T>() : nullptr;
  // the part of a component in the band [r0, r1): its tile rows [ty0, ty1), their first tile in the band
  struct Piece {
    const Component* c;
    int ty0, ty1;
    int64_t off;
  };
  std::vector<Piece> pieces;
  for (int64_t n = 0; n < N; ++n) {
    if (d > 1)
      at::parallel_for(0, C, 16, [&](int64_t c0, int64_t c1) {
        for (int64_t ch = c0; ch < c1; ++ch)
          split_components(xp + (n * C + ch) * H * W, H, W, d, comps, xs + ch * H * W);
      });
    for (int r0 = 0; r0 < Th; r0 += band) {
      const int r1 = std::min(Th, r0 + band);
      pieces.clear();
      for (const Component& c : comps) {
        const int lo = std::max(r0, c.first), hi = std::min(r1, c.first + c.th);
        if (lo < hi) pieces.push_back({&c, lo - c.first, hi - c.first, static_cast<int64_t>(lo - r0) * Tw});
      }
      // the band's planes are dense (P, C, tiles), also in a shorter last band: oneDNN's products are
      // slow on other layouts
      const int64_t tiles = static_cast<int64_t>(r1 - r0) * Tw;
      at::parallel_for(0, C, grain_c, [&](int64_t c0, int64_t c1) {
        std::vector<T> buf;
        for (int64_t ch = c0; ch < c1; ++ch)
          for (const Piece& pc : pieces) {
            const Plane<const T> in = d > 1 ? Plane<const T>{xs + ch * H * W + pc.c->at, pc.c->h, pc.c->w, pc.c->w, 1}
                                            : Plane<const T>{xp + (n * C + ch) * H * W, H, W, W, 1};
            input_transform(in, q, pc.ty0, pc.ty1, Tw, vp + ch * tiles + pc.off, C * tiles, buf);
          }
      });
      // M_q = U_q V_q (K x tiles, row-major) for the P entries q of the tile, on the band's tiles: in Mt
      // or where oneDNN put them
      at::Tensor Mb = Mt.narrow(0, 0, P * K * tiles).view({P, K, tiles});
      const std::vector<at::Tensor> prods =
          cpu_gemm::batched_products(U, Vt.narrow(0, 0, P * C * tiles).view({P, C, tiles}), Mb);
      std::vector<const T*> planes(P);
      for (int e = 0; e < P; ++e) {
        TORCH_CHECK(prods[e].is_contiguous() && prods[e].size(0) == K && prods[e].size(1) == tiles,
                    "winograd_conv2d: internal error (a product is not a dense K x tiles matrix)");
        planes[e] = prods[e].data_ptr<T>();
      }
      at::parallel_for(0, K, grain_c, [&](int64_t k0, int64_t k1) {
        std::vector<T> buf;
        for (int64_t k = k0; k < k1; ++k)
          for (const Piece& pc : pieces) {
            const Plane<T> o{op + (n * K + k) * static_cast<int64_t>(Ho) * Wo + static_cast<int64_t>(pc.c->a) * Wo +
                                 pc.c->b,
                             pc.c->ho, pc.c->wo, static_cast<int64_t>(d) * Wo, d};
            output_transform(planes.data(), k * tiles + pc.off, pc.ty0, pc.ty1, Tw, bp ? bp[k] : T(0), relu, o, buf);
          }
      });
    }
  }
}

// U[n a + b][k][c] = (G g_kc G^T)[a][b] with G the n x 3 matrix of the tile (n = 4 for F(2x2, 3x3):
// rows (1, 0, 0), (1/2, 1/2, 1/2), (1/2, -1/2, 1/2), (0, 0, 1); n = 6 for F(4x4, 3x3), see above).
// Computed in double, rounded once.
template <typename T>
void weight_transform(const T* __restrict w, int64_t KC, int tile, T* __restrict u) {
  static const double G2[4][3] = {{1, 0, 0}, {0.5, 0.5, 0.5}, {0.5, -0.5, 0.5}, {0, 0, 1}};
  static const double G4[6][3] = {{0.25, 0, 0},
                                  {-1.0 / 6, -1.0 / 6, -1.0 / 6},
                                  {-1.0 / 6, 1.0 / 6, -1.0 / 6},
                                  {1.0 / 24, 1.0 / 12, 1.0 / 6},
                                  {1.0 / 24, -1.0 / 12, 1.0 / 6},
                                  {0, 0, 1}};
  const int n = tile + 2;
  const double(*G)[3] = tile == 2 ? G2 : G4;
  // blocks of B (out, in) pairs, the pairs innermost so that the loops vectorise (the backward
  // transforms the flipped weight at every call: 1.6M pairs per VGG-16 trunk)
  constexpr int B = 128;
  at::parallel_for(0, KC, 2048, [&](int64_t b, int64_t e) {
    double g[9][B], t[6][3][B];
    for (int64_t q0 = b; q0 < e; q0 += B) {
      const int nb = static_cast<int>(std::min<int64_t>(B, e - q0));
      for (int q = 0; q < nb; ++q)
        for (int r = 0; r < 9; ++r) g[r][q] = static_cast<double>(w[(q0 + q) * 9 + r]);
      for (int a = 0; a < n; ++a)  // G g
        for (int j = 0; j < 3; ++j)
          for (int q = 0; q < nb; ++q) t[a][j][q] = G[a][0] * g[j][q] + G[a][1] * g[3 + j][q] + G[a][2] * g[6 + j][q];
      for (int a = 0; a < n; ++a)  // (G g) G^T
        for (int c = 0; c < n; ++c) {
          T* __restrict o = u + (n * a + c) * KC + q0;
          for (int q = 0; q < nb; ++q)
            o[q] = static_cast<T>(t[a][0][q] * G[c][0] + t[a][1][q] * G[c][1] + t[a][2][q] * G[c][2]);
        }
    }
  });
}

at::Tensor winograd_weight_cpu(const at::Tensor& w_in, int64_t tile) {
  check_weight(w_in, "winograd_weight");
  TORCH_CHECK_VALUE(tile == 2 || tile == 4, "winograd_weight: tile must be 2 (F(2x2, 3x3)) or 4 (F(4x4, 3x3)), got ",
                    tile);
  TORCH_CHECK_VALUE(w_in.scalar_type() == at::kFloat || w_in.scalar_type() == at::kDouble,
                    "winograd_weight: weight dtype ", w_in.scalar_type(), " is not supported on CPU (float32 or float64)");
  const at::Tensor w = w_in.contiguous();
  at::Tensor u = at::empty({(tile + 2) * (tile + 2), w.size(0), w.size(1)}, w.options());
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "winograd_weight_cpu", [&] {
    weight_transform<scalar_t>(w.data_ptr<scalar_t>(), w.size(0) * w.size(1), static_cast<int>(tile),
                               u.data_ptr<scalar_t>());
  });
  return u;
}

at::Tensor winograd_conv2d_cpu(const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& u_in,
                               const std::optional<at::Tensor>& bias_in, int64_t padding, bool relu, int64_t dilation) {
  check_forward(x_in, w_in, u_in, bias_in, padding, dilation);
  TORCH_CHECK_VALUE(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kDouble,
                    "winograd_conv2d: x dtype ", x_in.scalar_type(), " is not supported on CPU (float32 or float64)");
  const at::Tensor x = x_in.contiguous();
  const at::Tensor U = u_in.contiguous();
  const at::Tensor bias = (bias_in.has_value() && bias_in->defined()) ? bias_in->contiguous() : at::Tensor();
  const int64_t Ho = out_size(x.size(2), padding, dilation), Wo = out_size(x.size(3), padding, dilation);
  at::Tensor out = at::empty({x.size(0), U.size(1), Ho, Wo}, x.options());
  if (out.numel() == 0) return out;
  if (x.size(1) == 0) {  // no input channel: the convolution is the bias (0 without one); F.conv2d gives an empty tensor
    if (bias.defined()) out.copy_(bias.view({1, -1, 1, 1}).expand_as(out)); else out.zero_();
    return relu ? out.clamp_min_(0) : out;
  }
  const int p = static_cast<int>(padding), d = static_cast<int>(dilation);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "winograd_conv2d_cpu", [&] {
    if (U.size(0) == 16) {
      forward_impl<scalar_t, 2>(x, U, bias, p, d, relu, out);
    } else {
      forward_impl<scalar_t, 4>(x, U, bias, p, d, relu, out);
    }
  });
  return out;
}

}  // namespace
}  // namespace winograd
}  // namespace attnscale

TORCH_LIBRARY_IMPL(attnscale, CPU, m) {
  m.impl("winograd_weight", &attnscale::winograd::winograd_weight_cpu);
  m.impl("winograd_conv2d", &attnscale::winograd::winograd_conv2d_cpu);
}
