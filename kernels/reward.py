"""Triton pairwise reward-model loss: one program per prompt, loss and gradient in one pass.

For prompt b with rewards r [K] and ranks k [K] (0 = best, < 0 = absent response), the pairs
are the ordered (i, j) with 0 <= k_i < k_j ("i beats j"), n = their count, m the margin (one
float for every prompt, or margins[b] from a per-prompt tensor),
d_ij = r_i − r_j − m for a pair, and

    loss_b       = 1/n · Σ_pairs softplus(−d_ij)            (= −log σ(d_ij), 0 when n = 0)
    ∂loss_b/∂r_i = 1/n · ( Σ_{j beats i} σ(−d_ji) − Σ_{i beats j} σ(−d_ij) )

(∂ softplus(−d)/∂d = −σ(−d): the winner of a pair gets −σ(−d), the loser +σ(−d)).
Numerics, with e = exp(−|d|) in (0, 1]:
    softplus(−d) = max(−d, 0) + log1p(e),   σ(−d) = e/(1+e) if d >= 0 else 1/(1+e),
so nothing overflows for rewards of any size. Rewards of absent responses are never read
(they may hold NaN). fp32 math for fp16/bf16/fp32 rewards, fp64 for fp64.

Two kernels, same outputs (loss [B], npairs [B] int64, grad [B, K]):
  * ``_pairwise_small`` (K <= MAX_SMALL_K): loads the K rewards and ranks once and builds the
    whole K×K pair matrix in registers; the winner terms are its row sums, the loser terms its
    column sums.
  * ``_pairwise_tiled`` (larger K): loops over TILE×TILE blocks of the pair matrix. A first,
    ranks-only pass counts n; the second gives each row tile its own gradient from both roles
    (+σ(−d_ji) where j beats i, −σ(−d_ij) where i beats j), so nothing is accumulated in memory.
"""
import struct

import torch
import triton
import triton.language as tl

from ._common import to_acc

MAX_SMALL_K = 64   # largest K on the single-tile path
TILE = 32          # tile of the pair matrix on the large-K path


