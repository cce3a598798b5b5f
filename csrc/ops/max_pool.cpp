// Schemas of attnscale::caffe_max_pool2d: Caffe's Pooling layer, MAX, square window, forward only (and of
// the training pair and of caffe_ave_pool2d, AVE for inference on the CPU, below).
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

namespace {

// The geometry checks of every caffe_max_pool2d op, for an input of (H, W) and an output of (out_h, out_w).
int64_t check_geometry(const char* op, int64_t H, int64_t W, int64_t kernel, int64_t stride, int64_t pad,
                       int64_t out_h, int64_t out_w) {
  TORCH_CHECK_VALUE(kernel >= 1 && stride >= 1 && pad >= 0 && pad < kernel, op,
                    ": need kernel >= 1, stride >= 1, 0 <= pad < kernel; got kernel ", kernel, ", stride ", stride,
                    ", pad ", pad);
  for (const auto& [name, v] : {std::pair<const char*, int64_t>{"kernel", kernel}, {"stride", stride}, {"pad", pad},
                                {"out_h", out_h}, {"out_w", out_w}, {"H", H}, {"W", W}})
    TORCH_CHECK_VALUE(v <= kMaxGeometry, op, ": ", name, " is ", v, ", more than ", kMaxGeometry);
  kernel = std::min(kernel, std::max(H, W) + pad);
  TORCH_CHECK_VALUE(H >= 1 && W >= 1 && out_h >= 1 && out_w >= 1, op, ": empty input (", H, ", ", W,
                    ") or output (", out_h, ", ", out_w, ")");
  TORCH_CHECK_VALUE((out_h - 1) * stride - pad < H && (out_w - 1) * stride - pad < W, op, ": output size (", out_h,
                    ", ", out_w, ") puts windows outside the input (", H, ", ", W, ") for kernel ", kernel,
                    ", stride ", stride, ", pad ", pad);
  return kernel;
}

}  // namespace

int64_t check_args(const at::Tensor& x, int64_t kernel, int64_t stride, int64_t pad, int64_t out_h, int64_t out_w) {
  TORCH_CHECK_VALUE(x.dim() == 4, "caffe_max_pool2d: x must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  return check_geometry("caffe_max_pool2d", x.size(2), x.size(3), kernel, stride, pad, out_h, out_w);
}

int64_t check_ave_args(const at::Tensor& x, int64_t kernel, int64_t stride, int64_t pad, int64_t out_h,
                       int64_t out_w) {
  TORCH_CHECK_VALUE(x.dim() == 4, "caffe_ave_pool2d: x must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  check_geometry("caffe_ave_pool2d", x.size(2), x.size(3), kernel, stride, pad, out_h, out_w);
  return kernel;  // not clipped: the divisor counts the padding the whole window reaches
}

int64_t check_mask_args(const at::Tensor& x, int64_t kernel, int64_t stride, int64_t pad, int64_t out_h,
                        int64_t out_w) {
  TORCH_CHECK_VALUE(x.dim() == 4, "caffe_max_pool2d_with_mask: x must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  kernel = check_geometry("caffe_max_pool2d_with_mask", x.size(2), x.size(3), kernel, stride, pad, out_h, out_w);
  TORCH_CHECK_VALUE(kernel * kernel <= kMaskNone, "caffe_max_pool2d_with_mask: kernel ", kernel,
                    " has more window offsets than the uint8 mask holds (kernel <= 15)");
  return kernel;
}

int64_t check_backward_args(const at::Tensor& grad, const at::Tensor& mask, int64_t kernel, int64_t stride,
                            int64_t pad, int64_t in_h, int64_t in_w) {
  constexpr const char* op = "caffe_max_pool2d_backward";
  TORCH_CHECK_VALUE(grad.dim() == 4 && grad.sizes() == mask.sizes(), op, ": grad ", grad.sizes(), " and mask ",
                    mask.sizes(), " must be 4-D (N, C, OH, OW) of one shape");
  TORCH_CHECK_VALUE(mask.scalar_type() == at::kByte, op, ": mask must be uint8 (caffe_max_pool2d_with_mask's), got ",
                    mask.scalar_type());
  TORCH_CHECK_VALUE(grad.is_floating_point(), op, ": grad must be floating point, got ", grad.scalar_type());
  TORCH_CHECK_VALUE(grad.device() == mask.device(), op, ": grad is on ", grad.device(), ", mask on ", mask.device());
  kernel = check_geometry(op, in_h, in_w, kernel, stride, pad, grad.size(2), grad.size(3));
  TORCH_CHECK_VALUE(kernel * kernel <= kMaskNone, op, ": kernel ", kernel, " is more than 15");
  return kernel;
}

}  // namespace max_pool
}  // namespace attnscale

TORCH_LIBRARY_FRAGMENT(attnscale, m) {
  m.def("caffe_max_pool2d(Tensor x, int kernel, int stride, int pad, int out_h, int out_w) -> Tensor");
  // Training: the output and a uint8 mask (the winner's offset in its window, row-major scan as Caffe's
  // forward, kMaskNone for none); the backward sends each output's gradient to its winner (Caffe's
  // MaxPoolBackward as a gather, float sums in (ph, pw) order).
  m.def("caffe_max_pool2d_with_mask(Tensor x, int kernel, int stride, int pad, int out_h, int out_w) -> "
        "(Tensor, Tensor)");
  m.def("caffe_max_pool2d_backward(Tensor grad, Tensor mask, int kernel, int stride, int pad, int in_h, "
        "int in_w) -> Tensor");
  // AVE (inference, CPU): Caffe's AvePoolingForward: the window clipped to the image summed rows then columns
  // from 0, divided by the window clipped to [-pad, H + pad) x [-pad, W + pad).
  m.def("caffe_ave_pool2d(Tensor x, int kernel, int stride, int pad, int out_h, int out_w) -> Tensor");
}
