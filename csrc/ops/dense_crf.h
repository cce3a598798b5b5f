// attnscale::dense_crf — DeepLab's DenseCRF layer (Krähenbühl & Koltun's fully connected CRF, mean-field
// inference over permutohedral-lattice Gaussian filters).  The kernel (cpu/dense_crf_kernel.cpp) takes raw
// pointers and sizes; the schema and the argument checks are in dense_crf.cpp.
#pragma once

#include <cstdint>
#include <optional>

#include <ATen/ATen.h>

namespace attnscale {
namespace dense_crf {

// The layer's parameters (DenseCRFParameter): max_iter mean-field steps; Potts kernels on position only
// (weight pos_w[k], features x / pos_xy_std[k], y / pos_xy_std[k]) and, with an image, bilateral ones
// (weight bi_w[k], features x / bi_xy_std[k], y / bi_xy_std[k] and the three image channels / bi_rgb_std[k]).
struct Params {
  int max_iter = 10;
  const float* pos_w = nullptr;
  const float* pos_xy_std = nullptr;
  int n_pos = 0;
  const float* bi_w = nullptr;
  const float* bi_xy_std = nullptr;
  const float* bi_rgb_std = nullptr;
  int n_bi = 0;
};

// One image.  unary: (M, H, W) float32, the layer's negated scores; image: (3, H, W) float32 in the
// data blob's channel order (DeepLab: mean-subtracted BGR), or nullptr (no bilateral kernels); out:
// (M, H, W), the marginals after max_iter steps.  Throws std::out_of_range where a lattice coordinate does
// not fit the 16-bit keys of DeepLab's lattice (features too large for their standard deviations).
void mean_field(const float* unary, const float* image, int M, int H, int W, const Params& params, float* out);

// The op's argument checks (dense_crf.cpp): unary (N, M, H, W) float32 contiguous, finite or +inf; image
// (N, 3, H, W) float32 contiguous finite, on unary's device; max_iter >= 0; each kernel list of one length,
// weights finite, standard deviations positive and finite; bilateral kernels only with an image and an
// image only with them (the layer's CHECKs, and no silently ignored input).
void check_args(const at::Tensor& unary, const std::optional<at::Tensor>& image, int64_t max_iter,
                at::ArrayRef<double> pos_w, at::ArrayRef<double> pos_xy_std, at::ArrayRef<double> bi_w,
                at::ArrayRef<double> bi_xy_std, at::ArrayRef<double> bi_rgb_std);

}  // namespace dense_crf
}  // namespace attnscale
