// The bf16 cross-attention forward on the CPU's bf16 instructions: both products, S = Q Kᵀ
// and O += P V, take bf16 operands and accumulate in fp32, on AMX tiles (_tile_dpbf16ps, one
// 16 × 16 fp32 tile per instruction) or, without AMX, AVX512-BF16 (_mm512_dpbf16_ps, 16 fp32
// lanes). Both multiply pairs of bf16 along the reduction dimension, so that dimension comes in
// pairs, each pair one 32-bit word (the "VNNI" layout). As in the fp32 forward
// (cross_attention.cpp) the queries are the columns of the score tile, and every tile is one of
// these, [rows, columns] of words or fp32:
//
//   qp[t, i] = (Q[i, 2t], Q[i, 2t + 1])    packed once per query tile
//   kw[j, t] = (K[j, 2t], K[j, 2t + 1])    K's rows, per key tile
//   st[j, i] = Σ_t kw[j, t] · qp[t, i]      fp32 scores, transposed; online softmax in fp32
//   pp[u, i] = (P[i, 2u], P[i, 2u + 1])    probabilities rounded to bf16
//   vt[d, u] = (V[2u, d], V[2u + 1, d])    V's row pairs interleaved, transposed, per key tile
//   ot[d, i] += Σ_u vt[d, u] · pp[u, i]     fp32 output, transposed
//
// P is rounded to bf16 before P V, as FlashAttention does on GPUs; the row sums l are taken from
// the fp32 P. Every dimension is padded to whole 16 × 16 tiles (16 pairs along the reductions)
// with zeros in the packed operands, so padding adds nothing.
//
// On an AMX Xeon (1 thread, 64 pairs x 12 heads x 35 queries over 577 keys, D = 64, CPU time):
// AMX 36 ms, AVX512-BF16 76 ms, the fp32-compute path 54-60 ms, sdpa bf16 46 ms. That CPU
// issues vdpbf16ps no faster per product than fp32 FMAs; on AMD Zen 4 / 5, which lack AMX,
// vdpbf16ps does twice the multiply-adds of an fp32 FMA per instruction.
#include "cpu/cross_attention_bf16.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include <c10/util/BFloat16.h>

#include "cpu/attention_tiles.h"
#include "cpu/vec.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// GCC 12's AVX-512 intrinsics start from _mm512_undefined_epi32(), which -Wmaybe-uninitialized
// reports once they are inlined here.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

// Only the functions that issue bf16 instructions are compiled for them; the library still loads
// and runs on any x86-64 CPU, and calls them only on a CPU that has them (bf16_products()).
#define BLIP_FAST_TARGET_BF16                                                       \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile," \
                        "amx-bf16")))

namespace blip_fast::cpu {
namespace {

using tiles::kBlockK;
using tiles::kBlockQ;
using tiles::round_up;
using vec::kWidth;

// Rows and fp32 columns of an AMX tile, and the pairs along its reduction; every tile dimension
// is padded to it.
constexpr int64_t kTile = 16;
static_assert(kTile == kWidth && kBlockK % (2 * kTile) == 0 && kBlockQ % kTile == 0,
              "tiles must hold whole AMX tiles and vectors");

using Pair = uint32_t;  // two bf16, the first in the low half (x86 is little-endian)

// The two ways of C[M, N] (+)= A[M, K] · B[K, N] in fp32, K counting pairs, A and B row-major
// tiles of pairs, M, N and K multiples of kTile (callers pad); begin() and end() bracket one
// thread's products.
struct Avx512Bf16 {
  static void begin() {}
  static void end() {}

