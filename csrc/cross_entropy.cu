// Softmax cross-entropy, CUDA: one thread block per row, 16-byte vector loads, warp-shuffle
// reductions, accumulation in float (double for double inputs).
//
// Forward per row: each thread keeps an online-softmax state (m, s = Σ exp(x − m)) and Σ x over
// its strided share of the row; the block merges them, then
//   loss = lse − (1−ε)·x_t − ε·Σx/V = log s + (1−ε)·(m − x_t) + ε·(m − x_0 − Σ(x − x_0)/V)
// (0 if ignored, NaN if t is out of range). lse = m + log s is saved as the pair (m, log s),
// [2, N]: rounding m + log s to float would cost ulp(m)/2 (5e-4 at |x| ~ 1e4) in every
// exp(x − lse) of the backward, while x − m is exact for the logits that matter.
// Backward per element: dx_j = g · (exp((x_j − m) − log s) − (1−ε)·[j = t] − ε/V), written in the
// logits dtype; ``out`` may alias ``logits`` (in-place backward), so neither is __restrict__.
//
// Vocabulary parallel (rlhf_ops.distributed): the logits are this rank's slice [o, o + V) of a
// V_g-wide vocabulary, targets hold global ids, o (and V_g) come in a small int64 device tensor.
// cross_entropy_stats writes per row, [5, N]: shift (= m, 0 when the slice is all −inf), log s,
// owned = [o ≤ t < o + V], shift − x_t (0 if not owned), Σ_j (shift − x_j) = V·(shift − x_0) −
// Σ(x − x_0) (label smoothing), which rlhf_ops.distributed combines across ranks. The backward
// with shard = (o, V_g) reads the combined lse, puts the one-hot at column t − o, uses ε/V_g and
// gives NaN for a target outside [0, V_g).
//
// Logit softcap (CAP, c > 0; Gemma-2's final_logit_softcapping): each logit becomes c·tanh(x/c) as
// it is read (softcap.cuh: accurate under fast math, −inf stays −inf), so the formulas above hold
// for the capped logits (the pivot x_0 and the target logit included); the backward multiplies
// by the derivative 1 − tanh²(x_j/c). The kernels without CAP are the same code as before.
#include <optional>

#include "common.cuh"
#include "softcap.cuh"

