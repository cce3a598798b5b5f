// Schema of attnscale::bias_relu: a convolution's bias and the ReLU after it, in one pass.
//
// out[n, c, h, w] = relu(x[n, c, h, w] + bias[c]), the sum rounded to x's dtype first and torch.relu's value
// after (NaN stays NaN): the values of PyTorch's cuDNN path, which adds the bias in a kernel of its own
// (`output.add_(bias)`) before F.relu's, one more read and write of the whole map.
// With a dropout ratio p > 0 (Caffe's Dropout after the ReLU in training: drop6, drop7, att_drop1) a unit is
// kept with probability 1 - p and scaled by 1 / (1 - p) (rounded to x's dtype after the ReLU's value, as
// F.dropout's product rounds), a dropped one is 0; the mask is Philox4x32-10 of (seed, the element's index in
// memory order) (ops/philox.h), the same on the CPU and on a GPU, and is not stored: the backward reads it
// off the output (out > 0 only where kept).
// bias_relu_backward(grad, out, bias_dtype, scale) -> (grad_x, grad_bias): grad_x = out <= 0 ? 0 : grad * scale
// (F.relu's threshold_backward on the saved output; scale = 1 / (1 - p): F.dropout's backward at a kept unit,
// rounded once), grad_bias[c] = the sum of grad_x over n, h, w (accumulated in
// float, double for double; in bias_dtype): what convolution_backward's separate reduction of the bias
// gradient gives, in the same pass that masks the gradient.  A float32 bias of a float16 / bfloat16 x
// (autocast's case) is rounded to x's dtype in the sum, as autocast's cast would round it, and gets its
// gradient as the float32 sum (no cast kernels either way).  (Caffe's ReLU backward multiplies by the mask,
// so a non-finite gradient at a zeroed unit would give NaN there; like F.relu we give 0.)
// CPU: float32/float64 (plain loops: the twin of the CUDA kernels); CUDA: float32/float64/float16/bfloat16.
// NCHW or channels_last, outputs in x's (out's) layout.
#include "ops/bias_relu.h"

#include <torch/library.h>

#include <cmath>

namespace attnscale {
namespace bias_relu {

void check_forward(const at::Tensor& x, const at::Tensor& bias, double p) {
  TORCH_CHECK_VALUE(p >= 0 && p < 1, "bias_relu: the dropout ratio p must be in [0, 1), got ", p);
  TORCH_CHECK_VALUE(x.dim() == 4, "bias_relu: x must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  TORCH_CHECK_VALUE(x.is_floating_point(), "bias_relu: x must be floating point, got ", x.scalar_type());
  TORCH_CHECK_VALUE(bias.dim() == 1 && bias.size(0) == x.size(1), "bias_relu: bias must have shape (",
                    x.size(1), ",) to match x's channels, got ", bias.sizes());
  TORCH_CHECK_VALUE(bias.scalar_type() == x.scalar_type() || bias_is_float32_of_half(x.scalar_type(), bias.scalar_type()),
                    "bias_relu: bias has dtype ", bias.scalar_type(), " but x has dtype ", x.scalar_type(),
                    " (a float32 bias is taken for a float16 / bfloat16 x)");
  TORCH_CHECK_VALUE(bias.device() == x.device(), "bias_relu: bias is on ", bias.device(), " but x is on ",
                    x.device());
}

void check_backward(const at::Tensor& grad, const at::Tensor& out, at::ScalarType bias_dtype, double scale) {
  TORCH_CHECK_VALUE(scale >= 1 && std::isfinite(scale), "bias_relu_backward: scale must be 1 / (1 - p) >= 1 and finite, got ",
                    scale);
  TORCH_CHECK_VALUE(out.dim() == 4 && grad.sizes() == out.sizes(), "bias_relu_backward: grad ", grad.sizes(),
                    " and out ", out.sizes(), " must be 4-D (N, C, H, W) of one shape");
  TORCH_CHECK_VALUE(out.is_floating_point() && grad.scalar_type() == out.scalar_type(),
                    "bias_relu_backward: grad (", grad.scalar_type(), ") and out (", out.scalar_type(),
                    ") must be of one floating-point dtype");
  TORCH_CHECK_VALUE(grad.device() == out.device(), "bias_relu_backward: grad is on ", grad.device(),
                    " but out is on ", out.device());
  TORCH_CHECK_VALUE(bias_dtype == out.scalar_type() || bias_is_float32_of_half(out.scalar_type(), bias_dtype),
                    "bias_relu_backward: bias_dtype ", bias_dtype, " does not go with out's ", out.scalar_type());
}

}  // namespace bias_relu
}  // namespace attnscale

TORCH_LIBRARY_FRAGMENT(attnscale, m) {
  m.def("bias_relu(Tensor x, Tensor bias, float p=0., int seed=0) -> Tensor");
  m.def("bias_relu_backward(Tensor grad, Tensor out, ScalarType bias_dtype, float scale=1.) -> (Tensor, Tensor)");
}
