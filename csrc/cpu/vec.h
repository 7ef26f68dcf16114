// SIMD building blocks for the OpenMP kernels in csrc/cpu/: a fixed-width vector type, exp on
// it, row reductions for softmax epilogues, and a register-blocked matrix-product micro-kernel.
//
// One binary serves every x86-64 CPU: kernel entry points marked BLIP_FAST_TARGET_CLONES are
// compiled once per ISA level (AVX-512, AVX2 + FMA, baseline SSE2) and the best clone is picked
// when the library loads. Everything here is forced inline so that it is compiled for the ISA of
// the clone calling it, and written with GCC vector types rather than intrinsics, so each clone
// lowers Vec to its own register width (GCC's auto-vectoriser left these loops scalar).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define BLIP_FAST_TARGET_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define BLIP_FAST_TARGET_CLONES
#endif
#define BLIP_FAST_INLINE inline __attribute__((always_inline))

namespace blip_fast::cpu::vec {

// Lanes per vector: one AVX-512 register of fp32, two of AVX2.
constexpr int64_t kWidth = 16;

template <typename T>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(kWidth * sizeof(float))));
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(kWidth * sizeof(double))));
};
template <typename T>
using Vec = typename VecOf<T>::type;

template <typename T>
BLIP_FAST_INLINE Vec<T> load(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
BLIP_FAST_INLINE void store(T* p, Vec<T> v) {
  std::memcpy(p, &v, sizeof(v));
}

template <typename T>
BLIP_FAST_INLINE Vec<T> broadcast(T x) {
  return Vec<T>{} + x;
}

template <typename T>
BLIP_FAST_INLINE T reduce_max(Vec<T> v) {
  T m = v[0];
  for (int64_t i = 1; i < kWidth; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

template <typename T>
BLIP_FAST_INLINE T reduce_sum(Vec<T> v) {
  T s = 0;
  for (int64_t i = 0; i < kWidth; ++i) s += v[i];
  return s;
}

// exp, lane by lane: Cephes' expf (x = n·ln2 + r, |r| <= ln2/2, degree-6 polynomial, relative
// error <= 2^-23). Inputs below −87 give 0 (the scores of masked keys, −10000, must vanish as
// they do in fp32 torch.exp); NaN stays NaN.
BLIP_FAST_INLINE Vec<float> exp(Vec<float> x) {
  typedef int32_t VecInt __attribute__((vector_size(kWidth * sizeof(int32_t))));
  const Vec<float> lo = broadcast(-87.0f);
  const Vec<float> xc = x < lo ? lo : x;
  // Round to nearest by adding and removing 1.5 · 2^23 (exact for |t| < 2^22).
  const Vec<float> round = broadcast(12582912.0f);
  const Vec<float> n = (xc * 1.44269504088896341f + round) - round;
  Vec<float> r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  Vec<float> p = broadcast(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const Vec<float> y = p * r * r + r + 1.0f;
  const VecInt bits = (__builtin_convertvector(n, VecInt) + 127) << 23;
  const Vec<float> two_n = (Vec<float>)bits;  // same bits, read as fp32
  return x < lo ? Vec<float>{} : y * two_n;
}

// fp64 runs the gradient checks, not the fast paths: the libm exp per lane.
BLIP_FAST_INLINE Vec<double> exp(Vec<double> x) {
  for (int64_t i = 0; i < kWidth; ++i) x[i] = std::exp(x[i]);
  return x;
}

// Row reductions of the softmax epilogues (csrc/cpu/itc.cpp, csrc/cpu/lm_head_loss.cpp): whole
// vectors through Vec, the tail lane by lane.

// max_j x[j] (−inf for n = 0).
template <typename T>
BLIP_FAST_INLINE T row_max(const T* x, int64_t n) {
  T m = -std::numeric_limits<T>::infinity();
  int64_t j = 0;
  if (n >= kWidth) {
    Vec<T> mv = load(x);
    for (j = kWidth; j + kWidth <= n; j += kWidth) {
      const Vec<T> v = load(x + j);
      mv = v > mv ? v : mv;
    }
    m = reduce_max<T>(mv);
  }
  for (; j < n; ++j) m = std::max(m, x[j]);
  return m;
}

// Σ_j x[j], accumulated per lane in T and summed in double.
template <typename T>
BLIP_FAST_INLINE double row_sum(const T* x, int64_t n) {
  Vec<T> sv{};
  int64_t j = 0;
  for (; j + kWidth <= n; j += kWidth) sv += load(x + j);
  double s = reduce_sum<T>(sv);
  for (; j < n; ++j) s += x[j];
  return s;
}

// Σ exp(x − m) into sum and, when w_of is given, Σ exp(x − m)·w_of into wsum; when store is
// given the exp values are written there (it may alias x).
template <typename T>
BLIP_FAST_INLINE void sum_exp(const T* x, int64_t n, T m, const T* w_of, T* store, double& sum,
                              double& wsum) {
  Vec<T> sv{}, wv{};
  const Vec<T> mv = broadcast(m);
  int64_t j = 0;
  for (; j + kWidth <= n; j += kWidth) {
    const Vec<T> e = exp(load(x + j) - mv);
    sv += e;
    if (w_of) wv += e * load(w_of + j);
    if (store) vec::store(store + j, e);
  }
  double s = reduce_sum<T>(sv), w = w_of ? reduce_sum<T>(wv) : 0.0;
  for (; j < n; ++j) {
    const T e = std::exp(x[j] - m);
    s += e;
    if (w_of) w += static_cast<double>(e) * w_of[j];
    if (store) store[j] = e;
  }
  sum = s;
  wsum = w;
}

// Micro-kernel block: kMR rows × (nv · kWidth) columns of C stay in registers.
constexpr int64_t kMR = 4;

// Column vectors per block, nv. Each accumulator takes one FMA per k step, so a block needs
// about latency × FMA ports (4 × 2 on current x86) independent accumulators to keep the FMA
// units busy: kMR × 1 left them half idle. With kMR × 4 (AMD EPYC Zen 5, 1 thread): gathered
// 128 pairs x 4 heads x 23 queries over 65 keys 2.32 -> 2.05 ms, 64 x 12 x 35 over 577 keys
// 50.0 -> 40.7 ms. AVX-512's 32 registers hold kMR × 4 accumulators (+ 4 for B); under AVX2 a
// Vec is two of its 16 registers, so it keeps kMR × 1.
BLIP_FAST_INLINE int64_t max_block_vectors() {
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  return avx512 ? 4 : 1;
}

template <int64_t kNV, bool kAccumulate, typename T>
BLIP_FAST_INLINE void gemm_block(int64_t K, const T* a, int64_t lda, int64_t a_k_stride,
                                 const T* B, int64_t ldb, T* C, int64_t ldc) {
  Vec<T> acc[kMR][kNV];
  for (int64_t r = 0; r < kMR; ++r)
    for (int64_t v = 0; v < kNV; ++v)
      acc[r][v] = kAccumulate ? load(C + r * ldc + v * kWidth) : Vec<T>{};
  for (int64_t k = 0; k < K; ++k) {
    Vec<T> b[kNV];
    for (int64_t v = 0; v < kNV; ++v) b[v] = load(B + k * ldb + v * kWidth);
    for (int64_t r = 0; r < kMR; ++r) {
      const T x = a[r * lda + k * a_k_stride];
      for (int64_t v = 0; v < kNV; ++v) acc[r][v] += x * b[v];
    }
  }
  for (int64_t r = 0; r < kMR; ++r)
    for (int64_t v = 0; v < kNV; ++v) store(C + r * ldc + v * kWidth, acc[r][v]);
}

// C[M, N] (+)= A[M, K] · B[K, N], B and C row-major, A(r, k) = A[r · lda + k · a_k_stride]
// (row-major by default; A's elements are broadcast one at a time, so a transposed A costs
// nothing); M % kMR == 0 and N % kWidth == 0 (callers pad). Row r of C reads only row r of A,
// column c only column c of B, so padding rows and columns of the operands only reach padding
// of C.
template <bool kAccumulate, typename T>
BLIP_FAST_INLINE void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B,
                           int64_t ldb, T* C, int64_t ldc, int64_t a_k_stride = 1) {
  const int64_t nv = max_block_vectors();
  for (int64_t i0 = 0; i0 < M; i0 += kMR) {
    const T* a = A + i0 * lda;
    T* c = C + i0 * ldc;
    int64_t j0 = 0;
    for (; nv >= 4 && j0 + 4 * kWidth <= N; j0 += 4 * kWidth)
      gemm_block<4, kAccumulate>(K, a, lda, a_k_stride, B + j0, ldb, c + j0, ldc);
    for (; nv >= 2 && j0 + 2 * kWidth <= N; j0 += 2 * kWidth)
      gemm_block<2, kAccumulate>(K, a, lda, a_k_stride, B + j0, ldb, c + j0, ldc);
    for (; j0 < N; j0 += kWidth)
      gemm_block<1, kAccumulate>(K, a, lda, a_k_stride, B + j0, ldb, c + j0, ldc);
  }
}

}  // namespace blip_fast::cpu::vec
