// OpenMP row kernel of the fused LM-head cross-entropy (csrc/cpu/lm_head_loss.cpp). Plain
// structs, no ATen types: the host function in csrc/ops/lm_head_loss.cpp computes a chunk of
// logits with one matrix product and hands it to this kernel.
#pragma once

#include <cstdint>

namespace blip_fast::cpu {

// One chunk of rows, acc_t = float (fp32 / fp16 / bf16 inputs) or double (fp64 inputs).
template <typename acc_t>
struct LmHeadLossChunk {
  acc_t* logits;            // [rows, vocab] contiguous; with grad_scale overwritten by
                            // grad_scale_i · (softmax − (1 − eps)·onehot(label) − eps / vocab)
  const int64_t* labels;    // [rows] in [0, vocab)
  const acc_t* grad_scale;  // [rows], or nullptr: losses only
  acc_t* loss;              // [rows] out: (1 − eps)·(lse − z_label) + eps·(lse − mean z)
  int64_t rows, vocab;
  double label_smoothing;   // eps
  int num_threads;          // OpenMP threads to use
};

template <typename acc_t>
void lm_head_loss_chunk(const LmHeadLossChunk<acc_t>& chunk);

}  // namespace blip_fast::cpu
