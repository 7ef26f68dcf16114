// OpenMP cross-attention kernels: FlashAttention's tiling on CPU. The forward keeps an online
// softmax over key tiles; the backward recomputes the probabilities from the saved lse
// (dS = P ∘ (dP − rowsum(dO ∘ O))). Memory per thread is one [kBlockQ, kBlockK] score tile and
// its operand tiles (plus, in the backward, the query-side rows of one K / V head), never
// [B, H, Lq, Lk].
//
// With a K / V row index (gathered cross-attention: P pairs over N images), the backward works
// per image and head: the queries of every pair reading the image form one block of rows, so
// its dK / dV sum over those pairs inside one work item, with no atomics or reduction pass.
//
// All products go through one micro-kernel (vec.h), on tiles in the compute type (fp32, or
// fp64 for fp64 inputs) padded to its block sizes; a bf16 forward on a CPU with bf16 dot
// products runs cross_attention_bf16.cpp instead. Both passes hold scores transposed (keys x
// queries, the queries as vector lanes), so key and value rows are the products' row operand,
// never transposed: the forward reads fp32 / fp64 rows where they lie (fp16 / bf16 tiles and a
// tile's ragged last rows are copied into per-thread scratch); the backward copies every tile,
// and its key rows past Lk get score −inf, so their probabilities are exactly 0.
#include "cpu/cross_attention.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cpu/attention_tiles.h"
#include "cpu/cross_attention_bf16.h"
#include "cpu/vec.h"

namespace blip_fast::cpu {
namespace {

using vec::kMR;
using vec::kWidth;
using vec::Vec;

using tiles::kBlockK;
using tiles::kBlockQ;
using tiles::load_mask;
using tiles::round_up;

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// rows × D elements of one head starting at row `row0`, into dst[rows, ld].
template <typename scalar_t, typename acc_t>
BLIP_FAST_INLINE void load_rows(const Operand& x, int64_t b, int64_t h, int64_t row0, int64_t rows,
                                int64_t D, acc_t* dst, int64_t ld) {
  const auto* src = static_cast<const scalar_t*>(x.data) + b * x.batch_stride + h * x.head_stride;
  for (int64_t i = 0; i < rows; ++i) {
    const scalar_t* row = src + (row0 + i) * x.row_stride;
    for (int64_t d = 0; d < D; ++d) dst[i * ld + d] = static_cast<acc_t>(row[d]);
  }
}

template <typename scalar_t, typename acc_t>
BLIP_FAST_INLINE void store_rows(const acc_t* src, int64_t ld, int64_t rows, int64_t D,
                                 scalar_t* dst) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t d = 0; d < D; ++d) dst[i * D + d] = static_cast<scalar_t>(src[i * ld + d]);
}

// Per-thread tiles of the forward. Scores are held transposed, st[key, query]: the queries are
// the vector lanes, so keys are the broadcast operand of both products and fp32 / fp64 key and
// value tiles are read where they lie, never copied or transposed per tile.
template <typename acc_t>
struct FwdScratch {
  int64_t dp;  // head_dim rounded up to kWidth
  std::vector<acc_t> qt, st, k, v, o, m, l, correction, mask_add;
  explicit FwdScratch(int64_t head_dim)
      : dp(round_up(head_dim, kWidth)), qt(dp * kBlockQ), st(kBlockK * kBlockQ), k(kBlockK * dp),
        v(kBlockK * dp), o(kBlockQ * dp), m(kBlockQ), l(kBlockQ), correction(kBlockQ),
        mask_add(kBlockK) {}
};

