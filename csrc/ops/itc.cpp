// Torch-typed host functions of blip_fast::itc_fwd / itc_bwd. The forward walks the columns
// [feat_m of the batch ; queue] of each direction in tiles, read in place (no concatenated
// copy): one matrix product gives a tile's student and teacher logits [2B, n] (ATen's BLAS),
// the OpenMP epilogue of csrc/cpu/itc.cpp folds them into per-row running log-sum-exp state
// and, with need_grad, turns them into exp(· − running max) weights that a second product
// accumulates into Σ exp(·)·c (rescaled as the maxima move: the flash-attention forward). That
// gathers the gradient direction of every row in the same pass, 4 products of B rows per tile;
// a backward that recomputes s and t would need 5. The backward only scales it. Memory beyond
// the inputs: one [2B, n] tile, [2B, D] accumulators, the (2, B, 3 + D) stats, O(B + Q) ids.
#include "ops.h"

#include <algorithm>
#include <vector>

#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros.h>

#include "core/registration.h"
#include "cpu/itc.h"
#include "ops/common.h"

#ifdef BLIP_FAST_WITH_CUDA
#include "cuda/itc.h"
#endif

namespace blip_fast {
namespace {

// Columns per tile: the [2B, n] fp32 logit tile stays near 8 MiB (n = 4096 at B = 256; n = 512
// at B = 4096), small next to the reference's [B, B + Q] matrices (~850 MiB at B = 256) and
// wide enough that each product is a large GEMM. Chosen, not swept: at B = 256 the whole step
// ran at ~150 GFLOP/s on 2 EPYC cores (benchmarks/bench_itc.py), i.e. BLAS-bound.
int64_t tile_cols(int64_t batch) {
  int64_t n = 4096;
  while (n > 256 && 2 * batch * n > (int64_t{1} << 21)) n /= 2;
  return n;
}

// Multiply-adds per OpenMP thread below which a call uses fewer threads (cpu_threads).
constexpr int64_t kMinWorkPerThread = int64_t{1} << 18;

void check_inputs(const char* op, const at::Tensor& image_feat, const at::Tensor& text_feat,
                  const at::Tensor& image_feat_m, const at::Tensor& text_feat_m,
                  const at::Tensor& image_queue, const at::Tensor& text_queue,
                  const at::Tensor& temp, const std::optional<at::Tensor>& idx,
                  const std::optional<at::Tensor>& idx_queue) {
  TORCH_CHECK(image_feat.dim() == 2, op, ": image_feat must be [B, D] (rank 2), got shape ",
              image_feat.sizes());
  const int64_t B = image_feat.size(0), D = image_feat.size(1);
  TORCH_CHECK(B > 0 && D > 0, op, ": image_feat must be a non-empty [B, D], got shape ",
              image_feat.sizes());
  CHECK_SHAPE(op, text_feat, B, D);
  CHECK_SHAPE(op, image_feat_m, B, D);
  CHECK_SHAPE(op, text_feat_m, B, D);
  TORCH_CHECK(image_queue.dim() == 2 && image_queue.size(0) == D, op,
              ": image_queue must be [D, Q] with D = ", D, ", got ", image_queue.sizes());
  TORCH_CHECK(text_queue.dim() == 2 && text_queue.size(0) == D, op,
              ": text_queue must be [D, Q] with D = ", D, ", got ", text_queue.sizes());
  TORCH_CHECK(text_queue.size(1) == image_queue.size(1), op,
              ": text_queue ", text_queue.sizes(), " and image_queue ", image_queue.sizes(),
              " must have the same queue length Q");
  TORCH_CHECK(temp.numel() == 1, op, ": temp must be a 0-d tensor, got shape ", temp.sizes());
  kernel_dtype(op, "image_feat", image_feat);  // throws for a dtype no kernel takes
  const auto dtype = image_feat.scalar_type();
  for (const at::Tensor* t : {&text_feat, &image_feat_m, &text_feat_m, &image_queue,
                              &text_queue}) {
    TORCH_CHECK(t->scalar_type() == dtype, op, ": all features and queues must have "
                "image_feat's dtype ", dtype, ", got ", t->scalar_type());
    CHECK_DEVICE(op, (*t), image_feat);
  }
#ifdef BLIP_FAST_WITH_CUDA
  TORCH_CHECK(image_feat.is_cpu() || image_feat.is_cuda(), op,
              ": kernels are built for CPU and CUDA, got ", image_feat.device());
#else
  TORCH_CHECK(image_feat.is_cpu(), op, ": only a CPU kernel is built, got ", image_feat.device());
#endif
  TORCH_CHECK(idx.has_value() == idx_queue.has_value(), op,
              ": pass both idx and idx_queue, or neither");
  if (idx.has_value()) {
    TORCH_CHECK(idx->dim() == 1 && idx->size(0) == B, op, ": idx must be [B] with B = ", B,
                ", got ", idx->sizes());
    TORCH_CHECK(idx_queue->dim() == 1 && idx_queue->size(0) == image_queue.size(1), op,
                ": idx_queue must be [Q] with Q = ", image_queue.size(1), ", got ",
                idx_queue->sizes());
    TORCH_CHECK(idx->scalar_type() == at::kLong && idx_queue->scalar_type() == at::kLong, op,
                ": idx and idx_queue must be int64, got ", idx->scalar_type(), " and ",
                idx_queue->scalar_type());
  }
}

// Everything one direction (i2t or t2i) needs: its student / teacher rows and its columns.
struct Direction {
  const at::Tensor& x;       // [B, D] student rows
  const at::Tensor& x_m;     // [B, D] teacher rows
  const at::Tensor& feat_m;  // [B, D] batch part of the columns (transposed)
  const at::Tensor& queue;   // [D, Q] queue part of the columns
};

// Calls fn(col0, cols [D, n] in acc dtype) for each tile of [feat_mᵀ ; queue].
template <typename Fn>
void for_each_tile(const Direction& dir, int64_t tile, at::ScalarType acc, Fn&& fn) {
  const int64_t B = dir.feat_m.size(0), Q = dir.queue.size(1);
  for (int64_t j0 = 0; j0 < B; j0 += tile)
    fn(j0, dir.feat_m.narrow(0, j0, std::min(tile, B - j0)).t().to(acc));
  for (int64_t q0 = 0; q0 < Q; q0 += tile)
    fn(B + q0, dir.queue.narrow(1, q0, std::min(tile, Q - q0)).to(acc));
}

// [x ; x_m] / temp in the compute dtype, [2B, D] (only x, [B, D], without a teacher).
at::Tensor scaled_rows(const Direction& dir, bool teacher, at::ScalarType acc, double inv_t) {
  at::Tensor rows = teacher ? at::cat({dir.x, dir.x_m}) : dir.x;
  return rows.to(acc).mul(inv_t).contiguous();
}

template <typename acc_t>
at::Tensor fwd_impl(const std::vector<Direction>& dirs, double inv_t, double alpha,
                    bool need_grad, const std::optional<at::Tensor>& idx,
                    const at::Tensor& idx_all, at::Tensor& stats) {
  const at::ScalarType acc = stats.scalar_type();
  const int64_t B = dirs[0].x.size(0), D = dirs[0].x.size(1), tile = tile_cols(B);
  const int64_t ld = stats.size(2);
  const bool teacher = alpha != 0.0;
  const int64_t rows = teacher ? 2 * B : B;
  at::Tensor buf = at::empty({rows * tile}, stats.options());
  at::Tensor rescale = at::empty({rows}, stats.options());
  std::vector<double> state(B * cpu::kItcState), row_loss(B);
  std::vector<double> hard_sum(need_grad ? B * D : 0);
  double total = 0.0;
  for (size_t d = 0; d < dirs.size(); ++d) {
    const at::Tensor x2 = scaled_rows(dirs[d], teacher, acc, inv_t);
    // Σ_j exp(s − m_s)·c_j (rows 0..B-1) and Σ_j exp(t − m_t)·c_j (rows B..2B-1)
    at::Tensor o = need_grad ? at::zeros({rows, D}, stats.options()) : at::Tensor();
    std::fill(hard_sum.begin(), hard_sum.end(), 0.0);
    cpu::itc_state_init(state.data(), B);
    for_each_tile(dirs[d], tile, acc, [&](int64_t col0, const at::Tensor& cols) {
      const int64_t n = cols.size(1);
      at::Tensor logits = buf.narrow(0, 0, rows * n).view({rows, n});
      at::mm_out(logits, x2, cols);
      const cpu::ItcTile<acc_t> p{logits.data_ptr<acc_t>(),
                                  cols.data_ptr<acc_t>(), cols.stride(0), cols.stride(1),
                                  B, n, col0, D,
                                  idx ? idx->data_ptr<int64_t>() : nullptr,
                                  idx ? idx_all.data_ptr<int64_t>() : nullptr,
                                  teacher, need_grad, rescale.data_ptr<acc_t>(),
                                  need_grad ? hard_sum.data() : nullptr,
                                  cpu_threads(B * n * 16, kMinWorkPerThread)};
      cpu::itc_fwd_tile(p, state.data());
      if (need_grad) {  // the flash-attention forward's accumulator update
        o.mul_(rescale.unsqueeze(1));
        o.addmm_(logits, cols.t());
      }
    });
    acc_t* st = stats[d].data_ptr<acc_t>();
    cpu::itc_state_finish(state.data(), B, alpha, st, ld, row_loss.data());
    if (need_grad)
      cpu::itc_grad_finish(state.data(), o.data_ptr<acc_t>(), hard_sum.data(), B, D, alpha, st,
                           ld);
    double sum = 0.0;
    for (double r : row_loss) sum += r;
    total += sum / static_cast<double>(B);
  }
  return at::scalar_tensor(total / 2.0, dirs[0].x.options());
}

at::Tensor ids_all(const std::optional<at::Tensor>& idx,
                   const std::optional<at::Tensor>& idx_queue) {
  if (!idx.has_value()) return at::Tensor();
  return at::cat({*idx, *idx_queue}).contiguous();
}

#ifdef BLIP_FAST_WITH_CUDA
// Both directions with the CUDA kernel (one launch each); the loss is reduced on the device.
std::tuple<at::Tensor, at::Tensor> cuda_fwd(const std::vector<Direction>& dirs,
                                            const at::Tensor& temp, double alpha,
                                            const std::optional<at::Tensor>& idx,
                                            const at::Tensor& idx_all) {
  const char* op = "itc_fwd";
  const at::Tensor& x0 = dirs[0].x;
  const Dtype dtype = kernel_dtype(op, "image_feat", x0);
  check_cuda_dtype(op, dtype);
  const int64_t B = x0.size(0);
  // lse_s, lse_t, count per row; the gradient columns stay 0 (itc_bwd on CUDA recomputes)
  at::Tensor stats = at::zeros({2, B, 3 + x0.size(1)}, x0.options().dtype(at::kFloat));
  at::Tensor rows = at::empty({2, B}, x0.options().dtype(at::kFloat));
  const at::Tensor temp_f = temp.to(at::kFloat).contiguous();
  for (size_t d = 0; d < dirs.size(); ++d) {
    const Direction& dir = dirs[d];
    const at::Tensor x = dir.x.contiguous(), x_m = dir.x_m.contiguous();
    const at::Tensor feat_m = dir.feat_m.contiguous();
    cuda::ItcFwdParams p{};
    p.dtype = dtype;
    p.x = x.data_ptr();
    p.x_m = x_m.data_ptr();
    p.feat_m = feat_m.data_ptr();
    p.queue = dir.queue.data_ptr();
    p.x_stride = x.stride(0);
    p.x_m_stride = x_m.stride(0);
    p.feat_m_stride = feat_m.stride(0);
    p.queue_stride0 = dir.queue.stride(0);
    p.queue_stride1 = dir.queue.stride(1);
    p.idx = idx ? idx->data_ptr<int64_t>() : nullptr;
    p.idx_all = idx ? idx_all.data_ptr<int64_t>() : nullptr;
    p.temp = temp_f.data_ptr<float>();
    p.alpha = static_cast<float>(alpha);
    p.batch = B;
    p.queue_len = dir.queue.size(1);
    p.dim = static_cast<int>(x.size(1));
    p.stats = stats[d].data_ptr<float>();
    p.stats_ld = stats.stride(1);
    p.rows = rows[d].data_ptr<float>();
    launch_on(op, x0.device(), [&](cudaStream_t stream) { return cuda::itc_fwd(p, stream); });
  }
  return {rows.mean(1).sum().div(2.0).to(x0.scalar_type()), stats};
}
#endif

}  // namespace

std::tuple<at::Tensor, at::Tensor> itc_fwd(
    const at::Tensor& image_feat, const at::Tensor& text_feat, const at::Tensor& image_feat_m,
    const at::Tensor& text_feat_m, const at::Tensor& image_queue, const at::Tensor& text_queue,
    const at::Tensor& temp, double alpha, const std::optional<at::Tensor>& idx,
    const std::optional<at::Tensor>& idx_queue, bool need_grad) {
  check_inputs("itc_fwd", image_feat, text_feat, image_feat_m, text_feat_m, image_queue,
               text_queue, temp, idx, idx_queue);
  const bool fp64 = image_feat.scalar_type() == at::kDouble;
  const at::ScalarType acc = fp64 ? at::kDouble : at::kFloat;
  const int64_t B = image_feat.size(0);
  const std::optional<at::Tensor> idx_c = idx ? std::optional<at::Tensor>(idx->contiguous())
                                              : std::nullopt;
  const at::Tensor idx_all = ids_all(idx_c, idx_queue);
  const std::vector<Direction> dirs{{image_feat, image_feat_m, text_feat_m, text_queue},
                                    {text_feat, text_feat_m, image_feat_m, image_queue}};
#ifdef BLIP_FAST_WITH_CUDA
  if (image_feat.is_cuda()) return cuda_fwd(dirs, temp, alpha, idx_c, idx_all);
#endif
  at::Tensor stats = at::zeros({2, B, 3 + image_feat.size(1)}, image_feat.options().dtype(acc));
  const double inv_t = 1.0 / temp.item<double>();
  at::Tensor loss =
      fp64 ? fwd_impl<double>(dirs, inv_t, alpha, need_grad, idx_c, idx_all, stats)
           : fwd_impl<float>(dirs, inv_t, alpha, need_grad, idx_c, idx_all, stats);
  return {loss, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> itc_bwd(
    const at::Tensor& dloss, const at::Tensor& image_feat, const at::Tensor& text_feat,
    const at::Tensor& image_feat_m, const at::Tensor& text_feat_m, const at::Tensor& image_queue,
    const at::Tensor& text_queue, const at::Tensor& temp, double alpha,
    const std::optional<at::Tensor>& idx, const std::optional<at::Tensor>& idx_queue,
    bool need_grad, const at::Tensor& stats) {
  const char* op = "itc_bwd";
  check_inputs(op, image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue,
               temp, idx, idx_queue);
  TORCH_CHECK(image_feat.is_cpu(), op, ": the C++ backward is CPU-only (CUDA runs the Triton "
              "kernel), got ", image_feat.device());
  TORCH_CHECK(need_grad, op, ": the forward ran with need_grad=False, so stats holds no gradient");
  const bool fp64 = image_feat.scalar_type() == at::kDouble;
  const int64_t B = image_feat.size(0), D = image_feat.size(1);
  CHECK_SHAPE(op, stats, 2, B, 3 + D);
  const at::ScalarType acc = fp64 ? at::kDouble : at::kFloat;
  TORCH_CHECK(stats.scalar_type() == acc, op, ": stats must come from itc_fwd (",
              (fp64 ? "float64" : "float32"), "), got ", stats.scalar_type());
  TORCH_CHECK(dloss.numel() == 1, op, ": dloss must be 0-d, got shape ", dloss.sizes());
  // The forward gathered G_i = Σ_j (softmax(s) − targets)_ij c_j: d_x = g·G / temp and
  // d_temp = −Σ ds·s / temp = −g·Σ_i x_i·G_i / temp², with g = dloss / (2B).
  const double inv_t = 1.0 / temp.item<double>();
  const double g = dloss.item<double>() / (2.0 * static_cast<double>(B));
  std::vector<at::Tensor> grads;
  double d_temp = 0.0;
  for (int64_t d = 0; d < 2; ++d) {
    const at::Tensor& x = d == 0 ? image_feat : text_feat;
    const at::Tensor G = stats[d].narrow(1, 3, D);
    grads.push_back(G.mul(g * inv_t).to(x.scalar_type()));
    d_temp -= g * inv_t * inv_t * G.mul(x.to(acc)).sum().item<double>();
  }
  return {grads[0], grads[1], at::scalar_tensor(d_temp, temp.options()).reshape(temp.sizes())};
}

}  // namespace blip_fast
