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


# ------------------------------------------------------------------------------ logit softcap ---

def softcap_logits(x, softcap):
    """x → c·tanh(x/c) for a softcap c > 0 (Gemma-2's final_logit_softcapping; 0: x unchanged),
    in x's dtype, differentiable (d/dx = 1 − tanh²(x/c)). −inf stays −inf (derivative 1): a
    masked logit stays masked, where the formula would give −c. +inf becomes c, NaN stays NaN."""
    if not softcap > 0:
        return x
    return torch.where(x == float("-inf"), x, softcap * torch.tanh(x / softcap))


# --------------------------------------------------------------------------- cross entropy ---

def cross_entropy(logits, target, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                  softcap=0.0):
    """F.cross_entropy semantics, fp32 result; mean over zero valid targets is 0 (not NaN).

    Per row: loss = lse(x) − (1−ε)·x_t − ε·mean_j(x_j)  (= (1−ε)·nll + ε·mean_j(−log p_j)), with
    x = softcap_logits(logits) (in the accumulation dtype) when ``softcap`` > 0.
    """
    V = logits.shape[-1]
    x = logits.reshape(-1, V).to(acc_dtype(logits.dtype))
    t = target.reshape(-1)
    valid = t != ignore_index
    # an ignored row takes no part: zeroing it first keeps a row of −inf logits from turning its
    # (unused) log-softmax into NaN, which autograd would carry into the gradient
    x = torch.where(valid[:, None], x, torch.zeros((), dtype=x.dtype, device=x.device))
    logp = torch.log_softmax(softcap_logits(x, softcap), dim=-1)
    nll = -logp.gather(1, torch.where(valid, t, 0)[:, None]).squeeze(1)
    loss = nll
    if label_smoothing > 0:
        loss = (1.0 - label_smoothing) * nll - label_smoothing * logp.mean(-1)
    loss = torch.where(valid, loss, torch.zeros((), dtype=loss.dtype, device=loss.device))
    return _reduce_rows(loss, valid, reduction, target.shape)


def linear_cross_entropy(hidden, weight, target, bias=None, ignore_index=-100, reduction="mean",
                         label_smoothing=0.0, softcap=0.0):
    """cross_entropy(hidden @ weight.T + bias, target): the logits are materialised, in the
    input dtype, exactly as eager model code does."""
    logits = F.linear(hidden, weight, bias)
    return cross_entropy(logits, target, ignore_index, reduction, label_smoothing, softcap)


# ------------------------------------------------------------------------------- attention ---

def attention_window(causal, window):
    """(left, right) key offsets a query may look back / ahead, −1 = unbounded; causal caps right
    at 0 (flash-attn's ``window_size``: causal is the window (−1, 0))."""
    left, right = (-1, -1) if window is None else (int(window[0]), int(window[1]))
    return left, (0 if causal else right)


def _visible(i, j, T, S, left, right):
    """Bottom-right aligned window: query i sees key j iff i + S − T − left ≤ j ≤ i + S − T + right
    (a bound of −1 is absent). i, j, T, S are tensors or ints that broadcast."""
    d = j - i - (S - T)                      # key offset from the query's diagonal
    ok = torch.ones_like(d, dtype=torch.bool)
    if right >= 0:
        ok = ok & (d <= right)
    if left >= 0:
        ok = ok & (d >= -left)
    return ok


