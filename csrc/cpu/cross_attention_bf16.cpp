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
//   ot[d, i] += Σ_u vt[d, u] · pp[u, i]     fp32 output, transposed (each tile's sum apart)
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

// The two ways of C[M, N] = A[M, K] · B[K, N] in fp32, K counting pairs, A and B row-major
// tiles of pairs, M, N and K multiples of kTile (callers pad); begin() and end() bracket one
// thread's products.
struct Avx512Bf16 {
  static void begin() {}
  static void end() {}

  // kRows rows × (kNV · kWidth) columns of C in registers, as vec::gemm_block.
  template <int64_t kRows, int64_t kNV>
  BLIP_FAST_TARGET_BF16 BLIP_FAST_INLINE static void block(int64_t K, const Pair* a, int64_t lda,
                                                           const Pair* B, int64_t ldb, float* C,
                                                           int64_t ldc) {
    __m512 acc[kRows][kNV];
    for (int64_t r = 0; r < kRows; ++r)
      for (int64_t v = 0; v < kNV; ++v) acc[r][v] = _mm512_setzero_ps();
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
        case 1: block<8, 1>(K, a, lda, B, ldb, c, ldc); break;
        case 2: block<8, 2>(K, a, lda, B, ldb, c, ldc); break;
        case 3: block<8, 3>(K, a, lda, B, ldb, c, ldc); break;
        default: block<4, 4>(K, a, lda, B, ldb, c, ldc);
      }
    }
  }
};

// AMX: tiles 0-3 accumulate up to four row tiles of C, 4 and 5 take A's row tiles in turn, 6
// holds B's; all 16 rows × 64 bytes. Four independent accumulators sharing one B tile keep the
// tile unit busy: with one, each _tile_dpbf16ps waited for the previous one's result (the
// reranker's gathered forward, 128 pairs x 12 heads x 24 queries over 32 images' 197 keys, 2
// threads: 6.9 -> 6.4 ms).
struct Amx {
  struct alignas(64) Config {  // the ldtilecfg operand, palette 1
    uint8_t palette = 1, start_row = 0, reserved[14]{};
    uint16_t bytes_per_row[16]{};
    uint8_t rows[16]{};
  };

  BLIP_FAST_TARGET_BF16 static void begin() {
    Config config;
    for (int t = 0; t < 7; ++t) config.rows[t] = kTile, config.bytes_per_row[t] = 64;
    // ldtilecfg as asm with the config as its memory operand: GCC's _tile_loadconfig does not
    // declare that it reads *config, and GCC 12 drops the stores filling it.
    asm volatile("ldtilecfg %0" : : "m"(config));
  }
  BLIP_FAST_TARGET_BF16 static void end() { _tile_release(); }

  // kTiles row tiles of C (rows 16·r of c, r < kTiles) = the same rows of A · one column tile
  // of B. Tile numbers are immediates, hence one branch per tile.
  template <int kTiles>
  BLIP_FAST_TARGET_BF16 BLIP_FAST_INLINE static void rows(int64_t K, const Pair* a, int64_t lda,
                                                          const Pair* b, int64_t ldb, float* c,
                                                          int64_t ldc) {
    const int64_t a_next = kTile * lda, c_next = kTile * ldc;
    const int64_t a_bytes = lda * sizeof(Pair), b_bytes = ldb * sizeof(Pair);
    const int64_t c_bytes = ldc * sizeof(float);
    _tile_zero(0);
    if constexpr (kTiles > 1) _tile_zero(1);
    if constexpr (kTiles > 2) _tile_zero(2);
    if constexpr (kTiles > 3) _tile_zero(3);
    for (int64_t k0 = 0; k0 < K; k0 += kTile) {
      _tile_loadd(6, b + k0 * ldb, b_bytes);
      _tile_loadd(4, a + k0, a_bytes);
      _tile_dpbf16ps(0, 4, 6);
      if constexpr (kTiles > 1) {
        _tile_loadd(5, a + a_next + k0, a_bytes);
        _tile_dpbf16ps(1, 5, 6);
      }
      if constexpr (kTiles > 2) {
        _tile_loadd(4, a + 2 * a_next + k0, a_bytes);
        _tile_dpbf16ps(2, 4, 6);
      }
      if constexpr (kTiles > 3) {
        _tile_loadd(5, a + 3 * a_next + k0, a_bytes);
        _tile_dpbf16ps(3, 5, 6);
      }
    }
    _tile_stored(0, c, c_bytes);
    if constexpr (kTiles > 1) _tile_stored(1, c + c_next, c_bytes);
    if constexpr (kTiles > 2) _tile_stored(2, c + 2 * c_next, c_bytes);
    if constexpr (kTiles > 3) _tile_stored(3, c + 3 * c_next, c_bytes);
  }

