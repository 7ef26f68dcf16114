// OpenMP gathered cross-attention forward (csrc/cpu/gathered_cross_attention.cpp), the CPU twin of
// csrc/cuda/gathered_cross_attention.cu. Plain structs, no ATen types.
#pragma once

#include <cstdint>

#include "cpu/cross_attention.h"

namespace blip_fast::cpu {

struct GatheredCrossAttentionParams {
  Dtype dtype;                 // of q, the caches and out
  Operand q;                   // [P, H, Lq, D]
  Operand k_cache;             // [N_images, H, Lk, D]
  Operand v_cache;             // [N_images, H, Lk, D]
  const int64_t* image_index;  // [P], values in [0, N_images) (caller checks)
  void* out;                   // [P, H, Lq, D] contiguous
  float* lse;                  // [P, H, Lq] contiguous scratch for the row log-sum-exp
  int64_t pairs, heads, q_len, k_len, head_dim;
  double scale;
  int num_threads;             // OpenMP threads to use
};

// out = softmax(q kᵀ · scale) v with pair p's k / v = k_cache / v_cache[image_index[p]].
void gathered_cross_attention_fwd(const GatheredCrossAttentionParams& params);

}  // namespace blip_fast::cpu
