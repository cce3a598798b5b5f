// CPU kernel of attnscale::dense_crf: DeepLab's DenseCRF layer (densecrf_layer.cpp of DeepLab's Caffe),
// which runs Krähenbühl's NIPS 2011 mean-field code with Potts kernels filtered on Adams et al.'s
// permutohedral lattice.  The arithmetic is the one an x86-64 build of that Caffe runs (its SSE path: every
// x86-64 compiler defines __SSE__):
//   - lattice coordinates: scale factors 1/sqrt((i+2)(i+1)) * sqrt(2/3)(d+1) computed in double, rounded to
//     float; the nearest remainder-0 point by rounding half to even (cvtps_epi32); the points of the last
//     block of four that lie past the image are features of zero, and their simplex's vertices join the
//     lattice (they carry no value, but the blur passes through them);
//   - splat in pixel order, blur along each of the d+1 lattice axes once (new = old + 0.5 (n1 + n2)), slice
//     with weight (barycentric * alpha), alpha = 1 / (1 + 2^-d);
//   - per-pixel normalisation 1 / (filter(1) + 1e-20); the Potts message w * norm * filter(Q) added to the
//     negated unary; Q = the layer's ExpAndNormalize with fast_exp (max subtracted, summed in label order).
// Every product and sum is a float operation in that order (no FMA contraction), so the values are those of
// attnscale.ops.reference.dense_crf_reference bit for bit.  Parallel over labels (filters) and pixels (the
// normalisation); the lattice itself is built serially, as the layer does, per image.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "ops/dense_crf.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif
#if defined(__clang__)
#pragma clang fp contract(off)
#endif

namespace attnscale {
namespace dense_crf {

namespace {

// The largest float <= c: for a float a, (double)a > c exactly when a > below(c).
float below(double c) {
  float f = static_cast<float>(c);
  return static_cast<double>(f) > c ? std::nextafter(f, 0.0f) : f;
}

const float kOver8 = below(0.69 * 8), kOver4 = below(0.69 * 4), kOver2 = below(0.69);

// Krähenbühl's fast_exp (fastmath.h), as the layer's ExpAndNormalize calls it: exp(-a) by a degree-7
// polynomial on a in [0, 0.69] after halving a, squared back; 0 beyond |x| > 20.  Its loops bounded and its
// branches written as selects, so that normalise_pixels vectorises (jump threading, which would turn the
// selects back into branches, is off for both).  For |x| <= 20 the original's loops divide at
// most once by 8, once by 4 and twice by 2 (each division brings |x| under the next bound), so the same
// divisions are taken here, in the same order; beyond 20 the result is selected to 0.
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("no-thread-jumps")))
#endif
inline float fast_exp_inline(float x) {
  const bool negative = x < 0;
  float a = negative ? -x : x;
  const bool zero = a > 20;
  const bool m8 = a > kOver8;
  const float a8 = a / 8.0f;
  a = m8 ? a8 : a;
  const bool m4 = a > kOver4;
  const float a4 = a / 4.0f;
  a = m4 ? a4 : a;
  int squarings = (m8 ? 3 : 0) + (m4 ? 2 : 0);
  for (int k = 0; k < 2; ++k) {
    const bool m2 = a > kOver2;
    const float a2 = a / 2.0f;
    a = m2 ? a2 : a;
    squarings += m2 ? 1 : 0;
  }
  // exp(-a) ~ 1 - a (c0 - a (c1 - ... a c6)) on [0, 0.69], innermost first; the original's float literals
  // (c0 = 0.9999999995f rounds to 1.0f)
  float p = 0.0001413161f * a;
  p = a * (0.0013298820f - p);
  p = a * (0.0083013598f - p);
  p = a * (0.0416573475f - p);
  p = a * (0.1666653019f - p);
  p = a * (0.4999999206f - p);
  p = a * (0.9999999995f - p);
  float e = 1.0f - p;
  for (int k = 0; k < 5; ++k) {
    const float sq = e * e;
    e = squarings > k ? sq : e;
  }
  const float inv = 1.0f / e;
  const float r = negative ? e : inv;
  return zero ? 0.0f : r;
}



// Open addressing over int keys of d coordinates; vertex ids in insertion order.
class VertexTable {
 public:
  explicit VertexTable(int d, int64_t expected) : d_(d) {
    int64_t cap = 16;
    while (cap < 2 * expected) cap <<= 1;
    slots_.assign(static_cast<size_t>(cap), -1);
    keys_.reserve(static_cast<size_t>(expected) * d);
  }
  int size() const { return count_; }
  const int* key(int v) const { return keys_.data() + static_cast<int64_t>(v) * d_; }

