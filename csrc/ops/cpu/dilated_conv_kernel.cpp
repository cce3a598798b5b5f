// CPU kernels of attnscale::dilated_conv2d (+ backward) that skip the taps
// landing on zero padding.
//
// The output plane is split into rectangles with one fixed set of live taps
// (dilated_conv_geometry.h).  For each rectangle and a chunk of the batch we
// gather ("im2col") only the live taps into a compact matrix
//   col[(ky, kx, c), (b, oy, ox)]          (K_live = live_ky * live_kx * C rows)
// and multiply it with the weights, packed once per call as
//   wpack[o, (ky, kx, c)]                  (O x KH*KW*C, row-major).
// The live kx of one kernel row are consecutive in wpack, so every live kernel
// row is one GEMM with K = live_kx*C on a strided view of wpack (and a single
// GEMM with K = K_live when all kx are live).  GEMMs go to at::mm / addmm
// (MKL), the gather / scatter loops are parallelised with at::parallel_for.
//
// Backward: grad_weight accumulates grad_out_rect @ col^T into the live
// columns of a packed gradient (GEMMs, summed over rectangles and batch
// chunks in a fixed order); grad_input computes dcol = wpack_live^T @
// grad_out_rect and scatters it back (col2im) with one thread per input
// channel, so there are no atomics and the result is deterministic.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

#include "ops/dilated_conv_checks.h"
#include "ops/dilated_conv_geometry.h"

namespace attnscale {
namespace dilated_conv {
namespace {

// Upper bound on the elements of one im2col buffer (batch chunks are sized to it).
constexpr int64_t kColBudget = int64_t(8) << 20;

struct Geometry {
  int64_t N, C, H, W, O, KH, KW, Ho, Wo, d, p;
  std::vector<TapInterval> rows, cols;
};

Geometry make_geometry(int64_t N, int64_t C, int64_t H, int64_t W, int64_t O, int64_t KH, int64_t KW,
                       int64_t d, int64_t p) {
  Geometry g{N, C, H, W, O, KH, KW, out_size(H, KH, d, p), out_size(W, KW, d, p), d, p, {}, {}};
  g.rows = tap_intervals(H, g.Ho, KH, d, p);
  g.cols = tap_intervals(W, g.Wo, KW, d, p);
  return g;
}

// One rectangle of output positions with its live taps.
struct Rect {
  const TapInterval& r;
  const TapInterval& q;
  int64_t pixels() const { return r.length() * q.length(); }
  int64_t nky() const { return r.taps(); }
  int64_t nkx() const { return q.taps(); }
};

int64_t batch_chunk(int64_t N, int64_t rows, int64_t pixels) {
  const int64_t per_image = std::max<int64_t>(1, rows * pixels);
  return std::max<int64_t>(1, std::min<int64_t>(N, kColBudget / per_image));
}

// col[(kyi, kxi, c), b*P + (oy-r0)*QL + (ox-q0)] = x[n0+b, c, oy-p+ky*d, ox-p+kx*d]
template <typename T>
void im2col(const T* x, T* col, const Geometry& g, const Rect& rc, int64_t n0, int64_t nb) {
  const int64_t P = rc.pixels(), QL = rc.q.length(), nkx = rc.nkx();
  const int64_t rows = rc.nky() * nkx * g.C;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t c = row % g.C, tap = row / g.C;
      const int64_t ky = rc.r.k_begin + tap / nkx, kx = rc.q.k_begin + tap % nkx;
      const int64_t ix0 = rc.q.start - g.p + kx * g.d;
      T* dst = col + row * nb * P;
      for (int64_t b = 0; b < nb; ++b) {
        const T* src = x + ((n0 + b) * g.C + c) * g.H * g.W;
        for (int64_t oy = rc.r.start; oy < rc.r.end; ++oy) {
          const int64_t iy = oy - g.p + ky * g.d;
          std::memcpy(dst, src + iy * g.W + ix0, sizeof(T) * QL);
          dst += QL;
        }
      }
    }
  });
}

// dst[o, b*P + ...] = src[n0+b, o, rect]   (gather of grad_output, M = channels of src)
template <typename T>
void gather_rect(const T* src, T* dst, int64_t M, int64_t Ho, int64_t Wo, const Rect& rc, int64_t n0,
                 int64_t nb) {
  const int64_t P = rc.pixels(), QL = rc.q.length();
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      T* d = dst + o * nb * P;
      for (int64_t b = 0; b < nb; ++b) {
        const T* s = src + ((n0 + b) * M + o) * Ho * Wo;
        for (int64_t oy = rc.r.start; oy < rc.r.end; ++oy) {
          std::memcpy(d, s + oy * Wo + rc.q.start, sizeof(T) * QL);
          d += QL;
        }
      }
    }
  });
}

