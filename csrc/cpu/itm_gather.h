// OpenMP gathered cross-attention forward (csrc/cpu/itm_gather.cpp), the CPU twin of
// csrc/cuda/itm_gather.cu. Plain structs, no ATen types.
#pragma once

#include <cstdint>

#include "cpu/cross_attention.h"

namespace blip_fast::cpu {

struct ItmGatherParams {
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
void itm_gather_fwd(const ItmGatherParams& params);

}  // namespace blip_fast::cpu
