// Per-token log-probabilities and the PPO KL penalty, CUDA: one thread block per row, 16-byte
// vector loads, warp-shuffle reductions, accumulation in float (double for double inputs).
//
// Forward per row, y = x / T: every thread keeps, over its strided share of the policy row,
//   m = max y,  s = Σ exp(y − m),  h = Σ exp(y − m)·(y − m)
// and (m, s) over the same columns of the reference row. Two states merge with
// M = max(m1, m2), a_i = exp(m_i − M):
//   s = a1·s1 + a2·s2,   h = a1·(h1 + (m1 − M)·s1) + a2·(h2 + (m2 − M)·s2)
// (exp(y − M)·(y − M) = a_i·exp(y − m_i)·((y − m_i) + (m_i − M))). After the block reduction
// thread 0 writes
//   lse = M + log S, kept as the pair (M, log S) in lse [2, N] (rounding M + log S to float costs
//   ~1e-3 at |y| ~ 1e4), logp = (y_t − M) − log S,  entropy = lse − Σ p·y = log S − H/S,
//   ref_logp, d = logp − ref_logp, kl (k1 = d, k2 = ½d², k3 = e^{−d} − 1 + d), penalty = −β·kl·mask.
// A token out of [0, V) gives NaN for its row (and is never read).
// Backward per element: dx_j = G · ([j = t] − exp((y_j − M) − log S)) / T, in the logits dtype.
#include "common.cuh"

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

// k3 = e^{−d} − 1 + d. In float its Taylor series Σ_{n≥2} (−d)ⁿ/n! for |d| < ½ avoids the
// cancellation of the closed form; double has the digits to spare.
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
    return expm1(-d) + d;
  }
}

template <typename scalar_t, typename acc_t, int VEC, bool HAS_REF>
__global__ void __launch_bounds__(kKLThreads)
kl_fwd_kernel(const scalar_t* __restrict__ x, int64_t stride_x, const scalar_t* __restrict__ r,
              int64_t stride_r, const int64_t* __restrict__ tokens, const acc_t* __restrict__ mask,
              acc_t* __restrict__ logp_out, acc_t* __restrict__ lse_out,
              acc_t* __restrict__ ref_out, acc_t* __restrict__ ratio_out,
              acc_t* __restrict__ kl_out, acc_t* __restrict__ pen_out,
              acc_t* __restrict__ ent_out, int64_t N, int64_t V, acc_t inv_t, acc_t beta,
              int estimator) {
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
      for (int j = 0; j < VEC; ++j) v[j] = static_cast<acc_t>(p.v[j]) * inv_t;
      fold(st, v);
    }
  }
  for (int64_t i = nvec * VEC + threadIdx.x; i < V; i += kKLThreads) {  // tail (VEC == 1: all)
    const acc_t v[1] = {static_cast<acc_t>(xr[i]) * inv_t};
    fold(st, v);
    if constexpr (HAS_REF) {
      const acc_t w[1] = {static_cast<acc_t>(rr[i]) * inv_t};
      fold(rs, w);
    }
  }
  block_reduce(st, rs, smem);
  if (threadIdx.x != 0) return;
  const int64_t t = tokens[row];
  const bool ok = t >= 0 && t < V;
  const acc_t shift = st.m == neg_inf<acc_t>() ? acc_t(0) : st.m;  // all −inf: lse = 0 + log 0
  const acc_t log_s = log_sum(st.s);
  const acc_t logp = ok ? (static_cast<acc_t>(xr[t]) * inv_t - shift) - log_s : acc_t(NAN);
  logp_out[row] = logp;
  lse_out[row] = shift;
  lse_out[N + row] = log_s;
  if constexpr (HAS_REF) {
    ent_out[row] = log_s - st.h / st.s;  // lse − Σ p·y
    const acc_t rshift = rs.m == neg_inf<acc_t>() ? acc_t(0) : rs.m;
    const acc_t ref = ok ? (static_cast<acc_t>(rr[t]) * inv_t - rshift) - log_sum(rs.s) : acc_t(NAN);
    const acc_t d = logp - ref;
    const acc_t kl = estimator == 1 ? d : estimator == 2 ? acc_t(0.5) * d * d : k3(d);
    ref_out[row] = ref;
    ratio_out[row] = d;
    kl_out[row] = kl;
    pen_out[row] = -beta * kl * (mask != nullptr ? mask[row] : acc_t(1));
  }
}

