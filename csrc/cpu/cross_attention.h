// OpenMP cross-attention kernels (csrc/cpu/cross_attention.cpp). Plain structs, no ATen types:
// the torch-typed host functions in csrc/ops/ check the tensors and fill these.
#pragma once

#include "core/cross_attention.h"

namespace blip_fast::cpu {

struct CrossAttentionBwdParams : CrossAttentionParams {
  int64_t kv_batch;  // N, the K / V rows: the images with kv_index, else B
  Operand dout;      // [B, H, Lq, D]
  Operand out;       // [B, H, Lq, D], the forward's output
  const float* lse;  // [B, H, Lq] contiguous, the forward's lse
  void* dq;          // [B, H, Lq, D] contiguous
  void* dk;          // [N, H, Lk, D] contiguous
  void* dv;          // [N, H, Lk, D] contiguous
};

// out, lse = softmax(q kᵀ · scale + mask) v and its row log-sum-exp on `num_threads` OpenMP
// threads; masked keys get score − 10000 (official BERT), so a fully masked row still averages
// its keys. With kv_index, batch entry b attends over K / V row kv_index[b].
void cross_attention_fwd(const CrossAttentionFwdParams& params, int num_threads);

// dq, dk, dv of cross_attention_fwd, recomputing the probabilities from lse. With kv_index
// (and no key_padding_mask), dk / dv of row n sum over every batch entry that reads it, and are
// 0 for a row none reads.
void cross_attention_bwd(const CrossAttentionBwdParams& params, int num_threads);

}  // namespace blip_fast::cpu
