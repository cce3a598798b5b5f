// Argument checks of attnscale::winograd_conv2d (torch headers; CPU kernel only).
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "ops/limits.h"

namespace attnscale {
namespace winograd {

// Caffe Convolution, kernel 3, stride 1, dilation d, pad p: H + 2p - 2d outputs per axis.
inline int64_t out_size(int64_t size, int64_t padding, int64_t dilation = 1) {
  return size + 2 * padding - 2 * dilation;
}

inline void check_weight(const at::Tensor& w, const char* op) {
  TORCH_CHECK_VALUE(w.dim() == 4 && w.size(2) == 3 && w.size(3) == 3, op,
                    ": weight must be (out, in, 3, 3), got shape ", w.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(w.scalar_type()), op, ": weight must be floating point, got ", w.scalar_type());
}

// x (N, C, H, W); weight (K, C, 3, 3); weight_winograd (16, K, C) = winograd_weight(weight); bias (K) or none;
// dilation d >= 1 with padding d q, every polyphase component x[a::d, b::d] with an output.
inline void check_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& u,
                          const std::optional<at::Tensor>& bias, int64_t padding, int64_t dilation) {
  TORCH_CHECK_VALUE(x.dim() == 4, "winograd_conv2d: x must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  check_weight(w, "winograd_conv2d");
  TORCH_CHECK_VALUE(w.scalar_type() == x.scalar_type() && w.device() == x.device(),
                    "winograd_conv2d: weight must have x's dtype and device, got ", w.scalar_type(), " on ",
                    w.device(), " for x ", x.scalar_type(), " on ", x.device());
  TORCH_CHECK_VALUE(u.dim() == 3 && (u.size(0) == 16 || u.size(0) == 36) && u.size(1) == w.size(0) &&
                        u.size(2) == w.size(1),
                    "winograd_conv2d: weight_winograd must be (16 or 36, out, in) = (16 or 36, ", w.size(0), ", ",
                    w.size(1), ") for weight of shape ", w.sizes(),
                    " (attnscale.ops.winograd_weight(weight, tile)), got shape ", u.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(x.scalar_type()), "winograd_conv2d: x must be floating point, got ",
                    x.scalar_type());
  TORCH_CHECK_VALUE(u.scalar_type() == x.scalar_type(), "winograd_conv2d: weight_winograd has dtype ",
                    u.scalar_type(), " but x has dtype ", x.scalar_type());
  TORCH_CHECK_VALUE(u.device() == x.device(), "winograd_conv2d: weight_winograd is on ", u.device(),
                    " but x is on ", x.device());
  TORCH_CHECK_VALUE(w.size(1) == x.size(1), "winograd_conv2d: weight has ", w.size(1),
                    " input channels (dim 1) but x has ", x.size(1), " channels");
  TORCH_CHECK_VALUE(w.size(0) >= 1, "winograd_conv2d: weight has no output channel (shape ", w.sizes(),
                    "); F.conv2d refuses that too");
  TORCH_CHECK_VALUE(padding >= 0 && padding <= kMaxGeometry, "winograd_conv2d: padding must be in [0, ",
                    kMaxGeometry, "], got ", padding);
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_VALUE(bias->scalar_type() == x.scalar_type() && bias->device() == x.device(),
                      "winograd_conv2d: bias must have x's dtype and device, got ", bias->scalar_type(), " on ",
                      bias->device());
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == u.size(1), "winograd_conv2d: bias must have shape (",
                      u.size(1), ",), got ", bias->sizes());
  }
  TORCH_CHECK_VALUE(dilation >= 1 && dilation <= kMaxGeometry, "winograd_conv2d: dilation must be in [1, ",
                    kMaxGeometry, "], got ", dilation);
  TORCH_CHECK_VALUE(padding % dilation == 0, "winograd_conv2d: padding (", padding,
                    ") must be a multiple of the dilation (", dilation, ")");
  // component a of an axis has ceil((n - a) / d) entries and as many + 2 q - 2 outputs; the last, floor(n / d),
  // is the fewest
  const int64_t q = padding / dilation;
  for (int64_t n : {x.size(2), x.size(3)})
    TORCH_CHECK_VALUE(dilation == 1 || n / dilation + 2 * q - 2 >= 1, "winograd_conv2d: x of spatial size (",
                      x.size(2), ", ", x.size(3), ") with dilation ", dilation, " and padding ", padding,
                      " leaves a polyphase component without output; use F.conv2d");
  const int64_t ho = out_size(x.size(2), padding, dilation), wo = out_size(x.size(3), padding, dilation);
  TORCH_CHECK_VALUE(ho >= 1 && wo >= 1, "winograd_conv2d: output size H + 2*padding - 2*dilation is (", ho, ", ",
                    wo, ") for x of spatial size (", x.size(2), ", ", x.size(3), "), padding ", padding,
                    " and dilation ", dilation, "; it must be >= 1");
}

}  // namespace winograd
}  // namespace attnscale