  BLIP_FAST_TARGET_BF16 BLIP_FAST_INLINE static void product(int64_t M, int64_t N, int64_t K,
                                                             const Pair* A, int64_t lda,
                                                             const Pair* B, int64_t ldb,
                                                             float* C, int64_t ldc) {
    for (int64_t j0 = 0; j0 < N; j0 += kTile)
      for (int64_t i0 = 0; i0 < M; i0 += 4 * kTile) {
        const Pair *a = A + i0 * lda, *b = B + j0;
        float* c = C + i0 * ldc + j0;
        switch (std::min<int64_t>((M - i0) / kTile, 4)) {
          case 1: rows<1>(K, a, lda, b, ldb, c, ldc); break;
          case 2: rows<2>(K, a, lda, b, ldb, c, ldc); break;
          case 3: rows<3>(K, a, lda, b, ldb, c, ldc); break;
          default: rows<4>(K, a, lda, b, ldb, c, ldc);
        }
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

// Per-thread tiles (see the top of this file). kv holds one head's K / V, every key tile in the
// products' layouts (kw, then vt: tile_size pairs per tile), packed by the first item that
// reads them: the items that follow on the same (K / V row, head) (further query tiles; the
// other pairs of a gathered image, see tiles::item_order) read them from cache, packed once.
struct Scratch {
  static constexpr int64_t kKeyPairs = kBlockK / 2;  // columns of vt
  int64_t d_pairs, dm;  // pairs per row of kw (rows of qp), rows of vt / ot: head_dim padded
  int64_t kw_size, tile_size;
  std::vector<Pair> qp, pp, kv;
  std::vector<float> st, ot, pv, m, l, correction, mask_add;
  int64_t kv_of = -1;  // the (K / V row)·H + head packed in kv, -1: none
  Scratch(int64_t head_dim, int64_t k_len)
      : d_pairs(round_up((head_dim + 1) / 2, kTile)), dm(round_up(head_dim, kTile)),
        kw_size(kBlockK * d_pairs), tile_size(kw_size + dm * kKeyPairs), qp(d_pairs * kBlockQ),
        pp(kKeyPairs * kBlockQ), kv((k_len + kBlockK - 1) / kBlockK * tile_size),
        st(kBlockK * kBlockQ), ot(dm * kBlockQ), pv(dm * kBlockQ), m(kBlockQ), l(kBlockQ),
        correction(kBlockQ), mask_add(kBlockK) {}
};

// bf16 elements as their bits.
const uint16_t* head_of(const Operand& x, int64_t b, int64_t h) {
  return static_cast<const uint16_t*>(x.data) + b * x.batch_stride + h * x.head_stride;
}

// Packs K / V of (row kb, head h), every key tile, into w.kv (unless it holds them already).
BLIP_FAST_TARGET_BF16 void pack_kv(const CrossAttentionFwdParams& p, int64_t kb, int64_t h,
                                   Scratch& w) {
  if (w.kv_of == kb * p.heads + h) return;
  w.kv_of = kb * p.heads + h;
  const uint16_t *k = head_of(p.k, kb, h), *v = head_of(p.v, kb, h);
  for (int64_t j0 = 0; j0 < p.k_len; j0 += kBlockK) {
    const int64_t bk = std::min(kBlockK, p.k_len - j0);
    Pair* kw = w.kv.data() + j0 / kBlockK * w.tile_size;
    pack_k(k + j0 * p.k.row_stride, p.k.row_stride, bk, round_up(bk, kTile), p.head_dim,
           w.d_pairs, kw);
    pack_v_transposed(v + j0 * p.v.row_stride, p.v.row_stride, bk, p.head_dim, w.dm,
                      round_up((bk + 1) / 2, kTile), kw + w.kw_size, Scratch::kKeyPairs);
  }
}

// One (batch, head, query tile) of the forward.
template <typename Products>
BLIP_FAST_TARGET_BF16 void fwd_tile(const CrossAttentionFwdParams& p, int64_t item, Scratch& w) {
  constexpr int64_t kKeyPairs = Scratch::kKeyPairs;
  const int64_t q_tiles = tiles::query_tiles(p);
  const int64_t bh = item / q_tiles, b = bh / p.heads, h = bh % p.heads;
  const int64_t kb = tiles::kv_row(p, b);
  const int64_t i0 = (item % q_tiles) * kBlockQ, bq = std::min(kBlockQ, p.q_len - i0);
  const int64_t lanes = round_up(bq, kTile), D = p.head_dim, pd = w.d_pairs, dm = w.dm;
  const uint16_t* q = head_of(p.q, b, h);
  pack_kv(p, kb, h, w);

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
    const Pair* kw = w.kv.data() + j0 / kBlockK * w.tile_size;
    const Pair* vt = kw + w.kw_size;
    tiles::load_mask(p, b, j0, bk, w.mask_add.data());
    Products::product(bk_pad, lanes, pd, kw, pd, w.qp.data(), lanes, w.st.data(), lanes);

    tiles::online_softmax(w.st.data(), lanes, bk, static_cast<float>(p.scale),
                          w.mask_add.data(), tiles::causal_shift(p, i0, j0), w.m.data(),
                          w.l.data(), w.correction.data());
    for (int64_t u = 0; u < k_pairs; ++u) {
      const float* first = w.st.data() + 2 * u * lanes;
      pack_rounded(first, 2 * u + 1 < bk ? first + lanes : nullptr, lanes,
                   w.pp.data() + u * lanes);
    }
    std::fill(w.pp.begin() + k_pairs * lanes, w.pp.begin() + k_pairs_pad * lanes, Pair(0));
    // this tile's P V into its own buffer, then ot = ot · correction + P V: accumulating into
    // ot itself made the products load ot right after the vector code rescaled it, and a tile
    // load waits for those stores to retire (the gathered forward above: 6.4 -> 6.0 ms)
    Products::product(dm, lanes, k_pairs_pad, vt, kKeyPairs, w.pp.data(), lanes, w.pv.data(),
                      lanes);
    for (int64_t d = 0; d < D; ++d)
      for (int64_t c = 0; c < lanes; c += kWidth) {
        float* o = w.ot.data() + d * lanes + c;
        const vec::Vec<float> pv = vec::load(w.pv.data() + d * lanes + c);
        vec::store(o, vec::load(o) * vec::load(w.correction.data() + c) + pv);
      }
  }

  auto* out = static_cast<c10::BFloat16*>(p.out) + ((b * p.heads + h) * p.q_len + i0) * D;
  float* lse = p.lse + (b * p.heads + h) * p.q_len + i0;
  for (int64_t i = 0; i < bq; ++i) {
    const float inv = 1.0f / w.l[i];
    for (int64_t d = 0; d < D; ++d) out[i * D + d] = c10::BFloat16(w.ot[d * lanes + i] * inv);
    lse[i] = w.m[i] + std::log(w.l[i]);
  }
}

template <typename Products>
void fwd(const CrossAttentionFwdParams& p, int num_threads) {
  const std::vector<int64_t> order = tiles::item_order(p);
  const int64_t items = static_cast<int64_t>(order.size());
#pragma omp parallel num_threads(num_threads)
  {
    Scratch scratch(p.head_dim, p.k_len);
    Products::begin();
#pragma omp for schedule(static)
    for (int64_t n = 0; n < items; ++n) {
      if (p.kv_index != nullptr) tiles::prefetch_next_group<uint16_t>(p, order, n);
      fwd_tile<Products>(p, order[n], scratch);
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