namespace rlhf {
namespace {

constexpr int kThreads = 512;

// A logit read in acc_t, soft-capped with CAP (c·tanh(x/c)).
template <bool CAP, typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t logit(scalar_t v, acc_t cap, acc_t inv_cap) {
  const acc_t x = static_cast<acc_t>(v);
  if constexpr (CAP) {
    acc_t unused;
    return softcap(x, cap, inv_cap, unused);
  } else {
    return x;
  }
}

template <typename scalar_t, typename acc_t, int VEC, bool CAP>
__global__ void __launch_bounds__(kThreads)
ce_fwd_kernel(const scalar_t* __restrict__ x, int64_t stride, const int64_t* __restrict__ target,
              acc_t* __restrict__ loss, acc_t* __restrict__ lse_out, int64_t V,
              int64_t ignore_index, acc_t eps, const int64_t* __restrict__ offset,
              acc_t* __restrict__ stats, int64_t N, acc_t cap, acc_t inv_cap) {
  __shared__ acc_t smem[3 * kThreads / kWarp];
  const int64_t row = blockIdx.x;
  const scalar_t* xr = x + row * stride;
  SoftmaxState<acc_t> st{neg_inf<acc_t>(), acc_t(0)};
  // Σ (x − x_0) for label smoothing, x_0 = the row's first logit if finite (else 0): a sum of V raw
  // float logits near 1e4 would round at ulp(V·1e4), far above eager's error.
  const acc_t first = V > 0 ? logit<CAP>(xr[0], cap, inv_cap) : acc_t(0);
  const acc_t x0 = isfinite(first) ? first : acc_t(0);
  acc_t sx = 0;
  const int64_t nvec = V / VEC;
  const Pack<scalar_t, VEC>* xv = reinterpret_cast<const Pack<scalar_t, VEC>*>(xr);
  for (int64_t i = threadIdx.x; i < nvec; i += kThreads) {
    Pack<scalar_t, VEC> p = xv[i];
    acc_t v[VEC];
    acc_t vmax = neg_inf<acc_t>();
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      v[j] = logit<CAP>(p.v[j], cap, inv_cap);
      vmax = max_nan(vmax, v[j]);
      sx += v[j] - x0;
    }
    if (vmax == neg_inf<acc_t>()) continue;
    acc_t vs = 0;
#pragma unroll
    for (int j = 0; j < VEC; ++j) vs += exp(v[j] - vmax);
    st.merge(vmax, vs);
  }
  for (int64_t i = nvec * VEC + threadIdx.x; i < V; i += kThreads) {  // tail (VEC == 1 covers all)
    acc_t v = logit<CAP>(xr[i], cap, inv_cap);
    sx += v - x0;
    if (v != neg_inf<acc_t>()) st.merge(v, acc_t(1));
  }
  block_reduce_softmax(st, sx, smem);
  if (threadIdx.x == 0) {
    const acc_t log_s = log_sum(st.s);  // all −inf: log 0 = −inf
    const acc_t shift = st.m == neg_inf<acc_t>() ? acc_t(0) : st.m;
    const int64_t t = target[row];
    if (stats != nullptr) {  // a vocabulary slice: its statistics, combined across ranks later
      const int64_t tl = t - offset[0];
      const bool owned = t != ignore_index && tl >= 0 && tl < V;
      stats[row] = shift;
      stats[N + row] = log_s;
      stats[2 * N + row] = owned ? acc_t(1) : acc_t(0);
      stats[3 * N + row] = owned ? shift - logit<CAP>(xr[tl], cap, inv_cap) : acc_t(0);
      stats[4 * N + row] = eps > 0 ? static_cast<acc_t>(V) * (shift - x0) - sx : acc_t(0);
      return;
    }
    acc_t l = 0;
    if (t != ignore_index) {
      if (t < 0 || t >= V) {
        l = NAN;
      } else {
        l = log_s + (acc_t(1) - eps) * (shift - logit<CAP>(xr[t], cap, inv_cap));
        if (eps > 0) l += eps * ((shift - x0) - sx / static_cast<acc_t>(V));
      }
    }
    loss[row] = l;
    lse_out[row] = shift;  // lse [2, N]
    lse_out[N + row] = log_s;
  }
}

template <typename scalar_t, typename acc_t, int VEC, bool CAP>
__global__ void __launch_bounds__(kThreads)
ce_bwd_kernel(const scalar_t* x, int64_t stride_x, scalar_t* dx, int64_t stride_dx,
              const int64_t* __restrict__ target, const acc_t* __restrict__ lse_in,
              const acc_t* __restrict__ grad, int64_t stride_g, int64_t V, int64_t ignore_index,
              acc_t eps, const int64_t* __restrict__ shard, acc_t cap, acc_t inv_cap) {
  const int64_t row = blockIdx.x;
  const int64_t t = target[row];
  // a vocabulary slice holds the global ids [col0, col0 + V) of V_g
  const int64_t col0 = shard != nullptr ? shard[0] : 0;
  const int64_t V_g = shard != nullptr ? shard[1] : V;
  const bool valid = t != ignore_index;
  const bool in_range = t >= 0 && t < V_g;
  const acc_t g = grad[row * stride_g];
  // lse [2, N], one block per row: N = gridDim.x
  const acc_t shift = lse_in[row], log_s = lse_in[static_cast<int64_t>(gridDim.x) + row];
  const acc_t off = eps / static_cast<acc_t>(V_g);
  const scalar_t* xr = x + row * stride_x;
  scalar_t* dr = dx + row * stride_dx;
  auto grad_of = [&](acc_t v, int64_t col) -> acc_t {
    if (!valid) return acc_t(0);
    if (!in_range) return acc_t(NAN);
    acc_t dcap = acc_t(1);
    if constexpr (CAP) v = softcap(v, cap, inv_cap, dcap);  // the chain rule: × (1 − tanh²(x/c))
    acc_t d = exp((v - shift) - log_s) - off;
    if (col + col0 == t) d -= acc_t(1) - eps;
    if constexpr (CAP) return d * g * dcap;
    return d * g;
  };
  const int64_t nvec = V / VEC;
  for (int64_t i = threadIdx.x; i < nvec; i += kThreads) {
    Pack<scalar_t, VEC> p = reinterpret_cast<const Pack<scalar_t, VEC>*>(xr)[i];
#pragma unroll
    for (int j = 0; j < VEC; ++j)
      p.v[j] = static_cast<scalar_t>(grad_of(static_cast<acc_t>(p.v[j]), i * VEC + j));
    reinterpret_cast<Pack<scalar_t, VEC>*>(dr)[i] = p;
  }
  for (int64_t i = nvec * VEC + threadIdx.x; i < V; i += kThreads)
    dr[i] = static_cast<scalar_t>(grad_of(static_cast<acc_t>(xr[i]), i));
}

void check_inputs(const char* op, const at::Tensor& logits, const at::Tensor& target) {
  RLHF_CHECK_CUDA(op, "logits", logits);
  RLHF_CHECK_CUDA(op, "target", target);
  RLHF_CHECK_SAME_DEVICE(op, "target", target, "logits", logits);
  RLHF_CHECK_DIM(op, "logits", logits, 2);
  RLHF_CHECK_DTYPE(op, "target", target, at::kLong);
  TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0), "rlhf_ops_cuda.", op,
              ": target must have shape [N] = [", logits.size(0), "], got ", target.sizes());
  TORCH_CHECK(logits.size(0) == 0 || logits.stride(1) == 1, "rlhf_ops_cuda.", op,
              ": logits must have unit stride over the vocabulary");
  TORCH_CHECK(logits.size(0) <= INT32_MAX, "rlhf_ops_cuda.", op, ": too many rows");
}

