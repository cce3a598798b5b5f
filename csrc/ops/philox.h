// Counter-based random numbers for the dropout fused into attnscale::bias_relu: Philox4x32-10 (Salmon et al.,
// "Parallel random numbers: as easy as 1, 2, 3", SC'11; the generator behind cuRAND's and PyTorch's CUDA
// dropout), written once for the CPU loops and the CUDA kernels so that both draw the same mask.
//
// Element i (its index in the tensor's memory order) of a call with seed s is kept when word i % 4 of
// Philox4x32-10(counter = (i / 4 low, i / 4 high, 0, 0), key = (s low, s high)) is at least
// dropout(p).threshold = floor(p * 2^32): probability 1 - p exactly up to 2^-32.  Torch-free.
#pragma once

#include <cstdint>

#include "ops/host_device.h"

namespace attnscale {
namespace philox {

struct Words {
  uint32_t w[4];
};

ATTNSCALE_HD void mulhilo(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
  const uint64_t p = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(p >> 32);
  *lo = static_cast<uint32_t>(p);
}

// Philox4x32 with 10 rounds (Random123's constants).
ATTNSCALE_HD Words philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo(0xD2511F53u, c0, &hi0, &lo0);
    mulhilo(0xCD9E8D57u, c2, &hi1, &lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return Words{{c0, c1, c2, c3}};
}

// The four words of elements 4q .. 4q + 3 of a call with this seed.
ATTNSCALE_HD Words block(uint64_t seed, uint64_t q) {
  return philox4x32_10(static_cast<uint32_t>(q), static_cast<uint32_t>(q >> 32), 0u, 0u,
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// A dropout ratio p in [0, 1) as the kernels apply it: on when p > 0 (a p under 2^-32 keeps every unit, still
// scaled); an element kept when its word is >= threshold = floor(p * 2^32), times scale = 1 / (1 - p).
struct Dropout {
  bool on;
  uint32_t threshold;
  double scale;
};

inline Dropout dropout(double p) {
  const double t = p * 4294967296.0;
  const uint32_t threshold = !(p > 0) ? 0u : t >= 4294967295.0 ? 4294967295u : static_cast<uint32_t>(t);
  return Dropout{p > 0, threshold, 1.0 / (1.0 - p)};
}

}  // namespace philox
}  // namespace attnscale
