// OpenMP row epilogues of the ITC loss (csrc/cpu/itc.cpp). Plain structs, no ATen types: the
// host functions in csrc/ops/itc.cpp tile the columns [feat_m of the batch ; queue], compute a
// tile's logits with one matrix product and hand them to these kernels.
#pragma once

#include <cstdint>

namespace blip_fast::cpu {

// One column tile of one direction (i2t or t2i), acc_t = float (fp32 / fp16 / bf16 inputs) or
// double (fp64 inputs).
template <typename acc_t>
struct ItcTile {
  acc_t* logits;           // [2B, n] contiguous, already / temp: student rows 0..B-1
                           // (s = x·c / temp), teacher rows B..2B-1 (t = x_m·c / temp); with
                           // need_grad overwritten by exp(s − m_s) and exp(t − m_t) (new maxima)
  const acc_t* cols;       // [D, n] the tile's columns, strides cols_stride_d / cols_stride_j
  int64_t cols_stride_d, cols_stride_j;
  int64_t batch;           // B
  int64_t cols_n;          // n, columns in this tile
  int64_t col0;            // global index of the tile's first column (0..B+Q)
  int64_t dim;             // D
  const int64_t* idx;      // [B] image ids, or nullptr: hard targets = identity over the batch
  const int64_t* idx_all;  // [B + Q] = [idx ; idx_queue], or nullptr with idx
  bool teacher;            // alpha != 0: the teacher rows are valid and used
  bool need_grad;          // also gather the gradient (see logits, rescale, hard_sum)
  acc_t* rescale;          // [2B] out, with need_grad: exp(old max − new max) of each row, by
                           // which the caller rescales its Σ exp(·)·c accumulators
  double* hard_sum;        // [B, D] with need_grad: Σ over hard positives of their columns
  int num_threads;         // OpenMP threads to use
};

// Running per-row state of the forward, [B, kItcState] contiguous, initialised by
// itc_state_init: running max and scaled sum of exp for student and teacher, the running
// Σ exp(t − m_t)·s, Σ hard·s and the hard count.
constexpr int64_t kItcState = 7;
void itc_state_init(double* state, int64_t batch);

// Folds one tile into state (the running log-sum-exp update of both softmaxes).
template <typename acc_t>
void itc_fwd_tile(const ItcTile<acc_t>& tile, double* state);

// Per row i: lse_s, lse_t, count into stats[i * ld + 0..2] and the row loss
// lse_s − alpha·Σ softmax(t)·s − (1 − alpha)·Σ hard·s / count into rows[i].
template <typename acc_t>
void itc_state_finish(const double* state, int64_t batch, double alpha, acc_t* stats,
                      int64_t ld, double* rows);

// The gradient direction G_i = o_s_i / l_s_i − alpha·o_t_i / l_t_i − (1 − alpha)·hard_sum_i /
// count_i into stats[i * ld + 3 + d], from o [2B, D] (rows B.. only with alpha != 0) =
// Σ_j exp(s − m_s)·c_j and Σ_j exp(t − m_t)·c_j.
template <typename acc_t>
void itc_grad_finish(const double* state, const acc_t* o, const double* hard_sum, int64_t batch,
                     int64_t dim, double alpha, acc_t* stats, int64_t ld);

}  // namespace blip_fast::cpu