// One launch of ce_fwd_kernel: (loss, lse) when ``stats`` is undefined, else the slice's
// statistics into ``stats`` [5, N] (``offset``: int64 [1], the slice's first global id).
void launch_fwd(const at::Tensor& logits, const at::Tensor& target, at::Tensor& loss, at::Tensor& lse,
                int64_t ignore_index, double label_smoothing, const at::Tensor& offset,
                at::Tensor& stats, double softcap) {
  const int64_t N = logits.size(0), V = logits.size(1);
  const int vec = pick_vec(logits, logits.stride(0), V);
  const bool sharded = stats.defined();
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cross_entropy_fwd", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const acc_t cap = static_cast<acc_t>(softcap > 0 ? softcap : 1.0);
    const acc_t inv_cap = static_cast<acc_t>(softcap > 0 ? 1.0 / softcap : 1.0);
    auto launch = [&](auto vec_c, auto cap_c) {
      constexpr int VEC = decltype(vec_c)::value;
      constexpr bool CAP = decltype(cap_c)::value;
      ce_fwd_kernel<scalar_t, acc_t, VEC, CAP><<<N, kThreads, 0, stream>>>(
          logits.data_ptr<scalar_t>(), logits.stride(0), target.data_ptr<int64_t>(),
          sharded ? nullptr : loss.data_ptr<acc_t>(), sharded ? nullptr : lse.data_ptr<acc_t>(), V,
          ignore_index, static_cast<acc_t>(label_smoothing),
          sharded ? offset.data_ptr<int64_t>() : nullptr, sharded ? stats.data_ptr<acc_t>() : nullptr, N,
          cap, inv_cap);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    using Full = std::integral_constant<int, 16 / sizeof(scalar_t)>;
    using One = std::integral_constant<int, 1>;
    const bool full = vec * sizeof(scalar_t) == 16;
    if (softcap > 0) {
      if (full) launch(Full{}, std::true_type{});
      else launch(One{}, std::true_type{});
    } else {
      if (full) launch(Full{}, std::false_type{});
      else launch(One{}, std::false_type{});
    }
  });
}

