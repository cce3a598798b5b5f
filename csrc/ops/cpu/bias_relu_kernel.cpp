// CPU kernels of attnscale::bias_relu / bias_relu_backward (float, double), NCHW or channels_last: plain
// loops, the twin of the CUDA kernels (the model fuses the bias and the ReLU on a GPU only; on the CPU
// oneDNN's convolution adds the bias itself).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "ops/bias_relu.h"
#include "ops/philox.h"

namespace attnscale {
namespace bias_relu {
namespace {

void check_cpu(const char* op, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": dtype ",
                    t.scalar_type(), " is not supported on the CPU (float32 or float64)");
}

// channel of flat element e: NHWC e % C, NCHW (e / HW) % C
inline int64_t channel_of(int64_t e, int64_t C, int64_t HW, bool nhwc) { return nhwc ? e % C : (e / HW) % C; }

at::Tensor bias_relu_cpu(const at::Tensor& x_in, const at::Tensor& bias_in, double p, int64_t seed) {
  check_forward(x_in, bias_in, p);
  check_cpu("bias_relu", x_in);
  const auto fmt = layout_of(x_in);
  const at::Tensor x = x_in.contiguous(fmt), bias = bias_in.contiguous();
  at::Tensor out = at::empty_like(x, x.options().memory_format(fmt));
  const int64_t C = x.size(1), HW = x.size(2) * x.size(3), total = x.numel();
  const bool nhwc = fmt == at::MemoryFormat::ChannelsLast;
  const philox::Dropout d = philox::dropout(p);
  const uint64_t key = static_cast<uint64_t>(seed);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bias_relu_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* bp = bias.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const scalar_t scale = static_cast<scalar_t>(d.scale);
    // chunks of whole Philox blocks (4 elements), so that each block is drawn once
    at::parallel_for(0, (total + 3) / 4, 8192, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        const philox::Words r = d.on ? philox::block(key, static_cast<uint64_t>(q)) : philox::Words{};
        for (int64_t i = 4 * q; i < std::min(4 * q + 4, total); ++i) {
          const scalar_t v = xp[i] + bp[channel_of(i, C, HW, nhwc)];
          const scalar_t y = (v > 0 || v != v) ? v : scalar_t(0);  // torch.relu: NaN stays NaN
          op[i] = !d.on ? y : r.w[i & 3] >= d.threshold ? y * scale : scalar_t(0);
        }
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> bias_relu_backward_cpu(const at::Tensor& grad_in, const at::Tensor& out_in,
                                                          at::ScalarType bias_dtype, double scale_in) {
  check_backward(grad_in, out_in, bias_dtype, scale_in);
  check_cpu("bias_relu_backward", out_in);
  const auto fmt = layout_of(out_in);
  const at::Tensor g = grad_in.contiguous(fmt), out = out_in.contiguous(fmt);
  at::Tensor gx = at::empty_like(out, out.options().memory_format(fmt));
  at::Tensor gb = at::empty({out.size(1)}, out.options());
  const int64_t N = out.size(0), C = out.size(1), HW = out.size(2) * out.size(3), total = out.numel();
  const bool nhwc = fmt == at::MemoryFormat::ChannelsLast;
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "bias_relu_backward_cpu", [&] {
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* op = out.data_ptr<scalar_t>();
    scalar_t* xp = gx.data_ptr<scalar_t>();
    scalar_t* bp = gb.data_ptr<scalar_t>();
    const scalar_t scale = static_cast<scalar_t>(scale_in);
    at::parallel_for(0, total, 32768, [&](int64_t b, int64_t e) {
      // F.relu's threshold_backward (out is 0 where dropout dropped the unit); F.dropout's scale where kept
      for (int64_t i = b; i < e; ++i) xp[i] = op[i] <= 0 ? scalar_t(0) : gp[i] * scale;
    });
    // the bias gradient: each channel summed in a fixed order (n, then pixels), whatever the thread count
    at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
      std::vector<scalar_t> acc(static_cast<size_t>(c1 - c0), scalar_t(0));
      for (int64_t n = 0; n < N; ++n)
        for (int64_t q = 0; q < HW; ++q)
          for (int64_t c = c0; c < c1; ++c)
            acc[c - c0] += xp[nhwc ? (n * HW + q) * C + c : (n * C + c) * HW + q];
      std::copy(acc.begin(), acc.end(), bp + c0);
    });
  });
  return {gx, gb};
}

}  // namespace
}  // namespace bias_relu
}  // namespace attnscale

TORCH_LIBRARY_IMPL(attnscale, CPU, m) {
  m.impl("bias_relu", &attnscale::bias_relu::bias_relu_cpu);
  m.impl("bias_relu_backward", &attnscale::bias_relu::bias_relu_backward_cpu);
}
