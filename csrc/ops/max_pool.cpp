// Schema of attnscale::caffe_max_pool2d: Caffe's Pooling layer, MAX, square window, forward only.
//
// out[i, j] = max of x over rows max(i s - p, 0) .. min(i s - p + k, H) - 1 and the same columns: the
// window clipped to the image, so padding never wins; a value replaces the running maximum only if
// strictly greater (Caffe's `if (bottom > top)`, so NaN never wins).  The output size (Caffe's ceil
// rounding and its pad > 0 decrement rule) is an argument: attnscale.caffe.pool2d computes it.
// Inference only (no autograd): pool2d calls it when no gradient is needed; with one it uses
// F.max_pool2d, whose NCHW CPU kernel is scalar (~5x slower on pool1 at 513x513).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(attnscale, m) {
  m.def("caffe_max_pool2d(Tensor x, int kernel, int stride, int pad, int out_h, int out_w) -> Tensor");
}
