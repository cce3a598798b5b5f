// CPU kernels of attnscale::dilated_conv2d (+ backward) that skip the taps
// landing on zero padding (Caffe Convolution, stride 1, dilation d, pad p).
//
// The output plane is split into rectangles with one fixed set of live taps
// (dilated_conv_geometry.h).  For a chunk of the batch we gather ("im2col")
// only the live taps of every rectangle into one shared column buffer,
//   col_rect[(ky, kx, c), (b, oy, ox)]        (K_rect = live_ky * live_kx * C rows),
// and multiply each block with the weights packed as
//   wpack[o, (ky, kx, c)]                     (O x KH*KW*C, row-major).
// The live kx of one kernel row are consecutive in wpack, so a rectangle is one
// GEMM with K = K_rect when all kx are live, else one GEMM per live kernel row
// (K = live_kx * C) on a strided view of wpack.  GEMMs: ops/cpu/gemm.h (oneDNN or MKL).
//
// Threading: two parallel regions per batch chunk and group of rectangles
// (the buffer is kept near L3 size, see kBufferBudget).  Region 1
// fills the shared buffer (im2col / gather); in region 2 each thread owns a
// block of output channels (forward, grad_weight) or input channels
// (grad_input) and does, for its block, the weight packing, the GEMMs with a
// single-threaded BLAS and the scatter / col2im.  Few barriers keep the kernel
// fast on a busy machine, and since no two threads write the same element
// there are no atomics: results are deterministic.
//
// Backward: grad_weight accumulates grad_out_rect @ col_rect^T into the live
// columns of a packed gradient (rectangles and batch chunks in a fixed order);
// grad_input computes dcol = w_rect^T @ grad_out_rect for all live taps of a
// rectangle at once (the weight packed tap-major per channel block) and adds
// each tap's rows back into grad_x (col2im); grad_bias is a sum.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "ops/cpu/gemm.h"
#include "ops/dilated_conv_checks.h"
#include "ops/dilated_conv_gemm.h"
#include "ops/dilated_conv_geometry.h"

