// Torch-typed host function of blip_fast::gathered_cross_attention_fwd: check the tensors, map
// the dtype, allocate the output and call the CPU (csrc/cpu/gathered_cross_attention) or CUDA
// (csrc/cuda/gathered_cross_attention) launcher.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>

#include "core/registration.h"
#include "cpu/gathered_cross_attention.h"
#include "ops.h"

#ifdef BLIP_FAST_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>

#include "cuda/gathered_cross_attention.h"
#endif

namespace blip_fast {
namespace {

constexpr const char* kOp = "gathered_cross_attention_fwd";

at::Tensor rows_contiguous(const at::Tensor& x) { return x.stride(-1) == 1 ? x : x.contiguous(); }

void check_inputs(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& image_index) {
  TORCH_CHECK(q.dim() == 4, kOp, ": q must be [P, H, Lq, D] (rank 4), got shape ", q.sizes());
  TORCH_CHECK(k_cache.dim() == 4, kOp, ": k_cache must be [N_images, H, Lk, D] (rank 4), got ",
              "shape ", k_cache.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), kOp, ": v_cache must have k_cache's shape ",
              k_cache.sizes(), ", got ", v_cache.sizes());
  TORCH_CHECK(k_cache.size(1) == q.size(1) && k_cache.size(3) == q.size(3), kOp,
              ": heads and head dim of k_cache ", k_cache.sizes(), " must match q ", q.sizes());
  TORCH_CHECK(k_cache.size(2) > 0, kOp, ": the caches have no keys (Lk = 0)");
  TORCH_CHECK(q.size(3) > 0, kOp, ": head dim D must be positive, got q shape ", q.sizes());
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              kOp, ": q must be float32, float64, float16 or bfloat16, got ", dtype);
  CHECK_DTYPE(kOp, k_cache, q);
  CHECK_DTYPE(kOp, v_cache, q);
  CHECK_DEVICE(kOp, k_cache, q);
  CHECK_DEVICE(kOp, v_cache, q);
  CHECK_DEVICE(kOp, image_index, q);
  TORCH_CHECK(image_index.scalar_type() == at::kLong, kOp, ": image_index must be int64, got ",
              image_index.scalar_type());
  CHECK_SHAPE(kOp, image_index, q.size(0));
}

// Indices are read by the kernels without bounds checks: check them here (one device sync on
// CUDA, as torch's own index_select does for its error message).
void check_index_range(const at::Tensor& image_index, int64_t n_images) {
  if (image_index.numel() == 0) return;
  const int64_t lo = image_index.min().item<int64_t>(), hi = image_index.max().item<int64_t>();
  TORCH_CHECK(lo >= 0 && hi < n_images, kOp, ": image_index holds values in [", lo, ", ", hi,
              "] but the caches have ", n_images, " images");
}

}  // namespace

at::Tensor gathered_cross_attention_fwd(const at::Tensor& q, const at::Tensor& k_cache,
                                        const at::Tensor& v_cache, const at::Tensor& image_index,
                                        double scale) {
  check_inputs(q, k_cache, v_cache, image_index);
  check_index_range(image_index, k_cache.size(0));
  const at::Tensor q_rows = rows_contiguous(q), k_rows = rows_contiguous(k_cache);
  const at::Tensor v_rows = rows_contiguous(v_cache), index = image_index.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options());
  if (q.numel() == 0) return out;
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));

#ifdef BLIP_FAST_WITH_CUDA
  if (q.is_cuda()) {
    TORCH_CHECK(q.scalar_type() != at::kDouble, kOp,
                ": the CUDA kernel takes float32, float16 or bfloat16, got float64");
    TORCH_CHECK(q.size(3) <= cuda::kMaxHeadDim, kOp, ": the CUDA kernel takes head dim <= ",
                cuda::kMaxHeadDim, ", got ", q.size(3));
    TORCH_CHECK(q.size(0) * q.size(1) <= std::numeric_limits<int32_t>::max() &&
                    (q.size(2) + cuda::kQueriesPerBlock - 1) / cuda::kQueriesPerBlock <= 65535,
                kOp, ": q ", q.sizes(), " needs more thread blocks than one launch allows");
    cuda::GatheredCrossAttentionParams p{};
    p.dtype = q.scalar_type() == at::kFloat  ? cuda::Dtype::kFloat32
              : q.scalar_type() == at::kHalf ? cuda::Dtype::kFloat16
                                             : cuda::Dtype::kBFloat16;
    p.q = {q_rows.data_ptr(), q_rows.stride(0), q_rows.stride(1), q_rows.stride(2)};
    p.k_cache = {k_rows.data_ptr(), k_rows.stride(0), k_rows.stride(1), k_rows.stride(2)};
    p.v_cache = {v_rows.data_ptr(), v_rows.stride(0), v_rows.stride(1), v_rows.stride(2)};
    p.image_index = index.data_ptr<int64_t>();
    p.out = out.data_ptr();
    p.lse = lse.data_ptr<float>();
    p.pairs = q.size(0);
    p.heads = q.size(1);
    p.q_len = q.size(2);
    p.k_len = k_cache.size(2);
    p.head_dim = static_cast<int>(q.size(3));
    p.scale = static_cast<float>(scale);
    const c10::cuda::CUDAGuard guard(q.device());
    const cudaError_t err = cuda::gathered_cross_attention_fwd(p, c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, kOp, ": CUDA launch failed: ", cudaGetErrorString(err));
    return out;
  }
#endif
  TORCH_CHECK(q.is_cpu(), kOp, ": no kernel for device ", q.device());
  cpu::GatheredCrossAttentionParams p{};
  switch (q.scalar_type()) {
    case at::kFloat: p.dtype = cpu::Dtype::kFloat32; break;
    case at::kDouble: p.dtype = cpu::Dtype::kFloat64; break;
    case at::kHalf: p.dtype = cpu::Dtype::kFloat16; break;
    default: p.dtype = cpu::Dtype::kBFloat16;  // check_inputs admits no other dtype
  }
  p.q = {q_rows.data_ptr(), q_rows.stride(0), q_rows.stride(1), q_rows.stride(2)};
  p.k_cache = {k_rows.data_ptr(), k_rows.stride(0), k_rows.stride(1), k_rows.stride(2)};
  p.v_cache = {v_rows.data_ptr(), v_rows.stride(0), v_rows.stride(1), v_rows.stride(2)};
  p.image_index = index.data_ptr<int64_t>();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.pairs = q.size(0);
  p.heads = q.size(1);
  p.q_len = q.size(2);
  p.k_len = k_cache.size(2);
  p.head_dim = q.size(3);
  p.scale = scale;
  // Same thread policy as cross_attention_fwd: 1 inside a parallel region, else torch's setting
  // capped so that each thread gets ~1M multiply-adds.
  const int64_t work = q.size(0) * q.size(1) * q.size(2) * k_cache.size(2) * q.size(3);
  p.num_threads = at::in_parallel_region()
                      ? 1
                      : static_cast<int>(std::clamp<int64_t>(work >> 20, 1, at::get_num_threads()));
  cpu::gathered_cross_attention_fwd(p);
  return out;
}

}  // namespace blip_fast