  // the id of key, or -1 (insert: a new id)
  int find(const int* k, bool insert) {
    if (insert && 2 * static_cast<int64_t>(count_ + 1) > static_cast<int64_t>(slots_.size())) grow();
    const size_t mask = slots_.size() - 1;
    for (size_t h = hash(k) & mask;; h = (h + 1) & mask) {
      const int v = slots_[h];
      if (v < 0) {
        if (!insert) return -1;
        keys_.insert(keys_.end(), k, k + d_);
        return slots_[h] = count_++;
      }
      if (std::equal(k, k + d_, key(v))) return v;
    }
  }

 private:
  size_t hash(const int* k) const {
    uint64_t h = 0x9e3779b97f4a7c15ull;
    for (int i = 0; i < d_; ++i) h = (h ^ static_cast<uint32_t>(k[i])) * 0x100000001b3ull;
    return static_cast<size_t>(h ^ (h >> 29));
  }
  void grow() {
    std::vector<int> old(slots_.size() * 2, -1);
    old.swap(slots_);
    const size_t mask = slots_.size() - 1;
    for (int v = 0; v < count_; ++v) {
      size_t h = hash(key(v)) & mask;
      while (slots_[h] >= 0) h = (h + 1) & mask;
      slots_[h] = v;
    }
  }

