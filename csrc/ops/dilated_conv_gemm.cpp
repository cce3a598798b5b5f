// attnscale::dilated_conv2d as GEMMs over rectangles of live taps (see dilated_conv_gemm.h).
//
// Caffe's Convolution (stride 1, dilation d, zero padding p) reads padding at the borders of the
// output plane.  dilated_conv_geometry.h splits the plane into rectangles with one fixed set of live
// taps (live kernel rows x live kernel columns).  For each rectangle of the batch the live taps of x
// are gathered into a column block (N * rows * cols, taps * C), Caffe's im2col restricted to the live
// taps, in channels_last order, and it multiplies the weight's matching columns.  Rectangles of one
// size share a batched GEMM (at::bmm; fc6: one for the centre, one for the four edges, one for the
// four corners), with the whole reduction inside one BLAS call, so in bf16/fp16 each output is
// rounded once, as cuDNN's are.  FLOPs: the live taps only (fc6 at 41x41: 65 % of the dense
// convolution's).  The copies around the GEMMs take one launch each for all rectangles
// (dilated_conv_pack.h; CPU loops and CUDA kernels).
//
//   forward          out[rect] = columns(x, rect) @ w[live taps]^T (+ bias)
//   backward input   the adjoint of a stride-1 convolution is the convolution of grad_output with the
//                    kernel flipped and transposed, padding d*(k-1) - p: the forward's code again
//   backward weight  dw[live taps] += grad_output[rect]^T @ columns(x, rect): each rectangle's part
//                    from the batched GEMM (fp32 for bf16/fp16), summed per tap by one kernel; the
//                    columns are the forward's when it kept them (dilated_conv2d_with_columns: a
//                    training step writes them once, not twice); on a GPU the gather of grad_output's
//                    rows sums the bias gradient too (where one plan covers every output)
//
// Every step runs in a fixed order without atomics, so results are deterministic.
#include "ops/dilated_conv_gemm.h"

#include <c10/core/impl/LocalDispatchKeySet.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "ops/dilated_conv_blocks.h"
#include "ops/dilated_conv_checks.h"
#include "ops/dilated_conv_pack.h"
#include "ops/memory_format.h"

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

// The blocks of a convolution (dilated_conv_blocks.h), its limits checked.
Blocks checked_blocks(int64_t N, int64_t C, int64_t H, int64_t W, int64_t O, int64_t Ho, int64_t Wo, int64_t KH,
                      int64_t KW, const Layout& l) {
  Blocks b = make_blocks(N, C, H, W, O, Ho, Wo, KH, KW, l);
  TORCH_CHECK(b.error != BlockError::kWeightTooLarge, "dilated_conv2d (gemm path): a weight of ", O * KH * KW * C,
              " elements exceeds 2^31; set ATTNSCALE_DILATED_CONV_ALGO=direct");
  TORCH_CHECK(b.error != BlockError::kBlockTooLarge, "dilated_conv2d (gemm path): a block of ", b.bad_m, " x ", b.bad_k,
              " (batch x rectangle, live taps x channels) or ", b.bad_m, " x ", O,
              " exceeds 2^31 elements; split the batch or set ATTNSCALE_DILATED_CONV_ALGO=direct");
  return b;
}

// A group's blocks in a buffer: (members, M, K) columns, (members, M, O) products and (members, O, K)
// parts (weight blocks too).
at::Tensor column_blocks(const at::Tensor& buf, const Group& g) {
  return buf.narrow(0, g.col_base, g.size() * g.m * g.k).view({g.size(), g.m, g.k});
}
at::Tensor product_blocks(const at::Tensor& buf, const Group& g, int64_t O) {
  return buf.narrow(0, g.prod_base, g.size() * g.m * O).view({g.size(), g.m, O});
}
at::Tensor part_blocks(const at::Tensor& buf, const Group& g, int64_t O) {
  return buf.narrow(0, g.part_base, g.size() * O * g.k).view({g.size(), O, g.k});
}

