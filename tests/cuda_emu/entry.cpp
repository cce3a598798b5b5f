// C entry points over the kernels' launchers (raw pointers and sizes), for ctypes (tests/cuda_emu/build.py).
// Each returns the launcher's cudaError_t, or -1 when the emulator stopped (a deadlock, an unsupported
// intrinsic); emu_message() then says why.
#include <cstdio>
#include <exception>

#include "ops/bias_relu_cuda.h"
#include "ops/dilated_conv_blocks.h"
#include "ops/dilated_conv_cuda.h"
#include "ops/interp_cuda.h"
#include "ops/max_pool_cuda.h"
#include "ops/scale_merge_cuda.h"

namespace {
char message[1024] = "";

template <typename F>
int guarded(F&& f) {
  try {
    message[0] = '\0';
    return static_cast<int>(f());
  } catch (const std::exception& e) {
    std::snprintf(message, sizeof(message), "%s", e.what());
    return -1;
  }
}

attnscale::DType dtype_of(int d) { return static_cast<attnscale::DType>(d); }
}  // namespace

using namespace attnscale;

extern "C" {

const char* emu_message() { return message; }

// the kernels launched since the last call, one per line, as the launches wrote them; the log is cleared
const char* emu_launches() {
  static std::string last;
  last.swap(emu::launch_log);
  emu::launch_log.clear();
  return last.c_str();
}

int emu_max_pool2d(int dt, const void* x, void* y, int64_t N, int64_t C, int H, int W, int OH, int OW, int k, int s,
                   int p, int channels_last) {
  return guarded([&] {
    return max_pool::cuda::launch_max_pool2d(dtype_of(dt), x, y, N, C, H, W, OH, OW, k, s, p, channels_last, nullptr);
  });
}

int emu_max_pool2d_with_mask(int dt, const void* x, void* y, uint8_t* mask, int64_t N, int64_t C, int H, int W,
                             int OH, int OW, int k, int s, int p, int channels_last) {
  return guarded([&] {
    return max_pool::cuda::launch_max_pool2d_with_mask(dtype_of(dt), x, y, mask, N, C, H, W, OH, OW, k, s, p,
                                                       channels_last, nullptr);
  });
}

int emu_max_pool2d_backward(int dt, const void* g, const uint8_t* mask, void* gx, int64_t N, int64_t C, int H, int W,
                            int OH, int OW, int k, int s, int p, int channels_last) {
  return guarded([&] {
    return max_pool::cuda::launch_max_pool2d_backward(dtype_of(dt), g, mask, gx, N, C, H, W, OH, OW, k, s, p,
                                                      channels_last, nullptr);
  });
}

int emu_interp(int dt, const void* x, void* y, int64_t N, int64_t C, int H, int W, int OH, int OW,
               int channels_last) {
  return guarded(
      [&] { return interp::cuda::launch_interp(dtype_of(dt), x, y, N, C, H, W, OH, OW, channels_last, nullptr); });
}

int emu_interp_backward(int dt, const void* g, const int64_t* g_strides, const int64_t* idx_h, const void* coef_h,
                        int Th, const int64_t* idx_w, const void* coef_w, int Tw, void* gx, int64_t N, int64_t C, int H,
                        int W, int OH, int OW, int channels_last) {
  return guarded([&] {
    return interp::cuda::launch_interp_backward(dtype_of(dt), g, g_strides, idx_h, coef_h, Th, idx_w, coef_w, Tw, gx,
                                                N, C, H, W, OH, OW, channels_last, nullptr);
  });
}

int emu_bias_relu(int dt, const void* x, const void* bias, int bias_float32, void* out, int64_t N, int64_t C,
                  int64_t HW, int channels_last, int aligned16, double p, uint64_t seed) {
  return guarded([&] {
    return bias_relu::cuda::launch_forward(dtype_of(dt), x, bias, bias_float32, out, N, C, HW, channels_last,
                                           aligned16, p, seed, nullptr);
  });
}

// the plan's fields in order: vec, block_x, block_y, grid_x, grid_y, span, chunks, partials, workspace_bytes
void emu_bias_relu_plan(int dt, int64_t N, int64_t C, int64_t HW, int channels_last, int aligned16, int64_t* f) {
  const bias_relu::cuda::BackwardPlan p =
      bias_relu::cuda::plan_backward(dtype_of(dt), N, C, HW, channels_last, aligned16);
  const int64_t v[] = {p.vec, p.block_x, p.block_y, p.grid_x, p.grid_y, p.span, p.chunks, p.partials,
                       static_cast<int64_t>(p.workspace_bytes)};
  for (int i = 0; i < 9; ++i) f[i] = v[i];
}

int emu_bias_relu_backward(int dt, const void* g, const void* out, void* gx, void* gbias, int bias_float32,
                           void* workspace, int64_t N, int64_t C, int64_t HW, int channels_last, int aligned16,
                           double scale) {
  return guarded([&] {
    const bias_relu::cuda::BackwardPlan p =
        bias_relu::cuda::plan_backward(dtype_of(dt), N, C, HW, channels_last, aligned16);
    return bias_relu::cuda::launch_backward(p, dtype_of(dt), g, out, gx, gbias, bias_float32, workspace, N, C, HW,
                                            channels_last, scale, nullptr);
  });
}

}  // extern "C"

