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

}  // namespace interp
}  // namespace attnscale

TORCH_LIBRARY_FRAGMENT(attnscale, m) {
  m.def("caffe_interp(Tensor x, int out_h, int out_w) -> Tensor");
}
