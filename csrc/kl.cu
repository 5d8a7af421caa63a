// Per-token log-probabilities, entropy and the PPO KL penalty, CUDA: one thread block per row,
// 16-byte vector loads, warp-shuffle reductions, accumulation in float (double for double inputs).
//
// Forward per row, y = x / T: every thread keeps, over its strided share of the policy row,
//   m = max y,  s = Σ exp(y − m),  h = Σ exp(y − m)·(y − m)
// and (m, s) over the same columns of the reference row. Two states merge with
// M = max(m1, m2), a_i = exp(m_i − M):
//   s = a1·s1 + a2·s2,   h = a1·(h1 + (m1 − M)·s1) + a2·(h2 + (m2 − M)·s2)
// (exp(y − M)·(y − M) = a_i·exp(y − m_i)·((y − m_i) + (m_i − M))). After the block reduction
// thread 0 writes lse = M + log S, kept as the pair (M, log S) in lse [2, N] (rounding M + log S
// to float costs ~1e-3 at |y| ~ 1e4) and entropy = lse − Σ p·y = log S − H/S; the threads share
// the row's K tokens (tokens [N, K]; K = 1 with a reference): logp_k = (y_{t_k} − M) − log S,
// and with a reference ref_logp, d = logp − ref_logp, kl (k1 = d, k2 = ½d², k3 = e^{−d} − 1 + d),
// penalty = −β·kl·mask. A token out of [0, V) gives NaN for its log-prob (and is never read).
//
// Backward per row, with upstream gradients G_k (log-probs) and G_H (entropy, optional):
//   dx_j = (Σ_k G_k·[j = t_k] − (Σ_k G_k)·p_j − G_H·p_j·(log p_j + H)) / T,
//   log p_j = (y_j − M) − log S, and the entropy term 0 where y_j = −inf (0·log 0 = 0).
// Phase 1 writes the dense part (everything but Σ_k G_k·[j = t_k]) of every column with vector
// stores; after __syncthreads (global writes of a block are then visible to all its threads)
// phase 2 rewrites the columns that hold a token: the thread of token k adds up G over every k'
// with t_k' = t_k (repeated tokens accumulate) and writes the whole value, computed in acc_t
// from the untouched input, so each element is rounded to the logits dtype once. Duplicates
// write the same value. A row with a token out of [0, V) gets a NaN gradient row. The kernel
// also runs on a column slice [col0, col0 + W) of rows of V entries (linear_token_logprobs).
//
// Logit softcap (CAP, c > 0; the log-prob form only, not kl_penalty): each policy logit becomes
// c·tanh(x/c) as it is read (softcap.cuh: accurate under fast math, −inf stays −inf), before the
// temperature: y = c·tanh(x/c)/T (Gemma's order). The backward multiplies dx_j by 1 − tanh²(x_j/c).
// The kernels without CAP are the same code as before.
#include "common.cuh"
#include "softcap.cuh"

#include <optional>
#include <type_traits>
#include <vector>