  // kRows rows × (kNV · kWidth) columns of C in registers, as vec::gemm_block.
  template <int64_t kRows, int64_t kNV, bool kAccumulate>
  BLIP_FAST_TARGET_BF16 BLIP_FAST_INLINE static void block(int64_t K, const Pair* a, int64_t lda,
                                                           const Pair* B, int64_t ldb, float* C,
                                                           int64_t ldc) {
    __m512 acc[kRows][kNV];
    for (int64_t r = 0; r < kRows; ++r)
      for (int64_t v = 0; v < kNV; ++v)
        acc[r][v] = kAccumulate ? _mm512_loadu_ps(C + r * ldc + v * kWidth) : _mm512_setzero_ps();
    for (int64_t k = 0; k < K; ++k) {
      __m512bh b[kNV];
      for (int64_t v = 0; v < kNV; ++v)
        b[v] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(B + k * ldb + v * kWidth));
      for (int64_t r = 0; r < kRows; ++r) {
        const auto x =
            reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(a[r * lda + k])));
        for (int64_t v = 0; v < kNV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], x, b[v]);
      }
    }
    for (int64_t r = 0; r < kRows; ++r)
      for (int64_t v = 0; v < kNV; ++v) _mm512_storeu_ps(C + r * ldc + v * kWidth, acc[r][v]);
  }

  // N <= kBlockQ = 4 vectors, so one block spans all of C's columns: 8 rows of up to 3 vectors
  // or 4 rows of 4 (at most 24 accumulators of AVX-512's 32 registers). BLIP's 35 queries are 3
  // vectors; 8 rows rather than vec::gemm's 4 took the reranker forward (64 x 12 heads x 35
  // queries over 577 keys, 1 thread, an AMX Xeon capped to this path) from 80 to 76 ms.
  template <bool kAccumulate>
  BLIP_FAST_TARGET_BF16 BLIP_FAST_INLINE static void product(int64_t M, int64_t N, int64_t K,
                                                             const Pair* A, int64_t lda,
                                                             const Pair* B, int64_t ldb,
                                                             float* C, int64_t ldc) {
    static_assert(kBlockQ <= 4 * kWidth && kTile % 8 == 0, "one block spans N; 8 | M");
    const int64_t vectors = N / kWidth;
    for (int64_t i0 = 0; i0 < M; i0 += vectors == 4 ? 4 : 8) {
      const Pair* a = A + i0 * lda;
      float* c = C + i0 * ldc;
      switch (vectors) {
        case 1: block<8, 1, kAccumulate>(K, a, lda, B, ldb, c, ldc); break;
        case 2: block<8, 2, kAccumulate>(K, a, lda, B, ldb, c, ldc); break;
        case 3: block<8, 3, kAccumulate>(K, a, lda, B, ldb, c, ldc); break;
        default: block<4, 4, kAccumulate>(K, a, lda, B, ldb, c, ldc);
      }
    }
  }
};

// AMX: tile 0 accumulates C, tiles 1 and 2 hold A and B, all 16 rows × 64 bytes.
struct Amx {
  struct alignas(64) Config {  // the ldtilecfg operand, palette 1
    uint8_t palette = 1, start_row = 0, reserved[14]{};
    uint16_t bytes_per_row[16]{};
    uint8_t rows[16]{};
  };

  BLIP_FAST_TARGET_BF16 static void begin() {
    Config config;
    for (int t = 0; t < 3; ++t) config.rows[t] = kTile, config.bytes_per_row[t] = 64;
    // ldtilecfg as asm with the config as its memory operand: GCC's _tile_loadconfig does not
    // declare that it reads *config, and GCC 12 drops the stores filling it.
    asm volatile("ldtilecfg %0" : : "m"(config));
  }
  BLIP_FAST_TARGET_BF16 static void end() { _tile_release(); }

  template <bool kAccumulate>
  BLIP_FAST_TARGET_BF16 BLIP_FAST_INLINE static void product(int64_t M, int64_t N, int64_t K,
                                                             const Pair* A, int64_t lda,
                                                             const Pair* B, int64_t ldb,
                                                             float* C, int64_t ldc) {
    for (int64_t i0 = 0; i0 < M; i0 += kTile)
      for (int64_t j0 = 0; j0 < N; j0 += kTile) {
        float* c = C + i0 * ldc + j0;
        if constexpr (kAccumulate) {
          _tile_loadd(0, c, ldc * sizeof(float));
        } else {
          _tile_zero(0);
        }
        for (int64_t k0 = 0; k0 < K; k0 += kTile) {
          _tile_loadd(1, A + i0 * lda + k0, lda * sizeof(Pair));
          _tile_loadd(2, B + k0 * ldb + j0, ldb * sizeof(Pair));
          _tile_dpbf16ps(0, 1, 2);
        }
        _tile_stored(0, c, ldc * sizeof(float));
      }
  }
};

