"""Policy-gradient, value and preference losses on per-token log-probs, and the advantage estimators.

Every loss here is elementwise over tokens (or over sequences): it takes the per-token log-probs
that ``linear_token_logprobs`` computes from hidden states (and the entropy it returns with
``return_entropy=True``), so a whole PPO / GRPO / DPO step never holds [N, V] logits — the
gradient reaches the hidden states and the LM head through that op's fused backward. The losses
are plain differentiable torch code (no kernel pays off at O(N) work); ``gae`` is a reverse scan
with a Triton and a CUDA kernel (``kernels/losses.py``, ``csrc/losses.cu``; the reference is
the loop over T).

Two layouts, for every token tensor:
  dense   [B, T] with an optional mask [B, T] (bool, float or 0/1 integers);
  packed  [N] with ``cu_seqlens`` int32 [B + 1] (0, then the cumulative lengths; flash-attn's
          layout; empty sequences allowed) and an optional mask [N].
Per-sequence quantities ([B]: advantages of GRPO, sequence log-probs) work with both. Sums per
sequence are ``index_add`` over the segment of each token (``searchsorted`` on cu_seqlens): no
host synchronisation anywhere, so the losses run inside CUDA graphs and compiled regions. Value
checks on cu_seqlens (0 first, non-decreasing, last = N) run eagerly for CPU tensors (and with
RLHF_OPS_DEBUG=1); on CUDA a token outside [cu[0], cu[-1]) makes the loss NaN instead.

Everything is computed in fp32 (fp64 when an input is fp64) and returned in that dtype. Inputs
that carry no gradient in the formulas (old, rollout and reference log-probs, advantages,
returns, old values) are detached; the losses are differentiable w.r.t. logprobs, entropy,
values and the preference log-probs. Options are never ignored: an option that would change
nothing for the chosen ``loss_type`` raises.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _backend, _checks, reference

LOSS_TYPES = ("ppo", "grpo", "dapo", "bnpo", "dr_grpo", "gspo", "cispo")
TOKEN_MEAN_TYPES = ("ppo", "dapo", "bnpo", "cispo")      # Σℓ / (num_tokens or the token count)
SEQUENCE_MEAN_TYPES = ("grpo", "gspo")                   # mean over sequences of the token mean
IS_CORRECTIONS = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
KL_ESTIMATORS = reference.ESTIMATORS
DEFAULT_IS_CAP = 2.0
ADV_SCALES = ("group_std", "batch_std", "none")
SEQ_REDUCES = ("sum", "mean")
PREFERENCE_TYPES = ("sigmoid", "robust", "ipo", "hinge", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")
LENGTH_TYPES = ("ipo", "simpo", "orpo")                  # the types that divide by the lengths
SMOOTHED_TYPES = ("sigmoid", "robust", "simpo")          # the types label_smoothing enters


class PolicyLoss(NamedTuple):
    """Result of ``policy_loss``. Token tensors are shaped like ``logprobs``; fp32 (fp64)."""
    loss: Tensor            # scalar, differentiable
    per_token: Tensor       # the final ℓ that is aggregated (IS weight, KL, entropy included), 0 where masked
    ratio: Tensor           # r per token (gspo: the sequence ratio s of the token's sequence), detached
    is_weight: Tensor       # the IS weight per token (ones without is_correction), detached
    clip_fraction: Tensor   # scalar, detached
    approx_kl: Tensor       # scalar: mean over unmasked tokens of (r − 1) − log r, detached
    kl: Tensor | None       # per-token KL to the reference (not scaled by beta); None without a KL term


class PreferenceLoss(NamedTuple):
    """Result of ``preference_loss``; [B] tensors per pair, fp32 (fp64)."""
    loss: Tensor            # reduced per ``reduction`` (the per-pair losses for "none")
    per_pair: Tensor        # [B], differentiable
    chosen_rewards: Tensor  # [B], detached
    rejected_rewards: Tensor
    reward_accuracy: Tensor  # scalar: fraction of pairs with chosen_rewards > rejected_rewards


# =================================================================================== layouts ===

class _Layout:
    """Where the tokens of each sequence are. Dense: [B, T], sequence b = row b. Packed: [N],
    sequence b = tokens cu[b] .. cu[b+1] − 1; ``seg`` [N] is each token's sequence."""

    def __init__(self, shape, B: int, seg: Tensor | None = None, outside: Tensor | None = None):
        self.shape, self.B, self.seg, self.outside = tuple(shape), B, seg, outside

    @property
    def packed(self) -> bool:
        return self.seg is not None

    def seq_sum(self, x: Tensor) -> Tensor:
        """Token tensor → [B] sums over each sequence's tokens (differentiable)."""
        if not self.packed:
            return x.sum(-1)
        # one spare slot keeps index_add in bounds when B = 0 (tokens then lie outside: NaN loss)
        return x.new_zeros(self.B + 1).index_add(0, self.seg, x)[:self.B]

    def expand(self, x: Tensor) -> Tensor:
        """[B] → token tensor: each token gets its sequence's value."""
        if not self.packed:
            return x[:, None].expand(self.shape)
        return torch.cat([x, x.new_zeros(1)])[self.seg] if self.B == 0 else x[self.seg]

    def guard(self, loss: Tensor) -> Tensor:
        """NaN when a packed token lies outside every sequence (an invalid cu_seqlens that only
        the eager CPU check would have caught); the loss unchanged otherwise."""
        if self.outside is None:
            return loss
        return torch.where(self.outside, torch.full_like(loss, float("nan")), loss)


