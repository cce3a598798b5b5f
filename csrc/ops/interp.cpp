// Schema of attnscale::caffe_interp: DeepLab's Interp layer (bilinear, aligned corners), forward only.
//
// out[y][x] = l0(y) * (l0(x) * in[h0][w0] + l1(x) * in[h0][w1]) + l1(y) * (l0(x) * in[h1][w0] + l1(x) * in[h1][w1])
// with the per-axis taps of caffe_cpu_interp2 (ops/scale_merge_interp.h: ratio float(in - 1) / (out - 1),
// index int(ratio * d), lambdas in float), evaluated in that order (horizontal blend, then vertical), and a
// plain copy when the input already has the output size.  Sizes, zoom/shrink factors and pad_beg/pad_end
// cropping are resolved by attnscale.caffe.interp, which calls this op whenever no gradient is needed.
// CPU: float32/float64, NCHW.  CUDA: float32/float64/float16/bfloat16, NCHW or channels_last (the output in
// the input's layout), each product and sum rounded to the dtype as the index_select path's PyTorch ops
// round them; interp_gather's autograd Function also runs it for its forward on a GPU.
#include "ops/interp.h"

#include <torch/library.h>

#include <tuple>

#include "ops/limits.h"

namespace attnscale {
namespace interp {

void check_args(const at::Tensor& x, int64_t out_h, int64_t out_w) {
  TORCH_CHECK_VALUE(x.dim() == 4, "caffe_interp: x must be 4-D (N, C, H, W), got shape ", x.sizes());
  const int64_t H = x.size(2), W = x.size(3);
  TORCH_CHECK_VALUE(H >= 1 && W >= 1, "caffe_interp: x has an empty spatial size ", x.sizes());
  TORCH_CHECK_VALUE(out_h >= 1 && out_w >= 1, "caffe_interp: output size (", out_h, ", ", out_w,
                    ") must be positive");
  TORCH_CHECK_VALUE(H < kMaxGeometry && W < kMaxGeometry && out_h < kMaxGeometry && out_w < kMaxGeometry,
                    "caffe_interp: sizes too large for Caffe's float index arithmetic");
}

std::pair<int64_t, int64_t> check_backward_args(const at::Tensor& grad, const at::Tensor& idx_h,
                                                const at::Tensor& coef_h, const at::Tensor& idx_w,
                                                const at::Tensor& coef_w) {
  constexpr const char* op = "caffe_interp_backward";
  TORCH_CHECK_VALUE(grad.dim() == 4 && grad.is_floating_point(), op, ": grad must be a 4-D floating-point tensor, got ",
                    grad.sizes(), " ", grad.scalar_type());
  const auto want = grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const auto& [name, idx, coef] : {std::tuple<const char*, const at::Tensor&, const at::Tensor&>{"h", idx_h, coef_h},
                                        {"w", idx_w, coef_w}}) {
    TORCH_CHECK_VALUE(idx.dim() == 2 && idx.scalar_type() == at::kLong && coef.sizes() == idx.sizes() &&
                          coef.scalar_type() == want,
                      op, ": idx_", name, " must be an int64 (T, in) table and coef_", name, " ", want,
                      " of its shape; got ", idx.sizes(), " ", idx.scalar_type(), " and ", coef.sizes(), " ",
                      coef.scalar_type());
    TORCH_CHECK_VALUE(idx.device() == grad.device() && coef.device() == grad.device(), op, ": the ", name,
                      " tables must be on grad's device (", grad.device(), ")");
    TORCH_CHECK_VALUE(idx.is_contiguous() && coef.is_contiguous(), op, ": the ", name, " tables must be contiguous");
    TORCH_CHECK_VALUE(idx.size(0) >= 1 && idx.size(1) >= 1 && idx.size(0) < kMaxGeometry && idx.size(1) < kMaxGeometry,
                      op, ": the ", name, " tables have an empty or too large shape ", idx.sizes());
  }
  TORCH_CHECK_VALUE(grad.size(2) >= 1 && grad.size(3) >= 1 && grad.size(2) < kMaxGeometry && grad.size(3) < kMaxGeometry,
                    op, ": grad has an empty or too large spatial size ", grad.sizes());
  return {idx_h.size(1), idx_w.size(1)};
}

}  // namespace interp
}  // namespace attnscale

TORCH_LIBRARY_FRAGMENT(attnscale, m) {
  m.def("caffe_interp(Tensor x, int out_h, int out_w) -> Tensor");
  // The Interp's backward from per-axis adjoint tables (attnscale.caffe._interp_adjoint_tables): for each
  // source pixel, the sum over its row slots of coef_h * (the sum over its column slots of coef_w * grad),
  // slots in order, fused multiply-adds in float (double for double); index `out` marks an unused slot.
  m.def("caffe_interp_backward(Tensor grad, Tensor idx_h, Tensor coef_h, Tensor idx_w, Tensor coef_w) -> Tensor");
}