// scale_merge: mode 0 attention, 1 avg, 2 max; H, W: S sizes each
static scale_merge::cuda::Problem merge_problem(int dt, int mode, int S, int64_t N, int64_t C, const int* H,
                                                const int* W) {
  scale_merge::cuda::Problem p;
  p.S = S;
  p.N = N;
  p.C = C;
  for (int s = 0; s < S; ++s) {
    p.H[s] = H[s];
    p.W[s] = W[s];
  }
  p.mode = mode;
  p.dtype = static_cast<scale_merge::cuda::DType>(dt);
  return p;
}

extern "C" {

int emu_scale_merge(int dt, int mode, int S, int64_t N, int64_t C, const int* H, const int* W,
                    const void* const* scores, const void* logits, void* merged, void* weights) {
  return guarded([&] {
    const scale_merge::cuda::Problem p = merge_problem(dt, mode, S, N, C, H, W);
    return scale_merge::cuda::launch_forward(p, scores, logits, merged, weights, nullptr);
  });
}

int emu_scale_merge_backward(int dt, int mode, int S, int64_t N, int64_t C, const int* H, const int* W,
                             int backward_layout, const void* grad_merged, const void* grad_weights,
                             const void* const* scores, const void* logits, const void* weights,
                             void* const* grad_scores, void* grad_logits) {
  return guarded([&] {
    scale_merge::cuda::Problem p = merge_problem(dt, mode, S, N, C, H, W);
    p.backward_layout = backward_layout;
    return scale_merge::cuda::launch_backward(p, grad_merged, grad_weights, scores, logits, weights, grad_scores,
                                              grad_logits, nullptr);
  });
}

// dilated_conv2d's direct kernels; shape: N, C, H, W, O, KH, KW, Ho, Wo, dilation, padding
namespace {
dilated_conv::ConvShape conv_shape(const int64_t* s) {
  return dilated_conv::ConvShape{s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8], s[9], s[10]};
}
dilated_conv::CudaDType conv_dtype(int d) { return static_cast<dilated_conv::CudaDType>(d); }
}  // namespace

int emu_dilated_conv_forward(int dt, const void* x, const void* wpack, const void* bias, void* out,
                             const int64_t* shape, int tensor_cores) {
  return guarded([&] {
    return dilated_conv::launch_dilated_conv_forward(conv_dtype(dt), x, wpack, bias, out, conv_shape(shape),
                                                     tensor_cores, nullptr);
  });
}

int emu_dilated_conv_backward_input(int dt, const void* grad_out, const void* wpack_t, void* grad_x,
                                    const int64_t* shape, int tensor_cores) {
  return guarded([&] {
    return dilated_conv::launch_dilated_conv_backward_input(conv_dtype(dt), grad_out, wpack_t, grad_x,
                                                            conv_shape(shape), tensor_cores, nullptr);
  });
}

int64_t emu_dilated_conv_workspace(int dt, const int64_t* shape, int tensor_cores) {
  return dilated_conv::dilated_conv_backward_weight_workspace(conv_shape(shape), conv_dtype(dt), tensor_cores);
}

int emu_dilated_conv_backward_weight(int dt, const void* grad_out, const void* x, void* grad_w, void* grad_b,
                                     float* workspace, const int64_t* shape, int tensor_cores) {
  return guarded([&] {
    return dilated_conv::launch_dilated_conv_backward_weight(conv_dtype(dt), grad_out, x, grad_w, grad_b, workspace,
                                                             conv_shape(shape), tensor_cores, nullptr);
  });
}

}  // extern "C"

