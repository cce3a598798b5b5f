// The blocks of attnscale::dilated_conv2d's GEMM path (dilated_conv_gemm.cpp): the output plane's
// rectangles with one fixed set of live taps (dilated_conv_geometry.h), grouped by size (one batched
// GEMM per group), their blocks' places in the column, product and part buffers, and the copy plans
// (dilated_conv_pack.h).  Plain C++ (no torch headers), so that the CUDA emulator's tests
// (tests/cuda_emu) lay the blocks out as the op does.
#pragma once

#include <cstdint>
#include <vector>

#include "ops/dilated_conv_geometry.h"
#include "ops/dilated_conv_pack.h"

namespace attnscale {
namespace dilated_conv {

struct Layout {
  int64_t d, pad_y, pad_x;  // padding per axis: the backward's adjoint convolution may differ per axis
};

// An output rectangle whose live taps are kernel rows rows.k_begin.. x kernel columns cols.k_begin..
struct Rect {
  TapInterval rows, cols;
  int64_t pixels() const { return rows.length() * cols.length(); }
  int64_t taps() const { return rows.taps() * cols.taps(); }
};

// Rectangles of one size (pixels, taps): their blocks lie side by side, one batched GEMM.
struct Group {
  std::vector<size_t> members;  // indices into Blocks::rects
  int64_t m = 0, k = 0;         // N * pixels, taps * C
  int64_t col_base = 0, prod_base = 0, part_base = 0;
  int64_t size() const { return int64_t(members.size()); }
};

// What exceeds the copies' 32-bit index arithmetic, if anything.
enum class BlockError { kNone, kWeightTooLarge, kBlockTooLarge };

// Every live rectangle of a convolution with its blocks in one column, product and part buffer
// (element offsets; group blocks start 16 elements apart).
struct Blocks {
  std::vector<Rect> rects;
  std::vector<Group> groups;
  std::vector<PackPlan> plans;  // the rectangles in group order, kMaxPackRects per launch
  int64_t col_size = 0, prod_size = 0, part_size = 0, covered = 0;
  BlockError error = BlockError::kNone;  // set: nothing else is
  int64_t bad_m = 0, bad_k = 0;          // kBlockTooLarge: the group's M and K
};

inline int64_t align16(int64_t n) { return (n + 15) / 16 * 16; }

// N, C, O >= 1.  x (N, C, H, W) -> out (N, O, Ho, Wo).  The copies index a block, and the CUDA weight
// copy a kernel, with 32-bit arithmetic: sizes beyond that come back as an error.
inline Blocks make_blocks(int64_t N, int64_t C, int64_t H, int64_t W, int64_t O, int64_t Ho, int64_t Wo,
                          int64_t KH, int64_t KW, const Layout& l) {
  Blocks b;
  for (const TapInterval& r : tap_intervals(H, Ho, KH, l.d, l.pad_y)) {
    if (r.taps() == 0) continue;
    for (const TapInterval& q : tap_intervals(W, Wo, KW, l.d, l.pad_x)) {
      if (q.taps() > 0) b.rects.push_back({r, q});
    }
  }
  for (size_t i = 0; i < b.rects.size(); ++i) {
    const Rect& rc = b.rects[i];
    Group* g = nullptr;
    for (Group& h : b.groups) {
      const Rect& first = b.rects[h.members.front()];
      if (first.pixels() == rc.pixels() && first.taps() == rc.taps()) g = &h;
    }
    if (g == nullptr) {
      b.groups.emplace_back();
      g = &b.groups.back();
      g->m = N * rc.pixels();
      g->k = rc.taps() * C;
    }
    g->members.push_back(i);
  }
  constexpr int64_t kIndexLimit = int64_t(1) << 31;
  Blocks fail;
  if (O * KH * KW * C >= kIndexLimit) {
    fail.error = BlockError::kWeightTooLarge;
    return fail;
  }
  PackPlan base{};
  base.N = N, base.C = C, base.H = H, base.W = W, base.O = O, base.Ho = Ho, base.Wo = Wo, base.KH = KH, base.KW = KW;
  base.dilation = l.d;
  for (Group& g : b.groups) {
    if (g.m * g.k >= kIndexLimit || g.m * O >= kIndexLimit) {
      fail.error = BlockError::kBlockTooLarge;
      fail.bad_m = g.m, fail.bad_k = g.k;
      return fail;
    }
    g.col_base = b.col_size = align16(b.col_size);
    g.prod_base = b.prod_size = align16(b.prod_size);
    g.part_base = b.part_size = align16(b.part_size);
    for (int64_t j = 0; j < g.size(); ++j) {
      const Rect& rc = b.rects[g.members[size_t(j)]];
      if (b.plans.empty() || b.plans.back().num_rects == kMaxPackRects) b.plans.push_back(base);
      PackPlan& plan = b.plans.back();
      plan.rects[plan.num_rects++] = PackRect{
          rc.rows.start, rc.cols.start,
          rc.rows.start - l.pad_y + rc.rows.k_begin * l.d, rc.cols.start - l.pad_x + rc.cols.k_begin * l.d,
          rc.rows.k_begin, rc.cols.k_begin, rc.rows.taps(), rc.cols.taps(),
          g.col_base + j * g.m * g.k, g.prod_base + j * g.m * O, g.part_base + j * O * g.k,
          make_fast_div(uint32_t(rc.cols.length())), make_fast_div(uint32_t(rc.rows.length())),
          make_fast_div(uint32_t(rc.taps())), make_fast_div(uint32_t(rc.cols.taps()))};
      b.covered += rc.pixels();
    }
    b.col_size += g.size() * g.m * g.k;
    b.prod_size += g.size() * g.m * O;
    b.part_size += g.size() * O * g.k;
  }
  return b;
}

}  // namespace dilated_conv
}  // namespace attnscale