def _softmax_attend(q, k, v, visible, scale, softcap):
    """softmax(mask(cap(q kᵀ · scale))) v over the last two dims; GQA by repeating k/v heads.
    A row with no visible key outputs zeros (and gets zero gradients: masked_fill's backward
    zeroes every masked position, so the NaN softmax of an all −inf row never reaches q, k, v)."""
    Hq, Hkv = q.shape[-3], k.shape[-3]
    if Hq != Hkv:
        k = k.repeat_interleave(Hq // Hkv, dim=-3)
        v = v.repeat_interleave(Hq // Hkv, dim=-3)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap > 0:                          # Gemma-2: s → c·tanh(s / c), before the mask
        # pairs outside the mask (the packed ops' padding: q = 0 against a key holding ±inf is
        # 0·∞ = NaN) are scored 0 first, so that tanh's backward never multiplies 0 by NaN
        s = torch.where(visible, s, torch.zeros((), dtype=s.dtype, device=s.device))
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~visible, float("-inf"))
    p = torch.softmax(s, dim=-1)
    seen = visible.any(-1, keepdim=True)
    zero = torch.zeros((), dtype=p.dtype, device=p.device)
    # zero twice: p for the softmax's NaN, the output for 0·NaN where a value holds NaN
    return torch.where(seen, torch.matmul(torch.where(seen, p, zero), v), zero)


def attention(q, k, v, causal=True, scale=None, window=None, softcap=0.0):
    """softmax(q kᵀ · scale + mask) v in the input dtype, GQA by repeating k/v heads.

    Causal is bottom-right aligned (query i sees keys j ≤ i + S − T), as flash-attn; SDPA's
    ``is_causal`` is top-left aligned, the two agree when T == S. ``window=(left, right)``
    restricts query i to keys i + S − T − left ≤ j ≤ i + S − T + right (−1 = unbounded; causal
    caps right at 0). ``softcap > 0`` maps each scaled score s to softcap·tanh(s / softcap)
    before the softmax. A query row that sees no key outputs zeros.
    """
    T, D, S = q.shape[2], q.shape[3], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    left, right = attention_window(causal, window)
    i = torch.arange(T, device=q.device)[:, None]
    j = torch.arange(S, device=q.device)[None, :]
    return _softmax_attend(q, k, v, _visible(i, j, T, S, left, right), scale, softcap)


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=True,
                     scale=None, window=None, softcap=0.0):
    """flash_attn_varlen_func semantics: q [Nq, Hq, D], k/v [Nk, Hkv, D]; sequence b is
    q[cu_q[b]:cu_q[b+1]] against k/v[cu_k[b]:cu_k[b+1]], each masked as ``attention`` (bottom-right
    per sequence). Gathers every sequence into a [n, max_seqlen] block (max_seqlen is a Python
    int: no host sync, no data-dependent shape), runs the dense math with a per-sequence mask and
    gathers the real rows back; padded rows and keys are masked, so they carry no gradient.
    """
    Nq, Hq, D = q.shape
    Nk, Hkv = k.shape[0], k.shape[1]
    n = cu_seqlens_q.shape[0] - 1
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    left, right = attention_window(causal, window)
    cu_q, cu_k = cu_seqlens_q.long(), cu_seqlens_k.long()
    T = (cu_q[1:] - cu_q[:-1])[:, None, None]                      # [n, 1, 1] lengths
    S = (cu_k[1:] - cu_k[:-1])[:, None, None]
    i = torch.arange(max_seqlen_q, device=q.device)[None, :, None]  # [1, maxq, 1]
    j = torch.arange(max_seqlen_k, device=q.device)[None, None, :]  # [1, 1, maxk]
    visible = (i < T) & (j < S) & _visible(i, j, T, S, left, right)  # [n, maxq, maxk]

    def blocks(x, cu, N, max_len):           # [N, H, D] → [n, H, max_len, D]
        # positions past the packed end read an appended zero row (N may be 0)
        x = torch.cat([x, x.new_zeros((1,) + tuple(x.shape[1:]))])
        idx = (cu[:-1, None] + torch.arange(max_len, device=x.device)).clamp(max=N)
        return x[idx].transpose(1, 2)

    o = _softmax_attend(blocks(q, cu_q, Nq, max_seqlen_q), blocks(k, cu_k, Nk, max_seqlen_k),
                        blocks(v, cu_k, Nk, max_seqlen_k), visible[:, None], scale, softcap)
    # token t of the packed q belongs to sequence b with cu_q[b] ≤ t < cu_q[b + 1]
    t = torch.arange(Nq, device=q.device)
    b = torch.searchsorted(cu_q[1:], t, right=True).clamp(max=max(n - 1, 0))
    return o[b, :, t - cu_q[b]]              # [Nq, Hq, D]


