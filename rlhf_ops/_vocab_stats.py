"""The statistics of a vocabulary slice and their combination across ranks: pure torch on
[R, ...] tensors, no communication (``rlhf_ops.distributed`` gathers and calls these), the same
numbers on every rank, differentiable (the reference backend back-propagates through them; the
fused backends call them without autograd).

Statistics of a slice, per row (x = the logits / temperature — soft-capped first when the op has a
softcap, c·tanh(logits/c) / temperature —, shift = max_j x_j, or 0 when the
slice has no finite logit; CE_STATS = the first five for cross_entropy, LP_STATS = shift, log S,
E, then owned and shift − x_t for each of the K tokens, for the log-prob ops):
    shift, log S = log Σ_j exp(x_j − shift)                    the (m, log Σ) pair of the slice
    owned = [o ≤ t < o + V_r],  shift − x_t (0 if not owned)   the target's logit
    Σ_j (shift − x_j)                                          label smoothing
    E = Σ_j p_j (x_j − shift),  p = softmax of the slice        entropy
Combination (M = max_r shift_r over slices with mass, dM_r = M − shift_r ≥ 0):
    log Z = log Σ_r exp(log S_r − dM_r)      lse = M + log Z, kept as the pair (M, log Z)
    M − x_t = dM_o + (shift_o − x_t)          o = the owning rank (no owner: NaN for the row)
    Σ_j (M − x_j) = Σ_r V_r·dM_r + Σ_j (shift_r − x_j)
    entropy = log Z − Σ_r w_r (E_r − dM_r),   w_r = exp(log S_r − dM_r − log Z) (the slice's mass)
Every difference is taken between numbers of similar size (x − shift, M − shift), so fp32 logits
near 1e4 lose no more than unsharded: the same rule as the fused kernels' (m, log Σ) pair.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _checks, _layout, reference

# ------------------------------------------------------------------------ combination ---

def merge_lse(shift: Tensor, log_s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Slices' (shift_r, log S_r) [R, N] → (M, log Z) [N] of the whole row, and dM = M − shift
    [R, N]. M is the largest shift of a slice with mass (0 when no slice has any)."""
    ninf = torch.full_like(shift, float("-inf"))
    M = torch.where(log_s == float("-inf"), ninf, shift).amax(0)
    M = torch.where(M == float("-inf"), torch.zeros_like(M), M).detach()
    dM = M - shift.detach()
    log_z = torch.logsumexp(log_s - dM, 0)
    return M, log_z, dM


def _owned_sum(owned: Tensor, value: Tensor) -> Tensor:
    """Σ_r value_r over the ranks that own the row's target (one, for a valid target)."""
    return torch.where(owned > 0, value, torch.zeros_like(value)).sum(0)


def cross_entropy_combine(G: Tensor, sizes: Tensor, target: Tensor, ignore_index: int,
                          label_smoothing: float) -> tuple[Tensor, Tensor]:
    """G [R, 5, N] (``CE_STATS``) → (loss [N], lse [2, N] = (M, log Z)).

    loss = log Z + (1−ε)·(M − x_t) + ε·Σ_j (M − x_j)/V; 0 for ignored rows, NaN for a target
    that no rank owns (out of [0, V): the CUDA rule; CPU tensors were checked before)."""
    shift, log_s, owned, tgt, ls = G.unbind(1)
    M, log_z, dM = merge_lse(shift, log_s)
    eps = float(label_smoothing)
    loss = log_z + (1.0 - eps) * _owned_sum(owned, dM + tgt)
    if eps > 0:
        loss = loss + eps * (sizes[:, None] * dM + ls).sum(0) / sizes.sum()
    valid = target != ignore_index
    nan = torch.full_like(loss, float("nan"))
    loss = torch.where(owned.sum(0) == 1, loss, nan)
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    return loss, _layout.lse_pair(M, log_z).detach()


