// The large float32 GEMMs of the CPU kernels (Winograd's products, fc6's live-tap products): by
// oneDNN or by the BLAS behind at::mm (MKL on the x86 wheels).
//
// Why two: on AMD CPUs with AVX-512 MKL runs its AVX2 code (about 105 GFLOP/s per core on a Zen 5 EPYC)
// while oneDNN's JIT kernels run AVX-512 (about 230), so there oneDNN; on AVX2 CPUs MKL.  oneDNN is
// reached through PyTorch's own operator mkldnn::_linear_pointwise (its symbols are not exported):
// Y = X W^T for X with unit column stride and a dense (row- or column-major) W, float32, IEEE arithmetic
// (no reduced-precision mode).
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace attnscale {
namespace cpu_gemm {

enum class Backend { kBlas = 0, kOneDnn = 1 };

// The backend in use: ATTNSCALE_CPU_GEMM=blas|onednn, else oneDNN on CPUs with AVX-512 (F, BW, DQ, VL)
// whose PyTorch has the operator, else the BLAS.  set_backend changes it for the process (tests,
// benchmarks) and returns the previous one; oneDNN without the operator is refused.
Backend backend();
Backend set_backend(Backend b);
bool onednn_available();
const char* name(Backend b);
// Whether large products of this dtype go to oneDNN now (float32 and the oneDNN backend).
bool uses_onednn(at::ScalarType dtype);

// out = a @ b (accumulate: out += a @ b) for 2-D float32 / float64 views with any strides; float64
// and products under ~2^22 multiply-adds always take at::mm.  Safe inside at::parallel_for (oneDNN
// and MKL then run on the calling thread).
void matmul_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate);

// The products a[i] @ b[i] of 3-D tensors, each a dense row-major matrix: with the BLAS the slices of
// `out` (at::bmm_out), with oneDNN its own results (no copy into `out`).
std::vector<at::Tensor> batched_products(const at::Tensor& a, const at::Tensor& b, at::Tensor& out);

}  // namespace cpu_gemm
}  // namespace attnscale
