// attnscale::dilated_conv2d as GEMMs over rectangles of live taps (see dilated_conv_gemm.h).
//
// Caffe's Convolution (stride 1, dilation d, zero padding p) reads padding at the borders of the
// output plane.  dilated_conv_geometry.h splits the plane into rectangles with one fixed set of live
// taps (live kernel rows x live kernel columns).  For each rectangle of the batch the live taps are
// gathered from the NCHW input into columns (taps * C, N * rows * cols), Caffe's im2col restricted to
// the live taps, and the weight's matching columns multiply them: one GEMM per rectangle, its whole
// reduction inside one BLAS call, so in bf16/fp16 each output is rounded once, as cuDNN's are.  FLOPs:
// the live taps only (fc6 at 41x41: 65 % of the dense convolution's).  Every copy (the gather, the
// result into its rectangle of the NCHW output) runs along image rows, contiguous on both sides.
//
//   forward          out[rect] = w[live taps] @ columns(x, rect) (+ bias)
//   backward input   the adjoint of a stride-1 convolution is the convolution of grad_output with the
//                    kernel flipped and transposed, padding d*(k-1) - p: the forward's code again
//   backward weight  dw[live taps] += grad_output[rect] @ columns(x, rect)^T, summed over rectangles
//                    in fp32 for bf16/fp16 (each rectangle's product comes out of cuBLAS in fp32)
//
// Every step runs in a fixed order without atomics, so results are deterministic.
#include "ops/dilated_conv_gemm.h"

#include <c10/core/impl/LocalDispatchKeySet.h>

#include <cstdlib>
#include <cstring>
#include <vector>

#include "ops/dilated_conv_geometry.h"