namespace rlhf {
namespace {

constexpr int kKLThreads = 512;

// (m, s, h) online-softmax state with the entropy term; the empty state is (−inf, 0, 0).
template <typename T>
struct EntState {
  T m, s, h;
  __device__ __forceinline__ void merge(T m2, T s2, T h2) {
    const T M = max_nan(m, m2);
    if (M == neg_inf<T>()) return;  // both empty
    const T a1 = exp(m - M), a2 = exp(m2 - M);
    const T d1 = m == neg_inf<T>() ? T(0) : m - M;  // avoids 0·(−inf) for an empty side
    const T d2 = m2 == neg_inf<T>() ? T(0) : m2 - M;
    h = a1 * (h + d1 * s) + a2 * (h2 + d2 * s2);
    s = a1 * s + a2 * s2;
    m = M;
  }
};

// Fold VEC values (already divided by T) into the policy state (with h) ...
template <typename T, int VEC>
__device__ __forceinline__ void fold(EntState<T>& st, const T (&v)[VEC]) {
  T vmax = neg_inf<T>();
#pragma unroll
  for (int j = 0; j < VEC; ++j) vmax = max_nan(vmax, v[j]);
  if (vmax == neg_inf<T>()) return;
  T vs = 0, vh = 0;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const T e = exp(v[j] - vmax);
    vs += e;
    if (v[j] != neg_inf<T>()) vh += e * (v[j] - vmax);
  }
  st.merge(vmax, vs, vh);
}

// ... and into the reference state (no h).
template <typename T, int VEC>
__device__ __forceinline__ void fold(SoftmaxState<T>& st, const T (&v)[VEC]) {
  T vmax = neg_inf<T>();
#pragma unroll
  for (int j = 0; j < VEC; ++j) vmax = max_nan(vmax, v[j]);
  if (vmax == neg_inf<T>()) return;
  T vs = 0;
#pragma unroll
  for (int j = 0; j < VEC; ++j) vs += exp(v[j] - vmax);
  st.merge(vmax, vs);
}

// Block-wide merge of both states; every thread gets the result. smem: 5·(blockDim/32) entries.
template <typename T>
__device__ __forceinline__ void block_reduce(EntState<T>& st, SoftmaxState<T>& rs, T* smem) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    const T m2 = __shfl_xor_sync(0xffffffffu, st.m, o);
    const T s2 = __shfl_xor_sync(0xffffffffu, st.s, o);
    const T h2 = __shfl_xor_sync(0xffffffffu, st.h, o);
    const T rm2 = __shfl_xor_sync(0xffffffffu, rs.m, o);
    const T rs2 = __shfl_xor_sync(0xffffffffu, rs.s, o);
    st.merge(m2, s2, h2);
    rs.merge(rm2, rs2);
  }
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, nw = blockDim.x / kWarp;
  if (lane == 0) {
    smem[warp] = st.m;
    smem[nw + warp] = st.s;
    smem[2 * nw + warp] = st.h;
    smem[3 * nw + warp] = rs.m;
    smem[4 * nw + warp] = rs.s;
  }
  __syncthreads();
  EntState<T> all{neg_inf<T>(), T(0), T(0)};
  SoftmaxState<T> rall{neg_inf<T>(), T(0)};
  for (int w = 0; w < nw; ++w) {
    all.merge(smem[w], smem[nw + w], smem[2 * nw + w]);
    rall.merge(smem[3 * nw + w], smem[4 * nw + w]);
  }
  st = all;
  rs = rall;
}

// k3 = e^{−d} − 1 + d. The closed form cancels for small |d| (absolute error ~ulp(1) against
// k3 ≈ d²/2, in float and in double alike), so |d| < ½ takes the Taylor series
// Σ_{n≥2} (−d)ⁿ/n!: float by Horner to 1/11!, double in the nested form
// ½·(1 − d/3·(1 − d/4·(… (1 − d/20)))) (truncation < 1e-25 relative).
template <typename T>
__device__ __forceinline__ T k3(T d) {
  if constexpr (std::is_same_v<T, float>) {
    if (fabsf(d) < 0.5f) {
      float c = 1.0f / 39916800.0f;  // 1/11!
      const float inv[] = {1.0f / 3628800.0f, 1.0f / 362880.0f, 1.0f / 40320.0f, 1.0f / 5040.0f,
                           1.0f / 720.0f,     1.0f / 120.0f,    1.0f / 24.0f,    1.0f / 6.0f,
                           0.5f};
#pragma unroll
      for (int i = 0; i < 9; ++i) c = inv[i] - d * c;
      return d * d * c;
    }
    return expm1f(-d) + d;
  } else {
    if (fabs(d) < 0.5) {
      double q = 1.0;
#pragma unroll
      for (int n = 20; n > 2; --n) q = 1.0 - d * q / n;
      return 0.5 * d * d * q;
    }
    return expm1(-d) + d;
  }
}

