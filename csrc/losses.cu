// Generalised advantage estimation, CUDA: one warp per sequence, one reverse scan.
//
// Per sequence (a row of a dense [B, T] batch, or the segment [cu[b], cu[b+1]) of a packed [N]
// one), walking from its last position to its first and carrying (V', A') = the value and the
// advantage of the nearest *unmasked* position after t ((0, 0) past the end):
//   unmasked t:  δ_t = r_t + γ·V' − V_t,  A_t = δ_t + γλ·A',  R_t = A_t + V_t,  (V', A') ← (V_t, A_t)
//   masked t:    A_t = R_t = 0, (V', A') unchanged (multi-turn: tool tokens are skipped; r_t and
//                V_t are never read)
// Both carries are affine maps of the carry entering a position, x ↦ a·x + b: V' ↦ V_t is
// (0, V_t), A' ↦ δ_t + γλ·A' is (γλ, δ_t), a masked position is the identity (1, 0). The warp
// takes the sequence in chunks of kChunk positions from the end; lane l owns the kElems
// consecutive positions hi − 1 − (l·kElems + e), e = 0..kElems−1 (backwards in time). Per chunk:
//   1. each lane composes its V maps; a warp scan (__shfl_up_sync) gives every lane the V'
//      entering its first position; serially over its positions it forms δ and its A maps;
//   2. the same for the A maps; serially it writes A and R;
//   3. lane 31's final (V', A') is the carry into the next chunk (__shfl_sync).
// Composition (first (a1, b1), then (a2, b2)) = (a1·a2, b2 if a2 = 0 else a2·b1 + b2): a
// constant map gives exactly its constant, whatever came before (no 0·inf).
// rewards and values arrive in the accumulation dtype (float, or double for fp64 inputs).
#include "common.cuh"

#include <optional>

