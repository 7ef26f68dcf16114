// Torch-typed host functions of blip_fast::lm_head_loss_fwd / lm_head_loss_bwd on CPU (the math
// and the gradient policy are in blip_fast/ops/lm_head_loss.py). Rows labelled -100 are dropped
// first; the others go through in chunks: one GEMM (ATen's BLAS) gives a chunk's logits
// [rows, V] in a reused fp32 buffer, the OpenMP row kernel of csrc/cpu/lm_head_loss.cpp turns
// them into row losses and, for a gradient, into g_i·dloss_i/dz in place, and two more GEMMs
// write that chunk's d_hidden rows and add its share of d_weight. Memory beyond the inputs and
// gradients: one [rows, V] buffer (about 32 MiB) and O(N) row data; never [N, V]. fp16 / bf16
// inputs are computed in fp32 (one fp32 copy of the weight).
#include "ops.h"

#include <algorithm>
#include <type_traits>
#include <vector>

#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include "core/registration.h"
#include "cpu/lm_head_loss.h"
#include "ops/common.h"

namespace blip_fast {
namespace {

constexpr int64_t kIgnoreIndex = -100;
// Logit elements per chunk, as blip_fast/ops/lm_head_loss.py (_CHUNK_ELEMENTS, with the sweep
// that chose it): 2^23, i.e. 274 rows of fp32 at V = 30524.
constexpr int64_t kChunkElements = int64_t{1} << 23;
// Multiply-adds per OpenMP thread below which the row kernel uses fewer threads (cpu_threads).
constexpr int64_t kMinWorkPerThread = int64_t{1} << 16;

int64_t chunk_rows(int64_t vocab) { return std::max<int64_t>(16, kChunkElements / vocab); }

enum class Reduction { kMean, kSum, kNone };

Reduction parse_reduction(const char* op, c10::string_view reduction) {
  if (reduction == "mean") return Reduction::kMean;
  if (reduction == "sum") return Reduction::kSum;
  TORCH_CHECK(reduction == "none", op, ": reduction must be 'mean', 'sum' or 'none', got '",
              reduction, "'");
  return Reduction::kNone;
}

void check_inputs(const char* op, const at::Tensor& hidden, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, const at::Tensor& labels,
                  double label_smoothing) {
  TORCH_CHECK(hidden.dim() == 2, op, ": hidden must be [N, H], got shape ", hidden.sizes());
  const int64_t N = hidden.size(0), H = hidden.size(1);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == H && weight.size(0) > 0, op,
              ": weight must be [V, H] with H = ", H, " and V > 0, got ", weight.sizes());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op,
                ": bias must be [V] with V = ", weight.size(0), ", got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == hidden.scalar_type(), op, ": bias has dtype ",
                bias->scalar_type(), " but hidden has dtype ", hidden.scalar_type());
    TORCH_CHECK(bias->device() == hidden.device(), op, ": bias is on ", bias->device(),
                " but hidden is on ", hidden.device());
  }
  CHECK_SHAPE(op, labels, N);
  TORCH_CHECK(labels.scalar_type() == at::kLong, op, ": labels must be int64, got ",
              labels.scalar_type());
  CHECK_DTYPE(op, weight, hidden);
  CHECK_DEVICE(op, weight, hidden);
  CHECK_DEVICE(op, labels, hidden);
  kernel_dtype(op, "hidden", hidden);  // throws for a dtype no kernel takes
  TORCH_CHECK(hidden.is_cpu(), op, ": the C++ kernel is CPU-only (CUDA runs the Triton kernel), "
              "got ", hidden.device());
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, op,
              ": label_smoothing must be in [0, 1], got ", label_smoothing);
}

// Indices of the rows whose label is not -100; any other label outside [0, V) is an error naming
// its position and value.
at::Tensor kept_rows(const char* op, const at::Tensor& labels, int64_t vocab) {
  const at::Tensor y = labels.contiguous();
  const int64_t* data = y.data_ptr<int64_t>();
  std::vector<int64_t> keep;
  keep.reserve(y.numel());
  for (int64_t i = 0; i < y.numel(); ++i) {
    if (data[i] == kIgnoreIndex) continue;
    TORCH_CHECK_INDEX(data[i] >= 0 && data[i] < vocab, op, ": labels[", i, "] = ", data[i],
                      " is outside the vocabulary [0, ", vocab, ") (-100 marks an ignored row)");
    keep.push_back(i);
  }
  return at::tensor(keep, y.options());
}

struct Rows {
  at::Tensor loss;  // [N] compute dtype, 0 at ignored rows
  at::Tensor d_hidden, d_weight, d_bias;  // with a grad_scale: inputs' dtypes (d_bias: or none)
};

