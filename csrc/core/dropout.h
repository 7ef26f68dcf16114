// Attention-probability dropout drawn from a counter-based hash instead of a stored mask, so a
// backward regenerates the forward's mask from the seed (FlashAttention's choice). The same
// function is written in PyTorch (blip_fast/ops/reference.py, dropout_keep) and Triton
// (kernels/cross_attention.py, _dropout_keep): every backend drops the same elements.
// Element c of a [B, H, Lq, Lk] probability tensor (row-major linear index) is kept iff
// bits(c, seed) >= threshold, threshold = round(p · 2^32).
#pragma once

#include <cmath>
#include <cstdint>

namespace blip_fast {

struct Dropout {
  double p = 0.0;          // probability of dropping; 0 = no dropout
  uint64_t seed = 0;       // from a 1-element int64 tensor the caller draws
  uint32_t threshold = 0;  // keep iff bits >= threshold
};

inline Dropout make_dropout(double p, uint64_t seed) {
  const double t = std::nearbyint(p * 4294967296.0);
  return {p, seed,
          static_cast<uint32_t>(t >= 4294967295.0 ? 4294967295.0 : t)};
}

// A 32-bit integer hash with low bias (C. Wellons' "lowbias32", constants of 2022).
inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x21f0aaadu;
  x ^= x >> 15;
  x *= 0xd35a2d97u;
  x ^= x >> 15;
  return x;
}

inline uint32_t dropout_bits(uint64_t counter, uint64_t seed) {
  const uint32_t lo = mix32(static_cast<uint32_t>(counter) ^ static_cast<uint32_t>(seed));
  return mix32(lo ^ static_cast<uint32_t>(seed >> 32) ^ static_cast<uint32_t>(counter >> 32));
}

}  // namespace blip_fast
