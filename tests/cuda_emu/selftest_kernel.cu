// Kernels that check the emulator itself (tests/test_cuda_emulated.py): warp shuffles and a block barrier
// give a known sum; a write one past the end must be caught; lanes of one warp split between a barrier and
// a shuffle must be reported as a deadlock.
#include <cuda_runtime.h>

#include <cstdint>

namespace {

__global__ void block_sum_kernel(const float* x, float* block_sums, float* lane_sums, int n) {
  __shared__ float warp_sums[32];
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const float v = i < n ? x[i] : 0.f;
  float down = v, all = v;
  for (int off = 16; off > 0; off >>= 1) down += __shfl_down_sync(0xffffffffu, down, off);
  for (int m = 16; m > 0; m >>= 1) all += __shfl_xor_sync(0xffffffffu, all, m);
  if (i < n) lane_sums[i] = all;  // every lane holds its warp's sum
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = down;
  __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0;
    for (int w = 0; w < static_cast<int>(blockDim.x) / 32; ++w) s += warp_sums[w];
    block_sums[blockIdx.x] = s;
  }
}

__global__ void one_past_the_end_kernel(float* y, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i <= n) y[i] = 1.f;  // the bug: <= n
}

__global__ void split_warp_kernel(float* y) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    y[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1.f, 1);
  }
}

}  // namespace

extern "C" int emu_selftest_block_sum(const float* x, float* block_sums, float* lane_sums, int n, int threads) {
  block_sum_kernel<<<(n + threads - 1) / threads, threads>>>(x, block_sums, lane_sums, n);
  return static_cast<int>(cudaGetLastError());
}

extern "C" int emu_selftest_one_past_the_end(float* y, int n) {
  one_past_the_end_kernel<<<(n + 63) / 64 + 1, 64>>>(y, n);
  return static_cast<int>(cudaGetLastError());
}

extern "C" int emu_selftest_split_warp(float* y) {
  try {
    split_warp_kernel<<<1, 64>>>(y);
  } catch (...) {
    return -1;
  }
  return static_cast<int>(cudaGetLastError());
}

extern "C" int emu_selftest_bad_config(float* y) {
  split_warp_kernel<<<1, 2048>>>(y);  // more threads than a block may have
  return static_cast<int>(cudaGetLastError());
}
