// Pairwise reward-model loss, CUDA: one warp per prompt, kPromptsPerBlock prompts per block.
//
// Prompt b has rewards r [K] and ranks k [K] (0 = best, < 0 = absent); its pairs are (i, j)
// with 0 <= k_i < k_j, n their count, m the margin (a float, or margins[b] of an optional
// per-prompt tensor), d_ij = r_i − r_j − m for a pair:
//   loss_b       = 1/n · Σ_pairs softplus(−d_ij)                    (0 when n = 0)
//   ∂loss_b/∂r_i = 1/n · (Σ_{j beats i} σ(−d_ji) − Σ_{i beats j} σ(−d_ij))
// Lane l owns responses i = l, l + 32, ...; the responses j stream past it 32 at a time: each
// lane loads one (r_j, k_j) and __shfl_sync broadcasts them, so every lane sees every j with
// one coalesced load per 32 responses. Each lane writes its unnormalised gradient, the warp sums
// n and the loss, then every lane rescales the gradient entries it wrote itself by 1/n.
// With e = exp(−|d|): softplus(−d) = max(−d, 0) + log1p(e), σ(−d) = e/(1+e) if d >= 0 else
// 1/(1+e): finite for rewards of any size. Rewards of absent responses are never read.
// float math for half/bfloat16/float, double for double.
#include "common.cuh"

#include <optional>