def tree_ancestry(parent):
    """anc [n, n] bool, anc[s, a]: segment a is s or an ancestor of s, for a forest in depth-first
    pre-order (parent[s] < s). a's subtree is the segments a … end(a) − 1, where end(a) is the first
    j > a with parent[j] < a (else n): a ≤ s < end(a)."""
    n = parent.shape[0]
    j = torch.arange(n, device=parent.device)
    if n == 0:
        return torch.zeros((0, 0), dtype=torch.bool, device=parent.device)
    leaves = (j[None, :] > j[:, None]) & (parent.long()[None, :] < j[:, None])     # [a, j]
    end = torch.where(leaves, j[None, :], torch.full_like(j[None, :], n)).amin(1)   # [a]
    return (j[None, :] <= j[:, None]) & (j[:, None] < end[None, :])


def attention_tree(q, k, v, cu_seqlens, parent, max_seqlen, scale=None, softcap=0.0):
    """Shared-prefix (tree) attention as attention over the sequences "ancestors ‖ s": q, k, v
    [N, H, D] pack n segments (cu_seqlens int32 [n + 1]) that form a forest in depth-first
    pre-order (parent int32 [n], −1 for a root, parent[s] < s). Query i of segment s sees every
    token of every ancestor of s and the tokens 0 … i of s: bottom-right causal attention of the
    L_s queries of s against its A_s + L_s keys "ancestors (root first) ‖ s".

    Each segment's key sequence is gathered into a [n, max_seqlen] block (max_seqlen, a Python
    int ≥ every A_s + L_s, fixes the shapes: no host sync); the gradient of a token's k/v is the
    sum over every sequence that holds it (the gather's backward).
    """
    N, Hq, D = q.shape
    n = parent.shape[0]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    dev = q.device
    cu = cu_seqlens.long()
    L = cu[1:] - cu[:-1]                                             # [n] segment lengths
    held = tree_ancestry(parent).to(L.dtype) * L[None, :]            # [s, a] tokens of a in s's keys
    ends = held.cumsum(1)                                            # [s, a] end of a's run in them
    total = ends[:, -1:] if n else ends.new_zeros((0, 1))            # [s, 1] A_s + L_s
    slot = torch.arange(max_seqlen, device=dev).expand(n, max_seqlen).contiguous()   # [n, max]
    seg = torch.searchsorted(ends, slot, right=True).clamp(max=max(n - 1, 0))   # segment of a slot
    key_tok = cu[seg] + slot - (ends - held).gather(1, seg)          # its packed token
    key_tok = torch.where(slot < total, key_tok, N)                  # past the end: a zero row
    q_tok = torch.where(slot < L[:, None], cu[:-1, None] + slot, N)
    # query slot i sees key slot j iff i < L_s and j ≤ i + A_s (bottom-right causal, S − T = A_s)
    visible = (slot[:, :, None] < L[:, None, None]) & \
        (slot[:, None, :] <= slot[:, :, None] + (total - L[:, None])[:, :, None])

    def blocks(x, idx):                      # [N, H, D] → [n, H, max_seqlen, D]
        x = torch.cat([x, x.new_zeros((1,) + tuple(x.shape[1:]))])
        return x[idx].transpose(1, 2)

    o = _softmax_attend(blocks(q, q_tok), blocks(k, key_tok), blocks(v, key_tok), visible[:, None],
                        scale, softcap)
    t = torch.arange(N, device=dev)
    b = torch.searchsorted(cu[1:], t, right=True).clamp(max=max(n - 1, 0))
    return o[b, :, t - cu[b]]                # [N, Hq, D]


# ---------------------------------------------------------------------- pairwise reward loss ---

