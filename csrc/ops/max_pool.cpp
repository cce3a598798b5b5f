// Schema of attnscale::caffe_max_pool2d: Caffe's Pooling layer, MAX, square window, forward only.
//
// out[i, j] = max of x over rows max(i s - p, 0) .. min(i s - p + k, H) - 1 and the same columns: the
// window clipped to the image, so padding never wins; a value replaces the running maximum only if
// strictly greater (Caffe's `if (bottom > top)`, so NaN never wins).  The output size (Caffe's ceil
// rounding and its pad > 0 decrement rule) is an argument: attnscale.caffe.pool2d computes it.
// Inference only (no autograd): pool2d calls it when no gradient is needed; with one it uses
// F.max_pool2d, whose NCHW CPU kernel is scalar (~5x slower on pool1 at 513x513) and whose CUDA kernel
// also writes an int64 index per output.  CPU: float32/float64, NCHW; CUDA: float32/float64/float16/bfloat16,
// NCHW or channels_last (the output in the input's layout).
#include "ops/max_pool.h"

#include <torch/library.h>

#include <algorithm>
#include <utility>

#include "ops/limits.h"

namespace attnscale {
namespace max_pool {

int64_t check_args(const at::Tensor& x, int64_t kernel, int64_t stride, int64_t pad, int64_t out_h, int64_t out_w) {
  TORCH_CHECK_VALUE(x.dim() == 4, "caffe_max_pool2d: x must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  TORCH_CHECK_VALUE(kernel >= 1 && stride >= 1 && pad >= 0 && pad < kernel,
                    "caffe_max_pool2d: need kernel >= 1, stride >= 1, 0 <= pad < kernel; got kernel ", kernel,
                    ", stride ", stride, ", pad ", pad);
  for (const auto& [name, v] : {std::pair<const char*, int64_t>{"kernel", kernel}, {"stride", stride}, {"pad", pad},
                                {"out_h", out_h}, {"out_w", out_w}, {"H", x.size(2)}, {"W", x.size(3)}})
    TORCH_CHECK_VALUE(v <= kMaxGeometry, "caffe_max_pool2d: ", name, " is ", v, ", more than ", kMaxGeometry);
  const int64_t H = x.size(2), W = x.size(3);
  kernel = std::min(kernel, std::max(H, W) + pad);
  TORCH_CHECK_VALUE(H >= 1 && W >= 1 && out_h >= 1 && out_w >= 1, "caffe_max_pool2d: empty input (", H, ", ", W,
                    ") or output (", out_h, ", ", out_w, ")");
  TORCH_CHECK_VALUE((out_h - 1) * stride - pad < H && (out_w - 1) * stride - pad < W,
                    "caffe_max_pool2d: output size (", out_h, ", ", out_w, ") puts windows outside the input (", H,
                    ", ", W, ") for kernel ", kernel, ", stride ", stride, ", pad ", pad);
  return kernel;
}

}  // namespace max_pool
}  // namespace attnscale

TORCH_LIBRARY_FRAGMENT(attnscale, m) {
  m.def("caffe_max_pool2d(Tensor x, int kernel, int stride, int pad, int out_h, int out_w) -> Tensor");
}
