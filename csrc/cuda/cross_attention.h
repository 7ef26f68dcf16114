// CUDA cross-attention forward (csrc/cuda/cross_attention.cu). Plain structs and raw pointers,
// no torch / ATen headers: the CPU torch wheel has none usable for CUDA, so this file and the .cu
// also compile on their own (CMakeLists.txt compile check for sm_90a).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace blip_fast::cuda {

enum class Dtype { kFloat32, kFloat16, kBFloat16 };

// Largest head_dim the kernel accepts: its per-thread accumulators are sized for it.
constexpr int kMaxHeadDim = 128;
// Queries per thread block; the grid is (B · H, ceil(Lq / kQueriesPerBlock)), the latter
// limited to 65535 by CUDA.
constexpr int kQueriesPerBlock = 16;

// A [B, H, L, D] tensor whose last dim is contiguous; strides in elements.
struct Operand {
  const void* data;
  int64_t batch_stride, head_stride, row_stride;
};

struct CrossAttentionParams {
  Dtype dtype;                   // of q, k, v and out; the kernel computes in fp32
  Operand q;                     // [B, H, Lq, D]
  Operand k;                     // [B, H, Lk, D]
  Operand v;                     // [B, H, Lk, D]
  const bool* key_padding_mask;  // [B, Lk] contiguous, true = attend; nullptr = attend to all
  void* out;                     // [B, H, Lq, D] contiguous
  float* lse;                    // [B, H, Lq] contiguous: log Σ_j exp(score_ij)
  int64_t batch, heads, q_len, k_len;
  int head_dim;                  // 1 .. kMaxHeadDim
  float scale;                   // applied to q·k before the mask is added
  // [B] K / V row of each batch entry (gathered cross-attention, cuda/gathered_cross_attention.h): k / v then
  // have any batch size N and entry b reads row kv_index[b]; nullptr = row b.
  const int64_t* kv_index = nullptr;
};

// out, lse = softmax(q kᵀ · scale + mask) v and its row log-sum-exp on `stream`; masked keys
// get score − 10000 (official BERT). Returns the launch error, if any.
cudaError_t cross_attention_fwd(const CrossAttentionParams& params, cudaStream_t stream);

}  // namespace blip_fast::cuda
