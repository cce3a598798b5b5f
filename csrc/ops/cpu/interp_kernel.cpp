// CPU kernel of attnscale::caffe_interp (float, double; bfloat16 and half through c10's types, rounded after
// every product and sum as PyTorch's tensor ops round them: CPU autocast's maps), NCHW, one (n, c) plane per task.
// Separable, in Caffe's order of operations: the horizontal blend of every source row an output row needs
// (into a per-thread buffer), then each output row as the vertical blend of two such rows (contiguous,
// vectorised).  The products and sums are pinned to Caffe's (no FMA contraction), so the values equal the
// index_select path of attnscale.caffe.interp bit for bit.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "ops/interp.h"
#include "ops/scale_merge_interp.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif
#if defined(__clang__)
#pragma clang fp contract(off)
#endif

namespace attnscale {
namespace interp {
namespace {

using scale_merge::interp_ratio;
using scale_merge::interp_tap;
using scale_merge::Tap;

template <typename T>
struct AxisTaps {
  std::vector<int> i0, i1;
  std::vector<T> l0, l1;
  AxisTaps(int in, int out) : i0(out), i1(out), l0(out), l1(out) {
    const float ratio = interp_ratio(in, out);
    for (int d = 0; d < out; ++d) {
      const Tap t = interp_tap(d, in, out, ratio);
      i0[d] = t.i0;
      i1[d] = t.i1;
      l1[d] = static_cast<T>(t.l1);  // Caffe: Dtype h1lambda = h1r - h1 (a float difference)
      l0[d] = T(1) - l1[d];          //        Dtype h0lambda = Dtype(1.) - h1lambda
    }
  }
};

// Horizontal blend of source row r: hrow[x] = l0[x] * src[i0[x]] + l1[x] * src[i1[x]] (scalar: short
// gathers vectorise into slow AVX2 gathers).
template <typename T>
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((noinline, optimize("no-tree-vectorize")))
#endif
void blend_row(const T* __restrict src, const AxisTaps<T>& ax, int OW, T* __restrict hrow) {
  const int* __restrict i0 = ax.i0.data();
  const int* __restrict i1 = ax.i1.data();
  const T* __restrict l0 = ax.l0.data();
  const T* __restrict l1 = ax.l1.data();
  for (int x = 0; x < OW; ++x) {
    const T a = l0[x] * src[i0[x]];
    const T b = l1[x] * src[i1[x]];
    hrow[x] = a + b;
  }
}

template <typename T>
void interp_plane(const T* __restrict x, int H, int W, const AxisTaps<T>& ay, const AxisTaps<T>& ax, int OH, int OW,
                  T* __restrict out, std::vector<T>& buf, std::vector<int>& done) {
  // buf holds the horizontal blends of the source rows, computed once each, when first needed
  buf.resize(static_cast<size_t>(H) * OW);
  done.assign(H, 0);
  for (int y = 0; y < OH; ++y) {
    const int r0 = ay.i0[y], r1 = ay.i1[y];
    for (const int r : {r0, r1}) {
      if (!done[r]) {
        blend_row(x + static_cast<int64_t>(r) * W, ax, OW, buf.data() + static_cast<int64_t>(r) * OW);
        done[r] = 1;
      }
    }
    const T* __restrict a = buf.data() + static_cast<int64_t>(r0) * OW;
    const T* __restrict b = buf.data() + static_cast<int64_t>(r1) * OW;
    const T la = ay.l0[y], lb = ay.l1[y];
    T* __restrict o = out + static_cast<int64_t>(y) * OW;
    for (int q = 0; q < OW; ++q) {
      const T top = la * a[q];
      const T bot = lb * b[q];
      o[q] = top + bot;
    }
  }
}

at::Tensor caffe_interp_cpu(const at::Tensor& x_in, int64_t out_h, int64_t out_w) {
  check_args(x_in, out_h, out_w);
  const auto dt = x_in.scalar_type();
  TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
                    "caffe_interp: x dtype ", dt, " is not supported on CPU (float32, float64, bfloat16 or float16)");
  const int64_t H = x_in.size(2), W = x_in.size(3);
  const at::Tensor x = x_in.contiguous();
  if (H == out_h && W == out_w) return x.clone();  // Caffe: same size -> copy
  at::Tensor out = at::empty({x.size(0), x.size(1), out_h, out_w}, x.options());
  const int64_t planes = x.size(0) * x.size(1);
  if (planes == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "caffe_interp_cpu", [&] {
    const AxisTaps<scalar_t> ay(static_cast<int>(H), static_cast<int>(out_h));
    const AxisTaps<scalar_t> ax(static_cast<int>(W), static_cast<int>(out_w));
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, planes, std::max<int64_t>(1, 16384 / (out_h * out_w)), [&](int64_t b, int64_t e) {
      std::vector<scalar_t> buf;
      std::vector<int> done;
      for (int64_t q = b; q < e; ++q)
        interp_plane<scalar_t>(xp + q * H * W, static_cast<int>(H), static_cast<int>(W), ay, ax,
                               static_cast<int>(out_h), static_cast<int>(out_w), op + q * out_h * out_w, buf, done);
    });
  });
  return out;
}

// caffe_interp_backward, the twin of the CUDA kernel (the model's CPU training keeps the index_select
// adjoint of attnscale.caffe): per source pixel the row slots' sum of coef_h * (the column slots' sum of
// coef_w * grad), std::fma in the slots' order, as the CUDA kernel's fmaf / fma.
template <typename T>
void interp_backward_plane(const T* __restrict g, int OH, int OW, const int64_t* idx_h, const T* coef_h, int Th,
                           const int64_t* idx_w, const T* coef_w, int Tw, int H, int W, T* __restrict gx) {
  for (int h = 0; h < H; ++h)
    for (int w = 0; w < W; ++w) {
      T outer = 0;
      for (int th = 0; th < Th; ++th) {
        const int64_t oh = idx_h[static_cast<int64_t>(th) * H + h];
        if (oh < 0 || oh >= OH) continue;  // an unused slot
        T inner = 0;
        for (int tw = 0; tw < Tw; ++tw) {
          const int64_t ow = idx_w[static_cast<int64_t>(tw) * W + w];
          if (ow < 0 || ow >= OW) continue;
          inner = std::fma(g[oh * OW + ow], coef_w[static_cast<int64_t>(tw) * W + w], inner);
        }
        outer = std::fma(inner, coef_h[static_cast<int64_t>(th) * H + h], outer);
      }
      gx[static_cast<int64_t>(h) * W + w] = outer;
    }
}

at::Tensor caffe_interp_backward_cpu(const at::Tensor& grad_in, const at::Tensor& idx_h, const at::Tensor& coef_h,
                                     const at::Tensor& idx_w, const at::Tensor& coef_w) {
  const auto [H, W] = check_backward_args(grad_in, idx_h, coef_h, idx_w, coef_w);
  TORCH_CHECK_VALUE(grad_in.scalar_type() == at::kFloat || grad_in.scalar_type() == at::kDouble,
                    "caffe_interp_backward: grad dtype ", grad_in.scalar_type(),
                    " is not supported on CPU (float32 or float64)");
  const at::Tensor g = grad_in.contiguous();
  const int64_t OH = g.size(2), OW = g.size(3);
  at::Tensor gx = at::empty({g.size(0), g.size(1), H, W}, g.options());
  const int64_t planes = g.size(0) * g.size(1);
  if (planes == 0) return gx;
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "caffe_interp_backward_cpu", [&] {
    const scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* xp = gx.data_ptr<scalar_t>();
    at::parallel_for(0, planes, std::max<int64_t>(1, 16384 / (H * W)), [&](int64_t b, int64_t e) {
      for (int64_t q = b; q < e; ++q)
        interp_backward_plane<scalar_t>(gp + q * OH * OW, static_cast<int>(OH), static_cast<int>(OW),
                                        idx_h.data_ptr<int64_t>(), coef_h.data_ptr<scalar_t>(),
                                        static_cast<int>(idx_h.size(0)), idx_w.data_ptr<int64_t>(),
                                        coef_w.data_ptr<scalar_t>(), static_cast<int>(idx_w.size(0)),
                                        static_cast<int>(H), static_cast<int>(W), xp + q * H * W);
    });
  });
  return gx;
}

}  // namespace
}  // namespace interp
}  // namespace attnscale

TORCH_LIBRARY_IMPL(attnscale, CPU, m) {
  m.impl("caffe_interp", &attnscale::interp::caffe_interp_cpu);
  m.impl("caffe_interp_backward", &attnscale::interp::caffe_interp_backward_cpu);
}
