// Torch-typed host functions of blip_fast::cross_attention_fwd / _bwd, and the forward and
// backward they share with gathered_cross_attention_fwd / _bwd: check the tensors, fill the
// kernel parameters, allocate the outputs and call the CPU (csrc/cpu) or CUDA (csrc/cuda)
// launcher.
#include "ops/cross_attention.h"

#include <ATen/ops/empty.h>

#include "core/registration.h"
#include "cpu/cross_attention.h"
#include "ops.h"
#include "ops/common.h"

#ifdef BLIP_FAST_WITH_CUDA
#include <limits>

#include "cuda/cross_attention.h"
#endif

namespace blip_fast {
namespace {

// Multiply-adds per OpenMP thread (~20 µs of one core's work) below which a call uses fewer
// threads (cpu_threads).
constexpr int64_t kMinWorkPerThread = int64_t{1} << 20;

// q [B, H, Lq, D], k / v [B, H, Lk, D], key_padding_mask [B, Lk] bool.
void check_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const std::optional<at::Tensor>& key_padding_mask) {
  TORCH_CHECK(q.dim() == 4, op, ": q must be [B, H, Lq, D] (rank 4), got shape ", q.sizes());
  TORCH_CHECK(k.dim() == 4, op, ": k must be [B, H, Lk, D] (rank 4), got shape ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), op, ": v must have k's shape ", k.sizes(), ", got ",
              v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1), op,
              ": batch and heads of k ", k.sizes(), " must match q ", q.sizes());
  TORCH_CHECK(k.size(3) == q.size(3), op, ": head dim mismatch: q has D = ", q.size(3),
              " but k and v have D = ", k.size(3));
  TORCH_CHECK(k.size(2) > 0, op, ": k and v have no keys (Lk = 0)");
  TORCH_CHECK(q.size(3) > 0, op, ": head dim D must be positive, got q shape ", q.sizes());
  kernel_dtype(op, "q", q);  // throws for a dtype no kernel takes
  CHECK_DTYPE(op, k, q);
  CHECK_DTYPE(op, v, q);
  CHECK_DEVICE(op, k, q);
  CHECK_DEVICE(op, v, q);
  if (key_padding_mask.has_value()) {
    const at::Tensor& mask = *key_padding_mask;
    TORCH_CHECK(mask.scalar_type() == at::kBool, op,
                ": key_padding_mask must be bool (True = attend), got ", mask.scalar_type());
    TORCH_CHECK(mask.dim() == 2 && mask.size(0) == q.size(0) && mask.size(1) == k.size(2), op,
                ": key_padding_mask must be [B, Lk] = [", q.size(0), ", ", k.size(2),
                "], got shape ", mask.sizes());
    CHECK_DEVICE(op, mask, q);
  }
}

// The fields every launcher reads, from checked tensors with contiguous rows (kv_index: none).
void fill_inputs(const char* op, CrossAttentionParams& p, const at::Tensor& q,
                 const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& mask,
                 double scale) {
  p.dtype = kernel_dtype(op, "q", q);
  p.q = operand(q);
  p.k = operand(k);
  p.v = operand(v);
  p.key_padding_mask = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
  p.batch = q.size(0);
  p.heads = q.size(1);
  p.q_len = q.size(2);
  p.k_len = k.size(2);
  p.head_dim = q.size(3);
  p.scale = scale;
}

// p and the seed of attention dropout: p in [0, 1); with p > 0 a 1-element int64 seed tensor
// on the CPU (the CUDA C++ kernel has no dropout).
Dropout dropout_arg(const char* op, const at::Tensor& q, double p,
                    const std::optional<at::Tensor>& seed) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, op, ": dropout_p must be in [0, 1), got ", p);
  if (p == 0.0) return {};
  TORCH_CHECK(q.is_cpu(), op, ": the ", q.device(), " kernel has no attention dropout (p = ", p,
              "); the triton backend has");
  TORCH_CHECK(seed.has_value() && seed->numel() == 1 && seed->scalar_type() == at::kLong, op,
              ": dropout_p = ", p, " needs dropout_seed, a 1-element int64 tensor");
  CHECK_DEVICE(op, *seed, q);
  return make_dropout(p, static_cast<uint64_t>(seed->data_ptr<int64_t>()[0]));
}

