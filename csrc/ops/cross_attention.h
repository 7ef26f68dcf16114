// The cross-attention forward on q's device and the CPU backward, shared by the host functions
// of cross_attention_fwd / _bwd and gathered_cross_attention_fwd / _bwd (csrc/ops/).
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace blip_fast {

// q [B, H, Lq, D], k / v [N, H, Lk, D], key_padding_mask [B, Lk] bool or none, kv_index [B]
// int64 in [0, N) or none (then N = B) -> out [B, H, Lq, D] (q's dtype), lse [B, H, Lq] fp32:
// batch entry b attends over K / V row kv_index[b], else row b. causal (CPU only, without
// kv_index): query i sees keys j <= Lk − Lq + i. dropout_p > 0 (CPU only) drops attention
// probabilities by the counter hash of core/dropout.h seeded with dropout_seed[0]. The caller
// has checked the arguments, indices included; `op` names the calling op in errors.
std::tuple<at::Tensor, at::Tensor> run_cross_attention_fwd(
    const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& kv_index,
    double scale, bool causal, double dropout_p, const std::optional<at::Tensor>& dropout_seed);

// dout / out [B, H, Lq, D] and lse [B, H, Lq] fp32 (checked here), the forward's other
// arguments (checked by the caller; a key_padding_mask or a kv_index, not both) -> dq, dk, dv
// shaped like q, k, v. With kv_index, dk / dv of row n sum over the batch entries that read it
// and are 0 for a row none reads. CPU only.
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_cross_attention_bwd(
    const char* op, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& kv_index, const at::Tensor& out, const at::Tensor& lse,
    double scale, bool causal, double dropout_p, const std::optional<at::Tensor>& dropout_seed);

}  // namespace blip_fast
