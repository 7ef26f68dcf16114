// Parameters of the cross-attention forward, one struct for the CPU (csrc/cpu) and CUDA
// (csrc/cuda) launchers, filled by the host functions of cross_attention_fwd / _bwd and
// gathered_cross_attention_fwd / _bwd (csrc/ops). No torch / ATen headers (see types.h).
#pragma once

#include <cstdint>

#include "core/dropout.h"
#include "core/types.h"

namespace blip_fast {

struct CrossAttentionParams {
  Dtype dtype;  // of q, k, v and the outputs; fp64 computes in fp64, the others in fp32
  Operand q;    // [B, H, Lq, D]
  Operand k;    // [N, H, Lk, D], N = B without kv_index
  Operand v;    // [N, H, Lk, D]
  const bool* key_padding_mask;  // [B, Lk] contiguous, true = attend; nullptr = attend to all
  int64_t batch, heads, q_len, k_len, head_dim;
  double scale;  // applied to q·k before the mask is added (in fp32 on CUDA)
  // [B] K / V row of each batch entry, for gathered cross-attention (ITM reranking: P pairs over
  // N cached images), values in [0, N) (the caller checks); nullptr = row b. The CUDA kernels
  // have a forward only; the CPU backward takes it without a key_padding_mask.
  const int64_t* kv_index = nullptr;
  // Causal self-attention, bottom-right aligned: query i sees keys j <= Lk − Lq + i (a decoder
  // over a KV cache); a key masked by both masks gets −10000 once, as official BERT's
  // (1 − causal · padding) · −10000. CPU kernels only, and never with kv_index.
  bool causal = false;
  // Attention-probability dropout (core/dropout.h), the element of (batch entry b, head h,
  // query i, key j) counted as ((b·H + h)·Lq + i)·Lk + j. CPU kernels only.
  Dropout dropout;
};

struct CrossAttentionFwdParams : CrossAttentionParams {
  void* out;   // [B, H, Lq, D] contiguous
  float* lse;  // [B, H, Lq] contiguous: log Σ_j exp(score_ij)
};

}  // namespace blip_fast