def _cu_seqlens(op: str, cu: Tensor, N: int, device) -> None:
    if not isinstance(cu, Tensor):
        raise TypeError(f"rlhf_ops.{op}: cu_seqlens must be a torch.Tensor (int32 [B + 1]), got "
                        f"{type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"rlhf_ops.{op}: cu_seqlens must have dtype int32 (flash-attn's cu_seqlens), "
                        f"got {str(cu.dtype).replace('torch.', '')}")
    if cu.dim() != 1 or cu.shape[0] == 0:
        raise ValueError(f"rlhf_ops.{op}: cu_seqlens must be 1-D [B + 1] (0, then the cumulative "
                         f"lengths), got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"rlhf_ops.{op}: cu_seqlens is on {cu.device} but the token tensors are on "
                         f"{device}; all inputs must be on one device")
    # value checks read cu_seqlens on the host: CPU tensors, or RLHF_OPS_DEBUG=1, never while tracing
    if cu.device.type == "meta" or not _backend.debug_checks(cu.device) or torch.compiler.is_compiling():
        return
    c = cu.cpu().long()
    if int(c[0]) != 0:
        raise ValueError(f"rlhf_ops.{op}: cu_seqlens must start at 0, got {int(c[0])}")
    lens = c[1:] - c[:-1]
    if lens.numel() and int(lens.min()) < 0:
        b = int((lens < 0).nonzero()[0])
        raise ValueError(f"rlhf_ops.{op}: cu_seqlens must be non-decreasing, but entry {b + 1} "
                         f"({int(c[b + 1])}) is smaller than entry {b} ({int(c[b])})")
    if int(c[-1]) != N:
        raise ValueError(f"rlhf_ops.{op}: cu_seqlens must cover the N = {N} packed tokens: its last "
                         f"entry is {int(c[-1])}")


def _layout(op: str, name: str, x: Tensor, cu_seqlens: Tensor | None) -> _Layout:
    """Validate the token tensor ``x`` ([B, T], or [N] with cu_seqlens) and describe its layout."""
    _checks.floating(op, name, x)
    if cu_seqlens is None:
        if x.dim() != 2:
            raise ValueError(f"rlhf_ops.{op}: {name} must be [B, T] (dense), or [N] with cu_seqlens "
                             f"(packed), got shape {tuple(x.shape)}")
        return _Layout(x.shape, x.shape[0])
    if x.dim() != 1:
        raise ValueError(f"rlhf_ops.{op}: with cu_seqlens (packed layout), {name} must be 1-D [N], "
                         f"got shape {tuple(x.shape)}")
    N = x.shape[0]
    _cu_seqlens(op, cu_seqlens, N, x.device)
    B = cu_seqlens.shape[0] - 1
    cu = cu_seqlens.long()
    pos = torch.arange(N, device=x.device)
    # token i is in sequence b when cu[b] <= i < cu[b+1]: b = #{b ≥ 1 : cu[b] <= i}
    seg = torch.searchsorted(cu[1:], pos, right=True)
    outside = ((pos < cu[0]) | (pos >= cu[-1])).any() if N else None
    return _Layout(x.shape, B, seg.clamp(max=max(B - 1, 0)), outside)


def _like(op: str, name: str, t, x: Tensor, xname: str, *, floating=True) -> None:
    if floating:
        _checks.floating(op, name, t)
    else:
        _checks.tensor(op, name, t, dtypes=_checks.MASK_DTYPES)
    _checks.same_device(op, xname, x, **{name: t})
    _checks.shape(op, name, t, x.shape, f"{xname}.shape")


def _mask(op: str, mask, x: Tensor, xname: str) -> Tensor:
    """The mask as bool, shaped like x (all True when None)."""
    if mask is None:
        return torch.ones(x.shape, dtype=torch.bool, device=x.device)
    _like(op, "mask", mask, x, xname, floating=False)
    return mask != 0


def _per_token(op: str, name: str, t, x: Tensor, lay: _Layout, acc) -> Tensor:
    """A per-sequence [B] or per-token tensor as a detached token tensor in ``acc``."""
    _checks.floating(op, name, t)
    _checks.same_device(op, "logprobs", x, **{name: t})
    if tuple(t.shape) == lay.shape:      # per token (packed with B == N: read per token)
        return t.detach().to(acc)
    if tuple(t.shape) == (lay.B,):
        return lay.expand(t.detach().to(acc))
    tok = "[B, T]" if not lay.packed else "[N]"
    raise ValueError(f"rlhf_ops.{op}: {name} must have shape [B] = ({lay.B},) (one per sequence) or "
                     f"{tok} = {lay.shape} (one per token), got {tuple(t.shape)}")


def _acc(*ts) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) else torch.float32


# ============================================================================ option checks ===

def _number(op: str, name: str, v, *, low=None, high=None, low_open=False, allow_inf=False) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"rlhf_ops.{op}: {name} must be a number, got {type(v).__name__}")
    v = float(v)
    # comparisons only (no math.isnan): torch.compile(dynamic=True) passes symbolic floats
    bad = not v == v or (not abs(v) < math.inf and not allow_inf)
    if low is not None:
        bad = bad or (v <= low if low_open else v < low)
    if high is not None:
        bad = bad or v > high
    if bad:
        lo = "" if low is None else f"{'>' if low_open else '≥'} {low}"
        hi = "" if high is None else f"≤ {high}"
        rng = " and ".join(x for x in (lo, hi) if x)
        raise ValueError(f"rlhf_ops.{op}: {name} must be a {'' if allow_inf else 'finite '}number"
                         f"{' ' + rng if rng else ''}, got {v}")
    return v


def _clip(op: str, clip) -> tuple[float, float]:
    if isinstance(clip, (tuple, list)):
        if len(clip) != 2:
            raise ValueError(f"rlhf_ops.{op}: clip must be (eps_low, eps_high), got {clip!r}")
        lo, hi = clip
    else:
        lo = hi = clip
    return (_number(op, "clip (eps_low)", lo, low=0.0), _number(op, "clip (eps_high)", hi, low=0.0))


