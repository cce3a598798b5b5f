// A CPU stand-in for the CUDA runtime, enough to run attnscale's kernel sources (csrc/ops/cuda/*_kernel.cu)
// on a machine without a GPU.  tests/cuda_emu/build.py rewrites each `kernel<<<config>>>(args)` into
// `::emu::launch(::emu::config(config), "kernel", kernel, args)` and compiles the file with the host compiler,
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
#include <string>
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

// appends the kernel's name (as the launch wrote it) to the log that emu_launches() returns
void record_launch(const char* name);
extern std::string launch_log;

template <typename... P, typename... A>
void launch(const Config& c, const char* name, void (*kernel)(P...), A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong number of arguments");
  record_launch(name);
  std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);  // the conversions of a real launch
  run(c, [&] { std::apply(kernel, params); });
}

void syncthreads();
void syncwarp();  // every live lane of the calling thread's warp
cudaError_t get_last_error(bool clear);
int lane();
unsigned long long* warp_slots();  // one 8-byte slot per thread of the block

// A full-warp shuffle: every lane publishes v, waits for its warp, reads the value of lane
// source_lane(lane, arg, width) (its own where that lane is past the block's last thread), waits again.
template <typename T>
T shfl(unsigned mask, T v, int source_lane(int lane, int arg, int width), int arg, int width) {
  static_assert(sizeof(T) <= 8, "shuffle of a type over 8 bytes");
  if (mask != 0xffffffffu) throw std::logic_error("emu: only full-warp shuffles are emulated");
  unsigned long long* slots = warp_slots();
  const int me = static_cast<int>(thread_idx.x + block_dim.x * (thread_idx.y + block_dim.y * thread_idx.z));
  const int threads = static_cast<int>(block_dim.x * block_dim.y * block_dim.z);
  const int base = me - lane();
  std::memcpy(&slots[me], &v, sizeof(T));
  syncwarp();
  const int src = base + source_lane(lane(), arg, width);
  T r = v;
  if (src < threads) std::memcpy(&r, &slots[src], sizeof(T));
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

// nvcuda::wmma (mma.h declares it for nvcc only): a fragment holds its whole tile in every lane (float
// values: tf32, bfloat16 and half convert exactly), so each lane's load, multiply-add and store is the
// warp's collective result; the products are summed in float in k order (the tensor cores' order and
// internal precision are unspecified: compare with a tolerance).
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
namespace precision {
struct tf32 {};
}  // namespace precision
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K>
struct tile_shape;
template <int M, int N, int K>
struct tile_shape<matrix_a, M, N, K> {
  static constexpr int rows = M, cols = K;
};
template <int M, int N, int K>
struct tile_shape<matrix_b, M, N, K> {
  static constexpr int rows = K, cols = N;
};
template <int M, int N, int K>
struct tile_shape<accumulator, M, N, K> {
  static constexpr int rows = M, cols = N;
};

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int rows = tile_shape<Use, M, N, K>::rows, cols = tile_shape<Use, M, N, K>::cols;
  float v[rows][cols];
};

inline float to_float_(float v) { return v; }
inline float to_float_(__half v) { return __half2float(v); }
inline float to_float_(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename Use, int M, int N, int K, typename T, typename L, typename S>
void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const S* p, unsigned ldm) {
  static_assert(!std::is_same<L, col_major>::value, "emu: only row_major operands are emulated");
  for (int r = 0; r < f.rows; ++r)
    for (int c = 0; c < f.cols; ++c) f.v[r][c] = to_float_(p[static_cast<size_t>(r) * ldm + c]);
}

template <int M, int N, int K, typename T>
void fill_fragment(fragment<accumulator, M, N, K, T>& f, float x) {
  for (auto& row : f.v)
    for (auto& e : row) e = x;
}

template <int M, int N, int K, typename TA, typename LA, typename TB, typename LB, typename TC>
void mma_sync(fragment<accumulator, M, N, K, TC>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
              const fragment<matrix_b, M, N, K, TB, LB>& b, const fragment<accumulator, M, N, K, TC>& c) {
  fragment<accumulator, M, N, K, TC> r;
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float s = c.v[i][j];
      for (int k = 0; k < K; ++k) s += a.v[i][k] * b.v[k][j];
      r.v[i][j] = s;
    }
  d = r;
}

template <int M, int N, int K, typename T>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm, layout_t layout) {
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j)
      p[layout == mem_row_major ? static_cast<size_t>(i) * ldm + j : static_cast<size_t>(j) * ldm + i] = f.v[i][j];
}

// round to nearest, ties away from zero, keeping 10 mantissa bits (cvt.rna.tf32.f32)
inline float __float_to_tf32(float x) {
  if (!std::isfinite(x)) return x;
  uint32_t u;
  std::memcpy(&u, &x, 4);
  u = (u + 0x1000u) & ~0x1FFFu;
  std::memcpy(&x, &u, 4);
  return x;
}
}  // namespace wmma
}  // namespace nvcuda

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
#undef __grid_constant__
#define __grid_constant__
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