  int d_;
  int count_ = 0;
  std::vector<int> slots_;
  std::vector<int> keys_;
};

// Bound on an elevated coordinate: far beyond any 16-bit key (each key is its coordinate rounded to a multiple
// of d+1, plus at most d+1), near enough that every int conversion stays exact.
constexpr float kMaxElevated = 1 << 20;

// The permutohedral lattice of n points with d features each (point-major), and its Gaussian filter.
class Lattice {
 public:
  Lattice(const float* features, int d, int n) : d_(d), n_(n), offset_(static_cast<size_t>(n) * (d + 1)),
                                                  weight_(static_cast<size_t>(n) * (d + 1)) {
    const int d1 = d + 1;
    VertexTable table(d, static_cast<int64_t>(n) * d1 / 4 + 16);
    std::vector<float> scale(d), elevated(d1), rem0(d1), bary(d + 2);
    std::vector<int> rank(d1), key(d);
    const float inv_std = static_cast<float>(std::sqrt(2.0 / 3.0) * d1);  // Adams et al. p. 6
    for (int i = 0; i < d; ++i)
      scale[i] = static_cast<float>(1.0 / std::sqrt(static_cast<double>((i + 2) * (i + 1))) * inv_std);
    const float down = 1.0f / d1, up = static_cast<float>(d1);
    const std::vector<float> zero(d, 0.0f);
    const int64_t padded = (static_cast<int64_t>(n) + 3) / 4 * 4;  // the SSE code's blocks of four points
    for (int64_t p = 0; p < padded; ++p) {
      const float* f = p < n ? features + p * d : zero.data();
      // elevate onto the plane sum = 0 (y = E f)
      float sm = 0;
      for (int j = d; j > 0; --j) {
        const float cf = f[j - 1] * scale[j - 1];
        elevated[j] = sm - static_cast<float>(j) * cf;
        sm += cf;
      }
      elevated[0] = sm;
      for (int i = 0; i < d1; ++i)  // before any int conversion (NaN fails too)
        if (!(std::fabs(elevated[i]) <= kMaxElevated))
          throw std::out_of_range("dense_crf: a lattice coordinate (" + std::to_string(elevated[i]) +
                                  ") does not fit DeepLab's 16-bit lattice keys: features too large (or not finite) "
                                  "for their standard deviations");
      // nearest remainder-0 point; rank of each coordinate's remainder
      float sum = 0;
      for (int i = 0; i < d1; ++i) {
        const float v = std::nearbyint(down * elevated[i]);
        rem0[i] = v * up;
        sum += v;
      }
      std::fill(rank.begin(), rank.end(), 0);
      for (int i = 0; i < d; ++i) {
        const float di = elevated[i] - rem0[i];
        for (int j = i + 1; j < d1; ++j) {
          if (di < elevated[j] - rem0[j]) ++rank[i];
          else ++rank[j];
        }
      }
      const int isum = static_cast<int>(sum);
      for (int i = 0; i < d1; ++i) {
        rank[i] += isum;
        if (rank[i] < 0) { rank[i] += d1; rem0[i] += up; }
        else if (rank[i] >= d1) { rank[i] -= d1; rem0[i] -= up; }
      }
      // barycentric coordinates (Adams et al. p. 10)
      std::fill(bary.begin(), bary.end(), 0.0f);
      for (int i = 0; i < d1; ++i) {
        const float v = (elevated[i] - rem0[i]) * down;
        bary[d - rank[i]] += v;
        bary[d - rank[i] + 1] -= v;
      }
      bary[0] += 1.0f + bary[d + 1];
      // the simplex's vertices: remainder r's key is rem0 + the canonical simplex's column r
      for (int r = 0; r < d1; ++r) {
        for (int i = 0; i < d; ++i) {
          const int k = static_cast<int>(rem0[i]) + (rank[i] <= d - r ? r : r - d1);
          if (k < -32768 || k > 32767)
            throw std::out_of_range("dense_crf: a lattice coordinate (" + std::to_string(k) +
                                    ") does not fit DeepLab's 16-bit lattice keys: features too large for their "
                                    "standard deviations (a position or colour over its *_std)");
          key[i] = k;
        }
        const int v = table.find(key.data(), true);
        if (p < n) {
          offset_[p * d1 + r] = v + 1;  // row 0 of the value buffers is the missing neighbour (zero)
          weight_[p * d1 + r] = bary[r];
        }
      }
    }
    vertices_ = table.size();  // numbered in insertion (pixel) order: a Z-order renumbering ran 1.3x slower
    neighbours_.resize(static_cast<size_t>(d1) * vertices_ * 2);
    std::vector<int> n1(d), n2(d);
    for (int j = 0; j < d1; ++j)
      for (int v = 0; v < vertices_; ++v) {
        const int* k = table.key(v);
        for (int i = 0; i < d; ++i) { n1[i] = k[i] - 1; n2[i] = k[i] + 1; }
        if (j < d) { n1[j] = k[j] + d; n2[j] = k[j] - d; }  // axis d: the implicit last coordinate
        int64_t at = (static_cast<int64_t>(j) * vertices_ + v) * 2;
        neighbours_[at] = table.find(n1.data(), false) + 1;
        neighbours_[at + 1] = table.find(n2.data(), false) + 1;
      }
  }

