"""Triton attention, FlashAttention-2 style: tiled forward and backward, no T×S matrix in memory.

One kernel family serves dense and packed (varlen) batches. Notation: a *sequence* is one batch
element (dense: q [B, Hq, T, D], k/v [B, Hkv, S, D]) or one packed sequence (varlen: q [Nq, Hq, D],
k/v [Nk, Hkv, D], sequence b = rows cu_q[b]:cu_q[b+1] of q and cu_k[b]:cu_k[b+1] of k/v). With
``IS_VARLEN`` a program reads its sequence's start and lengths (T, S) from cu_seqlens; dense
sequences start at b·stride with the T, S passed in. Everything after that is shared.
``IS_TREE`` (shared-prefix attention, with ``IS_VARLEN``): the packed segments form a forest in
depth-first pre-order (PARENT[s] < s, −1 for a root); a query of segment s also sees every key of
every ancestor (see "Tree" below).
G = Hq / Hkv query heads share one k/v head (GQA; MQA at Hkv = 1): kv head of query head h is
h // G, k/v are indexed, never repeated.

Scores s_ij = scale · q_i·k_j, optionally soft-capped s → c·tanh(s / c). Visibility, bottom-right
aligned per sequence, with the window (left WL, right WR; causal is WR = 0):
    query i sees key j  iff  −WL ≤ j − i − (S − T) ≤ WR      (HAS_LEFT / HAS_RIGHT: that bound exists)

Forward, grid (⌈T/BLOCK_M⌉, Hq, sequences), one program per query block; it streams key blocks and
keeps the online-softmax state per row in fp32 (fp64 for fp64 inputs), in base 2 (u = s·log2 e):
    m' = max(m, max_j u_ij)           running max
    l' = l·2^(m − m') + Σ_j 2^(u_ij − m')    running sum
    acc' = acc·2^(m − m') + 2^(u − m') · v   rescaled accumulator
    out = acc / l,  and for backward the pair (m, log2 l): lse·log2 e = m + log2 l, kept apart
    because m + log2 l rounded to fp32 costs ulp(m)/2 in every exp2(u − lse) of the backward
    (≈ 0.2 % at scores ~1e4), while u − m is exact for the scores that carry the probability
Key blocks that no row of the block sees are never visited (loop bounds, ``_key_range``); key blocks
that every row sees run without any mask; only the blocks on the window's edges (the causal
diagonal, the left edge of a sliding window) and the block that runs past S are masked.
A row that sees no key gets out = 0 and (m, log2 l) = (+inf, 0): backward's p is 0.
lse layout: dense [2, B, Hq, T], varlen [2, Hq, Nq]; row (b, h, t) sits at b·slb + h·slh + start + t.

Backward with P recomputed from q, k and (m, log2 l) (p_ij = 2^((u_ij − m_i) − log2 l_i)):
    delta_i = Σ_d dO_id · O_id                       (``_attn_bwd_delta``)
    dV_j = Σ_i p_ij dO_i,   dP_ij = dO_i·v_j,   dS_ij = p_ij (dP_ij − delta_i)
    softcap: dS_ij ← dS_ij · (1 − tanh²(s_ij / c))     (d(c·tanh(s/c))/ds)
    dK_j = scale · Σ_i dS_ij q_i,   dQ_i = scale · Σ_j dS_ij k_j
``_attn_bwd_dkdv``: one program per (key block, kv head, sequence) loops over the G query heads of
its group and over the query blocks that see its keys (``_query_range``), so it owns its dK/dV rows
alone. ``_attn_bwd_dq``: one program per (query block, query head, sequence) loops over key blocks.
Neither uses atomics, and each output element is summed in a fixed order: the backward is
deterministic (bitwise reproducible for a given config).

Tree (``IS_TREE``; causal within a segment, T = S = its length). Forward and dQ: a query block
of segment s first walks its ancestors, a = PARENT[s], PARENT[a], … until −1, each a segment that
every row sees whole (one masked loop over its key blocks: row < T, key < its length), then its own
causal key ranges. dK/dV: the queries that see a key of s are s's own (causal) and those of its
descendants — segments s + 1 … e − 1, e the first j > s whose parent is < s (``_tree_end``) — which
pre-order puts right after s's: one query range of T + n_d rows where row i sees key j iff j ≤ i,
the bottom-right window with T' = T + n_d and WR = n_d, so ``_query_range`` and the masks of the
dense/varlen kernel serve it unchanged. No host metadata, no atomics, sums in a fixed order. The
walks stop at a parent ≥ the child (malformed input, refused eagerly on CPU tensors): they end.

Block sizes: one fixed small config under TRITON_INTERPRET=1 (tests run every GPU block shape
through ``launch_config``); on a GPU ``triton.autotune`` over ≤ 5 configs per kernel keyed on
(head dim, T and S rounded up to a power of two ≥ 64 — varlen: of max_seqlen —, window/softcap
flags, precision) and the dtypes, pruned by the shared memory a config needs (``smem_bytes``,
stages included) and by the widest head at which it was measured offline not to spill (the
config tables below).
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
def _split_arg(hi, lo, FP64: tl.constexpr):
    """Float kernel arguments arrive as fp32; fp64 runs get them back as hi + lo (~48 bits)."""
    if FP64:
        x = tl.cast(hi, tl.float64) + tl.cast(lo, tl.float64)
    else:
        x = hi
    return x


# div_rn (IEEE division) calls a slow-path subroutine, whose calling convention spilled registers
# in the attention kernels; a reciprocal refined by a Newton step does not. The interpreter's
# division is already exact and its fma is not fused, so it skips the step.
REFINE_RCP = tl.constexpr(not INTERPRET)
LN2_HI = tl.constexpr(0.693145751953125)      # 15 significant bits: k·LN2_HI is exact for k < 2⁹
LN2_LO = tl.constexpr(1.428606765330187e-06)  # ln 2 − LN2_HI


@triton.jit
def _tanh(x):
    """(tanh x, 1 − tanh² x), fp32 to ≤ 2 ulp (mean 0.26; torch.tanh: ≤ 0.51, mean 0.23), fp64 to
    a few fp64 ulps. fp32 avoids the GPU's approximate instructions that tl.exp / tl.log / "/"
    lower to (ex2.approx, lg2.approx, div.full), which cost the previous Kahan-style formula up to
    6 ulp (mean 0.93) and the softcap output 2–3× eager's error: +, ×, fma, and a reciprocal
    refined by a Newton step. One expm1 serves both forms below (a version with a separate
    polynomial branch, ≤ 1.05 ulp, spilled registers in the attention kernels). a = |x|:
      M = e^{2a} − 1 = (2^k − 1) + 2^k·expm1 r with 2a = k·ln 2 + r, |r| ≤ ln2/2 (Cody–Waite),
          expm1 r by its Taylor series to r⁷ (truncation < 0.05 ulp), 2^k built from its exponent
          bits (k ≤ 126: finite; a = ∞ gives r = ∞, M = ∞, tanh = 1 and derivative 0);
      u = M/2, w = 1/(1 + u) = 1 − tanh a;  tanh a = u − u²·w when u < 1 (tanh < ½: no
      cancellation), else 1 − w;  1 − tanh² a = w·(2 − w), without cancellation. NaN stays NaN."""
    if x.dtype == tl.float64:
        # fp64 (the testing dtype): t = e^(−2a), tanh a = −e/(2 + e) with e = expm1(−2a) =
        # (t − 1)·(−2a)/log t (Kahan), 1 − tanh² a = 4t/(1 + t)²: exact to a few fp64 ulps
        y = -2.0 * tl.abs(x)
        t = tl.exp(y)
        inside = (t > 0.0) & (t < 1.0)       # else t = 1 (tiny |x|: e = y) or t = 0 (e = −1)
        em1 = tl.where(inside, (t - 1.0) * y / tl.log(tl.where(inside, t, 0.5)), tl.where(t == 0.0, -1.0, y))
        th = -em1 / (2.0 + em1)
        one_t = 1.0 + t
        dth = 4.0 * t / (one_t * one_t)
    else:
        z = 2.0 * tl.abs(x)
        k = tl.minimum(tl.floor(z * LOG2E + 0.5), 126.0)
        r = (z - k * LN2_HI) - k * LN2_LO    # z − k·LN2_HI is exact (Sterbenz)
        q = 1.984126984126984e-04           # 1/7!, then 1/6! … 1/2!: e^r − 1 = r + r²·q
        q = q * r + 1.388888888888889e-03
        q = q * r + 8.333333333333333e-03
        q = q * r + 4.166666666666666e-02
        q = q * r + 1.666666666666667e-01
        q = q * r + 0.5
        two_k = ((k.to(tl.int32) + 127) << 23).to(tl.float32, bitcast=True)
        u = 0.5 * ((two_k - 1.0) + two_k * (r + r * r * q))
        d = 1.0 + u
        w = 1.0 / d                          # GPU: div.full (≤ 2 ulp); the interpreter: exact
        if REFINE_RCP:                       # one Newton step with fused multiply-adds: ≤ ½ ulp
            w = tl.fma(w, tl.fma(-d, w, 1.0), w)
        th = tl.where(u < 1.0, u - u * u * w, 1.0 - w)
        dth = w * (2.0 - w)
    th = tl.where(x < 0, -th, th)
    return th, dth


@triton.jit
def _scores(dot, qk_scale, x_scale, cap_log2e, SOFTCAP: tl.constexpr):
    """u = s·log2 e for s = scale·dot, soft-capped (u = c·log2 e·tanh(scale·dot / c)) with SOFTCAP,
    and the tanh derivative 1 − tanh² (1 without SOFTCAP) for the backward."""
    if SOFTCAP:
        th, dth = _tanh(dot * x_scale)
        u = th * cap_log2e
    else:
        u = dot * qk_scale
        dth = u
    return u, dth


@triton.jit
def _visible(r, c, T, S, WL, WR, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Query row r sees key c (broadcast shapes): r < T, c < S and −WL ≤ c − r − (S − T) ≤ WR."""
    ok = (r < T) & (c < S)
    d = c - r - (S - T)                     # key offset from the query's diagonal
    if HAS_RIGHT:
        ok = ok & (d <= WR)
    if HAS_LEFT:
        ok = ok & (d >= -WL)
    return ok


