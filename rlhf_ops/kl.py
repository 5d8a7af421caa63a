"""Per-token log-probabilities and the PPO KL penalty. Owned by the KL issue."""
from __future__ import annotations

import torch
from torch import Tensor

from . import _backend, _checks, reference
from .reference import KLPenalty


def token_logprobs(logits: Tensor, tokens: Tensor, *, temperature: float = 1.0,
                   backend: str | None = None) -> Tensor:
    op = "token_logprobs"
    _checks.floating(op, "logits", logits, min_ndim=1)
    _checks.index(op, "tokens", tokens)
    be = _backend.resolve(op, backend, logits.device)
    if be == "reference":
        return reference.token_logprobs(logits, tokens, temperature)
    raise NotImplementedError(f"rlhf_ops.token_logprobs: backend {be!r} is not implemented yet")


def kl_penalty(logits: Tensor, ref_logits: Tensor, tokens: Tensor, *, beta: float, estimator: str = "k1",
               mask: Tensor | None = None, temperature: float = 1.0, backend: str | None = None) -> KLPenalty:
    op = "kl_penalty"
    _checks.floating(op, "logits", logits, min_ndim=1)
    _checks.index(op, "tokens", tokens)
    be = _backend.resolve(op, backend, logits.device)
    if be == "reference":
        return reference.kl_penalty(logits, ref_logits, tokens, beta, estimator, mask, temperature)
    raise NotImplementedError(f"rlhf_ops.kl_penalty: backend {be!r} is not implemented yet")


def ppo_rewards(penalty: Tensor, scores: Tensor, mask: Tensor) -> Tensor:
    """Per-token PPO reward: ``penalty`` plus ``scores`` at each row's last real token."""
    return reference.ppo_rewards(penalty, scores, mask)