// Launch bounds name the blocks per SM explicitly: with the thread count alone ptxas (CUDA 13)
// held these kernels to 32 registers and spilled (tests/test_cuda_resources.py); 1 block/SM
// leaves the forward 128 registers (fp64 on sm_90 needs 64+), 2 leave the backward 64.
// A policy logit read in acc_t, soft-capped with CAP, divided by T (× inv_t).
template <bool CAP, typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t scaled_logit(scalar_t v, acc_t inv_t, acc_t cap, acc_t inv_cap) {
  acc_t x = static_cast<acc_t>(v);
  if constexpr (CAP) {
    acc_t unused;
    x = softcap(x, cap, inv_cap, unused);
  }
  return x * inv_t;
}

template <typename scalar_t, typename acc_t, int VEC, bool HAS_REF, bool CAP>
__global__ void __launch_bounds__(kKLThreads, 1)
kl_fwd_kernel(const scalar_t* __restrict__ x, int64_t stride_x, const scalar_t* __restrict__ r,
              int64_t stride_r, const int64_t* __restrict__ tokens, int64_t K,
              const acc_t* __restrict__ mask, acc_t* __restrict__ logp_out,
              acc_t* __restrict__ lse_out, acc_t* __restrict__ ref_out,
              acc_t* __restrict__ ratio_out, acc_t* __restrict__ kl_out,
              acc_t* __restrict__ pen_out, acc_t* __restrict__ ent_out, int64_t N, int64_t V,
              acc_t inv_t, acc_t beta, int estimator, acc_t cap, acc_t inv_cap) {
  __shared__ acc_t smem[5 * kKLThreads / kWarp];
  const int64_t row = blockIdx.x;
  const scalar_t* xr = x + row * stride_x;
  const scalar_t* rr = HAS_REF ? r + row * stride_r : nullptr;
  EntState<acc_t> st{neg_inf<acc_t>(), acc_t(0), acc_t(0)};
  SoftmaxState<acc_t> rs{neg_inf<acc_t>(), acc_t(0)};
  const int64_t nvec = V / VEC;
  for (int64_t i = threadIdx.x; i < nvec; i += kKLThreads) {
    const Pack<scalar_t, VEC> p = reinterpret_cast<const Pack<scalar_t, VEC>*>(xr)[i];
    acc_t v[VEC];
    if constexpr (HAS_REF) {  // issue both loads before any math
      const Pack<scalar_t, VEC> q = reinterpret_cast<const Pack<scalar_t, VEC>*>(rr)[i];
      acc_t w[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        v[j] = static_cast<acc_t>(p.v[j]) * inv_t;
        w[j] = static_cast<acc_t>(q.v[j]) * inv_t;
      }
      fold(st, v);
      fold(rs, w);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[j] = scaled_logit<CAP>(p.v[j], inv_t, cap, inv_cap);
      fold(st, v);
    }
  }
  for (int64_t i = nvec * VEC + threadIdx.x; i < V; i += kKLThreads) {  // tail (VEC == 1: all)
    const acc_t v[1] = {scaled_logit<CAP>(xr[i], inv_t, cap, inv_cap)};
    fold(st, v);
    if constexpr (HAS_REF) {
      const acc_t w[1] = {static_cast<acc_t>(rr[i]) * inv_t};
      fold(rs, w);
    }
  }
  block_reduce(st, rs, smem);  // every thread gets the row's state
  const acc_t shift = st.m == neg_inf<acc_t>() ? acc_t(0) : st.m;  // all −inf: lse = 0 + log 0
  const acc_t log_s = log_sum(st.s);
  if (threadIdx.x == 0) {
    lse_out[row] = shift;
    lse_out[N + row] = log_s;
    ent_out[row] = log_s - st.h / st.s;  // lse − Σ p·y
  }
  const acc_t rshift = rs.m == neg_inf<acc_t>() ? acc_t(0) : rs.m;
  for (int64_t k = threadIdx.x; k < K; k += kKLThreads) {
    const int64_t i = row * K + k;
    const int64_t t = tokens[i];
    const bool ok = t >= 0 && t < V;
    const acc_t logp = ok ? (scaled_logit<CAP>(xr[t], inv_t, cap, inv_cap) - shift) - log_s : acc_t(NAN);
    logp_out[i] = logp;
    if constexpr (HAS_REF) {
      const acc_t ref = ok ? (static_cast<acc_t>(rr[t]) * inv_t - rshift) - log_sum(rs.s) : acc_t(NAN);
      const acc_t d = logp - ref;
      const acc_t kl = estimator == 1 ? d : estimator == 2 ? acc_t(0.5) * d * d : k3(d);
      ref_out[i] = ref;
      ratio_out[i] = d;
      kl_out[i] = kl;
      pen_out[i] = -beta * kl * (mask != nullptr ? mask[i] : acc_t(1));
    }
  }
}