@triton.jit
def _load_tile(base, start, BLOCK: tl.constexpr, n_rows, stride_row, cols, n_cols):
    """[BLOCK, len(cols)] tile of rows start … start + BLOCK − 1 of a row-major matrix (unit column
    stride), zero outside. The row offset is one 64-bit scalar; per element offsets are 32-bit
    (the launchers check BLOCK·stride < 2^31), which saves a register pair per element."""
    rows = tl.arange(0, BLOCK)
    ptrs = base + tl.cast(start, tl.int64) * stride_row + (rows[:, None] * stride_row + cols[None, :])
    return tl.load(ptrs, mask=(start + rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)


@triton.jit
def _sequence(CU_Q, CU_K, b, T, S, IS_VARLEN: tl.constexpr):
    """(first q row, first k row, T, S) of sequence b: from cu_seqlens (varlen) or (0, 0, T, S)."""
    if IS_VARLEN:
        q0 = tl.load(CU_Q + b)
        k0 = tl.load(CU_K + b)
        T = tl.load(CU_Q + b + 1) - q0
        S = tl.load(CU_K + b + 1) - k0
    else:
        q0 = b * 0
        k0 = b * 0
    return q0, k0, T, S


@triton.jit
def _tree_up(PARENT, s):
    """Parent of segment s, or −1 for a root (also for an entry ≥ s, which would not end a walk)."""
    p = tl.load(PARENT + s)
    return tl.where((p >= 0) & (p < s), p, -1)


@triton.jit
def _tree_end(PARENT, s, n_seg):
    """End of segment s's subtree in pre-order: the first j > s with PARENT[j] < s, else n_seg."""
    e = s + 1
    go = e < n_seg
    while go:
        inside = tl.load(PARENT + e) >= s
        e = tl.where(inside, e + 1, e)
        go = inside & (e < n_seg)
    return e


@triton.jit
def _key_range(r0, T, S, WL, WR, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key ranges of the query block with rows r0 … r1 = r0 + BLOCK_M − 1: [lo, a) masked, [a, b)
    unmasked, [b, hi) masked, lo ≤ a ≤ b ≤ hi; keys outside [lo, hi) are skipped.

    Row i sees keys i + S − T − WL ≤ j ≤ i + S − T + WR: the block sees any key in
    [r0 + S − T − WL, r1 + S − T + WR] and every row sees all of [r1 + S − T − WL, r0 + S − T + WR].
    Whole key blocks inside the latter (and inside [0, S)) run unmasked.
    """
    off = S - T
    r1 = r0 + BLOCK_M - 1
    if HAS_RIGHT:
        hi = tl.maximum(tl.minimum(S, r1 + off + WR + 1), 0)
        b = tl.maximum(tl.minimum(S, r0 + off + WR + 1), 0) // BLOCK_N * BLOCK_N
    else:
        hi = S
        b = S // BLOCK_N * BLOCK_N
    if HAS_LEFT:
        lo = tl.maximum(r0 + off - WL, 0) // BLOCK_N * BLOCK_N
        a = tl.minimum(tl.cdiv(tl.maximum(r1 + off - WL, 0), BLOCK_N) * BLOCK_N, hi)
    else:
        lo = hi * 0
        a = lo
    b = tl.maximum(b, a)
    return lo, a, b, hi


@triton.jit
def _query_range(c0, T, S, WL, WR, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query ranges of the key block with keys c0 … c1 = c0 + BLOCK_N − 1 (the mirror of
    ``_key_range``): [lo, a) masked, [a, b) unmasked, [b, hi) masked.

    Key j is seen by rows j − (S − T) − WR ≤ i ≤ j − (S − T) + WL: some key of the block by rows in
    [c0 − off − WR, c1 − off + WL], every key by rows in [c1 − off − WR, c0 − off + WL]. The query
    block that runs past T is masked (its padded rows load q = 0, and 0·∞ would be NaN where a key
    holds ±inf, which a softcap makes a finite score), and so is every query block of the key block
    that runs past S (its padded keys load as 0, and 2^(0 − lse) is no probability).
    """
    off = S - T
    c1 = c0 + BLOCK_N - 1
    if HAS_LEFT:
        hi = tl.maximum(tl.minimum(T, c1 - off + WL + 1), 0)
        b = tl.maximum(tl.minimum(T, c0 - off + WL + 1), 0) // BLOCK_M * BLOCK_M
    else:
        hi = T
        b = T // BLOCK_M * BLOCK_M
    if HAS_RIGHT:
        lo = tl.maximum(c0 - off - WR, 0) // BLOCK_M * BLOCK_M
        a = tl.cdiv(tl.maximum(c1 - off - WR, 0), BLOCK_M) * BLOCK_M
    else:
        lo = T * 0
        a = lo
    a = tl.minimum(a, hi)
    b = tl.minimum(tl.maximum(b, a), hi)
    past = c1 >= S                         # all of [lo, hi) masked
    return lo, tl.where(past, lo, a), tl.where(past, lo, b), hi


# ---------------------------------------------------------------------------------- forward ---

@triton.jit
def _fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, rows, lo, hi, T, S, WL, WR,
               qk_scale, x_scale, cap_log2e,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               MASK: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
               SOFTCAP: tl.constexpr, FP64: tl.constexpr, PREC: tl.constexpr):
    dims = tl.arange(0, BLOCK_D)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, start_n, BLOCK_N, S, stride_ks, dims, HEAD_DIM)     # [BN, D]
        u, _ = _scores(tl.dot(q, tl.trans(k), input_precision=PREC), qk_scale, x_scale, cap_log2e,
                       SOFTCAP)
        if MASK:
            ok = _visible(rows[:, None], cols[None, :], T, S, WL, WR, HAS_LEFT, HAS_RIGHT)
            u = tl.where(ok, u, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(u, 1))
            # While a row has seen no key, shift by 0 so that (−inf) − (−inf) never makes a NaN.
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:  # every key of the block is visible: m_new is finite
            m_new = tl.maximum(m_i, tl.max(u, 1))
            shift = m_new
        p = _exp2(u - shift[:, None], FP64)
        alpha = _exp2(m_i - shift, FP64)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_base, start_n, BLOCK_N, S, stride_vs, dims, HEAD_DIM)     # [BN, D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attn_fwd(Q, K, V, O, M2, L2, CU_Q, CU_K, PARENT,
              sqb, sqh, sqt, skb, skh, sks, svb, svh, svs, sob, soh, sot, slb, slh,
              G, T, S, TB, SB, WL, WR, scale_hi, scale_lo, cap_hi, cap_lo,
              HEAD_DIM: tl.constexpr, IS_VARLEN: tl.constexpr, IS_TREE: tl.constexpr,
              HAS_LEFT: tl.constexpr,
              HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, PREC: tl.constexpr,
              FP64: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # TB, SB: T and S rounded up to a power of two, the autotuning key (unused here).
    # Heaviest causal query blocks (the last ones) start first.
    start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q0, k0, T, S = _sequence(CU_Q, CU_K, b, T, S, IS_VARLEN)
    if start_m * BLOCK_M >= T:           # varlen: a sequence shorter than max_seqlen_q
        return
    hk = h // G
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + q0.to(tl.int64) * sqt,
                   start_m * BLOCK_M, BLOCK_M, T, sqt, dims, HEAD_DIM)
    k_base = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh + k0.to(tl.int64) * sks
    v_base = V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh + k0.to(tl.int64) * svs
    if FP64:
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float64)
        l_i = tl.zeros([BLOCK_M], tl.float64)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
    m_i = l_i + float("-inf")
    scale = _split_arg(scale_hi, scale_lo, FP64)
    cap = _split_arg(cap_hi, cap_lo, FP64)
    qk_scale = scale * LOG2E
    x_scale = scale / cap
    cap_log2e = cap * LOG2E
    if IS_TREE:  # every key of every ancestor (one masked loop: rows < T, keys < its length)
        anc = _tree_up(PARENT, b)
        while anc >= 0:
            a0 = tl.load(CU_K + anc)
            n_a = tl.load(CU_K + anc + 1) - a0
            ka = K + hk.to(tl.int64) * skh + a0.to(tl.int64) * sks
            va = V + hk.to(tl.int64) * svh + a0.to(tl.int64) * svs
            acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, ka, va, sks, svs, rows, n_a * 0, n_a, T, n_a, WL,
                                       WR, qk_scale, x_scale, cap_log2e, HEAD_DIM, BLOCK_N, BLOCK_D,
                                       True, False, False, SOFTCAP, FP64, PREC)
            anc = _tree_up(PARENT, anc)
    lo, a, bb, hi = _key_range(start_m * BLOCK_M, T, S, WL, WR, HAS_LEFT, HAS_RIGHT, BLOCK_M, BLOCK_N)
    if HAS_LEFT:
        acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_base, v_base, sks, svs, rows, lo, a, T, S, WL,
                                   WR, qk_scale, x_scale, cap_log2e, HEAD_DIM, BLOCK_N, BLOCK_D, True,
                                   HAS_LEFT, HAS_RIGHT, SOFTCAP, FP64, PREC)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_base, v_base, sks, svs, rows, a, bb, T, S, WL, WR,
                               qk_scale, x_scale, cap_log2e, HEAD_DIM, BLOCK_N, BLOCK_D, False,
                               HAS_LEFT, HAS_RIGHT, SOFTCAP, FP64, PREC)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_base, v_base, sks, svs, rows, bb, hi, T, S, WL, WR,
                               qk_scale, x_scale, cap_log2e, HEAD_DIM, BLOCK_N, BLOCK_D, True,
                               HAS_LEFT, HAS_RIGHT, SOFTCAP, FP64, PREC)
    empty = l_i == 0.0                       # rows that see no key: 0 (even where a v holds NaN)
    out = tl.where(empty[:, None], 0.0, acc / tl.where(empty, 1.0, l_i)[:, None])
    m_out = tl.where(empty, float("inf"), m_i)
    l_out = tl.where(empty, 0.0, _log2(tl.where(empty, 1.0, l_i), FP64))
    o_ptrs = (O + b.to(tl.int64) * sob + h.to(tl.int64) * soh + q0.to(tl.int64) * sot
              + rows[:, None].to(tl.int64) * sot + dims[None, :])
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(rows[:, None] < T) & (dims[None, :] < HEAD_DIM))
    row0 = b.to(tl.int64) * slb + h.to(tl.int64) * slh + q0
    tl.store(M2 + row0 + rows, m_out, mask=rows < T)
    tl.store(L2 + row0 + rows, l_out, mask=rows < T)