// One (batch, head, query tile) of the forward.
template <typename scalar_t>
BLIP_FAST_TARGET_CLONES void fwd_tile(const CrossAttentionFwdParams& p, int64_t item,
                                      FwdScratch<acc_type<scalar_t>>& w) {
  using acc_t = acc_type<scalar_t>;
  constexpr bool kInPlace = std::is_same_v<scalar_t, acc_t>;  // no conversion needed
  const int64_t q_tiles = tiles::query_tiles(p);
  const int64_t bh = item / q_tiles, b = bh / p.heads, h = bh % p.heads;
  const int64_t kb = tiles::kv_row(p, b);
  const int64_t i0 = (item % q_tiles) * kBlockQ, bq = std::min(kBlockQ, p.q_len - i0);
  const int64_t bq_pad = round_up(bq, kMR), lanes = round_up(bq, kWidth);
  const int64_t D = p.head_dim, dp = w.dp;
  const acc_t scale = static_cast<acc_t>(p.scale);
  const auto* k_head = static_cast<const scalar_t*>(p.k.data) + kb * p.k.batch_stride +
                       h * p.k.head_stride;
  const auto* v_head = static_cast<const scalar_t*>(p.v.data) + kb * p.v.batch_stride +
                       h * p.v.head_stride;

  std::fill(w.o.begin(), w.o.end(), acc_t(0));
  std::fill(w.m.begin(), w.m.end(), -std::numeric_limits<acc_t>::infinity());
  std::fill(w.l.begin(), w.l.end(), acc_t(0));
  std::fill(w.qt.begin(), w.qt.begin() + D * lanes, acc_t(0));  // padding lanes score 0
  const auto* q_src = static_cast<const scalar_t*>(p.q.data) + b * p.q.batch_stride +
                      h * p.q.head_stride;
  for (int64_t i = 0; i < bq; ++i)
    for (int64_t d = 0; d < D; ++d)
      w.qt[d * lanes + i] = static_cast<acc_t>(q_src[(i0 + i) * p.q.row_stride + d]);

  for (int64_t j0 = 0; j0 < p.k_len; j0 += kBlockK) {
    const int64_t bk = std::min(kBlockK, p.k_len - j0), bk_pad = round_up(bk, kMR);
    // K rows in place, unless they need converting or a tile's last rows would read past Lk
    const acc_t* k_rows = w.k.data();
    int64_t ldk = dp;
    if constexpr (kInPlace) {
      if (bk == bk_pad) k_rows = k_head + j0 * p.k.row_stride, ldk = p.k.row_stride;
    }
    if (k_rows == w.k.data()) {
      load_rows<scalar_t>(p.k, kb, h, j0, bk, D, w.k.data(), dp);
      std::fill(w.k.begin() + bk * dp, w.k.begin() + bk_pad * dp, acc_t(0));
    }
    load_mask(p, b, j0, bk, w.mask_add.data());
    vec::gemm<false>(bk_pad, lanes, D, k_rows, ldk, w.qt.data(), lanes, w.st.data(), lanes);

    tiles::online_softmax(w.st.data(), lanes, bk, scale, w.mask_add.data(),
                          tiles::causal_shift(p, i0, j0), w.m.data(), w.l.data(),
                          w.correction.data());
    if (p.dropout.p > 0.0)  // after the row sums l, which count every key
      tiles::drop_transposed(p.dropout, w.st.data(), lanes, bq, bk,
                             static_cast<uint64_t>((bh * p.q_len + i0) * p.k_len + j0), p.k_len);
    for (int64_t i = 0; i < bq; ++i) {
      acc_t* o = w.o.data() + i * dp;
      for (int64_t d = 0; d < dp; d += kWidth)
        vec::store(o + d, vec::load(o + d) * w.correction[i]);
    }
    // O += P V with P(i, j) = st[j, i]; V rows in place when they hold whole vectors
    const acc_t* v_rows = w.v.data();
    int64_t ldv = dp;
    if constexpr (kInPlace) {
      if (D == dp) v_rows = v_head + j0 * p.v.row_stride, ldv = p.v.row_stride;
    }
    if (v_rows == w.v.data()) load_rows<scalar_t>(p.v, kb, h, j0, bk, D, w.v.data(), dp);
    vec::gemm<true>(bq_pad, dp, bk, w.st.data(), 1, v_rows, ldv, w.o.data(), dp, lanes);
  }

  auto* out = static_cast<scalar_t*>(p.out) + ((b * p.heads + h) * p.q_len + i0) * D;
  float* lse = p.lse + (b * p.heads + h) * p.q_len + i0;
  for (int64_t i = 0; i < bq; ++i) {
    const acc_t inv = acc_t(1) / w.l[i];
    for (int64_t d = 0; d < D; ++d) out[i * D + d] = static_cast<scalar_t>(w.o[i * dp + d] * inv);
    lse[i] = static_cast<float>(w.m[i] + std::log(w.l[i]));
  }
}

