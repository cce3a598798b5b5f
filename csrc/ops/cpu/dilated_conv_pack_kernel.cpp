// CPU loops of the GEMM path's copies (index maps in dilated_conv_pack.h, the same functions the
// CUDA kernels in cuda/dilated_conv_pack_kernel.cu run, so that the CPU tests check the GPU's
// arithmetic; not tuned for speed: the CPU's default is the direct kernel).  x, grad and out
// channels_last, the buffers contiguous.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstring>

#include "ops/dilated_conv_gemm.h"
#include "ops/dilated_conv_pack.h"

namespace attnscale {
namespace dilated_conv {
namespace {

constexpr int64_t kGrain = 64;  // block rows per task

void columns_cpu(const at::Tensor& x, at::Tensor& cols, const PackPlan& p) {
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dilated_conv2d_pack_columns", [&] {
    const scalar_t* src = x.data_ptr<scalar_t>();
    scalar_t* dst = cols.data_ptr<scalar_t>();
    for (int i = 0; i < p.num_rects; ++i) {
      const PackRect& r = p.rects[i];
      at::parallel_for(0, block_size(p, r) * r.taps.divisor, kGrain, [&](int64_t begin, int64_t end) {
        for (int64_t mt = begin; mt < end; ++mt) {
          std::memcpy(dst + r.col_offset + mt * p.C, src + column_pixel(p, r, uint32_t(mt)) * p.C,
                      sizeof(scalar_t) * p.C);
        }
      });
    }
  });
}

void weights_cpu(const at::Tensor& w, const WeightView& view, at::Tensor& wbuf, const PackPlan& p) {
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "dilated_conv2d_weight_blocks", [&] {
    const scalar_t* src = w.data_ptr<scalar_t>();
    scalar_t* dst = wbuf.data_ptr<scalar_t>();
    for (int i = 0; i < p.num_rects; ++i) {
      const PackRect& r = p.rects[i];
      const int64_t taps = r.taps.divisor;
      at::parallel_for(0, p.O * taps, 16, [&](int64_t begin, int64_t end) {
        for (int64_t ot = begin; ot < end; ++ot) {  // element (o, t * C + c) of the block
          const int64_t o = ot / taps, t = ot % taps;
          scalar_t* row = dst + r.part_offset + ot * p.C;
          for (int64_t c = 0; c < p.C; ++c) row[c] = src[weight_source(r, view, o, uint32_t(t), c)];
        }
      });
    }
  });
}

// Product rows <-> output pixels; TO_OUTPUT: product (+ bias) -> out, else out -> product.
template <bool TO_OUTPUT>
void output_blocks_cpu(const at::Tensor& src_t, const at::Tensor& bias, at::Tensor& dst_t, const PackPlan& p) {
  AT_DISPATCH_FLOATING_TYPES(src_t.scalar_type(), "dilated_conv2d_output_blocks", [&] {
    const scalar_t* src = src_t.data_ptr<scalar_t>();
    const scalar_t* b = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
    scalar_t* dst = dst_t.data_ptr<scalar_t>();
    for (int i = 0; i < p.num_rects; ++i) {
      const PackRect& r = p.rects[i];
      at::parallel_for(0, block_size(p, r), kGrain, [&](int64_t begin, int64_t end) {
        for (int64_t m = begin; m < end; ++m) {
          const int64_t pixel = output_pixel(p, r, uint32_t(m)) * p.O, row = r.prod_offset + m * p.O;
          if (TO_OUTPUT) {
            for (int64_t o = 0; o < p.O; ++o) dst[pixel + o] = b ? src[row + o] + b[o] : src[row + o];
          } else {
            std::memcpy(dst + row, src + pixel, sizeof(scalar_t) * p.O);
          }
        }
      });
    }
  });
}

bool gather_output_cpu(const at::Tensor& grad, at::Tensor& prod, at::Tensor* /*bias_grad*/, const PackPlan& p) {
  output_blocks_cpu<false>(grad, at::Tensor(), prod, p);
  return false;  // the caller sums the bias gradient
}

void scatter_output_cpu(const at::Tensor& prod, const at::Tensor& bias, at::Tensor& out, const PackPlan& p) {
  output_blocks_cpu<true>(prod, bias, out, p);
}

void weight_gradient_cpu(const at::Tensor& parts_t, at::Tensor& acc_t, const PackPlan& p, bool accumulate) {
  AT_DISPATCH_FLOATING_TYPES(acc_t.scalar_type(), "dilated_conv2d_weight_gradient", [&] {
    const scalar_t* parts = parts_t.data_ptr<scalar_t>();
    scalar_t* acc = acc_t.data_ptr<scalar_t>();
    const int64_t taps = p.KH * p.KW;
    at::parallel_for(0, p.O * taps, 16, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {  // (o, ky, kx)
        const int64_t o = row / taps, ky = row % taps / p.KW, kx = row % p.KW;
        scalar_t* dst = acc + row * p.C;
        for (int64_t c = 0; c < p.C; ++c) {
          scalar_t sum = 0;
          for (int j = 0; j < p.num_rects; ++j) {
            const int64_t src = part_row(p, p.rects[j], o, ky, kx);
            if (src >= 0) sum += parts[src + c];
          }
          dst[c] = accumulate ? dst[c] + sum : sum;
        }
      }
    });
  });
}

}  // namespace

const PackKernels& cpu_pack_kernels() {
  static const PackKernels kernels{&columns_cpu, &weights_cpu, &gather_output_cpu, &scatter_output_cpu,
                                   &weight_gradient_cpu};
  return kernels;
}

}  // namespace dilated_conv
}  // namespace attnscale
