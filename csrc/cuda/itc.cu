// CUDA forward of the fused ITC loss: a block owns kItcRows rows of one direction, keeps their
// scaled student / teacher features in shared memory and streams every column of
// [feat_m of the batch ; queue] once (thread j takes columns j, j + kItcThreads, ...), folding
// each into per-thread running log-sum-exp states, which a warp-shuffle + shared-memory
// reduction merges at the end. No torch headers: see itc.h.
#include "cuda/itc.h"

#include <cmath>

#include "cuda/dtype.h"

namespace blip_fast::cuda {
namespace {

constexpr int kWarps = kItcThreads / 32;

// Running state of one row: max / scaled exp-sum of the student and of the teacher, the
// teacher-weighted Σ s (scaled like the teacher's sum), Σ hard·s and the hard count.
struct RowState {
  float ms, ls, mt, lt, w, h, cnt;
};

__device__ __forceinline__ void merge(RowState& a, const RowState& b) {
  const float ms = fmaxf(a.ms, b.ms);
  if (ms != -INFINITY) {
    a.ls = a.ls * expf(a.ms - ms) + b.ls * expf(b.ms - ms);
    a.ms = ms;
  }
  const float mt = fmaxf(a.mt, b.mt);
  if (mt != -INFINITY) {
    const float sa = expf(a.mt - mt), sb = expf(b.mt - mt);
    a.lt = a.lt * sa + b.lt * sb;
    a.w = a.w * sa + b.w * sb;
    a.mt = mt;
  }
  a.h += b.h;
  a.cnt += b.cnt;
}

__device__ __forceinline__ RowState shuffle_down(const RowState& s, int offset) {
  RowState o;
  o.ms = __shfl_down_sync(0xffffffffu, s.ms, offset);
  o.ls = __shfl_down_sync(0xffffffffu, s.ls, offset);
  o.mt = __shfl_down_sync(0xffffffffu, s.mt, offset);
  o.lt = __shfl_down_sync(0xffffffffu, s.lt, offset);
  o.w = __shfl_down_sync(0xffffffffu, s.w, offset);
  o.h = __shfl_down_sync(0xffffffffu, s.h, offset);
  o.cnt = __shfl_down_sync(0xffffffffu, s.cnt, offset);
  return o;
}

template <typename T>
__global__ void __launch_bounds__(kItcThreads) itc_fwd_kernel(const ItcFwdParams p) {
  extern __shared__ float smem[];  // [2, kItcRows, D]: x / temp, x_m / temp
  __shared__ RowState partial[kWarps][kItcRows];
  const int D = p.dim;
  const int64_t B = p.batch, n_cols = p.batch + p.queue_len;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kItcRows;
  const float inv_t = 1.0f / *p.temp;
  const bool teacher = p.alpha != 0.0f;
  float* xs = smem;
  float* xms = smem + kItcRows * D;
  const T* x = static_cast<const T*>(p.x);
  const T* x_m = static_cast<const T*>(p.x_m);
  for (int k = threadIdx.x; k < kItcRows * D; k += blockDim.x) {
    const int64_t i = row0 + k / D;
    const int d = k % D;
    xs[k] = i < B ? to_float(x[i * p.x_stride + d]) * inv_t : 0.0f;
    xms[k] = i < B ? to_float(x_m[i * p.x_m_stride + d]) * inv_t : 0.0f;
  }
  int64_t my_id[kItcRows];
  RowState st[kItcRows];
#pragma unroll
  for (int r = 0; r < kItcRows; ++r) {
    const int64_t i = row0 + r;
    my_id[r] = p.idx != nullptr && i < B ? p.idx[i] : i;
    st[r] = RowState{-INFINITY, 0.0f, -INFINITY, 0.0f, 0.0f, 0.0f, 0.0f};
  }
  __syncthreads();

  const T* feat_m = static_cast<const T*>(p.feat_m);
  const T* queue = static_cast<const T*>(p.queue);
  for (int64_t j = threadIdx.x; j < n_cols; j += blockDim.x) {
    const T* col = j < B ? feat_m + j * p.feat_m_stride : queue + (j - B) * p.queue_stride1;
    const int64_t step = j < B ? 1 : p.queue_stride0;
    float s[kItcRows] = {}, t[kItcRows] = {};
    for (int d = 0; d < D; ++d) {
      const float c = to_float(col[d * step]);
#pragma unroll
      for (int r = 0; r < kItcRows; ++r) {
        s[r] = fmaf(xs[r * D + d], c, s[r]);
        t[r] = fmaf(xms[r * D + d], c, t[r]);
      }
    }
    const int64_t col_id = p.idx != nullptr ? p.idx_all[j] : j;
#pragma unroll
    for (int r = 0; r < kItcRows; ++r) {
      RowState& a = st[r];
      if (s[r] > a.ms) {
        a.ls = a.ls * expf(a.ms - s[r]) + 1.0f;
        a.ms = s[r];
      } else {
        a.ls += expf(s[r] - a.ms);
      }
      if (teacher) {
        if (t[r] > a.mt) {
          const float scale = expf(a.mt - t[r]);
          a.lt = a.lt * scale + 1.0f;
          a.w = a.w * scale + s[r];
          a.mt = t[r];
        } else {
          const float e = expf(t[r] - a.mt);
          a.lt += e;
          a.w += e * s[r];
        }
      }
      if (col_id == my_id[r]) {
        a.h += s[r];
        a.cnt += 1.0f;
      }
    }
  }

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int r = 0; r < kItcRows; ++r) {
    for (int offset = 16; offset > 0; offset /= 2) merge(st[r], shuffle_down(st[r], offset));
    if (lane == 0) partial[warp][r] = st[r];
  }
  __syncthreads();
  if (threadIdx.x < kItcRows) {
    const int r = threadIdx.x;
    const int64_t i = row0 + r;
    if (i >= B) return;
    RowState a = partial[0][r];
    for (int k = 1; k < kWarps; ++k) merge(a, partial[k][r]);
    const float lse_s = a.ms + logf(a.ls);
    const float lse_t = teacher ? a.mt + logf(a.lt) : 0.0f;
    float row = lse_s - (1.0f - p.alpha) * (a.h / a.cnt);
    if (teacher) row -= p.alpha * (a.w / a.lt);
    p.stats[i * p.stats_ld] = lse_s;
    p.stats[i * p.stats_ld + 1] = lse_t;
    p.stats[i * p.stats_ld + 2] = a.cnt;
    p.rows[i] = row;
  }
}

template <typename T>
cudaError_t launch(const ItcFwdParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((p.batch + kItcRows - 1) / kItcRows));
  const size_t smem = 2 * kItcRows * static_cast<size_t>(p.dim) * sizeof(float);
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(
        itc_fwd_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  itc_fwd_kernel<T><<<grid, kItcThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t itc_fwd(const ItcFwdParams& params, cudaStream_t stream) {
  return dispatch_dtype(params.dtype,
                        [&](auto zero) { return launch<decltype(zero)>(params, stream); });
}

}  // namespace blip_fast::cuda