namespace rlhf {
namespace {

constexpr int kSeqPerBlock = 4;          // warps (sequences) per block
constexpr int kElems = 4;                // consecutive positions per lane
constexpr int kChunk = kWarp * kElems;   // positions per warp step

template <typename acc_t>
__device__ __forceinline__ acc_t affine_apply(acc_t a, acc_t b, acc_t x) {
  return a == acc_t(0) ? b : a * x + b;
}

// (a, b) ← (a, b) applied after (first_a, first_b)
template <typename acc_t>
__device__ __forceinline__ void affine_after(acc_t first_a, acc_t first_b, acc_t& a, acc_t& b) {
  b = a == acc_t(0) ? b : a * first_b + b;
  a = first_a * a;
}

// Inclusive warp scan: lane l ends with the composition of the maps of lanes 0..l (in order),
// then the exclusive one (lanes 0..l−1; the identity on lane 0) is returned in (ea, eb).
template <typename acc_t>
__device__ __forceinline__ void warp_exclusive_scan(acc_t a, acc_t b, int lane, acc_t& ea, acc_t& eb) {
#pragma unroll
  for (int o = 1; o < kWarp; o <<= 1) {
    const acc_t pa = __shfl_up_sync(0xffffffffu, a, o);
    const acc_t pb = __shfl_up_sync(0xffffffffu, b, o);
    if (lane >= o) affine_after(pa, pb, a, b);
  }
  ea = __shfl_up_sync(0xffffffffu, a, 1);
  eb = __shfl_up_sync(0xffffffffu, b, 1);
  if (lane == 0) {
    ea = acc_t(1);
    eb = acc_t(0);
  }
}

template <typename acc_t>
__global__ void __launch_bounds__(kSeqPerBlock * kWarp)
gae_fwd_kernel(const acc_t* __restrict__ rewards, const acc_t* __restrict__ values,
               const uint8_t* __restrict__ mask, const int* __restrict__ cu_seqlens,
               acc_t* __restrict__ adv, acc_t* __restrict__ ret, int64_t n_seq, int64_t T,
               acc_t gamma, acc_t gl) {
  const int lane = threadIdx.x % kWarp;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kSeqPerBlock + threadIdx.x / kWarp;
  if (b >= n_seq) return;  // the whole warp leaves together: the shuffles below stay full-warp
  const int64_t start = cu_seqlens != nullptr ? static_cast<int64_t>(cu_seqlens[b]) : b * T;
  const int64_t end = cu_seqlens != nullptr ? static_cast<int64_t>(cu_seqlens[b + 1]) : start + T;
  acc_t v_carry = 0, a_carry = 0;  // (V', A') entering the chunk from the positions after it
  for (int64_t hi = end; hi > start; hi -= kChunk) {
    acc_t r[kElems], v[kElems];
    bool m[kElems];
#pragma unroll
    for (int e = 0; e < kElems; ++e) {
      const int64_t t = hi - 1 - (lane * kElems + e);
      m[e] = t >= start && mask[t] != 0;
      r[e] = m[e] ? rewards[t] : acc_t(0);
      v[e] = m[e] ? values[t] : acc_t(0);
    }
    // 1. V': this lane's maps composed (a constant map replaces what came before), then the scan
    acc_t va = 1, vb = 0;
#pragma unroll
    for (int e = 0; e < kElems; ++e) {
      if (m[e]) {
        va = 0;
        vb = v[e];
      }
    }
    acc_t ea, eb;
    warp_exclusive_scan(va, vb, lane, ea, eb);
    acc_t v_next = affine_apply(ea, eb, v_carry);
    acc_t delta[kElems];
    acc_t aa = 1, ab = 0;
#pragma unroll
    for (int e = 0; e < kElems; ++e) {
      if (m[e]) {
        delta[e] = r[e] + gamma * v_next - v[e];  // δ_t = r_t + γ·V' − V_t
        ab = affine_apply(gl, delta[e], ab);   // this lane's A maps so far, then (γλ, δ_t)
        aa = aa * gl;
        v_next = v[e];
      } else {
        delta[e] = 0;
      }
    }
    // 2. A': the scan of the A maps, then the outputs, position by position
    warp_exclusive_scan(aa, ab, lane, ea, eb);
    acc_t a_next = affine_apply(ea, eb, a_carry);
#pragma unroll
    for (int e = 0; e < kElems; ++e) {
      const int64_t t = hi - 1 - (lane * kElems + e);
      if (m[e]) a_next = affine_apply(gl, delta[e], a_next);  // A_t = δ_t + γλ·A'
      if (t >= start) {
        adv[t] = m[e] ? a_next : acc_t(0);
        ret[t] = m[e] ? a_next + v[e] : acc_t(0);
      }
    }
    // 3. the carries after this chunk's earliest position (lane 31's last)
    v_carry = __shfl_sync(0xffffffffu, v_next, kWarp - 1);
    a_carry = __shfl_sync(0xffffffffu, a_next, kWarp - 1);
  }
}

std::tuple<at::Tensor, at::Tensor> gae_fwd(const at::Tensor& rewards_, const at::Tensor& values_,
                                           const at::Tensor& mask_, const std::optional<at::Tensor>& cu_,
                                           double gamma, double lam) {
  const char* op = "gae_fwd";
  RLHF_CHECK_CUDA(op, "rewards", rewards_);
  RLHF_CHECK_SAME_DEVICE(op, "values", values_, "rewards", rewards_);
  RLHF_CHECK_SAME_DEVICE(op, "mask", mask_, "rewards", rewards_);
  TORCH_CHECK(rewards_.scalar_type() == at::kFloat || rewards_.scalar_type() == at::kDouble, "rlhf_ops_cuda.",
              op, ": rewards must be float32 or float64 (the accumulation dtype), got ", rewards_.scalar_type());
  RLHF_CHECK_DTYPE(op, "values", values_, rewards_.scalar_type());
  RLHF_CHECK_DTYPE(op, "mask", mask_, at::kByte);
  TORCH_CHECK(values_.sizes() == rewards_.sizes() && mask_.sizes() == rewards_.sizes(), "rlhf_ops_cuda.", op,
              ": values and mask must have the shape of rewards ", rewards_.sizes(), ", got ", values_.sizes(),
              " and ", mask_.sizes());
  const bool packed = cu_.has_value();
  at::Tensor cu;
  if (packed) {
    RLHF_CHECK_SAME_DEVICE(op, "cu_seqlens", *cu_, "rewards", rewards_);
    RLHF_CHECK_DTYPE(op, "cu_seqlens", *cu_, at::kInt);
    RLHF_CHECK_DIM(op, "cu_seqlens", *cu_, 1);
    TORCH_CHECK(cu_->size(0) >= 1, "rlhf_ops_cuda.", op, ": cu_seqlens must hold at least one entry");
    RLHF_CHECK_DIM(op, "rewards", rewards_, 1);
    cu = cu_->contiguous();
  } else {
    RLHF_CHECK_DIM(op, "rewards", rewards_, 2);
  }
  const at::cuda::OptionalCUDAGuard guard(rewards_.device());
  const at::Tensor rewards = rewards_.contiguous(), values = values_.contiguous(), mask = mask_.contiguous();
  // packed tokens outside every sequence (an invalid cu_seqlens) are never written: NaN
  at::Tensor adv = packed ? at::full_like(rewards, NAN) : at::empty_like(rewards);
  at::Tensor ret = packed ? at::full_like(rewards, NAN) : at::empty_like(rewards);
  const int64_t n_seq = packed ? cu.size(0) - 1 : rewards.size(0);
  const int64_t T = packed ? 0 : rewards.size(1);
  if (n_seq == 0 || rewards.numel() == 0) return {adv, ret};
  const int64_t blocks = (n_seq + kSeqPerBlock - 1) / kSeqPerBlock;
  TORCH_CHECK(blocks <= INT32_MAX, "rlhf_ops_cuda.", op, ": too many sequences");
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(rewards.scalar_type(), "gae_fwd", [&] {
    gae_fwd_kernel<scalar_t><<<static_cast<unsigned>(blocks), kSeqPerBlock * kWarp, 0, stream>>>(
        rewards.data_ptr<scalar_t>(), values.data_ptr<scalar_t>(), mask.data_ptr<uint8_t>(),
        packed ? cu.data_ptr<int>() : nullptr, adv.data_ptr<scalar_t>(), ret.data_ptr<scalar_t>(), n_seq, T,
        static_cast<scalar_t>(gamma), static_cast<scalar_t>(gamma * lam));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {adv, ret};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rlhf_ops_cuda, m) {
  m.def("gae_fwd(Tensor rewards, Tensor values, Tensor mask, Tensor? cu_seqlens, float gamma, float lam) -> "
        "(Tensor advantages, Tensor returns)");
}

TORCH_LIBRARY_IMPL(rlhf_ops_cuda, CUDA, m) {
  m.impl("gae_fwd", &gae_fwd);
}

}  // namespace rlhf