# --------------------------------------------------------------------------------- backward ---

@triton.jit
def _attn_bwd_delta(O, DO, DELTA, sob, soh, sot, sdb, sdh, sdt, H, T,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                    FP64: tl.constexpr):
    """delta [B, H, T] (varlen: B = 1, T = Nq, the [Hq, Nq] layout of its lse rows)."""
    h = tl.program_id(1)
    b = tl.program_id(2)
    bh = b * H + h
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    r0 = tl.program_id(0) * BLOCK_M
    o = _load_tile(O + b.to(tl.int64) * sob + h.to(tl.int64) * soh, r0, BLOCK_M, T, sot, dims, HEAD_DIM)
    do = _load_tile(DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh, r0, BLOCK_M, T, sdt, dims, HEAD_DIM)
    if FP64:
        delta = tl.sum(o.to(tl.float64) * do.to(tl.float64), 1)
    else:
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * T + rows, delta, mask=rows < T)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, m_base, l_base, delta_base, sqt, sdt, cols, lo, hi,
                T, S, WL, WR, qk_scale, x_scale, cap_log2e,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                MASK: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                SOFTCAP: tl.constexpr, FP64: tl.constexpr, PREC: tl.constexpr,
                FWD_ORIENT: tl.constexpr):
    dims = tl.arange(0, BLOCK_D)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        q = _load_tile(q_base, start_m, BLOCK_M, T, sqt, dims, HEAD_DIM)       # [BM, D]
        do = _load_tile(do_base, start_m, BLOCK_M, T, sdt, dims, HEAD_DIM)     # [BM, D]
        # Rows past T load q = dO = 0, m = +inf (p = 0) and delta = 0, so they add nothing.
        m2 = tl.load(m_base + rows, mask=rows < T, other=float("inf"))
        l2 = tl.load(l_base + rows, mask=rows < T, other=0.0)
        delta = tl.load(delta_base + rows, mask=rows < T, other=0.0)
        # Transposed tiles [BN, BM]: pᵀ_ji = 2^((u_ij − m_i) − log2 l_i). The interpreter's matmul
        # rounds k·qᵀ and q·kᵀ differently (by an ulp of u, 0.3 % of p at scores ~1e4): there the
        # scores are computed as the forward does.
        if FWD_ORIENT:
            dot = tl.trans(tl.dot(q, tl.trans(k), input_precision=PREC))
        else:
            dot = tl.dot(k, tl.trans(q), input_precision=PREC)
        ut, dtht = _scores(dot, qk_scale, x_scale, cap_log2e, SOFTCAP)
        pt = _exp2((ut - m2[None, :]) - l2[None, :], FP64)
        if MASK:
            ok = _visible(rows[None, :], cols[:, None], T, S, WL, WR, HAS_LEFT, HAS_RIGHT)
            pt = tl.where(ok, pt, 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PREC)
        dpt = tl.dot(v, tl.trans(do), input_precision=PREC)                    # dPᵀ = v·dOᵀ
        dst = pt * (dpt - delta[None, :])                                      # dSᵀ
        if SOFTCAP:
            dst = dst * dtht
            if MASK:  # a padded row or key can score 0·∞ = NaN, whose tanh' would poison the sum
                dst = tl.where(ok, dst, 0.0)
        dk += tl.dot(dst.to(q.dtype), q, input_precision=PREC)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, M2, L2, DELTA, DK, DV, CU_Q, CU_K, PARENT,
                   sqb, sqh, sqt, skb, skh, sks, svb, svh, svs, sdb, sdh, sdt,
                   sdkb, sdkh, sdks, sdvb, sdvh, sdvs, slb, slh,
                   G, T, S, TB, SB, WL, WR, scale_hi, scale_lo, cap_hi, cap_lo, n_seg,
                   HEAD_DIM: tl.constexpr, IS_VARLEN: tl.constexpr, IS_TREE: tl.constexpr,
                   HAS_LEFT: tl.constexpr,
                   HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, PREC: tl.constexpr,
                   FP64: tl.constexpr, FWD_ORIENT: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    hk = tl.program_id(1)
    b = tl.program_id(2)
    q0, k0, T, S = _sequence(CU_Q, CU_K, b, T, S, IS_VARLEN)
    if start_n >= S:                     # varlen: a sequence shorter than max_seqlen_k
        return
    cols = start_n + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    k_off = b.to(tl.int64) * skb + hk.to(tl.int64) * skh + k0.to(tl.int64) * sks
    v_off = b.to(tl.int64) * svb + hk.to(tl.int64) * svh + k0.to(tl.int64) * svs
    k = _load_tile(K + k_off, start_n, BLOCK_N, S, sks, dims, HEAD_DIM)
    v = _load_tile(V + v_off, start_n, BLOCK_N, S, svs, dims, HEAD_DIM)
    if FP64:
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float64)
    else:
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = dk
    scale = _split_arg(scale_hi, scale_lo, FP64)
    cap = _split_arg(cap_hi, cap_lo, FP64)
    qk_scale = scale * LOG2E
    x_scale = scale / cap
    cap_log2e = cap * LOG2E
    if IS_TREE:
        # Pre-order puts the descendants' n_d queries right after this segment's T: one query
        # range of T + n_d rows in which row i sees key j iff j ≤ i (causal for this segment's
        # rows, every key for the descendants'). That is the bottom-right window with T' = T + n_d
        # rows and right bound WR = n_d (j ≤ i + (S − T') + WR with S = T), so the loop bounds and
        # masks below serve it unchanged.
        n_d = tl.load(CU_Q + _tree_end(PARENT, b, n_seg)) - tl.load(CU_Q + b + 1)
        T = T + n_d
        WR = n_d
    lo, a, bb, hi = _query_range(start_n, T, S, WL, WR, HAS_LEFT, HAS_RIGHT, BLOCK_M, BLOCK_N)
    for g in range(G):
        h = hk * G + g
        q_base = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + q0.to(tl.int64) * sqt
        do_base = DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh + q0.to(tl.int64) * sdt
        row0 = b.to(tl.int64) * slb + h.to(tl.int64) * slh + q0
        if HAS_RIGHT:
            dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, M2 + row0, L2 + row0, DELTA + row0,
                                 sqt, sdt, cols, lo, a, T, S, WL, WR, qk_scale, x_scale, cap_log2e,
                                 HEAD_DIM, BLOCK_M, BLOCK_D, True, HAS_LEFT, HAS_RIGHT, SOFTCAP,
                                 FP64, PREC, FWD_ORIENT)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, M2 + row0, L2 + row0, DELTA + row0,
                             sqt, sdt, cols, a, bb, T, S, WL, WR, qk_scale, x_scale, cap_log2e,
                             HEAD_DIM, BLOCK_M, BLOCK_D, False, HAS_LEFT, HAS_RIGHT, SOFTCAP,
                             FP64, PREC, FWD_ORIENT)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, M2 + row0, L2 + row0, DELTA + row0,
                             sqt, sdt, cols, bb, hi, T, S, WL, WR, qk_scale, x_scale, cap_log2e,
                             HEAD_DIM, BLOCK_M, BLOCK_D, True, HAS_LEFT, HAS_RIGHT, SOFTCAP,
                             FP64, PREC, FWD_ORIENT)
    dk = dk * scale
    smask = (cols[:, None] < S) & (dims[None, :] < HEAD_DIM)
    dk_off = b.to(tl.int64) * sdkb + hk.to(tl.int64) * sdkh + k0.to(tl.int64) * sdks
    dv_off = b.to(tl.int64) * sdvb + hk.to(tl.int64) * sdvh + k0.to(tl.int64) * sdvs
    tl.store(DK + dk_off + cols[:, None].to(tl.int64) * sdks + dims[None, :], dk.to(DK.dtype.element_ty),
             mask=smask)
    tl.store(DV + dv_off + cols[:, None].to(tl.int64) * sdvs + dims[None, :], dv.to(DV.dtype.element_ty),
             mask=smask)