// The batch entries grouped by the K / V row they read, in increasing order within a group (a
// counting sort): entries order[offsets[n]], ..., order[offsets[n + 1] − 1] read row n. Without
// kv_index, row b is read by entry b alone.
struct KvGroups {
  std::vector<int64_t> offsets;  // [N + 1]
  std::vector<int64_t> order;    // [B]
  int64_t largest;               // entries in the largest group
};

KvGroups group_by_kv_row(const CrossAttentionBwdParams& p) {
  KvGroups g{std::vector<int64_t>(p.kv_batch + 1, 0), std::vector<int64_t>(p.batch), 0};
  for (int64_t b = 0; b < p.batch; ++b) ++g.offsets[tiles::kv_row(p, b) + 1];
  for (int64_t n = 0; n < p.kv_batch; ++n) {
    g.largest = std::max(g.largest, g.offsets[n + 1]);
    g.offsets[n + 1] += g.offsets[n];
  }
  std::vector<int64_t> next(g.offsets.begin(), g.offsets.end() - 1);
  for (int64_t b = 0; b < p.batch; ++b) g.order[next[tiles::kv_row(p, b)]++] = b;
  return g;
}

// Query rows per backward tile: kBlockQ, but a last tile takes up to one vector more rather
// than leave a remainder of a few lanes, whose products over 64 keys would run 1-vector blocks
// that wait on FMA latency (ViT-B/224's 197 rows: 64 + 64 + 69, not 64 x 3 + 5; 32 x 12 heads
// backward 47 -> 40 ms on a 2-core Xeon).
constexpr int64_t kBwdLanes = kBlockQ + kWidth;

// Per-thread buffers of the backward: the query-side rows of one work item (sized for the
// largest group of batch entries), row-major and transposed, one key tile and the score tiles.
// Scores are held transposed, keys x queries, as in the forward: K and V rows are then the
// products' row operand and are never transposed, and the probabilities feed dV / dK as they
// lie (dQ reads them transposed, which the micro-kernel's broadcast operand does for free).
template <typename acc_t>
struct BwdScratch {
  int64_t dp, lanes;                             // head_dim, rows rounded up to kBwdLanes
  std::vector<acc_t> q, dout, dq;                // [rows, dp]
  std::vector<acc_t> qt, dot, lse, delta;        // [D, lanes] / [lanes]
  std::vector<acc_t> k, v, dk, dv, mask_add;     // one key tile
  std::vector<acc_t> kept;                       // one key's dropout scale per query lane
  std::vector<uint64_t> counter;                 // dropout counters of a query tile's rows
  std::vector<acc_t> st, dst;                    // [kBlockK, kBwdLanes]: Pᵀ and dSᵀ
  BwdScratch(int64_t head_dim, int64_t rows)
      : dp(round_up(head_dim, kWidth)), lanes(round_up(rows, kBwdLanes)), q(lanes * dp),
        dout(q.size()), dq(q.size()), qt(head_dim * lanes), dot(qt.size()), lse(lanes),
        delta(lanes), k(kBlockK * dp), v(kBlockK * dp), dk(kBlockK * dp), dv(kBlockK * dp),
        mask_add(kBlockK), kept(kWidth, acc_t(1)), counter(kBwdLanes), st(kBlockK * kBwdLanes),
        dst(kBlockK * kBwdLanes) {}
};

