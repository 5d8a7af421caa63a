"""``torch.nn`` modules over the rlhf_ops functional API."""
from __future__ import annotations

import torch
from torch import nn

from . import attention as _attention_mod
from .cross_entropy import cross_entropy, linear_cross_entropy


class CrossEntropyLoss(nn.Module):
    """Mirror of ``torch.nn.CrossEntropyLoss`` (no class weights) on rlhf_ops.cross_entropy."""

    def __init__(self, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                 backend: str | None = None, inplace_backward: bool = False):
        super().__init__()
        self.ignore_index, self.reduction, self.label_smoothing = ignore_index, reduction, label_smoothing
        self.backend, self.inplace_backward = backend, inplace_backward

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cross_entropy(logits, target, ignore_index=self.ignore_index, reduction=self.reduction,
                             label_smoothing=self.label_smoothing, backend=self.backend,
                             inplace_backward=self.inplace_backward)

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, label_smoothing={self.label_smoothing}"


class LinearCrossEntropyLoss(nn.Module):
    """loss(hidden, weight, target) = cross_entropy(hidden @ weight.T + bias, target), fused."""

    def __init__(self, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                 backend: str | None = None):
        super().__init__()
        self.ignore_index, self.reduction, self.label_smoothing = ignore_index, reduction, label_smoothing
        self.backend = backend

    def forward(self, hidden, weight, target, bias=None):
        return linear_cross_entropy(hidden, weight, target, bias=bias, ignore_index=self.ignore_index,
                                    reduction=self.reduction, label_smoothing=self.label_smoothing,
                                    backend=self.backend)
