// CUDA forward of the fused ITC loss (csrc/cuda/itc.cu). Plain structs and raw pointers, no
// torch / ATen headers, so the .cu compiles on its own (CMakeLists.txt compile check). The
// backward on CUDA runs the Triton kernel (kernels/itc.py, registered for blip_fast::itc_bwd's
// CUDA key in blip_fast/ops/itc.py), or the eager tiled kernel where Triton is missing.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "core/types.h"

namespace blip_fast::cuda {

// Rows per thread block (each column is read once per block and used for all its rows) and
// threads per block (one column per thread per step). Not tuned on hardware yet.
constexpr int kItcRows = 8;
constexpr int kItcThreads = 256;

// One direction (i2t or t2i) of the loss.
struct ItcFwdParams {
  Dtype dtype;               // of x, x_m, feat_m and queue; fp32 compute (fp64: no kernel)
  const void* x;             // [B, D] student rows, row stride x_stride, last dim contiguous
  const void* x_m;           // [B, D] teacher rows, row stride x_m_stride
  const void* feat_m;        // [B, D] batch part of the columns, row stride feat_m_stride
  const void* queue;         // [D, Q] queue part of the columns, strides queue_stride0 / 1
  int64_t x_stride, x_m_stride, feat_m_stride, queue_stride0, queue_stride1;
  const int64_t* idx;        // [B] image ids, or nullptr: hard targets = identity over batch
  const int64_t* idx_all;    // [B + Q] = [idx ; idx_queue], or nullptr with idx
  const float* temp;         // [1] on the device
  float alpha;               // 0 skips the teacher
  int64_t batch, queue_len;  // B, Q
  int dim;                   // D; shared memory holds 2 · kItcRows · D floats
  float* stats;              // [B, stats_ld]: lse_s, lse_t, hard count in columns 0..2
  int64_t stats_ld;
  float* rows;               // [B]: lse_s − alpha·Σ softmax(t)·s − (1 − alpha)·Σ hard·s / count
};

// Runs one direction on `stream`; returns the launch error, if any (fp64 has no kernel).
cudaError_t itc_fwd(const ItcFwdParams& params, cudaStream_t stream);

}  // namespace blip_fast::cuda
