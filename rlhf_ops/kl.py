"""Per-token log-probabilities and the PPO KL penalty (InstructGPT stage 4).

Follows the op pattern of ``cross_entropy.py``: validation → ``_backend.resolve`` →
``reference`` (eager, ``reference.py``) or ``rlhf_ops::`` custom ops whose bodies run the Triton
launchers (``rlhf_ops.kernels.kl``) or ``torch.ops.rlhf_ops_cuda.kl_fwd`` / ``kl_bwd``.

Forward per row, y = logits / T (T divides inside the kernels, no scaled copy), t = the token:
    lse  = log Σ_j exp(y_j)                         (online softmax, one read of each row)
    logp = y_t − lse,   ref_logp likewise on ref_logits,   d = log_ratio = logp − ref_logp
    kl   = d (k1) | ½d² (k2) | e^{−d} − 1 + d (k3),   penalty = −β·kl·mask
    entropy = −Σ p·log p = lse − Σ_j p_j·y_j       (p = softmax(y))
Saved for backward: the logits (which exist anyway), the tokens, lse (as the pair shift, log S:
[2, N]) and, for k2/k3, d [N].
Backward: with ∂logp/∂x_j = ([j = t] − p_j)/T and ∂kl/∂logp = 1 | d | 1 − e^{−d},
    G = g_logp + g_log_ratio + g_kl·∂kl/∂logp        ([N], torch ops)
    d logits_j = G · ([j = t] − p_j) / T             (one sweep, a new tensor in the logits dtype)
ref_logits never get a gradient; ref_logprobs, penalty and entropy are outputs without gradient
(penalty is a reward term, entropy a statistic — use logprobs/kl for anything to optimise).
"""
from __future__ import annotations

import numbers

import torch
from torch import Tensor

from . import _backend, _checks, reference
from .reference import ESTIMATORS, KLPenalty

# masks: bool, float, or the integer attention masks tokenizers return (0 / 1)
MASK_DTYPES = (torch.bool,) + _checks.FLOAT_DTYPES + (torch.int64, torch.int32, torch.int16, torch.int8,
                                                    torch.uint8)

_EST_ID = {"k1": 1, "k2": 2, "k3": 3}


# ------------------------------------------------------------------------------ custom ops ---

@torch.library.custom_op("rlhf_ops::token_logprobs_fwd", mutates_args=())
def token_logprobs_fwd(logits: Tensor, tokens: Tensor, temperature: float,
                       backend: str) -> tuple[Tensor, Tensor]:
    """logits [N, V] (unit stride over V), tokens [N] int64 → (logprobs [N], lse [2, N]);
    lse is kept as the pair (shift, log Σ exp(y − shift)) so that it loses no precision."""
    if _backend.debug_checks(logits.device):
        _checks.in_range("token_logprobs", "tokens", tokens, 0, logits.shape[1])
    if backend == "triton":
        return _backend.triton_kernels("kl").forward(logits, None, tokens, None, temperature)
    out = torch.ops.rlhf_ops_cuda.kl_fwd(logits, None, tokens, None, temperature, 0.0, 1)
    return out[0], out[-1]  # without ref_logits: [logprobs, lse]


@token_logprobs_fwd.register_fake
def _(logits, tokens, temperature, backend):
    acc = _checks.acc_dtype(logits.dtype)
    n = logits.shape[0]
    return logits.new_empty((n,), dtype=acc), logits.new_empty((2, n), dtype=acc)


