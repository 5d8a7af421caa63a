"""The PPO KL penalty per token (InstructGPT stage 4): log-probs of the policy and of the
reference model, their log-ratio, a KL estimate, the penalty and the policy's entropy, in one pass
over both logit tensors; also from stored log-probs, and the per-token PPO reward.

Runs the kernels of ``logprobs.py`` (``rlhf_ops.kernels.kl`` / ``rlhf_ops_cuda.kl_fwd``) with a
second logit tensor. Per row, on top of the log-prob forward there:
    ref_logp likewise on ref_logits, d = log_ratio = logp − ref_logp,
    kl = d (k1) | ½d² (k2) | e^{−d} − 1 + d (k3),   penalty = −β·kl·mask
Saved for backward: the policy logits, the tokens, lse [2, N], the entropy [N] and, for k2/k3,
d [N]. The backward is the log-prob backward with
    G = g_logp + g_log_ratio + g_kl·∂kl/∂logp,   ∂kl/∂logp = 1 | d | 1 − e^{−d}.
ref_logits never get a gradient; ref_logprobs and penalty are outputs without gradient (penalty
is a reward term); entropy is differentiable (an entropy bonus trains).

Vocabulary parallel: both logit tensors are this rank's slice; one gather carries the statistics
of both models (``rlhf_ops.distributed``), and the backward is the sharded log-prob backward.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _backend, _checks, _layout, _vocab_stats, distributed, logprobs, reference
from .logprobs import _fwd_impl, _grads, _slice_stats
from .reference import ESTIMATORS, KLPenalty


@torch.library.custom_op("rlhf_ops::kl_penalty_fwd", mutates_args=())
def kl_penalty_fwd(logits: Tensor, ref_logits: Tensor, tokens: Tensor, mask: Tensor | None,
                   beta: float, estimator: str, temperature: float, backend: str
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """[N, V] logits, tokens [N] → (logprobs, ref_logprobs, log_ratio, kl, penalty, entropy),
    each [N], and the policy's lse [2, N] for the backward."""
    if _backend.debug_checks(logits.device):
        _checks.in_range("kl_penalty", "tokens", tokens, 0, logits.shape[1])
    return tuple(_fwd_impl(backend, logits, ref_logits, tokens, mask, temperature, beta, estimator))


@kl_penalty_fwd.register_fake
def _(logits, ref_logits, tokens, mask, beta, estimator, temperature, backend):
    acc = _checks.acc_dtype(logits.dtype)
    n = logits.shape[0]
    return tuple(logits.new_empty((n,), dtype=acc) for _ in range(6)) + (
        logits.new_empty((2, n), dtype=acc),)


def _kl_setup(ctx, inputs, output):
    logits, ref_logits, tokens, mask, beta, estimator, temperature, backend = inputs
    logp, ref_logp, log_ratio, kl, penalty, entropy, lse = output
    # k1's derivative is 1: only k2/k3 need the [N] log-ratio.
    ctx.save_for_backward(logits, tokens, lse, log_ratio if estimator != "k1" else None, entropy)
    ctx.args = (temperature, backend)
    ctx.estimator = estimator
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(ref_logp, penalty, lse)


def _kl_G(estimator, d, g_logp, g_ratio, g_kl):
    """The log-prob gradient G = g_logp + g_log_ratio + g_kl·∂kl/∂logp (None: none reaches it)."""
    G = None
    for g in (g_logp, g_ratio):         # ∂d/∂logp = 1; ref_logp carries no gradient
        if g is not None:
            G = g if G is None else G + g
    if g_kl is not None:
        if estimator == "k1":
            gk = g_kl                   # ∂kl/∂d = 1
        else:
            # k2: ∂(½d²)/∂d = d; k3: ∂(e^{−d} − 1 + d)/∂d = 1 − e^{−d}. where: a zero upstream
            # gradient stays zero even where ∂kl/∂d is infinite (−inf logp)
            dkl = d if estimator == "k2" else -torch.expm1(-d)
            gk = torch.where(g_kl != 0, g_kl * dkl, torch.zeros_like(g_kl))
        G = gk if G is None else G + gk
    return G


def _kl_backward(ctx, g_logp, g_ref, g_ratio, g_kl, g_pen, g_ent, g_lse):
    logits, tokens, lse, d, ent = ctx.saved_tensors
    G = _kl_G(ctx.estimator, d, g_logp, g_ratio, g_kl)
    G, g_ent = _grads(G, g_ent, tokens, lse, True)
    grad = torch.ops.rlhf_ops.token_logprobs_bwd(G, logits, tokens, lse, *ctx.args, g_ent,
                                                 ent if g_ent is not None else None)
    return grad, None, None, None, None, None, None, None


kl_penalty_fwd.register_autograd(_kl_backward, setup_context=_kl_setup)


