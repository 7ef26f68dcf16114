// Element types of the CUDA kernels: conversions to and from their fp32 compute type and the
// dispatch from Dtype to a launcher template. Device code: include from .cu files only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include "core/types.h"

namespace blip_fast::cuda {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Returns launch(T{}) with T the element type of dtype (float, __half, __nv_bfloat16), or
// cudaErrorInvalidValue for fp64, which has no CUDA kernel.
template <typename Launch>
cudaError_t dispatch_dtype(Dtype dtype, Launch&& launch) {
  switch (dtype) {
    case Dtype::kFloat32: return launch(float{});
    case Dtype::kFloat16: return launch(__half{});
    case Dtype::kBFloat16: return launch(__nv_bfloat16{});
    case Dtype::kFloat64: break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace blip_fast::cuda