namespace attnscale {
namespace dilated_conv {
namespace {

// Target size (elements) of the shared buffer: the batch is processed in chunks and the
// rectangles in groups so that one buffer (24 MiB in float32) stays near the 32 MiB L3.
constexpr int64_t kBufferBudget = int64_t(6) << 20;

struct Geometry {
  int64_t N, C, H, W, O, KH, KW, Ho, Wo, d, p;
};

// Output rectangle with a fixed set of live taps and its block in the shared buffer.
struct Rect {
  TapInterval r, q;
  int64_t P, nky, nkx, K;
  int64_t offset;      // elements per image before this block (the block starts at offset * nb)
  int64_t row_offset;  // first global row of this block
  int64_t rows;        // rows of this block
};

struct Plan {
  Geometry g;
  std::vector<Rect> live;  // rectangles with at least one live tap
  std::vector<Rect> dead;  // rectangles that only get the bias
  int64_t total_rows = 0, per_image = 0, max_P = 0;
};

// rows_of(rect): rows of the shared buffer block of a rectangle (K for im2col, O for gathers).
template <typename RowsOf>
Plan make_plan(const Geometry& g, RowsOf rows_of) {
  Plan plan{g, {}, {}};
  const auto rows = tap_intervals(g.H, g.Ho, g.KH, g.d, g.p);
  const auto cols = tap_intervals(g.W, g.Wo, g.KW, g.d, g.p);
  for (const auto& r : rows) {
    for (const auto& q : cols) {
      Rect rc{r, q, r.length() * q.length(), r.taps(), q.taps(), r.taps() * q.taps() * g.C, 0, 0, 0};
      if (rc.nky == 0 || rc.nkx == 0 || g.C == 0) {
        plan.dead.push_back(rc);
        continue;
      }
      rc.rows = rows_of(rc);
      rc.offset = plan.per_image;
      rc.row_offset = plan.total_rows;
      plan.per_image += rc.rows * rc.P;
      plan.total_rows += rc.rows;
      plan.max_P = std::max(plan.max_P, rc.P);
      plan.live.push_back(rc);
    }
  }
  return plan;
}

int64_t batch_chunk(const Plan& plan) {
  const int64_t per_image = std::max<int64_t>(1, plan.per_image);
  return std::max<int64_t>(1, std::min<int64_t>(plan.g.N, kBufferBudget / per_image));
}

// Splits the rectangles of `full` into consecutive groups whose buffer (for nb images) fits
// kBufferBudget (a single larger rectangle forms its own group).  The rectangles without live
// taps go to the first group.  Always returns at least one group.
std::vector<Plan> split_groups(const Plan& full, int64_t nb) {
  std::vector<Plan> groups(1, Plan{full.g, {}, full.dead});
  for (Rect rc : full.live) {
    Plan* cur = &groups.back();
    if (!cur->live.empty() && (cur->per_image + rc.rows * rc.P) * nb > kBufferBudget) {
      groups.push_back(Plan{full.g, {}, {}});
      cur = &groups.back();
    }
    rc.offset = cur->per_image;
    rc.row_offset = cur->total_rows;
    cur->per_image += rc.rows * rc.P;
    cur->total_rows += rc.rows;
    cur->max_P = std::max(cur->max_P, rc.P);
    cur->live.push_back(rc);
  }
  return groups;
}

int64_t max_per_image(const std::vector<Plan>& groups) {
  int64_t m = 1;
  for (const Plan& p : groups) m = std::max(m, p.per_image);
  return m;
}

// Runs f(begin, count) over blocks of [0, M), one block per thread (multiples of 16);
// serially when the call does less than ~2^22 multiply-adds (`work`).
template <typename F>
void for_channel_blocks(int64_t M, int64_t work, const F& f) {
  if (M <= 0) return;
  const int64_t T = work < (int64_t(1) << 22) ? 1 : std::max<int64_t>(1, at::get_num_threads());
  int64_t chunk = (M + T - 1) / T;
  chunk = (chunk + 15) / 16 * 16;
  const int64_t tasks = (M + chunk - 1) / chunk;
  at::parallel_for(0, tasks, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) f(t * chunk, std::min(chunk, M - t * chunk));
  });
}

// Finds the rectangle holding global row `row` (few rectangles: linear scan).
const Rect& rect_of_row(const Plan& plan, int64_t row) {
  size_t i = 0;
  while (i + 1 < plan.live.size() && plan.live[i + 1].row_offset <= row) ++i;
  return plan.live[i];
}

// Grain of the region-1 loops: copies of less than ~2^17 elements run on one thread.
int64_t row_grain(const Plan& plan, int64_t nb) {
  const int64_t elements = plan.per_image * nb;
  return elements < (int64_t(1) << 17) ? std::max<int64_t>(1, plan.total_rows) : 32;
}

// Region 1 (forward, grad_weight): im2col of every live rectangle,
// col_rect[(kyi, kxi, c), b*P + (oy-r0)*QL + (ox-q0)] = x[n0+b, c, oy-p+ky*d, ox-p+kx*d].
template <typename T>
void im2col_all(const T* x, T* buf, const Plan& plan, int64_t n0, int64_t nb) {
  const Geometry& g = plan.g;
  at::parallel_for(0, plan.total_rows, row_grain(plan, nb), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const Rect& rc = rect_of_row(plan, row);
      const int64_t local = row - rc.row_offset, c = local % g.C, tap = local / g.C;
      const int64_t ky = rc.r.k_begin + tap / rc.nkx, kx = rc.q.k_begin + tap % rc.nkx;
      const int64_t ix0 = rc.q.start - g.p + kx * g.d, QL = rc.q.length();
      T* dst = buf + rc.offset * nb + local * nb * rc.P;
      for (int64_t b = 0; b < nb; ++b) {
        const T* src = x + ((n0 + b) * g.C + c) * g.H * g.W;
        for (int64_t oy = rc.r.start; oy < rc.r.end; ++oy) {
          std::memcpy(dst, src + (oy - g.p + ky * g.d) * g.W + ix0, sizeof(T) * QL);
          dst += QL;
        }
      }
    }
  });
}