// dst[i] = (first[i], second[i]) rounded to bf16 (nearest even), i < n (a multiple of kWidth);
// second = nullptr pairs with 0.
BLIP_FAST_TARGET_BF16 BLIP_FAST_INLINE void pack_rounded(const float* first, const float* second,
                                                         int64_t n, Pair* dst) {
  // cvtne2ps gives [first 0..15, second 0..15]; the permutation interleaves them.
  alignas(64) static constexpr uint16_t kInterleave[32] = {
      0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
      8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i interleave = _mm512_load_si512(kInterleave);
  for (int64_t c = 0; c < n; c += kWidth) {
    const __m512 hi = second == nullptr ? _mm512_setzero_ps() : _mm512_loadu_ps(second + c);
    const __m512bh both = _mm512_cvtne2ps_pbh(hi, _mm512_loadu_ps(first + c));
    _mm512_storeu_si512(dst + c, _mm512_permutexvar_epi16(
                                     interleave, reinterpret_cast<__m512i>(both)));
  }
}

// Transposes 16 rows of 16 words in place: row r, word c becomes row c, word r. Words are
// interleaved within 128-bit lanes (32- then 64-bit unpacks), then the lanes are moved across
// rows (two rounds of 128-bit shuffles).
BLIP_FAST_TARGET_BF16 BLIP_FAST_INLINE void transpose_16x16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int g = 0; g < 16; g += 8)
    for (int i = 0; i < 4; ++i) {
      t[g + i] = _mm512_shuffle_i32x4(r[g + i], r[g + i + 4], 0x88);
      t[g + i + 4] = _mm512_shuffle_i32x4(r[g + i], r[g + i + 4], 0xdd);
    }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
  }
}

// Words t0 ... t0 + 15 of a row of D bf16 read as pairs, (x[2t], x[2t + 1]); zero past D, or
// everywhere unless `inside`. t0 < (D + 1) / 2.
BLIP_FAST_TARGET_BF16 BLIP_FAST_INLINE __m512i row_pairs(const uint16_t* x, int64_t t0, int64_t D,
                                                      bool inside) {
  const int64_t left = D - 2 * t0;
  const __mmask32 halves = left >= 32 ? ~__mmask32(0) : (__mmask32(1) << left) - 1;
  return inside ? _mm512_maskz_loadu_epi16(halves, x + 2 * t0) : _mm512_setzero_si512();
}

// 16 bf16 (those in `columns`) as the low halves of 16 words; zeros unless `inside`.
BLIP_FAST_TARGET_BF16 BLIP_FAST_INLINE __m512i widened_row(const uint16_t* x, __mmask16 columns,
                                                        bool inside) {
  return inside ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(columns, x))
                : _mm512_setzero_si512();
}

// vt[d, u] = (V[j0 + 2u, d], V[j0 + 2u + 1, d]) for d < dm and u < u_pad (multiples of 16),
// zero for d >= D and keys past bk; row stride ld. Interleaving two V rows gives 16 words of
// one u, the transpose turns 16 of them into 16 words of one d.
BLIP_FAST_TARGET_BF16 BLIP_FAST_INLINE void pack_v_transposed(const uint16_t* v, int64_t row_stride,
                                                              int64_t bk, int64_t D, int64_t dm,
                                                              int64_t u_pad, Pair* vt,
                                                              int64_t ld) {
  for (int64_t d0 = 0; d0 < dm; d0 += kTile) {
    const __mmask16 columns = D - d0 >= kTile ? 0xFFFF : (1u << (D - d0)) - 1;
    for (int64_t u0 = 0; u0 < u_pad; u0 += kTile) {
      __m512i words[kTile];
      for (int64_t r = 0; r < kTile; ++r) {
        const int64_t j = 2 * (u0 + r);
        const __m512i first = widened_row(v + j * row_stride + d0, columns, j < bk);
        const __m512i second = widened_row(v + (j + 1) * row_stride + d0, columns, j + 1 < bk);
        words[r] = _mm512_or_si512(first, _mm512_slli_epi32(second, 16));
      }
      transpose_16x16(words);
      for (int64_t r = 0; r < kTile; ++r) _mm512_storeu_si512(vt + (d0 + r) * ld + u0, words[r]);
    }
  }
}

