// CUDA gathered cross-attention forward of batched ITM reranking (DESIGN §6.3): the text
// queries of P (text, image) pairs attend over the cached K / V of their image, read in place at
// row image_index[p] of [N_images, H, Lk, D] caches, never copied per pair. Raw pointers and
// cudaStream_t, no torch / ATen headers (see cross_attention.h).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "cuda/cross_attention.h"

namespace blip_fast::cuda {

struct GatheredCrossAttentionParams {
  Dtype dtype;                 // of q, the caches and out; fp32 compute
  Operand q;                   // [P, H, Lq, D]
  Operand k_cache;             // [N_images, H, Lk, D]
  Operand v_cache;             // [N_images, H, Lk, D]
  const int64_t* image_index;  // [P] device pointer, values in [0, N_images) (caller checks)
  void* out;                   // [P, H, Lq, D] contiguous
  float* lse;                  // [P, H, Lq] contiguous scratch for the row log-sum-exp
  int64_t pairs, heads, q_len, k_len;
  int head_dim;                // 1 .. kMaxHeadDim
  float scale;
};

// out = softmax(q kᵀ · scale) v with pair p's k / v = k_cache / v_cache[image_index[p]], on
// `stream`; one block per (pair · head, tile of kQueriesPerBlock queries). Returns the launch
// error, if any.
cudaError_t gathered_cross_attention_fwd(const GatheredCrossAttentionParams& params, cudaStream_t stream);

}  // namespace blip_fast::cuda