// All column blocks of x (N, C, H, W, channels_last).
at::Tensor pack_columns(const at::Tensor& x, const Blocks& b) {
  at::Tensor cols = at::empty({b.col_size}, x.options());
  for (const PackPlan& plan : b.plans) pack_kernels(x).columns(x, cols, plan);
  return cols;
}

// w itself when every element it addresses lies within 2^31 elements of its start (the CUDA weight
// copy indexes within a tap in 32 bits), else a contiguous copy (a slice of a larger tensor).
at::Tensor compact_weight(const at::Tensor& w) {
  int64_t extent = 0;
  for (int64_t d = 0; d < w.dim(); ++d) extent += std::abs(w.stride(d)) * std::max<int64_t>(w.size(d) - 1, 0);
  return extent < (int64_t(1) << 31) ? w : w.contiguous();
}

// The kernel w (O, C, KH, KW) as it is or, for the adjoint, flipped and transposed: (C, O, KH, KW).
WeightView weight_view(const at::Tensor& w, bool adjoint) {
  const int64_t KH = w.size(2), KW = w.size(3);
  if (!adjoint) return {0, w.stride(0), w.stride(1), w.stride(2), w.stride(3)};
  return {(KH - 1) * w.stride(2) + (KW - 1) * w.stride(3), w.stride(1), w.stride(0), -w.stride(2), -w.stride(3)};
}

// The ATen calls below run in the op's dtype: an autocast region around the op (which has no
// autocast kernel of its own, so the dispatcher passed through) must not recast them.
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

// A result computed channels_last, in the layout the op gives (dilated_conv_gemm.h).
at::Tensor in_result_layout(const at::Tensor& out, const at::Tensor& like) {
  const at::MemoryFormat f = like.is_cuda() ? layout_of(like) : at::MemoryFormat::Contiguous;
  // an empty tensor counts as contiguous in every layout, so contiguous() would keep its strides
  return out.numel() == 0 ? at::empty(out.sizes(), out.options().memory_format(f)) : out.contiguous(f);
}

// Convolution of x (N, C, H, W) with weight (O, C, KH, KW) or, adjoint, with weight (C, O, KH, KW)
// flipped and transposed; per-axis padding (negative = cropping).
// keep_columns: where to leave the column blocks (the whole buffer: column_count elements), or null.
at::Tensor convolve(const at::Tensor& x_in, const at::Tensor& weight, bool adjoint, const at::Tensor& bias_in,
                    const Layout& l, at::Tensor* keep_columns = nullptr) {
  const int64_t N = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  const int64_t O = weight.size(adjoint ? 1 : 0), KH = weight.size(2), KW = weight.size(3);
  const int64_t Ho = H + 2 * l.pad_y - l.d * (KH - 1), Wo = W + 2 * l.pad_x - l.d * (KW - 1);
  at::Tensor out = at::empty({N, O, Ho, Wo}, x_in.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (keep_columns != nullptr) *keep_columns = at::empty({0}, x_in.options());  // (column_count's 0)
  if (out.numel() == 0) return in_result_layout(out, x_in);
  const at::Tensor bias = bias_in.defined() ? bias_in.contiguous() : bias_in;
  const Blocks b = C > 0 ? checked_blocks(N, C, H, W, O, Ho, Wo, KH, KW, l) : Blocks{};
  if (b.covered < Ho * Wo) {  // outputs without any live tap: the bias alone
    if (bias.defined()) {
      out.copy_(bias.view({1, O, 1, 1}).expand_as(out));
    } else {
      out.zero_();
    }
  }
  if (b.rects.empty()) return in_result_layout(out, x_in);
  const at::Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor cols = pack_columns(x, b);
  if (keep_columns != nullptr) {  // a result: the alignment gaps between the groups' blocks zeroed too
    *keep_columns = cols;
    int64_t end = 0;
    for (const Group& g : b.groups) {
      if (g.col_base > end) keep_columns->narrow(0, end, g.col_base - end).zero_();
      end = g.col_base + g.size() * g.m * g.k;
    }
  }
  at::Tensor wbuf = at::empty({b.part_size}, x.options());  // the weight blocks, laid out as the parts
  const at::Tensor w = compact_weight(weight);
  for (const PackPlan& plan : b.plans) pack_kernels(x).weights(w, weight_view(w, adjoint), wbuf, plan);
  at::Tensor prod = at::empty({b.prod_size}, x.options());
  for (const Group& g : b.groups) {
    at::Tensor dst = product_blocks(prod, g, O);  // (M, O) = (M, taps * C) @ (taps * C, O) per member
    at::bmm_out(dst, column_blocks(cols, g), part_blocks(wbuf, g, O).transpose(1, 2));
  }
  for (const PackPlan& plan : b.plans) pack_kernels(x).scatter_output(prod, bias, out, plan);
  return in_result_layout(out, x_in);
}

}  // namespace