// kw for key rows j < bk_pad of one key tile (row stride ld_k, D per row): pd pairs per row,
// zero past D and for j >= bk.
BLIP_FAST_TARGET_BF16 BLIP_FAST_INLINE void pack_k(const uint16_t* k, int64_t row_stride,
                                                   int64_t bk, int64_t bk_pad, int64_t D,
                                                   int64_t pd, Pair* kw) {
  for (int64_t j = 0; j < bk_pad; ++j)
    for (int64_t t0 = 0; t0 < pd; t0 += kTile)
      _mm512_storeu_si512(kw + j * pd + t0, row_pairs(k + j * row_stride, t0, D, j < bk));
}

// Per-thread tiles (see the top of this file).
struct Scratch {
  static constexpr int64_t kKeyPairs = kBlockK / 2;  // columns of vt
  int64_t d_pairs, dm;  // pairs per row of kw (rows of qp), rows of vt / ot: head_dim padded
  std::vector<Pair> qp, kw, pp, vt;
  std::vector<float> st, ot, m, l, correction, mask_add;
  explicit Scratch(int64_t head_dim)
      : d_pairs(round_up((head_dim + 1) / 2, kTile)), dm(round_up(head_dim, kTile)),
        qp(d_pairs * kBlockQ), kw(kBlockK * d_pairs), pp(kKeyPairs * kBlockQ),
        vt(dm * kKeyPairs), st(kBlockK * kBlockQ), ot(dm * kBlockQ), m(kBlockQ), l(kBlockQ),
        correction(kBlockQ), mask_add(kBlockK) {}
};

// bf16 elements as their bits.
const uint16_t* head_of(const Operand& x, int64_t b, int64_t h) {
  return static_cast<const uint16_t*>(x.data) + b * x.batch_stride + h * x.head_stride;
}

// Gathered pairs share images: K / V of every (image, head, key tile) that a call reads, packed
// once (kw, then vt) instead of once per pair. In the bf16 reranker (BERT-base, 128 pairs over
// up to 32 images x 197 keys) packing took about as long as the products.
class PackedKV {
 public:
  // Packs when the pairs read fewer distinct images than there are pairs; else empty.
  explicit PackedKV(const CrossAttentionFwdParams& p) {
    if (p.kv_index == nullptr) return;
    std::vector<int64_t> rows(p.kv_index, p.kv_index + p.batch);
    std::sort(rows.begin(), rows.end());
    rows.erase(std::unique(rows.begin(), rows.end()), rows.end());
    if (2 * static_cast<int64_t>(rows.size()) > p.batch) return;
    images_ = std::move(rows);
    heads_ = p.heads;
    key_tiles_ = (p.k_len + kBlockK - 1) / kBlockK;
    const int64_t D = p.head_dim;
    kw_size_ = kBlockK * round_up((D + 1) / 2, kTile);
    tile_size_ = kw_size_ + round_up(D, kTile) * Scratch::kKeyPairs;
    data_.reset(new Pair[jobs() * tile_size_]);  // every word read is written by pack()
  }

  bool used() const { return !images_.empty(); }
  int64_t jobs() const { return static_cast<int64_t>(images_.size()) * heads_ * key_tiles_; }

  // Packs (image, head, key tile) number `job`.
  BLIP_FAST_TARGET_BF16 void pack(const CrossAttentionFwdParams& p, int64_t job) {
    const int64_t tile = job % key_tiles_, h = job / key_tiles_ % heads_;
    const int64_t image = images_[job / (key_tiles_ * heads_)];
    const int64_t D = p.head_dim, pd = round_up((D + 1) / 2, kTile), dm = round_up(D, kTile);
    const int64_t j0 = tile * kBlockK, bk = std::min(kBlockK, p.k_len - j0);
    const int64_t k_pairs_pad = round_up((bk + 1) / 2, kTile);
    Pair* kw = data_.get() + job * tile_size_;
    pack_k(head_of(p.k, image, h) + j0 * p.k.row_stride, p.k.row_stride, bk, round_up(bk, kTile),
           D, pd, kw);
    pack_v_transposed(head_of(p.v, image, h) + j0 * p.v.row_stride, p.v.row_stride, bk, D, dm,
                      k_pairs_pad, kw + kw_size_, Scratch::kKeyPairs);
  }

