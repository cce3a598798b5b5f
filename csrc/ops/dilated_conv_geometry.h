// Tap geometry of a stride-1 dilated convolution, shared by the CPU kernel and
// the CUDA launchers.  Plain C++ (no torch headers) so that the .cu file can
// include it.
//
// Caffe's Convolution with `dilation: d` and `pad: p` (zero padding, stride 1)
// reads, for output row oy and kernel row ky, input row iy = oy - p + ky*d.
// The output size is Ho = H + 2p - d*(KH-1) (Caffe's conv_out_spatial_dim with
// stride 1).  Kernel row ky is "live" (reads real data, not padding) exactly for
// oy in [max(0, p - ky*d), min(Ho, H + p - ky*d)).  For a fixed oy the live ky
// form one contiguous range (ky*d must lie in [p - oy, H - 1 + p - oy]), so the
// breakpoints of those intervals split [0, Ho) into a few intervals, each with
// one fixed contiguous range of live kernel rows.  Doing the same for columns
// splits the output plane into rectangles with one fixed set of live taps each.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace attnscale {
namespace dilated_conv {

// Output positions [start, end) whose live kernel indices are [k_begin, k_end).
struct TapInterval {
  int64_t start;
  int64_t end;
  int64_t k_begin;
  int64_t k_end;
  int64_t length() const { return end - start; }
  int64_t taps() const { return k_end - k_begin; }
};

// Output size along one axis (may be < 1 for invalid inputs; callers check).
inline int64_t out_size(int64_t in, int64_t k, int64_t dilation, int64_t padding) {
  return in + 2 * padding - dilation * (k - 1);
}

// First / one-past-last output index for which kernel index k reads real data.
inline int64_t live_lo(int64_t k, int64_t dilation, int64_t padding) {
  return std::max<int64_t>(0, padding - k * dilation);
}
inline int64_t live_hi(int64_t in, int64_t out, int64_t k, int64_t dilation, int64_t padding) {
  return std::min<int64_t>(out, in + padding - k * dilation);
}

// Splits [0, out) into maximal intervals with a constant set of live kernel
// indices.  Intervals with no live tap are included (k_begin == k_end); they
// only receive the bias.
inline std::vector<TapInterval> tap_intervals(int64_t in, int64_t out, int64_t ksize,
                                              int64_t dilation, int64_t padding) {
  std::vector<int64_t> cuts = {0, out};
  for (int64_t k = 0; k < ksize; ++k) {
    const int64_t lo = live_lo(k, dilation, padding);
    const int64_t hi = live_hi(in, out, k, dilation, padding);
    if (lo > 0 && lo < out) cuts.push_back(lo);
    if (hi > 0 && hi < out) cuts.push_back(hi);
  }
  std::sort(cuts.begin(), cuts.end());
  cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());
  std::vector<TapInterval> result;
  for (size_t i = 0; i + 1 < cuts.size(); ++i) {
    const int64_t s = cuts[i], e = cuts[i + 1];
    int64_t kb = -1, ke = -1;
    for (int64_t k = 0; k < ksize; ++k) {
      const bool live = live_lo(k, dilation, padding) <= s && e <= live_hi(in, out, k, dilation, padding);
      if (live && kb < 0) kb = k;
      if (live) ke = k + 1;
    }
    if (kb < 0) kb = ke = 0;
    result.push_back({s, e, kb, ke});
  }
  return result;
}

// Is kernel index k live for at least one output index in [o0, o1)?
inline bool tap_live_in_range(int64_t in, int64_t o0, int64_t o1, int64_t k, int64_t dilation,
                              int64_t padding) {
  const int64_t first = o0 - padding + k * dilation;
  const int64_t last = o1 - 1 - padding + k * dilation;
  return last >= 0 && first <= in - 1;
}

}  // namespace dilated_conv
}  // namespace attnscale
