"""How the op modules lay tensors out for the kernels, one rule each.

* Rows: every row-wise op (cross-entropy, log-probs, the KL penalty) hands its kernels a 2-D
  [N, V] view with unit stride over V (``rows``); a copy is made only when the layout needs one.
* Blocks: the ``hidden @ Wᵀ`` ops (``linear_cross_entropy``, ``linear_token_logprobs`` and their
  vocabulary-parallel forms) never hold all [N, V] logits; they compute them one block at a time,
  a row chunk [rows, V] or a vocabulary slice [N, cols], each at most ``LINEAR_BLOCK_BYTES`` of
  logits in their own dtype (``block_len``).
* Softmax statistics: a row's log-sum-exp is kept as the pair (shift, log Σ exp(x − shift)) — the
  shift is the row's max, or 0 when it has no finite logit — as one tensor [2, N] (row 0 the
  shifts, row 1 the log-sums; ``lse_pair``), never as their sum, whose rounding (ulp(shift)/2)
  every exp(x − lse) of a backward would pay. The vocabulary-parallel statistics of a slice
  (``rlhf_ops.distributed``) start with the same two rows: [k, N].
"""
from __future__ import annotations

import torch
from torch import Tensor

# Bytes of logits (in their own dtype) one block of a hidden @ Wᵀ op holds: a row chunk
# [rows, V] (forward; cross-entropy's backward) or a vocabulary slice [N, cols] (the log-prob
# backward, which needs the whole row's statistics only).
LINEAR_BLOCK_BYTES = 64 << 20


def rows(x: Tensor) -> Tensor:
    """[..., V] → [N, V] with unit stride over V (a copy only when the layout needs one)."""
    x = x.reshape(-1, x.shape[-1])
    return x.contiguous() if x.shape[0] > 0 and x.stride(-1) != 1 else x


def block_len(n_other: int, itemsize: int, total: int) -> int:
    """How many rows (or columns) of ``n_other`` logits of ``itemsize`` bytes each fit in
    ``LINEAR_BLOCK_BYTES``: at least 128 (or ``total``), a multiple of 128 above that (whole
    GEMM tiles), at most ``total``."""
    n = LINEAR_BLOCK_BYTES // max(1, n_other * itemsize)
    n = max(128, n - n % 128)
    return max(1, min(total, n))


def lse_pair(shift: Tensor, log_s: Tensor) -> Tensor:
    """The statistics tensor [2, N] of a row's (shift, log Σ exp(x − shift)), contiguous."""
    return torch.stack([shift, log_s]).contiguous()
