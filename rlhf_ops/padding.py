"""Padded batches ↔ packed (varlen) sequences, for ``attention_varlen``.

    x_packed, indices, cu_seqlens, max_seqlen = rlhf_ops.unpad(x, attention_mask)
    ... ops on x_packed [N, ...], attention_varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)
    y = rlhf_ops.pad(y_packed, indices, batch, seqlen)        # [batch, seqlen, ...], zeros at padding

``attention_mask`` [B, T] is what a tokenizer returns: 1 (or True) for a real token, 0 for padding,
on any side (left-padded prompts, right-padded responses, both in one batch, or holes). Row b's real
tokens, in order, become sequence b of the packed batch: ``indices`` [N] int64 are their flat
positions b·T + t, ``cu_seqlens`` int32 [B + 1] the cumulative counts, ``max_seqlen`` the longest row
as a Python int. A row without real tokens is an empty sequence. Positions (RoPE, learned) are the
caller's: compute them before unpadding (e.g. ``attention_mask.cumsum(-1) − 1``) and unpad them too.

Host sync: ``unpad`` reads the row lengths on the host once (the packed size N and ``max_seqlen``
are data-dependent shapes); it is a data-preparation helper, called once per batch, outside the
model's ops. ``pad`` never syncs. Both are differentiable (a gather and a scatter).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _backend


def _mask_arg(op: str, attention_mask, shape) -> Tensor:
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"rlhf_ops.{op}: attention_mask must be a torch.Tensor [B, T], got "
                        f"{type(attention_mask).__name__}")
    if attention_mask.is_floating_point() or attention_mask.is_complex():
        raise TypeError(f"rlhf_ops.{op}: attention_mask must be bool or integer (1 = real token, "
                        f"0 = padding), got {str(attention_mask.dtype).replace('torch.', '')}")
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != tuple(shape):
        raise ValueError(f"rlhf_ops.{op}: attention_mask must have shape [B, T] = x.shape[:2] = "
                         f"{tuple(shape)}, got {tuple(attention_mask.shape)}")
    return attention_mask


def unpad(x: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
    """x [B, T, ...] and attention_mask [B, T] (nonzero = real token) → (x_packed [N, ...],
    indices [N] int64, cu_seqlens [B + 1] int32, max_seqlen int). Syncs with the host once."""
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"rlhf_ops.unpad: x must be a tensor [B, T, ...], got {got}")
    mask = _mask_arg("unpad", attention_mask, x.shape[:2])
    if mask.device != x.device:
        raise ValueError(f"rlhf_ops.unpad: attention_mask is on {mask.device} but x is on {x.device}")
    B, T = mask.shape
    real = (mask != 0).reshape(-1)
    seqlens = real.view(B, T).sum(-1, dtype=torch.int32)
    cu_seqlens = torch.nn.functional.pad(seqlens.cumsum(0, dtype=torch.int32), (1, 0))
    lens = seqlens.cpu()                                 # the one host sync
    n_real = int(lens.sum())
    max_seqlen = int(lens.max()) if B > 0 else 0
    # real tokens first, in their order: a stable sort of (is padding) by flat position
    indices = torch.sort(~real, stable=True).indices[:n_real]
    x_packed = x.reshape((B * T,) + tuple(x.shape[2:]))[indices]
    return x_packed, indices, cu_seqlens, max_seqlen


def pad(x_packed: Tensor, indices: Tensor, batch: int, seqlen: int) -> Tensor:
    """Inverse of ``unpad``: x_packed [N, ...] scattered to flat positions ``indices`` of a zero
    [batch, seqlen, ...] tensor. No host sync (index values are checked eagerly on CPU only)."""
    if not isinstance(x_packed, torch.Tensor) or x_packed.dim() < 1:
        got = tuple(x_packed.shape) if isinstance(x_packed, torch.Tensor) else type(x_packed).__name__
        raise ValueError(f"rlhf_ops.pad: x_packed must be a tensor [N, ...], got {got}")
    if not isinstance(indices, torch.Tensor) or indices.dtype != torch.int64 or indices.dim() != 1:
        got = (f"{str(indices.dtype).replace('torch.', '')} {tuple(indices.shape)}"
               if isinstance(indices, torch.Tensor) else type(indices).__name__)
        raise TypeError(f"rlhf_ops.pad: indices must be an int64 tensor [N] (from unpad), got {got}")
    if indices.shape[0] != x_packed.shape[0]:
        raise ValueError(f"rlhf_ops.pad: indices has {indices.shape[0]} entries but x_packed has "
                         f"{x_packed.shape[0]} rows; they must match")
    if indices.device != x_packed.device:
        raise ValueError(f"rlhf_ops.pad: indices is on {indices.device} but x_packed is on "
                         f"{x_packed.device}")
    for name, val in (("batch", batch), ("seqlen", seqlen)):
        if isinstance(val, bool) or not isinstance(val, (int, torch.SymInt)) or val < 0:
            raise ValueError(f"rlhf_ops.pad: {name} must be an int ≥ 0, got {val!r}")
    if indices.device.type != "meta" and _backend.debug_checks(indices.device) \
            and not torch.compiler.is_compiling() \
            and indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= batch * seqlen):
        raise ValueError(f"rlhf_ops.pad: indices must lie in [0, batch·seqlen = {batch * seqlen}), "
                         f"got values in [{int(indices.min())}, {int(indices.max())}]")
    rest = tuple(x_packed.shape[1:])
    out = x_packed.new_zeros((batch * seqlen,) + rest).index_put((indices,), x_packed)
    return out.view((batch, seqlen) + rest)