void check_softcap(const char* op, double softcap) {
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0, "rlhf_ops_cuda.", op,
              ": softcap must be a finite number >= 0 (0 = off), got ", softcap);
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd(const at::Tensor& logits, const at::Tensor& target_,
                                                     int64_t ignore_index, double label_smoothing,
                                                     double softcap) {
  check_inputs("cross_entropy_fwd", logits, target_);
  check_softcap("cross_entropy_fwd", softcap);
  const at::cuda::OptionalCUDAGuard guard(logits.device());
  const at::Tensor target = target_.contiguous();
  const int64_t N = logits.size(0);
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor loss = at::empty({N}, logits.options().dtype(acc));
  at::Tensor lse = at::empty({2, N}, logits.options().dtype(acc));  // (m, log s) per row
  if (N == 0) return {loss, lse};
  at::Tensor no_offset, no_stats;
  launch_fwd(logits, target, loss, lse, ignore_index, label_smoothing, no_offset, no_stats, softcap);
  return {loss, lse};
}

at::Tensor cross_entropy_stats(const at::Tensor& logits, const at::Tensor& target_, const at::Tensor& offset,
                               int64_t ignore_index, bool smoothing, double softcap) {
  check_inputs("cross_entropy_stats", logits, target_);
  check_softcap("cross_entropy_stats", softcap);
  RLHF_CHECK_CUDA("cross_entropy_stats", "offset", offset);
  RLHF_CHECK_SAME_DEVICE("cross_entropy_stats", "offset", offset, "logits", logits);
  RLHF_CHECK_DTYPE("cross_entropy_stats", "offset", offset, at::kLong);
  TORCH_CHECK(offset.numel() == 1, "rlhf_ops_cuda.cross_entropy_stats: offset must have one element, got ",
              offset.sizes());
  const at::cuda::OptionalCUDAGuard guard(logits.device());
  const at::Tensor target = target_.contiguous();
  const at::Tensor off = offset.contiguous();
  const int64_t N = logits.size(0), V = logits.size(1);
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor stats = at::empty({5, N}, logits.options().dtype(acc));
  if (N == 0) return stats;
  if (V == 0) {  // an empty slice: no mass, no target
    stats.zero_();
    stats[1].fill_(-INFINITY);
    return stats;
  }
  at::Tensor unused;
  launch_fwd(logits, target, unused, unused, ignore_index, smoothing ? 1.0 : 0.0, off, stats, softcap);
  return stats;
}

