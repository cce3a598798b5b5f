// Split a run of values into its even- and odd-indexed elements: e[t] = src[2t], o[t] = src[2t + 1] for
// t in [0, n).  The compilers' own version of this loop uses AVX2 gathers, which are slow on many x86
// cores; with AVX2 this does 16 floats per step with two in-lane shuffles and a cross-lane permute.
// Used by the stride-2 windows of the Winograd input transform and of the max pooling.
#pragma once

#include <type_traits>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace attnscale {

template <typename T>
inline void split_even_odd(const T* __restrict src, int n, T* __restrict e, T* __restrict o) {
  int t = 0;
#if defined(__AVX2__)
  if constexpr (std::is_same<T, float>::value) {
    for (; t + 8 <= n; t += 8) {
      const __m256 a = _mm256_loadu_ps(src + 2 * t), b = _mm256_loadu_ps(src + 2 * t + 8);
      const __m256 ev = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0));  // a0 a2 b0 b2 | a4 a6 b4 b6
      const __m256 ov = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1));
      _mm256_storeu_ps(e + t, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(ev), 0xD8)));
      _mm256_storeu_ps(o + t, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(ov), 0xD8)));
    }
  }
#endif
  for (; t < n; ++t) {
    e[t] = src[2 * t];
    o[t] = src[2 * t + 1];
  }
}

}  // namespace attnscale