// dilated_conv2d's GEMM path: its blocks (dilated_conv_blocks.h) and the copy kernels of each plan, as
// dilated_conv_gemm.cpp runs them.  geometry: N, C, H, W, O, Ho, Wo, KH, KW, dilation, pad_y, pad_x.
namespace {
dilated_conv::Blocks gemm_blocks(const int64_t* g) {
  return dilated_conv::make_blocks(g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7], g[8], {g[9], g[10], g[11]});
}

template <typename F>
int each_plan(const int64_t* geometry, F&& launch) {
  return guarded([&] {
    const dilated_conv::Blocks b = gemm_blocks(geometry);
    for (size_t i = 0; i < b.plans.size(); ++i) {
      const cudaError_t err = launch(b.plans[i], i);
      if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
  });
}
}  // namespace

extern "C" {

// [col_size, prod_size, part_size, covered, groups, then per group: members, m, k, col_base, prod_base,
// part_base]: the number of entries written, or -1 (the sizes exceed the copies' limits, or capacity).
int64_t emu_gemm_layout(const int64_t* geometry, int64_t* out, int64_t capacity) {
  const dilated_conv::Blocks b = gemm_blocks(geometry);
  const int64_t n = 5 + 6 * int64_t(b.groups.size());
  if (b.error != dilated_conv::BlockError::kNone || n > capacity) return -1;
  int64_t* o = out;
  *o++ = b.col_size, *o++ = b.prod_size, *o++ = b.part_size, *o++ = b.covered, *o++ = int64_t(b.groups.size());
  for (const dilated_conv::Group& g : b.groups) {
    *o++ = g.size(), *o++ = g.m, *o++ = g.k, *o++ = g.col_base, *o++ = g.prod_base, *o++ = g.part_base;
  }
  return n;
}

int emu_gemm_columns(int dt, const void* x, void* cols, const int64_t* geometry) {
  return each_plan(geometry, [&](const dilated_conv::PackPlan& p, size_t) {
    return dilated_conv::launch_pack_columns(conv_dtype(dt), x, cols, p, nullptr);
  });
}

// view: offset, so, sc, sy, sx (dilated_conv::WeightView)
int emu_gemm_weights(int dt, const void* w, const int64_t* view, void* wbuf, const int64_t* geometry) {
  const dilated_conv::WeightView v{view[0], view[1], view[2], view[3], view[4]};
  return each_plan(geometry, [&](const dilated_conv::PackPlan& p, size_t) {
    return dilated_conv::launch_weight_blocks(conv_dtype(dt), w, v, wbuf, p, nullptr);
  });
}

int emu_gemm_gather(int dt, const void* grad, void* prod, const int64_t* geometry) {
  return each_plan(geometry, [&](const dilated_conv::PackPlan& p, size_t) {
    return dilated_conv::launch_gather_output(conv_dtype(dt), grad, prod, p, nullptr);
  });
}

// The gather with the bias gradient (a geometry of one plan): the workspace's floats (0: it cannot serve),
// then the launch.
int64_t emu_gemm_gather_sum_workspace(int dt, const void* grad, const void* prod, const int64_t* geometry) {
  const dilated_conv::Blocks b = gemm_blocks(geometry);
  return b.plans.size() == 1 ? dilated_conv::gather_sum_workspace(conv_dtype(dt), grad, prod, b.plans[0]) : 0;
}

int emu_gemm_gather_sum(int dt, const void* grad, void* prod, float* workspace, void* bias_grad,
                        const int64_t* geometry) {
  return each_plan(geometry, [&](const dilated_conv::PackPlan& p, size_t) {
    return dilated_conv::launch_gather_output_sum(conv_dtype(dt), grad, prod, workspace, bias_grad, p, nullptr);
  });
}

int emu_gemm_scatter(int dt, const void* prod, const void* bias, void* out, const int64_t* geometry) {
  return each_plan(geometry, [&](const dilated_conv::PackPlan& p, size_t) {
    return dilated_conv::launch_scatter_output(conv_dtype(dt), prod, bias, out, p, nullptr);
  });
}

int emu_gemm_weight_gradient(int acc_dt, const void* parts, void* acc, const int64_t* geometry) {
  return each_plan(geometry, [&](const dilated_conv::PackPlan& p, size_t i) {
    return dilated_conv::launch_weight_gradient(conv_dtype(acc_dt), parts, acc, p, i > 0, nullptr);
  });
}

}  // extern "C"