void cross_entropy_bwd(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& target_,
                       const at::Tensor& lse, at::Tensor out, int64_t ignore_index,
                       double label_smoothing, const std::optional<at::Tensor>& shard_, double softcap) {
  check_inputs("cross_entropy_bwd", logits, target_);
  check_softcap("cross_entropy_bwd", softcap);
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  RLHF_CHECK_CUDA("cross_entropy_bwd", "grad", grad);
  RLHF_CHECK_CUDA("cross_entropy_bwd", "lse", lse);
  RLHF_CHECK_CUDA("cross_entropy_bwd", "out", out);
  RLHF_CHECK_SAME_DEVICE("cross_entropy_bwd", "grad", grad, "logits", logits);
  RLHF_CHECK_SAME_DEVICE("cross_entropy_bwd", "lse", lse, "logits", logits);
  RLHF_CHECK_SAME_DEVICE("cross_entropy_bwd", "out", out, "logits", logits);
  RLHF_CHECK_DTYPE("cross_entropy_bwd", "grad", grad, acc);
  RLHF_CHECK_DTYPE("cross_entropy_bwd", "lse", lse, acc);
  TORCH_CHECK(grad.dim() == 1 && grad.size(0) == logits.size(0),
              "rlhf_ops_cuda.cross_entropy_bwd: grad must have shape [N] = [", logits.size(0),
              "], got ", grad.sizes());
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == 2 && lse.size(1) == logits.size(0),
              "rlhf_ops_cuda.cross_entropy_bwd: lse must have shape [2, N] = [2, ", logits.size(0),
              "], got ", lse.sizes());
  TORCH_CHECK(out.sizes() == logits.sizes() && out.scalar_type() == logits.scalar_type() &&
                  (out.size(0) == 0 || out.stride(1) == 1),
              "rlhf_ops_cuda.cross_entropy_bwd: out must match logits in shape and dtype");
  at::Tensor shard;
  if (shard_.has_value()) {
    shard = shard_->contiguous();
    RLHF_CHECK_CUDA("cross_entropy_bwd", "shard", shard);
    RLHF_CHECK_SAME_DEVICE("cross_entropy_bwd", "shard", shard, "logits", logits);
    RLHF_CHECK_DTYPE("cross_entropy_bwd", "shard", shard, at::kLong);
    TORCH_CHECK(shard.numel() == 2, "rlhf_ops_cuda.cross_entropy_bwd: shard must be (offset, V), 2 "
                "elements, got ", shard.sizes());
  }
  const at::cuda::OptionalCUDAGuard guard(logits.device());
  const at::Tensor target = target_.contiguous();
  const at::Tensor lse_c = lse.contiguous();
  const int64_t N = logits.size(0), V = logits.size(1);
  if (N == 0 || V == 0) return;
  const int vec = std::min(pick_vec(logits, logits.stride(0), V), pick_vec(out, out.stride(0), V));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cross_entropy_bwd", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const acc_t cap = static_cast<acc_t>(softcap > 0 ? softcap : 1.0);
    const acc_t inv_cap = static_cast<acc_t>(softcap > 0 ? 1.0 / softcap : 1.0);
    auto launch = [&](auto vec_c, auto cap_c) {
      constexpr int VEC = decltype(vec_c)::value;
      constexpr bool CAP = decltype(cap_c)::value;
      ce_bwd_kernel<scalar_t, acc_t, VEC, CAP><<<N, kThreads, 0, stream>>>(
          logits.data_ptr<scalar_t>(), logits.stride(0), out.data_ptr<scalar_t>(), out.stride(0),
          target.data_ptr<int64_t>(), lse_c.data_ptr<acc_t>(), grad.data_ptr<acc_t>(),
          grad.stride(0), V, ignore_index, static_cast<acc_t>(label_smoothing),
          shard.defined() ? shard.data_ptr<int64_t>() : nullptr, cap, inv_cap);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    using Full = std::integral_constant<int, 16 / sizeof(scalar_t)>;
    using One = std::integral_constant<int, 1>;
    const bool full = vec * sizeof(scalar_t) == 16;
    if (softcap > 0) {
      if (full) launch(Full{}, std::true_type{});
      else launch(One{}, std::true_type{});
    } else {
      if (full) launch(Full{}, std::false_type{});
      else launch(One{}, std::false_type{});
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rlhf_ops_cuda, m) {
  m.def("cross_entropy_fwd(Tensor logits, Tensor target, int ignore_index, float label_smoothing, "
        "float softcap=0.0) -> (Tensor, Tensor)");
  m.def("cross_entropy_bwd(Tensor grad, Tensor logits, Tensor target, Tensor lse, Tensor(a!) out, "
        "int ignore_index, float label_smoothing, Tensor? shard=None, float softcap=0.0) -> ()");
  m.def("cross_entropy_stats(Tensor logits, Tensor target, Tensor offset, int ignore_index, "
        "bool smoothing, float softcap=0.0) -> Tensor");
}

TORCH_LIBRARY_IMPL(rlhf_ops_cuda, CUDA, m) {
  m.impl("cross_entropy_fwd", &cross_entropy_fwd);
  m.impl("cross_entropy_bwd", &cross_entropy_bwd);
  m.impl("cross_entropy_stats", &cross_entropy_stats);
}

}  // namespace rlhf