// Sum over the block; every thread gets the result. smem: blockDim / 32 entries.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* smem) {
  v = warp_sum(v);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, nw = blockDim.x / kWarp;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  T s = 0;
  for (int w = 0; w < nw; ++w) s += smem[w];
  return s;
}

template <typename scalar_t, typename acc_t, int VEC, bool HAS_GH, bool CAP>
__global__ void __launch_bounds__(kKLThreads, 2)
kl_bwd_kernel(const scalar_t* __restrict__ x, int64_t stride_x, scalar_t* __restrict__ dx,
              int64_t stride_dx, const int64_t* __restrict__ tokens, int64_t K,
              const acc_t* __restrict__ lse_in, int64_t stride_lse, const acc_t* __restrict__ grad,
              int64_t stride_g0, int64_t stride_g1, const acc_t* __restrict__ grad_ent,
              int64_t stride_gh, const acc_t* __restrict__ ent, int64_t col0, int64_t V, int64_t W,
              acc_t inv_t, acc_t cap, acc_t inv_cap) {
  __shared__ acc_t smem[kKLThreads / kWarp];
  const int64_t row = blockIdx.x;
  const int64_t* tr = tokens + row * K;
  const acc_t* gr = grad + row * stride_g0;
  // Σ_k G_k, and whether any token is out of [0, V)
  acc_t g_sum = 0;
  int bad = 0;
  for (int64_t k = threadIdx.x; k < K; k += kKLThreads) {
    const int64_t t = tr[k];
    bad |= t < 0 || t >= V;
    g_sum += gr[k * stride_g1];
  }
  bad = __syncthreads_or(bad);
  g_sum = block_sum(g_sum, smem);
  const acc_t shift = lse_in[row], log_s = lse_in[stride_lse + row];
  const acc_t g_h = HAS_GH ? grad_ent[row * stride_gh] : acc_t(0);
  const acc_t h = HAS_GH ? ent[row] : acc_t(0);
  // y_j of a logit x_j, and the factor s = ∂y_j/∂x_j: 1/T, with CAP (1 − tanh²(x_j/c))/T
  auto scaled = [=](scalar_t raw, acc_t& s) -> acc_t {
    acc_t x = static_cast<acc_t>(raw);
    s = inv_t;
    if constexpr (CAP) {
      acc_t dcap;
      x = softcap(x, cap, inv_cap, dcap);
      s = inv_t * dcap;
    }
    return x * inv_t;
  };
  // (−(Σ_k G_k)·p_j − G_H·p_j·(log p_j + H))·s for y_j = v: everything but the token terms
  auto dense = [=](acc_t v, acc_t s) -> acc_t {
    if (bad) return acc_t(NAN);
    const acc_t lp = (v - shift) - log_s;
    const acc_t p = exp(lp);
    acc_t d = -g_sum * p;
    if constexpr (HAS_GH) d -= g_h * (v == neg_inf<acc_t>() ? acc_t(0) : p * (lp + h));
    return d * s;
  };
  const scalar_t* xr = x + row * stride_x;
  scalar_t* dr = dx + row * stride_dx;
  const int64_t nvec = W / VEC;
  for (int64_t i = threadIdx.x; i < nvec; i += kKLThreads) {
    Pack<scalar_t, VEC> p = reinterpret_cast<const Pack<scalar_t, VEC>*>(xr)[i];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      acc_t s;
      const acc_t v = scaled(p.v[j], s);
      p.v[j] = static_cast<scalar_t>(dense(v, s));
    }
    reinterpret_cast<Pack<scalar_t, VEC>*>(dr)[i] = p;
  }
  for (int64_t i = nvec * VEC + threadIdx.x; i < W; i += kKLThreads) {
    acc_t s;
    const acc_t v = scaled(xr[i], s);
    dr[i] = static_cast<scalar_t>(dense(v, s));
  }
  if (K == 0 || bad) return;  // block-uniform: no thread is left waiting at the barrier
  __syncthreads();            // phase 1's writes are visible to the whole block
  for (int64_t k = threadIdx.x; k < K; k += kKLThreads) {
    const int64_t t = tr[k];
    if (t < col0 || t >= col0 + W) continue;  // another slice's column
    acc_t g_t = 0;  // Σ G_k' over every k' with t_k' = t
    for (int64_t k2 = 0; k2 < K; ++k2)
      if (tr[k2] == t) g_t += gr[k2 * stride_g1];
    acc_t s;
    const acc_t v = scaled(xr[t - col0], s);
    dr[t - col0] = static_cast<scalar_t>(g_t * s + dense(v, s));
  }
}