@torch.library.custom_op("rlhf_ops::kl_penalty_fwd", mutates_args=())
def kl_penalty_fwd(logits: Tensor, ref_logits: Tensor, tokens: Tensor, mask: Tensor | None,
                   beta: float, estimator: str, temperature: float, backend: str
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """[N, V] logits → (logprobs, ref_logprobs, log_ratio, kl, penalty, entropy), each [N], and
    the policy's lse [2, N] for the backward."""
    if _backend.debug_checks(logits.device):
        _checks.in_range("kl_penalty", "tokens", tokens, 0, logits.shape[1])
    if backend == "triton":
        return _backend.triton_kernels("kl").forward(logits, ref_logits, tokens, mask, temperature,
                                                     beta, estimator)
    return tuple(torch.ops.rlhf_ops_cuda.kl_fwd(logits, ref_logits, tokens, mask, temperature, beta,
                                                _EST_ID[estimator]))


@kl_penalty_fwd.register_fake
def _(logits, ref_logits, tokens, mask, beta, estimator, temperature, backend):
    acc = _checks.acc_dtype(logits.dtype)
    n = logits.shape[0]
    return tuple(logits.new_empty((n,), dtype=acc) for _ in range(6)) + (
        logits.new_empty((2, n), dtype=acc),)


@torch.library.custom_op("rlhf_ops::token_logprobs_bwd", mutates_args=())
def token_logprobs_bwd(grad: Tensor, logits: Tensor, tokens: Tensor, lse: Tensor,
                       temperature: float, backend: str) -> Tensor:
    """grad [N] (G) → G · ∂logp/∂logits as a new [N, V] tensor in the logits dtype."""
    if backend == "triton":
        return _backend.triton_kernels("kl").backward(grad, logits, tokens, lse, temperature)
    return torch.ops.rlhf_ops_cuda.kl_bwd(grad, logits, tokens, lse, temperature)


@token_logprobs_bwd.register_fake
def _(grad, logits, tokens, lse, temperature, backend):
    return torch.empty_like(logits)


def _tl_setup(ctx, inputs, output):
    logits, tokens, temperature, backend = inputs
    ctx.save_for_backward(logits, tokens, output[1])
    ctx.args = (temperature, backend)
    ctx.mark_non_differentiable(output[1])


def _tl_backward(ctx, g_logp, g_lse):
    logits, tokens, lse = ctx.saved_tensors
    grad = torch.ops.rlhf_ops.token_logprobs_bwd(g_logp, logits, tokens, lse, *ctx.args)
    return grad, None, None, None


token_logprobs_fwd.register_autograd(_tl_backward, setup_context=_tl_setup)


def _kl_setup(ctx, inputs, output):
    logits, ref_logits, tokens, mask, beta, estimator, temperature, backend = inputs
    logp, ref_logp, log_ratio, kl, penalty, entropy, lse = output
    # k1's derivative is 1: only k2/k3 need the [N] log-ratio.
    ctx.save_for_backward(logits, tokens, lse, log_ratio if estimator != "k1" else None)
    ctx.args = (temperature, backend)
    ctx.estimator = estimator
    ctx.mark_non_differentiable(ref_logp, penalty, entropy, lse)


def _kl_backward(ctx, g_logp, g_ref, g_ratio, g_kl, g_pen, g_ent, g_lse):
    logits, tokens, lse, d = ctx.saved_tensors
    if ctx.estimator == "k1":
        dkl = None                      # ∂kl/∂d = 1
    elif ctx.estimator == "k2":
        dkl = d                         # ∂(½d²)/∂d = d
    else:
        dkl = -torch.expm1(-d)          # ∂(e^{−d} − 1 + d)/∂d = 1 − e^{−d}
    G = g_logp + g_ratio                # ∂d/∂logp = 1; ref_logp carries no gradient
    if dkl is None:
        G = G + g_kl
    else:
        # where: a zero upstream gradient stays zero even where ∂kl/∂d is infinite (−inf logp)
        G = G + torch.where(g_kl != 0, g_kl * dkl, torch.zeros_like(g_kl))
    grad = torch.ops.rlhf_ops.token_logprobs_bwd(G, logits, tokens, lse, *ctx.args)
    return grad, None, None, None, None, None, None, None


kl_penalty_fwd.register_autograd(_kl_backward, setup_context=_kl_setup)


# ------------------------------------------------------------------------------ public API ---

def _rows(x: Tensor) -> Tensor:
    """[..., V] → [N, V] with unit stride over V (a copy only when the layout needs one)."""
    x = x.reshape(-1, x.shape[-1])
    return x.contiguous() if x.shape[0] > 0 and x.stride(-1) != 1 else x


def _check_common(op, logits, tokens, temperature):
    _checks.floating(op, "logits", logits, min_ndim=1)
    _checks.index(op, "tokens", tokens)
    _checks.same_device(op, "logits", logits, tokens=tokens)
    if logits.shape[-1] == 0:
        raise ValueError(f"rlhf_ops.{op}: logits must have a non-empty last (vocabulary) "
                         f"dimension, got shape {tuple(logits.shape)}")
    if tuple(tokens.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"rlhf_ops.{op}: tokens must have shape logits.shape[:-1] = "
                         f"{tuple(logits.shape[:-1])}, got {tuple(tokens.shape)}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"rlhf_ops.{op}: temperature must be a number, got "
                        f"{type(temperature).__name__}")
    if not 0.0 < float(temperature) < float("inf"):
        raise ValueError(f"rlhf_ops.{op}: temperature must be a finite number > 0, got {temperature}")


def _eager_token_check(op, tokens, V):
    # The fused backends check inside their custom op; the reference would index out of bounds.
    if _backend.debug_checks(tokens.device) and not torch.compiler.is_compiling():
        _checks.in_range(op, "tokens", tokens, 0, V)


def token_logprobs(logits: Tensor, tokens: Tensor, *, temperature: float = 1.0,
                   backend: str | None = None) -> Tensor:
    """``log_softmax(logits / temperature).gather(-1, tokens)`` without materialising log_softmax.

    logits [..., V] (fp16/bf16/fp32/fp64), tokens [...] int64 → [...] fp32 (fp64 for fp64 logits),
    differentiable w.r.t. logits. A token whose logit is −inf gets −inf (and a finite gradient).
    Tokens out of [0, V) raise ValueError for CPU tensors (and with RLHF_OPS_DEBUG=1); on CUDA
    without debug checks their rows are NaN.
    """
    op = "token_logprobs"
    _check_common(op, logits, tokens, temperature)
    be = _backend.resolve(op, backend, logits.device)
    if be == "reference":
        _eager_token_check(op, tokens, logits.shape[-1])
        return reference.token_logprobs(logits, tokens, temperature)
    logp, _ = torch.ops.rlhf_ops.token_logprobs_fwd(_rows(logits), tokens.reshape(-1).contiguous(),
                                                    float(temperature), be)
    return logp.reshape(tokens.shape)


def kl_penalty(logits: Tensor, ref_logits: Tensor, tokens: Tensor, *, beta: float,
               estimator: str = "k1", mask: Tensor | None = None, temperature: float = 1.0,
               backend: str | None = None) -> KLPenalty:
    """Per-token PPO quantities from policy ``logits`` and frozen ``ref_logits`` [B, T, V]
    (any leading shape) and the sampled ``tokens`` [B, T] int64, in one pass over both.

    Returns ``KLPenalty(logprobs, ref_logprobs, log_ratio, kl, penalty, entropy)``, each
    ``tokens.shape``, fp32 (fp64 for fp64 logits):
      logprobs     log softmax(logits/T)[token]       differentiable
      ref_logprobs same for ref_logits                no gradient (ref_logits get none)
      log_ratio    logprobs − ref_logprobs            differentiable
      kl           k1 = log_ratio, k2 = ½·log_ratio², k3 = exp(−log_ratio) − 1 + log_ratio;
                   differentiable
      penalty      −beta·kl·mask                      no gradient (a reward term)
      entropy      policy entropy −Σ p·log p          no gradient
    ``mask`` (bool, float or integer such as an attention mask, ``tokens.shape``) scales only the
    penalty; None means all ones.
    """
    op = "kl_penalty"
    _check_common(op, logits, tokens, temperature)
    _checks.floating(op, "ref_logits", ref_logits)
    _checks.same_device(op, "logits", logits, ref_logits=ref_logits, mask=mask)
    _checks.same_dtype(op, "logits", logits, ref_logits=ref_logits)
    _checks.shape(op, "ref_logits", ref_logits, logits.shape, "logits.shape")
    if mask is not None:
        _checks.tensor(op, "mask", mask, dtypes=MASK_DTYPES)
        _checks.shape(op, "mask", mask, tokens.shape, "tokens.shape")
    if estimator not in ESTIMATORS:
        raise ValueError(f"rlhf_ops.{op}: estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real):
        raise TypeError(f"rlhf_ops.{op}: beta must be a number, got {type(beta).__name__}")
    be = _backend.resolve(op, backend, logits.device)
    if be == "reference":
        _eager_token_check(op, tokens, logits.shape[-1])
        return reference.kl_penalty(logits, ref_logits, tokens, beta, estimator, mask, temperature)
    acc = _checks.acc_dtype(logits.dtype)
    m = None if mask is None else mask.reshape(-1).to(acc).contiguous()
    out = torch.ops.rlhf_ops.kl_penalty_fwd(_rows(logits), _rows(ref_logits),
                                            tokens.reshape(-1).contiguous(), m,
                                            float(beta), estimator, float(temperature), be)
    return KLPenalty(*(o.reshape(tokens.shape) for o in out[:6]))


def ppo_rewards(penalty: Tensor, scores: Tensor, mask: Tensor) -> Tensor:
    """Per-token PPO reward: ``penalty`` [..., T] plus each row's reward-model ``scores`` [...] at
    its last real token (the last position where ``mask`` [..., T] is set; left padding works).
    A row whose mask is all zero gets no score."""
    op = "ppo_rewards"
    _checks.floating(op, "penalty", penalty, min_ndim=1)
    _checks.floating(op, "scores", scores)
    _checks.tensor(op, "mask", mask, dtypes=MASK_DTYPES)
    _checks.same_device(op, "penalty", penalty, scores=scores, mask=mask)
    _checks.shape(op, "mask", mask, penalty.shape, "penalty.shape")
    _checks.shape(op, "scores", scores, penalty.shape[:-1], "penalty.shape[:-1]")
    return reference.ppo_rewards(penalty, scores, mask)