def _is_cap(op: str, cap) -> tuple[float, float]:
    """(log low, log high) of the IS weight's bounds: a number is (0, cap), a pair (low, high)."""
    if isinstance(cap, (tuple, list)):
        if len(cap) != 2:
            raise ValueError(f"rlhf_ops.{op}: is_cap must be a number or (low, high), got {cap!r}")
        lo = _number(op, "is_cap (low)", cap[0], low=0.0)
        hi = _number(op, "is_cap (high)", cap[1], low=0.0, low_open=True, allow_inf=True)
        if lo > hi:
            raise ValueError(f"rlhf_ops.{op}: is_cap (low, high) must have low ≤ high, got {cap!r}")
    else:
        lo, hi = 0.0, _number(op, "is_cap", cap, low=0.0, low_open=True, allow_inf=True)
    return (math.log(lo) if lo > 0 else -math.inf), math.log(hi)


def _num_tokens(op: str, num_tokens, device):
    if isinstance(num_tokens, Tensor):
        if num_tokens.numel() != 1:
            raise ValueError(f"rlhf_ops.{op}: num_tokens must be a number or a one-element tensor, got "
                             f"shape {tuple(num_tokens.shape)}")
        if num_tokens.dtype == torch.bool or num_tokens.is_complex():
            raise TypeError(f"rlhf_ops.{op}: num_tokens must be a number tensor, got {num_tokens.dtype}")
        if num_tokens.device != device:
            raise ValueError(f"rlhf_ops.{op}: num_tokens is on {num_tokens.device} but logprobs is on "
                             f"{device}; all inputs must be on one device")
        return num_tokens.detach().reshape(())
    return _number(op, "num_tokens", num_tokens, low=0.0, low_open=True)


# ============================================================================== policy loss ===

def policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor | None = None, *,
                cu_seqlens: Tensor | None = None, loss_type: str = "ppo",
                clip: tuple[float, float] | float = (0.2, 0.2), dual_clip: float | None = None,
                rollout_logprobs: Tensor | None = None, is_correction: str | None = None,
                is_cap: float | tuple[float, float] = DEFAULT_IS_CAP, ref_logprobs: Tensor | None = None,
                beta: float = 0.0, kl_estimator: str = "k3", entropy: Tensor | None = None,
                entropy_coef: float = 0.0, max_len: int | None = None,
                num_tokens: int | float | Tensor | None = None) -> PolicyLoss:
    """Clipped policy-gradient losses of PPO and the GRPO family, on per-token log-probs.

    Layout: dense ``logprobs``/``old_logprobs`` [B, T] with ``mask`` [B, T]; or packed [N] with
    ``cu_seqlens`` int32 [B + 1] (mask [N] optional). ``advantages`` [B] (one per sequence, as
    GRPO) or per token (as PPO's GAE). With r = exp(logprobs − old_logprobs) per token and
    clip = (ε_lo, ε_hi) (a number c means (c, c)):

        ℓ_t = −min(r_t·A_t, clip(r_t, 1 − ε_lo, 1 + ε_hi)·A_t)
        dual_clip c > 1: where A_t < 0, ℓ_t ← min(ℓ_t, −c·A_t)

    ``loss_type`` (the aggregation is over unmasked tokens; Σ = their sum):

    * ``"ppo"`` — Schulman et al. 2017, "Proximal Policy Optimization Algorithms" (clipped
      surrogate; dual-clip: Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep RL").
      loss = Σℓ / (num_tokens or the token count). Matches OpenRLHF's / verl's token-mean
      ``PolicyLoss``.
    * ``"grpo"`` — Shao et al. 2024, "DeepSeekMath" (GRPO). loss = mean over the B sequences of
      (Σ_seq ℓ / n_seq), a sequence without unmasked tokens counting 0. Matches TRL GRPOTrainer's
      ``loss_type="grpo"``.
    * ``"dapo"`` — Yu et al. 2025, "DAPO" (token-level mean over the global batch, clip-higher
      ε_hi > ε_lo). loss = Σℓ / (num_tokens or the token count); pass the token count of the
      whole accumulated batch (all ranks) as ``num_tokens``. Matches TRL's ``"dapo"`` with
      num_tokens = its normaliser.
    * ``"bnpo"`` — Xiao et al. 2025, "BNPO"; TRL's ``"bnpo"``: Σℓ / (the local token count).
    * ``"dr_grpo"`` — Liu et al. 2025, "Understanding R1-Zero-Like Training" (Dr. GRPO).
      loss = Σℓ / (B·max_len); ``max_len`` (the maximum completion length) is required.
      Matches TRL's ``"dr_grpo"`` with max_len = max_completion_length.
    * ``"gspo"`` — Zheng et al. 2025, "Group Sequence Policy Optimization". The ratio is the
      sequence's s = exp(mean over its unmasked tokens of (logprobs − old_logprobs)), used per
      token as sg(s)·exp(logprobs − sg(logprobs)) (value s, gradient s per token: the GSPO-token
      form); aggregated as "grpo". Matches TRL's ``importance_sampling_level="sequence"`` with
      ``loss_type="grpo"`` (equal gradients while the IS weight is constant within a sequence).
    * ``"cispo"`` — MiniMax 2025, "MiniMax-M1" (CISPO): ℓ_t = −sg(min(r_t, 1 + ε_hi))·A_t·logprobs_t,
      the clipped ratio as a constant weight of the REINFORCE term; aggregated as "dapo". ε_lo is
      not used. The cap is 1 + ε_hi: TRL's ``epsilon_high = 5`` (the cap itself) is clip=(ε_lo, 4.0).
      Matches TRL's ``"cispo"``.

    Importance sampling against the rollout engine (``rollout_logprobs``: the log-probs of the
    sampler — vLLM, SGLang — that drew the tokens): ℓ_t ← ℓ_t·sg(w_t) with
    log w_t = old_logprobs_t − rollout_logprobs_t (``"token_*"``) or the sum of that over the
    sequence's unmasked tokens, for every token of it (``"sequence_*"``); ``"*_truncate"``:
    w ← min(w, is_cap) (is_cap = (low, high): clamp to [low, high]); ``"*_mask"``: w ← w where
    w ≤ is_cap (low ≤ w ≤ high), else 0. Decided on log w, so a weight that would overflow is
    capped or masked, never inf. (TRL's vLLM IS modes; Yao et al. 2025 "truncated IS";
    IcePop's two-sided mask.) With "gspo" the token weight multiplies each token's term.

    KL and entropy inside the loss: ℓ_t ← ℓ_t + beta·kl_t − entropy_coef·entropy_t, with kl_t the
    ``kl_estimator`` ("k1" d, "k2" ½d², "k3" e^{−d} − 1 + d; d = logprobs − ref_logprobs; GRPO's
    is k3) — aggregated with the rest of ℓ, as verl does (TRL takes a plain token mean of the
    entropy term; see rlhf_ops.integrations._trl_losses).

    ``num_tokens`` (token-mean types only): the normaliser shared by micro-batches and ranks, a
    number or a one-element tensor (e.g. an all-reduced count; no host sync); then the
    micro-batch losses sum to the whole batch's. Zero unmasked tokens in the batch: loss 0 with a
    zero gradient.

    Returns ``PolicyLoss(loss, per_token, ratio, is_weight, clip_fraction, approx_kl, kl)``.
    clip_fraction: fraction of unmasked tokens with r > 1 + ε_hi and A > 0 or r < 1 − ε_lo and
    A < 0 (cispo: the first only; gspo: r = s). Options that would change nothing raise
    (``max_len`` without "dr_grpo", ``num_tokens`` with a sequence-mean type, ``dual_clip`` with
    "cispo", ``rollout_logprobs`` without ``is_correction`` or the reverse, a non-default
    ``is_cap`` without ``is_correction``, beta ≠ 0 without ``ref_logprobs``, entropy_coef ≠ 0
    without ``entropy``).
    """
    op = "policy_loss"
    lay = _layout(op, "logprobs", logprobs, cu_seqlens)
    _like(op, "old_logprobs", old_logprobs, logprobs, "logprobs")
    _checks.choice(op, "loss_type", loss_type, LOSS_TYPES)
    eps_lo, eps_hi = _clip(op, clip)
    if dual_clip is not None:
        if loss_type == "cispo":
            raise ValueError(f"rlhf_ops.{op}: dual_clip does not apply to loss_type='cispo' (its "
                             f"per-token loss is not the clipped surrogate)")
        dual_clip = _number(op, "dual_clip", dual_clip, low=1.0, low_open=True)
    if is_correction is not None:
        _checks.choice(op, "is_correction", is_correction, IS_CORRECTIONS)
        if rollout_logprobs is None:
            raise ValueError(f"rlhf_ops.{op}: is_correction={is_correction!r} needs rollout_logprobs")
        _like(op, "rollout_logprobs", rollout_logprobs, logprobs, "logprobs")
        log_lo, log_hi = _is_cap(op, is_cap)
    else:
        if rollout_logprobs is not None:
            raise ValueError(f"rlhf_ops.{op}: rollout_logprobs given without is_correction; choose one of "
                             f"{IS_CORRECTIONS} (it would be ignored otherwise)")
        if is_cap != DEFAULT_IS_CAP:
            raise ValueError(f"rlhf_ops.{op}: is_cap={is_cap!r} given without is_correction (it would be "
                             f"ignored)")
    _checks.choice(op, "kl_estimator", kl_estimator, KL_ESTIMATORS)
    beta = _number(op, "beta", beta)
    if beta != 0:
        if ref_logprobs is None:
            raise ValueError(f"rlhf_ops.{op}: beta = {beta} needs ref_logprobs (the reference policy's "
                             f"log-probs)")
    if ref_logprobs is not None:
        _like(op, "ref_logprobs", ref_logprobs, logprobs, "logprobs")
    entropy_coef = _number(op, "entropy_coef", entropy_coef)
    if entropy is not None:
        _like(op, "entropy", entropy, logprobs, "logprobs")
    elif entropy_coef != 0:
        raise ValueError(f"rlhf_ops.{op}: entropy_coef = {entropy_coef} needs entropy (per token, e.g. "
                         f"from linear_token_logprobs(..., return_entropy=True))")
    if loss_type == "dr_grpo":
        if max_len is None:
            raise ValueError(f"rlhf_ops.{op}: loss_type='dr_grpo' needs max_len (its constant length "
                             f"normaliser, e.g. the maximum completion length)")
        if isinstance(max_len, bool) or not isinstance(max_len, numbers.Integral) or max_len < 1:
            raise ValueError(f"rlhf_ops.{op}: max_len must be a positive int, got {max_len!r}")
    elif max_len is not None:
        raise ValueError(f"rlhf_ops.{op}: max_len applies to loss_type='dr_grpo' only, got loss_type="
                         f"{loss_type!r}")
    if num_tokens is not None:
        if loss_type not in TOKEN_MEAN_TYPES:
            raise ValueError(f"rlhf_ops.{op}: num_tokens applies to the token-mean types "
                             f"{TOKEN_MEAN_TYPES}, not to loss_type={loss_type!r}")
        num_tokens = _num_tokens(op, num_tokens, logprobs.device)
    m = _mask(op, mask, logprobs, "logprobs")
    acc = _acc(logprobs, old_logprobs)
    A = _per_token(op, "advantages", advantages, logprobs, lay, acc)

    zero = torch.zeros((), dtype=acc, device=logprobs.device)
    lp = logprobs.to(acc)
    d = lp - old_logprobs.detach().to(acc)                      # log r per token
    mf = m.to(acc)
    n_seq = lay.seq_sum(mf)                                     # unmasked tokens per sequence
    count = mf.sum()
    lo, hi = 1.0 - eps_lo, 1.0 + eps_hi

    if loss_type == "gspo":
        s = torch.exp(lay.seq_sum(torch.where(m, d, zero)) / n_seq.clamp(min=1))   # [B]
        ratio = lay.expand(s.detach())
        r = ratio * torch.exp(lp - lp.detach())                 # value s, ∂r/∂logprobs = s
    else:
        r = torch.exp(d)
        ratio = r.detach()
    if loss_type == "cispo":
        ell = -torch.clamp(ratio, max=hi) * A * lp
    else:
        ell = -torch.minimum(r * A, r.clamp(lo, hi) * A)
        if dual_clip is not None:
            ell = torch.where(A < 0, torch.minimum(ell, -dual_clip * A), ell)

    if is_correction is not None:
        log_w = old_logprobs.detach().to(acc) - rollout_logprobs.detach().to(acc)
        if is_correction.startswith("sequence"):
            log_w = lay.expand(lay.seq_sum(torch.where(m, log_w, zero)))
        if is_correction.endswith("truncate"):
            w = torch.exp(log_w.clamp(log_lo, log_hi))          # clamp keeps NaN
        else:
            keep = ((log_w >= log_lo) & (log_w <= log_hi)) | torch.isnan(log_w)
            w = torch.where(keep, torch.exp(torch.where(keep, log_w, zero)), zero)
        ell = ell * w
    else:
        w = torch.ones_like(ratio)

    kl = None
    if beta != 0:
        kl = reference.kl_from_log_ratio(lp - ref_logprobs.detach().to(acc), kl_estimator)
        ell = ell + beta * kl
    if entropy_coef != 0:
        ell = ell - entropy_coef * entropy.to(acc)
    per_token = torch.where(m, ell, zero)

    if loss_type in TOKEN_MEAN_TYPES:
        if num_tokens is None:
            denom = count.clamp(min=1)
        elif isinstance(num_tokens, Tensor):
            nt = num_tokens.to(acc)
            denom = torch.where(nt > 0, nt, torch.ones_like(nt))
        else:
            denom = num_tokens
        loss = per_token.sum() / denom
    elif loss_type in SEQUENCE_MEAN_TYPES:
        loss = (lay.seq_sum(per_token) / n_seq.clamp(min=1)).sum() / max(lay.B, 1)
    else:  # dr_grpo
        loss = per_token.sum() / max(lay.B * max_len, 1)
    loss = lay.guard(loss)

    with torch.no_grad():
        high = (ratio > hi) & (A > 0)
        clipped = high if loss_type == "cispo" else high | ((ratio < lo) & (A < 0))
        n = count.clamp(min=1)
        clip_fraction = (clipped & m).to(acc).sum() / n
        approx_kl = torch.where(m, torch.expm1(d) - d, zero).sum() / n
    return PolicyLoss(loss, per_token, ratio, w, clip_fraction, approx_kl, kl)


