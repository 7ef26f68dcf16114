// OpenMP cross-attention kernels (csrc/cpu/cross_attention.cpp). Plain structs, no ATen types:
// the torch-typed host functions in csrc/ops/cross_attention.cpp check the tensors and fill these.
#pragma once

#include <cstdint>

namespace blip_fast::cpu {

enum class Dtype { kFloat32, kFloat64, kFloat16, kBFloat16 };

// A [B, H, L, D] tensor whose last dim is contiguous; strides in elements.
struct Operand {
  const void* data;
  int64_t batch_stride, head_stride, row_stride;
};

struct CrossAttentionParams {
  Dtype dtype;      // of q, k, v, dout, out and of dq, dk, dv; fp32 / fp64 compute in their own
                    // precision, fp16 / bf16 in fp32
  Operand q;        // [B, H, Lq, D]
  Operand k;        // [B, H, Lk, D]
  Operand v;        // [B, H, Lk, D]
  const bool* key_padding_mask;  // [B, Lk] contiguous, true = attend; nullptr = attend to all
  int64_t batch, heads, q_len, k_len, head_dim;
  double scale;     // applied to q·k before the mask is added
  int num_threads;  // OpenMP threads to use (the caller passes torch's setting)
  // [B] K / V row of each batch entry (gathered cross-attention, cpu/gathered_cross_attention.h): k / v then
  // have any batch size N and entry b reads row kv_index[b]; nullptr = row b. Forward only.
  const int64_t* kv_index = nullptr;
};

struct CrossAttentionFwdParams : CrossAttentionParams {
  void* out;   // [B, H, Lq, D] contiguous
  float* lse;  // [B, H, Lq] contiguous: log Σ_j exp(score_ij)
};

struct CrossAttentionBwdParams : CrossAttentionParams {
  Operand dout;      // [B, H, Lq, D]
  Operand out;       // [B, H, Lq, D], the forward's output
  const float* lse;  // [B, H, Lq] contiguous, the forward's lse
  void* dq;          // [B, H, Lq, D] contiguous
  void* dk;          // [B, H, Lk, D] contiguous
  void* dv;          // [B, H, Lk, D] contiguous
};

// out, lse = softmax(q kᵀ · scale + mask) v and its row log-sum-exp; masked keys get
// score − 10000 (official BERT), so a fully masked row still averages its keys.
void cross_attention_fwd(const CrossAttentionFwdParams& params);

// dq, dk, dv of cross_attention_fwd, recomputing the probabilities from lse.
void cross_attention_bwd(const CrossAttentionBwdParams& params);

}  // namespace blip_fast::cpu
