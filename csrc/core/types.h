// Types shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) kernels and by the host functions
// that fill their parameters (csrc/ops). No torch / ATen headers: the .cu files include this and
// compile with plain nvcc.
#pragma once

#include <cstdint>

namespace blip_fast {

// Element type of a kernel's tensors. fp64 has CPU kernels only (they run the gradient checks);
// the CUDA launchers return cudaErrorInvalidValue for it.
enum class Dtype { kFloat32, kFloat64, kFloat16, kBFloat16 };

// A [B, H, L, D] tensor whose last dim is contiguous; strides in elements.
struct Operand {
  const void* data;
  int64_t batch_stride, head_stride, row_stride;
};

}  // namespace blip_fast