# =============================================================================== value loss ===

def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor | None = None, *,
               clip: float | None = None, cu_seqlens: Tensor | None = None,
               num_tokens: int | float | Tensor | None = None) -> Tensor:
    """PPO's value loss (Schulman et al. 2017; clipped as OpenAI baselines' PPO2 / OpenRLHF /
    verl): per token ½·max((v − R)², (clip(v, v_old − c, v_old + c) − R)²) with c = ``clip``
    (no clip: ½·(v − R)²), then the token mean over unmasked tokens: Σ / (num_tokens or their
    count); 0 with a zero gradient when there is none.

    values, old_values, returns: dense [B, T] (mask [B, T]) or packed [N] with cu_seqlens.
    Differentiable w.r.t. ``values``; old_values and returns are constants. fp32 (fp64) scalar.
    """
    op = "value_loss"
    _layout(op, "values", values, cu_seqlens)
    _like(op, "old_values", old_values, values, "values")
    _like(op, "returns", returns, values, "values")
    if clip is not None:
        clip = _number(op, "clip", clip, low=0.0)
    if num_tokens is not None:
        num_tokens = _num_tokens(op, num_tokens, values.device)
    m = _mask(op, mask, values, "values")
    acc = _acc(values, old_values, returns)
    v = values.to(acc)
    R = returns.detach().to(acc)
    err = (v - R) ** 2
    if clip is not None:
        v_old = old_values.detach().to(acc)
        v_clip = v_old + (v - v_old).clamp(-clip, clip)
        err = torch.maximum(err, (v_clip - R) ** 2)
    total = torch.where(m, 0.5 * err, torch.zeros((), dtype=acc, device=v.device)).sum()
    if num_tokens is None:
        return total / m.sum().clamp(min=1).to(acc)
    if isinstance(num_tokens, Tensor):
        nt = num_tokens.to(acc)
        return total / torch.where(nt > 0, nt, torch.ones_like(nt))
    return total / num_tokens


# ====================================================================================== GAE ===