// out[n0+b, o, rect] = res[o, b*P + ...] + bias[o]
template <typename T>
void scatter_rect(const T* res, const T* bias, T* out, const Geometry& g, const Rect& rc, int64_t n0,
                  int64_t nb) {
  const int64_t P = rc.pixels(), QL = rc.q.length();
  at::parallel_for(0, g.O, 16, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const T bv = bias ? bias[o] : T(0);
      const T* s = res + o * nb * P;
      for (int64_t b = 0; b < nb; ++b) {
        T* d = out + ((n0 + b) * g.O + o) * g.Ho * g.Wo;
        for (int64_t oy = rc.r.start; oy < rc.r.end; ++oy) {
          T* drow = d + oy * g.Wo + rc.q.start;
          for (int64_t i = 0; i < QL; ++i) drow[i] = s[i] + bv;
          s += QL;
        }
      }
    }
  });
}

// Rectangle with no live tap: bias only.
template <typename T>
void fill_rect(const T* bias, T* out, const Geometry& g, const Rect& rc) {
  at::parallel_for(0, g.N * g.O, 16, [&](int64_t begin, int64_t end) {
    for (int64_t no = begin; no < end; ++no) {
      const T bv = bias ? bias[no % g.O] : T(0);
      T* d = out + no * g.Ho * g.Wo;
      for (int64_t oy = rc.r.start; oy < rc.r.end; ++oy)
        for (int64_t ox = rc.q.start; ox < rc.q.end; ++ox) d[oy * g.Wo + ox] = bv;
    }
  });
}

// gx[n0+b, c, iy, ix] += dcol[(kyi, kxi, c), b*P + ...]; one thread owns a channel.
template <typename T>
void col2im_add(const T* dcol, T* gx, const Geometry& g, const Rect& rc, int64_t n0, int64_t nb) {
  const int64_t P = rc.pixels(), QL = rc.q.length(), nky = rc.nky(), nkx = rc.nkx();
  at::parallel_for(0, g.C, 4, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      for (int64_t t = 0; t < nky * nkx; ++t) {
        const int64_t ky = rc.r.k_begin + t / nkx, kx = rc.q.k_begin + t % nkx;
        const int64_t ix0 = rc.q.start - g.p + kx * g.d;
        const T* s = dcol + (t * g.C + c) * nb * P;
        for (int64_t b = 0; b < nb; ++b) {
          T* dimg = gx + ((n0 + b) * g.C + c) * g.H * g.W;
          for (int64_t oy = rc.r.start; oy < rc.r.end; ++oy) {
            T* drow = dimg + (oy - g.p + ky * g.d) * g.W + ix0;
            for (int64_t i = 0; i < QL; ++i) drow[i] += s[i];
            s += QL;
          }
        }
      }
    }
  });
}

// Column range of wpack (O x KH*KW*C) holding the live taps of kernel row ky.
at::Tensor wpack_row_view(const at::Tensor& wpack, const Geometry& g, const Rect& rc, int64_t ky) {
  return wpack.narrow(1, (ky * g.KW + rc.q.k_begin) * g.C, rc.nkx() * g.C);
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "dilated_conv2d (CPU kernel): ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              "dilated_conv2d (CPU kernel): ", name, " must be float32 or float64, got ", t.scalar_type());
}

