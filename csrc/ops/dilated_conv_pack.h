// Index maps of the copies around the GEMM path's matrix products (dilated_conv_gemm.cpp), shared
// by the CPU loops (cpu/dilated_conv_pack_kernel.cpp) and the CUDA kernels
// (cuda/dilated_conv_pack_kernel.cu), so that the CPU tests check the arithmetic the GPU runs.  Plain
// C++ (no torch headers) for nvcc.
//
// A rectangle of output positions with one fixed set of live taps (dilated_conv_geometry.h) owns
//   a column block (taps_y * taps_x * C, M), M = N * rows * cols, rows ld >= M elements apart (M
//   rounded up to 8, so that every row starts 16-byte aligned, as cuBLAS's Hopper kernels need): element (k, m) with
//       k = (ty * taps_x + tx) * C + c and m = (n * rows + yy) * cols + xx
//     holds x[n, c, in_y + yy + ty * d, in_x + xx + tx * d] (Caffe's im2col over the live taps), and
//   a product block (O, M): element (o, m) is the output out[n, o, out_y + yy, out_x + xx].
// Within a block m runs along image rows, contiguous in x and in the output alike.
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
  int64_t taps_y, taps_x;  // live kernel rows and columns
  int64_t col_offset;      // element offset of its column block in the column buffer
  int64_t prod_offset;     // element offset of its product block in the product buffer
  int64_t ld;              // row stride of both blocks
  FastDiv cols, rows;      // its size, as divisors of m
  FastDiv taps_x_div;      // taps_x, as a divisor of the tap index
};

// Blocks per launch; a convolution with more rectangles (only kernels larger than 3x3 have them)
// takes several plans.
constexpr int kMaxPackRects = 16;

struct PackPlan {
  int64_t N, C, H, W;  // the convolution's input
  int64_t O, Ho, Wo;   // and output
  int64_t dilation;
  FastDiv channels;    // C, as a divisor of k
  int num_rects;
  PackRect rects[kMaxPackRects];
};

ATTNSCALE_HD int64_t block_size(const PackPlan& p, const PackRect& r) {  // M of a block
  return p.N * int64_t(r.rows.divisor) * r.cols.divisor;
}

ATTNSCALE_HD int64_t column_rows(const PackPlan& p, const PackRect& r) {  // K of a column block
  return r.taps_y * r.taps_x * p.C;
}

// Where row k of a rectangle's column block starts reading x, for image 0 and (yy, xx) = (0, 0).
ATTNSCALE_HD int64_t column_row_source(const PackPlan& p, const PackRect& r, uint32_t k) {
  const uint32_t t = fast_div(k, p.channels), c = k - t * uint32_t(p.C);
  const uint32_t ty = fast_div(t, r.taps_x_div), tx = t - ty * uint32_t(r.taps_x);
  return (int64_t(c) * p.H + r.in_y + int64_t(ty) * p.dilation) * p.W + r.in_x + int64_t(tx) * p.dilation;
}

// Offset of position m of a block within an (N, channels, height, width) tensor, relative to channel
// 0 at the block's first row and column.
ATTNSCALE_HD int64_t block_position(const PackRect& r, uint32_t m, int64_t channels, int64_t height,
                                    int64_t width) {
  const uint32_t q = fast_div(m, r.cols), xx = m - q * r.cols.divisor;
  const uint32_t n = fast_div(q, r.rows), yy = q - n * r.rows.divisor;
  return (int64_t(n) * channels * height + yy) * width + xx;
}

// Offset in out (N, O, Ho, Wo) of element (o, m) of a rectangle's product block.  (The CUDA kernel
// adds the same two terms, the block_position of m once for a group of rows o.)
ATTNSCALE_HD int64_t output_offset(const PackPlan& p, const PackRect& r, int64_t o, uint32_t m) {
  return (o * p.Ho + r.out_y) * p.Wo + r.out_x + block_position(r, m, p.O, p.Ho, p.Wo);
}

// Offset in x (N, C, H, W) of element (k, m) of a rectangle's column block, from column_row_source(k).
ATTNSCALE_HD int64_t column_source(const PackPlan& p, const PackRect& r, int64_t row_source, uint32_t m) {
  return row_source + block_position(r, m, p.C, p.H, p.W);
}

}  // namespace dilated_conv
}  // namespace attnscale