@triton.jit
def _dq_inner(dq, q, do, m2, l2, delta, k_base, v_base, sks, svs, rows, lo, hi, T, S, WL, WR,
              qk_scale, x_scale, cap_log2e,
              HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              MASK: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
              SOFTCAP: tl.constexpr, FP64: tl.constexpr, PREC: tl.constexpr):
    dims = tl.arange(0, BLOCK_D)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, start_n, BLOCK_N, S, sks, dims, HEAD_DIM)       # [BN, D]
        v = _load_tile(v_base, start_n, BLOCK_N, S, svs, dims, HEAD_DIM)       # [BN, D]
        u, dth = _scores(tl.dot(q, tl.trans(k), input_precision=PREC), qk_scale, x_scale, cap_log2e,
                         SOFTCAP)
        p = _exp2((u - m2[:, None]) - l2[:, None], FP64)
        if MASK:
            ok = _visible(rows[:, None], cols[None, :], T, S, WL, WR, HAS_LEFT, HAS_RIGHT)
            p = tl.where(ok, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * dth
            if MASK:  # as in _dkdv_inner: no NaN from a padded key's tanh'
                ds = tl.where(ok, ds, 0.0)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, M2, L2, DELTA, DQ, CU_Q, CU_K, PARENT,
                 sqb, sqh, sqt, skb, skh, sks, svb, svh, svs, sdb, sdh, sdt, sdqb, sdqh, sdqt,
                 slb, slh, G, T, S, TB, SB, WL, WR, scale_hi, scale_lo, cap_hi, cap_lo, n_seg,
                 HEAD_DIM: tl.constexpr, IS_VARLEN: tl.constexpr, IS_TREE: tl.constexpr,
                 HAS_LEFT: tl.constexpr,
                 HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, PREC: tl.constexpr,
                 FP64: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q0, k0, T, S = _sequence(CU_Q, CU_K, b, T, S, IS_VARLEN)
    if start_m * BLOCK_M >= T:
        return
    hk = h // G
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + q0.to(tl.int64) * sqt,
                   start_m * BLOCK_M, BLOCK_M, T, sqt, dims, HEAD_DIM)
    do = _load_tile(DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh + q0.to(tl.int64) * sdt,
                    start_m * BLOCK_M, BLOCK_M, T, sdt, dims, HEAD_DIM)
    row0 = b.to(tl.int64) * slb + h.to(tl.int64) * slh + q0
    m2 = tl.load(M2 + row0 + rows, mask=rows < T, other=float("inf"))
    l2 = tl.load(L2 + row0 + rows, mask=rows < T, other=0.0)
    delta = tl.load(DELTA + row0 + rows, mask=rows < T, other=0.0)
    k_base = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh + k0.to(tl.int64) * sks
    v_base = V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh + k0.to(tl.int64) * svs
    if FP64:
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float64)
    else:
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    scale = _split_arg(scale_hi, scale_lo, FP64)
    cap = _split_arg(cap_hi, cap_lo, FP64)
    qk_scale = scale * LOG2E
    x_scale = scale / cap
    cap_log2e = cap * LOG2E
    if IS_TREE:  # the ancestors, as in the forward
        anc = _tree_up(PARENT, b)
        while anc >= 0:
            a0 = tl.load(CU_K + anc)
            n_a = tl.load(CU_K + anc + 1) - a0
            ka = K + hk.to(tl.int64) * skh + a0.to(tl.int64) * sks
            va = V + hk.to(tl.int64) * svh + a0.to(tl.int64) * svs
            dq = _dq_inner(dq, q, do, m2, l2, delta, ka, va, sks, svs, rows, n_a * 0, n_a, T, n_a, WL, WR,
                           qk_scale, x_scale, cap_log2e, HEAD_DIM, BLOCK_N, BLOCK_D, True, False,
                           False, SOFTCAP, FP64, PREC)
            anc = _tree_up(PARENT, anc)
    lo, a, bb, hi = _key_range(start_m * BLOCK_M, T, S, WL, WR, HAS_LEFT, HAS_RIGHT, BLOCK_M, BLOCK_N)
    if HAS_LEFT:
        dq = _dq_inner(dq, q, do, m2, l2, delta, k_base, v_base, sks, svs, rows, lo, a, T, S, WL, WR,
                       qk_scale, x_scale, cap_log2e, HEAD_DIM, BLOCK_N, BLOCK_D, True, HAS_LEFT,
                       HAS_RIGHT, SOFTCAP, FP64, PREC)
    dq = _dq_inner(dq, q, do, m2, l2, delta, k_base, v_base, sks, svs, rows, a, bb, T, S, WL, WR,
                   qk_scale, x_scale, cap_log2e, HEAD_DIM, BLOCK_N, BLOCK_D, False, HAS_LEFT,
                   HAS_RIGHT, SOFTCAP, FP64, PREC)
    dq = _dq_inner(dq, q, do, m2, l2, delta, k_base, v_base, sks, svs, rows, bb, hi, T, S, WL, WR,
                   qk_scale, x_scale, cap_log2e, HEAD_DIM, BLOCK_N, BLOCK_D, True, HAS_LEFT,
                   HAS_RIGHT, SOFTCAP, FP64, PREC)
    dq = tl.where((m2 == float("inf"))[:, None], 0.0, dq * scale)    # rows that see no key: 0
    ptrs = (DQ + b.to(tl.int64) * sdqb + h.to(tl.int64) * sdqh + q0.to(tl.int64) * sdqt
            + rows[:, None].to(tl.int64) * sdqt + dims[None, :])
    tl.store(ptrs, dq.to(DQ.dtype.element_ty), mask=(rows[:, None] < T) & (dims[None, :] < HEAD_DIM))