// w.counter[l]: the dropout counter of key 0 for stacked query row i0 + l (entry row / Lq of
// the group, query row % Lq) of head h, for the rows of one query tile.
template <typename acc_t>
BLIP_FAST_INLINE void dropout_counters(const CrossAttentionBwdParams& p, const int64_t* entries,
                                       int64_t h, int64_t i0, int64_t bq,
                                       BwdScratch<acc_t>& w) {
  for (int64_t l = 0; l < bq; ++l) {
    const int64_t b = entries[(i0 + l) / p.q_len], i = (i0 + l) % p.q_len;
    w.counter[l] = static_cast<uint64_t>(((b * p.heads + h) * p.q_len + i) * p.k_len);
  }
}

// w.kept[l] = 1 / (1 − p) or 0: the forward's dropout of key `key` for query lanes c + l of
// the tile (dropout_counters); 1 past its last row.
template <typename acc_t>
BLIP_FAST_INLINE void keep_scales(const CrossAttentionBwdParams& p, int64_t c, int64_t bq,
                                  int64_t key, BwdScratch<acc_t>& w) {
  const acc_t kept = static_cast<acc_t>(1.0 / (1.0 - p.dropout.p));
  const int64_t last = std::min<int64_t>(kWidth, bq - c);
  for (int64_t l = 0; l < last; ++l) {
    const uint64_t bits = dropout_bits(w.counter[c + l] + key, p.dropout.seed);
    w.kept[l] = bits >= p.dropout.threshold ? kept : acc_t(0);
  }
  for (int64_t l = last; l < kWidth; ++l) w.kept[l] = acc_t(1);
}

