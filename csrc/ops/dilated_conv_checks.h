// Argument checks of attnscale::dilated_conv2d and its backward ops, shared by
// the CPU kernel and the CUDA glue (torch headers; not for .cu files).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include "ops/dilated_conv_geometry.h"
#include "ops/limits.h"

namespace attnscale {
namespace dilated_conv {

inline void check_params(int64_t dilation, int64_t padding) {
  TORCH_CHECK(dilation >= 1 && dilation <= kMaxGeometry, "dilated_conv2d: dilation must be in [1, ", kMaxGeometry,
              "], got ", dilation);
  TORCH_CHECK(padding >= 0 && padding <= kMaxGeometry, "dilated_conv2d: padding must be in [0, ", kMaxGeometry,
              "], got ", padding);
}

inline void check_kernel_size(int64_t kh, int64_t kw) {
  TORCH_CHECK(kh >= 1 && kw >= 1 && kh % 2 == 1 && kw % 2 == 1 && kh <= kMaxGeometry && kw <= kMaxGeometry,
              "dilated_conv2d: weight must have odd kernel sizes (kh, kw), got (", kh, ", ", kw, ")");
}

inline void check_output_size(int64_t h, int64_t w, int64_t kh, int64_t kw, int64_t dilation,
                              int64_t padding) {
  const int64_t ho = out_size(h, kh, dilation, padding), wo = out_size(w, kw, dilation, padding);
  TORCH_CHECK(ho >= 1 && wo >= 1, "dilated_conv2d: output size H + 2*padding - dilation*(k-1) is (",
              ho, ", ", wo, ") for x of spatial size (", h, ", ", w, "), kernel (", kh, ", ", kw,
              "), dilation ", dilation, ", padding ", padding, "; it must be >= 1");
}

inline void check_same(const at::Tensor& ref, const char* ref_name, const at::Tensor& t,
                       const char* name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "dilated_conv2d: ", name, " has dtype ",
              t.scalar_type(), " but ", ref_name, " has dtype ", ref.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), "dilated_conv2d: ", name, " is on ", t.device(), " but ",
              ref_name, " is on ", ref.device());
}

// Forward checks: x (N, C, H, W), weight (O, C, KH, KW), bias (O) or none.
inline void check_forward(const at::Tensor& x, const at::Tensor& weight,
                          const c10::optional<at::Tensor>& bias, int64_t dilation, int64_t padding) {
  TORCH_CHECK(x.dim() == 4, "dilated_conv2d: x must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  TORCH_CHECK(weight.dim() == 4, "dilated_conv2d: weight must be 4-D (out, in, kh, kw), got ",
              weight.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "dilated_conv2d: x must be floating point, got ",
              x.scalar_type());
  check_same(x, "x", weight, "weight");
  TORCH_CHECK(weight.size(1) == x.size(1), "dilated_conv2d: weight has ", weight.size(1),
              " input channels (dim 1) but x has ", x.size(1), " channels");
  check_kernel_size(weight.size(2), weight.size(3));
  check_params(dilation, padding);
  if (bias.has_value() && bias->defined()) {
    check_same(x, "x", *bias, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "dilated_conv2d: bias must have shape (",
                weight.size(0), ",) to match weight's out channels, got ", bias->sizes());
  }
  check_output_size(x.size(2), x.size(3), weight.size(2), weight.size(3), dilation, padding);
}

// Backward checks: grad_output (N, O, Ho, Wo) against x or weight.
inline void check_grad_output(const at::Tensor& grad_output, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(grad_output.dim() == 4, "dilated_conv2d backward: grad_output must be 4-D, got ",
              grad_output.dim(), "-D");
  check_same(ref, ref_name, grad_output, "grad_output");
}

}  // namespace dilated_conv
}  // namespace attnscale