  // out (n x c, point-major) = the lattice filter of in (n x c); out may be in.  Parallel over channels.
  void filter(const float* in, float* out, int c) const {
    const float alpha = 1.0f / (1.0f + std::pow(2.0f, static_cast<float>(-d_)));
    const int d1 = d_ + 1;
    const int64_t rows = vertices_ + 1;
    // the lattice's values: two buffers of rows x kc per chunk of channels, kept between calls (the mean
    // field filters every step); slicing writes out directly unless it is in
    if (scratch_.size() < static_cast<size_t>(2 * rows * c)) scratch_.resize(static_cast<size_t>(2 * rows * c));
    std::vector<float> copy(in == out ? static_cast<size_t>(n_) * c : 0);
    float* result = in == out ? copy.data() : out;
    at::parallel_for(0, c, 1, [&](int64_t c0, int64_t c1) {
      const int kc = static_cast<int>(c1 - c0);
      float* values = scratch_.data() + 2 * rows * c0;
      float* next = values + rows * kc;
      std::fill(values, values + rows * kc, 0.0f);
      std::fill(next, next + kc, 0.0f);  // row 0, the missing neighbour, is never written
      for (int64_t p = 0; p < n_; ++p) {  // splat, in pixel order
        const float* x = in + p * c + c0;
        for (int r = 0; r < d1; ++r) {
          const float w = weight_[p * d1 + r];
          float* dst = values + static_cast<int64_t>(offset_[p * d1 + r]) * kc;
          for (int k = 0; k < kc; ++k) dst[k] += w * x[k];
        }
      }
      for (int j = 0; j < d1; ++j) {  // blur along each lattice axis
        const int* nb = neighbours_.data() + static_cast<int64_t>(j) * vertices_ * 2;
        for (int64_t v = 1; v < rows; ++v) {
          const float* a = values + static_cast<int64_t>(nb[2 * (v - 1)]) * kc;
          const float* b = values + static_cast<int64_t>(nb[2 * (v - 1) + 1]) * kc;
          const float* o = values + v * kc;
          float* dst = next + v * kc;
          for (int k = 0; k < kc; ++k) dst[k] = o[k] + 0.5f * (a[k] + b[k]);
        }
        std::swap(values, next);
      }
      for (int64_t p = 0; p < n_; ++p) {  // slice
        float* dst = result + p * c + c0;
        for (int k = 0; k < kc; ++k) dst[k] = 0.0f;
        for (int r = 0; r < d1; ++r) {
          const float w = weight_[p * d1 + r] * alpha;
          const float* src = values + static_cast<int64_t>(offset_[p * d1 + r]) * kc;
          for (int k = 0; k < kc; ++k) dst[k] += w * src[k];
        }
      }
    });
    if (in == out) std::copy(copy.begin(), copy.end(), out);
  }

 private:
  int d_, n_, vertices_ = 0;
  std::vector<int> offset_;      // n x (d+1): vertex id + 1
  std::vector<float> weight_;    // n x (d+1): barycentric weight
  std::vector<int> neighbours_;  // (d+1) x vertices x 2: the two blur neighbours + 1 (0: none)
  mutable std::vector<float> scratch_;
};

struct Potts {
  Lattice lattice;
  std::vector<float> norm;  // 1 / (filter(1) + 1e-20): Krähenbühl's per-pixel normalisation
  float w;
  Potts(const std::vector<float>& features, int d, int n, float weight)
      : lattice(features.data(), d, n), norm(static_cast<size_t>(n), 1.0f), w(weight) {
    lattice.filter(norm.data(), norm.data(), 1);
    for (float& v : norm) v = 1.0f / (v + 1e-20f);
  }
};

// The layer's ExpAndNormalize for pixels p0..p1: q = fast_exp(scale * x - max) / sum over the M labels (the
// sum in label order), fast_exp 16 labels at a time.
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("no-thread-jumps")))
#endif
void normalise_pixels(const float* x, float scale, int64_t p0, int64_t p1, int M, float* q, float* v) {
  for (int64_t p = p0; p < p1; ++p) {
    const float* b = x + p * M;
    float mx = scale * b[0];
    for (int j = 1; j < M; ++j)
      if (mx < scale * b[j]) mx = scale * b[j];
    for (int j = 0; j < M; ++j) v[j] = fast_exp_inline(scale * b[j] - mx);
    float total = 0;
    for (int j = 0; j < M; ++j) total += v[j];
    for (int j = 0; j < M; ++j) q[p * M + j] = v[j] / total;
  }
}

void exp_normalize(const float* x, float scale, int64_t n, int M, float* q) {
  at::parallel_for(0, n, 4096, [&](int64_t p0, int64_t p1) {
    std::vector<float> v(M);
    normalise_pixels(x, scale, p0, p1, M, q, v.data());
  });
}

}  // namespace

