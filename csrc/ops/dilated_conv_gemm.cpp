// attnscale::dilated_conv2d as GEMMs over rectangles of live taps (see dilated_conv_gemm.h).
//
// Caffe's Convolution (stride 1, dilation d, zero padding p) reads padding at the borders of the
// output plane.  dilated_conv_geometry.h splits the plane into rectangles with one fixed set of live
// taps (live kernel rows x live kernel columns).  For each rectangle of the batch the live taps of x
// are gathered into a column block (taps * C, N * rows * cols), Caffe's im2col restricted to the live
// taps, and the weight's matching columns multiply it: one GEMM (at::mm) per rectangle with its whole
// reduction inside one BLAS call, so in bf16/fp16 each output is rounded once, as cuDNN's are.  FLOPs:
// the live taps only (fc6 at 41x41: 65 % of the dense convolution's).  The copies around the GEMMs
// take one launch each for all rectangles (dilated_conv_pack.h; CPU loops and CUDA kernels).
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
#include "ops/dilated_conv_pack.h"

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

const PackKernels* g_cuda_pack_kernels = nullptr;

const PackKernels& pack_kernels(const at::Tensor& t) {
  if (t.is_cpu()) return cpu_pack_kernels();
  TORCH_CHECK(t.is_cuda() && g_cuda_pack_kernels != nullptr, "dilated_conv2d (gemm path): no copy kernels for ",
              t.device(), " tensors in this build of attnscale._C");
  return *g_cuda_pack_kernels;
}

struct Layout {
  int64_t d, pad_y, pad_x;  // padding per axis: the backward's adjoint convolution may differ per axis
};

// An output rectangle whose live taps are kernel rows rows.k_begin.. x kernel columns cols.k_begin..
struct Rect {
  TapInterval rows, cols;
  int64_t pixels() const { return rows.length() * cols.length(); }
  int64_t taps() const { return rows.taps() * cols.taps(); }
};

// Every live rectangle of a convolution with its blocks in one column and one product buffer.
struct Blocks {
  int64_t n = 0;
  std::vector<Rect> rects;
  std::vector<int64_t> col_offset, prod_offset, ld;
  std::vector<PackPlan> plans;  // the same blocks, kMaxPackRects per copy launch
  int64_t col_size = 0, prod_size = 0, covered = 0;

  int64_t m(size_t i) const { return n * rects[i].pixels(); }
  // (rows, M) views with row stride ld[i]
  at::Tensor block(const at::Tensor& buf, int64_t offset, int64_t rows, size_t i) const {
    return buf.narrow(0, offset, rows * ld[i]).view({rows, ld[i]}).narrow(1, 0, m(i));
  }
  at::Tensor columns(const at::Tensor& buf, size_t i, int64_t C) const {
    return block(buf, col_offset[i], rects[i].taps() * C, i);
  }
  at::Tensor product(const at::Tensor& buf, size_t i, int64_t O) const { return block(buf, prod_offset[i], O, i); }
};

// N, C, O >= 1.  x (N, C, H, W) -> out (N, O, Ho, Wo).
Blocks make_blocks(int64_t N, int64_t C, int64_t H, int64_t W, int64_t O, int64_t Ho, int64_t Wo, int64_t KH,
                   int64_t KW, const Layout& l) {
  Blocks b;
  b.n = N;
  for (const TapInterval& r : tap_intervals(H, Ho, KH, l.d, l.pad_y)) {
    if (r.taps() == 0) continue;
    for (const TapInterval& q : tap_intervals(W, Wo, KW, l.d, l.pad_x)) {
      if (q.taps() > 0) b.rects.push_back({r, q});
    }
  }
  constexpr int64_t kIndexLimit = int64_t(1) << 31;  // the copies' 32-bit index arithmetic
  PackPlan base{};
  base.N = N, base.C = C, base.H = H, base.W = W, base.O = O, base.Ho = Ho, base.Wo = Wo, base.dilation = l.d;
  base.channels = make_fast_div(uint32_t(C));
  for (const Rect& rc : b.rects) {
    const int64_t M = N * rc.pixels(), K = rc.taps() * C, ld = (M + 7) / 8 * 8;
    TORCH_CHECK(ld < kIndexLimit && K < kIndexLimit, "dilated_conv2d (gemm path): a block of ", K, " x ", M,
                " (live taps x channels, batch x rectangle) exceeds 2^31 per side; split the batch or set "
                "ATTNSCALE_DILATED_CONV_ALGO=direct");
    if (b.plans.empty() || b.plans.back().num_rects == kMaxPackRects) b.plans.push_back(base);
    PackPlan& plan = b.plans.back();
    plan.rects[plan.num_rects++] = PackRect{
        rc.rows.start, rc.cols.start,
        rc.rows.start - l.pad_y + rc.rows.k_begin * l.d, rc.cols.start - l.pad_x + rc.cols.k_begin * l.d,
        rc.rows.taps(), rc.cols.taps(), b.col_size, b.prod_size, ld,
        make_fast_div(uint32_t(rc.cols.length())), make_fast_div(uint32_t(rc.rows.length())),
        make_fast_div(uint32_t(rc.cols.taps()))};
    b.col_offset.push_back(b.col_size);
    b.prod_offset.push_back(b.prod_size);
    b.ld.push_back(ld);
    b.col_size += K * ld;
    b.prod_size += O * ld;
    b.covered += rc.pixels();
  }
  return b;
}