  // kw of (K / V row `image`, head h, key tile), vt right after it (kw_size() pairs on).
  const Pair* tile(int64_t image, int64_t h, int64_t tile) const {
    const int64_t slot =
        std::lower_bound(images_.begin(), images_.end(), image) - images_.begin();
    return data_.get() + ((slot * heads_ + h) * key_tiles_ + tile) * tile_size_;
  }
  int64_t kw_size() const { return kw_size_; }
  int64_t tile_size() const { return tile_size_; }

 private:
  std::vector<int64_t> images_;  // the distinct K / V rows read, sorted
  int64_t heads_ = 0, key_tiles_ = 0, kw_size_ = 0, tile_size_ = 0;
  std::unique_ptr<Pair[]> data_;
};

// One (batch, head, query tile) of the forward.
template <typename Products>
BLIP_FAST_TARGET_BF16 void fwd_tile(const CrossAttentionFwdParams& p, int64_t item, Scratch& w,
                                    const PackedKV& packed) {
  constexpr int64_t kKeyPairs = Scratch::kKeyPairs;
  const int64_t q_tiles = tiles::query_tiles(p);
  const int64_t bh = item / q_tiles, b = bh / p.heads, h = bh % p.heads;
  const int64_t kb = p.kv_index == nullptr ? b : p.kv_index[b];  // K / V row (gathered)
  const int64_t i0 = (item % q_tiles) * kBlockQ, bq = std::min(kBlockQ, p.q_len - i0);
  const int64_t lanes = round_up(bq, kTile), D = p.head_dim, pd = w.d_pairs, dm = w.dm;
  const uint16_t *q = head_of(p.q, b, h), *k = head_of(p.k, kb, h), *v = head_of(p.v, kb, h);

  std::fill(w.ot.begin(), w.ot.begin() + dm * lanes, 0.0f);
  std::fill(w.m.begin(), w.m.end(), -std::numeric_limits<float>::infinity());
  std::fill(w.l.begin(), w.l.end(), 0.0f);
  const uint16_t* q_rows = q + i0 * p.q.row_stride;
  for (int64_t r0 = 0; r0 < lanes; r0 += kTile)
    for (int64_t t0 = 0; t0 < pd; t0 += kTile) {
      __m512i words[kTile];
      for (int64_t r = 0; r < kTile; ++r)
        words[r] = row_pairs(q_rows + (r0 + r) * p.q.row_stride, t0, D, r0 + r < bq);
      transpose_16x16(words);
      for (int64_t t = 0; t < kTile; ++t)
        _mm512_storeu_si512(w.qp.data() + (t0 + t) * lanes + r0, words[t]);
    }

  for (int64_t j0 = 0; j0 < p.k_len; j0 += kBlockK) {
    const int64_t bk = std::min(kBlockK, p.k_len - j0), bk_pad = round_up(bk, kTile);
    const int64_t k_pairs = (bk + 1) / 2, k_pairs_pad = round_up(k_pairs, kTile);
    const Pair *kw = w.kw.data(), *vt = w.vt.data();
    if (packed.used()) {
      kw = packed.tile(kb, h, j0 / kBlockK);
      vt = kw + packed.kw_size();
    } else {
      pack_k(k + j0 * p.k.row_stride, p.k.row_stride, bk, bk_pad, D, pd, w.kw.data());
      pack_v_transposed(v + j0 * p.v.row_stride, p.v.row_stride, bk, D, dm, k_pairs_pad,
                        w.vt.data(), kKeyPairs);
    }
    tiles::load_mask(p, b, j0, bk, w.mask_add.data());
    Products::template product<false>(bk_pad, lanes, pd, kw, pd, w.qp.data(), lanes,
                                      w.st.data(), lanes);

    tiles::online_softmax(w.st.data(), lanes, bk, static_cast<float>(p.scale),
                          w.mask_add.data(), w.m.data(), w.l.data(), w.correction.data());
    for (int64_t d = 0; d < D; ++d)
      for (int64_t c = 0; c < lanes; c += kWidth) {
        float* o = w.ot.data() + d * lanes + c;
        vec::store(o, vec::load(o) * vec::load(w.correction.data() + c));
      }

    for (int64_t u = 0; u < k_pairs; ++u) {
      const float* first = w.st.data() + 2 * u * lanes;
      pack_rounded(first, 2 * u + 1 < bk ? first + lanes : nullptr, lanes,
                   w.pp.data() + u * lanes);
    }
    std::fill(w.pp.begin() + k_pairs * lanes, w.pp.begin() + k_pairs_pad * lanes, Pair(0));
    Products::template product<true>(dm, lanes, k_pairs_pad, vt, kKeyPairs, w.pp.data(), lanes,
                                     w.ot.data(), lanes);
  }

  auto* out = static_cast<c10::BFloat16*>(p.out) + ((b * p.heads + h) * p.q_len + i0) * D;
  float* lse = p.lse + (b * p.heads + h) * p.q_len + i0;
  for (int64_t i = 0; i < bq; ++i) {
    const float inv = 1.0f / w.l[i];
    for (int64_t d = 0; d < D; ++d) out[i * D + d] = c10::BFloat16(w.ot[d * lanes + i] * inv);
    lse[i] = w.m[i] + std::log(w.l[i]);
  }
}

