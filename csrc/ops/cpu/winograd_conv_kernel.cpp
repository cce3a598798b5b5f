// CPU kernel of attnscale::winograd_conv2d: F(2x2, 3x3) Winograd convolution, stride 1, zero padding.
//
// Output tile (ty, tx) covers output rows 2ty, 2ty + 1 and columns 2tx, 2tx + 1; it reads the 4x4
// input tile at rows 2ty - p .. 2ty - p + 3, columns 2tx - p .. 2tx - p + 3 (zero outside the image).
//   input transform   V = B^T d B,   B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]
//   products          M_ij = U_ij V_ij summed over input channels: 16 GEMMs (out x in) @ (in x tiles)
//   output transform  Y = A^T M A,   A^T = [1 1 1 0; 0 1 -1 -1]
// The image is processed in bands of tile rows; per band the input transform writes V (16, C, tiles),
// at::bmm computes M (16, K, tiles), and the output transform adds the bias and writes the band's
// output rows.  Each transform is a loop over one channel's rows (parallel over channels) whose inner
// loops run over contiguous arrays, so the compiler vectorises them: the input rows are split into
// their even and odd columns first, which turns the stride-2 tile reads into unit-stride ones.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "ops/cpu/even_odd.h"
#include "ops/winograd_conv.h"