@triton.jit
def _nan_outside(X, CU, n_seq, N, stride_r, stride_c, W, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Rows of a packed tensor that lie outside every sequence — before CU[0] or from CU[n_seq] on,
    both clamped into [0, N] as the kernels clamp them — set to NaN (row r, column c < W at
    X + r·stride_r + c·stride_c). Well-formed cu_seqlens cover every row: each program then reads
    two offsets and writes nothing. Malformed ones (refused eagerly for CPU tensors and under
    RLHF_OPS_DEBUG=1; on CUDA tensors only a host sync could see them) give NaN there, never
    unwritten memory or a plausible number: the contract of the CUDA kernels too."""
    r0 = tl.program_id(0) * BLOCK_R
    first = tl.minimum(tl.maximum(tl.load(CU), 0), N)
    last = tl.minimum(tl.maximum(tl.load(CU + n_seq), first), N)
    if (r0 < first) | (r0 + BLOCK_R > last):
        rows = r0 + tl.arange(0, BLOCK_R)
        out = ((rows < first) | (rows >= last)) & (rows < N)
        for c0 in range(0, W, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            ptr = X + rows[:, None].to(tl.int64) * stride_r + cols[None, :].to(tl.int64) * stride_c
            tl.store(ptr, tl.full((BLOCK_R, BLOCK_C), float("nan"), X.dtype.element_ty),
                     mask=out[:, None] & (cols[None, :] < W))


def _fill_outside(x, cu, rows_dim: int):
    """NaN in the rows (along ``rows_dim``) of ``x`` outside every sequence of ``cu``."""
    N = x.shape[rows_dim]
    if x.numel() == 0:
        return x
    cols = [d for d in range(x.dim()) if d != rows_dim]
    W = x.numel() // N
    # the non-row dims of every tensor passed here are contiguous among themselves
    stride_c = min(x.stride(d) for d in cols)
    block_r = 16 if INTERPRET else 64
    _nan_outside[(triton.cdiv(N, block_r),)](x, cu, cu.shape[0] - 1, N, x.stride(rows_dim), stride_c, W,
                                             BLOCK_R=block_r, BLOCK_C=min(256, triton.next_power_of_2(W)))
    return x


# ------------------------------------------------------------------------------- autotuning ---
# One row per config: (BLOCK_M, BLOCK_N, warps, stages, widest BLOCK_D for 16-bit inputs, widest
# BLOCK_D for fp32 inputs), 0 = never for that dtype. The widest BLOCK_D is where the config was
# compiled offline for sm_80 and sm_90 (tests/test_triton_gpu_compile.py, which re-checks every
# row at that width in CI) in the heaviest variant (varlen, two-sided window, softcap) and spilled
# at most SPILL_BUDGET bytes per thread. Measured, not guessed: e.g. fwd 128×64 w8 s3 at D=128 uses
# 198 registers and no spill on sm_90, while 128×64 w4 s3 spills 764 B, 64×64 w4 s3 52 B; dK/dV
# spills above 32×64 w8 at D=64, above 16×64 w4 at D=128 (64×64 w4: 1.5 KB on sm_90); fp32 with
# IEEE dots (no tensor cores) spills 41–50 KB in fwd 32×32 w4 at D=256 and 5.9 KB in dQ 32×16
# w4. Shared memory is checked per launch (``select``) with the real footprint, stages included.
# The last row serves fp32 at every head dim (and fp64, a testing dtype, which runs it only);
# 16-bit inputs always find a row before it.
# dK/dV: BLOCK_M is the query block looped over, BLOCK_N the key block a program owns.
FWD_TABLE = [(128, 64, 8, 3, 128, 0), (128, 32, 8, 2, 128, 0), (64, 32, 4, 2, 256, 0),
             (32, 32, 4, 2, 256, 64), (32, 16, 4, 1, 256, 256)]
DKDV_TABLE = [(32, 64, 8, 1, 64, 0), (32, 32, 4, 2, 64, 0), (16, 64, 4, 1, 128, 0),
              (16, 32, 4, 1, 256, 0), (16, 32, 8, 1, 0, 256)]
DQ_TABLE = [(128, 32, 8, 2, 256, 0), (64, 64, 8, 2, 64, 0), (32, 32, 4, 2, 256, 0),
            (32, 16, 4, 1, 256, 64), (32, 16, 8, 1, 0, 256)]
TABLES = {"fwd": FWD_TABLE, "dkdv": DKDV_TABLE, "dq": DQ_TABLE}
# The tree variant (IS_TREE) audited separately (bf16, fp32 IEEE and TF32): it fits every row's
# limits but one, which spills at D = 256 there (316 B on sm_80, 160 B on sm_90; varlen: 0 / 72 B).
# (kernel, BLOCK_M, BLOCK_N, warps, stages) → widest BLOCK_D for 16-bit inputs with IS_TREE.
TREE_WIDEST_16 = {("fwd", 64, 32, 4, 2): 128}
# bytes of register spill per thread a selectable config may have (in the heaviest variant). 64
# until the softcap path's tanh became accurate (≤ 2 ulp, was 6): at 255 registers that costs up
# to 8 B more in four rows at their widest head dim, softcap only (measured offline: dK/dV 16×32
# w4 at D=256 and 16×64 w4 at D=128 on sm_80 60 → 68 B, 16×64 on sm_90 44 → 64-68 B; fwd 128×64
# w8 s3 at D=128 on sm_80 20 → 68 B, 64×32 w4 s2 at D=256 on sm_90 32 → 72 B); the variants
# without softcap are unchanged. Rejected configs spill 10× and more (764 B, 1.5 KB, 41 KB).
SPILL_BUDGET = 96
SMEM_HEADROOM = 8 * 1024   # scratch Triton adds beyond the tiles (layout conversions, row vectors)
SMEM_LIMIT = 99 * 1024     # per-block limit of the smallest GPU targeted (sm_86/89), if unknown
_KEY = ["HEAD_DIM", "TB", "SB", "IS_VARLEN", "IS_TREE", "HAS_LEFT", "HAS_RIGHT", "SOFTCAP", "PREC"]


def length_bucket(n: int) -> int:
    """Autotuning key for a length: the next power of two, at least 64 (RLHF rollouts change
    length every step; the best config for 1000 or 1024 tokens does not)."""
    return max(64, triton.next_power_of_2(max(int(n), 1)))


def smem_bytes(kernel: str, bm: int, bn: int, stages: int, block_d: int, elem: int) -> int:
    """Shared memory of a config's tiles as Triton lays them out (measured equal on sm_80/sm_90
    up to the row vectors): tiles loaded inside the pipelined loop are buffered ``stages`` times.
    fwd: q [BM, D] once, k and v [BN, D] per stage. dkdv: k, v [BN, D] once, q and dO [BM, D] per
    stage. dq: q, dO [BM, D] once, k and v [BN, D] per stage."""
    once, per_stage = {"fwd": (bm, 2 * bn), "dkdv": (2 * bn, 2 * bm), "dq": (2 * bm, 2 * bn)}[kernel]
    return (once + max(stages, 1) * per_stage) * block_d * elem


def select(kernel: str, block_d: int, elem: int, smem_limit: int, tree: bool = False) -> list:
    """Rows of TABLES[kernel] the autotuner may try for this head width and element size (and
    for the tree variant, ``TREE_WIDEST_16``)."""
    rows = TABLES[kernel]
    if elem > 4:
        return rows[-1:]
    col = 4 if elem == 2 else 5

    def widest(r):
        return min(r[col], TREE_WIDEST_16.get((kernel,) + r[:4], r[col])) if tree and elem == 2 else r[col]
    keep = [r for r in rows if block_d <= widest(r)
            and smem_bytes(kernel, r[0], r[1], r[3], block_d, elem) + SMEM_HEADROOM <= smem_limit]
    return keep or rows[-1:]


def _smem_limit(device) -> int:
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "shared_memory_per_block_optin", SMEM_LIMIT))


def _prune(kernel: str):
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        rows = select(kernel, args["BLOCK_D"], args["Q"].element_size(), _smem_limit(args["Q"].device),
                      bool(args.get("IS_TREE", False)))
        keys = {r[:4] for r in rows}
        return [c for c in configs
                if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in keys]
    return prune


def _tuned(fn, kernel):
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
               for bm, bn, w, st, _, _ in TABLES[kernel]]
    return triton.autotune(configs=configs, key=_KEY,
                           prune_configs_by={"early_config_prune": _prune(kernel)})(fn)


if not INTERPRET:
    _attn_fwd_tuned = _tuned(_attn_fwd, "fwd")
    _attn_bwd_dkdv_tuned = _tuned(_attn_bwd_dkdv, "dkdv")
    _attn_bwd_dq_tuned = _tuned(_attn_bwd_dq, "dq")

# The interpreter runs each program in Python: one small fixed config, no autotuning. Tests set
# ``launch_config`` to run the block shapes a GPU selects, and ``FWD_ORIENT = False`` to run the
# GPU's orientation of the dK/dV scores.
_FIXED = {"BLOCK_M": 16, "BLOCK_N": 16}
launch_config = None   # None, or {"fwd": (BM, BN), "dkdv": (BM, BN), "dq": (BM, BN), "delta": BM}
# dK/dV scores computed as (q·kᵀ)ᵀ like the forward (the interpreter's matmul rounds k·qᵀ
# differently, by an ulp of u), or as k·qᵀ (GPU: no transpose)
FWD_ORIENT = INTERPRET


def _launch(kernel, tuned, name, grid_fn, *args, **meta):
    if INTERPRET or launch_config is not None:
        cfg = dict(_FIXED) if launch_config is None else dict(zip(("BLOCK_M", "BLOCK_N"), launch_config[name]))
        kernel[grid_fn(cfg)](*args, **meta, **cfg)
    else:
        tuned[grid_fn](*args, **meta)


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not INTERPRET and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _split(x: float):
    """x as two fp32 kernel arguments hi + lo (see ``_split_arg``)."""
    hi = struct.unpack("f", struct.pack("f", x))[0]
    return hi, float(x) - hi


def _meta(q: torch.Tensor, left: int, right: int, softcap: float, varlen: bool, tree: bool = False):
    D = q.shape[-1]
    return dict(HEAD_DIM=D, IS_VARLEN=varlen, IS_TREE=tree, HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0,
                SOFTCAP=softcap > 0, PREC=_precision(q.dtype), FP64=q.dtype == torch.float64,
                BLOCK_D=max(16, triton.next_power_of_2(D)))


def _scalars(scale: float, left: int, right: int, softcap: float):
    """WL, WR, scale (hi, lo), cap (hi, lo); cap 1 when off (never read)."""
    return (left, right, *_split(scale), *_split(softcap if softcap > 0 else 1.0))


def _empty(shape, dtype, device):
    """Every buffer the launchers hand to a kernel (tests poison them through this hook)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _s4(t: torch.Tensor):
    """(batch, head, row) strides of a dense [B, H, T, D] tensor."""
    return t.stride(0), t.stride(1), t.stride(2)