def _gae_loop(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float,
              reset: Tensor | None = None):
    """The reference: a loop over T of [R, T] rows (vectorised over R). ``reset`` [R, T]: zero the
    carried (V', A') before position t (the next position starts another sequence)."""
    R, T = rewards.shape
    zero = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    adv = torch.zeros_like(rewards)
    v_next = rewards.new_zeros(R)      # V' and A': the nearest unmasked position after t
    a_next = rewards.new_zeros(R)
    for t in range(T - 1, -1, -1):
        if reset is not None:
            v_next = torch.where(reset[:, t], zero, v_next)
            a_next = torch.where(reset[:, t], zero, a_next)
        delta = rewards[:, t] + gamma * v_next - values[:, t]      # δ_t = r_t + γ·V' − V_t
        a = delta + gamma * lam * a_next                            # A_t = δ_t + γλ·A'
        mt = mask[:, t]
        adv[:, t] = torch.where(mt, a, zero)
        v_next = torch.where(mt, values[:, t], v_next)              # masked: carried across
        a_next = torch.where(mt, a, a_next)
    return adv, torch.where(mask, adv + values, zero)


def gae_reference(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float,
                  cu_seqlens: Tensor | None = None):
    """Eager GAE (the ``reference`` backend). rewards, values in the accumulation dtype, mask bool;
    packed [N] tensors are scanned as one row whose carry restarts at every sequence boundary."""
    if cu_seqlens is None:
        return _gae_loop(rewards, values, mask, gamma, lam)
    N = rewards.shape[0]
    starts = torch.zeros(N + 1, dtype=torch.bool, device=rewards.device)
    starts[cu_seqlens.long().clamp(0, N)] = True                    # first token of each sequence
    adv, ret = _gae_loop(rewards[None], values[None], mask[None], gamma, lam, starts[None, 1:])
    return adv[0], ret[0]


def _gae_kernel_impl(backend: str):
    if backend == "triton":
        return _backend.triton_kernels("losses").gae
    return torch.ops.rlhf_ops_cuda.gae_fwd


@torch.library.custom_op("rlhf_ops::gae_fwd", mutates_args=())
def gae_fwd(rewards: Tensor, values: Tensor, mask: Tensor, cu_seqlens: Tensor | None, gamma: float,
            lam: float, backend: str) -> tuple[Tensor, Tensor]:
    """rewards, values [B, T] or [N] (contiguous, accumulation dtype), mask uint8 of that shape,
    cu_seqlens int32 [B + 1] or None → (advantages, returns). Not differentiable."""
    return tuple(_gae_kernel_impl(backend)(rewards, values, mask, cu_seqlens, gamma, lam))


@gae_fwd.register_fake
def _(rewards, values, mask, cu_seqlens, gamma, lam, backend):
    return torch.empty_like(rewards), torch.empty_like(rewards)


