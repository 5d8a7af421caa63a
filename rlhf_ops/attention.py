"""Causal / full attention (FlashAttention-2 style on the fused backends). Owned by the attention
issue: the triton and cuda paths are filled in there."""
from __future__ import annotations

import torch
from torch import Tensor

from . import _backend, _checks, reference

OP = "attention"


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, scale: float | None = None,
              backend: str | None = None) -> Tensor:
    _checks.floating(OP, "q", q, ndim=4)
    _checks.floating(OP, "k", k, ndim=4)
    _checks.floating(OP, "v", v, ndim=4)
    _checks.same_device(OP, "q", q, k=k, v=v)
    _checks.same_dtype(OP, "q", q, k=k, v=v)
    be = _backend.resolve(OP, backend, q.device)
    if be == "reference":
        return reference.attention(q, k, v, causal, scale)
    raise NotImplementedError(f"rlhf_ops.attention: backend {be!r} is not implemented yet")