// dst[o, b*P + ...] = grad_out[n0+b, o, rect] for o in [o0, o0+count) (dst row 0 = channel o0).
template <typename T>
void gather_rect(const T* go, T* dst, const Geometry& g, const Rect& rc, int64_t n0, int64_t nb, int64_t o0,
                 int64_t count) {
  const int64_t QL = rc.q.length();
  for (int64_t o = o0; o < o0 + count; ++o) {
    T* d = dst + (o - o0) * nb * rc.P;
    for (int64_t b = 0; b < nb; ++b) {
      const T* s = go + ((n0 + b) * g.O + o) * g.Ho * g.Wo;
      for (int64_t oy = rc.r.start; oy < rc.r.end; ++oy) {
        std::memcpy(d, s + oy * g.Wo + rc.q.start, sizeof(T) * QL);
        d += QL;
      }
    }
  }
}

// Region 1 (grad_input): gather grad_out of every live rectangle, block [O, nb*P].
template <typename T>
void gather_all(const T* go, T* buf, const Plan& plan, int64_t n0, int64_t nb) {
  const Geometry& g = plan.g;
  at::parallel_for(0, plan.total_rows, row_grain(plan, nb), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const Rect& rc = rect_of_row(plan, row);
      const int64_t o = row - rc.row_offset;
      gather_rect<T>(go, buf + rc.offset * nb + o * nb * rc.P, g, rc, n0, nb, o, 1);
    }
  });
}

// Weight rows [o0, o0+count) packed as wpack[o, (ky, kx, c)].
template <typename T>
void pack_weight_rows(const T* w, T* wpack, const Geometry& g, int64_t o0, int64_t count) {
  const int64_t taps = g.KH * g.KW;
  for (int64_t o = o0; o < o0 + count; ++o)
    for (int64_t c = 0; c < g.C; ++c)
      for (int64_t t = 0; t < taps; ++t) wpack[o * taps * g.C + t * g.C + c] = w[(o * g.C + c) * taps + t];
}

// out (=, or += when accumulate) a @ b for 2-D views with any strides.  Small products run in
// a plain loop: at::mm's fixed cost (and its thread wake-ups on a busy machine) dominates
// below ~2^15 multiply-adds; larger ones go to cpu_gemm (oneDNN or MKL).
template <typename T>
void matmul_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  if (M * N * K >= (int64_t(1) << 15)) {
    cpu_gemm::matmul_into(out, a, b, accumulate);
    return;
  }
  T* o = out.data_ptr<T>();
  const T* ap = a.data_ptr<T>();
  const T* bp = b.data_ptr<T>();
  const int64_t os0 = out.stride(0), os1 = out.stride(1), as0 = a.stride(0), as1 = a.stride(1);
  const int64_t bs0 = b.stride(0), bs1 = b.stride(1);
  for (int64_t i = 0; i < M; ++i) {
    T* orow = o + i * os0;
    if (!accumulate)
      for (int64_t j = 0; j < N; ++j) orow[j * os1] = T(0);
    for (int64_t k = 0; k < K; ++k) {
      const T av = ap[i * as0 + k * as1];
      const T* brow = bp + k * bs0;
      for (int64_t j = 0; j < N; ++j) orow[j * os1] += av * brow[j * bs1];
    }
  }
}

at::Tensor block_view(const at::Tensor& buf, const Rect& rc, int64_t nb) {
  return buf.narrow(0, rc.offset * nb, rc.rows * nb * rc.P).view({rc.rows, nb * rc.P});
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "dilated_conv2d (CPU kernel): ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              "dilated_conv2d (CPU kernel): ", name, " must be float32 or float64, got ", t.scalar_type());
}

// The forward on the GEMM path with its column blocks (the weight gradient's, when training).
std::tuple<at::Tensor, at::Tensor> forward_with_columns_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                            const c10::optional<at::Tensor>& bias, int64_t dilation,
                                                            int64_t padding) {
  check_forward(x, weight, bias, dilation, padding);
  check_cpu(x, "x");
  return gemm_forward_with_columns(x, weight, bias, dilation, padding);
}