namespace attnscale {
namespace winograd {
namespace {

// Input transform of tile rows [ty0, ty1) of channel c of one image x (H, W) into V: entry
// (i * 4 + j) of tile (ty, tx) at V[(i * 4 + j) * v_plane + (ty - ty0) * Tw + tx].
template <typename T>
void input_transform_rows(const T* __restrict x, int H, int W, int pad, int ty0, int ty1, int Tw,
                          T* __restrict V, int64_t v_plane, std::vector<T>& buf) {
  const int L = Tw + 1;  // tile tx reads even/odd columns tx and tx + 1
  buf.resize(static_cast<size_t>(16) * L);
  T* ev[4];
  T* od[4];
  for (int r = 0; r < 4; ++r) {
    ev[r] = buf.data() + static_cast<size_t>(2 * r) * L;
    od[r] = buf.data() + static_cast<size_t>(2 * r + 1) * L;
  }
  T* ue = buf.data() + static_cast<size_t>(8) * L;   // one transformed row, even columns
  T* uo = buf.data() + static_cast<size_t>(12) * L;  // and odd columns
  // columns 2t - pad (even slot) and 2t + 1 - pad (odd slot) are inside the image for t in [t_lo, t_hi)
  const int t_lo = std::min(L, (pad + 1) / 2);
  const int t_hi = std::max(t_lo, std::min(L, (W + pad) / 2));  // 2t + 1 - pad <= W - 1
  for (int ty = ty0; ty < ty1; ++ty) {
    for (int r = 0; r < 4; ++r) {
      const int row = 2 * ty - pad + r;
      T* __restrict e = ev[r];
      T* __restrict o = od[r];
      if (row < 0 || row >= H) {
        std::fill(e, e + L, T(0));
        std::fill(o, o + L, T(0));
        continue;
      }
      const T* __restrict xr = x + static_cast<int64_t>(row) * W;
      auto at = [&](int col) { return (col >= 0 && col < W) ? xr[col] : T(0); };
      for (int t = 0; t < t_lo; ++t) {
        e[t] = at(2 * t - pad);
        o[t] = at(2 * t + 1 - pad);
      }
      split_even_odd(xr - pad + 2 * t_lo, t_hi - t_lo, e + t_lo, o + t_lo);
      for (int t = t_hi; t < L; ++t) {
        e[t] = at(2 * t - pad);
        o[t] = at(2 * t + 1 - pad);
      }
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

// Output transform of tile rows [ty0, ty1) of output channel k: Y = A^T M A + bias into out (Ho, Wo).
template <typename T>
void output_transform_rows(const T* __restrict M, int64_t m_plane, int ty0, int ty1, int Tw, T bias,
                           T* __restrict out, int Ho, int Wo, std::vector<T>& buf) {
  buf.resize(static_cast<size_t>(4) * Tw);
  T* y00 = buf.data();
  T* y01 = y00 + Tw;
  T* y10 = y01 + Tw;
  T* y11 = y10 + Tw;
  for (int ty = ty0; ty < ty1; ++ty) {
    const int64_t to = static_cast<int64_t>(ty - ty0) * Tw;
    const T* m[16];
    for (int q = 0; q < 16; ++q) m[q] = M + q * m_plane + to;
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
      if (y >= Ho) break;
      const T* __restrict ye = dy == 0 ? y00 : y10;
      const T* __restrict yo = dy == 0 ? y01 : y11;
      T* __restrict orow = out + static_cast<int64_t>(y) * Wo;
      const int full = Wo / 2;
      for (int t = 0; t < full; ++t) {
        orow[2 * t] = ye[t];
        orow[2 * t + 1] = yo[t];
      }
      if (Wo % 2) orow[Wo - 1] = ye[full];
    }
  }
}

// Tile rows per band: V and M of a band take about kBandBytes together (a share of L3), and at least
// kMinTiles tiles so that the GEMMs stay wide enough for MKL's kernels (tuned on a 2-core Zen 3 with
// the VGG-16 shapes: the speed is flat within ~10 % from 4 to 8 MiB and from 256 to 512 tiles).
constexpr int64_t kBandBytes = 8 << 20;
constexpr int kMinTiles = 384;

template <typename T>
void forward_impl(const at::Tensor& x, const at::Tensor& U, const at::Tensor& bias, int pad, at::Tensor& out) {
  const int64_t N = x.size(0), C = x.size(1);
  const int H = static_cast<int>(x.size(2)), W = static_cast<int>(x.size(3));
  const int64_t K = U.size(1);
  const int Ho = static_cast<int>(out.size(2)), Wo = static_cast<int>(out.size(3));
  const int Th = (Ho + 1) / 2, Tw = (Wo + 1) / 2;
  const int64_t per_row = 16 * (C + K) * static_cast<int64_t>(Tw) * static_cast<int64_t>(sizeof(T));
  int band = static_cast<int>(std::max<int64_t>(1, kBandBytes / per_row));
  band = std::max(band, (kMinTiles + Tw - 1) / Tw);
  band = std::min(band, Th);
  const int64_t pb = static_cast<int64_t>(band) * Tw;  // tiles per full band: the planes' stride
  at::Tensor Vt = at::empty({16, C, pb}, x.options());
  at::Tensor Mt = at::empty({16, K, pb}, x.options());
  const T* xp = x.data_ptr<T>();
  const T* bp = bias.defined() ? bias.data_ptr<T>() : nullptr;
  T* op = out.data_ptr<T>();
  T* vp = Vt.data_ptr<T>();
  const T* mp = Mt.data_ptr<T>();
  const int64_t grain_c = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, 16 * pb));
  for (int64_t n = 0; n < N; ++n) {
    for (int ty0 = 0; ty0 < Th; ty0 += band) {
      const int ty1 = std::min(Th, ty0 + band);
      const int64_t tiles = static_cast<int64_t>(ty1 - ty0) * Tw;
      at::parallel_for(0, C, grain_c, [&](int64_t c0, int64_t c1) {
        std::vector<T> buf;
        for (int64_t c = c0; c < c1; ++c)
          input_transform_rows<T>(xp + (n * C + c) * H * W, H, W, pad, ty0, ty1, Tw, vp + c * pb, C * pb, buf);
      });
      // M_q = U_q V_q for the 16 entries q of the tile, on the band's tiles (a narrowed view when
      // the last band is shorter: leading dimension pb)
      at::Tensor Mb = Mt.narrow(2, 0, tiles);
      at::bmm_out(Mb, U, Vt.narrow(2, 0, tiles));
      TORCH_CHECK(Mb.data_ptr() == Mt.data_ptr() && Mb.stride(2) == 1 && Mb.stride(1) == pb,
                  "winograd_conv2d: internal error (bmm_out did not write in place)");
      at::parallel_for(0, K, grain_c, [&](int64_t k0, int64_t k1) {
        std::vector<T> buf;
        for (int64_t k = k0; k < k1; ++k)
          output_transform_rows<T>(mp + k * pb, K * pb, ty0, ty1, Tw, bp ? bp[k] : T(0),
                                   op + (n * K + k) * static_cast<int64_t>(Ho) * Wo, Ho, Wo, buf);
      });
    }
  }
}

// U[4a + b][k][c] = (G g_kc G^T)[a][b]: rows of G are (1, 0, 0), (1/2, 1/2, 1/2), (1/2, -1/2, 1/2), (0, 0, 1).
template <typename T>
void weight_transform(const T* __restrict w, int64_t KC, T* __restrict u) {
  at::parallel_for(0, KC, 4096, [&](int64_t b, int64_t e) {
    for (int64_t q = b; q < e; ++q) {
      const T* g = w + q * 9;
      T t[4][3];  // G g
      for (int j = 0; j < 3; ++j) {
        t[0][j] = g[j];
        t[1][j] = T(0.5) * (g[j] + g[3 + j] + g[6 + j]);
        t[2][j] = T(0.5) * (g[j] - g[3 + j] + g[6 + j]);
        t[3][j] = g[6 + j];
      }
      for (int a = 0; a < 4; ++a) {  // (G g) G^T
        u[(4 * a + 0) * KC + q] = t[a][0];
        u[(4 * a + 1) * KC + q] = T(0.5) * (t[a][0] + t[a][1] + t[a][2]);
        u[(4 * a + 2) * KC + q] = T(0.5) * (t[a][0] - t[a][1] + t[a][2]);
        u[(4 * a + 3) * KC + q] = t[a][2];
      }
    }
  });
}

at::Tensor winograd_weight_cpu(const at::Tensor& w_in) {
  check_weight(w_in, "winograd_weight");
  TORCH_CHECK_VALUE(w_in.scalar_type() == at::kFloat || w_in.scalar_type() == at::kDouble,
                    "winograd_weight: weight dtype ", w_in.scalar_type(), " is not supported on CPU (float32 or float64)");
  const at::Tensor w = w_in.contiguous();
  at::Tensor u = at::empty({16, w.size(0), w.size(1)}, w.options());
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "winograd_weight_cpu", [&] {
    weight_transform<scalar_t>(w.data_ptr<scalar_t>(), w.size(0) * w.size(1), u.data_ptr<scalar_t>());
  });
  return u;
}

at::Tensor winograd_conv2d_cpu(const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& u_in,
                               const std::optional<at::Tensor>& bias_in, int64_t padding) {
  check_forward(x_in, w_in, u_in, bias_in, padding);
  TORCH_CHECK_VALUE(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kDouble,
                    "winograd_conv2d: x dtype ", x_in.scalar_type(), " is not supported on CPU (float32 or float64)");
  const at::Tensor x = x_in.contiguous();
  const at::Tensor U = u_in.contiguous();
  const at::Tensor bias = (bias_in.has_value() && bias_in->defined()) ? bias_in->contiguous() : at::Tensor();
  const int64_t Ho = out_size(x.size(2), padding), Wo = out_size(x.size(3), padding);
  at::Tensor out = at::empty({x.size(0), U.size(1), Ho, Wo}, x.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "winograd_conv2d_cpu", [&] {
    forward_impl<scalar_t>(x, U, bias, static_cast<int>(padding), out);
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