def _s3(t: torch.Tensor):
    """(batch, head, row) strides of a packed [N, H, D] tensor: no batch stride."""
    return 0, t.stride(1), t.stride(0)


# -------------------------------------------------------------------------------- launchers ---

_MAX_ROW_STRIDE = 2**31 // 256 - 256    # _load_tile's 32-bit offsets: 256 rows × stride + D


def _check_strides(**tensors):
    for name, t in tensors.items():
        row_stride = t.stride(2) if t.dim() == 4 else t.stride(0)     # [B, H, T, D] or [N, H, D]
        if row_stride > _MAX_ROW_STRIDE and t.numel() > 0:
            raise ValueError(f"rlhf_ops.attention: the triton backend needs {name}'s stride between "
                             f"rows below {_MAX_ROW_STRIDE} elements, got {row_stride} (strides "
                             f"{t.stride()})")


def _fwd(q, k, v, out, lse, cu_q, cu_k, n, T, S, strides, lse_strides, scale, left, right, softcap,
         parent=None):
    _check_strides(q=q, k=k, v=v)
    Hq, Hkv = q.shape[1], k.shape[1]       # [B, H, T, D] or [N, H, D]
    _launch(_attn_fwd, None if INTERPRET else _attn_fwd_tuned, "fwd",
            lambda m: (triton.cdiv(T, m["BLOCK_M"]), Hq, n),
            q, k, v, out, lse[0], lse[1], cu_q, cu_k, parent, *strides(q), *strides(k), *strides(v),
            *strides(out), *lse_strides, Hq // Hkv, T, S, length_bucket(T), length_bucket(S),
            *_scalars(scale, left, right, softcap),
            **_meta(q, left, right, softcap, cu_q is not None, parent is not None))