// One (K / V row n, head h) of the backward, its query-side rows those of every batch entry
// that reads row n, stacked. Outer loop over key tiles (their dK, dV finish inside it), inner
// loop over query tiles (dQ accumulates across key tiles).
template <typename scalar_t>
BLIP_FAST_TARGET_CLONES void bwd_item(const CrossAttentionBwdParams& p, const KvGroups& groups,
                                      int64_t item, BwdScratch<acc_type<scalar_t>>& w) {
  using acc_t = acc_type<scalar_t>;
  const int64_t n = item / p.heads, h = item % p.heads, D = p.head_dim, dp = w.dp, Lq = p.q_len;
  const int64_t* entries = groups.order.data() + groups.offsets[n];
  const int64_t count = groups.offsets[n + 1] - groups.offsets[n];
  const int64_t rows = count * Lq, rows_lanes = round_up(rows, kWidth);
  const int64_t ld = w.lanes;  // leading dimension of the transposed rows
  const acc_t scale = static_cast<acc_t>(p.scale);
  auto* dk = static_cast<scalar_t*>(p.dk) + (n * p.heads + h) * p.k_len * D;
  auto* dv = static_cast<scalar_t*>(p.dv) + (n * p.heads + h) * p.k_len * D;
  if (count == 0) {  // a K / V row no entry reads (an image without pairs)
    std::fill(dk, dk + p.k_len * D, scalar_t(0));
    std::fill(dv, dv + p.k_len * D, scalar_t(0));
    return;
  }

  for (int64_t e = 0; e < count; ++e) {
    const int64_t b = entries[e];
    acc_t* q = w.q.data() + e * Lq * dp;
    acc_t* dout = w.dout.data() + e * Lq * dp;
    load_rows<scalar_t>(p.q, b, h, 0, Lq, D, q, dp);
    load_rows<scalar_t>(p.dout, b, h, 0, Lq, D, dout, dp);
    const auto* out = static_cast<const scalar_t*>(p.out.data) + b * p.out.batch_stride +
                      h * p.out.head_stride;
    const float* lse = p.lse + (b * p.heads + h) * Lq;
    for (int64_t i = 0; i < Lq; ++i) {  // delta_i = dO_i · O_i, the softmax-gradient correction
      acc_t sum = 0;
      for (int64_t d = 0; d < D; ++d) {
        sum += dout[i * dp + d] * static_cast<acc_t>(out[i * p.out.row_stride + d]);
        w.qt[d * ld + e * Lq + i] = q[i * dp + d];
        w.dot[d * ld + e * Lq + i] = dout[i * dp + d];
      }
      w.delta[e * Lq + i] = sum;
      w.lse[e * Lq + i] = lse[i];
    }
  }
  // Padding query lanes score 0 with lse = delta = 0: their dS is 0, and no product reads
  // their P past the last row.
  for (int64_t d = 0; d < D; ++d) {
    std::fill(w.qt.begin() + d * ld + rows, w.qt.begin() + d * ld + rows_lanes, acc_t(0));
    std::fill(w.dot.begin() + d * ld + rows, w.dot.begin() + d * ld + rows_lanes, acc_t(0));
  }
  std::fill(w.lse.begin() + rows, w.lse.begin() + rows_lanes, acc_t(0));
  std::fill(w.delta.begin() + rows, w.delta.begin() + rows_lanes, acc_t(0));
  std::fill(w.dq.begin(), w.dq.begin() + round_up(rows, kMR) * dp, acc_t(0));

  for (int64_t j0 = 0; j0 < p.k_len; j0 += kBlockK) {
    const int64_t bk = std::min(kBlockK, p.k_len - j0), bk_pad = round_up(bk, kMR);
    std::fill(w.dk.begin(), w.dk.end(), acc_t(0));
    std::fill(w.dv.begin(), w.dv.end(), acc_t(0));
    load_rows<scalar_t>(p.k, n, h, j0, bk, D, w.k.data(), dp);
    load_rows<scalar_t>(p.v, n, h, j0, bk, D, w.v.data(), dp);
    std::fill(w.k.begin() + bk * dp, w.k.begin() + bk_pad * dp, acc_t(0));
    std::fill(w.v.begin() + bk * dp, w.v.begin() + bk_pad * dp, acc_t(0));
    // a key_padding_mask comes without kv_index, so its group is one batch entry
    load_mask(p, entries[0], j0, bk, w.mask_add.data());

    for (int64_t i0 = 0, bq = 0; i0 < rows; i0 += bq) {
      bq = rows - i0 <= kBwdLanes ? rows - i0 : kBlockQ;
      const int64_t bq_pad = round_up(bq, kMR);
      const int64_t lanes = round_up(bq, kWidth);
      vec::gemm<false>(bk_pad, lanes, D, w.k.data(), dp, w.qt.data() + i0, ld, w.st.data(),
                       kBwdLanes);
      vec::gemm<false>(bk_pad, lanes, D, w.v.data(), dp, w.dot.data() + i0, ld, w.dst.data(),
                       kBwdLanes);
      // st becomes Pᵀ = exp(score − lse) and dst (holding dPᵀ) dSᵀ = P ∘ (dP − delta) · scale.
      // With dropout, st becomes the dropped P that multiplied V and dP is taken through the
      // same mask (`kept`). Causal: query lane l sees key j iff j <= l + shift (a causal group
      // is one entry, so lane l is query i0 + l).
      const int64_t shift = tiles::causal_shift(p, i0, j0);
      if (p.dropout.p > 0.0) dropout_counters(p, entries, h, i0, bq, w);
      for (int64_t j = 0; j < bk_pad; ++j) {
        acc_t* st = w.st.data() + j * kBwdLanes;
        acc_t* dst = w.dst.data() + j * kBwdLanes;
        const Vec<acc_t> key_add = vec::broadcast(w.mask_add[j]);
        for (int64_t c = 0; c < lanes; c += kWidth) {
          if (p.dropout.p > 0.0 && j < bk) keep_scales(p, c, bq, j0 + j, w);
          const Vec<acc_t> add = tiles::causal_masked<acc_t>(key_add, 0, j - shift - c);
          const Vec<acc_t> prob = vec::exp(vec::load(st + c) * scale + add -
                                           vec::load(w.lse.data() + i0 + c));
          const Vec<acc_t> kept = vec::load(w.kept.data());
          vec::store(st + c, prob * kept);
          vec::store(dst + c, prob * (vec::load(dst + c) * kept -
                                      vec::load(w.delta.data() + i0 + c)) * scale);
        }
      }
      const acc_t* q = w.q.data() + i0 * dp;
      const acc_t* dout = w.dout.data() + i0 * dp;
      vec::gemm<true>(bk_pad, dp, bq, w.st.data(), kBwdLanes, dout, dp, w.dv.data(), dp);
      vec::gemm<true>(bk_pad, dp, bq, w.dst.data(), kBwdLanes, q, dp, w.dk.data(), dp);
      vec::gemm<true>(bq_pad, dp, bk, w.dst.data(), 1, w.k.data(), dp, w.dq.data() + i0 * dp,
                      dp, kBwdLanes);
    }
    store_rows(w.dk.data(), dp, bk, D, dk + j0 * D);
    store_rows(w.dv.data(), dp, bk, D, dv + j0 * D);
  }
  for (int64_t e = 0; e < count; ++e) {
    const int64_t bh = entries[e] * p.heads + h;
    store_rows(w.dq.data() + e * Lq * dp, dp, Lq, D, static_cast<scalar_t*>(p.dq) + bh * Lq * D);
  }
}