def pairwise_reward_loss(rewards, ranks, reduction="mean", margin=0.0):
    """Per prompt b: mean over pairs (i, j) with 0 ≤ ranks[b,i] < ranks[b,j] of
    −log σ(r_i − r_j − m_b) (margin 0: InstructGPT; > 0: a Llama-2 / TRL-style margin).
    ``margin`` is a float (m_b = margin) or a tensor [B] (m_b = margin[b], one per prompt); it
    gets no gradient.

    −log σ(d) = softplus(−d) = −logsigmoid(d), stable for any d. Prompts without a pair have
    loss 0; ``mean`` averages over prompts that have at least one pair (0 if none has).
    """
    present = ranks >= 0
    # Absent responses' rewards never enter (a NaN there would otherwise poison the gradient).
    r = torch.where(present, rewards.to(acc_dtype(rewards.dtype)), 0.0)
    if isinstance(margin, torch.Tensor):
        margin = margin.detach().to(r.dtype)[:, None, None]     # [B] → [B, 1, 1]
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
    """Per-token results of ``kl_penalty`` / ``kl_from_logprobs``, each [B, T] fp32 (fp64 for fp64
    inputs)."""
    logprobs: torch.Tensor      # log π(y_t), differentiable
    ref_logprobs: torch.Tensor  # log π_ref(y_t), no grad
    log_ratio: torch.Tensor     # logprobs − ref_logprobs, differentiable
    kl: torch.Tensor            # per-token KL estimate, differentiable
    penalty: torch.Tensor       # −beta · kl · mask, no grad (a reward term)
    entropy: torch.Tensor       # policy entropy, differentiable (None from kl_from_logprobs)


# Schulman's KL estimators and the ids the kernels take for them (kernels/kl.py and csrc/kl.cu
# compare against these literals; tests/test_kl.py checks that they agree with this table).
ESTIMATOR_IDS = {"k1": 1, "k2": 2, "k3": 3}
ESTIMATORS = tuple(ESTIMATOR_IDS)


def _log_softmax(logits, temperature, softcap=0.0):
    """log_softmax(softcap_logits(logits) / T) in the accumulation dtype: the softcap applies to
    the raw logits, the temperature divides the capped ones (Gemma's order)."""
    return torch.log_softmax(softcap_logits(logits.to(acc_dtype(logits.dtype)), softcap) / temperature,
                             dim=-1)


def gather_tokens(logp_all, tokens):
    """logp_all [..., V] at ``tokens``: [...] (tokens.dim() == logp_all.dim() − 1) or [..., K]
    (tokens.dim() == logp_all.dim(), K tokens per position)."""
    if tokens.dim() == logp_all.dim():
        return logp_all.gather(-1, tokens)
    return logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_of(logp_all):
    """H = −Σ_j p_j·log p_j of each row of log-probabilities [..., V], differentiable.

    0·log 0 = 0: log p is replaced by 0 where p = 0 *before* the product, so that a −inf logit
    contributes nothing to H nor to its gradient (the product 0·(−inf) would make autograd's
    gradient NaN). ∂H/∂y_j = −p_j·(log p_j + H) for the row's scaled logits y. A row without a
    distribution (a NaN logit, or every logit −inf) has no entropy: NaN, as its log-probs."""
    p = logp_all.exp()
    zero = torch.zeros((), dtype=p.dtype, device=p.device)
    ent = -(p * torch.where(p > 0, logp_all, zero)).sum(-1)
    return torch.where(logp_all.isnan().any(-1), torch.full_like(ent, float("nan")), ent)


def token_logprobs(logits, tokens, temperature=1.0, return_entropy=False, softcap=0.0):
    """log_softmax(logits / temperature) at ``tokens`` ([...] or [..., K]), accumulated in fp32;
    with ``return_entropy`` also the entropy [...] of softmax(logits / temperature). ``softcap``
    > 0: softcap_logits(logits) / temperature instead."""
    logp_all = _log_softmax(logits, temperature, softcap)
    logprobs = gather_tokens(logp_all, tokens)
    return (logprobs, entropy_of(logp_all)) if return_entropy else logprobs