def forward(q, k, v, scale: float, left: int, right: int, softcap: float):
    """q [B, Hq, T, D], k/v [B, Hkv, S, D], unit stride over D → (out like q, lse [2, B, Hq, T]).

    lse holds (m, log2 l) per row in base 2 (natural lse = (m + log2 l)·ln 2), fp32 (fp64 for
    fp64 inputs); (+inf, 0) for rows that see no key. ``left``/``right``: the window, −1 =
    unbounded (causal is right = 0); ``softcap`` 0 = off."""
    B, Hq, T, D = q.shape
    S = k.shape[2]
    out = _empty((B, Hq, T, D), dtype=q.dtype, device=q.device)
    lse = _empty((2, B, Hq, T), dtype=_acc(q.dtype), device=q.device)
    if B * Hq * T == 0:
        return out, lse
    _fwd(q, k, v, out, lse, None, None, B, T, S, _s4, (Hq * T, T), scale, left, right, softcap)
    return out, lse


def varlen_forward(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float, left: int, right: int,
                   softcap: float):
    """q [Nq, Hq, D], k/v [Nk, Hkv, D], cu_q/cu_k int32 [n + 1] → (out like q, lse [2, Hq, Nq])."""
    Nq, Hq, D = q.shape
    n = cu_q.shape[0] - 1
    out = _empty((Nq, Hq, D), dtype=q.dtype, device=q.device)
    lse = _empty((2, Hq, Nq), dtype=_acc(q.dtype), device=q.device)
    if Nq * Hq * n * max_q > 0:
        _fwd(q, k, v, out, lse, cu_q, cu_k, n, max_q, max_k, _s3, (0, Nq), scale, left, right, softcap)
    # tokens in no sequence (malformed cu_seqlens_q): NaN in out and both lse planes
    return _fill_outside(out, cu_q, 0), _fill_outside(lse, cu_q, 2)


