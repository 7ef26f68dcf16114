// The bf16 cross-attention forward on the CPU's bf16 instructions (AMX, AVX512-BF16),
// csrc/cpu/cross_attention_bf16.cpp, which csrc/cpu/cross_attention.cpp runs in place of its
// fp32-compute path where the CPU has them.
#pragma once

#include "core/cross_attention.h"

namespace blip_fast::cpu {

// The instructions that run a bf16 forward's products: the best this CPU (and OS) offers, capped
// by the environment variable BLIP_FAST_CPU_BF16_PRODUCTS = "amx" (the default), "avx512_bf16"
// or "fp32" (bf16 converted to fp32 and computed as fp32 is, by cross_attention.cpp; any other
// value throws std::invalid_argument), to compare the paths. Read at every call.
enum class Bf16Products { kFp32, kAvx512Bf16, kAmx };
Bf16Products bf16_products();

// cross_attention_fwd for bf16 q / k / v with S = Q Kᵀ and O += P V as bf16 products accumulated
// in fp32, on `products` (not kFp32); softmax statistics, lse and O stay fp32.
void cross_attention_fwd_bf16(const CrossAttentionFwdParams& params, Bf16Products products,
                              int num_threads);

}  // namespace blip_fast::cpu
