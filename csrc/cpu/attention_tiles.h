// Tiling shared by the cross-attention forward kernels of csrc/cpu/cross_attention.cpp (fp32 /
// fp64 products) and csrc/cpu/cross_attention_bf16.cpp (bf16 products): tile sizes, the key
// mask, the online-softmax step, the order of the items and the K / V prefetch of gathered ones.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#include "cpu/cross_attention.h"
#include "cpu/vec.h"

namespace blip_fast::cpu::tiles {

// Query rows per tile: BLIP's text side (Lq <= 40) is a single tile, so each key tile is
// loaded once per head. Keys per tile: swept over 32 / 64 / 128 on an AMD EPYC with AVX-512 (one
// thread, 16 × 12 heads × 35 queries, D = 64, best of 7): 64 gave the fastest backward
// (Lk 577: 46 ms vs 51 at 32 and 50 at 128) and a forward within 5% of the best (Lk 197:
// 8.1 ms vs 7.7 at 128; Lk 577: 19.5 ms vs 20.1 at 128 and 24.0 at 32).
constexpr int64_t kBlockQ = 64;
constexpr int64_t kBlockK = 64;
static_assert(kBlockK % vec::kWidth == 0 && kBlockQ % vec::kMR == 0, "tiles hold whole blocks");
// Official BERT adds (1 − mask) · −10000 to the scores instead of −inf.
constexpr double kMaskValue = -10000.0;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// The K / V row batch entry b reads: kv_index[b] (gathered) or b.
inline int64_t kv_row(const CrossAttentionParams& p, int64_t b) {
  return p.kv_index == nullptr ? b : p.kv_index[b];
}

inline int64_t query_tiles(const CrossAttentionParams& p) {
  return (p.q_len + kBlockQ - 1) / kBlockQ;
}

// A causal shift (causal_shift) under which every query sees every key.
constexpr int64_t kSeesAll = std::numeric_limits<int64_t>::max() / 4;

// Query i0 + i sees key j0 + j iff j <= i + causal_shift(p, i0, j0) (kSeesAll without causal).
inline int64_t causal_shift(const CrossAttentionParams& p, int64_t i0, int64_t j0) {
  return p.causal ? p.k_len - p.q_len + i0 - j0 : kSeesAll;
}

// `add` (what a vector of keys adds to scores) with lanes [first, last) of the vector masked by
// the causal mask too: min(add, −10000), so a key masked both ways still adds −10000 once.
template <typename acc_t>
BLIP_FAST_INLINE vec::Vec<acc_t> causal_masked(vec::Vec<acc_t> add, int64_t first, int64_t last) {
  first = std::max<int64_t>(first, 0);
  last = std::min<int64_t>(last, vec::kWidth);
  if (first >= last) return add;
  const vec::Vec<acc_t> limit = vec::broadcast(static_cast<acc_t>(kMaskValue));
  const vec::Vec<acc_t> masked = add < limit ? add : limit;
  if (first == 0 && last == vec::kWidth) return masked;
  vec::Vec<acc_t> lane;
  for (int64_t l = 0; l < vec::kWidth; ++l) lane[l] = static_cast<acc_t>(l);
  const vec::Vec<acc_t> lo = vec::broadcast(static_cast<acc_t>(first));
  const vec::Vec<acc_t> hi = vec::broadcast(static_cast<acc_t>(last));
  return (lane >= lo) & (lane < hi) ? masked : add;
}

// What each key j0 + j of batch b adds to its scores: 0 to attend, −10000 for padding, −inf
// past the last key.
template <typename acc_t>
BLIP_FAST_INLINE void load_mask(const CrossAttentionParams& p, int64_t b, int64_t j0, int64_t bk,
                                acc_t* dst) {
  const bool* mask =
      p.key_padding_mask == nullptr ? nullptr : p.key_padding_mask + b * p.k_len + j0;
  for (int64_t j = 0; j < bk; ++j)
    dst[j] = mask == nullptr || mask[j] ? acc_t(0) : static_cast<acc_t>(kMaskValue);
  std::fill(dst + bk, dst + kBlockK, -std::numeric_limits<acc_t>::infinity());
}

// One key tile of the online softmax on transposed scores st[key, query] (queries as vector
// lanes, `lanes` of them): the first bk rows of st become exp(score · scale + mask − running
// max); the running max m and sum l are updated, and correction gets the factor by which what
// earlier tiles summed must be rescaled (0 on the first tile). Query lane i sees key j iff
// j <= i + shift (causal_shift).
template <typename acc_t>
BLIP_FAST_INLINE void online_softmax(acc_t* st, int64_t lanes, int64_t bk, acc_t scale,
                                     const acc_t* mask_add, int64_t shift, acc_t* m, acc_t* l,
                                     acc_t* correction) {
  using vec::Vec;
  for (int64_t c = 0; c < lanes; c += vec::kWidth) {
    const Vec<acc_t> m_old = vec::load(m + c);
    Vec<acc_t> m_new = m_old;
    for (int64_t j = 0; j < bk; ++j) {
      acc_t* s = st + j * lanes + c;
      // query lanes c + l < j − shift do not see key j
      const Vec<acc_t> add = causal_masked<acc_t>(vec::broadcast(mask_add[j]), 0, j - shift - c);
      const Vec<acc_t> x = vec::load(s) * scale + add;
      vec::store(s, x);
      m_new = x > m_new ? x : m_new;
    }
    Vec<acc_t> sum{};
    for (int64_t j = 0; j < bk; ++j) {
      acc_t* s = st + j * lanes + c;
      const Vec<acc_t> prob = vec::exp(vec::load(s) - m_new);
      vec::store(s, prob);
      sum += prob;
    }
    const Vec<acc_t> rescale = vec::exp(m_old - m_new);
    vec::store(l + c, vec::load(l + c) * rescale + sum);
    vec::store(m + c, m_new);
    vec::store(correction + c, rescale);
  }
}

// Attention dropout on transposed probabilities st[key, query] of one tile: element (i, j)
// (query i, key j of the tile, counter counter0 + i·Lk + j) is scaled by 1 / (1 − p) or zeroed.
template <typename acc_t>
BLIP_FAST_INLINE void drop_transposed(const Dropout& d, acc_t* st, int64_t lanes, int64_t bq,
                                      int64_t bk, uint64_t counter0, int64_t k_len) {
  const acc_t kept = static_cast<acc_t>(1.0 / (1.0 - d.p));
  for (int64_t j = 0; j < bk; ++j) {
    acc_t* s = st + j * lanes;
    for (int64_t i = 0; i < bq; ++i) {
      const uint64_t c = counter0 + static_cast<uint64_t>(i * k_len + j);
      s[i] = dropout_bits(c, d.seed) >= d.threshold ? s[i] * kept : acc_t(0);
    }
  }
}

// Asks for the K / V rows of forward item `item` ahead of use. Gathered (ITM reranking),
// consecutive pairs attend over different images whose K / V are rarely in cache: 128 pairs
// x 4 heads x 23 queries over 65 tokens took 4.0-4.4 ms with 200 images' caches vs 2.5-2.8
// with 8; prefetching 2 items ahead: 3.6-3.7 ms (1 ahead: 3.7-4.2, 3: 3.8; AMD EPYC, 1 thread,
// best of 7, a noisy VM).
template <typename scalar_t>
BLIP_FAST_INLINE void prefetch_kv(const CrossAttentionFwdParams& p, int64_t item) {
  constexpr int64_t kLine = 64 / sizeof(scalar_t);  // elements per cache line
  const int64_t bh = item / query_tiles(p), kb = kv_row(p, bh / p.heads), h = bh % p.heads;
  for (const Operand* x : {&p.k, &p.v}) {
    const auto* head = static_cast<const scalar_t*>(x->data) + kb * x->batch_stride +
                       h * x->head_stride;
    for (int64_t j = 0; j < p.k_len; ++j)
      for (int64_t d = 0; d < p.head_dim; d += kLine)
        __builtin_prefetch(head + j * x->row_stride + d, 0, 3);
  }
}

// The forward items (b·H + h)·query_tiles + t in the order they run: gathered, the pairs of one
// image and head one after another (pairs by image, stable), so that they read that image's
// K / V from cache, and the bf16 kernel packs it once for all of them. At the BERT-base
// reranker's shape (128 pairs x 12 heads x 24 queries over 32 images' 197 keys, 2 threads) the
// gathered forward took, in pair order / grouped: fp32 11.5 / 9.9 ms, bf16 7.5 / 6.9 ms (bf16
// grouped: packing once per image and head instead of once per pair).
inline std::vector<int64_t> item_order(const CrossAttentionFwdParams& p) {
  const int64_t q_tiles = query_tiles(p);
  std::vector<int64_t> order(p.batch * p.heads * q_tiles);
  if (p.kv_index == nullptr) {
    std::iota(order.begin(), order.end(), 0);
    return order;
  }
  std::vector<int64_t> pairs(p.batch);
  std::iota(pairs.begin(), pairs.end(), 0);
  std::stable_sort(pairs.begin(), pairs.end(),
                   [&](int64_t a, int64_t b) { return p.kv_index[a] < p.kv_index[b]; });
  auto next = order.begin();
  for (int64_t first = 0, last = 0; first < p.batch; first = last) {
    while (last < p.batch && p.kv_index[pairs[last]] == p.kv_index[pairs[first]]) ++last;
    for (int64_t h = 0; h < p.heads; ++h)
      for (int64_t i = first; i < last; ++i)
        for (int64_t t = 0; t < q_tiles; ++t) *next++ = (pairs[i] * p.heads + h) * q_tiles + t;
  }
  return order;
}

// The (K / V row)·H + head that forward item `item` reads.
inline int64_t kv_of_item(const CrossAttentionFwdParams& p, int64_t item) {
  const int64_t bh = item / query_tiles(p);
  return kv_row(p, bh / p.heads) * p.heads + bh % p.heads;
}

// When the n-th item of `order` starts another K / V than the one before it, asks for the K / V
// of the next group (the first later item that reads other K / V) ahead of use.
template <typename scalar_t>
BLIP_FAST_INLINE void prefetch_next_group(const CrossAttentionFwdParams& p,
                                          const std::vector<int64_t>& order, int64_t n) {
  const int64_t items = static_cast<int64_t>(order.size()), kv = kv_of_item(p, order[n]);
  if (n > 0 && kv_of_item(p, order[n - 1]) == kv) return;
  int64_t next = n + 1;
  while (next < items && kv_of_item(p, order[next]) == kv) ++next;
  if (next < items) prefetch_kv<scalar_t>(p, order[next]);
}

}  // namespace blip_fast::cpu::tiles
