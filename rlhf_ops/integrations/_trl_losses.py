"""TRL's (1.16) GRPO and DPO-family loss options as ``rlhf_ops.policy_loss`` / ``preference_loss``
arguments, and TRL's loss computed through them.

    from rlhf_ops.integrations._trl_losses import grpo_loss, grpo_loss_kwargs, dpo_loss
    kw = grpo_loss_kwargs(grpo_config)      # policy_loss keyword arguments (no tensors)
    loss = grpo_loss(grpo_config, per_token_logps, old_per_token_logps, advantages, completion_mask,
                     sampling_per_token_logps=..., ref_per_token_logps=..., entropies=...,
                     num_items_in_batch=..., gradient_accumulation_steps=..., num_processes=...)

``grpo_loss`` equals ``GRPOTrainer._compute_loss`` on the same tensors (the importance-sampling
ratio of its generation step included), loss and gradients. ``dpo_loss`` / ``cpo_loss`` /
``orpo_loss`` equal the preference terms of DPOTrainer, CPOTrainer and ORPOTrainer. Any TRL option
the library cannot represent raises ``ValueError`` naming it; none is dropped. This module reads
the configs' attributes only (any object with TRL's field names works) and imports nothing from TRL.

Parameter mapping (TRL → rlhf_ops):

| TRL (GRPOConfig) | rlhf_ops.policy_loss |
|---|---|
| loss_type "grpo" / "bnpo" / "dr_grpo" / "dapo" / "cispo" | the same loss_type (dr_grpo: max_len = max_completion_length) |
| importance_sampling_level="sequence" with loss_type "grpo" | loss_type="gspo" |
| epsilon, epsilon_high | clip=(epsilon, epsilon_high or epsilon) |
| cispo's epsilon_high (the cap itself, e.g. 5.0) | clip=(epsilon, epsilon_high − 1) (our cap is 1 + eps_high) |
| delta (two-sided clipping, INTELLECT-2) | dual_clip=delta (equal when delta ≥ 1 + eps_high) |
| beta (with use_bias_correction_kl=False) | beta, kl_estimator="k3", ref_logprobs |
| use_vllm + vllm_importance_sampling_correction | rollout_logprobs = the sampler's log-probs |
| vllm_importance_sampling_mode | is_correction (same four names) |
| vllm_importance_sampling_clip_min / _max | is_cap = clip_max, or (clip_min, clip_max) |
| dapo / cispo normaliser num_items_in_batch / processes · accumulation / steps_per_generation | num_tokens |
| entropy_coef | TRL's bonus: − coef · token mean of the entropy / accumulation steps, added by ``grpo_loss`` |

Refused: loss_type "sapo", "vespo", "luspo"; importance_sampling_level="sequence" with another
loss type or with token-level IS ratios (TRL's gradient broadcasts one sequence term over varying
weights); beta ≠ 0 with use_bias_correction_kl=True (TRL's default: the KL term times the
differentiable ratio); top_entropy_quantile < 1; off_policy_mask_threshold; use_adaptive_entropy;
delta < 1 + eps_high; a cispo cap below 1. NaN sampler log-probs count as "no correction"
(weight 1), as TRL does.

| TRL (DPOConfig / CPOConfig / ORPOConfig) | rlhf_ops.preference_loss |
|---|---|
| DPO loss_type "sigmoid", "hinge", "ipo", "robust" (a list, with loss_weights) | one call per type, summed with the weights |
| DPO "ipo" (divides by the completion lengths) | loss_type="ipo" with chosen_lengths / rejected_lengths |
| DPO label_smoothing | used by "robust" (TRL 1.16's "sigmoid" has no smoothing) |
| CPO loss_type "sigmoid", "hinge", "ipo", "simpo"; simpo_gamma; label_smoothing | reference-free: no ref log-probs; gamma = simpo_gamma; ipo/simpo with lengths |
| ORPO beta (the odds-ratio term; the NLL is the caller's) | loss_type="orpo" with lengths |

Refused: the other DPO loss types, f_divergence_type ≠ "reverse_kl", ld_alpha, use_weighting;
CPO alpha ≠ 0 (AlphaPO).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..losses import policy_loss, preference_loss, sequence_logprobs

GRPO_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo")
IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
DPO_TYPES = ("sigmoid", "hinge", "ipo", "robust")
CPO_TYPES = ("sigmoid", "hinge", "ipo", "simpo")


def _err(msg: str) -> ValueError:
    return ValueError(f"rlhf_ops.integrations.trl: {msg}")


def _get(args, name, default=None):
    return getattr(args, name, default)


# ================================================================================== GRPO ===

def grpo_loss_kwargs(args) -> dict:
    """``policy_loss`` keyword arguments (options only, no tensors) for a TRL ``GRPOConfig`` (or any
    object with its field names). Raises ValueError for an option policy_loss cannot represent."""
    lt = _get(args, "loss_type", "dapo")
    if lt not in GRPO_TYPES:
        raise _err(f"GRPOConfig.loss_type={lt!r} has no rlhf_ops equivalent (supported: {GRPO_TYPES})")
    level = _get(args, "importance_sampling_level", "token")
    if level not in ("token", "sequence"):
        raise _err(f"GRPOConfig.importance_sampling_level={level!r} is not 'token' or 'sequence'")
    use_is = bool(_get(args, "use_vllm", False) and _get(args, "vllm_importance_sampling_correction", True))
    mode = _get(args, "vllm_importance_sampling_mode", "sequence_mask")
    if level == "sequence":
        if lt != "grpo":
            raise _err(f"importance_sampling_level='sequence' with loss_type={lt!r}: TRL sums one sequence "
                       "term over each token, an objective policy_loss does not have (GSPO is loss_type='grpo')")
        if use_is and mode.startswith("token"):
            raise _err("importance_sampling_level='sequence' with token-level vLLM importance sampling "
                       f"({mode!r}): TRL's gradient of the sequence term under per-token weights differs from "
                       "the GSPO-token form policy_loss computes; use a sequence_* mode")
        lt = "gspo"
    eps_lo = float(_get(args, "epsilon", 0.2))
    eps_hi = _get(args, "epsilon_high", None)
    eps_hi = eps_lo if eps_hi is None else float(eps_hi)
    if lt == "cispo":
        if eps_hi < 1:
            raise _err(f"loss_type='cispo' caps the ratio at epsilon_high = {eps_hi} < 1; policy_loss's cap is "
                       "1 + clip[1] ≥ 1 (ScaleRL recommends epsilon_high = 5.0)")
        eps_hi -= 1.0                      # TRL's cap is epsilon_high itself, ours 1 + eps_high
    kw = {"loss_type": lt, "clip": (eps_lo, eps_hi)}
    delta = _get(args, "delta", None)
    if delta is not None and lt != "cispo":   # TRL applies delta to the clipped types only
        if float(delta) < 1 + eps_hi:
            raise _err(f"GRPOConfig.delta = {delta} < 1 + epsilon_high = {1 + eps_hi}: TRL then also caps "
                       "positive-advantage ratios, which dual_clip does not represent")
        kw["dual_clip"] = float(delta)
    if lt == "dr_grpo":
        kw["max_len"] = int(_get(args, "max_completion_length"))
    beta = float(_get(args, "beta", 0.0))
    if beta != 0:
        if _get(args, "use_bias_correction_kl", True):
            raise _err("use_bias_correction_kl=True (TRL's default) multiplies the KL term by the "
                       "differentiable ratio π/π_old; policy_loss's KL term is beta·k3; set "
                       "use_bias_correction_kl=False")
        kw.update(beta=beta, kl_estimator="k3")
    if use_is:
        if mode not in IS_MODES:
            raise _err(f"vllm_importance_sampling_mode={mode!r} is not one of {IS_MODES}")
        lo, hi = _get(args, "vllm_importance_sampling_clip_min"), _get(args, "vllm_importance_sampling_clip_max")
        if lo is None and hi is None and mode.endswith("truncate"):
            raise _err(f"{mode!r} needs vllm_importance_sampling_clip_min or _max")
        hi = math.inf if hi is None else float(hi)
        kw["is_correction"] = mode
        kw["is_cap"] = hi if lo is None or float(lo) <= 0 else (float(lo), hi)
    if float(_get(args, "top_entropy_quantile", 1.0)) < 1.0:
        raise _err("top_entropy_quantile < 1 (the high-entropy token mask) is not represented by policy_loss")
    if _get(args, "off_policy_mask_threshold", None) is not None:
        raise _err("off_policy_mask_threshold (the off-policy sequence mask) is not represented by policy_loss")
    if _get(args, "use_adaptive_entropy", False):
        raise _err("use_adaptive_entropy (a stateful controller of entropy_coef) is not represented")
    return kw


def grpo_loss(args, per_token_logps: Tensor, old_per_token_logps: Tensor | None, advantages: Tensor,
              completion_mask: Tensor, *, sampling_per_token_logps: Tensor | None = None,
              ref_per_token_logps: Tensor | None = None, entropies: Tensor | None = None,
              num_items_in_batch: Tensor | float | None = None, num_processes: int = 1,
              gradient_accumulation_steps: int = 1, training: bool = True) -> Tensor:
    """``GRPOTrainer._compute_loss`` on these tensors ([B, T]; advantages [B] or [B, T];
    completion_mask already multiplied by a tool mask), through ``policy_loss``:
    old_per_token_logps None means on-policy (TRL uses per_token_logps.detach()); the IS weight is
    exp(old − sampling) per TRL's vLLM mode; dapo/cispo divide by TRL's normaliser
    num_items_in_batch / num_processes (· accumulation / steps_per_generation in training);
    grpo/bnpo/dr_grpo by the accumulation steps in training; TRL's entropy bonus (a plain token
    mean, not aggregated as the policy term) is subtracted when entropy_coef ≠ 0."""
    kw = grpo_loss_kwargs(args)
    old = per_token_logps.detach() if old_per_token_logps is None else old_per_token_logps
    if "is_correction" in kw:
        if sampling_per_token_logps is None:
            raise _err("vLLM importance sampling is on: pass sampling_per_token_logps")
        # TRL: a token vLLM could not score (NaN) gets a zero log-ratio (weight 1)
        kw["rollout_logprobs"] = torch.where(torch.isnan(sampling_per_token_logps), old, sampling_per_token_logps)
    if kw.get("beta", 0.0) != 0:
        if ref_per_token_logps is None:
            raise _err("beta ≠ 0: pass ref_per_token_logps")
        kw["ref_logprobs"] = ref_per_token_logps
    accum = gradient_accumulation_steps if training else 1
    if kw["loss_type"] in ("dapo", "cispo"):
        if num_items_in_batch is None:
            raise _err(f"loss_type={kw['loss_type']!r} normalises by num_items_in_batch: pass it")
        n = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=per_token_logps.device).clamp(min=1.0)
        n = n / num_processes
        if training:
            n = n * gradient_accumulation_steps / _get(args, "steps_per_generation", gradient_accumulation_steps)
        kw["num_tokens"] = n
        scale = 1.0
    else:
        scale = 1.0 / accum
    loss = policy_loss(per_token_logps, old, advantages, completion_mask, **kw).loss * scale
    coef = float(_get(args, "entropy_coef", 0.0))
    if coef != 0:
        if entropies is None:
            raise _err("entropy_coef ≠ 0: pass entropies")
        m = completion_mask.to(entropies.dtype)
        loss = loss - coef * (entropies * m).sum() / m.sum().clamp(min=1.0) / accum
    return loss


# =========================================================================== DPO / CPO / ORPO ===

def _lengths(mask: Tensor) -> Tensor:
    return mask.sum(-1).clamp(min=1)


def dpo_loss_kwargs(args) -> list[tuple[dict, float]]:
    """[(preference_loss kwargs, weight)] for a TRL ``DPOConfig``: one entry per loss type (TRL
    sums them with ``loss_weights``). Raises for what preference_loss cannot represent."""
    types = _get(args, "loss_type", ["sigmoid"])
    types = [types] if isinstance(types, str) else list(types)
    weights = _get(args, "loss_weights", None) or [1.0] * len(types)
    if len(weights) != len(types):
        raise _err(f"DPOConfig.loss_weights ({len(weights)}) must match loss_type ({len(types)})")
    if _get(args, "f_divergence_type", "reverse_kl") != "reverse_kl":
        raise _err(f"DPOConfig.f_divergence_type={_get(args, 'f_divergence_type')!r} is not represented "
                   "(reverse_kl only)")
    if _get(args, "ld_alpha", None) is not None:
        raise _err("DPOConfig.ld_alpha (LD-DPO's length-desensitised log-probs) is not represented")
    if _get(args, "use_weighting", False):
        raise _err("DPOConfig.use_weighting (WPO) is not represented")
    out = []
    for t, w in zip(types, weights):
        if t not in DPO_TYPES:
            raise _err(f"DPOConfig.loss_type {t!r} has no rlhf_ops equivalent (supported: {DPO_TYPES})")
        kw = {"loss_type": t, "beta": float(_get(args, "beta", 0.1))}
        if t == "robust":
            kw["label_smoothing"] = float(_get(args, "label_smoothing", 0.0))
        out.append((kw, float(w)))
    return out


def dpo_loss(args, per_token_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
             completion_mask: Tensor) -> Tensor:
    """DPOTrainer's loss. per_token_logps [2B, T − 1] (chosen rows first, zero where the label is
    masked), completion_mask [2B, T] (the unshifted mask; TRL's ipo divides by its row sums);
    ref_*_logps [B]."""
    shift = completion_mask[..., 1:]
    logps = sequence_logprobs(per_token_logps, shift != 0)
    B = logps.shape[0] // 2
    lc, lr = _lengths(completion_mask[:B]), _lengths(completion_mask[B:])
    loss = 0.0
    for kw, w in dpo_loss_kwargs(args):
        ln = dict(chosen_lengths=lc, rejected_lengths=lr) if kw["loss_type"] == "ipo" else {}
        loss = loss + w * preference_loss(logps[:B], logps[B:], ref_chosen_logps, ref_rejected_logps, **kw, **ln).loss
    return loss


def cpo_loss_kwargs(args) -> dict:
    lt = _get(args, "loss_type", "sigmoid")
    if lt not in CPO_TYPES:
        raise _err(f"CPOConfig.loss_type {lt!r} has no rlhf_ops equivalent (supported: {CPO_TYPES})")
    if float(_get(args, "alpha", 0.0)) != 0:
        raise _err("CPOConfig.alpha ≠ 0 (AlphaPO's reward transform) is not represented")
    kw = {"loss_type": lt, "beta": float(_get(args, "beta", 0.1))}
    if lt in ("sigmoid", "simpo"):
        kw["label_smoothing"] = float(_get(args, "label_smoothing", 0.0))
    if lt == "simpo":
        kw["gamma"] = float(_get(args, "simpo_gamma", 0.5))
    return kw


def cpo_loss(args, chosen_logps: Tensor, rejected_logps: Tensor, chosen_lengths: Tensor | None = None,
             rejected_lengths: Tensor | None = None) -> Tensor:
    """CPOTrainer's preference term, mean over pairs (cpo_alpha's NLL is the caller's). Summed
    log-probs [B]; "ipo" and "simpo" take the lengths (TRL averages over tokens for them)."""
    kw = cpo_loss_kwargs(args)
    ln = {}
    if kw["loss_type"] in ("ipo", "simpo"):
        if chosen_lengths is None or rejected_lengths is None:
            raise _err(f"CPO loss_type={kw['loss_type']!r} averages over tokens: pass the lengths")
        ln = dict(chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    return preference_loss(chosen_logps, rejected_logps, **kw, **ln).loss


def orpo_loss(args, chosen_logps: Tensor, rejected_logps: Tensor, chosen_lengths: Tensor,
              rejected_lengths: Tensor) -> Tensor:
    """ORPOTrainer's odds-ratio term, −mean(β·log σ(log odds ratio)) (its NLL is the caller's), from
    summed log-probs [B] and lengths."""
    return preference_loss(chosen_logps, rejected_logps, loss_type="orpo", beta=float(_get(args, "beta", 0.1)),
                           chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths).loss