def logprobs_combine(G: Tensor, K: int) -> tuple[Tensor, Tensor, Tensor]:
    """G [R, 3 + 2K, N] (``LP_STATS``) → (logprobs [N, K], entropy [N], lse [2, N] = (M, log Z))
    of y = logits / T over the whole vocabulary.

    logp_k = −(M − y_{t_k}) − log Z, M − y_t = dM_o + (shift_o − y_t) for the owning rank o (no
    owner: NaN); entropy = log Z − Σ_r w_r·(E_r − dM_r) with w_r = exp(log S_r − dM_r − log Z)
    the slice's share of the mass (a row with no mass at all: NaN, as unsharded)."""
    shift, log_s, E = G[:, 0], G[:, 1], G[:, 2]
    owned, rel = G[:, 3:3 + K], G[:, 3 + K:3 + 2 * K]           # [R, K, N]
    M, log_z, dM = merge_lse(shift, log_s)
    w = torch.exp(log_s - dM - log_z)
    nan = torch.full_like(log_z, float("nan"))
    ent = torch.where(log_z == float("-inf"), nan, log_z - (w * (E - dM)).sum(0))
    logp = -_owned_sum(owned, dM[:, None] + rel) - log_z          # [K, N]
    logp = torch.where(owned.sum(0) == 1, logp, nan.expand_as(logp))
    return logp.t(), ent, _layout.lse_pair(M, log_z).detach()


def kl_combine(G: Tensor, beta: float, estimator: str, mask: Tensor | None):
    """kl_penalty: gathered [R, 8, N] = the policy's ``LP_STATS`` (K = 1) and the reference
    model's shift, log S and shift − r_t (its entropy is not needed) → (logprobs, ref_logprobs,
    log_ratio, kl, penalty, entropy, lse); the estimators as ``kl_from_logprobs`` (the kernels'
    formulas)."""
    logp, ent, lse = logprobs_combine(G[:, :5], 1)
    zero = torch.zeros_like(G[:, 0])
    ref_G = torch.stack([G[:, 5], G[:, 6], zero, G[:, 3], G[:, 7]], 1)
    ref_logp, _, _ = logprobs_combine(ref_G, 1)
    r = reference.kl_from_logprobs(logp[:, 0], ref_logp[:, 0], beta, estimator, mask)
    return r.logprobs, r.ref_logprobs, r.log_ratio, r.kl, r.penalty, ent, lse


def logprob_stats(lse: Tensor, ent: Tensor, logp: Tensor, owned: Tensor) -> Tensor:
    """``LP_STATS`` [3 + 2K, N] of a slice from the fused forward run on it (lse [2, N] of the
    slice, its entropy [N] and log-probs [N, K] of local token ids; ``owned`` [N, K] says which
    tokens lie in the slice — the others' log-probs are ignored):
        shift, log S, E = log S − H_slice = Σ p (y − shift),  owned_k,  shift − y_t = −logp − log S.
    A slice without mass (every logit −inf) has E = 0 and, for an owned token, shift − y_t = inf."""
    shift, log_s = lse[0], lse[1]
    empty = (log_s == float("-inf"))
    E = torch.where(empty, torch.zeros_like(log_s), log_s - ent)
    own = owned.t().to(lse.dtype)                                   # [K, N]
    rel = torch.where(empty, torch.full_like(log_s, float("inf")), -logp.t() - log_s)
    rel = torch.where(own > 0, rel, torch.zeros_like(rel))
    return torch.cat([torch.stack([shift, log_s, E]), own, rel])


def local_tokens(tokens: Tensor, offset: Tensor, local_vocab: int) -> tuple[Tensor, Tensor]:
    """(owned [N, K] bool, the ids the fused forward reads: t − offset where owned, else 0)."""
    t = tokens - offset
    owned = (t >= 0) & (t < local_vocab)
    return owned, torch.where(owned, t, torch.zeros_like(t))


def backward_tokens(tokens: Tensor, offset: Tensor, local_vocab: int, sizes: Tensor) -> Tensor:
    """Token ids for the fused log-prob backward run on a slice with col0 = 0 and
    vocab = local_vocab + 1: t − offset where the slice owns t (its one-hot column), local_vocab
    (a valid id past the slice: no one-hot, no NaN) where another rank owns it, −1 (out of range:
    a NaN row, the unsharded rule) where no rank does."""
    t = tokens - offset
    owned = (t >= 0) & (t < local_vocab)
    V = sizes.sum().round().to(torch.int64)
    valid = (tokens >= 0) & (tokens < V)
    return torch.where(owned, t, torch.where(valid, torch.full_like(t, local_vocab),
                                             torch.full_like(t, -1)))


