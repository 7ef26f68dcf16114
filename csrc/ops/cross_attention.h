// The cross-attention forward on q's device, shared by the host functions of
// cross_attention_fwd and gathered_cross_attention_fwd (csrc/ops/).
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace blip_fast {

// q [B, H, Lq, D], k / v [N, H, Lk, D], key_padding_mask [B, Lk] bool or none, kv_index [B]
// int64 in [0, N) or none (then N = B) -> out [B, H, Lq, D] (q's dtype), lse [B, H, Lq] fp32:
// batch entry b attends over K / V row kv_index[b], else row b. The caller has checked the
// arguments, indices included; `op` names the calling op in errors.
std::tuple<at::Tensor, at::Tensor> run_cross_attention_fwd(
    const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& kv_index,
    double scale);

}  // namespace blip_fast
