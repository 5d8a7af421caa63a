// Helpers shared by the CUDA kernels of rlhf_ops: input checks, vector loads, warp/block
// reductions, and the online-softmax state.
#pragma once

#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cmath>
#include <cstdint>

#define RLHF_CHECK_CUDA(op, name, t)                                                          \
  TORCH_CHECK((t).is_cuda(), "rlhf_ops_cuda.", op, ": ", name, " must be a CUDA tensor, got ", \
              (t).device())
// is_cuda() alone lets a tensor on another GPU through: a kernel launched on ref's device would
// then dereference that GPU's pointer (an illegal-address fault without peer access).
#define RLHF_CHECK_SAME_DEVICE(op, name, t, ref_name, ref)                                    \
  TORCH_CHECK((t).device() == (ref).device(), "rlhf_ops_cuda.", op, ": ", name, " must be on ", \
              ref_name, "'s device ", (ref).device(), ", got ", (t).device())
#define RLHF_CHECK_DTYPE(op, name, t, dt)                                                   \
  TORCH_CHECK((t).scalar_type() == (dt), "rlhf_ops_cuda.", op, ": ", name, " must be ", dt, \
              ", got ", (t).scalar_type())
#define RLHF_CHECK_DIM(op, name, t, n)                                                      \
  TORCH_CHECK((t).dim() == (n), "rlhf_ops_cuda.", op, ": ", name, " must be ", n,           \
              "-D, got shape ", (t).sizes())

namespace rlhf {

constexpr int kWarp = 32;

// A VEC-element chunk loaded or stored as one 16-byte (or smaller) transaction.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T>
__device__ __forceinline__ T neg_inf() {
  return -INFINITY;
}

// max that propagates NaN. CUDA's max()/fmaxf() return the other operand when one is NaN, so a
// NaN logit would never reach the running max, and a state whose max is still −inf drops it.
template <typename T>
__device__ __forceinline__ T max_nan(T a, T b) {
  return (a > b || a != a) ? a : b;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Online-softmax state over a set of values x: m = max x, s = Σ exp(x − m).
// Merging (m1, s1) and (m2, s2): M = max(m1, m2), s = s1·exp(m1 − M) + s2·exp(m2 − M);
// while M is −inf (nothing finite seen) the state stays (−inf, 0); a NaN max makes it (NaN, NaN).
template <typename T>
struct SoftmaxState {
  T m, s;
  __device__ __forceinline__ void merge(T m2, T s2) {
    T M = max_nan(m, m2);
    if (M == neg_inf<T>()) return;
    s = s * exp(m - M) + s2 * exp(m2 - M);
    m = M;
  }
};

// log s of a merged state, s = Σ exp(x − m) >= 1 (the max contributes exp(0) = 1) or 0.
// setup.py builds with --use_fast_math, which turns logf into __logf (absolute error up to
// 2^-21.4 ≈ 3.6e-7 on [0.5, 2]: a relative error of ~36% for a loss or log-prob of 1e-6).
// log1pf is not affected, and s − 1 is exact for s in [1, 2].
template <typename T>
__device__ __forceinline__ T log_sum(T s) {
  return log1p(s - T(1));
}

// Reduce each thread's (m, s, extra-sum) over the block; every thread gets the result.
// ``smem`` needs 3 * (blockDim.x / 32) entries.
template <typename T>
__device__ __forceinline__ void block_reduce_softmax(SoftmaxState<T>& st, T& extra, T* smem) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    T m2 = __shfl_xor_sync(0xffffffffu, st.m, o);
    T s2 = __shfl_xor_sync(0xffffffffu, st.s, o);
    extra += __shfl_xor_sync(0xffffffffu, extra, o);
    st.merge(m2, s2);
  }
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, nwarps = blockDim.x / kWarp;
  if (lane == 0) {
    smem[warp] = st.m;
    smem[nwarps + warp] = st.s;
    smem[2 * nwarps + warp] = extra;
  }
  __syncthreads();
  SoftmaxState<T> all{neg_inf<T>(), T(0)};
  T e = T(0);
  for (int w = 0; w < nwarps; ++w) {
    all.merge(smem[w], smem[nwarps + w]);
    e += smem[2 * nwarps + w];
  }
  st = all;
  extra = e;
}

// Largest VEC (elements per 16-byte transaction) that the row layout allows.
inline int pick_vec(const at::Tensor& t, int64_t row_stride, int64_t n) {
  const int64_t bytes = t.element_size();
  int vec = static_cast<int>(16 / bytes);
  while (vec > 1 && (reinterpret_cast<uintptr_t>(t.data_ptr()) % (vec * bytes) != 0 ||
                     row_stride % vec != 0 || n % vec != 0))
    vec /= 2;
  return vec;
}

}  // namespace rlhf
