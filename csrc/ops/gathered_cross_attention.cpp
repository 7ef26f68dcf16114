// Torch-typed host function of blip_fast::gathered_cross_attention_fwd: checks the tensors and
// the image indices, then runs the cross-attention forward with the indices as its K / V row
// index (ops/cross_attention.h), so each pair reads its image's cache rows in place.
#include "core/registration.h"
#include "ops.h"
#include "ops/common.h"
#include "ops/cross_attention.h"

namespace blip_fast {
namespace {

constexpr const char* kOp = "gathered_cross_attention_fwd";

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
  kernel_dtype(kOp, "q", q);  // throws for a dtype no kernel takes
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
  // image tokens are all attended: no key padding mask
  return std::get<0>(
      run_cross_attention_fwd(kOp, q, k_cache, v_cache, std::nullopt, image_index, scale));
}

}  // namespace blip_fast