void register_cuda_pack_kernels(const PackKernels* kernels) { g_cuda_pack_kernels = kernels; }

at::Tensor gemm_forward(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                        int64_t dilation, int64_t padding) {
  NoAutocast no_autocast;
  const at::Tensor b = bias.has_value() && bias->defined() ? *bias : at::Tensor();
  return convolve(x, weight, false, b, {dilation, padding, padding});
}

std::tuple<at::Tensor, at::Tensor> gemm_forward_with_columns(const at::Tensor& x, const at::Tensor& weight,
                                                             const c10::optional<at::Tensor>& bias, int64_t dilation,
                                                             int64_t padding) {
  NoAutocast no_autocast;
  const at::Tensor b = bias.has_value() && bias->defined() ? *bias : at::Tensor();
  at::Tensor columns;
  at::Tensor out = convolve(x, weight, false, b, {dilation, padding, padding}, &columns);
  return {out, columns};
}

int64_t column_count(int64_t N, int64_t C, int64_t H, int64_t W, int64_t O, int64_t KH, int64_t KW, int64_t dilation,
                     int64_t padding) {
  const int64_t Ho = H + 2 * padding - dilation * (KH - 1), Wo = W + 2 * padding - dilation * (KW - 1);
  if (N == 0 || C == 0 || O == 0 || Ho < 1 || Wo < 1) return 0;
  return checked_blocks(N, C, H, W, O, Ho, Wo, KH, KW, {dilation, padding, padding}).col_size;
}

std::vector<std::array<int64_t, 3>> column_groups(int64_t H, int64_t W, int64_t KH, int64_t KW, int64_t dilation,
                                                  int64_t padding) {
  check_params(dilation, padding);  // (a caller from Python may pass anything)
  check_kernel_size(KH, KW);
  TORCH_CHECK(H >= 1 && W >= 1 && H <= kMaxGeometry && W <= kMaxGeometry, "dilated_conv2d: input size (", H, ", ",
              W, ") must be in [1, ", kMaxGeometry, "]");
  check_output_size(H, W, KH, KW, dilation, padding);
  const int64_t Ho = H + 2 * padding - dilation * (KH - 1), Wo = W + 2 * padding - dilation * (KW - 1);
  const Blocks b = make_blocks(1, 1, H, W, 1, Ho, Wo, KH, KW, {dilation, padding, padding});
  std::vector<std::array<int64_t, 3>> out;
  for (const Group& g : b.groups) out.push_back({g.size(), g.m, g.k});  // N = C = 1: m = pixels, k = taps
  return out;
}

void check_columns(const at::Tensor& columns, const at::Tensor& x, int64_t O, int64_t KH, int64_t KW,
                   int64_t dilation, int64_t padding) {
  const int64_t count = column_count(x.size(0), x.size(1), x.size(2), x.size(3), O, KH, KW, dilation, padding);
  TORCH_CHECK(columns.dim() == 1 && columns.numel() == count && columns.is_contiguous(),
              "dilated_conv2d backward: columns must be the 1-D contiguous column blocks of x ", x.sizes(),
              " (", count, " elements, from dilated_conv2d_with_columns), got shape ", columns.sizes());
  TORCH_CHECK(columns.scalar_type() == x.scalar_type() && columns.device() == x.device(),
              "dilated_conv2d backward: columns (", columns.scalar_type(), ", ", columns.device(),
              ") must have x's dtype and device (", x.scalar_type(), ", ", x.device(), ")");
}