template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kKLThreads)
kl_bwd_kernel(const scalar_t* __restrict__ x, int64_t stride_x, scalar_t* __restrict__ dx,
              int64_t stride_dx, const int64_t* __restrict__ tokens,
              const acc_t* __restrict__ lse_in, int64_t stride_lse, const acc_t* __restrict__ grad,
              int64_t stride_g, int64_t V, acc_t inv_t) {
  const int64_t row = blockIdx.x;
  const int64_t t = tokens[row];
  const bool ok = t >= 0 && t < V;
  const acc_t g = grad[row * stride_g] * inv_t;  // G / T
  const acc_t shift = lse_in[row], log_s = lse_in[stride_lse + row];
  const scalar_t* xr = x + row * stride_x;
  scalar_t* dr = dx + row * stride_dx;
  auto grad_of = [&](acc_t v, int64_t col) -> acc_t {
    if (!ok) return acc_t(NAN);
    return ((col == t ? acc_t(1) : acc_t(0)) - exp((v * inv_t - shift) - log_s)) * g;
  };
  const int64_t nvec = V / VEC;
  for (int64_t i = threadIdx.x; i < nvec; i += kKLThreads) {
    Pack<scalar_t, VEC> p = reinterpret_cast<const Pack<scalar_t, VEC>*>(xr)[i];
#pragma unroll
    for (int j = 0; j < VEC; ++j)
      p.v[j] = static_cast<scalar_t>(grad_of(static_cast<acc_t>(p.v[j]), i * VEC + j));
    reinterpret_cast<Pack<scalar_t, VEC>*>(dr)[i] = p;
  }
  for (int64_t i = nvec * VEC + threadIdx.x; i < V; i += kKLThreads)
    dr[i] = static_cast<scalar_t>(grad_of(static_cast<acc_t>(xr[i]), i));
}

void check_rows(const char* op, const char* name, const at::Tensor& t, const at::Tensor& tokens) {
  RLHF_CHECK_CUDA(op, name, t);
  RLHF_CHECK_DIM(op, name, t, 2);
  TORCH_CHECK(t.size(0) == tokens.size(0), "rlhf_ops_cuda.", op, ": ", name, " must have ",
              tokens.size(0), " rows (one per token), got shape ", t.sizes());
  TORCH_CHECK(t.size(0) == 0 || t.stride(1) == 1, "rlhf_ops_cuda.", op, ": ", name,
              " must have unit stride over the vocabulary");
  TORCH_CHECK(t.size(0) <= INT32_MAX, "rlhf_ops_cuda.", op, ": too many rows");
}

void check_tokens(const char* op, const at::Tensor& tokens) {
  RLHF_CHECK_CUDA(op, "tokens", tokens);
  RLHF_CHECK_DTYPE(op, "tokens", tokens, at::kLong);
  RLHF_CHECK_DIM(op, "tokens", tokens, 1);
}

// Returns [logprobs, lse] without ref_logits, else
// [logprobs, ref_logprobs, log_ratio, kl, penalty, entropy, lse]; each [N] float (double) but
// lse, which is [2, N]: (shift, log S) with lse = shift + log S.
std::vector<at::Tensor> kl_fwd(const at::Tensor& logits, const std::optional<at::Tensor>& ref_logits,
                               const at::Tensor& tokens_, const std::optional<at::Tensor>& mask_,
                               double temperature, double beta, int64_t estimator) {
  const char* op = "kl_fwd";
  check_tokens(op, tokens_);
  check_rows(op, "logits", logits, tokens_);
  RLHF_CHECK_SAME_DEVICE(op, "tokens", tokens_, "logits", logits);
  const bool has_ref = ref_logits.has_value();
  if (has_ref) {
    check_rows(op, "ref_logits", *ref_logits, tokens_);
    RLHF_CHECK_SAME_DEVICE(op, "ref_logits", *ref_logits, "logits", logits);
    TORCH_CHECK(ref_logits->sizes() == logits.sizes() &&
                    ref_logits->scalar_type() == logits.scalar_type(),
                "rlhf_ops_cuda.kl_fwd: ref_logits must match logits in shape and dtype");
  }
  TORCH_CHECK(estimator >= 1 && estimator <= 3, "rlhf_ops_cuda.kl_fwd: estimator must be 1, 2 or 3");
  TORCH_CHECK(temperature > 0, "rlhf_ops_cuda.kl_fwd: temperature must be > 0");
  const at::cuda::OptionalCUDAGuard guard(logits.device());
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t N = logits.size(0), V = logits.size(1);
  at::Tensor mask;
  if (mask_.has_value()) {
    RLHF_CHECK_CUDA(op, "mask", *mask_);
    RLHF_CHECK_SAME_DEVICE(op, "mask", *mask_, "logits", logits);
    RLHF_CHECK_DTYPE(op, "mask", *mask_, acc);
    TORCH_CHECK(mask_->numel() == N, "rlhf_ops_cuda.kl_fwd: mask must have ", N, " elements");
    mask = mask_->contiguous();
  }
  const at::Tensor tokens = tokens_.contiguous();
  std::vector<at::Tensor> out;
  for (int i = 0; i < (has_ref ? 6 : 1); ++i) out.push_back(at::empty({N}, logits.options().dtype(acc)));
  out.push_back(at::empty({2, N}, logits.options().dtype(acc)));
  if (N == 0) return out;
  int vec = pick_vec(logits, logits.stride(0), V);
  if (has_ref) vec = std::min(vec, pick_vec(*ref_logits, ref_logits->stride(0), V));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "kl_fwd", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    acc_t* o[7];
    for (int i = 0; i < 7; ++i) o[i] = out[has_ref ? i : 0].data_ptr<acc_t>();
    acc_t* lse = out.back().data_ptr<acc_t>();
    const scalar_t* rp = has_ref ? ref_logits->data_ptr<scalar_t>() : nullptr;
    const int64_t rstride = has_ref ? ref_logits->stride(0) : 0;
    const acc_t* mp = mask.defined() ? mask.data_ptr<acc_t>() : nullptr;
    const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
    auto launch = [&](auto vec_c, auto ref_c) {
      constexpr int VEC = decltype(vec_c)::value;
      constexpr bool REF = decltype(ref_c)::value;
      kl_fwd_kernel<scalar_t, acc_t, VEC, REF><<<N, kKLThreads, 0, stream>>>(
          logits.data_ptr<scalar_t>(), logits.stride(0), rp, rstride,
          tokens.data_ptr<int64_t>(), mp, o[0], lse, o[1], o[2], o[3], o[4], o[5], N, V, inv_t,
          static_cast<acc_t>(beta), static_cast<int>(estimator));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    using Full = std::integral_constant<int, 16 / sizeof(scalar_t)>;
    using One = std::integral_constant<int, 1>;
    const bool full = vec * sizeof(scalar_t) == 16;
    if (has_ref) {
      if (full) launch(Full{}, std::true_type{});
      else launch(One{}, std::true_type{});
    } else {
      if (full) launch(Full{}, std::false_type{});
      else launch(One{}, std::false_type{});
    }
  });
  return out;
}