namespace attnscale {
namespace dilated_conv {

bool use_gemm(const at::Tensor& t) {
  const char* v = std::getenv("ATTNSCALE_DILATED_CONV_ALGO");
  if (v == nullptr || *v == '\0') return t.is_cuda();
  if (std::strcmp(v, "gemm") == 0) return true;
  if (std::strcmp(v, "direct") == 0) return false;
  TORCH_CHECK(false, "dilated_conv2d: ATTNSCALE_DILATED_CONV_ALGO must be 'gemm' or 'direct' (or unset), got '",
              v, "'");
  return false;
}

namespace {

// An output rectangle whose live taps are kernel rows rows.k_begin.. x kernel columns cols.k_begin..
struct Rect {
  TapInterval rows, cols;
  int64_t pixels() const { return rows.length() * cols.length(); }
  int64_t taps() const { return rows.taps() * cols.taps(); }
};

struct Layout {
  int64_t d, pad_y, pad_x;  // padding per axis: the backward's adjoint convolution may differ per axis
};

std::vector<Rect> live_rects(int64_t H, int64_t W, int64_t Ho, int64_t Wo, int64_t KH, int64_t KW, const Layout& l) {
  std::vector<Rect> rects;
  for (const TapInterval& r : tap_intervals(H, Ho, KH, l.d, l.pad_y)) {
    if (r.taps() == 0) continue;
    for (const TapInterval& q : tap_intervals(W, Wo, KW, l.d, l.pad_x)) {
      if (q.taps() > 0) rects.push_back({r, q});
    }
  }
  return rects;
}

// The live taps of one rectangle gathered from x (N, C, H, W) as Caffe's im2col lays them out:
// (taps * C, N * rows * cols), the reduction index in (ky, kx, c) order, the order of weight_rows().
// Each copy runs along image rows, contiguous in x and in the columns alike.
at::Tensor columns(const at::Tensor& x, const Rect& rc, const Layout& l) {
  std::vector<at::Tensor> taps;
  taps.reserve(rc.taps());
  for (int64_t ky = rc.rows.k_begin; ky < rc.rows.k_end; ++ky) {
    for (int64_t kx = rc.cols.k_begin; kx < rc.cols.k_end; ++kx) {
      const int64_t y0 = rc.rows.start - l.pad_y + ky * l.d, x0 = rc.cols.start - l.pad_x + kx * l.d;
      taps.push_back(x.narrow(2, y0, rc.rows.length()).narrow(3, x0, rc.cols.length()).transpose(0, 1));
    }
  }
  return at::stack(taps, 0).view({rc.taps() * x.size(1), x.size(0) * rc.pixels()});
}

// The weight columns of a rectangle's live taps from w laid out (O, KH, KW, C): (O, taps * C).
at::Tensor weight_rows(const at::Tensor& w_okkc, const Rect& rc) {
  return w_okkc.narrow(1, rc.rows.k_begin, rc.rows.taps())
      .narrow(2, rc.cols.k_begin, rc.cols.taps())
      .reshape({w_okkc.size(0), rc.taps() * w_okkc.size(3)});
}

// The ATen calls below run in the op's dtype: an autocast region around the op (which has no
// autocast kernel of its own, so the dispatcher passed through) must not recast them.
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

bool half_type(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

// Convolution of x (N, C, H, W) with weight (O, C, KH, KW), per-axis padding (negative = cropping).
at::Tensor convolve(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const Layout& l) {
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3);
  const int64_t O = weight.size(0), KH = weight.size(2), KW = weight.size(3);
  const int64_t Ho = H + 2 * l.pad_y - l.d * (KH - 1), Wo = W + 2 * l.pad_x - l.d * (KW - 1);
  at::Tensor out = at::empty({N, O, Ho, Wo}, x.options());
  if (out.numel() == 0) return out;
  const std::vector<Rect> rects = live_rects(H, W, Ho, Wo, KH, KW, l);
  int64_t covered = 0;
  for (const Rect& rc : rects) covered += rc.pixels();
  if (covered < Ho * Wo) {  // outputs without any live tap: the bias alone
    if (bias.defined()) {
      out.copy_(bias.view({1, O, 1, 1}).expand_as(out));
    } else {
      out.zero_();
    }
  }
  if (rects.empty()) return out;
  const at::Tensor w_okkc = weight.permute({0, 2, 3, 1}).contiguous();
  for (const Rect& rc : rects) {
    // (O, N * rows * cols) = (O, taps * C) @ (taps * C, N * rows * cols)
    const at::Tensor prod = at::mm(weight_rows(w_okkc, rc), columns(x, rc, l));
    const at::Tensor src = prod.view({O, N, rc.rows.length(), rc.cols.length()}).transpose(0, 1);
    at::Tensor dst = out.narrow(2, rc.rows.start, rc.rows.length()).narrow(3, rc.cols.start, rc.cols.length());
    if (bias.defined()) {
      at::add_out(dst, src, bias.view({1, O, 1, 1}));
    } else {
      dst.copy_(src);
    }
  }
  return out;
}

}  // namespace

at::Tensor gemm_forward(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                        int64_t dilation, int64_t padding) {
  NoAutocast no_autocast;
  const at::Tensor b = bias.has_value() && bias->defined() ? *bias : at::Tensor();
  return convolve(x, weight, b, {dilation, padding, padding});
}

at::Tensor gemm_backward_input(const at::Tensor& grad_output, const at::Tensor& weight, int64_t dilation,
                               int64_t padding) {
  NoAutocast no_autocast;
  const int64_t KH = weight.size(2), KW = weight.size(3);
  // gx[c, iy] = sum_{o, ky} g[o, iy + p - ky*d] w[o, c, ky]: with ky' = KH-1-ky that reads
  // g[o, iy - (d*(KH-1) - p) + ky'*d], a convolution with w flipped and transposed.
  const at::Tensor w_adj = weight.flip({2, 3}).transpose(0, 1);
  return convolve(grad_output, w_adj, at::Tensor(),
                  {dilation, dilation * (KH - 1) - padding, dilation * (KW - 1) - padding});
}

std::tuple<at::Tensor, at::Tensor> gemm_backward_weight(const at::Tensor& grad_output, const at::Tensor& x,
                                                        int64_t kernel_h, int64_t kernel_w, int64_t dilation,
                                                        int64_t padding) {
  NoAutocast no_autocast;
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), O = grad_output.size(1);
  const int64_t Ho = grad_output.size(2), Wo = grad_output.size(3);
  const Layout l{dilation, padding, padding};
  const bool half = half_type(x);
  at::Tensor acc = at::zeros({O, kernel_h, kernel_w, C}, x.options().dtype(half ? at::kFloat : x.scalar_type()));
  const std::vector<Rect> rects = live_rects(H, W, Ho, Wo, kernel_h, kernel_w, l);
  if (N > 0 && C > 0 && O > 0) {
    for (const Rect& rc : rects) {
      // (O, taps * C) = (O, N * rows * cols) @ (N * rows * cols, taps * C)
      const at::Tensor g = grad_output.narrow(2, rc.rows.start, rc.rows.length())
                               .narrow(3, rc.cols.start, rc.cols.length())
                               .transpose(0, 1)
                               .reshape({O, N * rc.pixels()});
      const at::Tensor cols_t = columns(x, rc, l).t();
      const at::Tensor part = half ? at::mm(g, cols_t, at::kFloat) : at::mm(g, cols_t);
      acc.narrow(1, rc.rows.k_begin, rc.rows.taps())
          .narrow(2, rc.cols.k_begin, rc.cols.taps())
          .add_(part.view({O, rc.rows.taps(), rc.cols.taps(), C}));
    }
  }
  at::Tensor gw = at::empty({O, C, kernel_h, kernel_w}, x.options());
  gw.copy_(acc.permute({0, 3, 1, 2}));
  return {gw, grad_output.sum({0, 2, 3})};
}

}  // namespace dilated_conv
}  // namespace attnscale