@triton.jit
def _log1p(e):
    # log(1 + e) accurate also for tiny e: with u = fl(1 + e), log1p(e) = log(u) · e / (u − 1)
    # (the rounding error of u cancels in the ratio); u == 1 means e is below the precision.
    u = 1.0 + e
    return tl.where(u == 1.0, e, tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def _pair_terms(d):
    """softplus(−d) = −log σ(d) and σ(−d) for a tile of margins d = r_win − r_lose − m."""
    e = tl.exp(-tl.abs(d))
    inv = 1.0 / (1.0 + e)
    softplus_neg = tl.maximum(-d, 0.0) + _log1p(e)
    sig_neg = tl.where(d >= 0, e * inv, inv)
    return softplus_neg, sig_neg


@triton.jit
def _load_prompt(r_ptr, rank_ptr, base, idx, K, ACC_FP64: tl.constexpr):
    """Ranks (−1 past K) and rewards (0 where absent, so an absent NaN never enters)."""
    rank = tl.load(rank_ptr + base + idx, mask=idx < K, other=-1)
    r = to_acc(tl.load(r_ptr + base + idx, mask=rank >= 0, other=0.0), ACC_FP64)
    return rank, r


@triton.jit
def _margin(mg_ptr, b, m_hi, m_lo, HAS_MG: tl.constexpr, ACC_FP64: tl.constexpr):
    """Prompt b's margin in the accumulation dtype: margins[b] (already in that dtype), or the
    scalar m_hi + m_lo (exact in fp64; m_hi alone in fp32)."""
    if HAS_MG:
        m = to_acc(tl.load(mg_ptr + b), ACC_FP64)
    else:
        m = (to_acc(tl.zeros((), tl.float32), ACC_FP64) + m_hi) + m_lo
    return m


@triton.jit
def _pairwise_small(r_ptr, rank_ptr, loss_ptr, npairs_ptr, grad_ptr, mg_ptr, K, m_hi, m_lo,
                    BLOCK_K: tl.constexpr, HAS_MG: tl.constexpr, ACC_FP64: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    base = b * K
    idx = tl.arange(0, BLOCK_K)
    rank, r = _load_prompt(r_ptr, rank_ptr, base, idx, K, ACC_FP64)
    m = _margin(mg_ptr, b, m_hi, m_lo, HAS_MG, ACC_FP64)
    # Pair matrix: row i = winner candidate, column j = loser candidate.
    better = (rank[:, None] >= 0) & (rank[:, None] < rank[None, :])
    softplus_neg, sig_neg = _pair_terms(r[:, None] - r[None, :] - m)
    n = tl.sum(tl.sum(better.to(tl.int64), 1), 0)
    inv_n = 1.0 / tl.maximum(n, 1).to(r.dtype)
    loss = tl.sum(tl.sum(tl.where(better, softplus_neg, 0.0), 1), 0) * inv_n
    w = tl.where(better, sig_neg, 0.0)           # σ(−d_ij) on every pair
    grad = (tl.sum(w, 0) - tl.sum(w, 1)) * inv_n  # + as loser (column) − as winner (row)
    tl.store(loss_ptr + b, loss)
    tl.store(npairs_ptr + b, n)
    tl.store(grad_ptr + base + idx, grad, mask=idx < K)


@triton.jit
def _pairwise_tiled(r_ptr, rank_ptr, loss_ptr, npairs_ptr, grad_ptr, mg_ptr, K, m_hi, m_lo,
                    TILE: tl.constexpr, HAS_MG: tl.constexpr, ACC_FP64: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    base = b * K
    m = _margin(mg_ptr, b, m_hi, m_lo, HAS_MG, ACC_FP64)
    t = tl.arange(0, TILE)
    # Pass 1, ranks only: n = number of pairs.
    n = tl.zeros((), tl.int64)
    for i0 in range(0, K, TILE):
        rank_i = tl.load(rank_ptr + base + i0 + t, mask=i0 + t < K, other=-1)
        for j0 in range(0, K, TILE):
            rank_j = tl.load(rank_ptr + base + j0 + t, mask=j0 + t < K, other=-1)
            better = (rank_i[:, None] >= 0) & (rank_i[:, None] < rank_j[None, :])
            n += tl.sum(tl.sum(better.to(tl.int64), 1), 0)
    inv_n = 1.0 / to_acc(tl.maximum(n, 1), ACC_FP64)
    # Pass 2: the loss over the pairs each row wins, the gradient of each row from both roles.
    loss = to_acc(tl.zeros((), tl.float32), ACC_FP64)
    for i0 in range(0, K, TILE):
        rank_i, r_i = _load_prompt(r_ptr, rank_ptr, base, i0 + t, K, ACC_FP64)
        g = to_acc(tl.zeros((TILE,), tl.float32), ACC_FP64)
        for j0 in range(0, K, TILE):
            rank_j, r_j = _load_prompt(r_ptr, rank_ptr, base, j0 + t, K, ACC_FP64)
            wins = (rank_i[:, None] >= 0) & (rank_i[:, None] < rank_j[None, :])
            loses = (rank_j[None, :] >= 0) & (rank_j[None, :] < rank_i[:, None])
            # One evaluation per element: d of the pair (i, j) if i wins, of (j, i) if j wins.
            diff = r_i[:, None] - r_j[None, :]
            softplus_neg, sig_neg = _pair_terms(tl.where(wins, diff, -diff) - m)
            loss += tl.sum(tl.sum(tl.where(wins, softplus_neg, 0.0), 1), 0)
            g += tl.sum(tl.where(loses, sig_neg, 0.0) - tl.where(wins, sig_neg, 0.0), 1)
        tl.store(grad_ptr + base + i0 + t, g * inv_n, mask=i0 + t < K)
    tl.store(loss_ptr + b, loss * inv_n)
    tl.store(npairs_ptr + b, n)


def launch(rewards: torch.Tensor, ranks: torch.Tensor, margin: float, loss: torch.Tensor,
           npairs: torch.Tensor, grad: torch.Tensor, margins: torch.Tensor | None = None) -> None:
    """Write loss [B], npairs [B] (int64) and grad [B, K] (acc dtype) for contiguous inputs;
    ``margins`` [B] (contiguous, in the accumulation dtype) replaces ``margin`` when given."""
    B, K = rewards.shape
    if B == 0:
        return
    fp64 = loss.dtype == torch.float64
    # Float kernel arguments are fp32: the margin travels as fp32 m_hi + m_lo, which holds
    # it to about 1e-15, as fp64 math needs.
    m_hi = struct.unpack("f", struct.pack("f", margin))[0]
    m_lo = float(margin) - m_hi
    has_mg = margins is not None
    mg = margins if has_mg else loss   # never read without margins
    if K <= MAX_SMALL_K:
        block = max(triton.next_power_of_2(max(K, 1)), 16)
        warps = 1 if block <= 16 else (2 if block <= 32 else 4)
        _pairwise_small[(B,)](rewards, ranks, loss, npairs, grad, mg, K, m_hi, m_lo,
                              BLOCK_K=block, HAS_MG=has_mg, ACC_FP64=fp64, num_warps=warps)
    else:
        _pairwise_tiled[(B,)](rewards, ranks, loss, npairs, grad, mg, K, m_hi, m_lo,
                              TILE=TILE, HAS_MG=has_mg, ACC_FP64=fp64, num_warps=4)


def forward(rewards: torch.Tensor, ranks: torch.Tensor, margin: float = 0.0,
            margins: torch.Tensor | None = None):
    """rewards [B, K] float, ranks [B, K] int64, margin a float or margins [B] (accumulation
    dtype) → (loss [B], npairs [B] int64, grad [B, K])."""
    rewards, ranks = rewards.contiguous(), ranks.contiguous()
    B, K = rewards.shape
    acc = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    loss = torch.empty(B, dtype=acc, device=rewards.device)
    npairs = torch.empty(B, dtype=torch.int64, device=rewards.device)
    grad = torch.empty(B, K, dtype=acc, device=rewards.device)
    launch(rewards, ranks, margin, loss, npairs, grad,
           None if margins is None else margins.to(acc).contiguous())
    return loss, npairs, grad
