"""Triton attention, FlashAttention-2 style: tiled forward and backward, no T×S matrix in memory.

Notation: q [B, Hq, T, D], k/v [B, Hkv, S, D], G = Hq / Hkv query heads share one k/v head
(GQA; MQA at Hkv = 1), kv head of query head h is h // G: k/v are indexed, never repeated.
Scores s_ij = scale · q_i·k_j. Causal is bottom-right aligned: row i sees key j iff j ≤ i + S − T.

Forward, grid (T / BLOCK_M, Hq, B), one program per query block; it streams key blocks and keeps the
online-softmax state per row in fp32 (fp64 for fp64 inputs), in base 2 (u = s·log2 e):
    m' = max(m, max_j u_ij)           running max
    l' = l·2^(m − m') + Σ_j 2^(u_ij − m')    running sum
    acc' = acc·2^(m − m') + 2^(u − m') · v   rescaled accumulator
    out = acc / l,  and for backward the pair (m, log2 l): lse·log2 e = m + log2 l, kept apart
    because m + log2 l rounded to fp32 costs ulp(m)/2 in every exp2(u − lse) of the backward
    (≈ 0.2 % at scores ~1e4), while u − m is exact for the scores that carry the probability
Key blocks wholly to the right of the diagonal are never visited (loop bound); key blocks wholly
visible run without any mask; only blocks on the diagonal or at the end of S are masked.
A row that sees no key (T > S) gets out = 0 and (m, log2 l) = (+inf, 0): backward's p is 0.

Backward with P recomputed from q, k and (m, log2 l) (p_ij = 2^((u_ij − m_i) − log2 l_i)):
    delta_i = Σ_d dO_id · O_id                       (``_attn_bwd_delta``)
    dV_j = Σ_i p_ij dO_i,   dP_ij = dO_i·v_j,   dS_ij = p_ij (dP_ij − delta_i)
    dK_j = scale · Σ_i dS_ij q_i,   dQ_i = scale · Σ_j dS_ij k_j
``_attn_bwd_dkdv``: one program per (key block, kv head) loops over the G query heads of its group
and over their query blocks, so it owns its dK/dV rows alone. ``_attn_bwd_dq``: one program per
(query block, query head) loops over key blocks. Neither uses atomics, and each output element is
summed in a fixed order: the backward is deterministic (bitwise reproducible for a given config).

Block sizes: one fixed small config under TRITON_INTERPRET=1; on a GPU ``triton.autotune`` over a
short list keyed on (head dim, T, S, causal, precision) and the dtypes.
"""
import os
import struct

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def head_dim_supported(d: int) -> bool:
    return d % 16 == 0 and 16 <= d <= 256


# ---------------------------------------------------------------------------------- helpers ---

@triton.jit
def _exp2(x, FP64: tl.constexpr):
    if FP64:
        y = tl.exp(x * LN2)
    else:
        y = tl.exp2(x)
    return y


@triton.jit
def _log2(x, FP64: tl.constexpr):
    if FP64:
        y = tl.log(x) * LOG2E
    else:
        y = tl.log2(x)
    return y


@triton.jit
def _scale(scale_hi, scale_lo, FP64: tl.constexpr):
    """Float kernel arguments arrive as fp32; fp64 runs get scale back as hi + lo (~48 bits)."""
    if FP64:
        scale = tl.cast(scale_hi, tl.float64) + tl.cast(scale_lo, tl.float64)
    else:
        scale = scale_hi
    return scale


@triton.jit
def _load_tile(base, rows, n_rows, stride_row, cols, n_cols):
    """[len(rows), len(cols)] tile of a row-major matrix (unit column stride), zero outside."""
    ptrs = base + rows[:, None].to(tl.int64) * stride_row + cols[None, :]
    return tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)


@triton.jit
def _load_tile_t(base, rows, n_rows, stride_row, cols, n_cols):
    """Transposed tile: [len(cols), len(rows)]."""
    ptrs = base + rows[None, :].to(tl.int64) * stride_row + cols[:, None]
    return tl.load(ptrs, mask=(rows[None, :] < n_rows) & (cols[:, None] < n_cols), other=0.0)


