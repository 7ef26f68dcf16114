// OpenMP gathered cross-attention forward: the cross-attention forward (cross_attention.cpp,
// parallel over (pair, head, query tile) items) with its K / V row index switched on, so each
// item reads the key tiles of row image_index[pair] of the caches in place.
#include "cpu/gathered_cross_attention.h"

namespace blip_fast::cpu {

void gathered_cross_attention_fwd(const GatheredCrossAttentionParams& params) {
  CrossAttentionFwdParams p{};
  p.dtype = params.dtype;
  p.q = params.q;
  p.k = params.k_cache;
  p.v = params.v_cache;
  p.key_padding_mask = nullptr;  // image tokens are all attended
  p.batch = params.pairs;
  p.heads = params.heads;
  p.q_len = params.q_len;
  p.k_len = params.k_len;
  p.head_dim = params.head_dim;
  p.scale = params.scale;
  p.num_threads = params.num_threads;
  p.kv_index = params.image_index;
  p.out = params.out;
  p.lse = params.lse;
  cross_attention_fwd(p);
}

}  // namespace blip_fast::cpu