at::Tensor forward_cpu(const at::Tensor& x_in, const at::Tensor& weight_in,
                       const c10::optional<at::Tensor>& bias_in, int64_t dilation, int64_t padding) {
  check_forward(x_in, weight_in, bias_in, dilation, padding);
  check_cpu(x_in, "x");
  if (use_gemm(x_in)) return gemm_forward(x_in, weight_in, bias_in, dilation, padding);
  const at::Tensor x = x_in.contiguous(), w = weight_in.contiguous();
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  const at::Tensor bias = has_bias ? bias_in->contiguous() : at::Tensor();
  const Geometry g{x.size(0), x.size(1), x.size(2), x.size(3), w.size(0), w.size(2), w.size(3),
                   out_size(x.size(2), w.size(2), dilation, padding), out_size(x.size(3), w.size(3), dilation, padding),
                   dilation, padding};
  at::Tensor out = at::empty({g.N, g.O, g.Ho, g.Wo}, x.options());
  if (out.numel() == 0) return out;
  const Plan full = make_plan(g, [](const Rect& rc) { return rc.K; });
  const int64_t nb_max = batch_chunk(full);
  const std::vector<Plan> groups = split_groups(full, nb_max);
  at::Tensor col = at::empty({max_per_image(groups) * nb_max}, x.options());
  at::Tensor wpack = at::empty({g.O, g.KH * g.KW * g.C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dilated_conv2d_cpu", [&] {
    const scalar_t* bptr = has_bias ? bias.data_ptr<scalar_t>() : nullptr;
    scalar_t* optr = out.data_ptr<scalar_t>();
    for (int64_t n0 = 0; n0 < g.N; n0 += nb_max) {
      const int64_t nb = std::min(nb_max, g.N - n0);
      for (size_t gi = 0; gi < groups.size(); ++gi) {
        const Plan& plan = groups[gi];
        im2col_all<scalar_t>(x.data_ptr<scalar_t>(), col.data_ptr<scalar_t>(), plan, n0, nb);
        for_channel_blocks(g.O, g.O * plan.per_image * nb, [&](int64_t o0, int64_t oc) {
          if (n0 == 0 && gi == 0)
            pack_weight_rows<scalar_t>(w.data_ptr<scalar_t>(), wpack.data_ptr<scalar_t>(), g, o0, oc);
          const at::Tensor wrows = wpack.narrow(0, o0, oc);
          at::Tensor res = at::empty({oc * nb * std::max<int64_t>(1, plan.max_P)}, x.options());
          for (const Rect& rc : plan.live) {
            const int64_t P = rc.P, QL = rc.q.length();
            at::Tensor resm = res.narrow(0, 0, oc * nb * P).view({oc, nb * P});
            const at::Tensor colm = block_view(col, rc, nb);
            if (rc.nkx == g.KW) {  // live taps of consecutive kernel rows are contiguous in wpack
              matmul_into<scalar_t>(resm, wrows.narrow(1, rc.r.k_begin * g.KW * g.C, rc.K), colm, false);
            } else {
              const int64_t kr = rc.nkx * g.C;
              for (int64_t i = 0; i < rc.nky; ++i) {
                const at::Tensor wv = wrows.narrow(1, ((rc.r.k_begin + i) * g.KW + rc.q.k_begin) * g.C, kr);
                matmul_into<scalar_t>(resm, wv, colm.narrow(0, i * kr, kr), i > 0);
              }
            }
            const scalar_t* s = resm.data_ptr<scalar_t>();
            for (int64_t o = o0; o < o0 + oc; ++o) {
              const scalar_t bv = bptr ? bptr[o] : scalar_t(0);
              for (int64_t b = 0; b < nb; ++b) {
                scalar_t* d = optr + ((n0 + b) * g.O + o) * g.Ho * g.Wo;
                for (int64_t oy = rc.r.start; oy < rc.r.end; ++oy, s += QL) {
                  scalar_t* drow = d + oy * g.Wo + rc.q.start;
                  for (int64_t i = 0; i < QL; ++i) drow[i] = s[i] + bv;
                }
              }
            }
          }
          for (const Rect& rc : plan.dead) {  // no live tap: bias only
            for (int64_t o = o0; o < o0 + oc; ++o) {
              const scalar_t bv = bptr ? bptr[o] : scalar_t(0);
              for (int64_t b = 0; b < nb; ++b) {
                scalar_t* d = optr + ((n0 + b) * g.O + o) * g.Ho * g.Wo;
                for (int64_t oy = rc.r.start; oy < rc.r.end; ++oy)
                  for (int64_t ox = rc.q.start; ox < rc.q.end; ++ox) d[oy * g.Wo + ox] = bv;
              }
            }
          }
        });
      }
    }
  });
  return out;
}

