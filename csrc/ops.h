// Torch-typed host functions, one per registered kernel (csrc/torch_bindings.cpp registers them
// for the schemas defined in blip_fast/ops/*.py). Each checks its tensors, dispatches on dtype
// and calls the cpu:: or cuda:: launcher for the tensors' device.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

namespace blip_fast {

// q [B, H, Lq, D], k / v [B, H, Lk, D], key_padding_mask [B, Lk] bool (true = attend) or none
// -> out [B, H, Lq, D] (q's dtype), lse [B, H, Lq] fp32. The cross-attention ops all take
// dropout_p and dropout_seed (a 1-element int64 tensor, needed when dropout_p > 0): attention
// dropout by the counter hash of core/dropout.h, CPU kernels only.
std::tuple<at::Tensor, at::Tensor> cross_attention_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& key_padding_mask, double scale, double dropout_p,
    const std::optional<at::Tensor>& dropout_seed);

// cross_attention_fwd / _bwd with causal, for self-attention: query i sees keys
// j <= Lk − Lq + i (bottom-right aligned, as a decoder over a KV cache needs). CPU only.
std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& v,
                                                 const std::optional<at::Tensor>& key_padding_mask,
                                                 double scale, bool causal, double dropout_p,
                                                 const std::optional<at::Tensor>& dropout_seed);
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& key_padding_mask, const at::Tensor& out,
    const at::Tensor& lse, double scale, bool causal, double dropout_p,
    const std::optional<at::Tensor>& dropout_seed);

// q [P, H, Lq, D], k_cache / v_cache [N_images, H, Lk, D], image_index [P] int64 in
// [0, N_images) -> out [P, H, Lq, D] (q's dtype), lse [P, H, Lq] fp32: pair p attends over
// cache row image_index[p].
std::tuple<at::Tensor, at::Tensor> gathered_cross_attention_fwd(const at::Tensor& q,
                                                                const at::Tensor& k_cache,
                                                                const at::Tensor& v_cache,
                                                                const at::Tensor& image_index,
                                                                double scale, double dropout_p,
                                                                const std::optional<at::Tensor>& dropout_seed);

// dout / out [P, H, Lq, D], lse [P, H, Lq] fp32 (from gathered_cross_attention_fwd) and its
// inputs -> dq [P, H, Lq, D], dk_cache / dv_cache [N_images, H, Lk, D]: an image's rows sum
// over the pairs that read it, 0 for an image none reads. CPU only.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gathered_cross_attention_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k_cache,
    const at::Tensor& v_cache, const at::Tensor& image_index, const at::Tensor& out,
    const at::Tensor& lse, double scale, double dropout_p,
    const std::optional<at::Tensor>& dropout_seed);

// dout / out [B, H, Lq, D], q [B, H, Lq, D], k / v [B, H, Lk, D], key_padding_mask [B, Lk] or
// none, lse [B, H, Lq] fp32 (from cross_attention_fwd) -> dq, dk, dv shaped like q, k, v.
std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_attention_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& key_padding_mask, const at::Tensor& out,
    const at::Tensor& lse, double scale, double dropout_p,
    const std::optional<at::Tensor>& dropout_seed);

// image_feat / text_feat / image_feat_m / text_feat_m [B, D], image_queue / text_queue [D, Q]
// (read in place), temp 0-d, idx [B] / idx_queue [Q] int64 or none -> loss 0-d (image_feat's
// dtype), stats [2, B, 3 + D] (fp64 for fp64 inputs, else fp32): per direction and row lse_s,
// lse_t, count and, with need_grad (CPU), the gradient direction G [D].
std::tuple<at::Tensor, at::Tensor> itc_fwd(
    const at::Tensor& image_feat, const at::Tensor& text_feat, const at::Tensor& image_feat_m,
    const at::Tensor& text_feat_m, const at::Tensor& image_queue, const at::Tensor& text_queue,
    const at::Tensor& temp, double alpha, const std::optional<at::Tensor>& idx,
    const std::optional<at::Tensor>& idx_queue, bool need_grad);

// dloss 0-d, the itc_fwd inputs and its stats [2, B, 3 + D] -> d_image_feat, d_text_feat
// [B, D], d_temp (temp's shape). CPU only.
std::tuple<at::Tensor, at::Tensor, at::Tensor> itc_bwd(
    const at::Tensor& dloss, const at::Tensor& image_feat, const at::Tensor& text_feat,
    const at::Tensor& image_feat_m, const at::Tensor& text_feat_m, const at::Tensor& image_queue,
    const at::Tensor& text_queue, const at::Tensor& temp, double alpha,
    const std::optional<at::Tensor>& idx, const std::optional<at::Tensor>& idx_queue,
    bool need_grad, const at::Tensor& stats);

// hidden [N, H], weight [V, H], bias [V] or none, labels [N] int64 (-100 = ignored) ->
// loss (0-d for 'mean' / 'sum', [N] for 'none'; fp32, fp64 for fp64 inputs) and, with need_grad
// and a 0-d loss, the gradients of that loss d_hidden [N, H], d_weight [V, H], d_bias [V] in the
// inputs' dtypes (each [0] when not gathered, d_bias also without a bias). CPU only.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lm_head_loss_fwd(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& labels, double label_smoothing, c10::string_view reduction,
    bool need_grad);

// dloss (0-d, or [N] for 'none') and the lm_head_loss_fwd inputs -> d_hidden [N, H],
// d_weight [V, H], d_bias [V] (or [0] without a bias), recomputing the logits. CPU only.
std::tuple<at::Tensor, at::Tensor, at::Tensor> lm_head_loss_bwd(
    const at::Tensor& dloss, const at::Tensor& hidden, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& labels, double label_smoothing,
    c10::string_view reduction);

}  // namespace blip_fast
