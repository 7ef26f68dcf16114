// Torch-typed host functions, one per registered kernel (csrc/torch_bindings.cpp registers them
// for the schemas defined in blip_fast/ops/*.py). Each checks its tensors, dispatches on dtype
// and calls the cpu:: or cuda:: launcher for the tensors' device.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace blip_fast {

// q [B, H, Lq, D], k / v [B, H, Lk, D], key_padding_mask [B, Lk] bool (true = attend) or none
// -> out [B, H, Lq, D] (q's dtype), lse [B, H, Lq] fp32.
std::tuple<at::Tensor, at::Tensor> cross_attention_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& key_padding_mask, double scale);

// dout / out [B, H, Lq, D], q [B, H, Lq, D], k / v [B, H, Lk, D], key_padding_mask [B, Lk] or
// none, lse [B, H, Lq] fp32 (from cross_attention_fwd) -> dq, dk, dv shaped like q, k, v.
std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_attention_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& key_padding_mask, const at::Tensor& out,
    const at::Tensor& lse, double scale);

}  // namespace blip_fast
