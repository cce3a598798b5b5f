// ATTNSCALE_HD: functions shared by CPU loops and CUDA kernels (host and device under nvcc, plain
// inline functions in the C++ build).
#pragma once

#if defined(__CUDACC__)
#define ATTNSCALE_HD __host__ __device__ __forceinline__
#else
#define ATTNSCALE_HD inline
#endif