void mean_field(const float* unary, const float* image, int M, int H, int W, const Params& params, float* out) {
  const int64_t n = static_cast<int64_t>(H) * W;
  std::vector<Potts> potentials;
  potentials.reserve(params.n_pos + (image ? params.n_bi : 0));
  for (int k = 0; k < params.n_pos; ++k) {
    std::vector<float> f(static_cast<size_t>(n) * 2);
    for (int y = 0; y < H; ++y)
      for (int x = 0; x < W; ++x) {
        f[(y * static_cast<int64_t>(W) + x) * 2] = x / params.pos_xy_std[k];
        f[(y * static_cast<int64_t>(W) + x) * 2 + 1] = y / params.pos_xy_std[k];
      }
    potentials.emplace_back(f, 2, static_cast<int>(n), params.pos_w[k]);
  }
  if (image != nullptr)
    for (int k = 0; k < params.n_bi; ++k) {
      std::vector<float> f(static_cast<size_t>(n) * 5);
      for (int y = 0; y < H; ++y)
        for (int x = 0; x < W; ++x) {
          const int64_t p = y * static_cast<int64_t>(W) + x;
          f[p * 5] = x / params.bi_xy_std[k];
          f[p * 5 + 1] = y / params.bi_xy_std[k];
          for (int ch = 0; ch < 3; ++ch) f[p * 5 + 2 + ch] = image[ch * n + p] / params.bi_rgb_std[k];
        }
      potentials.emplace_back(f, 5, static_cast<int>(n), params.bi_w[k]);
    }

  std::vector<float> u(static_cast<size_t>(n) * M), q(u.size()), next(u.size()), tmp(u.size());
  for (int j = 0; j < M; ++j)
    for (int64_t p = 0; p < n; ++p) u[p * M + j] = unary[j * n + p];
  exp_normalize(u.data(), -1.0f, n, M, q.data());
  for (int it = 0; it < params.max_iter; ++it) {
    for (size_t i = 0; i < u.size(); ++i) next[i] = -u[i];
    for (const Potts& pot : potentials) {
      pot.lattice.filter(q.data(), tmp.data(), M);
      at::parallel_for(0, n, 4096, [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) {
          const float s = pot.w * pot.norm[p];
          for (int j = 0; j < M; ++j) next[p * M + j] += s * tmp[p * M + j];
        }
      });
    }
    exp_normalize(next.data(), 1.0f, n, M, q.data());
  }
  for (int j = 0; j < M; ++j)
    for (int64_t p = 0; p < n; ++p) out[j * n + p] = q[p * M + j];
}

namespace {

std::vector<float> floats(at::ArrayRef<double> v) { return std::vector<float>(v.begin(), v.end()); }

at::Tensor dense_crf_cpu(const at::Tensor& unary, const std::optional<at::Tensor>& image, int64_t max_iter,
                         at::ArrayRef<double> pos_w, at::ArrayRef<double> pos_xy_std, at::ArrayRef<double> bi_w,
                         at::ArrayRef<double> bi_xy_std, at::ArrayRef<double> bi_rgb_std) {
  check_args(unary, image, max_iter, pos_w, pos_xy_std, bi_w, bi_xy_std, bi_rgb_std);
  TORCH_CHECK_VALUE(unary.device().is_cpu() && (!image || image->device().is_cpu()),
                    "dense_crf: a CPU op (as DeepLab's DenseCRF layer); unary on ", unary.device(),
                    image ? ", image on " : "", image ? image->device().str() : "");
  const std::vector<float> pw = floats(pos_w), ps = floats(pos_xy_std), bw = floats(bi_w), bs = floats(bi_xy_std),
                           br = floats(bi_rgb_std);
  Params params;
  params.max_iter = static_cast<int>(max_iter);
  params.pos_w = pw.data();
  params.pos_xy_std = ps.data();
  params.n_pos = static_cast<int>(pw.size());
  params.bi_w = bw.data();
  params.bi_xy_std = bs.data();
  params.bi_rgb_std = br.data();
  params.n_bi = static_cast<int>(bw.size());
  const int64_t N = unary.size(0), M = unary.size(1), H = unary.size(2), W = unary.size(3);
  at::Tensor out = at::empty_like(unary);
  const float* up = unary.data_ptr<float>();
  const float* ip = image ? image->data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  int64_t b = 0;
  try {
    for (; b < N; ++b)
      mean_field(up + b * M * H * W, ip ? ip + b * 3 * H * W : nullptr, static_cast<int>(M), static_cast<int>(H),
                 static_cast<int>(W), params, op + b * M * H * W);
  } catch (const std::out_of_range& e) {
    TORCH_CHECK_VALUE(false, e.what(), " (image ", b, " of the batch)");
  }
  return out;
}

}  // namespace
}  // namespace dense_crf
}  // namespace attnscale

TORCH_LIBRARY_IMPL(attnscale, CPU, m) {
  m.impl("dense_crf", &attnscale::dense_crf::dense_crf_cpu);
}
