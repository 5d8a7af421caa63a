"""Eager PyTorch definitions of every op: the ground truth for the tests and the ``reference``
backend. Plain autograd, no custom ops. Accumulation is fp32 (fp64 for fp64 inputs) except
attention, which runs in the input dtype as eager model code does.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._checks import acc_dtype


def _reduce_rows(loss: torch.Tensor, valid: torch.Tensor, reduction: str, shape) -> torch.Tensor:
    """Reduce per-row losses; ``mean`` divides by the valid count and is 0 when there is none."""
    if reduction == "none":
        return loss.reshape(shape)
    total = loss.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp(min=1).to(loss.dtype)


# --------------------------------------------------------------------------- cross entropy ---

def cross_entropy(logits, target, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    """F.cross_entropy semantics, fp32 result; mean over zero valid targets is 0 (not NaN).

    Per row: loss = lse(x) − (1−ε)·x_t − ε·mean_j(x_j)  (= (1−ε)·nll + ε·mean_j(−log p_j)).
    """
    V = logits.shape[-1]
    x = logits.reshape(-1, V).to(acc_dtype(logits.dtype))
    t = target.reshape(-1)
    valid = t != ignore_index
    # an ignored row takes no part: zeroing it first keeps a row of −inf logits from turning its
    # (unused) log-softmax into NaN, which autograd would carry into the gradient
    x = torch.where(valid[:, None], x, torch.zeros((), dtype=x.dtype, device=x.device))
    logp = torch.log_softmax(x, dim=-1)
    nll = -logp.gather(1, torch.where(valid, t, 0)[:, None]).squeeze(1)
    loss = nll
    if label_smoothing > 0:
        loss = (1.0 - label_smoothing) * nll - label_smoothing * logp.mean(-1)
    loss = torch.where(valid, loss, torch.zeros((), dtype=loss.dtype, device=loss.device))
    return _reduce_rows(loss, valid, reduction, target.shape)


def linear_cross_entropy(hidden, weight, target, bias=None, ignore_index=-100, reduction="mean",
                         label_smoothing=0.0):
    """cross_entropy(hidden @ weight.T + bias, target): the logits are materialised, in the
    input dtype, exactly as eager model code does."""
    logits = F.linear(hidden, weight, bias)
    return cross_entropy(logits, target, ignore_index, reduction, label_smoothing)


# ------------------------------------------------------------------------------- attention ---

def attention(q, k, v, causal=True, scale=None):
    """softmax(q kᵀ · scale + mask) v in the input dtype, GQA by repeating k/v heads.

    Causal is bottom-right aligned (query i sees keys j ≤ i + S − T), as flash-attn; SDPA's
    ``is_causal`` is top-left aligned, the two agree when T == S. A query row that sees no key
    (possible only when T > S) outputs zeros.
    """
    B, Hq, T, D = q.shape
    S, Hkv = k.shape[2], k.shape[1]
    if Hq != Hkv:
        k = k.repeat_interleave(Hq // Hkv, dim=1)
        v = v.repeat_interleave(Hq // Hkv, dim=1)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if causal:
        i = torch.arange(T, device=q.device)[:, None]
        j = torch.arange(S, device=q.device)[None, :]
        visible = j <= i + (S - T)
        s = s.masked_fill(~visible, float("-inf"))
        p = torch.softmax(s, dim=-1)
        p = torch.where(visible.any(-1, keepdim=True), p, torch.zeros((), dtype=p.dtype, device=p.device))
    else:
        p = torch.softmax(s, dim=-1)
    return torch.matmul(p, v)


# ---------------------------------------------------------------------- pairwise reward loss ---

def pairwise_reward_loss(rewards, ranks, reduction="mean", margin=0.0):
    """Per prompt b: mean over pairs (i, j) with 0 ≤ ranks[b,i] < ranks[b,j] of
    −log σ(r_i − r_j − margin) (margin 0: InstructGPT; > 0: a Llama-2-style fixed margin).

    −log σ(d) = softplus(−d) = −logsigmoid(d), stable for any d. Prompts without a pair have
    loss 0; ``mean`` averages over prompts that have at least one pair (0 if none has).
    """
    present = ranks >= 0
    # Absent responses' rewards never enter (a NaN there would otherwise poison the gradient).
    r = torch.where(present, rewards.to(acc_dtype(rewards.dtype)), 0.0)
    better = (ranks[:, :, None] < ranks[:, None, :]) & present[:, :, None] & present[:, None, :]
    zero = torch.zeros((), dtype=r.dtype, device=r.device)
    # Non-pairs (the diagonal included) never enter: an inf reward makes r_i − r_i NaN there.
    # −log σ(d) via logsigmoid: exact for any d (F.softplus switches to the identity above 20,
    # an error of up to 1e-9 in fp64).
    per_pair = -F.logsigmoid(torch.where(better, r[:, :, None] - r[:, None, :] - margin, zero))
    n_pairs = better.sum((1, 2))
    per_prompt = torch.where(better, per_pair, zero).sum((1, 2)) / n_pairs.clamp(min=1).to(r.dtype)
    if reduction == "none":
        return per_prompt
    if reduction == "sum":
        return per_prompt.sum()
    return per_prompt.sum() / (n_pairs > 0).sum().clamp(min=1).to(r.dtype)


# ----------------------------------------------------------------- log-probs and KL penalty ---

class KLPenalty(NamedTuple):
    """Per-token results of ``kl_penalty``, each [B, T] fp32 (fp64 for fp64 logits)."""
    logprobs: torch.Tensor      # log π(y_t), differentiable
    ref_logprobs: torch.Tensor  # log π_ref(y_t), no grad
    log_ratio: torch.Tensor     # logprobs − ref_logprobs, differentiable
    kl: torch.Tensor            # per-token KL estimate, differentiable
    penalty: torch.Tensor       # −beta · kl · mask, no grad (a reward term)
    entropy: torch.Tensor       # policy entropy, no grad


ESTIMATORS = ("k1", "k2", "k3")


def token_logprobs(logits, tokens, temperature=1.0):
    """log_softmax(logits / temperature).gather(-1, tokens), accumulated in fp32."""
    logp = torch.log_softmax(logits.to(acc_dtype(logits.dtype)) / temperature, dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def kl_from_log_ratio(log_ratio, estimator):
    """k1 = d, k2 = ½d², k3 = exp(−d) − 1 + d, with d = log π − log π_ref (Schulman's estimators)."""
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio * log_ratio
    return torch.expm1(-log_ratio) + log_ratio


def kl_penalty(logits, ref_logits, tokens, beta, estimator="k1", mask=None, temperature=1.0):
    logp_all = torch.log_softmax(logits.to(acc_dtype(logits.dtype)) / temperature, dim=-1)
    logprobs = logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        ref_logprobs = token_logprobs(ref_logits, tokens, temperature).to(logprobs.dtype)
        p = logp_all.exp()
        entropy = -torch.where(p > 0, p * logp_all, torch.zeros((), dtype=p.dtype, device=p.device)).sum(-1)
        # a row without a distribution (a NaN logit, or every logit −inf) has none: NaN, as its log-prob
        entropy = torch.where(logp_all.isnan().any(-1), torch.full_like(entropy, float("nan")), entropy)
    log_ratio = logprobs - ref_logprobs
    kl = kl_from_log_ratio(log_ratio, estimator)
    m = torch.ones_like(kl) if mask is None else mask.to(kl.dtype)
    penalty = (-beta * kl * m).detach()
    return KLPenalty(logprobs, ref_logprobs, log_ratio, kl, penalty, entropy)


def ppo_rewards(penalty, scores, mask):
    """Per-token PPO reward: the KL penalty everywhere, plus the reward model's score at each
    sequence's last real token (the last position where ``mask`` is set). A row whose mask is
    all zero gets no score."""
    T = penalty.shape[-1]
    if T == 0:                                # no token: nothing to add the score to
        return penalty.clone()
    pos = torch.arange(T, device=penalty.device)
    last = torch.where(mask.bool(), pos, torch.full_like(pos, -1)).amax(-1)
    has = (last >= 0).to(penalty.dtype)
    add = torch.zeros_like(penalty).scatter(-1, last.clamp(min=0)[..., None],
                                            (scores.to(penalty.dtype) * has)[..., None])
    return penalty + add