@torch.library.custom_op("rlhf_ops::kl_penalty_vp_fwd", mutates_args=())
def kl_penalty_vp_fwd(logits: Tensor, ref_logits: Tensor, tokens: Tensor, offset: Tensor,
                      mask: Tensor | None, beta: float, estimator: str, temperature: float,
                      backend: str, group: str
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Slices [N, V_r] of both logit tensors, tokens [N] global ids → (logprobs, ref_logprobs,
    log_ratio, kl, penalty, entropy) [N] each, the policy's global lse [2, N] and the backward
    token ids [N, 1]. One gather carries both models' statistics."""
    t = tokens[:, None]
    V_r = logits.shape[1]
    pol = _slice_stats(backend, logits, t, offset, temperature)          # 5 rows
    ref = _slice_stats(backend, ref_logits, t, offset, temperature)

    def combine(G, sizes):
        out = _vocab_stats.kl_combine(G, beta, estimator, mask)
        # clones: k1's kl is log_ratio itself, and outputs of a custom op may not alias each other
        return tuple(o.clone(memory_format=torch.contiguous_format) for o in out) + (
            _vocab_stats.backward_tokens(t, offset, V_r, sizes),)
    return distributed.combine_slices(torch.cat([pol, ref[[0, 1, 4]]]), V_r, group, combine)


@kl_penalty_vp_fwd.register_fake
def _(logits, ref_logits, tokens, offset, mask, beta, estimator, temperature, backend, group):
    acc = _checks.acc_dtype(logits.dtype)
    n = logits.shape[0]
    return tuple(logits.new_empty((n,), dtype=acc) for _ in range(6)) + (
        logits.new_empty((2, n), dtype=acc), tokens.new_empty((n, 1)))


def _kl_vp_setup(ctx, inputs, output):
    logits, ref_logits, tokens, offset, mask, beta, estimator, temperature, backend, group = inputs
    logp, ref_logp, log_ratio, kl, penalty, entropy, lse, t_bwd = output
    ctx.save_for_backward(logits, t_bwd, lse, log_ratio if estimator != "k1" else None, entropy)
    ctx.args = (temperature, backend)
    ctx.estimator = estimator
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(ref_logp, penalty, lse, t_bwd)


def _kl_vp_backward(ctx, g_logp, g_ref, g_ratio, g_kl, g_pen, g_ent, g_lse, g_tok):
    logits, t_bwd, lse, d, ent = ctx.saved_tensors
    G = _kl_G(ctx.estimator, d, g_logp, g_ratio, g_kl)
    G, g_ent = _grads(G, g_ent, t_bwd[:, 0], lse, True)
    grad = torch.ops.rlhf_ops.token_logprobs_bwd(G[:, None], logits, t_bwd, lse, *ctx.args, g_ent,
                                                 ent if g_ent is not None else None, 0,
                                                 logits.shape[1] + 1)
    return grad, None, None, None, None, None, None, None, None, None


kl_penalty_vp_fwd.register_autograd(_kl_vp_backward, setup_context=_kl_vp_setup)


# ------------------------------------------------------------------------------ public API ---

def kl_penalty(logits: Tensor, ref_logits: Tensor, tokens: Tensor, *, beta: float,
               estimator: str = "k1", mask: Tensor | None = None, temperature: float = 1.0,
               backend: str | None = None, process_group=None,
               vocab_offset: int | None = None) -> KLPenalty:
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
      entropy      policy entropy −Σ p·log p          differentiable (an entropy bonus trains;
                   a −inf logit contributes 0)
    ``mask`` (bool, float or integer such as an attention mask, ``tokens.shape``) scales only the
    penalty; None means all ones. For stored reference log-probs use ``kl_from_logprobs``.

    Vocabulary parallel (``process_group``, ``vocab_offset``, as in ``token_logprobs``): logits
    and ref_logits are this rank's slices of the same vocabulary ids; every field is the
    full-vocabulary one on every rank (DTensor logits and ref_logits sharded Shard(-1): the
    fields come back as replicated DTensors).
    """
    op = "kl_penalty"
    call = distributed.VocabCall(op, "logits", logits, -1, process_group, vocab_offset)
    logits = call.local
    with call.checks():
        ref_logits = call.sharded("ref_logits", ref_logits, together=True)
        tokens = call.replicated("tokens", tokens)
        mask = call.replicated("mask", mask)
        logprobs._check_common(op, logits, tokens, temperature)
        _checks.floating(op, "ref_logits", ref_logits)
        _checks.same_device(op, "logits", logits, ref_logits=ref_logits, mask=mask)
        _checks.same_dtype(op, "logits", logits, ref_logits=ref_logits)
        _checks.shape(op, "ref_logits", ref_logits, logits.shape, "logits.shape")
        _checks.mask(op, mask, tokens.shape, "tokens.shape")
        _checks.choice(op, "estimator", estimator, ESTIMATORS)
        _checks.beta(op, beta)
        be = _backend.resolve(op, backend, logits.device)
    if call.parallel:
        return call.wrap(_kl_penalty_vp(call, logits, ref_logits, tokens, mask, float(beta),
                                        estimator, float(temperature), be))
    if be == "reference":
        _checks.eager_in_range(op, "tokens", tokens, 0, logits.shape[-1])
        return reference.kl_penalty(logits, ref_logits, tokens, beta, estimator, mask, temperature)
    acc = _checks.acc_dtype(logits.dtype)
    m = None if mask is None else mask.reshape(-1).to(acc).contiguous()
    out = torch.ops.rlhf_ops.kl_penalty_fwd(_layout.rows(logits), _layout.rows(ref_logits),
                                            tokens.reshape(-1).contiguous(), m,
                                            float(beta), estimator, float(temperature), be)
    return KLPenalty(*(o.reshape(tokens.shape) for o in out[:6]))


def _kl_penalty_vp(call, logits, ref_logits, tokens, mask, beta, estimator, temperature, be):
    op = "kl_penalty"
    x, r = _layout.rows(logits), _layout.rows(ref_logits)
    t = tokens.reshape(-1).contiguous()
    acc = _checks.acc_dtype(logits.dtype)
    m = None if mask is None else mask.reshape(-1).to(acc).contiguous()

    def reference_stats(offset):  # one gather carries both models' statistics
        pol = _vocab_stats.logprob_stats_reference(x, t[:, None], offset, temperature)
        with torch.no_grad():  # ref_logits get no gradient
            ref = _vocab_stats.logprob_stats_reference(r, t[:, None], offset, temperature)
        return torch.cat([pol, ref[[0, 1, 4]]])

    out = call.run(
        be, "tokens", t, x.shape[1],
        distributed.settings(op, "tokens", tokens.shape, logits.dtype, temperature=temperature,
                             beta=beta, estimator=estimator, mask=mask is not None),
        reference=reference_stats,
        combine=lambda G, sizes: _vocab_stats.kl_combine(G, beta, estimator, m),
        fused=lambda gname, offset: torch.ops.rlhf_ops.kl_penalty_vp_fwd(
            x, r, t, offset, m, beta, estimator, temperature, be, gname))
    return KLPenalty(*(o.reshape(tokens.shape) for o in out[:6]))


def kl_from_logprobs(logprobs: Tensor, ref_logprobs: Tensor, *, beta: float, estimator: str = "k1",
                     mask: Tensor | None = None) -> KLPenalty:
    """``kl_penalty``'s fields from per-token log-probs, for trainers that stored the reference
    model's log-probs (e.g. [B, T]) instead of its logits. Plain torch ops, no kernel.

    logprobs and ref_logprobs: float tensors of one shape (any), on one device. Returns
    ``KLPenalty(logprobs, ref_logprobs, log_ratio, kl, penalty, entropy=None)`` in fp32 (fp64 when
    either input is fp64), with the same estimators (k1 = d, k2 = ½d², k3 = e^{−d} − 1 + d for
    d = logprobs − ref_logprobs; k3 by its Taylor series for |d| < ½ below fp64, as the kernels)
    and masking (``mask`` bool / float / integer of the same shape scales only the penalty).
    Differentiable w.r.t. ``logprobs`` only: ref_logprobs and penalty carry no gradient.
    """
    op = "kl_from_logprobs"
    _checks.floating(op, "logprobs", logprobs)
    _checks.floating(op, "ref_logprobs", ref_logprobs)
    _checks.same_device(op, "logprobs", logprobs, ref_logprobs=ref_logprobs, mask=mask)
    _checks.shape(op, "ref_logprobs", ref_logprobs, logprobs.shape, "logprobs.shape")
    _checks.mask(op, mask, logprobs.shape, "logprobs.shape")
    _checks.choice(op, "estimator", estimator, ESTIMATORS)
    _checks.beta(op, beta)
    return reference.kl_from_logprobs(logprobs, ref_logprobs, float(beta), estimator, mask)


def ppo_rewards(penalty: Tensor, scores: Tensor, mask: Tensor) -> Tensor:
    """Per-token PPO reward: ``penalty`` [..., T] plus each row's reward-model ``scores`` [...] at
    its last real token (the last position where ``mask`` [..., T] is set; left padding works).
    A row whose mask is all zero gets no score."""
    op = "ppo_rewards"
    _checks.floating(op, "penalty", penalty, min_ndim=1)
    _checks.floating(op, "scores", scores)
    _checks.tensor(op, "mask", mask, dtypes=_checks.MASK_DTYPES)
    _checks.same_device(op, "penalty", penalty, scores=scores, mask=mask)
    _checks.shape(op, "mask", mask, penalty.shape, "penalty.shape")
    _checks.shape(op, "scores", scores, penalty.shape[:-1], "penalty.shape[:-1]")
    return reference.ppo_rewards(penalty, scores, mask)
