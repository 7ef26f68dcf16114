// CUDA cross-attention forward (csrc/cuda/cross_attention.cu). Plain structs and raw pointers,
// no torch / ATen headers: the CPU torch wheel has none usable for CUDA, so this file and the .cu
// also compile on their own (CMakeLists.txt compile check for sm_90a).
#pragma once

#include <cuda_runtime_api.h>

#include "core/cross_attention.h"

namespace blip_fast::cuda {

// Largest head_dim the kernel accepts: its per-thread accumulators are sized for it.
constexpr int kMaxHeadDim = 128;
// Queries per thread block; the grid is (B · H, ceil(Lq / kQueriesPerBlock)), the latter
// limited to 65535 by CUDA.
constexpr int kQueriesPerBlock = 16;

// out, lse = softmax(q kᵀ · scale + mask) v and its row log-sum-exp on `stream`, in fp32 for
// fp32 / fp16 / bf16 (fp64: cudaErrorInvalidValue); masked keys get score − 10000 (official
// BERT). With kv_index, batch entry b attends over K / V row kv_index[b] (a device pointer).
// Needs head_dim <= kMaxHeadDim. Returns the launch error, if any.
cudaError_t cross_attention_fwd(const CrossAttentionFwdParams& params, cudaStream_t stream);

}  // namespace blip_fast::cuda