def _bwd(dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, n, T, S, strides, lse_strides, scale,
         left, right, softcap, parent=None):
    varlen = cu_q is not None
    _check_strides(q=q, k=k, v=v, out=out, dout=dout)
    Hq, Hkv = q.shape[1], k.shape[1]
    D = q.shape[-1]
    meta = _meta(q, left, right, softcap, varlen, parent is not None)
    delta = _empty(lse.shape[1:], dtype=lse.dtype, device=lse.device)
    # delta per row, in lse's row layout: dense [B, Hq, T]; varlen [Hq, Nq] (one "batch" of Nq rows)
    B1, T1 = (1, q.shape[0]) if varlen else (q.shape[0], T)
    bm = (launch_config or {}).get("delta", 16 if INTERPRET else 64)
    _attn_bwd_delta[(triton.cdiv(T1, bm), Hq, B1)](
        out, dout, delta, *strides(out), *strides(dout), Hq, T1,
        HEAD_DIM=D, BLOCK_M=bm, BLOCK_D=meta["BLOCK_D"], FP64=meta["FP64"])
    common = (Hq // Hkv, T, S, length_bucket(T), length_bucket(S), *_scalars(scale, left, right, softcap),
              n)
    _launch(_attn_bwd_dkdv, None if INTERPRET else _attn_bwd_dkdv_tuned, "dkdv",
            lambda m: (triton.cdiv(S, m["BLOCK_N"]), Hkv, n),
            q, k, v, dout, lse[0], lse[1], delta, dk, dv, cu_q, cu_k, parent,
            *strides(q), *strides(k), *strides(v), *strides(dout), *strides(dk), *strides(dv),
            *lse_strides, *common, FWD_ORIENT=FWD_ORIENT, **meta)
    _launch(_attn_bwd_dq, None if INTERPRET else _attn_bwd_dq_tuned, "dq",
            lambda m: (triton.cdiv(T, m["BLOCK_M"]), Hq, n),
            q, k, v, dout, lse[0], lse[1], delta, dq, cu_q, cu_k, parent,
            *strides(q), *strides(k), *strides(v), *strides(dout), *strides(dq),
            *lse_strides, *common, **meta)


def backward(dout, q, k, v, out, lse, scale: float, left: int, right: int, softcap: float):
    """Gradients (dq like q, dk/dv like k/v) of ``forward``; all inputs unit stride over D."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    dq = _empty((B, Hq, T, D), dtype=q.dtype, device=q.device)
    dk = _empty((B, Hkv, S, D), dtype=k.dtype, device=k.device)
    dv = _empty((B, Hkv, S, D), dtype=v.dtype, device=v.device)
    if B * Hkv * S == 0:
        return dq.zero_(), dk, dv
    if T == 0:  # no query: no gradient flows into k or v
        return dq, dk.zero_(), dv.zero_()
    _bwd(dout, q, k, v, out, lse, dq, dk, dv, None, None, B, T, S, _s4, (Hq * T, T), scale, left, right,
         softcap)
    return dq, dk, dv


def varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q: int, max_k: int, scale: float,
                    left: int, right: int, softcap: float):
    """Gradients of ``varlen_forward``."""
    Nq, Hq, D = q.shape
    Nk, Hkv = k.shape[0], k.shape[1]
    n = cu_q.shape[0] - 1
    dq = _empty((Nq, Hq, D), dtype=q.dtype, device=q.device)
    dk = _empty((Nk, Hkv, D), dtype=k.dtype, device=k.device)
    dv = _empty((Nk, Hkv, D), dtype=v.dtype, device=v.device)
    if Nq * max_q == 0:  # no query: no gradient flows into k or v
        dk.zero_(), dv.zero_()
    elif Nk * max_k == 0:  # no key: every row output 0
        dq.zero_()
    else:
        _bwd(dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, n, max_q, max_k, _s3, (0, Nq), scale, left,
             right, softcap)
    # tokens in no sequence (malformed cu_seqlens, as the forward): NaN in their dq, dk, dv rows
    return _fill_outside(dq, cu_q, 0), _fill_outside(dk, cu_k, 0), _fill_outside(dv, cu_k, 0)


def tree_forward(q, k, v, cu, parent, max_seqlen: int, scale: float, softcap: float):
    """Shared-prefix attention: q [N, Hq, D], k/v [N, Hkv, D] packed in the segments of cu (int32
    [n + 1]) that form a forest in pre-order (parent int32 [n]); each segment causal, plus every
    key of its ancestors → (out like q, lse [2, Hq, N]). ``max_seqlen`` ≥ every segment's length
    (it sizes the grid)."""
    N, Hq, D = q.shape
    n = parent.shape[0]
    out = _empty((N, Hq, D), dtype=q.dtype, device=q.device)
    lse = _empty((2, Hq, N), dtype=_acc(q.dtype), device=q.device)
    if N * Hq * n * max_seqlen > 0:
        _fwd(q, k, v, out, lse, cu, cu, n, max_seqlen, max_seqlen, _s3, (0, N), scale, -1, 0, softcap,
             parent=parent)
    # tokens in no segment (malformed cu_seqlens): NaN, as the varlen op
    return _fill_outside(out, cu, 0), _fill_outside(lse, cu, 2)


def tree_backward(dout, q, k, v, out, lse, cu, parent, max_seqlen: int, scale: float, softcap: float):
    """Gradients of ``tree_forward`` (dq like q, dk/dv like k/v)."""
    N, Hq, D = q.shape
    Hkv, n = k.shape[1], parent.shape[0]
    dq = _empty((N, Hq, D), dtype=q.dtype, device=q.device)
    dk = _empty((N, Hkv, D), dtype=k.dtype, device=k.device)
    dv = _empty((N, Hkv, D), dtype=v.dtype, device=v.device)
    if N * n * max_seqlen > 0:
        _bwd(dout, q, k, v, out, lse, dq, dk, dv, cu, cu, n, max_seqlen, max_seqlen, _s3, (0, N), scale,
             -1, 0, softcap, parent=parent)
    return _fill_outside(dq, cu, 0), _fill_outside(dk, cu, 0), _fill_outside(dv, cu, 0)
