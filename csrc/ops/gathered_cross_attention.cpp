// Torch-typed host functions of blip_fast::gathered_cross_attention_fwd / _bwd: check the
// tensors and the image indices, then run the cross-attention forward / backward with the
// indices as its K / V row index (ops/cross_attention.h), so each pair reads its image's cache
// rows in place and each image's dK / dV sum over the pairs that read it.
#include <string>

#include <ATen/ops/_assert_async.h>

#include "core/registration.h"
#include "ops.h"
#include "ops/common.h"
#include "ops/cross_attention.h"

namespace blip_fast {
namespace {

void check_inputs(const char* op, const at::Tensor& q, const at::Tensor& k_cache,
                  const at::Tensor& v_cache, const at::Tensor& image_index) {
  TORCH_CHECK(q.dim() == 4, op, ": q must be [P, H, Lq, D] (rank 4), got shape ", q.sizes());
  TORCH_CHECK(k_cache.dim() == 4, op, ": k_cache must be [N_images, H, Lk, D] (rank 4), got ",
              "shape ", k_cache.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), op, ": v_cache must have k_cache's shape ",
              k_cache.sizes(), ", got ", v_cache.sizes());
  TORCH_CHECK(k_cache.size(1) == q.size(1) && k_cache.size(3) == q.size(3), op,
              ": heads and head dim of k_cache ", k_cache.sizes(), " must match q ", q.sizes());
  TORCH_CHECK(k_cache.size(2) > 0, op, ": the caches have no keys (Lk = 0)");
  TORCH_CHECK(q.size(3) > 0, op, ": head dim D must be positive, got q shape ", q.sizes());
  kernel_dtype(op, "q", q);  // throws for a dtype no kernel takes
  CHECK_DTYPE(op, k_cache, q);
  CHECK_DTYPE(op, v_cache, q);
  CHECK_DEVICE(op, k_cache, q);
  CHECK_DEVICE(op, v_cache, q);
  CHECK_DEVICE(op, image_index, q);
  TORCH_CHECK(image_index.scalar_type() == at::kLong, op, ": image_index must be int64, got ",
              image_index.scalar_type());
  CHECK_SHAPE(op, image_index, q.size(0));
}

// The kernels read indices without bounds checks. On CPU they are checked here; on CUDA a
// device-side assert checks them without a host sync (training calls this every layer).
void check_index_range(const char* op, const at::Tensor& image_index, int64_t n_images) {
  if (image_index.numel() == 0) return;
  if (image_index.is_cuda()) {
    const std::string message = std::string(op) + ": image_index holds values outside [0, " +
                                std::to_string(n_images) + "), the images of the caches";
    at::_assert_async(image_index.ge(0).logical_and(image_index.lt(n_images)).all(), message);
    return;
  }
  const int64_t lo = image_index.min().item<int64_t>(), hi = image_index.max().item<int64_t>();
  TORCH_CHECK(lo >= 0 && hi < n_images, op, ": image_index holds values in [", lo, ", ", hi,
              "] but the caches have ", n_images, " images");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gathered_cross_attention_fwd(const at::Tensor& q,
                                                                const at::Tensor& k_cache,
                                                                const at::Tensor& v_cache,
                                                                const at::Tensor& image_index,
                                                                double scale, double dropout_p,
                                                                const std::optional<at::Tensor>& dropout_seed) {
  const char* op = "gathered_cross_attention_fwd";
  check_inputs(op, q, k_cache, v_cache, image_index);
  check_index_range(op, image_index, k_cache.size(0));
  // image tokens are all attended: no key padding mask
  return run_cross_attention_fwd(op, q, k_cache, v_cache, std::nullopt, image_index, scale,
                                 false, dropout_p, dropout_seed);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gathered_cross_attention_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k_cache,
    const at::Tensor& v_cache, const at::Tensor& image_index, const at::Tensor& out,
    const at::Tensor& lse, double scale, double dropout_p,
    const std::optional<at::Tensor>& dropout_seed) {
  const char* op = "gathered_cross_attention_bwd";
  check_inputs(op, q, k_cache, v_cache, image_index);
  check_index_range(op, image_index, k_cache.size(0));
  return run_cross_attention_bwd(op, dout, q, k_cache, v_cache, std::nullopt, image_index, out,
                                 lse, scale, false, dropout_p, dropout_seed);
}

}  // namespace blip_fast