at::Tensor gemm_backward_input(const at::Tensor& grad_output, const at::Tensor& weight, int64_t dilation,
                               int64_t padding) {
  NoAutocast no_autocast;
  const int64_t KH = weight.size(2), KW = weight.size(3);
  // gx[c, iy] = sum_{o, ky} g[o, iy + p - ky*d] w[o, c, ky]: with ky' = KH-1-ky that reads
  // g[o, iy - (d*(KH-1) - p) + ky'*d], a convolution with w flipped and transposed.
  return convolve(grad_output, weight, true, at::Tensor(),
                  {dilation, dilation * (KH - 1) - padding, dilation * (KW - 1) - padding});
}

std::tuple<at::Tensor, at::Tensor> gemm_backward_weight(const at::Tensor& grad_output, const at::Tensor& x_in,
                                                        int64_t kernel_h, int64_t kernel_w, int64_t dilation,
                                                        int64_t padding, const c10::optional<at::Tensor>& columns) {
  NoAutocast no_autocast;
  const int64_t N = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3), O = grad_output.size(1);
  const int64_t Ho = grad_output.size(2), Wo = grad_output.size(3);
  const bool half = x_in.scalar_type() == at::kHalf || x_in.scalar_type() == at::kBFloat16;
  const at::TensorOptions acc_options = x_in.options().dtype(half ? at::kFloat : x_in.scalar_type());
  at::Tensor acc = at::empty({O, kernel_h, kernel_w, C}, acc_options);
  at::Tensor gbias;
  bool summed = false;
  const Blocks b = N > 0 && C > 0 && O > 0
                       ? checked_blocks(N, C, H, W, O, Ho, Wo, kernel_h, kernel_w, {dilation, padding, padding})
                       : Blocks{};
  if (b.rects.empty()) {
    acc.zero_();
  } else {
    const at::Tensor g = grad_output.contiguous(at::MemoryFormat::ChannelsLast);
    const bool kept = columns.has_value() && columns->defined();  // (checked by the caller)
    const at::Tensor cols = kept ? *columns : pack_columns(x_in.contiguous(at::MemoryFormat::ChannelsLast), b);
    at::Tensor gprod = at::empty({b.prod_size}, g.options());
    // the bias gradient from the gather where one plan covers every output (fc6), else from grad_output
    const bool sum_here = b.plans.size() == 1 && b.covered == Ho * Wo;
    for (const PackPlan& plan : b.plans) {
      summed = pack_kernels(g).gather_output(g, gprod, sum_here ? &gbias : nullptr, plan);
    }
    at::Tensor parts = at::empty({b.part_size}, acc_options);
    for (const Group& grp : b.groups) {
      // (O, taps * C) = (O, M) @ (M, taps * C) per member
      at::Tensor dst = part_blocks(parts, grp, O);
      const at::Tensor gi = product_blocks(gprod, grp, O).transpose(1, 2), ci = column_blocks(cols, grp);
      if (half) {
        at::bmm_out(dst, gi, ci, at::kFloat);
      } else {
        at::bmm_out(dst, gi, ci);
      }
    }
    for (size_t i = 0; i < b.plans.size(); ++i) pack_kernels(g).weight_gradient(parts, acc, b.plans[i], i > 0);
  }
  at::Tensor gw = at::empty({O, C, kernel_h, kernel_w}, x_in.options());
  gw.copy_(acc.permute({0, 3, 1, 2}));
  return {gw, summed ? gbias : grad_output.sum({0, 2, 3})};
}

}  // namespace dilated_conv
}  // namespace attnscale
