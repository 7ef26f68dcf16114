// OpenMP row epilogues of the fused ITC loss. A tile of logits [2B, n] (student rows, then
// teacher rows) comes from one matrix product in csrc/ops/itc.cpp; here each row folds the tile
// into its running state: online log-sum-exp of student and teacher, the teacher-weighted Σ s,
// Σ hard·s and the hard count, and with need_grad the exp(· − new max) weights (written over
// the logits) and rescale factors with which the caller accumulates Σ exp(·)·c, plus the sum of
// the hard positives' columns. Rows are independent, so threads split rows; exp goes through
// vec::exp (Cephes, SIMD) on whole vectors and libm on the tail.
#include "cpu/itc.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "cpu/vec.h"

namespace blip_fast::cpu {
namespace {

using vec::row_max;
using vec::sum_exp;

enum State { kMs, kLs, kMt, kLt, kW, kH, kCnt };

template <typename acc_t>
BLIP_FAST_TARGET_CLONES void fwd_row(const ItcTile<acc_t>& p, int64_t i, double* st) {
  const int64_t n = p.cols_n, B = p.batch;
  acc_t* s = p.logits + i * n;
  double sum, wsum;
  if (p.teacher) {  // first: it reads the raw student logits
    acc_t* t = p.logits + (B + i) * n;
    const double new_mt = std::max<double>(st[kMt], row_max(t, n));
    sum_exp<acc_t>(t, n, static_cast<acc_t>(new_mt), s, p.need_grad ? t : nullptr, sum, wsum);
    const double scale = std::exp(st[kMt] - new_mt);
    st[kLt] = st[kLt] * scale + sum;
    st[kW] = st[kW] * scale + wsum;
    st[kMt] = new_mt;
    if (p.need_grad) p.rescale[B + i] = static_cast<acc_t>(scale);
  }
  for (int64_t k = 0; k < n; ++k) {
    const int64_t col = p.col0 + k;
    if (p.idx ? p.idx[i] != p.idx_all[col] : col != i) continue;
    st[kH] += s[k];
    st[kCnt] += 1;
    if (p.need_grad) {
      double* h = p.hard_sum + i * p.dim;
      const acc_t* c = p.cols + k * p.cols_stride_j;
      for (int64_t d = 0; d < p.dim; ++d) h[d] += c[d * p.cols_stride_d];
    }
  }
  const double new_ms = std::max<double>(st[kMs], row_max(s, n));
  sum_exp<acc_t>(s, n, static_cast<acc_t>(new_ms), nullptr, p.need_grad ? s : nullptr, sum,
                 wsum);
  const double scale = std::exp(st[kMs] - new_ms);
  st[kLs] = st[kLs] * scale + sum;
  st[kMs] = new_ms;
  if (p.need_grad) p.rescale[i] = static_cast<acc_t>(scale);
}

}  // namespace

void itc_state_init(double* state, int64_t batch) {
  const double neg_inf = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < batch; ++i) {
    double* st = state + i * kItcState;
    std::fill(st, st + kItcState, 0.0);
    st[kMs] = st[kMt] = neg_inf;
  }
}

template <typename acc_t>
void itc_fwd_tile(const ItcTile<acc_t>& p, double* state) {
#pragma omp parallel for num_threads(p.num_threads) schedule(static)
  for (int64_t i = 0; i < p.batch; ++i) fwd_row(p, i, state + i * kItcState);
}

template <typename acc_t>
void itc_state_finish(const double* state, int64_t batch, double alpha, acc_t* stats,
                      int64_t ld, double* rows) {
  for (int64_t i = 0; i < batch; ++i) {
    const double* st = state + i * kItcState;
    const double lse_s = st[kMs] + std::log(st[kLs]);
    const double lse_t = alpha != 0.0 ? st[kMt] + std::log(st[kLt]) : 0.0;
    const double soft = alpha != 0.0 ? alpha * (st[kW] / st[kLt]) : 0.0;
    rows[i] = lse_s - soft - (1.0 - alpha) * (st[kH] / st[kCnt]);
    stats[i * ld] = static_cast<acc_t>(lse_s);
    stats[i * ld + 1] = static_cast<acc_t>(lse_t);
    stats[i * ld + 2] = static_cast<acc_t>(st[kCnt]);
  }
}

template <typename acc_t>
void itc_grad_finish(const double* state, const acc_t* o, const double* hard_sum, int64_t batch,
                     int64_t dim, double alpha, acc_t* stats, int64_t ld) {
  for (int64_t i = 0; i < batch; ++i) {
    const double* st = state + i * kItcState;
    const double ws = 1.0 / st[kLs], wh = (1.0 - alpha) / st[kCnt];
    const double wt = alpha != 0.0 ? alpha / st[kLt] : 0.0;
    acc_t* g = stats + i * ld + 3;
    for (int64_t d = 0; d < dim; ++d) {
      double v = ws * o[i * dim + d] - wh * hard_sum[i * dim + d];
      if (alpha != 0.0) v -= wt * o[(batch + i) * dim + d];
      g[d] = static_cast<acc_t>(v);
    }
  }
}

template void itc_fwd_tile<float>(const ItcTile<float>&, double*);
template void itc_fwd_tile<double>(const ItcTile<double>&, double*);
template void itc_state_finish<float>(const double*, int64_t, double, float*, int64_t, double*);
template void itc_state_finish<double>(const double*, int64_t, double, double*, int64_t,
                                       double*);
template void itc_grad_finish<float>(const double*, const float*, const double*, int64_t,
                                     int64_t, double, float*, int64_t);
template void itc_grad_finish<double>(const double*, const double*, const double*, int64_t,
                                      int64_t, double, double*, int64_t);

}  // namespace blip_fast::cpu
