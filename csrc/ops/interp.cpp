// Schema of attnscale::caffe_interp: DeepLab's Interp layer (bilinear, aligned corners), forward only.
//
// out[y][x] = l0(y) * (l0(x) * in[h0][w0] + l1(x) * in[h0][w1]) + l1(y) * (l0(x) * in[h1][w0] + l1(x) * in[h1][w1])
// with the per-axis taps of caffe_cpu_interp2 (ops/scale_merge_interp.h: ratio float(in - 1) / (out - 1),
// index int(ratio * d), lambdas in float), evaluated in that order (horizontal blend, then vertical), and a
// plain copy when the input already has the output size.  Sizes, zoom/shrink factors and pad_beg/pad_end
// cropping are resolved by attnscale.caffe.interp, which calls this op whenever no gradient is needed.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(attnscale, m) {
  m.def("caffe_interp(Tensor x, int out_h, int out_w) -> Tensor");
}
