// A CPU stand-in for the CUDA runtime, enough to run attnscale's kernel sources (csrc/ops/cuda/*_kernel.cu)
// on a machine without a GPU.  tests/cuda_emu/build.py rewrites each `kernel<<<config>>>(args)` into
// `::emu::launch(::emu::config(config), kernel, args)` and compiles the file with the host compiler,
// this header forced in first (-include).
//
// Execution model: the blocks of a grid run one after another; the threads of a block are fibers
// (ucontext) on one OS thread, each run until it finishes or reaches __syncthreads() / a warp shuffle, then
// the next.  So barriers, shared memory and warp shuffles behave as CUDA defines them for code without
// data races, and a thread that reads shared memory before the barrier that publishes it sees stale data
// as on a GPU.  Not emulated: memory-model subtleties, warp-synchronous code without __sync intrinsics,
// atomics, device-only arithmetic (the _rn intrinsics are the IEEE operations; nvcc's FMA contraction of
// a * b + c is not: this file is compiled with -ffp-contract=off).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <tuple>
#include <type_traits>
#include <utility>

namespace emu {

extern uint3 thread_idx, block_idx;
extern dim3 block_dim, grid_dim;
extern unsigned char* dynamic_smem;  // the launch's `extern __shared__` bytes (16-byte aligned)

struct Config {
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
};
inline Config config(dim3 grid, dim3 block, size_t smem = 0, cudaStream_t stream = nullptr) {
  return Config{grid, block, smem, stream};
}

// runs body once per thread of the grid; an invalid configuration sets the error, as a launch would
void run(const Config& c, const std::function<void()>& body);

template <typename... P, typename... A>
void launch(const Config& c, void (*kernel)(P...), A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong number of arguments");
  std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);  // the conversions of a real launch
  run(c, [&] { std::apply(kernel, params); });
}

void syncthreads();
void syncwarp();  // every live lane of the calling thread's warp
cudaError_t get_last_error(bool clear);
int lane();
unsigned long long* warp_slots();  // one 8-byte slot per thread of the block

template <typename T>
T shfl(unsigned mask, T v, int src_lane_of_mine_fn(int lane, int arg, int width), int arg, int width) {
  static_assert(sizeof(T) <= 8, "shuffle of a type over 8 bytes");
  if (mask != 0xffffffffu) throw std::logic_error("emu: only full-warp shuffles are emulated");
  unsigned long long* slots = warp_slots();
  const int me = static_cast<int>(thread_idx.x + block_dim.x * (thread_idx.y + block_dim.y * thread_idx.z));
  const int base = me - lane();
  std::memcpy(&slots[me], &v, sizeof(T));
  syncwarp();
  const int src = src_lane_of_mine_fn(lane(), arg, width);
  T r;
  std::memcpy(&r, &slots[base + src], sizeof(T));
  syncwarp();
  return r;
}
inline int down_lane(int lane, int delta, int width) {
  return (lane % width) + delta < width ? lane + delta : lane;
}
inline int xor_lane(int lane, int m, int width) {
  const int src = lane ^ m;
  return (src / width == lane / width) ? src : lane;
}

}  // namespace emu

#ifndef EMU_RUNTIME
// the built-in variables and qualifiers as host code
#define threadIdx (::emu::thread_idx)
#define blockIdx (::emu::block_idx)
#define blockDim (::emu::block_dim)
#define gridDim (::emu::grid_dim)
#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __host__
#define __host__
#undef __forceinline__
#define __forceinline__ inline
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __shared__
#define __shared__ static  // one copy, and blocks run one at a time
#define __syncthreads() ::emu::syncthreads()
#define cudaGetLastError() ::emu::get_last_error(true)
#define cudaPeekAtLastError() ::emu::get_last_error(false)

template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::emu::shfl(mask, v, ::emu::down_lane, static_cast<int>(delta), width);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return ::emu::shfl(mask, v, ::emu::xor_lane, lane_mask, width);
}

// device arithmetic: IEEE round-to-nearest operations
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline float __int_as_float(int v) { float f; std::memcpy(&f, &v, 4); return f; }
inline double __longlong_as_double(long long v) { double d; std::memcpy(&d, &v, 8); return d; }
inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<unsigned long long>(a) * b) >> 32);
}
inline int max(int a, int b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
#endif  // EMU_RUNTIME
