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
// products runs cross_attention_bf16.cpp instead. The forward holds scores transposed (keys
// x queries, the queries as vector lanes), so fp32 / fp64 key and value rows are read where
// they lie; fp16 / bf16 tiles and a tile's ragged last rows are copied into per-thread scratch.
// The backward copies every tile; its key columns past Lk get score −inf, so their
// probabilities are exactly 0.
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

// A key tile transposed, dst[D, kBlockK] with dst[d, j] = x[j0 + j, d]; columns past `bk` are
// zeroed so that their scores are finite before the −inf of load_mask is added.
template <typename scalar_t, typename acc_t>
BLIP_FAST_INLINE void load_keys_t(const Operand& x, int64_t b, int64_t h, int64_t j0, int64_t bk,
                                  int64_t D, acc_t* dst) {
  const auto* src = static_cast<const scalar_t*>(x.data) + b * x.batch_stride + h * x.head_stride;
  for (int64_t j = 0; j < bk; ++j) {
    const scalar_t* row = src + (j0 + j) * x.row_stride;
    for (int64_t d = 0; d < D; ++d) dst[d * kBlockK + j] = static_cast<acc_t>(row[d]);
  }
  for (int64_t d = 0; d < D && bk < kBlockK; ++d)
    std::fill(dst + d * kBlockK + bk, dst + (d + 1) * kBlockK, acc_t(0));
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

// Per-thread buffers of the backward: the query-side rows of one work item (sized for the
// largest group of batch entries), one key tile and the score tiles.
template <typename acc_t>
struct BwdScratch {
  int64_t dp;
  std::vector<acc_t> q, dout, dq, lse, delta;      // [rows, dp] / [rows], rows padded to kBlockQ
  std::vector<acc_t> k, kt, vt, dk, dv, mask_add;  // one key tile
  std::vector<acc_t> kept;                         // one row's dropout scale per key
  std::vector<acc_t> s, ds, pt, dst;               // [kBlockQ, kBlockK] and transposes
  BwdScratch(int64_t head_dim, int64_t rows)
      : dp(round_up(head_dim, kWidth)), q(round_up(rows, kBlockQ) * dp), dout(q.size()),
        dq(q.size()), lse(round_up(rows, kBlockQ)), delta(lse.size()), k(kBlockK * dp),
        kt(dp * kBlockK), vt(dp * kBlockK), dk(kBlockK * dp), dv(kBlockK * dp), mask_add(kBlockK),
        kept(kBlockK, acc_t(1)),
        s(kBlockQ * kBlockK), ds(kBlockQ * kBlockK), pt(kBlockK * kBlockQ),
        dst(kBlockK * kBlockQ) {}
};

// w.kept[j] = 1 / (1 − p) or 0: the forward's dropout of key j0 + j for stacked query row
// `row` (entry row / Lq of the group, query row % Lq) of head h.
template <typename acc_t>
BLIP_FAST_INLINE void keep_scales(const CrossAttentionBwdParams& p, const int64_t* entries,
                                  int64_t h, int64_t row, int64_t j0, int64_t bk,
                                  BwdScratch<acc_t>& w) {
  const int64_t b = entries[row / p.q_len], i = row % p.q_len;
  const uint64_t c0 = static_cast<uint64_t>(((b * p.heads + h) * p.q_len + i) * p.k_len + j0);
  const acc_t kept = static_cast<acc_t>(1.0 / (1.0 - p.dropout.p));
  for (int64_t j = 0; j < bk; ++j)
    w.kept[j] = dropout_bits(c0 + j, p.dropout.seed) >= p.dropout.threshold ? kept : acc_t(0);
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
  const int64_t rows = count * Lq, rows_pad = round_up(rows, kMR);
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
    acc_t* dout = w.dout.data() + e * Lq * dp;
    load_rows<scalar_t>(p.q, b, h, 0, Lq, D, w.q.data() + e * Lq * dp, dp);
    load_rows<scalar_t>(p.dout, b, h, 0, Lq, D, dout, dp);
    const auto* out = static_cast<const scalar_t*>(p.out.data) + b * p.out.batch_stride +
                      h * p.out.head_stride;
    const float* lse = p.lse + (b * p.heads + h) * Lq;
    for (int64_t i = 0; i < Lq; ++i) {  // delta_i = dO_i · O_i, the softmax-gradient correction
      acc_t sum = 0;
      for (int64_t d = 0; d < D; ++d)
        sum += dout[i * dp + d] * static_cast<acc_t>(out[i * p.out.row_stride + d]);
      w.delta[e * Lq + i] = sum;
      w.lse[e * Lq + i] = lse[i];
    }
  }
  // The micro-kernel reads whole blocks of kMR rows: the rows past the last hold zeros.
  std::fill(w.q.begin() + rows * dp, w.q.begin() + rows_pad * dp, acc_t(0));
  std::fill(w.dout.begin() + rows * dp, w.dout.begin() + rows_pad * dp, acc_t(0));
  std::fill(w.lse.begin() + rows, w.lse.begin() + rows_pad, acc_t(0));
  std::fill(w.delta.begin() + rows, w.delta.begin() + rows_pad, acc_t(0));
  std::fill(w.dq.begin(), w.dq.begin() + rows_pad * dp, acc_t(0));

  for (int64_t j0 = 0; j0 < p.k_len; j0 += kBlockK) {
    const int64_t bk = std::min(kBlockK, p.k_len - j0), bk_pad = round_up(bk, kMR);
    // score columns up to whole vectors past bk, not the whole tile: text self-attention (Lk
    // 35) would otherwise compute 64
    const int64_t bk_vec = round_up(bk, kWidth);
    std::fill(w.dk.begin(), w.dk.end(), acc_t(0));
    std::fill(w.dv.begin(), w.dv.end(), acc_t(0));
    load_rows<scalar_t>(p.k, n, h, j0, bk, D, w.k.data(), dp);
    load_keys_t<scalar_t>(p.k, n, h, j0, bk, D, w.kt.data());
    load_keys_t<scalar_t>(p.v, n, h, j0, bk, D, w.vt.data());
    // a key_padding_mask comes without kv_index, so its group is one batch entry
    load_mask(p, entries[0], j0, bk, w.mask_add.data());

    for (int64_t i0 = 0; i0 < rows; i0 += kBlockQ) {
      const int64_t bq = std::min(kBlockQ, rows - i0), bq_pad = round_up(bq, kMR);
      const acc_t* q = w.q.data() + i0 * dp;
      const acc_t* dout = w.dout.data() + i0 * dp;
      vec::gemm<false>(bq_pad, bk_vec, D, q, dp, w.kt.data(), kBlockK, w.s.data(), kBlockK);
      vec::gemm<false>(bq_pad, bk_vec, D, dout, dp, w.vt.data(), kBlockK, w.ds.data(), kBlockK);
      // s becomes P = exp(score − lse) and ds (holding dP) becomes dS = P ∘ (dP − delta) ·
      // scale; both are also transposed for the dK / dV products. With dropout, s becomes the
      // dropped P that multiplied V and dP is taken through the same mask (`kept`).
      for (int64_t i = 0; i < bq_pad; ++i) {
        acc_t* s = w.s.data() + i * kBlockK;
        acc_t* ds = w.ds.data() + i * kBlockK;
        const acc_t row_lse = w.lse[i0 + i], row_delta = w.delta[i0 + i];
        if (p.dropout.p > 0.0 && i0 + i < rows) keep_scales(p, entries, h, i0 + i, j0, bk, w);
        // causal: this query sees keys j <= shift of the tile (a causal group is one entry)
        const int64_t shift = tiles::causal_shift(p, (i0 + i) % Lq, j0);
        for (int64_t j = 0; j < bk_vec; j += kWidth) {
          const Vec<acc_t> add =
              tiles::causal_masked<acc_t>(vec::load(w.mask_add.data() + j), shift + 1 - j, kWidth);
          const Vec<acc_t> prob = vec::exp(vec::load(s + j) * scale + add - row_lse);
          const Vec<acc_t> kept = vec::load(w.kept.data() + j);
          vec::store(s + j, prob * kept);
          vec::store(ds + j, prob * (vec::load(ds + j) * kept - row_delta) * scale);
        }
        for (int64_t j = 0; j < bk_pad; ++j) {
          w.pt[j * kBlockQ + i] = s[j];
          w.dst[j * kBlockQ + i] = ds[j];
        }
      }
      vec::gemm<true>(bq_pad, dp, bk, w.ds.data(), kBlockK, w.k.data(), dp,
                      w.dq.data() + i0 * dp, dp);
      vec::gemm<true>(bk_pad, dp, bq, w.pt.data(), kBlockQ, dout, dp, w.dv.data(), dp);
      vec::gemm<true>(bk_pad, dp, bq, w.dst.data(), kBlockQ, q, dp, w.dk.data(), dp);
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