template <typename scalar_t>
void fwd(const CrossAttentionFwdParams& p, int num_threads) {
  const std::vector<int64_t> order = tiles::item_order(p);
  const int64_t items = static_cast<int64_t>(order.size());
#pragma omp parallel num_threads(num_threads)
  {
    FwdScratch<acc_type<scalar_t>> scratch(p.head_dim);
#pragma omp for schedule(static)
    for (int64_t n = 0; n < items; ++n) {
      if (p.kv_index != nullptr) tiles::prefetch_next_group<scalar_t>(p, order, n);
      fwd_tile<scalar_t>(p, order[n], scratch);
    }
  }
}

template <typename scalar_t>
void bwd(const CrossAttentionBwdParams& p, int num_threads) {
  const KvGroups groups = group_by_kv_row(p);
  const int64_t items = p.kv_batch * p.heads;
#pragma omp parallel num_threads(num_threads)
  {
    BwdScratch<acc_type<scalar_t>> scratch(p.head_dim, groups.largest * p.q_len);
    if (p.kv_index == nullptr) {
#pragma omp for schedule(static)
      for (int64_t item = 0; item < items; ++item) bwd_item<scalar_t>(p, groups, item, scratch);
    } else {  // groups differ in size: each thread takes the next item when it finishes one
#pragma omp for schedule(dynamic)
      for (int64_t item = 0; item < items; ++item) bwd_item<scalar_t>(p, groups, item, scratch);
    }
  }
}

// Calls run(scalar_t{}) with scalar_t the element type of dtype.
template <typename Run>
void dispatch_dtype(Dtype dtype, Run&& run) {
  switch (dtype) {
    case Dtype::kFloat32: return run(float{});
    case Dtype::kFloat64: return run(double{});
    case Dtype::kFloat16: return run(c10::Half{});
    case Dtype::kBFloat16: return run(c10::BFloat16{});
  }
}

}  // namespace

void cross_attention_fwd(const CrossAttentionFwdParams& params, int num_threads) {
  if (params.dtype == Dtype::kBFloat16 && params.dropout.p == 0.0) {
    if (const Bf16Products products = bf16_products(); products != Bf16Products::kFp32)
      return cross_attention_fwd_bf16(params, products, num_threads);
  }
  dispatch_dtype(params.dtype, [&](auto zero) { fwd<decltype(zero)>(params, num_threads); });
}

void cross_attention_bwd(const CrossAttentionBwdParams& params, int num_threads) {
  dispatch_dtype(params.dtype, [&](auto zero) { bwd<decltype(zero)>(params, num_threads); });
}

}  // namespace blip_fast::cpu