int64_t attention_work(const at::Tensor& q, const at::Tensor& k) {
  return q.size(0) * q.size(1) * q.size(2) * k.size(2) * q.size(3);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> run_cross_attention_fwd(
    const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& kv_index,
    double scale, bool causal, double dropout_p, const std::optional<at::Tensor>& dropout_seed) {
  const Dropout dropout = dropout_arg(op, q, dropout_p, dropout_seed);
  const at::Tensor q_rows = rows_contiguous(q), k_rows = rows_contiguous(k);
  const at::Tensor v_rows = rows_contiguous(v);
  std::optional<at::Tensor> mask;
  if (key_padding_mask.has_value()) mask = key_padding_mask->contiguous();
  const at::Tensor index = kv_index.has_value() ? kv_index->contiguous() : at::Tensor();
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out, lse};  // no (batch, head, query) rows

  CrossAttentionFwdParams p{};
  fill_inputs(op, p, q_rows, k_rows, v_rows, mask, scale);
  p.kv_index = index.defined() ? index.data_ptr<int64_t>() : nullptr;
  p.causal = causal;
  p.dropout = dropout;
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
#ifdef BLIP_FAST_WITH_CUDA
  if (q.is_cuda()) {
    TORCH_CHECK(!causal, op, ": the CUDA kernel has no causal mask; the triton backend has");
    check_cuda_dtype(op, p.dtype);
    TORCH_CHECK(q.size(3) <= cuda::kMaxHeadDim, op, ": the CUDA kernel takes head dim <= ",
                cuda::kMaxHeadDim, ", got ", q.size(3));
    TORCH_CHECK(q.size(0) * q.size(1) <= std::numeric_limits<int32_t>::max() &&
                    (q.size(2) + cuda::kQueriesPerBlock - 1) / cuda::kQueriesPerBlock <= 65535,
                op, ": q ", q.sizes(), " needs more thread blocks than one launch allows");
    launch_on(op, q.device(),
              [&](cudaStream_t stream) { return cuda::cross_attention_fwd(p, stream); });
    return {out, lse};
  }
#endif
  TORCH_CHECK(q.is_cpu(), op, ": no kernel for device ", q.device());
  cpu::cross_attention_fwd(p, cpu_threads(attention_work(q, k), kMinWorkPerThread));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> cross_attention_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& key_padding_mask, double scale, double dropout_p,
    const std::optional<at::Tensor>& dropout_seed) {
  const char* op = "cross_attention_fwd";
  check_inputs(op, q, k, v, key_padding_mask);
  return run_cross_attention_fwd(op, q, k, v, key_padding_mask, std::nullopt, scale, false,
                                 dropout_p, dropout_seed);
}

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& v,
                                                 const std::optional<at::Tensor>& key_padding_mask,
                                                 double scale, bool causal, double dropout_p,
                                                 const std::optional<at::Tensor>& dropout_seed) {
  const char* op = "attention_fwd";
  check_inputs(op, q, k, v, key_padding_mask);
  return run_cross_attention_fwd(op, q, k, v, key_padding_mask, std::nullopt, scale, causal,
                                 dropout_p, dropout_seed);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> run_cross_attention_bwd(
    const char* op, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& kv_index, const at::Tensor& out, const at::Tensor& lse,
    double scale, bool causal, double dropout_p, const std::optional<at::Tensor>& dropout_seed) {
  TORCH_CHECK(dout.sizes() == q.sizes(), op, ": dout must have q's shape ", q.sizes(), ", got ",
              dout.sizes());
  TORCH_CHECK(out.sizes() == q.sizes(), op, ": out must have q's shape ", q.sizes(), ", got ",
              out.sizes());
  CHECK_SHAPE(op, lse, q.size(0), q.size(1), q.size(2));
  TORCH_CHECK(lse.scalar_type() == at::kFloat, op, ": lse must be float32, got ",
              lse.scalar_type());
  CHECK_DTYPE(op, dout, q);
  CHECK_DTYPE(op, out, q);
  CHECK_DEVICE(op, dout, q);
  CHECK_DEVICE(op, out, q);
  CHECK_DEVICE(op, lse, q);
  TORCH_CHECK(q.is_cpu(), op, ": only a CPU kernel is built, got ", q.device());
  TORCH_CHECK(!(key_padding_mask.has_value() && kv_index.has_value()), op,
              ": the backward takes a key_padding_mask or a K / V row index, not both");
  const Dropout dropout = dropout_arg(op, q, dropout_p, dropout_seed);

  const at::Tensor q_rows = rows_contiguous(q), k_rows = rows_contiguous(k);
  const at::Tensor v_rows = rows_contiguous(v), dout_rows = rows_contiguous(dout);
  const at::Tensor out_rows = rows_contiguous(out), lse_c = lse.contiguous();
  std::optional<at::Tensor> mask;
  if (key_padding_mask.has_value()) mask = key_padding_mask->contiguous();
  const at::Tensor index = kv_index.has_value() ? kv_index->contiguous() : at::Tensor();
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  if (q.numel() == 0) return {dq, dk.zero_(), dv.zero_()};  // no queries: no gradient

  cpu::CrossAttentionBwdParams p{};
  fill_inputs(op, p, q_rows, k_rows, v_rows, mask, scale);
  p.kv_index = index.defined() ? index.data_ptr<int64_t>() : nullptr;
  p.kv_batch = k.size(0);
  p.causal = causal;
  p.dropout = dropout;
  p.dout = operand(dout_rows);
  p.out = operand(out_rows);
  p.lse = lse_c.data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  cpu::cross_attention_bwd(p, cpu_threads(attention_work(q, k), kMinWorkPerThread));
  return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_attention_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& key_padding_mask, const at::Tensor& out,
    const at::Tensor& lse, double scale, double dropout_p,
    const std::optional<at::Tensor>& dropout_seed) {
  const char* op = "cross_attention_bwd";
  check_inputs(op, q, k, v, key_padding_mask);
  return run_cross_attention_bwd(op, dout, q, k, v, key_padding_mask, std::nullopt, out, lse,
                                 scale, false, dropout_p, dropout_seed);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& key_padding_mask, const at::Tensor& out,
    const at::Tensor& lse, double scale, bool causal, double dropout_p,
    const std::optional<at::Tensor>& dropout_seed) {
  const char* op = "attention_bwd";
  check_inputs(op, q, k, v, key_padding_mask);
  return run_cross_attention_bwd(op, dout, q, k, v, key_padding_mask, std::nullopt, out, lse,
                                 scale, causal, dropout_p, dropout_seed);
}

}  // namespace blip_fast