at::Tensor forward_cpu(const at::Tensor& x_in, const at::Tensor& weight_in,
                       const c10::optional<at::Tensor>& bias_in, int64_t dilation, int64_t padding) {
  check_forward(x_in, weight_in, bias_in, dilation, padding);
  check_cpu(x_in, "x");
  const at::Tensor x = x_in.contiguous();
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  const at::Tensor bias = has_bias ? bias_in->contiguous() : at::Tensor();
  const Geometry g = make_geometry(x.size(0), x.size(1), x.size(2), x.size(3), weight_in.size(0),
                                   weight_in.size(2), weight_in.size(3), dilation, padding);
  at::Tensor out = at::empty({g.N, g.O, g.Ho, g.Wo}, x.options());
  if (out.numel() == 0) return out;
  // Pack once per call, shared by every rectangle and batch chunk: wpack[o, (ky, kx, c)].
  const at::Tensor wpack = weight_in.permute({0, 2, 3, 1}).contiguous().view({g.O, g.KH * g.KW * g.C});
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dilated_conv2d_cpu", [&] {
    const scalar_t* bptr = has_bias ? bias.data_ptr<scalar_t>() : nullptr;
    for (const auto& r : g.rows) {
      for (const auto& q : g.cols) {
        const Rect rc{r, q};
        if (rc.nky() == 0 || rc.nkx() == 0 || g.C == 0) {
          fill_rect<scalar_t>(bptr, out.data_ptr<scalar_t>(), g, rc);
          continue;
        }
        const int64_t P = rc.pixels(), K = rc.nky() * rc.nkx() * g.C;
        const int64_t nb_max = batch_chunk(g.N, K, P);
        at::Tensor col = at::empty({K * nb_max * P}, x.options());
        at::Tensor res = at::empty({g.O * nb_max * P}, x.options());
        for (int64_t n0 = 0; n0 < g.N; n0 += nb_max) {
          const int64_t nb = std::min(nb_max, g.N - n0);
          at::Tensor colm = col.narrow(0, 0, K * nb * P).view({K, nb * P});
          at::Tensor resm = res.narrow(0, 0, g.O * nb * P).view({g.O, nb * P});
          im2col<scalar_t>(x.data_ptr<scalar_t>(), colm.data_ptr<scalar_t>(), g, rc, n0, nb);
          if (rc.nkx() == g.KW) {  // live taps of consecutive kernel rows are contiguous in wpack
            at::mm_out(resm, wpack.narrow(1, rc.r.k_begin * g.KW * g.C, K), colm);
          } else {
            const int64_t kr = rc.nkx() * g.C;
            for (int64_t i = 0; i < rc.nky(); ++i) {
              const at::Tensor wv = wpack_row_view(wpack, g, rc, rc.r.k_begin + i);
              const at::Tensor cv = colm.narrow(0, i * kr, kr);
              if (i == 0) at::mm_out(resm, wv, cv);
              else resm.addmm_(wv, cv);
            }
          }
          scatter_rect<scalar_t>(resm.data_ptr<scalar_t>(), bptr, out.data_ptr<scalar_t>(), g, rc, n0, nb);
        }
      }
    }
  });
  return out;
}

at::Tensor backward_input_cpu(const at::Tensor& grad_out_in, const at::Tensor& weight_in, int64_t dilation,
                              int64_t padding) {
  check_grad_output(grad_out_in, weight_in, "weight");
  check_cpu(grad_out_in, "grad_output");
  TORCH_CHECK(weight_in.dim() == 4, "dilated_conv2d backward: weight must be 4-D, got ", weight_in.dim(), "-D");
  TORCH_CHECK(grad_out_in.size(1) == weight_in.size(0), "dilated_conv2d backward: grad_output has ",
              grad_out_in.size(1), " channels but weight has ", weight_in.size(0), " output channels");
  check_kernel_size(weight_in.size(2), weight_in.size(3));
  check_params(dilation, padding);
  const int64_t KH = weight_in.size(2), KW = weight_in.size(3);
  const int64_t H = grad_out_in.size(2) - 2 * padding + dilation * (KH - 1);
  const int64_t W = grad_out_in.size(3) - 2 * padding + dilation * (KW - 1);
  TORCH_CHECK(H >= 1 && W >= 1, "dilated_conv2d backward: grad_output spatial size ",
              grad_out_in.sizes(), " implies an input size (", H, ", ", W, ") < 1");
  const at::Tensor go = grad_out_in.contiguous();
  const Geometry g = make_geometry(go.size(0), weight_in.size(1), H, W, weight_in.size(0), KH, KW, dilation,
                                   padding);
  at::Tensor gx = at::zeros({g.N, g.C, g.H, g.W}, go.options());
  if (gx.numel() == 0 || g.O == 0) return gx;
  const at::Tensor wpack = weight_in.permute({0, 2, 3, 1}).contiguous().view({g.O, g.KH * g.KW * g.C});
  AT_DISPATCH_FLOATING_TYPES(go.scalar_type(), "dilated_conv2d_backward_input_cpu", [&] {
    for (const auto& r : g.rows) {
      for (const auto& q : g.cols) {
        const Rect rc{r, q};
        if (rc.nky() == 0 || rc.nkx() == 0) continue;
        const int64_t P = rc.pixels(), K = rc.nky() * rc.nkx() * g.C;
        const int64_t nb_max = batch_chunk(g.N, std::max(K, g.O), P);
        at::Tensor gbuf = at::empty({g.O * nb_max * P}, go.options());
        at::Tensor dcol = at::empty({K * nb_max * P}, go.options());
        for (int64_t n0 = 0; n0 < g.N; n0 += nb_max) {
          const int64_t nb = std::min(nb_max, g.N - n0);
          at::Tensor gm = gbuf.narrow(0, 0, g.O * nb * P).view({g.O, nb * P});
          at::Tensor dm = dcol.narrow(0, 0, K * nb * P).view({K, nb * P});
          gather_rect<scalar_t>(go.data_ptr<scalar_t>(), gm.data_ptr<scalar_t>(), g.O, g.Ho, g.Wo, rc, n0, nb);
          if (rc.nkx() == g.KW) {
            at::mm_out(dm, wpack.narrow(1, rc.r.k_begin * g.KW * g.C, K).t(), gm);
          } else {
            const int64_t kr = rc.nkx() * g.C;
            for (int64_t i = 0; i < rc.nky(); ++i) {
              at::Tensor dv = dm.narrow(0, i * kr, kr);
              at::mm_out(dv, wpack_row_view(wpack, g, rc, rc.r.k_begin + i).t(), gm);
            }
          }
          col2im_add<scalar_t>(dm.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(), g, rc, n0, nb);
        }
      }
    }
  });
  return gx;
}

