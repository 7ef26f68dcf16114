// CUDA cross-attention forward: one block per (batch·head, tile of kBlockM queries), online
// softmax over tiles of kBlockN keys (FlashAttention-1 style, fp32 in shared memory). BLIP's
// text side is short (Lq <= 40) and the image side long (197 / 577), so a block keeps its
// queries and streams the keys. No torch headers: see cross_attention.h.
// The tile sizes follow from the thread mapping (one key per lane, four query rows per warp)
// and have not been tuned on a GPU yet.
#include "cuda/cross_attention.h"

#include <cmath>

#include "cuda/dtype.h"

namespace blip_fast::cuda {
namespace {

constexpr int kBlockM = kQueriesPerBlock;  // 4 per warp in the softmax
constexpr int kBlockN = 32;             // keys per tile: one per lane in the softmax
constexpr int kThreads = 128;           // 4 warps
constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerWarp = kBlockM / kWarps;
constexpr int kThreadsPerRow = kThreads / kBlockM;          // threads sharing one output row
constexpr int kColsPerThread = kMaxHeadDim / kThreadsPerRow;  // output columns per thread
// Official BERT adds (1 − mask) · −10000 to the scores instead of −inf.
constexpr float kMaskValue = -10000.0f;

__device__ __forceinline__ float warp_max(float x) {
  for (int offset = 16; offset > 0; offset >>= 1)
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// rows × D elements of one head from `row0` into smem[rows, ld]; rows past `valid` become 0.
template <typename T>
__device__ __forceinline__ void load_tile(const Operand& x, int64_t b, int64_t h, int64_t row0,
                                          int64_t valid, int rows, int D, float* smem, int ld) {
  const T* src = static_cast<const T*>(x.data) + b * x.batch_stride + h * x.head_stride;
  for (int idx = threadIdx.x; idx < rows * D; idx += kThreads) {
    const int r = idx / D, d = idx % D;
    smem[r * ld + d] = row0 + r < valid ? to_float(src[(row0 + r) * x.row_stride + d]) : 0.0f;
  }
}

// Shared memory, in floats: q [kBlockM, D], k [kBlockN, D + 1] (the +1 spreads the per-lane
// rows over all banks), v [kBlockN, D], p [kBlockM, kBlockN + 1], correction and 1 / l [kBlockM].
__host__ __device__ constexpr int smem_floats(int D) {
  return kBlockM * D + kBlockN * (D + 1) + kBlockN * D + kBlockM * (kBlockN + 1) + 2 * kBlockM;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    cross_attention_kernel(const CrossAttentionFwdParams p) {
  extern __shared__ float smem[];
  const int D = static_cast<int>(p.head_dim);
  const float scale = static_cast<float>(p.scale);
  float* q_s = smem;
  float* k_s = q_s + kBlockM * D;
  float* v_s = k_s + kBlockN * (D + 1);
  float* p_s = v_s + kBlockN * D;
  float* corr_s = p_s + kBlockM * (kBlockN + 1);
  float* inv_l_s = corr_s + kBlockM;

  const int64_t bh = blockIdx.x, b = bh / p.heads, h = bh % p.heads;
  const int64_t kb = p.kv_index == nullptr ? b : p.kv_index[b];  // K / V row (gathered)
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kBlockM;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const bool* mask = p.key_padding_mask == nullptr ? nullptr : p.key_padding_mask + b * p.k_len;

  // Softmax state of this warp's rows (every lane holds the same values).
  float row_max[kRowsPerWarp], row_sum[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    row_max[r] = -INFINITY;
    row_sum[r] = 0.0f;
  }
  // Output accumulators: row o_row, columns o_col0 + kThreadsPerRow · c.
  const int o_row = threadIdx.x / kThreadsPerRow, o_col0 = threadIdx.x % kThreadsPerRow;
  float acc[kColsPerThread];
#pragma unroll
  for (int c = 0; c < kColsPerThread; ++c) acc[c] = 0.0f;

  load_tile<T>(p.q, b, h, m0, p.q_len, kBlockM, D, q_s, D);

  for (int64_t n0 = 0; n0 < p.k_len; n0 += kBlockN) {
    load_tile<T>(p.k, kb, h, n0, p.k_len, kBlockN, D, k_s, D + 1);
    load_tile<T>(p.v, kb, h, n0, p.k_len, kBlockN, D, v_s, D);
    __syncthreads();

    // Lane j scores key n0 + j against the warp's rows, then the warp updates their softmax.
    const int64_t key = n0 + lane;
    const float mask_add = key < p.k_len && mask != nullptr && !mask[key] ? kMaskValue : 0.0f;
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int row = warp * kRowsPerWarp + r;
      float dot = 0.0f;
      for (int d = 0; d < D; ++d) dot += q_s[row * D + d] * k_s[lane * (D + 1) + d];
      const float score = key < p.k_len ? dot * scale + mask_add : -INFINITY;
      const float new_max = fmaxf(row_max[r], warp_max(score));
      const float prob = expf(score - new_max);
      const float correction = expf(row_max[r] - new_max);  // 0 on the first tile
      row_sum[r] = row_sum[r] * correction + warp_sum(prob);
      row_max[r] = new_max;
      p_s[row * (kBlockN + 1) + lane] = prob;
      if (lane == 0) corr_s[row] = correction;
    }
    __syncthreads();

    const float correction = corr_s[o_row];
#pragma unroll
    for (int c = 0; c < kColsPerThread; ++c) {
      const int d = o_col0 + kThreadsPerRow * c;
      if (d < D) {
        float sum = acc[c] * correction;
        for (int j = 0; j < kBlockN; ++j) sum += p_s[o_row * (kBlockN + 1) + j] * v_s[j * D + d];
        acc[c] = sum;
      }
    }
    __syncthreads();  // k_s / v_s / p_s are overwritten by the next tile
  }

#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int row = warp * kRowsPerWarp + r;
    if (lane == 0) {
      inv_l_s[row] = 1.0f / row_sum[r];
      if (m0 + row < p.q_len) p.lse[bh * p.q_len + m0 + row] = row_max[r] + logf(row_sum[r]);
    }
  }
  __syncthreads();

  if (m0 + o_row < p.q_len) {
    T* out = static_cast<T*>(p.out) + (bh * p.q_len + m0 + o_row) * D;
    const float inv_l = inv_l_s[o_row];
#pragma unroll
    for (int c = 0; c < kColsPerThread; ++c) {
      const int d = o_col0 + kThreadsPerRow * c;
      if (d < D) out[d] = from_float<T>(acc[c] * inv_l);
    }
  }
}

template <typename T>
cudaError_t launch(const CrossAttentionFwdParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.batch * p.heads),
                  static_cast<unsigned>((p.q_len + kBlockM - 1) / kBlockM));
  // At kMaxHeadDim this is 43 KiB, under the 48 KiB a kernel gets without opting in.
  const size_t smem = smem_floats(static_cast<int>(p.head_dim)) * sizeof(float);
  cross_attention_kernel<T><<<grid, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

static_assert(smem_floats(kMaxHeadDim) * sizeof(float) <= 48 * 1024,
              "shared memory at kMaxHeadDim must fit the default 48 KiB");
static_assert(kBlockN == 32, "the softmax gives one key per lane");
static_assert(kBlockM % kWarps == 0 && kThreads % kBlockM == 0, "rows must split over warps");
static_assert(kMaxHeadDim % kThreadsPerRow == 0, "output columns must split evenly");

}  // namespace

cudaError_t cross_attention_fwd(const CrossAttentionFwdParams& params, cudaStream_t stream) {
  if (params.batch * params.heads == 0 || params.q_len == 0) return cudaSuccess;
  return dispatch_dtype(params.dtype,
                        [&](auto zero) { return launch<decltype(zero)>(params, stream); });
}

}  // namespace blip_fast::cuda