at::Tensor backward_input_cpu(const at::Tensor& grad_out_in, const at::Tensor& weight_in, int64_t dilation,
                              int64_t padding) {
  check_grad_output(grad_out_in, weight_in, "weight");
  check_cpu(grad_out_in, "grad_output");
  TORCH_CHECK(weight_in.dim() == 4, "dilated_conv2d backward: weight must be 4-D, got ", weight_in.dim(), "-D");
  TORCH_CHECK(grad_out_in.size(1) == weight_in.size(0), "dilated_conv2d backward: grad_output has ",
              grad_out_in.size(1), " channels but weight has ", weight_in.size(0), " output channels");
  check_kernel_size(weight_in.size(2), weight_in.size(3));
  check_params(dilation, padding);
  const int64_t KH = weight_in.size(2), KW = weight_in.size(3);
  const int64_t H = grad_out_in.size(2) - 2 * padding + dilation * (KH - 1);
  const int64_t W = grad_out_in.size(3) - 2 * padding + dilation * (KW - 1);
  TORCH_CHECK(H >= 1 && W >= 1, "dilated_conv2d backward: grad_output spatial size ",
              grad_out_in.sizes(), " implies an input size (", H, ", ", W, ") < 1");
  if (use_gemm(grad_out_in)) return gemm_backward_input(grad_out_in, weight_in, dilation, padding);
  const at::Tensor go = grad_out_in.contiguous();
  const Geometry g{go.size(0), weight_in.size(1), H, W, weight_in.size(0), KH, KW, go.size(2), go.size(3),
                   dilation, padding};
  if (g.N * g.C * g.H * g.W == 0 || g.O == 0) return at::zeros({g.N, g.C, g.H, g.W}, go.options());
  at::Tensor gx = at::empty({g.N, g.C, g.H, g.W}, go.options());
  const Plan full = make_plan(g, [&](const Rect&) { return g.O; });
  const int64_t nb_max = batch_chunk(full);
  const std::vector<Plan> groups = split_groups(full, nb_max);
  at::Tensor gbuf = at::empty({max_per_image(groups) * nb_max}, go.options());
  // wt[(ky, kx, c), o] = w[o, c, ky, kx]: each thread packs its channel block tap-major (wb below), so
  // that the live taps of one kernel row (of all rows when every kx is live) are consecutive rows
  const at::Tensor wt = weight_in.permute({2, 3, 1, 0}).contiguous().view({g.KH * g.KW * g.C, g.O});
  AT_DISPATCH_FLOATING_TYPES(go.scalar_type(), "dilated_conv2d_backward_input_cpu", [&] {
    scalar_t* gxp = gx.data_ptr<scalar_t>();
    const scalar_t* wtp = wt.data_ptr<scalar_t>();
    const int64_t taps = g.KH * g.KW;
    for (int64_t n0 = 0; n0 < g.N; n0 += nb_max) {
      const int64_t nb = std::min(nb_max, g.N - n0);
      for (size_t gi = 0; gi < groups.size(); ++gi) {
        const Plan& plan = groups[gi];
        gather_all<scalar_t>(go.data_ptr<scalar_t>(), gbuf.data_ptr<scalar_t>(), plan, n0, nb);
        for_channel_blocks(g.C, g.C * plan.per_image * nb, [&](int64_t c0, int64_t cc) {
          if (gi == 0) {  // grad_x of this batch chunk starts at zero
            for (int64_t b = 0; b < nb; ++b)
              std::memset(gxp + ((n0 + b) * g.C + c0) * g.H * g.W, 0, sizeof(scalar_t) * cc * g.H * g.W);
          }
          // wb[(t, c - c0), o] for the block's channels (t = ky * KW + kx)
          at::Tensor wb = at::empty({taps * cc, g.O}, go.options());
          scalar_t* wbp = wb.data_ptr<scalar_t>();
          for (int64_t t = 0; t < taps; ++t)
            std::memcpy(wbp + t * cc * g.O, wtp + (t * g.C + c0) * g.O, sizeof(scalar_t) * cc * g.O);
          at::Tensor dl = at::empty({taps * cc * nb * std::max<int64_t>(1, plan.max_P)}, go.options());
          for (const Rect& rc : plan.live) {
            const int64_t P = rc.P, QL = rc.q.length();
            const at::Tensor gm = block_view(gbuf, rc, nb);
            // dcol[(tap, c), pix] = sum_o w[o, c, ky, kx] * grad_out_rect[o, pix] for the rectangle's live
            // taps (row-major in ky, kx) and the block's channels: one product for all of them when every
            // kx is live, else one per kernel row
            const int64_t rows = rc.nky * rc.nkx * cc;
            at::Tensor dm = dl.narrow(0, 0, rows * nb * P).view({rows, nb * P});
            if (rc.nkx == g.KW) {
              matmul_into<scalar_t>(dm, wb.narrow(0, rc.r.k_begin * g.KW * cc, rows), gm, false);
            } else {
              const int64_t kr = rc.nkx * cc;
              for (int64_t i = 0; i < rc.nky; ++i) {
                at::Tensor di = dm.narrow(0, i * kr, kr);
                matmul_into<scalar_t>(di, wb.narrow(0, ((rc.r.k_begin + i) * g.KW + rc.q.k_begin) * cc, kr), gm,
                                      false);
              }
            }
            const scalar_t* s = dm.data_ptr<scalar_t>();
            for (int64_t ky = rc.r.k_begin; ky < rc.r.k_end; ++ky) {
              for (int64_t kx = rc.q.k_begin; kx < rc.q.k_end; ++kx) {
                const int64_t ix0 = rc.q.start - g.p + kx * g.d;
                for (int64_t c = c0; c < c0 + cc; ++c) {
                  for (int64_t b = 0; b < nb; ++b) {
                    scalar_t* dimg = gxp + ((n0 + b) * g.C + c) * g.H * g.W;
                    for (int64_t oy = rc.r.start; oy < rc.r.end; ++oy, s += QL) {
                      scalar_t* drow = dimg + (oy - g.p + ky * g.d) * g.W + ix0;
                      for (int64_t i = 0; i < QL; ++i) drow[i] += s[i];
                    }
                  }
                }
              }
            }
          }
        });
      }
    }
  });
  return gx;
}