std::tuple<at::Tensor, at::Tensor> backward_weight_cpu(const at::Tensor& grad_out_in, const at::Tensor& x_in,
                                                       int64_t kernel_h, int64_t kernel_w, int64_t dilation,
                                                       int64_t padding) {
  check_grad_output(grad_out_in, x_in, "x");
  check_cpu(x_in, "x");
  TORCH_CHECK(x_in.dim() == 4, "dilated_conv2d backward: x must be 4-D, got ", x_in.dim(), "-D");
  check_kernel_size(kernel_h, kernel_w);
  check_params(dilation, padding);
  check_output_size(x_in.size(2), x_in.size(3), kernel_h, kernel_w, dilation, padding);
  const Geometry g = make_geometry(x_in.size(0), x_in.size(1), x_in.size(2), x_in.size(3), grad_out_in.size(1),
                                   kernel_h, kernel_w, dilation, padding);
  TORCH_CHECK(grad_out_in.size(0) == g.N && grad_out_in.size(2) == g.Ho && grad_out_in.size(3) == g.Wo,
              "dilated_conv2d backward: grad_output has shape ", grad_out_in.sizes(), " but x ", x_in.sizes(),
              " gives an output of (", g.N, ", ", g.O, ", ", g.Ho, ", ", g.Wo, ")");
  const at::Tensor go = grad_out_in.contiguous();
  const at::Tensor x = x_in.contiguous();
  at::Tensor gbias = go.sum({0, 2, 3});
  at::Tensor gpack = at::zeros({g.O, g.KH * g.KW * g.C}, go.options());
  if (g.N > 0 && g.C > 0 && g.O > 0) {
    AT_DISPATCH_FLOATING_TYPES(go.scalar_type(), "dilated_conv2d_backward_weight_cpu", [&] {
      for (const auto& r : g.rows) {
        for (const auto& q : g.cols) {
          const Rect rc{r, q};
          if (rc.nky() == 0 || rc.nkx() == 0) continue;
          const int64_t P = rc.pixels(), K = rc.nky() * rc.nkx() * g.C;
          const int64_t nb_max = batch_chunk(g.N, std::max(K, g.O), P);
          at::Tensor gbuf = at::empty({g.O * nb_max * P}, go.options());
          at::Tensor col = at::empty({K * nb_max * P}, go.options());
          for (int64_t n0 = 0; n0 < g.N; n0 += nb_max) {
            const int64_t nb = std::min(nb_max, g.N - n0);
            at::Tensor gm = gbuf.narrow(0, 0, g.O * nb * P).view({g.O, nb * P});
            at::Tensor cm = col.narrow(0, 0, K * nb * P).view({K, nb * P});
            gather_rect<scalar_t>(go.data_ptr<scalar_t>(), gm.data_ptr<scalar_t>(), g.O, g.Ho, g.Wo, rc, n0, nb);
            im2col<scalar_t>(x.data_ptr<scalar_t>(), cm.data_ptr<scalar_t>(), g, rc, n0, nb);
            if (rc.nkx() == g.KW) {
              at::Tensor gv = gpack.narrow(1, rc.r.k_begin * g.KW * g.C, K);
              gv.addmm_(gm, cm.t());
            } else {
              const int64_t kr = rc.nkx() * g.C;
              for (int64_t i = 0; i < rc.nky(); ++i) {
                at::Tensor gv = wpack_row_view(gpack, g, rc, rc.r.k_begin + i);
                gv.addmm_(gm, cm.narrow(0, i * kr, kr).t());
              }
            }
          }
        }
      }
    });
  }
  at::Tensor gw = gpack.view({g.O, g.KH, g.KW, g.C}).permute({0, 3, 1, 2}).contiguous();
  return {gw, gbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(attnscale, CPU, m) {
  m.impl("dilated_conv2d", &forward_cpu);
  m.impl("dilated_conv2d_backward_input", &backward_input_cpu);
  m.impl("dilated_conv2d_backward_weight", &backward_weight_cpu);
}

}  // namespace dilated_conv
}  // namespace attnscale