// Asks for the K / V that forward item `item` reads ahead of use (tiles::prefetch_kv), packed
// or not.
void prefetch(const CrossAttentionFwdParams& p, const PackedKV& packed, int64_t item) {
  if (!packed.used()) return tiles::prefetch_kv<uint16_t>(p, item);
  const int64_t bh = item / tiles::query_tiles(p), b = bh / p.heads, h = bh % p.heads;
  const int64_t key_tiles = (p.k_len + kBlockK - 1) / kBlockK;
  const auto* first = reinterpret_cast<const char*>(packed.tile(p.kv_index[b], h, 0));
  const int64_t bytes = key_tiles * packed.tile_size() * static_cast<int64_t>(sizeof(Pair));
  for (int64_t at = 0; at < bytes; at += 64) __builtin_prefetch(first + at, 0, 3);
}

template <typename Products>
void fwd(const CrossAttentionFwdParams& p, int num_threads) {
  const int64_t items = p.batch * p.heads * tiles::query_tiles(p);
  PackedKV packed(p);
#pragma omp parallel num_threads(num_threads)
  {
    Scratch scratch(p.head_dim);
    if (packed.used()) {
#pragma omp for schedule(static)
      for (int64_t job = 0; job < packed.jobs(); ++job) packed.pack(p, job);
    }
    Products::begin();
#pragma omp for schedule(static)
    for (int64_t item = 0; item < items; ++item) {
      if (p.kv_index != nullptr && item + 2 < items) prefetch(p, packed, item + 2);
      fwd_tile<Products>(p, item, scratch, packed);
    }
    Products::end();
  }
}

// Linux hands a process AMX's tile registers only once it asks (they enlarge the saved thread
// state); the grant covers every thread of the process.
bool amx_granted() {
  constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  static const bool granted = __builtin_cpu_supports("amx-bf16") &&
                              syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  return granted;
}

}  // namespace

Bf16Products bf16_products() {
  static const bool has_avx512_bf16 = __builtin_cpu_supports("avx512bf16");
  const char* setting = std::getenv("BLIP_FAST_CPU_BF16_PRODUCTS");
  const std::string cap = setting == nullptr ? "amx" : setting;
  if (cap != "amx" && cap != "avx512_bf16" && cap != "fp32")
    throw std::invalid_argument("BLIP_FAST_CPU_BF16_PRODUCTS=" + cap +
                                ": expected amx, avx512_bf16 or fp32");
  if (cap == "amx" && has_avx512_bf16 && amx_granted()) return Bf16Products::kAmx;
  if ((cap == "amx" || cap == "avx512_bf16") && has_avx512_bf16) return Bf16Products::kAvx512Bf16;
  return Bf16Products::kFp32;
}

void cross_attention_fwd_bf16(const CrossAttentionFwdParams& params, Bf16Products products,
                              int num_threads) {
  if (products == Bf16Products::kAmx) return fwd<Amx>(params, num_threads);
  fwd<Avx512Bf16>(params, num_threads);
}

}  // namespace blip_fast::cpu

#else  // no bf16 instructions to call: bf16 keeps the fp32-compute path

namespace blip_fast::cpu {

Bf16Products bf16_products() { return Bf16Products::kFp32; }

void cross_attention_fwd_bf16(const CrossAttentionFwdParams&, Bf16Products, int) {}

}  // namespace blip_fast::cpu

#endif
