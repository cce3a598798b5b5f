// Index maps of the copies around the GEMM path's matrix products (dilated_conv_gemm.cpp), shared
// by the CPU loops (cpu/dilated_conv_pack_kernel.cpp) and the CUDA kernels
// (cuda/dilated_conv_pack_kernel.cu), so that the CPU tests check the arithmetic the GPU runs.  Plain
// C++ (no torch headers) for nvcc.
//
// The path works in channels_last (NHWC): x (N, H, W, C), out (N, Ho, Wo, O), so that every copy
// moves whole channel vectors.  A rectangle of output positions with one fixed set of live taps
// (dilated_conv_geometry.h) owns
//   a column block (M, K) row-major, M = N * rows * cols, K = taps_y * taps_x * C: element (m, k) with
//       m = (n * rows + yy) * cols + xx and k = (ty * taps_x + tx) * C + c
//     holds x[n, in_y + yy + ty * d, in_x + xx + tx * d, c] (Caffe's im2col over the live taps), so its
//     linear index m * K + k = (m * taps + t) * C + c runs along whole channel vectors;
//   a product block (M, O) row-major: element (m, o) is out[n, out_y + yy, out_x + xx, o];
//   a weight block (O, K) row-major: element (o, k) is w[o, c, k_y + ty, k_x + tx], read through a
//     WeightView (any strides, negative ones included: the backward's flipped, transposed kernel);
//   for the weight gradient a part block (O, K) row-major: element (o, k) adds to the gradient of
//     the weight's tap (k_y + ty, k_x + tx), channel c.
// Rectangles of one size (pixels and taps alike: the four corners of fc6, its four edges) lie side
// by side in one buffer per kind, so that one batched GEMM serves them all.
#pragma once

#include <cstdint>

#include "ops/host_device.h"

namespace attnscale {
namespace dilated_conv {

// Division of 32-bit values below 2^31 by a fixed divisor as a multiply-high and a shift
// (Granlund and Montgomery's round-up method): a 32-bit division costs some 20 instructions on a GPU.
struct FastDiv {
  uint32_t divisor, multiplier, shift;
};

inline FastDiv make_fast_div(uint32_t d) {
  uint32_t s = 0;
  while ((uint64_t(1) << s) < d) ++s;
  const uint64_t m = ((uint64_t(1) << 32) * ((uint64_t(1) << s) - d)) / d + 1;
  return FastDiv{d, uint32_t(m), s};
}

ATTNSCALE_HD uint32_t fast_div(uint32_t n, const FastDiv& f) {
#if defined(__CUDA_ARCH__)
  const uint32_t hi = __umulhi(n, f.multiplier);
#else
  const uint32_t hi = uint32_t((uint64_t(n) * f.multiplier) >> 32);
#endif
  return (hi + n) >> f.shift;  // n < 2^31, so hi + n fits in 32 bits
}

struct PackRect {
  int64_t out_y, out_x;    // its first output row and column
  int64_t in_y, in_x;      // the input row and column its first live tap reads for (out_y, out_x)
  int64_t k_y, k_x;        // its first live kernel row and column
  int64_t taps_y, taps_x;  // live kernel rows and columns
  int64_t col_offset;      // element offsets of its column, product and part blocks in their buffers
  int64_t prod_offset;
  int64_t part_offset;     // (also of its weight block in the weight buffer: both are (O, K))
  FastDiv cols, rows;      // its size, as divisors of m
  FastDiv taps;            // taps_y * taps_x, as a divisor of m * taps + t
  FastDiv taps_x_div;      // taps_x, as a divisor of the tap index t
};

// Blocks per launch; a convolution with more rectangles (only kernels larger than 3x3 have them)
// takes several plans.
constexpr int kMaxPackRects = 16;

struct PackPlan {
  int64_t N, C, H, W;  // the convolution's input
  int64_t O, Ho, Wo;   // and output
  int64_t KH, KW;      // kernel
  int64_t dilation;
  int num_rects;
  PackRect rects[kMaxPackRects];
};

// The kernel w[o, c, ky, kx] at data + offset + o * so + c * sc + ky * sy + kx * sx (elements).
struct WeightView {
  int64_t offset, so, sc, sy, sx;
};

ATTNSCALE_HD int64_t block_size(const PackPlan& p, const PackRect& r) {  // M of a block
  return p.N * int64_t(r.rows.divisor) * r.cols.divisor;
}

ATTNSCALE_HD int64_t column_width(const PackPlan& p, const PackRect& r) {  // K of a column block
  return int64_t(r.taps.divisor) * p.C;
}

// The (n, y, x) position, as an NHWC pixel index in a map of height x width, of row m of a block,
// relative to the block's first row and column.
ATTNSCALE_HD int64_t block_pixel(const PackRect& r, uint32_t m, int64_t height, int64_t width) {
  const uint32_t q = fast_div(m, r.cols), xx = m - q * r.cols.divisor;
  const uint32_t n = fast_div(q, r.rows), yy = q - n * r.rows.divisor;
  return (int64_t(n) * height + yy) * width + xx;
}

// The pixel of x that row m, tap t of a column block reads (multiply by C for its channel vector).
// mt = m * taps + t, the column block's index in channel vectors.
ATTNSCALE_HD int64_t column_pixel(const PackPlan& p, const PackRect& r, uint32_t mt) {
  const uint32_t m = fast_div(mt, r.taps), t = mt - m * r.taps.divisor;
  const uint32_t ty = fast_div(t, r.taps_x_div), tx = t - ty * r.taps_x_div.divisor;
  return block_pixel(r, m, p.H, p.W) + (r.in_y + int64_t(ty) * p.dilation) * p.W + r.in_x +
         int64_t(tx) * p.dilation;
}

// The pixel of out (N, Ho, Wo) that row m of a product block holds.
ATTNSCALE_HD int64_t output_pixel(const PackPlan& p, const PackRect& r, uint32_t m) {
  return block_pixel(r, m, p.Ho, p.Wo) + r.out_y * p.Wo + r.out_x;
}

// Where element (o, t * C + c) of a rectangle's weight block lies in the kernel (through w).
ATTNSCALE_HD int64_t weight_source(const PackRect& r, const WeightView& w, int64_t o, uint32_t t, int64_t c) {
  const uint32_t ty = fast_div(t, r.taps_x_div), tx = t - ty * r.taps_x_div.divisor;
  return w.offset + o * w.so + c * w.sc + (r.k_y + ty) * w.sy + (r.k_x + tx) * w.sx;
}

// Where row (o, ky, kx) of the weight gradient (O, KH, KW, C) finds its channel 0 in rectangle r's
// part block, or -1 when tap (ky, kx) is not live in r.  The gradient's row is the sum of these rows
// over the plan's rectangles in plan order.
ATTNSCALE_HD int64_t part_row(const PackPlan& p, const PackRect& r, int64_t o, int64_t ky, int64_t kx) {
  const int64_t ty = ky - r.k_y, tx = kx - r.k_x;
  if (ty < 0 || ty >= r.taps_y || tx < 0 || tx >= r.taps_x) return -1;
  return r.part_offset + o * column_width(p, r) + (ty * r.taps_x + tx) * p.C;
}

}  // namespace dilated_conv
}  // namespace attnscale