def logit_stats(logits, tokens, temperature=1.0, softcap=0.0):
    """(is_top1, mean_logit) of logits [..., V] (no gradient): is_top1 (tokens' shape, bool)
    says that the token is the row's argmax — its first maximum, as torch.argmax —, mean_logit
    [...] is the mean over the vocabulary of logits / temperature, accumulated in fp32 (fp64).
    ``softcap`` > 0: mean_logit of the capped logits (softcap_logits); is_top1 is read from the
    raw logits, whose argmax is the capped logits' (tanh is strictly increasing; capping in finite
    precision can only merge nearly equal large logits into ties, which the raw ones break)."""
    with torch.no_grad():
        top = logits.argmax(-1, keepdim=True)
        is_top1 = (top == tokens) if tokens.dim() == logits.dim() else (top.squeeze(-1) == tokens)
        acc = acc_dtype(logits.dtype)
        capped = softcap_logits(logits.to(acc), softcap) if softcap > 0 else logits
        mean = capped.sum(-1, dtype=acc) / (logits.shape[-1] * temperature)
    return is_top1, mean


def linear_token_logprobs(hidden, weight, tokens, bias=None, temperature=1.0, return_entropy=False,
                          return_stats=False, softcap=0.0):
    """token_logprobs(hidden @ weight.T + bias, ...): the logits are materialised, in the input
    dtype, exactly as eager model code does; ``return_stats`` appends ``logit_stats``."""
    logits = F.linear(hidden, weight, bias)
    out = token_logprobs(logits, tokens, temperature, return_entropy, softcap)
    if not return_stats:
        return out
    return (*(out if return_entropy else (out,)), *logit_stats(logits, tokens, temperature, softcap))


def _k3(d):
    """k3 = e^{−d} − 1 + d. The closed form cancels for small |d| (an absolute error of ~ulp(1)
    against k3 ≈ d²/2: at |d| = 1e-4 fp32 keeps ~3 digits; fp64 loses as many at |d| = 1e-8).
    As in the kernels, |d| < ½ takes the Taylor series Σ_{n≥2} (−d)ⁿ/n! in the nested form
    ½·(1 − d/3·(1 − d/4·(… (1 − d/n_max)))) with n_max = 11 (20 for fp64). Each branch gets an
    operand that is finite where it is not taken, so the branch not taken contributes a zero
    gradient, never 0·inf = NaN."""
    small = d.abs() < 0.5
    ds = torch.where(small, d, torch.zeros((), dtype=d.dtype, device=d.device))
    q = torch.ones_like(ds)
    for n in range(20 if d.dtype == torch.float64 else 11, 2, -1):
        q = 1.0 - ds * q / n
    dl = torch.where(small, torch.ones((), dtype=d.dtype, device=d.device), d)
    return torch.where(small, 0.5 * ds * ds * q, torch.expm1(-dl) + dl)


def kl_from_log_ratio(log_ratio, estimator):
    """k1 = d, k2 = ½d², k3 = exp(−d) − 1 + d, with d = log π − log π_ref (Schulman's estimators)."""
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio * log_ratio
    return _k3(log_ratio)


def kl_from_logprobs(logprobs, ref_logprobs, beta, estimator="k1", mask=None):
    """KLPenalty from per-token log-probs (entropy None); gradients reach ``logprobs`` only.
    Computed in fp32 (fp64 when either input is fp64)."""
    acc = torch.promote_types(acc_dtype(logprobs.dtype), acc_dtype(ref_logprobs.dtype))
    logprobs = logprobs.to(acc)
    ref_logprobs = ref_logprobs.detach().to(acc)
    log_ratio = logprobs - ref_logprobs
    kl = kl_from_log_ratio(log_ratio, estimator)
    m = torch.ones_like(kl) if mask is None else mask.to(kl.dtype)
    penalty = (-beta * kl * m).detach()
    return KLPenalty(logprobs, ref_logprobs, log_ratio, kl, penalty, None)


def kl_penalty(logits, ref_logits, tokens, beta, estimator="k1", mask=None, temperature=1.0):
    logp_all = _log_softmax(logits, temperature)
    logprobs = gather_tokens(logp_all, tokens)
    with torch.no_grad():
        ref_logprobs = token_logprobs(ref_logits, tokens, temperature).to(logprobs.dtype)
    entropy = entropy_of(logp_all)
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