namespace rlhf {
namespace {

constexpr int kPromptsPerBlock = 8;

template <typename acc_t>
__device__ __forceinline__ void pair_terms(acc_t d, acc_t& softplus_neg, acc_t& sig_neg) {
  const acc_t e = exp(-fabs(d));
  const acc_t inv = acc_t(1) / (acc_t(1) + e);
  softplus_neg = max(-d, acc_t(0)) + log1p(e);
  sig_neg = d >= acc_t(0) ? e * inv : inv;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kPromptsPerBlock * kWarp)
pairwise_reward_fwd_kernel(const scalar_t* __restrict__ rewards, const int64_t* __restrict__ ranks,
                           acc_t* __restrict__ loss, int64_t* __restrict__ npairs,
                           acc_t* __restrict__ grad, const acc_t* __restrict__ margins,
                           int64_t B, int64_t K, acc_t margin_all) {
  const int lane = threadIdx.x % kWarp;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kPromptsPerBlock + threadIdx.x / kWarp;
  if (b >= B) return;  // the whole warp leaves together, so the shuffles below stay full-warp
  const scalar_t* r = rewards + b * K;
  const long long* rk = reinterpret_cast<const long long*>(ranks) + b * K;
  acc_t* g = grad + b * K;
  const acc_t margin = margins != nullptr ? margins[b] : margin_all;

  acc_t loss_sum = 0;
  long long n = 0;
  for (int64_t i0 = 0; i0 < K; i0 += kWarp) {
    const int64_t i = i0 + lane;
    const long long rank_i = i < K ? rk[i] : -1;
    const acc_t r_i = rank_i >= 0 ? static_cast<acc_t>(r[i]) : acc_t(0);
    acc_t g_i = 0;
    for (int64_t j0 = 0; j0 < K; j0 += kWarp) {
      const int64_t jl = j0 + lane;
      const long long rank_l = jl < K ? rk[jl] : -1;
      const acc_t r_l = rank_l >= 0 ? static_cast<acc_t>(r[jl]) : acc_t(0);
      const int count = static_cast<int>(min(static_cast<int64_t>(kWarp), K - j0));
      for (int s = 0; s < count; ++s) {  // same trip count on every lane
        const long long rank_j = __shfl_sync(0xffffffffu, rank_l, s);
        const acc_t r_j = __shfl_sync(0xffffffffu, r_l, s);
        const bool wins = rank_i >= 0 && rank_i < rank_j;
        const bool loses = rank_j >= 0 && rank_j < rank_i;
        if (wins || loses) {
          // d of the pair (i, j) when i wins, of (j, i) when j wins.
          acc_t softplus_neg, sig_neg;
          pair_terms((wins ? r_i - r_j : r_j - r_i) - margin, softplus_neg, sig_neg);
          if (wins) {
            loss_sum += softplus_neg;
            n += 1;
            g_i -= sig_neg;
          } else {
            g_i += sig_neg;
          }
        }
      }
    }
    if (i < K) g[i] = g_i;
  }
  n = warp_sum(n);
  loss_sum = warp_sum(loss_sum);
  const acc_t inv_n = acc_t(1) / static_cast<acc_t>(n > 0 ? n : 1);
  if (lane == 0) {
    loss[b] = loss_sum * inv_n;
    npairs[b] = n;
  }
  for (int64_t i = lane; i < K; i += kWarp) g[i] *= inv_n;  // entries this lane wrote above
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pairwise_reward_fwd(
    const at::Tensor& rewards_, const at::Tensor& ranks_, double margin,
    const std::optional<at::Tensor>& margins_) {
  const char* op = "pairwise_reward_fwd";
  RLHF_CHECK_CUDA(op, "rewards", rewards_);
  RLHF_CHECK_CUDA(op, "ranks", ranks_);
  RLHF_CHECK_DIM(op, "rewards", rewards_, 2);
  RLHF_CHECK_DTYPE(op, "ranks", ranks_, at::kLong);
  TORCH_CHECK(ranks_.sizes() == rewards_.sizes(), "rlhf_ops_cuda.", op,
              ": ranks must have the shape of rewards ", rewards_.sizes(), ", got ", ranks_.sizes());
  TORCH_CHECK(ranks_.device() == rewards_.device(), "rlhf_ops_cuda.", op,
              ": ranks and rewards must be on one device");
  const at::cuda::OptionalCUDAGuard guard(rewards_.device());
  const at::Tensor rewards = rewards_.contiguous();
  const at::Tensor ranks = ranks_.contiguous();
  const int64_t B = rewards.size(0), K = rewards.size(1);
  const auto acc = rewards.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor loss = at::empty({B}, rewards.options().dtype(acc));
  at::Tensor npairs = at::empty({B}, rewards.options().dtype(at::kLong));
  at::Tensor grad = at::empty({B, K}, rewards.options().dtype(acc));
  at::Tensor margins;  // per-prompt margins in the accumulation dtype
  if (margins_.has_value()) {
    RLHF_CHECK_CUDA(op, "margins", *margins_);
    RLHF_CHECK_SAME_DEVICE(op, "margins", *margins_, "rewards", rewards_);
    TORCH_CHECK(margins_->is_floating_point() && margins_->dim() == 1 && margins_->size(0) == B,
                "rlhf_ops_cuda.", op, ": margins must be a float tensor of shape [B] = [", B,
                "], got ", margins_->scalar_type(), " ", margins_->sizes());
    margins = margins_->to(acc).contiguous();
  }
  if (B == 0) return {loss, npairs, grad};
  const int64_t blocks = (B + kPromptsPerBlock - 1) / kPromptsPerBlock;
  TORCH_CHECK(blocks <= INT32_MAX, "rlhf_ops_cuda.", op, ": too many prompts");
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rewards.scalar_type(), "pairwise_reward_fwd", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    pairwise_reward_fwd_kernel<scalar_t, acc_t>
        <<<static_cast<unsigned>(blocks), kPromptsPerBlock * kWarp, 0, stream>>>(
            rewards.data_ptr<scalar_t>(), ranks.data_ptr<int64_t>(), loss.data_ptr<acc_t>(),
            npairs.data_ptr<int64_t>(), grad.data_ptr<acc_t>(),
            margins.defined() ? margins.data_ptr<acc_t>() : nullptr, B, K, static_cast<acc_t>(margin));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, npairs, grad};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rlhf_ops_cuda, m) {
  m.def("pairwise_reward_fwd(Tensor rewards, Tensor ranks, float margin, Tensor? margins=None) -> "
        "(Tensor loss, Tensor npairs, Tensor grad)");
}

TORCH_LIBRARY_IMPL(rlhf_ops_cuda, CUDA, m) {
  m.impl("pairwise_reward_fwd", &pairwise_reward_fwd);
}

}  // namespace rlhf