// All column blocks of x (N, C, H, W, contiguous).
at::Tensor pack_columns(const at::Tensor& x, const Blocks& b) {
  at::Tensor cols = at::empty({b.col_size}, x.options());
  for (const PackPlan& plan : b.plans) pack_kernels(x).columns(x, cols, plan);
  return cols;
}

// The weight columns of a rectangle's live taps from w laid out (O, KH, KW, C): (O, taps * C), the
// reduction index in the column blocks' (ky, kx, c) order.  A view when all kernel columns are live.
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

// Convolution of x (N, C, H, W) with weight (O, C, KH, KW), per-axis padding (negative = cropping).
at::Tensor convolve(const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& bias_in, const Layout& l) {
  const int64_t N = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  const int64_t O = weight.size(0), KH = weight.size(2), KW = weight.size(3);
  const int64_t Ho = H + 2 * l.pad_y - l.d * (KH - 1), Wo = W + 2 * l.pad_x - l.d * (KW - 1);
  at::Tensor out = at::empty({N, O, Ho, Wo}, x_in.options());
  if (out.numel() == 0) return out;
  const at::Tensor bias = bias_in.defined() ? bias_in.contiguous() : bias_in;
  const Blocks b = C > 0 ? make_blocks(N, C, H, W, O, Ho, Wo, KH, KW, l) : Blocks{};
  if (b.covered < Ho * Wo) {  // outputs without any live tap: the bias alone
    if (bias.defined()) {
      out.copy_(bias.view({1, O, 1, 1}).expand_as(out));
    } else {
      out.zero_();
    }
  }
  if (b.rects.empty()) return out;
  const at::Tensor x = x_in.contiguous();
  const at::Tensor cols = pack_columns(x, b);
  const at::Tensor w_okkc = weight.permute({0, 2, 3, 1}).contiguous();
  at::Tensor prod = at::empty({b.prod_size}, x.options());
  for (size_t i = 0; i < b.rects.size(); ++i) {
    at::Tensor dst = b.product(prod, i, O);  // (O, N * rows * cols) = (O, taps * C) @ (taps * C, N * rows * cols)
    at::mm_out(dst, weight_rows(w_okkc, b.rects[i]), b.columns(cols, i, C));
  }
  for (const PackPlan& plan : b.plans) pack_kernels(x).scatter_output(prod, bias, out, plan);
  return out;
}

}  // namespace

void register_cuda_pack_kernels(const PackKernels* kernels) { g_cuda_pack_kernels = kernels; }

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

std::tuple<at::Tensor, at::Tensor> gemm_backward_weight(const at::Tensor& grad_output, const at::Tensor& x_in,
                                                        int64_t kernel_h, int64_t kernel_w, int64_t dilation,
                                                        int64_t padding) {
  NoAutocast no_autocast;
  const int64_t N = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3), O = grad_output.size(1);
  const int64_t Ho = grad_output.size(2), Wo = grad_output.size(3);
  const bool half = x_in.scalar_type() == at::kHalf || x_in.scalar_type() == at::kBFloat16;
  at::Tensor acc = at::zeros({O, kernel_h, kernel_w, C}, x_in.options().dtype(half ? at::kFloat : x_in.scalar_type()));
  if (N > 0 && C > 0 && O > 0) {
    const Blocks b = make_blocks(N, C, H, W, O, Ho, Wo, kernel_h, kernel_w, {dilation, padding, padding});
    const at::Tensor x = x_in.contiguous(), g = grad_output.contiguous();
    const at::Tensor cols = pack_columns(x, b);
    at::Tensor gprod = at::empty({b.prod_size}, g.options());
    for (const PackPlan& plan : b.plans) pack_kernels(g).gather_output(g, gprod, plan);
    for (size_t i = 0; i < b.rects.size(); ++i) {
      // (O, taps * C) = (O, N * rows * cols) @ (N * rows * cols, taps * C)
      const at::Tensor gi = b.product(gprod, i, O), ci = b.columns(cols, i, C).t();
      const at::Tensor part = half ? at::mm(gi, ci, at::kFloat) : at::mm(gi, ci);
      const Rect& rc = b.rects[i];
      acc.narrow(1, rc.rows.k_begin, rc.rows.taps())
          .narrow(2, rc.cols.k_begin, rc.cols.taps())
          .add_(part.view({O, rc.rows.taps(), rc.cols.taps(), C}));
    }
  }
  at::Tensor gw = at::empty({O, C, kernel_h, kernel_w}, x_in.options());
  gw.copy_(acc.permute({0, 3, 1, 2}));
  return {gw, grad_output.sum({0, 2, 3})};
}

}  // namespace dilated_conv
}  // namespace attnscale
