"""Triton generalised advantage estimation: one program per sequence, one reverse scan.

Per sequence (a row of a dense [B, T] batch, or a segment [cu[b], cu[b+1]) of a packed [N] one),
with m_t the mask, walking from the last position to the first and carrying (V', A') = the value
and advantage of the nearest *unmasked* position after t (0, 0 past the end):

    unmasked t:  δ_t = r_t + γ·V' − V_t,   A_t = δ_t + γλ·A',   R_t = A_t + V_t,   (V', A') ← (V_t, A_t)
    masked t:    A_t = R_t = 0,  (V', A') unchanged  (the recursion skips it; r_t, V_t never read)

For one contiguous run of unmasked tokens this is δ_t = r_t + γ·V_{t+1}·m_{t+1} − V_t,
A_t = δ_t + γλ·m_{t+1}·A_{t+1}; with several runs (multi-turn: tool tokens masked) V and A are
carried across the masked gap (verl's rule).

No loop over single positions: the sequence is cut into blocks of BLOCK positions, taken from
the end. Inside a block both carries are affine maps of the carry entering the block, x ↦ a·x + b
(unmasked: V' ↦ V_t is (0, V_t), A' ↦ δ_t + γλ·A' is (γλ, δ_t); masked: the identity (1, 0)), and
``tl.associative_scan`` composes them (lane j = position hi − 1 − j, so the scan runs backwards in
time). V' of position t is the V-scan *exclusive* of t: it is read off the scan of the elements
shifted by one (position t + 1, a second load of V and m that hits the cache). Math in fp32
(fp64 for fp64 inputs); the launcher hands in rewards and values already in that dtype.
"""
import struct

import torch
import triton
import triton.language as tl

BLOCK = 1024   # positions per scan step


@triton.jit
def _compose(a1, b1, a2, b2):
    """(a1, b1) applied first, then (a2, b2): x ↦ a2·(a1·x + b1) + b2. A constant map (a2 = 0)
    gives exactly b2 whatever came before (no 0·inf)."""
    return a1 * a2, tl.where(a2 == 0, b2, a2 * b1 + b2)


@triton.jit
def _apply(a, b, x):
    return tl.where(a == 0, b, a * x + b)


@triton.jit
def _gae_kernel(r_ptr, v_ptr, m_ptr, cu_ptr, adv_ptr, ret_ptr, T, g_hi, g_lo, l_hi, l_lo,
                PACKED: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    if PACKED:
        start = tl.load(cu_ptr + b).to(tl.int64)
        end = tl.load(cu_ptr + b + 1).to(tl.int64)
    else:
        start = b * T
        end = start + T
    j = tl.arange(0, BLOCK)
    zero = tl.load(v_ptr + j, mask=j < 0, other=0.0) * 0       # 0 of the accumulation dtype
    v_carry = tl.sum(zero, 0)   # V' and A' entering the block: nearest unmasked after it
    a_carry = tl.sum(zero, 0)
    gamma = (v_carry + g_hi) + g_lo    # γ and λ arrive as fp32 hi + lo: exact in fp64 math too
    gl = gamma * ((v_carry + l_hi) + l_lo)
    for k in range(0, tl.cdiv(end - start, BLOCK)):
        hi = end - k * BLOCK
        t = hi - 1 - j                     # lane j: the j-th position counted from the block's end
        inb = t >= start
        m = tl.load(m_ptr + t, mask=inb, other=0) != 0
        r = tl.load(r_ptr + t, mask=m, other=0.0)
        v = tl.load(v_ptr + t, mask=m, other=0.0)
        # V' of t inside the block: scan over the positions t + 1 .. hi − 1 (lanes < j)
        nxt = j > 0
        m_n = tl.load(m_ptr + t + 1, mask=nxt, other=0) != 0
        v_n = tl.load(v_ptr + t + 1, mask=m_n, other=0.0)
        sa, sb = tl.associative_scan((tl.where(m_n, 0.0, 1.0).to(zero.dtype), tl.where(m_n, v_n, zero)),
                                     0, _compose)
        v_next = _apply(sa, sb, v_carry)
        delta = r + gamma * v_next - v
        pa, pb = tl.associative_scan((tl.where(m, gl, 1.0).to(zero.dtype), tl.where(m, delta, zero)),
                                     0, _compose)
        a = _apply(pa, pb, a_carry)        # A' after t (= A_t where unmasked)
        tl.store(adv_ptr + t, tl.where(m, a, zero), mask=inb)
        tl.store(ret_ptr + t, tl.where(m, a + v, zero), mask=inb)
        # carries out of the block: the state after its earliest lane (lanes before start are
        # masked, i.e. the identity)
        last = j == BLOCK - 1
        a_carry = tl.sum(tl.where(last, a, zero), 0)
        v_carry = tl.sum(tl.where(last, tl.where(m, v, v_next), zero), 0)


def _split(x: float):
    """x as fp32 hi + lo (Triton's float arguments are fp32): hi + lo holds x to ~1e-15."""
    hi = struct.unpack("f", struct.pack("f", x))[0]
    return hi, float(x) - hi


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, cu_seqlens, gamma: float,
        lam: float, block: int | None = None):
    """rewards, values: [B, T] or packed [N] (contiguous, fp32 or fp64: the accumulation dtype);
    mask uint8 of the same shape; cu_seqlens int32 [B + 1] for the packed layout, else None →
    (advantages, returns) like rewards. ``block``: positions per scan step (a power of two; default
    BLOCK, or less for short sequences)."""
    adv = torch.empty_like(rewards)
    ret = torch.empty_like(rewards)
    packed = cu_seqlens is not None
    n_seq = cu_seqlens.shape[0] - 1 if packed else rewards.shape[0]
    T = 0 if packed else rewards.shape[1]
    if n_seq == 0 or rewards.numel() == 0:
        return adv.zero_(), ret.zero_()   # nothing to scan (packed tokens outside every sequence: none)
    if packed:   # tokens outside every sequence (an invalid cu_seqlens on CUDA) stay NaN
        adv.fill_(float("nan"))
        ret.fill_(float("nan"))
    _gae_kernel[(n_seq,)](rewards, values, mask, cu_seqlens if packed else mask, adv, ret, T,
                          *_split(gamma), *_split(lam), PACKED=packed,
                          BLOCK=block or max(16, min(BLOCK, triton.next_power_of_2(rewards.shape[-1]))),
                          num_warps=4)
    return adv, ret
