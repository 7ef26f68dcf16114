// OpenMP row kernel of the fused LM-head cross-entropy: label-smoothed cross-entropy of each row
// of a logits chunk and, for a gradient, the scaled gradient written over the row. Three sweeps
// over a row (122 KB at BLIP's 30524 tokens, cache-resident): max and Σ z; Σ exp(z − max), the
// exp values stored over the row when a gradient follows; then (exp / Σ exp − eps / V)·g, the
// label's entry lowered by (1 − eps)·g. Rows are independent, so threads split rows.
#include "cpu/lm_head_loss.h"

#include <omp.h>

#include <cmath>

#include "cpu/vec.h"

namespace blip_fast::cpu {
namespace {

using vec::kWidth;
using vec::Vec;

template <typename acc_t>
BLIP_FAST_TARGET_CLONES void loss_row(const LmHeadLossChunk<acc_t>& p, int64_t i) {
  const int64_t V = p.vocab, label = p.labels[i];
  const double eps = p.label_smoothing;
  acc_t* z = p.logits + i * V;
  const double z_label = z[label], mean_z = vec::row_sum(z, V) / static_cast<double>(V);
  const acc_t m = vec::row_max(z, V);
  double sum, unused;
  vec::sum_exp<acc_t>(z, V, m, nullptr, p.grad_scale ? z : nullptr, sum, unused);
  const double lse = m + std::log(sum);
  p.loss[i] = static_cast<acc_t>((1.0 - eps) * (lse - z_label) + eps * (lse - mean_z));
  if (!p.grad_scale) return;
  const double g = p.grad_scale[i];
  const acc_t scale = static_cast<acc_t>(g / sum), shift = static_cast<acc_t>(g * eps / V);
  const Vec<acc_t> scale_v = vec::broadcast(scale), shift_v = vec::broadcast(shift);
  int64_t j = 0;
  for (; j + kWidth <= V; j += kWidth) vec::store(z + j, vec::load(z + j) * scale_v - shift_v);
  for (; j < V; ++j) z[j] = z[j] * scale - shift;
  z[label] -= static_cast<acc_t>((1.0 - eps) * g);
}

}  // namespace

template <typename acc_t>
void lm_head_loss_chunk(const LmHeadLossChunk<acc_t>& p) {
#pragma omp parallel for num_threads(p.num_threads) schedule(static)
  for (int64_t i = 0; i < p.rows; ++i) loss_row(p, i);
}

template void lm_head_loss_chunk<float>(const LmHeadLossChunk<float>&);
template void lm_head_loss_chunk<double>(const LmHeadLossChunk<double>&);

}  // namespace blip_fast::cpu
