// DeepLab/Caffe ``Interp`` index arithmetic shared by the CPU and CUDA scale_merge kernels.
//
// Torch-free and host/device-compatible so that CPU and CUDA compute bit-identical source
// indices and lambdas.  Caffe fact followed (caffe_cpu_interp2 / caffe_gpu_interp2 of DeepLab):
//
//   rheight = (out > 1) ? float(in - 1) / (out - 1) : 0.f;   // align corners, in float
//   h1r = rheight * h;  h1 = int(h1r);  h1p = (h1 < in - 1) ? 1 : 0;
//   h1lambda = h1r - h1;  h0lambda = 1 - h1lambda;
//   top = h0lambda * (w0lambda * x[h1][w1] + w1lambda * x[h1][w1 + w1p])
//       + h1lambda * (w0lambda * x[h1 + h1p][w1] + w1lambda * x[h1 + h1p][w1 + w1p]);
//
// and Caffe's special case "just copy" when *both* axes keep their size (an axis whose size alone is
// unchanged still blends: taps (d, d + 1), the second at weight 0, so a non-finite neighbour shows as in
// Caffe).  Callers mark that case with the ratio kInterpCopy (identity taps).
//
// The float products/differences are pinned (volatile on the host, __fmul_rn/__fsub_rn on
// the device) so that no compiler contracts them into an FMA: the lambdas are then exactly
// Caffe's, and the inverse mapping used by the backward pass (which destination indices
// touch a given source index) is derived from the very same numbers.
#pragma once

#include "ops/host_device.h"

namespace attnscale {
namespace scale_merge {

// One destination index's footprint along one axis: x[i0] * (1 - l1) + x[i1] * l1.
struct Tap {
  int i0;
  int i1;
  float l1;
};

// The ratio of an axis whose map keeps both its sizes: interp_tap gives identity taps (Caffe's copy).
constexpr float kInterpCopy = -1.f;

ATTNSCALE_HD float interp_ratio(int in, int out) {
  return out > 1 ? static_cast<float>(in - 1) / static_cast<float>(out - 1) : 0.f;
}

ATTNSCALE_HD Tap interp_tap(int d, int in, int out, float ratio) {
  Tap t;
  if (ratio == kInterpCopy) {  // Caffe Interp: both sizes unchanged -> copy
    t.i0 = d;
    t.i1 = d;
    t.l1 = 0.f;
    return t;
  }
#if defined(__CUDA_ARCH__)
  const float r = __fmul_rn(ratio, static_cast<float>(d));
  t.i0 = static_cast<int>(r);
  t.i1 = t.i0 + ((t.i0 < in - 1) ? 1 : 0);
  t.l1 = __fsub_rn(r, static_cast<float>(t.i0));
#else
  volatile float rv = ratio * static_cast<float>(d);
  const float r = rv;
  t.i0 = static_cast<int>(r);
  t.i1 = t.i0 + ((t.i0 < in - 1) ? 1 : 0);
  volatile float lv = r - static_cast<float>(t.i0);
  t.l1 = lv;
#endif
  return t;
}

// Weight with which source index j enters destination tap t (0 when it does not).
template <typename A>
ATTNSCALE_HD A tap_weight(const Tap& t, int j) {
  const A l1 = static_cast<A>(t.l1);
  A w = A(0);
  if (t.i0 == j) w += A(1) - l1;
  if (t.i1 == j) w += l1;
  return w;
}

// First destination index d in [0, out) with i0(d) >= target (out if none).  i0(d) is
// non-decreasing in d (float(d) is exact, rounding and truncation are monotone).
ATTNSCALE_HD int interp_lower_bound(int target, int in, int out, float ratio) {
  int lo = 0, hi = out;
  while (lo < hi) {
    const int mid = lo + (hi - lo) / 2;
    if (interp_tap(mid, in, out, ratio).i0 < target) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Destination indices [*first, *last) whose footprint touches source index j: exactly those
// with i0(d) in {j - 1, j} (i1 = i0 + 1 whenever i0 < in - 1).
ATTNSCALE_HD void interp_source_range(int j, int in, int out, float ratio, int* first, int* last) {
  *first = interp_lower_bound(j - 1, in, out, ratio);
  *last = interp_lower_bound(j + 1, in, out, ratio);
}

}  // namespace scale_merge
}  // namespace attnscale