void check_rows(const char* op, const char* name, const at::Tensor& t, const at::Tensor& tokens) {
  RLHF_CHECK_CUDA(op, name, t);
  RLHF_CHECK_DIM(op, name, t, 2);
  TORCH_CHECK(t.size(0) == tokens.size(0), "rlhf_ops_cuda.", op, ": ", name, " must have ",
              tokens.size(0), " rows (one per token position), got shape ", t.sizes());
  TORCH_CHECK(t.size(0) == 0 || t.stride(1) == 1, "rlhf_ops_cuda.", op, ": ", name,
              " must have unit stride over the vocabulary");
  TORCH_CHECK(t.size(0) <= INT32_MAX, "rlhf_ops_cuda.", op, ": too many rows");
}

// tokens [N] (one per row) or [N, K]; returns K.
int64_t check_tokens(const char* op, const at::Tensor& tokens) {
  RLHF_CHECK_CUDA(op, "tokens", tokens);
  RLHF_CHECK_DTYPE(op, "tokens", tokens, at::kLong);
  TORCH_CHECK(tokens.dim() == 1 || tokens.dim() == 2, "rlhf_ops_cuda.", op,
              ": tokens must be [N] or [N, K], got shape ", tokens.sizes());
  return tokens.dim() == 2 ? tokens.size(1) : 1;
}