def gae(rewards: Tensor, values: Tensor, mask: Tensor | None, *, gamma: float = 1.0, lam: float = 0.95,
        cu_seqlens: Tensor | None = None, backend: str | None = None) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, "High-Dimensional Continuous
    Control Using GAE"), as PPO trainers compute it (OpenRLHF, TRL's PPOTrainer, verl).

    rewards, values: dense [B, T] with mask [B, T], or packed [N] with ``cu_seqlens`` int32
    [B + 1] and mask [N] (mask None: every token). Per sequence, backwards over its tokens:

        δ_t = r_t + γ·V_{t+1}·m_{t+1} − V_t,    A_t = δ_t + γλ·m_{t+1}·A_{t+1},    R_t = A_t + V_t

    (V and A are 0 past the sequence's end); advantages and returns are 0 at masked tokens. A mask
    may hold several runs per sequence (multi-turn: tool/observation tokens masked): the
    recursion skips masked tokens, carrying V and A of the next unmasked token across them
    (verl's rule; rewards and values at masked tokens are never read) — for one contiguous run,
    exactly the formula above.

    Returns (advantages, returns) shaped like rewards, fp32 (fp64 for fp64 inputs), without
    gradient. Backends: ``reference`` (the loop over T; packed sequences as one row), ``triton``
    and ``cuda`` (one reverse-scan kernel, one program per sequence, no loop over positions).
    """
    op = "gae"
    _layout(op, "rewards", rewards, cu_seqlens)
    _like(op, "values", values, rewards, "rewards")
    m = _mask(op, mask, rewards, "rewards")
    gamma = _number(op, "gamma", gamma, low=0.0)
    lam = _number(op, "lam", lam, low=0.0)
    acc = _acc(rewards, values)
    be = _backend.resolve(op, backend, rewards.device)
    r = rewards.detach().to(acc).contiguous()
    v = values.detach().to(acc).contiguous()
    if be == "reference":
        return gae_reference(r, v, m, gamma, lam, cu_seqlens)
    return torch.ops.rlhf_ops.gae_fwd(r, v, m.to(torch.uint8).contiguous(),
                                      None if cu_seqlens is None else cu_seqlens.contiguous(),
                                      gamma, lam, be)


# ======================================================================= group advantages ===

def group_advantages(scores: Tensor, group_size: int, *, scale: str = "group_std", eps: float = 1e-6,
                     leave_one_out: bool = False) -> Tensor:
    """Group-relative advantages of GRPO-style trainers, one per completion.

    scores [B] with B = n_groups·group_size, the completions of one prompt consecutive (group
    order). A = s − mean of its group (GRPO, Shao et al. 2024); ``leave_one_out``: s − the mean
    of the *other* completions of the group (RLOO, Ahmadian et al. 2024; needs group_size ≥ 2).
    ``scale``: "group_std" divides by the group's standard deviation (unbiased, as TRL's
    ``scale_rewards="group"``) + eps; "batch_std" by the whole batch's (TRL's "batch"); "none"
    does not scale (Dr. GRPO). fp32 (fp64) [B], differentiable w.r.t. scores.
    """
    op = "group_advantages"
    _checks.floating(op, "scores", scores, ndim=1)
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral) or group_size < 1:
        raise ValueError(f"rlhf_ops.{op}: group_size must be a positive int, got {group_size!r}")
    B = scores.shape[0]
    if B % group_size:
        raise ValueError(f"rlhf_ops.{op}: group_size = {group_size} must divide the number of scores "
                         f"B = {B} (scores [B] = n_groups·group_size, in group order)")
    _checks.choice(op, "scale", scale, ADV_SCALES)
    eps = _number(op, "eps", eps, low=0.0)
    if not isinstance(leave_one_out, bool):
        raise TypeError(f"rlhf_ops.{op}: leave_one_out must be a bool, got {type(leave_one_out).__name__}")
    if leave_one_out and group_size < 2:
        raise ValueError(f"rlhf_ops.{op}: leave_one_out needs group_size ≥ 2, got {group_size}")
    if scale == "group_std" and group_size < 2:
        raise ValueError(f"rlhf_ops.{op}: scale='group_std' needs group_size ≥ 2 (the unbiased std of "
                         f"one score is undefined); use scale='none' or 'batch_std'")
    if scale == "batch_std" and B == 1:
        raise ValueError(f"rlhf_ops.{op}: scale='batch_std' needs B ≥ 2 scores")
    s = scores.to(_acc(scores))
    g = s.view(-1, group_size)
    if leave_one_out:   # s − (Σ_group − s)/(G − 1)
        adv = g - (g.sum(1, keepdim=True) - g) / (group_size - 1)
    else:
        adv = g - g.mean(1, keepdim=True)
    if scale == "group_std":
        adv = adv / (g.std(1, keepdim=True) + eps)
    elif scale == "batch_std" and B:
        adv = adv / (s.std() + eps)
    return adv.reshape(B)


# ======================================================================= sequence log-probs ===

def sequence_logprobs(logprobs: Tensor, mask: Tensor | None = None, *, cu_seqlens: Tensor | None = None,
                      reduce: str = "sum") -> Tensor:
    """Per-sequence log-prob [B] from per-token log-probs: the sum over unmasked tokens
    (``reduce="sum"``: log π(y∣x), DPO's) or their mean (``"mean"``: SimPO's / ORPO's length-
    averaged log-prob; 0 for a sequence without unmasked tokens). Dense [B, T] + mask or packed
    [N] + cu_seqlens. fp32 (fp64), differentiable w.r.t. logprobs."""
    op = "sequence_logprobs"
    lay = _layout(op, "logprobs", logprobs, cu_seqlens)
    _checks.choice(op, "reduce", reduce, SEQ_REDUCES)
    m = _mask(op, mask, logprobs, "logprobs")
    acc = _acc(logprobs)
    lp = torch.where(m, logprobs.to(acc), torch.zeros((), dtype=acc, device=logprobs.device))
    out = lay.seq_sum(lp)
    if reduce == "mean":
        out = out / lay.seq_sum(m.to(acc)).clamp(min=1)
    return lay.guard(out)


# ========================================================================= preference loss ===

def _log1mexp(x: Tensor) -> Tensor:
    """log(1 − e^x) for x ≤ 0, accurate on both sides of −log 2 (Mächler 2012)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def preference_loss(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor | None = None,
                    ref_rejected_logps: Tensor | None = None, *, loss_type: str = "sigmoid",
                    beta: float = 0.1, label_smoothing: float = 0.0, gamma: float = 0.0,
                    chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None,
                    reduction: str = "mean") -> PreferenceLoss:
    """Pairwise preference losses on sequence log-probs [B] (from ``sequence_logprobs``).

    c, r: chosen / rejected log-probs; c_ref, r_ref: the reference model's (0 when not given);
    h = (c − c_ref) − (r − r_ref); β = ``beta`` > 0; ε = ``label_smoothing`` ∈ [0, 0.5);
    σ the logistic function; |c|, |r| = ``chosen_lengths`` / ``rejected_lengths`` (token counts).

    * ``"sigmoid"`` — DPO, Rafailov et al. 2023: −(1−ε)·log σ(β·h) − ε·log σ(−β·h) (ε > 0:
      conservative DPO, Mitchell 2023). Matches TRL DPOTrainer's "sigmoid" (ε = 0; TRL 1.16 has no
      smoothing there) and CPOTrainer's "sigmoid" (reference-free: no ref log-probs).
    * ``"robust"`` — Chowdhury et al. 2024, "Provably Robust DPO": the unbiased estimator
      ((1−ε)·ℓ(h) − ε·ℓ(−h)) / (1 − 2ε), ℓ(x) = −log σ(β·x). Matches TRL DPOTrainer's "robust".
    * ``"ipo"`` — Azar et al. 2023, "A General Theoretical Paradigm" (IPO): (h − 1/(2β))², where
      the lengths, when given, first divide the policy and reference log-probs
      (h = (c − c_ref)/|c| − (r − r_ref)/|r|). Matches TRL DPOTrainer's "ipo" (which always
      divides by the completion lengths) and CPOTrainer's "ipo" (reference-free, averaged).
    * ``"hinge"`` — SLiC, Zhao et al. 2023: relu(1 − β·h). Matches TRL DPOTrainer's / CPOTrainer's
      "hinge".
    * ``"simpo"`` — Meng et al. 2024, "SimPO": −(1−ε)·log σ(z) − ε·log σ(−z),
      z = β·(c/|c| − r/|r|) − γ (γ = ``gamma``, the target margin; without lengths c and r are
      taken as already length-averaged). Reference-free. Matches TRL CPOTrainer's "simpo" with
      simpo_gamma = γ (and cpo_alpha's NLL term left to the caller).
    * ``"orpo"`` — Hong et al. 2024, "ORPO": β·(−log σ(log odds(c̄) − log odds(r̄))), with
      c̄ = c/|c|, r̄ = r/|r| the length-averaged log-probs (as given when no lengths) and
      log odds(p) = log p − log(1 − p). Only the odds-ratio term: the NLL of the chosen sequence
      is the caller's. Reference-free. Matches TRL ORPOTrainer's loss minus its NLL term.

    The reference-free types (simpo, orpo) do not read ref log-probs. Options that a type would
    ignore raise: label_smoothing ≠ 0 outside sigmoid/robust/simpo, gamma ≠ 0 outside simpo,
    lengths with sigmoid/robust/hinge. ``reduction``: "mean" (over pairs; 0 for B = 0), "sum",
    "none" (loss = per_pair).

    Returns ``PreferenceLoss(loss, per_pair, chosen_rewards, rejected_rewards, reward_accuracy)``:
    rewards β·(logp − ref) (β·logp for simpo/orpo), with logp length-averaged wherever the type
    averages (ipo/simpo/orpo with lengths); detached; reward_accuracy the fraction of pairs with
    chosen_rewards > rejected_rewards. fp32 (fp64); differentiable w.r.t. chosen/rejected log-probs.
    """
    op = "preference_loss"
    _checks.floating(op, "chosen_logps", chosen_logps, ndim=1)
    _like(op, "rejected_logps", rejected_logps, chosen_logps, "chosen_logps")
    _checks.choice(op, "loss_type", loss_type, PREFERENCE_TYPES)
    _checks.reduction(op, reduction)
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError(f"rlhf_ops.{op}: give both ref_chosen_logps and ref_rejected_logps, or neither")
    for name, t in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
        if t is not None:
            _like(op, name, t, chosen_logps, "chosen_logps")
    beta = _number(op, "beta", beta, low=0.0, low_open=True)
    eps = _number(op, "label_smoothing", label_smoothing, low=0.0)
    if eps >= 0.5:
        raise ValueError(f"rlhf_ops.{op}: label_smoothing must be < 0.5, got {eps}")
    if eps != 0 and loss_type not in SMOOTHED_TYPES:
        raise ValueError(f"rlhf_ops.{op}: label_smoothing applies to {SMOOTHED_TYPES}, not to "
                         f"loss_type={loss_type!r}")
    gamma = _number(op, "gamma", gamma)
    if gamma != 0 and loss_type != "simpo":
        raise ValueError(f"rlhf_ops.{op}: gamma (SimPO's target margin) applies to loss_type='simpo' "
                         f"only, got loss_type={loss_type!r}")
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError(f"rlhf_ops.{op}: give both chosen_lengths and rejected_lengths, or neither")
    if chosen_lengths is not None:
        if loss_type not in LENGTH_TYPES:
            raise ValueError(f"rlhf_ops.{op}: chosen_lengths/rejected_lengths apply to {LENGTH_TYPES}, "
                             f"not to loss_type={loss_type!r}")
        for name, t in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)):
            _checks.tensor(op, name, t, dtypes=_checks.FLOAT_DTYPES + (torch.int64, torch.int32))
            _checks.same_device(op, "chosen_logps", chosen_logps, **{name: t})
            _checks.shape(op, name, t, chosen_logps.shape, "chosen_logps.shape [B]")
            if _backend.debug_checks(t.device) and t.device.type != "meta" and not torch.compiler.is_compiling():
                if t.numel() and not bool((t > 0).all()):
                    raise ValueError(f"rlhf_ops.{op}: {name} must be > 0 (token counts), got "
                                     f"{t[~(t > 0)][0].item()}")

    acc = _acc(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    c, r = chosen_logps.to(acc), rejected_logps.to(acc)
    if loss_type in REFERENCE_FREE or ref_chosen_logps is None:
        c_ref = r_ref = None
    else:
        c_ref, r_ref = ref_chosen_logps.detach().to(acc), ref_rejected_logps.detach().to(acc)
    if chosen_lengths is not None:       # length-averaged log-probs (policy and reference)
        lc, lr = chosen_lengths.detach().to(acc), rejected_lengths.detach().to(acc)
        c, r = c / lc, r / lr
        if c_ref is not None:
            c_ref, r_ref = c_ref / lc, r_ref / lr
    # the implicit rewards: log-ratio to the reference (the log-prob itself without one)
    rc = c if c_ref is None else c - c_ref
    rr = r if r_ref is None else r - r_ref
    if loss_type in ("sigmoid", "simpo"):
        z = beta * (rc - rr) - gamma
        per_pair = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    elif loss_type == "robust":
        z = beta * (rc - rr)
        per_pair = ((1 - eps) * -F.logsigmoid(z) - eps * -F.logsigmoid(-z)) / (1 - 2 * eps)
    elif loss_type == "ipo":
        per_pair = (rc - rr - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        per_pair = torch.relu(1 - beta * (rc - rr))
    else:  # orpo: log odds(p) = log p − log(1 − p)
        log_odds = (c - _log1mexp(c)) - (r - _log1mexp(r))
        per_pair = -beta * F.logsigmoid(log_odds)

    B = per_pair.shape[0]
    loss = {"mean": lambda: per_pair.sum() / max(B, 1), "sum": per_pair.sum, "none": lambda: per_pair}[reduction]()
    with torch.no_grad():
        chosen_rewards, rejected_rewards = beta * rc.detach(), beta * rr.detach()
        reward_accuracy = (chosen_rewards > rejected_rewards).to(acc).sum() / max(B, 1)
    return PreferenceLoss(loss, per_pair, chosen_rewards, rejected_rewards, reward_accuracy)
