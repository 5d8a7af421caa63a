"""Pairwise reward-model loss over K ranked responses (InstructGPT stage 3), and the reward head.

    loss(θ) = −1/C(K,2) · E[log σ(r_θ(x, y_w) − r_θ(x, y_l))]

Per prompt b (rewards r [K], ranks k [K], 0 = best, < 0 = absent): the pairs are (i, j) with
0 <= k_i < k_j, n_b their count, m the margin (0 by default; a float, or one value per prompt
from a tensor [B], which gets no gradient), and

    loss_b = 1/n_b · Σ_pairs softplus(−(r_i − r_j − m))   (0 with a zero gradient when n_b = 0)

Fused backends (``triton``, ``cuda``): the custom op ``rlhf_ops::pairwise_reward_fwd`` runs one
kernel that writes loss [B], the pair count npairs [B] and ∂loss_b/∂r [B, K] in the same pass.
Autograd saves only that [B, K] gradient; backward is one elementwise product with the
upstream per-prompt gradient (no kernel, nothing of size B·K·K kept). The reduction over
prompts ("mean" over prompts with a pair, "sum", "none") is plain torch ops around the op, so
nothing syncs with the host. First-order gradients only (the saved gradient is a constant).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _backend, _checks, reference

OP = "pairwise_reward_loss"


def _impl_fwd(backend: str):
    if backend == "triton":
        return _backend.triton_kernels("reward").forward
    return torch.ops.rlhf_ops_cuda.pairwise_reward_fwd


# ------------------------------------------------------------------------------ custom op ---

@torch.library.custom_op("rlhf_ops::pairwise_reward_fwd", mutates_args=())
def pairwise_reward_fwd(rewards: Tensor, ranks: Tensor, margin: float, backend: str,
                        margins: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """rewards [B, K] float, ranks [B, K] int64, margin a float or margins [B] (in the
    accumulation dtype; replaces margin when given) → (loss [B], npairs [B] int64, grad [B, K]),
    loss and grad in fp32 (fp64 for fp64 rewards); grad = ∂loss_b/∂rewards[b]."""
    return _impl_fwd(backend)(rewards, ranks, margin, margins)


@pairwise_reward_fwd.register_fake
def _(rewards, ranks, margin, backend, margins=None):
    acc = _checks.acc_dtype(rewards.dtype)
    B, K = rewards.shape
    return (rewards.new_empty((B,), dtype=acc), rewards.new_empty((B,), dtype=torch.int64),
            rewards.new_empty((B, K), dtype=acc))


def _setup_context(ctx, inputs, output):
    rewards = inputs[0]
    ctx.save_for_backward(output[2])   # the only thing kept: ∂loss_b/∂r, [B, K]
    ctx.dtype = rewards.dtype
    ctx.mark_non_differentiable(output[1], output[2])


def _backward(ctx, grad_loss, grad_npairs, grad_grad):
    (grad,) = ctx.saved_tensors
    # ∂L/∂r[b, i] = ∂L/∂loss_b · ∂loss_b/∂r[b, i]; the margin gets no gradient
    return (grad_loss.unsqueeze(1) * grad).to(ctx.dtype), None, None, None, None


pairwise_reward_fwd.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------ public API ---

def _check(rewards, ranks, reduction, margin):
    _checks.floating(OP, "rewards", rewards, ndim=2)
    _checks.index(OP, "ranks", ranks, ndim=2)
    _checks.same_device(OP, "rewards", rewards, ranks=ranks)
    _checks.shape(OP, "ranks", ranks, rewards.shape, "rewards.shape [B, K]")
    _checks.reduction(OP, reduction)
    if isinstance(margin, Tensor):
        _checks.floating(OP, "margin", margin)
        _checks.same_device(OP, "rewards", rewards, margin=margin)
        _checks.shape(OP, "margin", margin, rewards.shape[:1], "[B] (one per prompt)")
        # a value check is a host sync: CPU tensors, or RLHF_OPS_DEBUG=1, and not while compiling
        if _backend.debug_checks(margin.device) and not torch.compiler.is_compiling():
            if margin.numel() and not bool(torch.isfinite(margin).all()):
                raise ValueError(f"rlhf_ops.{OP}: margin must be finite, got a tensor holding "
                                 f"{margin[~torch.isfinite(margin)][0].item()}")
        return
    if isinstance(margin, bool) or not isinstance(margin, (int, float)):
        raise TypeError(f"rlhf_ops.{OP}: margin must be a Python float or a float tensor [B], got "
                        f"{type(margin).__name__}")
    if not abs(margin) < 1e30:
        raise ValueError(f"rlhf_ops.{OP}: margin must be finite (|margin| < 1e30), got {margin}")


def pairwise_reward_loss(rewards: Tensor, ranks: Tensor, *, reduction: str = "mean",
                         margin: float | Tensor = 0.0, backend: str | None = None) -> Tensor:
    """Pairwise ranking loss of a reward model over K responses per prompt.

    rewards [B, K] float (any of fp16/bf16/fp32/fp64); ranks [B, K] int64, 0 = best, a negative
    rank marks an absent response (prompts with fewer than K responses; its reward is ignored).
    Per prompt: the mean over pairs (i, j) with ranks[i] < ranks[j] of −log σ(r_i − r_j); equal
    ranks make no pair; a prompt without a pair has loss 0 and a zero gradient. ``reduction``:
    "mean" over prompts with at least one pair (0 if none has), "sum", or "none" ([B]).
    ``margin`` is subtracted inside σ: −log σ(r_i − r_j − m_b), either one float for every
    prompt (default 0) or a float tensor [B] with one margin per prompt (Llama-2's margin by
    rating gap, TRL's ``margin`` column); it gets no gradient. The tensor must be finite (checked
    for CPU tensors and with RLHF_OPS_DEBUG=1; on CUDA a non-finite margin gives that prompt a
    non-finite loss).
    The result is fp32 (fp64 for fp64 rewards).
    """
    _check(rewards, ranks, reduction, margin)
    be = _backend.resolve(OP, backend, rewards.device)
    per_prompt = isinstance(margin, Tensor)
    if be == "reference":
        return reference.pairwise_reward_loss(rewards, ranks, reduction,
                                              margin.detach() if per_prompt else float(margin))
    margins = margin.detach().to(_checks.acc_dtype(rewards.dtype)).contiguous() if per_prompt else None
    loss, npairs, _ = torch.ops.rlhf_ops.pairwise_reward_fwd(
        rewards, ranks, 0.0 if per_prompt else float(margin), be, margins)
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    return total / (npairs > 0).sum().clamp(min=1).to(loss.dtype)


# ----------------------------------------------------------------------------- reward head ---

def reward_at_last_token(hidden: Tensor, last_index: Tensor, weight: Tensor,
                         bias: Tensor | None = None) -> Tensor:
    """Scalar reward head read at each response's last real token.

    hidden [N, T, d] (N = B·K responses), last_index int64 with N elements (e.g. [N] or [B, K]),
    weight [d] or [1, d] (an ``nn.Linear(d, 1)`` weight), bias None or one element →
    rewards shaped like ``last_index``: rewards[n] = hidden[n, last_index[n]] · weight + bias.
    An index outside [0, T) raises for CPU tensors (and with RLHF_OPS_DEBUG=1); on CUDA, without
    a host sync, it gives a NaN reward for that response.
    """
    op = "reward_at_last_token"
    _checks.floating(op, "hidden", hidden, ndim=3)
    _checks.index(op, "last_index", last_index)
    _checks.floating(op, "weight", weight)
    _checks.same_device(op, "hidden", hidden, last_index=last_index, weight=weight, bias=bias)
    _checks.same_dtype(op, "hidden", hidden, weight=weight, bias=bias)
    N, T, d = hidden.shape
    if T == 0 and N > 0:
        raise ValueError(f"rlhf_ops.{op}: hidden has no tokens (shape {tuple(hidden.shape)})")
    if last_index.numel() != N:
        raise ValueError(f"rlhf_ops.{op}: last_index must have N = hidden.shape[0] = {N} elements, "
                         f"got shape {tuple(last_index.shape)}")
    if tuple(weight.shape) not in ((d,), (1, d)):
        raise ValueError(f"rlhf_ops.{op}: weight must have shape [d] or [1, d] with d = "
                         f"hidden.shape[-1] = {d}, got {tuple(weight.shape)}")
    if bias is not None and bias.numel() != 1:
        raise ValueError(f"rlhf_ops.{op}: bias must have one element, got shape {tuple(bias.shape)}")
    idx = last_index.reshape(N)
    if _backend.debug_checks(hidden.device):
        _checks.in_range(op, "last_index", idx, 0, T)
    inside = (idx >= 0) & (idx < T)
    h = hidden[torch.arange(N, device=hidden.device), idx.clamp(0, max(T - 1, 0))]   # [N, d]
    out = torch.nn.functional.linear(h, weight.reshape(1, d), None if bias is None else bias.reshape(1))
    out = torch.where(inside, out.squeeze(-1), torch.full((), float("nan"), dtype=out.dtype,
                                                          device=out.device))
    return out.reshape(last_index.shape)
