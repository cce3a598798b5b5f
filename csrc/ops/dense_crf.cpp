// Schema of attnscale::dense_crf: DeepLab's DenseCRF layer (DeepLab-v1/v2 Caffe, densecrf_layer.cpp), forward
// only (the layer's Backward is NOT_IMPLEMENTED), CPU only (as the layer).
//
// dense_crf(unary, image, max_iter, pos_w, pos_xy_std, bi_w, bi_xy_std, bi_rgb_std) -> Q, (N, M, H, W): for
// each image, Q0 = normalise(exp(-unary)), then max_iter times Q = normalise(exp(-unary + sum_k w_k norm_k
// (K_k * Q))), K_k a Gaussian over the features (x, y) / pos_xy_std or (x, y) / bi_xy_std, image / bi_rgb_std,
// filtered on the permutohedral lattice (cpu/dense_crf_kernel.cpp).  The layer's unary is its negated scores
// (unary_ = -bottom_data); attnscale.crf.dense_crf negates them and crops to the image's size first, as the
// layer's data_dims bottom does.  Unlike the layer, each image of a batch reads its own colours (the
// importer's DenseCRF refuses a batch with an image, where DeepLab would use image 0's for all).
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <string>
#include <utility>

#include "ops/dense_crf.h"
#include "ops/limits.h"

namespace attnscale {
namespace dense_crf {

namespace {

void check_kernels(const char* what, std::initializer_list<std::pair<const char*, at::ArrayRef<double>>> lists) {
  const size_t n = lists.begin()->second.size();
  for (const auto& [name, v] : lists) {
    TORCH_CHECK_VALUE(v.size() == n, "dense_crf: the ", what, " kernels need one value each in every list; ",
                      lists.begin()->first, " has ", n, ", ", name, " ", v.size());
    for (double x : v) {
      const bool is_std = std::string(name).find("std") != std::string::npos;
      // the layer's parameters are floats: a standard deviation must be a normal positive one (a subnormal or
      // zero one would make the features infinite), a weight finite as a float
      const float f = static_cast<float>(x);
      TORCH_CHECK_VALUE(std::isfinite(f) && (!is_std || f >= std::numeric_limits<float>::min()), "dense_crf: ",
                        name, " must hold ", is_std ? "positive finite standard deviations" : "finite weights",
                        " (as float32), got ", x);
    }
  }
}

}  // namespace

void check_args(const at::Tensor& unary, const std::optional<at::Tensor>& image, int64_t max_iter,
                at::ArrayRef<double> pos_w, at::ArrayRef<double> pos_xy_std, at::ArrayRef<double> bi_w,
                at::ArrayRef<double> bi_xy_std, at::ArrayRef<double> bi_rgb_std) {
  TORCH_CHECK_VALUE(unary.dim() == 4 && unary.scalar_type() == at::kFloat,
                    "dense_crf: unary must be a float32 (N, M, H, W) tensor, got ", unary.scalar_type(), " ",
                    unary.sizes());
  TORCH_CHECK_VALUE(unary.is_contiguous(), "dense_crf: unary must be contiguous (NCHW)");
  const int64_t M = unary.size(1), H = unary.size(2), W = unary.size(3);
  TORCH_CHECK_VALUE(M >= 1 && H >= 1 && W >= 1, "dense_crf: unary has no labels or pixels: ", unary.sizes());
  TORCH_CHECK_VALUE(H < kMaxGeometry && W < kMaxGeometry && H * W * 6 < (int64_t{1} << 31) && M < (1 << 16),
                    "dense_crf: unary ", unary.sizes(), " is too large for the lattice's int indices");
  TORCH_CHECK_VALUE(max_iter >= 0 && max_iter <= (1 << 20), "dense_crf: max_iter must be in [0, 2^20], got ",
                    max_iter);
  check_kernels("position", {{"pos_w", pos_w}, {"pos_xy_std", pos_xy_std}});
  check_kernels("bilateral", {{"bi_w", bi_w}, {"bi_xy_std", bi_xy_std}, {"bi_rgb_std", bi_rgb_std}});
  if (image) {
    const at::Tensor& im = *image;
    TORCH_CHECK_VALUE(im.dim() == 4 && im.scalar_type() == at::kFloat && im.size(0) == unary.size(0) &&
                          im.size(1) == 3 && im.size(2) == H && im.size(3) == W,
                      "dense_crf: image must be a float32 (N, 3, H, W) tensor matching unary ", unary.sizes(),
                      ", got ", im.scalar_type(), " ", im.sizes());
    TORCH_CHECK_VALUE(im.is_contiguous(), "dense_crf: image must be contiguous (NCHW)");
    TORCH_CHECK_VALUE(im.device() == unary.device(), "dense_crf: image is on ", im.device(), ", unary on ",
                      unary.device());
    TORCH_CHECK_VALUE(!bi_w.empty(), "dense_crf: an image but no bilateral kernel (bi_w) to use it "
                      "(the layer's CHECK: \"has image as input, but no bilateral parameters specified\")");
    TORCH_CHECK_VALUE(at::isfinite(im).all().item<bool>(), "dense_crf: image holds non-finite values");
  } else {
    TORCH_CHECK_VALUE(bi_w.empty(), "dense_crf: bilateral kernels (bi_w) need the image");
  }
  // +inf is a label that cannot be (a score of -inf: probability 0); NaN and -inf (a score of +inf) are no unary
  TORCH_CHECK_VALUE(!(at::isnan(unary) | (unary == -std::numeric_limits<float>::infinity())).any().item<bool>(),
                    "dense_crf: unary holds NaN or -inf (scores of NaN or +inf)");
  TORCH_CHECK_VALUE(!at::isinf(unary).all(1).any().item<bool>(),
                    "dense_crf: a pixel has a +inf unary (a score of -inf) for every label: no label is possible");
}

}  // namespace dense_crf
}  // namespace attnscale

TORCH_LIBRARY_FRAGMENT(attnscale, m) {
  m.def("dense_crf(Tensor unary, Tensor? image, int max_iter, float[] pos_w, float[] pos_xy_std, float[] bi_w, "
        "float[] bi_xy_std, float[] bi_rgb_std) -> Tensor");
}