std::tuple<at::Tensor, at::Tensor> backward_weight_cpu(const at::Tensor& grad_out_in, const at::Tensor& x_in,
                                                       int64_t kernel_h, int64_t kernel_w, int64_t dilation,
                                                       int64_t padding, const c10::optional<at::Tensor>& columns) {
  check_grad_output(grad_out_in, x_in, "x");
  check_cpu(x_in, "x");
  TORCH_CHECK(x_in.dim() == 4, "dilated_conv2d backward: x must be 4-D, got ", x_in.dim(), "-D");
  check_kernel_size(kernel_h, kernel_w);
  check_params(dilation, padding);
  check_output_size(x_in.size(2), x_in.size(3), kernel_h, kernel_w, dilation, padding);
  const Geometry g{x_in.size(0), x_in.size(1), x_in.size(2), x_in.size(3), grad_out_in.size(1), kernel_h, kernel_w,
                   out_size(x_in.size(2), kernel_h, dilation, padding),
                   out_size(x_in.size(3), kernel_w, dilation, padding), dilation, padding};
  TORCH_CHECK(grad_out_in.size(0) == g.N && grad_out_in.size(2) == g.Ho && grad_out_in.size(3) == g.Wo,
              "dilated_conv2d backward: grad_output has shape ", grad_out_in.sizes(), " but x ", x_in.sizes(),
              " gives an output of (", g.N, ", ", g.O, ", ", g.Ho, ", ", g.Wo, ")");
  if (columns.has_value() && columns->defined()) {
    check_columns(*columns, x_in, grad_out_in.size(1), kernel_h, kernel_w, dilation, padding);
  }
  if (use_gemm(x_in)) return gemm_backward_weight(grad_out_in, x_in, kernel_h, kernel_w, dilation, padding, columns);
  const at::Tensor go = grad_out_in.contiguous();
  const at::Tensor x = x_in.contiguous();
  at::Tensor gbias = go.sum({0, 2, 3});
  at::Tensor gpack = at::zeros({g.O, g.KH * g.KW * g.C}, go.options());
  if (g.N > 0 && g.C > 0 && g.O > 0) {
    const Plan full = make_plan(g, [](const Rect& rc) { return rc.K; });
    const int64_t nb_max = batch_chunk(full);
    const std::vector<Plan> groups = split_groups(full, nb_max);
    at::Tensor col = at::empty({max_per_image(groups) * nb_max}, go.options());
    AT_DISPATCH_FLOATING_TYPES(go.scalar_type(), "dilated_conv2d_backward_weight_cpu", [&] {
      for (int64_t n0 = 0; n0 < g.N; n0 += nb_max) {
        const int64_t nb = std::min(nb_max, g.N - n0);
        for (const Plan& plan : groups) {
          im2col_all<scalar_t>(x.data_ptr<scalar_t>(), col.data_ptr<scalar_t>(), plan, n0, nb);
          for_channel_blocks(g.O, g.O * plan.per_image * nb, [&](int64_t o0, int64_t oc) {
            at::Tensor gl = at::empty({oc * nb * std::max<int64_t>(1, plan.max_P)}, go.options());
            at::Tensor grows = gpack.narrow(0, o0, oc);
            for (const Rect& rc : plan.live) {
              at::Tensor gm = gl.narrow(0, 0, oc * nb * rc.P).view({oc, nb * rc.P});
              gather_rect<scalar_t>(go.data_ptr<scalar_t>(), gm.data_ptr<scalar_t>(), g, rc, n0, nb, o0, oc);
              const at::Tensor cm = block_view(col, rc, nb);
              if (rc.nkx == g.KW) {
                at::Tensor gv = grows.narrow(1, rc.r.k_begin * g.KW * g.C, rc.K);
                matmul_into<scalar_t>(gv, gm, cm.t(), true);
              } else {
                const int64_t kr = rc.nkx * g.C;
                for (int64_t i = 0; i < rc.nky; ++i) {
                  at::Tensor gv = grows.narrow(1, ((rc.r.k_begin + i) * g.KW + rc.q.k_begin) * g.C, kr);
                  matmul_into<scalar_t>(gv, gm, cm.narrow(0, i * kr, kr).t(), true);
                }
              }
            }
          });
        }
      }
    });
  }
  at::Tensor gw = gpack.view({g.O, g.KH, g.KW, g.C}).permute({0, 3, 1, 2}).contiguous();
  return {gw, gbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(attnscale, CPU, m) {
  m.impl("dilated_conv2d", &forward_cpu);
  m.impl("dilated_conv2d_backward_input", &backward_input_cpu);
  m.impl("dilated_conv2d_backward_weight", &backward_weight_cpu);
  m.impl("dilated_conv2d_with_columns", &forward_with_columns_cpu);
}

}  // namespace dilated_conv
}  // namespace attnscale
