// CPU kernel of attnscale::caffe_max_pool2d (float, double; bfloat16 and half compared in float: CPU autocast's
// maps), NCHW, one (n, c) plane per task.
// Per output row: the running maximum of the window's input rows (contiguous, vectorised), then the
// horizontal window over that row; for stride 2 the row is first split into even and odd columns so
// that every window position reads unit-stride arrays; other strides take a scalar loop.
// Also the CPU twins of the training op's CUDA kernels (caffe_max_pool2d_with_mask and its backward), and
// caffe_ave_pool2d (AVE for inference, CPU only).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "ops/max_pool.h"

#include "ops/cpu/even_odd.h"

namespace attnscale {
namespace max_pool {
namespace {

// Caffe: the maximum starts at -FLT_MAX and a value replaces it only if strictly greater, so a NaN never
// wins (here the start is -inf: a window of NaNs gives -inf where Caffe gives -FLT_MAX).
template <typename T>
inline T take_max(T m, T v) {
  return v > m ? v : m;
}

// One plane: x (H, W) of T into out (OH, OW) of T, compared in A (T itself, or float for the half types: a
// maximum is one of the inputs, so converting to float and back is exact and keeps their order).
template <typename T, typename A>
void pool_plane(const T* __restrict x, int H, int W, int k, int s, int p, int OH, int OW, T* __restrict out,
                std::vector<A>& buf) {
  const A lowest = -std::numeric_limits<A>::infinity();
  constexpr bool kSame = std::is_same<T, A>::value;
  // row buffer with room for the window's reach past the right border (filled with -inf); for half types
  // also a row of outputs in A
  const int span = std::max(W, (OW - 1) * s - p + k) + 2 * k + 16;
  buf.assign(static_cast<size_t>(2) * span + (kSame ? 0 : OW), lowest);
  A* vm = buf.data();     // vertical maximum of the window's rows (columns >= W: -inf)
  A* ev = vm + span;      // its even columns (stride 2)
  A* od = ev + span / 2;  // its odd columns
  // output columns whose window lies inside [0, W): j_lo .. j_hi - 1
  int j_lo = 0;
  while (j_lo < OW && j_lo * s - p < 0) ++j_lo;
  int j_hi = j_lo;
  while (j_hi < OW && j_hi * s - p + k <= W) ++j_hi;
  for (int i = 0; i < OH; ++i) {
    const int hs = std::max(i * s - p, 0), he = std::min(i * s - p + k, H);
    {
      const T* __restrict r0 = x + static_cast<int64_t>(hs) * W;
      for (int c = 0; c < W; ++c) vm[c] = take_max(lowest, static_cast<A>(r0[c]));
      for (int r = hs + 1; r < he; ++r) {
        const T* __restrict rr = x + static_cast<int64_t>(r) * W;
        for (int c = 0; c < W; ++c) vm[c] = take_max(vm[c], static_cast<A>(rr[c]));
      }
    }
    T* __restrict orow = out + static_cast<int64_t>(i) * OW;
    A* __restrict o = nullptr;
    if constexpr (kSame)
      o = orow;
    else
      o = buf.data() + 2 * span;
    auto clipped = [&](int j) {  // window clipped to [0, W), scanned left to right
      const int ws = std::max(j * s - p, 0), we = std::min(j * s - p + k, W);
      A m = lowest;
      for (int c = ws; c < we; ++c) m = take_max(m, vm[c]);
      o[j] = m;
    };
    for (int j = 0; j < j_lo; ++j) clipped(j);
    if (s == 2 && j_hi > j_lo) {
      // columns 2 j - p + t of the interior windows: even ones at ev[j + (t - p) / 2], odd ones at
      // od[j + (t - p - 1) / 2]; split the columns [2 j_lo - p, 2 j_hi - p + k) once
      const int c0 = 2 * j_lo - p;  // even, relative column 0
      const int n = (2 * (j_hi - j_lo) + k) / 2 + 1;
      split_even_odd(vm + c0, n, ev, od);
      const int m = j_hi - j_lo;
      A* __restrict oo = o + j_lo;
      for (int q = 0; q < m; ++q) oo[q] = take_max(lowest, ev[q]);  // t = 0: column c0 + 2q
      for (int t = 1; t < k; ++t) {
        const A* __restrict src = (t % 2 == 0) ? ev + t / 2 : od + t / 2;
        for (int q = 0; q < m; ++q) oo[q] = take_max(oo[q], src[q]);
      }
    } else {
      for (int j = j_lo; j < j_hi; ++j) {
        const A* __restrict w = vm + (j * s - p);
        A m = lowest;
        for (int t = 0; t < k; ++t) m = take_max(m, w[t]);
        o[j] = m;
      }
    }
    for (int j = std::max(j_hi, j_lo); j < OW; ++j) clipped(j);
    if constexpr (!kSame)
      for (int j = 0; j < OW; ++j) orow[j] = static_cast<T>(o[j]);
  }
}

// The inference ops' frame: checks x's dtype (float32/float64 and the half types, accumulated in
// at::opmath_type: float), then runs plane(x plane, out plane, buf, buf2) over every (n, c) plane of the NCHW
// input in parallel, with two scratch vectors of the accumulation type per task.
template <typename Plane>
at::Tensor over_planes(const char* op, const at::Tensor& x_in, int64_t out_h, int64_t out_w, const Plane& plane) {
  const auto dt = x_in.scalar_type();
  TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf, op,
                    ": x dtype ", dt, " is not supported on the CPU (float32, float64, bfloat16 or float16)");
  const int64_t H = x_in.size(2), W = x_in.size(3);
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty({x.size(0), x.size(1), out_h, out_w}, x.options());
  const int64_t planes = x.size(0) * x.size(1);
  if (planes == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "caffe_pool2d_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = out.data_ptr<scalar_t>();
    at::parallel_for(0, planes, std::max<int64_t>(1, 16384 / (H * W)), [&](int64_t b, int64_t e) {
      std::vector<acc_t> buf, buf2;
      for (int64_t q = b; q < e; ++q) plane(xp + q * H * W, yp + q * out_h * out_w, buf, buf2);
    });
  });
  return out;
}

at::Tensor caffe_max_pool2d_cpu(const at::Tensor& x, int64_t kernel, int64_t stride, int64_t pad, int64_t out_h,
                                int64_t out_w) {
  const int k = static_cast<int>(check_args(x, kernel, stride, pad, out_h, out_w));
  const int H = static_cast<int>(x.size(2)), W = static_cast<int>(x.size(3)), s = static_cast<int>(stride),
            p = static_cast<int>(pad), OH = static_cast<int>(out_h), OW = static_cast<int>(out_w);
  return over_planes("caffe_max_pool2d", x, out_h, out_w, [&](const auto* xq, auto* yq, auto& buf, auto&) {
    pool_plane(xq, H, W, k, s, p, OH, OW, yq, buf);
  });
}

// ---------------------------------------------------------------------------------------------------- AVE
// Caffe's AvePoolingForward on one plane: per output the window clipped to the image summed rows then columns
// from 0 in A (T, or float for the half types), divided by pool_size, the window clipped to [-p, H + p) x
// [-p, W + p): Caffe's float arithmetic in Caffe's order, so the same bits (the half types rounded once).
// One output row at a time: its sums advance over the window's input rows; for stride 1 the windows inside
// the image add the row's kernel columns in unit-stride passes (one for k = 3, pool5a: 2.45 -> 0.87 ms for
// 512 planes of 65x65 on one core), the order per output unchanged; cols: each output column's window
// clipped to [-p, W + p), in A, so the division vectorises too.  The divisor is the product of the two
// extents rounded once to A (Caffe's int pool_size converted; exact below 2^24, and no int overflow for the
// sizes up to 2^24 the checks admit, where Caffe's int would wrap).
template <typename T, typename A>
void ave_plane(const T* __restrict x, int H, int W, int k, int s, int p, int OH, int OW, T* __restrict out,
               std::vector<A>& buf, std::vector<A>& cols) {
  buf.assign(OW, A(0));
  A* __restrict acc = buf.data();
  cols.resize(OW);
  for (int j = 0; j < OW; ++j) cols[j] = static_cast<A>(std::min(j * s - p + k, W + p) - (j * s - p));
  int j_lo = 0;  // windows inside [0, W): j_lo .. j_hi - 1
  while (j_lo < OW && j_lo * s - p < 0) ++j_lo;
  int j_hi = j_lo;
  while (j_hi < OW && j_hi * s - p + k <= W) ++j_hi;
  for (int i = 0; i < OH; ++i) {
    const int hstart = i * s - p, hend = std::min(hstart + k, H + p);
    const int hs = std::max(hstart, 0), he = std::min(hend, H);
    std::fill(acc, acc + OW, A(0));
    for (int h = hs; h < he; ++h) {
      const T* __restrict row = x + static_cast<int64_t>(h) * W;
      auto clipped = [&](int j) {
        const int ws = std::max(j * s - p, 0), we = std::min(j * s - p + k, W);
        A a = acc[j];
        for (int w = ws; w < we; ++w) a += static_cast<A>(row[w]);
        acc[j] = a;
      };
      for (int j = 0; j < std::min(j_lo, OW); ++j) clipped(j);
      if (j_hi <= j_lo) {
      } else if (s == 1 && k == 3) {
        const T* __restrict src = row + (j_lo - p);
        for (int j = j_lo; j < j_hi; ++j) {
          const int q = j - j_lo;
          acc[j] = ((acc[j] + static_cast<A>(src[q])) + static_cast<A>(src[q + 1])) + static_cast<A>(src[q + 2]);
        }
      } else if (s == 1) {
        for (int t = 0; t < k; ++t) {
          const T* __restrict src = row + (j_lo - p + t);
          for (int j = j_lo; j < j_hi; ++j) acc[j] += static_cast<A>(src[j - j_lo]);
        }
      } else {
        for (int j = j_lo; j < j_hi; ++j) clipped(j);
      }
      for (int j = std::max(j_hi, j_lo); j < OW; ++j) clipped(j);
    }
    T* __restrict orow = out + static_cast<int64_t>(i) * OW;
    const A ph = static_cast<A>(hend - hstart);
    const A* __restrict cw = cols.data();
    for (int j = 0; j < OW; ++j) orow[j] = static_cast<T>(acc[j] / (ph * cw[j]));
  }
}

at::Tensor caffe_ave_pool2d_cpu(const at::Tensor& x, int64_t kernel, int64_t stride, int64_t pad, int64_t out_h,
                                int64_t out_w) {
  const int k = static_cast<int>(check_ave_args(x, kernel, stride, pad, out_h, out_w));
  const int H = static_cast<int>(x.size(2)), W = static_cast<int>(x.size(3)), s = static_cast<int>(stride),
            p = static_cast<int>(pad), OH = static_cast<int>(out_h), OW = static_cast<int>(out_w);
  return over_planes("caffe_ave_pool2d", x, out_h, out_w, [&](const auto* xq, auto* yq, auto& buf, auto& cols) {
    ave_plane(xq, H, W, k, s, p, OH, OW, yq, buf, cols);
  });
}

// ---------------------------------------------------------------------------------------------- training
// The CPU twin of the CUDA training kernels (the model trains through F.max_pool2d on the CPU): plain loops
// over one (n, c) plane, in the CUDA kernels' order, so that their results can be compared bit for bit.

// Caffe's MaxPoolForward scan: rows, then columns, of the clipped window; strict '>' from -inf.
template <typename T>
void pool_plane_mask(const T* __restrict x, int H, int W, int k, int s, int p, int OH, int OW, T* __restrict out,
                     uint8_t* __restrict mask) {
  for (int i = 0; i < OH; ++i) {
    const int h0 = i * s - p, hs = std::max(h0, 0), he = std::min(h0 + k, H);
    for (int j = 0; j < OW; ++j) {
      const int w0 = j * s - p, ws = std::max(w0, 0), we = std::min(w0 + k, W);
      T m = -std::numeric_limits<T>::infinity();
      int arg = kMaskNone;
      for (int h = hs; h < he; ++h)
        for (int w = ws; w < we; ++w) {
          const T v = x[static_cast<int64_t>(h) * W + w];
          if (v > m) {
            m = v;
            arg = (h - h0) * k + (w - w0);
          }
        }
      out[static_cast<int64_t>(i) * OW + j] = m;
      mask[static_cast<int64_t>(i) * OW + j] = static_cast<uint8_t>(arg);
    }
  }
}

// Caffe's MaxPoolBackward (the GPU form: a gather per input pixel over the outputs whose window covers it,
// ph then pw), summed in the accumulation type of T.
template <typename T>
void unpool_plane(const T* __restrict g, const uint8_t* __restrict mask, int H, int W, int k, int s, int p, int OH,
                  int OW, T* __restrict gx) {
  using acc_t = at::opmath_type<T>;
  for (int h = 0; h < H; ++h) {
    int ilo, ihi;
    covering_outputs(h, k, s, p, OH, &ilo, &ihi);
    for (int w = 0; w < W; ++w) {
      int jlo, jhi;
      covering_outputs(w, k, s, p, OW, &jlo, &jhi);
      acc_t sum = 0;
      for (int i = ilo; i < ihi; ++i)
        for (int j = jlo; j < jhi; ++j) {
          const int64_t o = static_cast<int64_t>(i) * OW + j;
          if (mask[o] == (h - (i * s - p)) * k + (w - (j * s - p))) sum += static_cast<acc_t>(g[o]);
        }
      gx[static_cast<int64_t>(h) * W + w] = static_cast<T>(sum);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> caffe_max_pool2d_with_mask_cpu(const at::Tensor& x_in, int64_t kernel,
                                                                  int64_t stride, int64_t pad, int64_t out_h,
                                                                  int64_t out_w) {
  kernel = check_mask_args(x_in, kernel, stride, pad, out_h, out_w);
  TORCH_CHECK_VALUE(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kDouble,
                    "caffe_max_pool2d_with_mask: x dtype ", x_in.scalar_type(),
                    " is not supported on the CPU (float32 or float64)");
  const int64_t H = x_in.size(2), W = x_in.size(3);
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty({x.size(0), x.size(1), out_h, out_w}, x.options());
  at::Tensor mask = at::empty({x.size(0), x.size(1), out_h, out_w}, x.options().dtype(at::kByte));
  const int64_t planes = x.size(0) * x.size(1);
  if (planes == 0) return {out, mask};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "caffe_max_pool2d_with_mask_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    uint8_t* mp = mask.data_ptr<uint8_t>();
    at::parallel_for(0, planes, std::max<int64_t>(1, 16384 / (H * W)), [&](int64_t b, int64_t e) {
      for (int64_t q = b; q < e; ++q)
        pool_plane_mask<scalar_t>(xp + q * H * W, static_cast<int>(H), static_cast<int>(W), static_cast<int>(kernel),
                                  static_cast<int>(stride), static_cast<int>(pad), static_cast<int>(out_h),
                                  static_cast<int>(out_w), op + q * out_h * out_w, mp + q * out_h * out_w);
    });
  });
  return {out, mask};
}

at::Tensor caffe_max_pool2d_backward_cpu(const at::Tensor& grad_in, const at::Tensor& mask_in, int64_t kernel,
                                         int64_t stride, int64_t pad, int64_t in_h, int64_t in_w) {
  kernel = check_backward_args(grad_in, mask_in, kernel, stride, pad, in_h, in_w);
  TORCH_CHECK_VALUE(grad_in.scalar_type() == at::kFloat || grad_in.scalar_type() == at::kDouble,
                    "caffe_max_pool2d_backward: grad dtype ", grad_in.scalar_type(),
                    " is not supported on the CPU (float32 or float64)");
  TORCH_CHECK_VALUE(grad_in.device().is_cpu() && mask_in.device().is_cpu(),
                    "caffe_max_pool2d_backward: grad and mask must be on the CPU here");
  const at::Tensor g = grad_in.contiguous(), mask = mask_in.contiguous();
  const int64_t OH = g.size(2), OW = g.size(3);
  at::Tensor gx = at::empty({g.size(0), g.size(1), in_h, in_w}, g.options());
  const int64_t planes = g.size(0) * g.size(1);
  if (planes == 0) return gx;
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "caffe_max_pool2d_backward_cpu", [&] {
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const uint8_t* mp = mask.data_ptr<uint8_t>();
    scalar_t* xp = gx.data_ptr<scalar_t>();
    at::parallel_for(0, planes, std::max<int64_t>(1, 16384 / (in_h * in_w)), [&](int64_t b, int64_t e) {
      for (int64_t q = b; q < e; ++q)
        unpool_plane<scalar_t>(gp + q * OH * OW, mp + q * OH * OW, static_cast<int>(in_h), static_cast<int>(in_w),
                               static_cast<int>(kernel), static_cast<int>(stride), static_cast<int>(pad),
                               static_cast<int>(OH), static_cast<int>(OW), xp + q * in_h * in_w);
    });
  });
  return gx;
}

}  // namespace
}  // namespace max_pool
}  // namespace attnscale

TORCH_LIBRARY_IMPL(attnscale, CPU, m) {
  m.impl("caffe_max_pool2d", &attnscale::max_pool::caffe_max_pool2d_cpu);
  m.impl("caffe_max_pool2d_with_mask", &attnscale::max_pool::caffe_max_pool2d_with_mask_cpu);
  m.impl("caffe_max_pool2d_backward", &attnscale::max_pool::caffe_max_pool2d_backward_cpu);
  m.impl("caffe_ave_pool2d", &attnscale::max_pool::caffe_ave_pool2d_cpu);
}