# ---------------------------------------------------------------------------------- forward ---

@triton.jit
def _fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, rows, lo, hi, T, S, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               MASK: tl.constexpr, CAUSAL: tl.constexpr, FP64: tl.constexpr,
               PREC: tl.constexpr):
    dims = tl.arange(0, BLOCK_D)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        kt = _load_tile_t(k_base, cols, S, stride_ks, dims, HEAD_DIM)            # [D, BN]
        u = tl.dot(q, kt, input_precision=PREC) * qk_scale                      # s·log2 e
        if MASK:
            ok = cols[None, :] < S
            if CAUSAL:
                ok = ok & (cols[None, :] <= rows[:, None] + (S - T))
            u = tl.where(ok, u, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(u, 1))
        if MASK:
            # While a row has seen no key, shift by 0 so that (−inf) − (−inf) never makes a NaN.
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:  # every key of the block is visible: m_new is finite
            shift = m_new
        p = _exp2(u - shift[:, None], FP64)
        alpha = _exp2(m_i - shift, FP64)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_base, cols, S, stride_vs, dims, HEAD_DIM)               # [BN, D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _key_range(start_m, T, S, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key blocks of query block start_m: [0, full) need no mask, [full, hi) do, the rest is skipped.

    Causal (bottom-right): the block sees keys j < (last row) + S − T + 1 at all, and every one of
    its rows sees keys j ≤ (first row) + S − T; whole key blocks inside the latter run unmasked.
    """
    if CAUSAL:
        hi = tl.maximum(tl.minimum(S, (start_m + 1) * BLOCK_M + S - T), 0)
        full = tl.maximum(tl.minimum(S, start_m * BLOCK_M + S - T + 1), 0) // BLOCK_N * BLOCK_N
    else:
        hi = S
        full = S // BLOCK_N * BLOCK_N
    return full, hi


@triton.jit
def _attn_fwd(Q, K, V, O, M2, L2,
              sqb, sqh, sqt, skb, skh, sks, svb, svh, svs, sob, soh, sot,
              H, G, T, S, scale_hi, scale_lo,
              HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr,
              FP64: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # Heaviest causal query blocks (the last ones) start first.
    start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    bh = b * H + h                       # row of lse / delta: [B, Hq, T] contiguous
    hk = h // G
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh, rows, T, sqt, dims, HEAD_DIM)
    k_base = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh
    if FP64:
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float64)
        l_i = tl.zeros([BLOCK_M], tl.float64)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
    m_i = l_i + float("-inf")
    scale = _scale(scale_hi, scale_lo, FP64)
    qk_scale = scale * LOG2E
    full, hi = _key_range(start_m, T, S, CAUSAL, BLOCK_M, BLOCK_N)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_base, v_base, sks, svs, rows, 0, full, T, S,
                               qk_scale, HEAD_DIM, BLOCK_N, BLOCK_D, False, CAUSAL, FP64, PREC)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_base, v_base, sks, svs, rows, full, hi, T, S,
                               qk_scale, HEAD_DIM, BLOCK_N, BLOCK_D, True, CAUSAL, FP64, PREC)
    empty = l_i == 0.0                       # rows that see no key
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    m_out = tl.where(empty, float("inf"), m_i)
    l_out = tl.where(empty, 0.0, _log2(tl.where(empty, 1.0, l_i), FP64))
    o_ptrs = O + b.to(tl.int64) * sob + h.to(tl.int64) * soh + rows[:, None].to(tl.int64) * sot + dims[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(rows[:, None] < T) & (dims[None, :] < HEAD_DIM))
    tl.store(M2 + bh.to(tl.int64) * T + rows, m_out, mask=rows < T)
    tl.store(L2 + bh.to(tl.int64) * T + rows, l_out, mask=rows < T)


# --------------------------------------------------------------------------------- backward ---

@triton.jit
def _attn_bwd_delta(O, DO, DELTA, sob, soh, sot, sdb, sdh, sdt, H, T,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                    FP64: tl.constexpr):
    h = tl.program_id(1)
    b = tl.program_id(2)
    bh = b * H + h                       # row of lse / delta: [B, Hq, T] contiguous
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    o = _load_tile(O + b.to(tl.int64) * sob + h.to(tl.int64) * soh, rows, T, sot, dims, HEAD_DIM)
    do = _load_tile(DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh, rows, T, sdt, dims, HEAD_DIM)
    if FP64:
        delta = tl.sum(o.to(tl.float64) * do.to(tl.float64), 1)
    else:
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * T + rows, delta, mask=rows < T)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, m_base, l_base, delta_base, sqt, sdt, cols, lo, hi,
                T, S, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                MASK: tl.constexpr, CAUSAL: tl.constexpr, FP64: tl.constexpr, PREC: tl.constexpr,
                FWD_ORIENT: tl.constexpr):
    dims = tl.arange(0, BLOCK_D)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        q = _load_tile(q_base, rows, T, sqt, dims, HEAD_DIM)                   # [BM, D]
        do = _load_tile(do_base, rows, T, sdt, dims, HEAD_DIM)                 # [BM, D]
        # Rows past T load q = dO = 0, m = +inf (p = 0) and delta = 0, so they add nothing.
        m2 = tl.load(m_base + rows, mask=rows < T, other=float("inf"))
        l2 = tl.load(l_base + rows, mask=rows < T, other=0.0)
        delta = tl.load(delta_base + rows, mask=rows < T, other=0.0)
        # Transposed tiles [BN, BM]: pᵀ_ji = 2^((u_ij − m_i) − log2 l_i). The interpreter's matmul
        # rounds k·qᵀ and q·kᵀ differently (by an ulp of u, 0.3 % of p at scores ~1e4): there the
        # scores are computed as the forward does.
        if FWD_ORIENT:
            ut = tl.trans(tl.dot(q, tl.trans(k), input_precision=PREC)) * qk_scale
        else:
            ut = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale
        pt = _exp2((ut - m2[None, :]) - l2[None, :], FP64)
        if MASK:  # keys past S (loaded as 0) and, when causal, key j visible to row i iff j ≤ i + S − T
            ok = cols[:, None] < S
            if CAUSAL:
                ok = ok & (cols[:, None] <= rows[None, :] + (S - T))
            pt = tl.where(ok, pt, 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PREC)
        dpt = tl.dot(v, tl.trans(do), input_precision=PREC)                    # dPᵀ = v·dOᵀ
        dst = pt * (dpt - delta[None, :])                                      # dSᵀ
        dk += tl.dot(dst.to(q.dtype), q, input_precision=PREC)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, M2, L2, DELTA, DK, DV,
                   sqb, sqh, sqt, skb, skh, sks, svb, svh, svs, sdb, sdh, sdt,
                   sdkb, sdkh, sdks, sdvb, sdvh, sdvs,
                   HQ, G, T, S, scale_hi, scale_lo,
                   HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr,
                   FP64: tl.constexpr, FWD_ORIENT: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    hk = tl.program_id(1)
    b = tl.program_id(2)
    cols = start_n + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    k = _load_tile(K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh, cols, S, sks, dims, HEAD_DIM)
    v = _load_tile(V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh, cols, S, svs, dims, HEAD_DIM)
    if FP64:
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float64)
    else:
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = dk
    scale = _scale(scale_hi, scale_lo, FP64)
    qk_scale = scale * LOG2E
    if CAUSAL:
        # First row that sees key start_n: i ≥ start_n − (S − T); rows from the first query block
        # at or after start_n + BLOCK_N − 1 − (S − T) see every key of this block.
        lo = tl.maximum(start_n - (S - T), 0) // BLOCK_M * BLOCK_M
        full = tl.maximum(tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - (S - T), 0), BLOCK_M) * BLOCK_M, lo)
    else:
        lo = 0
        full = 0
    # The key block that runs past S masks every query block: its padded keys load as 0, and
    # exp(0 − lse) is no probability.
    full = tl.where(start_n + BLOCK_N > S, T, full)
    mid = tl.minimum(full, T)
    for g in range(G):
        h = hk * G + g
        q_base = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
        do_base = DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh
        row0 = (b.to(tl.int64) * HQ + h) * T
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, M2 + row0, L2 + row0, DELTA + row0, sqt, sdt,
                             cols, lo, mid, T, S, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_D, True, CAUSAL,
                             FP64, PREC, FWD_ORIENT)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, M2 + row0, L2 + row0, DELTA + row0, sqt, sdt,
                             cols, full, T, T, S, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_D, False, CAUSAL,
                             FP64, PREC, FWD_ORIENT)
    dk = dk * scale
    smask = (cols[:, None] < S) & (dims[None, :] < HEAD_DIM)
    dk_ptrs = DK + b.to(tl.int64) * sdkb + hk.to(tl.int64) * sdkh + cols[:, None].to(tl.int64) * sdks + dims[None, :]
    dv_ptrs = DV + b.to(tl.int64) * sdvb + hk.to(tl.int64) * sdvh + cols[:, None].to(tl.int64) * sdvs + dims[None, :]
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=smask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=smask)


@triton.jit
def _dq_inner(dq, q, do, m2, l2, delta, k_base, v_base, sks, svs, rows, lo, hi, T, S, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              MASK: tl.constexpr, CAUSAL: tl.constexpr, FP64: tl.constexpr, PREC: tl.constexpr):
    dims = tl.arange(0, BLOCK_D)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        kt = _load_tile_t(k_base, cols, S, sks, dims, HEAD_DIM)                # [D, BN]
        vt = _load_tile_t(v_base, cols, S, svs, dims, HEAD_DIM)                # [D, BN]
        u = tl.dot(q, kt, input_precision=PREC) * qk_scale
        p = _exp2((u - m2[:, None]) - l2[:, None], FP64)
        if MASK:  # keys past S (loaded as 0) and, when causal, right of the diagonal
            ok = cols[None, :] < S
            if CAUSAL:
                ok = ok & (cols[None, :] <= rows[:, None] + (S - T))
            p = tl.where(ok, p, 0.0)
        dp = tl.dot(do, vt, input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PREC)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, M2, L2, DELTA, DQ,
                 sqb, sqh, sqt, skb, skh, sks, svb, svh, svs, sdb, sdh, sdt, sdqb, sdqh, sdqt,
                 H, G, T, S, scale_hi, scale_lo,
                 HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr,
                 FP64: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    bh = b * H + h                       # row of lse / delta: [B, Hq, T] contiguous
    hk = h // G
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh, rows, T, sqt, dims, HEAD_DIM)
    do = _load_tile(DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh, rows, T, sdt, dims, HEAD_DIM)
    m2 = tl.load(M2 + bh.to(tl.int64) * T + rows, mask=rows < T, other=float("inf"))
    l2 = tl.load(L2 + bh.to(tl.int64) * T + rows, mask=rows < T, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * T + rows, mask=rows < T, other=0.0)
    k_base = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh
    if FP64:
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float64)
    else:
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    scale = _scale(scale_hi, scale_lo, FP64)
    qk_scale = scale * LOG2E
    full, hi = _key_range(start_m, T, S, CAUSAL, BLOCK_M, BLOCK_N)
    dq = _dq_inner(dq, q, do, m2, l2, delta, k_base, v_base, sks, svs, rows, 0, full, T, S, qk_scale,
                   HEAD_DIM, BLOCK_N, BLOCK_D, False, CAUSAL, FP64, PREC)
    dq = _dq_inner(dq, q, do, m2, l2, delta, k_base, v_base, sks, svs, rows, full, hi, T, S, qk_scale,
                   HEAD_DIM, BLOCK_N, BLOCK_D, True, CAUSAL, FP64, PREC)
    dq = dq * scale
    ptrs = DQ + b.to(tl.int64) * sdqb + h.to(tl.int64) * sdqh + rows[:, None].to(tl.int64) * sdqt + dims[None, :]
    tl.store(ptrs, dq.to(DQ.dtype.element_ty), mask=(rows[:, None] < T) & (dims[None, :] < HEAD_DIM))


# ------------------------------------------------------------------------------- autotuning ---

def _cfg(bm, bn, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


# (BLOCK_M, BLOCK_N, warps, stages). Large tiles with 8 warps and 3 stages suit Hopper (H100/H200);
# the smaller ones suit Ampere, head dim 256 and short sequences; the last one of each list is
# the fallback for fp32/fp64 rows of 256 (dots without tensor cores keep operands in shared memory).
_FWD_CONFIGS = [_cfg(128, 64, 4, 3), _cfg(128, 64, 8, 3), _cfg(128, 128, 8, 3), _cfg(128, 32, 4, 3),
                _cfg(64, 64, 4, 3), _cfg(64, 32, 4, 2), _cfg(64, 64, 4, 4), _cfg(32, 16, 4, 1)]
# Backward dK/dV: BLOCK_M is the query block looped over, BLOCK_N the key block a program owns.
_DKDV_CONFIGS = [_cfg(32, 128, 8, 3), _cfg(64, 128, 8, 3), _cfg(64, 64, 4, 3), _cfg(32, 64, 4, 3),
                 _cfg(32, 32, 4, 2), _cfg(16, 64, 4, 2), _cfg(16, 32, 4, 1)]
_DQ_CONFIGS = [_cfg(128, 32, 8, 3), _cfg(128, 64, 8, 3), _cfg(64, 64, 4, 3), _cfg(64, 32, 4, 2),
               _cfg(32, 64, 4, 2), _cfg(32, 16, 4, 1)]
_KEY = ["HEAD_DIM", "T", "S", "CAUSAL", "PREC"]


def _prune(configs, named_args, **kwargs):
    """Drop tiles that cannot fit in shared memory for wide heads / wide dtypes, and large tiles
    for fp32/fp64 dots without tensor cores (PREC "ieee"), which compile slowly and spill."""
    args = {**named_args, **kwargs}
    width = args["Q"].element_size() * args["BLOCK_D"]
    fma = args["PREC"] == "ieee" and args["Q"].element_size() >= 4
    keep = []
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if fma and (bm > 64 or bn > 64):
            continue
        if (bm + 2 * bn) * width <= 96 * 1024 or (bm <= 64 and bn <= 32):
            keep.append(c)
    return keep or [c for c in configs if c.kwargs["BLOCK_M"] <= 64 and c.kwargs["BLOCK_N"] <= 32][-1:]


def _tuned(fn, configs):
    return triton.autotune(configs=configs, key=_KEY,
                           prune_configs_by={"early_config_prune": _prune})(fn)


if not INTERPRET:
    _attn_fwd_tuned = _tuned(_attn_fwd, _FWD_CONFIGS)
    _attn_bwd_dkdv_tuned = _tuned(_attn_bwd_dkdv, _DKDV_CONFIGS)
    _attn_bwd_dq_tuned = _tuned(_attn_bwd_dq, _DQ_CONFIGS)

# The interpreter runs each program in Python: one small fixed config, no autotuning.
_FIXED = {"BLOCK_M": 16, "BLOCK_N": 16}


def _launch(kernel, tuned, grid_fn, *args, **meta):
    if INTERPRET:
        kernel[grid_fn(_FIXED)](*args, **meta, **_FIXED)
    else:
        tuned[grid_fn](*args, **meta)


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not INTERPRET and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _meta(q: torch.Tensor, causal: bool):
    D = q.shape[-1]
    return dict(HEAD_DIM=D, CAUSAL=bool(causal), PREC=_precision(q.dtype),
                FP64=q.dtype == torch.float64, BLOCK_D=max(16, triton.next_power_of_2(D)))


def _empty(shape, dtype, device):
    """Every buffer the launchers hand to a kernel (tests poison them through this hook)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _split(scale: float):
    """scale as two fp32 kernel arguments hi + lo (see ``_scale``)."""
    hi = struct.unpack("f", struct.pack("f", scale))[0]
    return hi, float(scale) - hi


