"""``torch.nn`` modules over the rlhf_ops functional API."""
from __future__ import annotations

import torch
from torch import nn

from .attention import attention as _attention
from .attention import attention_varlen as _attention_varlen
from .cross_entropy import cross_entropy, linear_cross_entropy
from .padding import pad, unpad


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


class CausalSelfAttention(nn.Module):
    """GPT attention block: one fused QKV projection, ``rlhf_ops.attention``, output projection.

    x [B, T, d_model] → [B, T, d_model]. ``n_kv_heads`` < ``n_heads`` gives GQA (MQA at 1): the
    QKV projection then produces n_heads query heads and n_kv_heads key/value heads.

    Padded and packed batches (``forward(x, attention_mask=None, *, cu_seqlens=None,
    max_seqlen=None)``):
      * ``attention_mask`` [B, T] (1 = real token, 0 = padding, on any side): the real tokens are
        packed (``rlhf_ops.unpad``, one host sync), run through ``attention_varlen`` one sequence
        per row, and scattered back; padding positions of the output are 0.
      * packed x [N, d_model] or [1, N, d_model] with ``cu_seqlens`` (int32 [n + 1]) and
        ``max_seqlen`` (int): ``attention_varlen`` directly, output shaped like x.
    Positions are the caller's business (this block has no positional encoding).
    ``cp_group``: dense x holds this rank's zigzag part of every sequence of a context-parallel
    group (``rlhf_ops.attention(cp_group=)``, ring attention).
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int | None = None, bias: bool = True,
                 causal: bool = True, backend: str | None = None):
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        for name, val in (("d_model", d_model), ("n_heads", n_heads), ("n_kv_heads", n_kv_heads)):
            if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
                raise ValueError(f"CausalSelfAttention: {name} must be a positive int, got {val!r}")
        if d_model % n_heads:
            raise ValueError(f"CausalSelfAttention: d_model ({d_model}) must be a multiple of n_heads ({n_heads})")
        if n_heads % n_kv_heads:
            raise ValueError(f"CausalSelfAttention: n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, d_model // n_heads
        self.causal, self.backend = causal, backend
        self.qkv = nn.Linear(d_model, (n_heads + 2 * n_kv_heads) * self.head_dim, bias=bias)
        self.proj = nn.Linear(n_heads * self.head_dim, d_model, bias=bias)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
                cp_group=None) -> torch.Tensor:
        d_model = self.n_heads * self.head_dim
        if cp_group is not None and (attention_mask is not None or cu_seqlens is not None):
            raise ValueError("CausalSelfAttention: cp_group takes dense x [B, T/W, d_model] (this "
                             "rank's zigzag part of every sequence), not attention_mask or cu_seqlens")
        if cu_seqlens is not None or max_seqlen is not None:
            if cu_seqlens is None or max_seqlen is None:
                raise ValueError("CausalSelfAttention: packed input needs both cu_seqlens and max_seqlen")
            if attention_mask is not None:
                raise ValueError("CausalSelfAttention: pass either attention_mask (padded x) or "
                                 "cu_seqlens/max_seqlen (packed x), not both")
            packed = isinstance(x, torch.Tensor) and x.shape[-1:] == (d_model,) and (
                x.dim() == 2 or (x.dim() == 3 and x.shape[0] == 1))
            if not packed:
                got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"CausalSelfAttention: packed x (with cu_seqlens) must have shape "
                                 f"[N, d_model = {d_model}] or [1, N, d_model], got {got}")
            y = self._varlen(x.reshape(-1, d_model), cu_seqlens, max_seqlen)
            return y.view(x.shape)
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != d_model:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"CausalSelfAttention: x must have shape [B, T, d_model = {d_model}], got {got}")
        B, T, _ = x.shape
        if attention_mask is not None:
            x_packed, indices, cu, max_len = unpad(x, attention_mask)
            return pad(self._varlen(x_packed, cu, max_len), indices, B, T)
        D, Hq, Hkv = self.head_dim, self.n_heads, self.n_kv_heads
        q, k, v = self.qkv(x).split([Hq * D, Hkv * D, Hkv * D], dim=-1)
        q = q.view(B, T, Hq, D).transpose(1, 2)
        k = k.view(B, T, Hkv, D).transpose(1, 2)
        v = v.view(B, T, Hkv, D).transpose(1, 2)
        y = _attention(q, k, v, causal=self.causal, backend=self.backend, cp_group=cp_group)
        return self.proj(y.transpose(1, 2).reshape(B, T, Hq * D))

    def _varlen(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        """x [N, d_model] packed → [N, d_model]."""
        N = x.shape[0]
        D, Hq, Hkv = self.head_dim, self.n_heads, self.n_kv_heads
        q, k, v = self.qkv(x).split([Hq * D, Hkv * D, Hkv * D], dim=-1)
        y = _attention_varlen(q.view(N, Hq, D), k.view(N, Hkv, D), v.view(N, Hkv, D), cu_seqlens,
                              cu_seqlens, max_seqlen, max_seqlen, causal=self.causal,
                              backend=self.backend)
        return self.proj(y.reshape(N, Hq * D))


class PairwiseRewardLoss(nn.Module):
    """Module form of ``rlhf_ops.pairwise_reward_loss(rewards [B, K], ranks [B, K])``; ``margin`` is
    subtracted inside σ (−log σ(r_w − r_l − margin)). A per-prompt margin tensor [B] (it changes
    with every batch) is passed to ``forward`` and replaces the constructor's float there."""

    def __init__(self, reduction: str = "mean", margin: float = 0.0, backend: str | None = None):
        super().__init__()
        self.reduction, self.margin, self.backend = reduction, margin, backend

    def forward(self, rewards: torch.Tensor, ranks: torch.Tensor,
                margin: torch.Tensor | float | None = None) -> torch.Tensor:
        from .reward import pairwise_reward_loss
        return pairwise_reward_loss(rewards, ranks, reduction=self.reduction,
                                    margin=self.margin if margin is None else margin,
                                    backend=self.backend)


class KLPenaltyModule(nn.Module):
    """Module form of ``rlhf_ops.kl_penalty``; returns the ``rlhf_ops.KLPenalty`` named tuple (its
    ``entropy`` is differentiable, for an entropy bonus). Named apart from that result type;
    ``rlhf_ops.nn.KLPenalty`` is the same class under its earlier name."""

    def __init__(self, beta: float, estimator: str = "k1", temperature: float = 1.0,
                 backend: str | None = None):
        super().__init__()
        self.beta, self.estimator, self.temperature, self.backend = beta, estimator, temperature, backend

    def forward(self, logits, ref_logits, tokens, mask=None):
        from .kl import kl_penalty
        return kl_penalty(logits, ref_logits, tokens, beta=self.beta, estimator=self.estimator,
                          mask=mask, temperature=self.temperature, backend=self.backend)


KLPenalty = KLPenaltyModule   # the earlier name (it clashed with the result type rlhf_ops.KLPenalty)