// grad [N] (G, any stride) → G · ∂logp/∂logits as a new [N, V] tensor in the logits dtype.
at::Tensor kl_bwd(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& tokens_,
                  const at::Tensor& lse, double temperature) {
  const char* op = "kl_bwd";
  check_tokens(op, tokens_);
  check_rows(op, "logits", logits, tokens_);
  RLHF_CHECK_SAME_DEVICE(op, "tokens", tokens_, "logits", logits);
  RLHF_CHECK_CUDA(op, "grad", grad);
  RLHF_CHECK_CUDA(op, "lse", lse);
  RLHF_CHECK_SAME_DEVICE(op, "grad", grad, "logits", logits);
  RLHF_CHECK_SAME_DEVICE(op, "lse", lse, "logits", logits);
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  RLHF_CHECK_DTYPE(op, "grad", grad, acc);
  RLHF_CHECK_DTYPE(op, "lse", lse, acc);
  TORCH_CHECK(grad.dim() == 1 && grad.size(0) == logits.size(0),
              "rlhf_ops_cuda.kl_bwd: grad must have one element per row, got shape ", grad.sizes());
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == 2 && lse.size(1) == logits.size(0),
              "rlhf_ops_cuda.kl_bwd: lse must have shape [2, N], got ", lse.sizes());
  const at::cuda::OptionalCUDAGuard guard(logits.device());
  const at::Tensor tokens = tokens_.contiguous();
  const at::Tensor lse_c = lse.contiguous();
  const int64_t N = logits.size(0), V = logits.size(1);
  at::Tensor out = at::empty_like(logits, at::MemoryFormat::Contiguous);
  if (N == 0 || V == 0) return out;
  const int vec = std::min(pick_vec(logits, logits.stride(0), V), pick_vec(out, out.stride(0), V));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "kl_bwd", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    auto launch = [&](auto vec_c) {
      constexpr int VEC = decltype(vec_c)::value;
      kl_bwd_kernel<scalar_t, acc_t, VEC><<<N, kKLThreads, 0, stream>>>(
          logits.data_ptr<scalar_t>(), logits.stride(0), out.data_ptr<scalar_t>(), out.stride(0),
          tokens.data_ptr<int64_t>(), lse_c.data_ptr<acc_t>(), lse_c.stride(0),
          grad.data_ptr<acc_t>(), grad.stride(0), V, static_cast<acc_t>(1.0 / temperature));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (vec * sizeof(scalar_t) == 16) launch(std::integral_constant<int, 16 / sizeof(scalar_t)>{});
    else launch(std::integral_constant<int, 1>{});
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rlhf_ops_cuda, m) {
  m.def("kl_fwd(Tensor logits, Tensor? ref_logits, Tensor tokens, Tensor? mask, float temperature, "
        "float beta, int estimator) -> Tensor[]");
  m.def("kl_bwd(Tensor grad, Tensor logits, Tensor tokens, Tensor lse, float temperature) -> Tensor");
}

TORCH_LIBRARY_IMPL(rlhf_ops_cuda, CUDA, m) {
  m.impl("kl_fwd", &kl_fwd);
  m.impl("kl_bwd", &kl_bwd);
}

}  // namespace rlhf