// Row losses and, with grad_scale [N], the gradients of Σ_i grad_scale_i · loss_i.
template <typename acc_t>
Rows chunked(const char* op, const at::Tensor& hidden, const at::Tensor& weight,
             const std::optional<at::Tensor>& bias, const at::Tensor& labels, double eps,
             const std::optional<at::Tensor>& grad_scale) {
  const at::ScalarType acc = std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
  const int64_t N = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  const at::Tensor keep = kept_rows(op, labels, V);
  const int64_t n = keep.size(0), rows = chunk_rows(V);
  const at::TensorOptions opts = hidden.options().dtype(acc);
  const at::Tensor h = hidden.index_select(0, keep).to(acc).contiguous();
  const at::Tensor w = weight.to(acc).contiguous();
  const at::Tensor b = bias ? bias->to(acc) : at::Tensor();
  const at::Tensor y = labels.index_select(0, keep).contiguous();
  const bool need_grad = grad_scale.has_value();
  const at::Tensor g = need_grad ? grad_scale->to(acc).index_select(0, keep).contiguous()
                                 : at::Tensor();
  at::Tensor loss = at::empty({n}, opts);
  at::Tensor d_h, d_w, d_b;
  if (need_grad) {
    d_h = at::empty({n, H}, opts);
    // the first chunk writes them (no zero-fill of a V x H buffer); no chunk at all: zeros
    d_w = n > 0 ? at::empty({V, H}, opts) : at::zeros({V, H}, opts);
    if (bias) d_b = n > 0 ? at::empty({V}, opts) : at::zeros({V}, opts);
  }
  at::Tensor buf = at::empty({std::min(n, rows) * V}, opts);
  for (int64_t r0 = 0; r0 < n; r0 += rows) {
    const int64_t r = std::min(rows, n - r0);
    const at::Tensor hc = h.narrow(0, r0, r);
    at::Tensor z = buf.narrow(0, 0, r * V).view({r, V});
    if (bias) {
      at::addmm_out(z, b, hc, w.t());
    } else {
      at::mm_out(z, hc, w.t());
    }
    const cpu::LmHeadLossChunk<acc_t> p{z.data_ptr<acc_t>(),
                                        y.data_ptr<int64_t>() + r0,
                                        need_grad ? g.data_ptr<acc_t>() + r0 : nullptr,
                                        loss.data_ptr<acc_t>() + r0,
                                        r,
                                        V,
                                        eps,
                                        cpu_threads(r * V * 8, kMinWorkPerThread)};
    cpu::lm_head_loss_chunk(p);
    if (need_grad) {
      at::Tensor d_hc = d_h.narrow(0, r0, r);
      at::mm_out(d_hc, z, w);
      if (r0 == 0) {
        at::mm_out(d_w, z.t(), hc);
        if (bias) at::sum_out(d_b, z, 0);
      } else {
        d_w.addmm_(z.t(), hc);
        if (bias) d_b.add_(z.sum(0));
      }
    }
  }
  Rows out{at::zeros({N}, opts).index_copy_(0, keep, loss), {}, {}, {}};
  if (need_grad) {
    out.d_hidden = at::zeros({N, H}, hidden.options()).index_copy_(0, keep, d_h.to(hidden.dtype()));
    out.d_weight = d_w.to(weight.scalar_type());
    if (bias) out.d_bias = d_b.to(bias->scalar_type());
  }
  return out;
}

Rows run(const char* op, const at::Tensor& hidden, const at::Tensor& weight,
         const std::optional<at::Tensor>& bias, const at::Tensor& labels, double eps,
         const std::optional<at::Tensor>& grad_scale) {
  // The GEMMs here are fp32 by design: under autocast ATen would run them in its lower dtype.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  return hidden.scalar_type() == at::kDouble
             ? chunked<double>(op, hidden, weight, bias, labels, eps, grad_scale)
             : chunked<float>(op, hidden, weight, bias, labels, eps, grad_scale);
}

int64_t count_kept(const at::Tensor& labels) {
  return labels.ne(kIgnoreIndex).sum().item<int64_t>();
}

// [N] d(reduced loss)/d(row loss) · dloss.
at::Tensor row_scale(const at::Tensor& dloss, const at::Tensor& labels, Reduction reduction) {
  if (reduction == Reduction::kNone) return dloss;
  at::Tensor g = dloss.reshape({}).expand({labels.size(0)});
  if (reduction == Reduction::kMean)
    g = g.div(static_cast<double>(std::max<int64_t>(count_kept(labels), 1)));
  return g;
}

// The [0] tensor an output gradient that was not computed holds (x's dtype and device).
at::Tensor not_computed(const at::Tensor& x) { return at::empty({0}, x.options()); }

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lm_head_loss_fwd(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& labels, double label_smoothing, c10::string_view reduction,
    bool need_grad) {
  const char* op = "lm_head_loss_fwd";
  check_inputs(op, hidden, weight, bias, labels, label_smoothing);
  const Reduction red = parse_reduction(op, reduction);
  const bool gather = need_grad && red != Reduction::kNone;
  const at::ScalarType acc = hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  std::optional<at::Tensor> scale;
  if (gather) scale = row_scale(at::scalar_tensor(1.0, hidden.options().dtype(acc)), labels, red);
  Rows rows = run(op, hidden, weight, bias, labels, label_smoothing, scale);
  at::Tensor loss = rows.loss;
  if (red == Reduction::kSum) loss = rows.loss.sum();
  // 'mean' over no rows is 0 / 0 = NaN, as torch gives
  if (red == Reduction::kMean) loss = rows.loss.sum().div(static_cast<double>(count_kept(labels)));
  if (!gather) {
    return {loss, not_computed(hidden), not_computed(weight), not_computed(hidden)};
  }
  return {loss, rows.d_hidden, rows.d_weight, bias ? rows.d_bias : not_computed(hidden)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lm_head_loss_bwd(
    const at::Tensor& dloss, const at::Tensor& hidden, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& labels, double label_smoothing,
    c10::string_view reduction) {
  const char* op = "lm_head_loss_bwd";
  check_inputs(op, hidden, weight, bias, labels, label_smoothing);
  const Reduction red = parse_reduction(op, reduction);
  if (red == Reduction::kNone) {
    CHECK_SHAPE(op, dloss, hidden.size(0));
  } else {
    TORCH_CHECK(dloss.numel() == 1, op, ": dloss must be 0-d, got shape ", dloss.sizes());
  }
  Rows rows = run(op, hidden, weight, bias, labels, label_smoothing, row_scale(dloss, labels, red));
  return {rows.d_hidden, rows.d_weight, bias ? rows.d_bias : not_computed(hidden)};
}

}  // namespace blip_fast
