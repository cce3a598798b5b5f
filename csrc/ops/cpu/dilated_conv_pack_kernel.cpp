// CPU loops of the GEMM path's copies (index maps in dilated_conv_pack.h, the same functions the
// CUDA kernels in cuda/dilated_conv_pack_kernel.cu run, per element, so that the CPU tests check the
// GPU's arithmetic; not tuned for speed: the CPU's default is the direct kernel).  All tensors are
// contiguous.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "ops/dilated_conv_gemm.h"
#include "ops/dilated_conv_pack.h"

namespace attnscale {
namespace dilated_conv {
namespace {

constexpr int64_t kGrain = 16;  // block rows per task

// Calls f(rect, row, M) for every row of every block of the plan, rows in parallel.
template <typename F>
void for_block_rows(const PackPlan& p, bool output_rows, const F& f) {
  for (int i = 0; i < p.num_rects; ++i) {
    const PackRect& r = p.rects[i];
    const int64_t rows = output_rows ? p.O : column_rows(p, r);
    at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) f(r, row, block_size(p, r));
    });
  }
}

void columns_cpu(const at::Tensor& x, at::Tensor& cols, const PackPlan& p) {
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dilated_conv2d_pack_columns", [&] {
    const scalar_t* src = x.data_ptr<scalar_t>();
    scalar_t* dst = cols.data_ptr<scalar_t>();
    for_block_rows(p, false, [&](const PackRect& r, int64_t k, int64_t M) {
      const int64_t row_source = column_row_source(p, r, uint32_t(k));
      scalar_t* out = dst + r.col_offset + k * r.ld;
      for (int64_t m = 0; m < M; ++m) out[m] = src[column_source(p, r, row_source, uint32_t(m))];
    });
  });
}

void gather_output_cpu(const at::Tensor& grad, at::Tensor& prod, const PackPlan& p) {
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "dilated_conv2d_gather_output", [&] {
    const scalar_t* src = grad.data_ptr<scalar_t>();
    scalar_t* dst = prod.data_ptr<scalar_t>();
    for_block_rows(p, true, [&](const PackRect& r, int64_t o, int64_t M) {
      scalar_t* out = dst + r.prod_offset + o * r.ld;
      for (int64_t m = 0; m < M; ++m) out[m] = src[output_offset(p, r, o, uint32_t(m))];
    });
  });
}

void scatter_output_cpu(const at::Tensor& prod, const at::Tensor& bias, at::Tensor& out, const PackPlan& p) {
  AT_DISPATCH_FLOATING_TYPES(prod.scalar_type(), "dilated_conv2d_scatter_output", [&] {
    const scalar_t* src = prod.data_ptr<scalar_t>();
    const scalar_t* b = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
    scalar_t* dst = out.data_ptr<scalar_t>();
    for_block_rows(p, true, [&](const PackRect& r, int64_t o, int64_t M) {
      const scalar_t* in = src + r.prod_offset + o * r.ld;
      const scalar_t add = b ? b[o] : scalar_t(0);
      for (int64_t m = 0; m < M; ++m) dst[output_offset(p, r, o, uint32_t(m))] = in[m] + add;
    });
  });
}

}  // namespace

const PackKernels& cpu_pack_kernels() {
  static const PackKernels kernels{&columns_cpu, &gather_output_cpu, &scatter_output_cpu};
  return kernels;
}

}  // namespace dilated_conv
}  // namespace attnscale
