"""Pairwise reward-model loss over K ranked responses. Owned by the reward-loss issue."""
from __future__ import annotations

import torch
from torch import Tensor

from . import _backend, _checks, reference

OP = "pairwise_reward_loss"


def pairwise_reward_loss(rewards: Tensor, ranks: Tensor, *, reduction: str = "mean",
                         backend: str | None = None) -> Tensor:
    _checks.floating(OP, "rewards", rewards, ndim=2)
    _checks.index(OP, "ranks", ranks, ndim=2)
    _checks.reduction(OP, reduction)
    be = _backend.resolve(OP, backend, rewards.device)
    if be == "reference":
        return reference.pairwise_reward_loss(rewards, ranks, reduction)
    raise NotImplementedError(f"rlhf_ops.pairwise_reward_loss: backend {be!r} is not implemented yet")


def reward_at_last_token(hidden: Tensor, last_index: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """hidden [N, T, d], last_index [N] int64 → rewards [N] = hidden[n, last_index[n]] · weight + bias."""
    h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_index]
    return torch.nn.functional.linear(h, weight.reshape(1, -1), bias).squeeze(-1)
