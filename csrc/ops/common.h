// Helpers shared by the torch-typed host functions in csrc/ops/: the kernels' Dtype of a tensor,
// the Operand view of a [B, H, L, D] tensor, the OpenMP thread count of a call and, in CUDA
// builds, the dtype check and the launch on a device's current stream.
#pragma once

#include <algorithm>
#include <cstdint>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#ifdef BLIP_FAST_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "core/types.h"

namespace blip_fast {

// The kernels' element type for x, the argument named `arg` of `op`; any other dtype is an
// error naming both.
inline Dtype kernel_dtype(const char* op, const char* arg, const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return Dtype::kFloat32;
    case at::kDouble: return Dtype::kFloat64;
    case at::kHalf: return Dtype::kFloat16;
    case at::kBFloat16: return Dtype::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": ", arg, " must be float32, float64, float16 or bfloat16, got ",
                  x.scalar_type());
  }
}

// The kernels read rows with arbitrary batch / head / row strides but need contiguous rows.
inline at::Tensor rows_contiguous(const at::Tensor& x) {
  return x.stride(-1) == 1 ? x : x.contiguous();
}

// x [B, H, L, D] with contiguous rows (rows_contiguous).
inline Operand operand(const at::Tensor& x) {
  return {x.data_ptr(), x.stride(0), x.stride(1), x.stride(2)};
}

// OpenMP threads for a call doing `work` multiply-adds: torch's setting at most, 1 inside an
// at::parallel_for region, and fewer when a thread would get under `min_work_per_thread`:
// waking idle workers can cost far more than a small share of work (on the 2-core dev VM each
// tiny gradcheck call took 7-16 ms with 2 threads and 30 µs with 1).
inline int cpu_threads(int64_t work, int64_t min_work_per_thread) {
  if (at::in_parallel_region()) return 1;
  return static_cast<int>(
      std::clamp<int64_t>(work / min_work_per_thread, 1, at::get_num_threads()));
}

#ifdef BLIP_FAST_WITH_CUDA
// The CUDA kernels take fp32, fp16 and bf16.
inline void check_cuda_dtype(const char* op, Dtype dtype) {
  TORCH_CHECK(dtype != Dtype::kFloat64, op,
              ": the CUDA kernel takes float32, float16 or bfloat16, got float64");
}

// Calls launch(stream) with the current stream of `device`, on that device; a launch error it
// returns is raised naming op.
template <typename Launch>
void launch_on(const char* op, at::Device device, Launch&& launch) {
  const c10::cuda::CUDAGuard guard(device);
  const cudaError_t err = launch(c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
}
#endif

}  // namespace blip_fast