// Returns [logprobs (tokens' shape), entropy [N], lse] without ref_logits, else
// [logprobs, ref_logprobs, log_ratio, kl, penalty, entropy, lse] (tokens [N] only); each float
// (double) but lse, which is [2, N]: (shift, log S) with lse = shift + log S.
std::vector<at::Tensor> kl_fwd(const at::Tensor& logits, const std::optional<at::Tensor>& ref_logits,
                               const at::Tensor& tokens_, const std::optional<at::Tensor>& mask_,
                               double temperature, double beta, int64_t estimator, double softcap) {
  const char* op = "kl_fwd";
  const int64_t K = check_tokens(op, tokens_);
  check_rows(op, "logits", logits, tokens_);
  RLHF_CHECK_SAME_DEVICE(op, "tokens", tokens_, "logits", logits);
  const bool has_ref = ref_logits.has_value();
  if (has_ref) {
    TORCH_CHECK(tokens_.dim() == 1, "rlhf_ops_cuda.kl_fwd: with ref_logits, tokens must be [N], got ",
                tokens_.sizes());
    check_rows(op, "ref_logits", *ref_logits, tokens_);
    RLHF_CHECK_SAME_DEVICE(op, "ref_logits", *ref_logits, "logits", logits);
    TORCH_CHECK(ref_logits->sizes() == logits.sizes() &&
                    ref_logits->scalar_type() == logits.scalar_type(),
                "rlhf_ops_cuda.kl_fwd: ref_logits must match logits in shape and dtype");
  }
  TORCH_CHECK(estimator >= 1 && estimator <= 3, "rlhf_ops_cuda.kl_fwd: estimator must be 1, 2 or 3");
  TORCH_CHECK(temperature > 0, "rlhf_ops_cuda.kl_fwd: temperature must be > 0");
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0, "rlhf_ops_cuda.kl_fwd: softcap must be a "
              "finite number >= 0 (0 = off), got ", softcap);
  TORCH_CHECK(!(softcap > 0 && has_ref), "rlhf_ops_cuda.kl_fwd: softcap applies to the log-prob "
              "form only (no ref_logits)");
  const at::cuda::OptionalCUDAGuard guard(logits.device());
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t N = logits.size(0), V = logits.size(1);
  const auto opts = logits.options().dtype(acc);
  at::Tensor mask;
  if (mask_.has_value()) {
    RLHF_CHECK_CUDA(op, "mask", *mask_);
    RLHF_CHECK_SAME_DEVICE(op, "mask", *mask_, "logits", logits);
    RLHF_CHECK_DTYPE(op, "mask", *mask_, acc);
    TORCH_CHECK(mask_->numel() == N, "rlhf_ops_cuda.kl_fwd: mask must have ", N, " elements");
    mask = mask_->contiguous();
  }
  const at::Tensor tokens = tokens_.contiguous();
  at::Tensor logp = at::empty(tokens.sizes(), opts);
  at::Tensor ent = at::empty({N}, opts);
  at::Tensor lse = at::empty({2, N}, opts);
  std::vector<at::Tensor> ref;  // ref_logprobs, log_ratio, kl, penalty
  for (int i = 0; i < (has_ref ? 4 : 0); ++i) ref.push_back(at::empty({N}, opts));
  if (N > 0) {
    int vec = pick_vec(logits, logits.stride(0), V);
    if (has_ref) vec = std::min(vec, pick_vec(*ref_logits, ref_logits->stride(0), V));
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "kl_fwd", [&] {
      using acc_t = at::acc_type<scalar_t, true>;
      acc_t* o[4];
      for (int i = 0; i < 4; ++i) o[i] = has_ref ? ref[i].data_ptr<acc_t>() : nullptr;
      const scalar_t* rp = has_ref ? ref_logits->data_ptr<scalar_t>() : nullptr;
      const int64_t rstride = has_ref ? ref_logits->stride(0) : 0;
      const acc_t* mp = mask.defined() ? mask.data_ptr<acc_t>() : nullptr;
      const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
      const acc_t cap = static_cast<acc_t>(softcap > 0 ? softcap : 1.0);
      const acc_t inv_cap = static_cast<acc_t>(softcap > 0 ? 1.0 / softcap : 1.0);
      auto launch = [&](auto vec_c, auto ref_c, auto cap_c) {
        constexpr int VEC = decltype(vec_c)::value;
        constexpr bool REF = decltype(ref_c)::value;
        constexpr bool CAP = decltype(cap_c)::value;
        kl_fwd_kernel<scalar_t, acc_t, VEC, REF, CAP><<<N, kKLThreads, 0, stream>>>(
            logits.data_ptr<scalar_t>(), logits.stride(0), rp, rstride,
            tokens.data_ptr<int64_t>(), K, mp, logp.data_ptr<acc_t>(), lse.data_ptr<acc_t>(),
            o[0], o[1], o[2], o[3], ent.data_ptr<acc_t>(), N, V, inv_t,
            static_cast<acc_t>(beta), static_cast<int>(estimator), cap, inv_cap);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      using Full = std::integral_constant<int, 16 / sizeof(scalar_t)>;
      using One = std::integral_constant<int, 1>;
      const bool full = vec * sizeof(scalar_t) == 16;
      if (has_ref) {  // never with a softcap (checked above)
        if (full) launch(Full{}, std::true_type{}, std::false_type{});
        else launch(One{}, std::true_type{}, std::false_type{});
      } else if (softcap > 0) {
        if (full) launch(Full{}, std::false_type{}, std::true_type{});
        else launch(One{}, std::false_type{}, std::true_type{});
      } else {
        if (full) launch(Full{}, std::false_type{}, std::false_type{});
        else launch(One{}, std::false_type{}, std::false_type{});
      }
    });
  }
  if (!has_ref) return {logp, ent, lse};
  return {logp, ref[0], ref[1], ref[2], ref[3], ent, lse};
}