def _strides3(t: torch.Tensor):
    return t.stride(0), t.stride(1), t.stride(2)


# -------------------------------------------------------------------------------- launchers ---

def _causal_only(left, right, softcap):  # TEMPORARY until the window/softcap kernels land
    if left >= 0 or right > 0 or softcap > 0:
        raise NotImplementedError("rlhf_ops.attention: window and softcap on the triton backend are not "
                                  "implemented yet; use backend='reference'")
    return right == 0


def varlen_forward(*args):
    raise NotImplementedError("rlhf_ops.attention_varlen: the triton backend is not implemented yet; "
                              "use backend='reference'")


varlen_backward = varlen_forward


def forward(q, k, v, scale, left, right, softcap):
    return _forward(q, k, v, _causal_only(left, right, softcap), scale)


def backward(dout, q, k, v, out, lse, scale, left, right, softcap):
    return _backward(dout, q, k, v, out, lse, _causal_only(left, right, softcap), scale)


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float):
    """q [B, Hq, T, D], k/v [B, Hkv, S, D], unit stride over D → (out like q, lse [2, B, Hq, T]).

    lse holds (m, log2 l) per row in base 2 (natural lse = (m + log2 l)·ln 2), fp32 (fp64 for
    fp64 inputs); (+inf, 0) for rows that see no key."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = _empty((B, Hq, T, D), dtype=q.dtype, device=q.device)
    lse = _empty((2, B, Hq, T), dtype=acc, device=q.device)
    if B * Hq * T == 0:
        return out, lse
    _launch(_attn_fwd, None if INTERPRET else _attn_fwd_tuned,
            lambda m: (triton.cdiv(T, m["BLOCK_M"]), Hq, B),
            q, k, v, out, lse[0], lse[1], *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(out),
            Hq, Hq // Hkv, T, S, *_split(scale), **_meta(q, causal))
    return out, lse


def _backward(dout, q, k, v, out, lse, causal: bool, scale: float):
    """Gradients (dq like q, dk/dv like k/v) of attention; all inputs unit stride over D."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    dq = _empty((B, Hq, T, D), dtype=q.dtype, device=q.device)
    dk = _empty((B, Hkv, S, D), dtype=k.dtype, device=k.device)
    dv = _empty((B, Hkv, S, D), dtype=v.dtype, device=v.device)
    if B * Hkv * S == 0:
        return dq.zero_(), dk, dv
    if T == 0:  # no query: no gradient flows into k or v
        return dq, dk.zero_(), dv.zero_()
    meta = _meta(q, causal)
    delta = _empty(lse.shape[1:], dtype=lse.dtype, device=lse.device)
    bm = 16 if INTERPRET else 64
    _attn_bwd_delta[(triton.cdiv(T, bm), Hq, B)](
        out, dout, delta, *_strides3(out), *_strides3(dout), Hq, T,
        HEAD_DIM=D, BLOCK_M=bm, BLOCK_D=meta["BLOCK_D"], FP64=meta["FP64"])
    _launch(_attn_bwd_dkdv, None if INTERPRET else _attn_bwd_dkdv_tuned,
            lambda m: (triton.cdiv(S, m["BLOCK_N"]), Hkv, B),
            q, k, v, dout, lse[0], lse[1], delta, dk, dv,
            *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(dout),
            *_strides3(dk), *_strides3(dv), Hq, Hq // Hkv, T, S, *_split(scale), FWD_ORIENT=INTERPRET,
            **meta)
    _launch(_attn_bwd_dq, None if INTERPRET else _attn_bwd_dq_tuned,
            lambda m: (triton.cdiv(T, m["BLOCK_M"]), Hq, B),
            q, k, v, dout, lse[0], lse[1], delta, dq,
            *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(dout), *_strides3(dq),
            Hq, Hq // Hkv, T, S, *_split(scale), **meta)
    return dq, dk, dv