def shard_tensor(offset: Tensor, sizes: Tensor) -> Tensor:
    """int64 [2] = (offset, V) on the device: what the sharded backward kernels read."""
    return torch.cat([offset.reshape(1), sizes.sum().round().to(torch.int64).reshape(1)])


# ------------------------------------------------------------ 2. statistics, reference ---

def _safe_log(s: Tensor) -> Tensor:
    """log s, −inf where s = 0, with a zero (not NaN) gradient there."""
    pos = s > 0
    return torch.where(pos, torch.log(torch.where(pos, s, torch.ones_like(s))),
                       torch.full_like(s, float("-inf")))


def softmax_stats_reference(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Eager (shift, log S, exp(x − shift)) of each row of a slice x [N, V_r] (acc dtype).
    shift is detached: the combination does not depend on it."""
    if x.shape[1] == 0:
        z = x.new_zeros((x.shape[0],))
        return z, torch.full_like(z, float("-inf")), x
    m = x.detach().amax(1)
    shift = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    e = torch.exp(x - shift[:, None])
    return shift, _safe_log(e.sum(1)), e


def target_stats_reference(x: Tensor, shift: Tensor, target: Tensor, offset: Tensor,
                           ignore_index: int | None) -> tuple[Tensor, Tensor]:
    """(owned, shift − x_t) for a slice x [N, V_r] starting at global id ``offset``."""
    V_r = x.shape[1]
    t = target - offset
    owned = (t >= 0) & (t < V_r)
    if ignore_index is not None:
        owned &= target != ignore_index
    if V_r == 0:
        return owned.to(x.dtype), torch.zeros_like(shift)
    xt = x.gather(1, torch.where(owned, t, 0)[:, None]).squeeze(1)
    return owned.to(x.dtype), torch.where(owned, shift - xt, torch.zeros_like(xt))


def logprob_stats_reference(logits: Tensor, tokens: Tensor, offset: Tensor,
                            temperature: float, softcap: float = 0.0) -> Tensor:
    """Eager ``LP_STATS`` [3 + 2K, N] of a slice (logits [N, V_r], tokens [N, K] global ids),
    differentiable (the reference backend's step 2); ``softcap`` > 0 caps the logits first."""
    y = reference.softcap_logits(logits.to(_checks.acc_dtype(logits.dtype)), softcap) / temperature
    shift, log_s, e = softmax_stats_reference(y)
    S = e.sum(1)
    pos = e > 0
    # E = Σ_j (e_j / S)·(y_j − shift) without 0·(−inf): the −inf logits are left out before
    ys = torch.where(pos, y - shift[:, None], torch.zeros_like(y))
    Ssafe = torch.where(S > 0, S, torch.ones_like(S))
    E = torch.where(S > 0, (e * ys).sum(1) / Ssafe, torch.zeros_like(S))
    owned, rel = [], []
    for k in range(tokens.shape[1]):
        o, r = target_stats_reference(y, shift, tokens[:, k], offset, None)
        owned.append(o)
        rel.append(r)
    z = y.new_zeros((0, y.shape[0]))
    return torch.cat([torch.stack([shift, log_s, E]),
                      torch.stack(owned) if owned else z, torch.stack(rel) if rel else z])


def cross_entropy_stats_reference(logits: Tensor, target: Tensor, offset: Tensor, ignore_index: int,
                                  smoothing: bool, softcap: float = 0.0) -> Tensor:
    """Eager ``CE_STATS`` [5, N] of a slice (the reference backend's step 2), differentiable;
    ``softcap`` > 0 caps the logits first."""
    x = logits.to(_checks.acc_dtype(logits.dtype))
    valid = target != ignore_index
    # an ignored row takes no part: zeroing it first keeps a row of −inf logits out of the graph
    x = torch.where(valid[:, None], x, torch.zeros((), dtype=x.dtype, device=x.device))
    x = reference.softcap_logits(x, softcap)
    shift, log_s, _ = softmax_stats_reference(x)
    owned, tgt = target_stats_reference(x, shift, target, offset, ignore_index)
    ls = (shift[:, None] - x).sum(1) if smoothing else torch.zeros_like(shift)
    return torch.stack([shift, log_s, owned, tgt, ls])