// d/d logits of Σ grad·logprobs + Σ grad_entropy·entropy as a new tensor in the logits dtype.
// grad has the tokens' shape ([N] or [N, K], any strides); grad_entropy [N] (any stride) or
// None, with entropy [N] (the forward's) when given. logits [N, W] are the columns
// [col0, col0 + W) of rows of ``vocab`` entries (vocab < 0: W, the whole row).
at::Tensor kl_bwd(const at::Tensor& grad, const std::optional<at::Tensor>& grad_entropy,
                  const at::Tensor& logits, const at::Tensor& tokens_, const at::Tensor& lse,
                  const std::optional<at::Tensor>& entropy, double temperature, int64_t col0,
                  int64_t vocab, double softcap) {
  const char* op = "kl_bwd";
  const int64_t K = check_tokens(op, tokens_);
  check_rows(op, "logits", logits, tokens_);
  RLHF_CHECK_SAME_DEVICE(op, "tokens", tokens_, "logits", logits);
  RLHF_CHECK_CUDA(op, "grad", grad);
  RLHF_CHECK_CUDA(op, "lse", lse);
  RLHF_CHECK_SAME_DEVICE(op, "grad", grad, "logits", logits);
  RLHF_CHECK_SAME_DEVICE(op, "lse", lse, "logits", logits);
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  RLHF_CHECK_DTYPE(op, "grad", grad, acc);
  RLHF_CHECK_DTYPE(op, "lse", lse, acc);
  TORCH_CHECK(grad.sizes() == tokens_.sizes(), "rlhf_ops_cuda.kl_bwd: grad must have the tokens' shape ",
              tokens_.sizes(), ", got ", grad.sizes());
  const int64_t N = logits.size(0), W = logits.size(1);
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == 2 && lse.size(1) == N,
              "rlhf_ops_cuda.kl_bwd: lse must have shape [2, N], got ", lse.sizes());
  const bool has_gh = grad_entropy.has_value();
  at::Tensor ent;
  if (has_gh) {
    TORCH_CHECK(entropy.has_value(), "rlhf_ops_cuda.kl_bwd: grad_entropy needs the entropy");
    for (const auto* t : {&*grad_entropy, &*entropy}) {
      RLHF_CHECK_CUDA(op, "grad_entropy / entropy", *t);
      RLHF_CHECK_SAME_DEVICE(op, "grad_entropy / entropy", *t, "logits", logits);
      RLHF_CHECK_DTYPE(op, "grad_entropy / entropy", *t, acc);
      TORCH_CHECK(t->dim() == 1 && t->size(0) == N, "rlhf_ops_cuda.kl_bwd: grad_entropy and "
                  "entropy must have shape [N] = [", N, "], got ", t->sizes());
    }
    ent = entropy->contiguous();
  }
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0, "rlhf_ops_cuda.kl_bwd: softcap must be a "
              "finite number >= 0 (0 = off), got ", softcap);
  const int64_t V = vocab < 0 ? W : vocab;
  TORCH_CHECK(col0 >= 0 && col0 + W <= V, "rlhf_ops_cuda.kl_bwd: the column slice [", col0, ", ",
              col0 + W, ") must lie in [0, vocab = ", V, ")");
  const at::cuda::OptionalCUDAGuard guard(logits.device());
  const at::Tensor tokens = tokens_.contiguous();
  const at::Tensor lse_c = lse.contiguous();
  at::Tensor out = at::empty_like(logits, at::MemoryFormat::Contiguous);
  if (N == 0 || W == 0) return out;
  const int vec = std::min(pick_vec(logits, logits.stride(0), W), pick_vec(out, out.stride(0), W));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "kl_bwd", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const acc_t* gh = has_gh ? grad_entropy->data_ptr<acc_t>() : nullptr;
    const int64_t stride_gh = has_gh ? grad_entropy->stride(0) : 0;
    const acc_t* ep = has_gh ? ent.data_ptr<acc_t>() : nullptr;
    const int64_t g0 = grad.dim() == 2 ? grad.stride(0) : (grad.dim() == 1 ? grad.stride(0) : 0);
    const int64_t g1 = grad.dim() == 2 ? grad.stride(1) : 0;
    const acc_t cap = static_cast<acc_t>(softcap > 0 ? softcap : 1.0);
    const acc_t inv_cap = static_cast<acc_t>(softcap > 0 ? 1.0 / softcap : 1.0);
    auto launch = [&](auto vec_c, auto gh_c, auto cap_c) {
      constexpr int VEC = decltype(vec_c)::value;
      constexpr bool GH = decltype(gh_c)::value;
      constexpr bool CAP = decltype(cap_c)::value;
      kl_bwd_kernel<scalar_t, acc_t, VEC, GH, CAP><<<N, kKLThreads, 0, stream>>>(
          logits.data_ptr<scalar_t>(), logits.stride(0), out.data_ptr<scalar_t>(), out.stride(0),
          tokens.data_ptr<int64_t>(), K, lse_c.data_ptr<acc_t>(), lse_c.stride(0),
          grad.data_ptr<acc_t>(), g0, g1, gh, stride_gh, ep, col0, V, W,
          static_cast<acc_t>(1.0 / temperature), cap, inv_cap);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    auto with_cap = [&](auto vec_c, auto gh_c) {
      if (softcap > 0) launch(vec_c, gh_c, std::true_type{});
      else launch(vec_c, gh_c, std::false_type{});
    };
    using Full = std::integral_constant<int, 16 / sizeof(scalar_t)>;
    using One = std::integral_constant<int, 1>;
    const bool full = vec * sizeof(scalar_t) == 16;
    if (has_gh) {
      if (full) with_cap(Full{}, std::true_type{});
      else with_cap(One{}, std::true_type{});
    } else {
      if (full) with_cap(Full{}, std::false_type{});
      else with_cap(One{}, std::false_type{});
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rlhf_ops_cuda, m) {
  m.def("kl_fwd(Tensor logits, Tensor? ref_logits, Tensor tokens, Tensor? mask, float temperature, "
        "float beta, int estimator, float softcap=0.0) -> Tensor[]");
  m.def("kl_bwd(Tensor grad, Tensor? grad_entropy, Tensor logits, Tensor tokens, Tensor lse, "
        "Tensor? entropy, float temperature, int col0=0, int vocab=-1, float softcap=0.0) -> Tensor");
}

TORCH_LIBRARY_IMPL(rlhf_ops_cuda, CUDA, m) {
  m.impl("kl_fwd", &kl_fwd);
  m.impl("kl_bwd", &kl_bwd);
}

}  // namespace rlhf
