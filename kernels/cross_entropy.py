"""Triton softmax cross-entropy: online-softmax forward, one-pass backward.

Forward, two launches and no host sync:
  1. ``_ce_partial``: grid (rows, chunks). Each program streams its chunk of the row in BLOCK
     tiles and keeps the online-softmax state (m, s) with s = Σ exp(x − m):
         m' = max(m, max(tile)),  s' = s·exp(m − m') + Σ exp(tile − m')
     plus Σ (x − x_0) for label smoothing (x_0 = the row's first logit if finite, else 0: a sum of
     V raw fp32 logits near 1e4 would lose ulp(V·1e4) ≫ eager's error). Rows up to CHUNK wide use one program; wider rows
     (vocabularies above 65,536 or few rows) are split over several programs.
  2. ``_ce_combine``: one program per row merges the chunk states,
         lse = M + log S,  S = Σ_c s_c·exp(m_c − M),
     reads the target logit and writes
         loss = lse − (1−ε)·x_t − ε·Σx/V = log S + (1−ε)·(M − x_t) + ε·(M − x_0 − Σ(x − x_0)/V)
     (0 when ignored, NaN when the target is out of range) and lse as the pair (M, log S), [2, N]:
     in fp32, M + log S rounded would cost ulp(M)/2 (5e-4 at |x| ~ 1e4) in every exp(x − lse)
     of the backward, while x − M is exact for the logits that carry the probability.
Backward, one launch, grid (rows, V / BLOCK):
     dx_j = g · (exp((x_j − M) − log S) − (1−ε)·[j = t] − ε/V)
written in the logits dtype, into a new tensor or over the logits (in-place mode).

Vocabulary-parallel (shard) mode: the logits are this rank's slice [o, o + V) of a V_g-wide
vocabulary and targets hold global ids; o and V_g come in a small int64 device tensor (no host
sync). ``local_stats`` runs ``_ce_partial`` and then ``_ce_stats``, which writes per row the
statistics that ``rlhf_ops.distributed`` combines across ranks, [5, N]:
     shift = M (0 when the slice is all −inf),  log S,  owned = [o ≤ t < o + V],
     shift − x_t (0 when not owned),  Σ_j (shift − x_j) = V·(shift − x_0) − Σ(x − x_0)
A target outside the slice is neither an error nor a one-hot here: it belongs to another rank.
``backward`` with ``shard`` = (o, V_g) reads the combined (global) lse and places the one-hot at
column t − o; ε/V uses V_g, and a target outside [0, V_g) gives NaN, as unsharded.

Logit softcap (SOFTCAP, c > 0; Gemma-2's final_logit_softcapping): every logit the kernels read
becomes x ← c·tanh(x/c) as it is loaded (``_math.softcap``: −inf stays −inf), so everything above
holds for the capped logits, the label-smoothing pivot and target logit included; the backward
multiplies by the derivative, dx_j = g·(softmax_j − (1−ε)·[j = t] − ε/V)·(1 − tanh²(x_j/c)).
c, 1/c and ε arrive as fp32 pairs hi + lo (``_math.split``), exact enough for fp64 runs.
"""
import torch
import triton
import triton.language as tl

from ._common import cast_out, row_blocks, to_acc
from ._math import joined, softcap, split


@triton.jit
def _cap(x, c, ic, SOFTCAP: tl.constexpr):
    """x, soft-capped with SOFTCAP (c·tanh(x/c); −inf stays −inf)."""
    if SOFTCAP:
        x, _ = softcap(x, c, ic)
    return x


@triton.jit
def _pivot(base, V, c, ic, SOFTCAP: tl.constexpr, ACC_FP64: tl.constexpr):
    """x_0: the row's first (capped) logit when it is finite, else 0 (the label-smoothing sum's
    offset)."""
    x0 = _cap(to_acc(tl.load(base, mask=V > 0, other=0.0), ACC_FP64), c, ic, SOFTCAP)
    return tl.where((x0 == x0) & (tl.abs(x0) < float("inf")), x0, 0.0)


@triton.jit
def _ce_partial(x_ptr, stride_x, m_ptr, s_ptr, sx_ptr, V, n_chunks, c_hi, c_lo, ic_hi, ic_lo,
                CHUNK: tl.constexpr, BLOCK: tl.constexpr, SOFTCAP: tl.constexpr,
                ACC_FP64: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    base = x_ptr + row.to(tl.int64) * stride_x
    cap = joined(c_hi, c_lo, ACC_FP64)
    icap = joined(ic_hi, ic_lo, ACC_FP64)
    m = to_acc(tl.full((), float("-inf"), tl.float32), ACC_FP64)
    s = to_acc(tl.zeros((), tl.float32), ACC_FP64)
    sx = to_acc(tl.zeros((), tl.float32), ACC_FP64)
    x0 = _pivot(base, V, cap, icap, SOFTCAP, ACC_FP64)
    for off in range(0, CHUNK, BLOCK):
        cols = chunk * CHUNK + off + tl.arange(0, BLOCK)
        inside = cols < V
        x = _cap(to_acc(tl.load(base + cols, mask=inside, other=float("-inf")), ACC_FP64), cap, icap,
                 SOFTCAP)
        m_new = tl.maximum(m, tl.max(x, 0))
        # While every value seen is −inf, shift by 0 so that (−inf) − (−inf) never makes a NaN.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), 0)
        m = m_new
        sx += tl.sum(tl.where(inside, x - x0, 0.0), 0)
    i = row.to(tl.int64) * n_chunks + chunk
    tl.store(m_ptr + i, m)
    tl.store(s_ptr + i, s)
    tl.store(sx_ptr + i, sx)


@triton.jit
def _ce_combine(x_ptr, stride_x, t_ptr, m_ptr, s_ptr, sx_ptr, loss_ptr, lse_ptr,
                V, n_chunks, ignore_index, eps_hi, eps_lo, c_hi, c_lo, ic_hi, ic_lo,
                BLOCK_C: tl.constexpr, SOFTCAP: tl.constexpr, ACC_FP64: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cap = joined(c_hi, c_lo, ACC_FP64)
    icap = joined(ic_hi, ic_lo, ACC_FP64)
    c = tl.arange(0, BLOCK_C)
    have = c < n_chunks
    m = tl.load(m_ptr + row * n_chunks + c, mask=have, other=float("-inf"))
    s = tl.load(s_ptr + row * n_chunks + c, mask=have, other=0.0)
    sx = tl.load(sx_ptr + row * n_chunks + c, mask=have, other=0.0)
    big = tl.max(m, 0)
    shift = tl.where(big == float("-inf"), 0.0, big)
    log_s = tl.log(tl.sum(s * tl.exp(m - shift), 0))
    t = tl.load(t_ptr + row)
    valid = t != ignore_index
    in_range = (t >= 0) & (t < V)
    xt = _cap(to_acc(tl.load(x_ptr + row * stride_x + t, mask=valid & in_range, other=0.0), ACC_FP64),
              cap, icap, SOFTCAP)
    eps_a = joined(eps_hi, eps_lo, ACC_FP64)
    loss = log_s + (1.0 - eps_a) * (shift - xt)
    if eps_hi > 0:
        x0 = _pivot(x_ptr + row * stride_x, V, cap, icap, SOFTCAP, ACC_FP64)
        loss += eps_a * ((shift - x0) - tl.sum(sx, 0) / (V + to_acc(tl.zeros((), tl.float32), ACC_FP64)))
    loss = tl.where(in_range, loss, float("nan"))
    loss = tl.where(valid, loss, 0.0)
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, shift)                          # lse [2, N], N = the grid's rows
    tl.store(lse_ptr + tl.num_programs(0) + row, log_s)


@triton.jit
def _ce_stats(x_ptr, stride_x, t_ptr, off_ptr, m_ptr, s_ptr, sx_ptr, st_ptr, N, V, n_chunks,
              ignore_index, c_hi, c_lo, ic_hi, ic_lo, SMOOTH: tl.constexpr, BLOCK_C: tl.constexpr,
              SOFTCAP: tl.constexpr, ACC_FP64: tl.constexpr):
    """Shard mode: this slice's per-row statistics st [5, N] (see the module docstring)."""
    row = tl.program_id(0).to(tl.int64)
    cap = joined(c_hi, c_lo, ACC_FP64)
    icap = joined(ic_hi, ic_lo, ACC_FP64)
    c = tl.arange(0, BLOCK_C)
    have = c < n_chunks
    m = tl.load(m_ptr + row * n_chunks + c, mask=have, other=float("-inf"))
    s = tl.load(s_ptr + row * n_chunks + c, mask=have, other=0.0)
    big = tl.max(m, 0)
    shift = tl.where(big == float("-inf"), 0.0, big)
    log_s = tl.log(tl.sum(s * tl.exp(m - shift), 0))
    t = tl.load(t_ptr + row) - tl.load(off_ptr)          # the target's column in this slice
    owned = (tl.load(t_ptr + row) != ignore_index) & (t >= 0) & (t < V)
    xt = _cap(to_acc(tl.load(x_ptr + row * stride_x + t, mask=owned, other=0.0), ACC_FP64), cap, icap,
              SOFTCAP)
    zero = to_acc(tl.zeros((), tl.float32), ACC_FP64)
    ls = zero
    if SMOOTH:
        x0 = _pivot(x_ptr + row * stride_x, V, cap, icap, SOFTCAP, ACC_FP64)
        sx = tl.load(sx_ptr + row * n_chunks + c, mask=have, other=0.0)
        ls = (V + zero) * (shift - x0) - tl.sum(sx, 0)
    tl.store(st_ptr + row, shift)
    tl.store(st_ptr + N + row, log_s)
    tl.store(st_ptr + 2 * N + row, tl.where(owned, 1.0, 0.0) + zero)
    tl.store(st_ptr + 3 * N + row, tl.where(owned, shift - xt, 0.0))
    tl.store(st_ptr + 4 * N + row, ls)


@triton.jit
def _ce_backward(x_ptr, stride_x, dx_ptr, stride_dx, t_ptr, lse_ptr, g_ptr, stride_g, shard_ptr,
                 V, ignore_index, eps_hi, eps_lo, c_hi, c_lo, ic_hi, ic_lo, SHARD: tl.constexpr,
                 BLOCK: tl.constexpr, SOFTCAP: tl.constexpr, ACC_FP64: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < V
    t = tl.load(t_ptr + row)
    valid = t != ignore_index
    if SHARD:  # the slice holds global ids [off, off + V) of a V_g-wide vocabulary
        off = tl.load(shard_ptr)
        V_g = tl.load(shard_ptr + 1)
    else:
        off = 0
        V_g = V
    in_range = (t >= 0) & (t < V_g)
    shift = tl.load(lse_ptr + row)                          # lse [2, N], N = the grid's rows
    log_s = tl.load(lse_ptr + tl.num_programs(0) + row)
    g = to_acc(tl.load(g_ptr + row * stride_g), ACC_FP64)
    x = to_acc(tl.load(x_ptr + row * stride_x + cols, mask=inside, other=float("-inf")), ACC_FP64)
    if SOFTCAP:  # x ← c·tanh(x/c); the chain rule's 1 − tanh² multiplies g
        x, dcap = softcap(x, joined(c_hi, c_lo, ACC_FP64), joined(ic_hi, ic_lo, ACC_FP64))
        g = g * dcap
    # ∂loss/∂x_j = softmax_j − (1−ε)·[j = t] − ε/V
    eps_a = joined(eps_hi, eps_lo, ACC_FP64)
    dx = tl.exp((x - shift) - log_s) - tl.where(cols + off == t, 1.0 - eps_a, 0.0) - eps_a / (V_g + to_acc(tl.zeros((), tl.float32), ACC_FP64))
    dx = tl.where(in_range, dx * g, float("nan"))
    dx = tl.where(valid, dx, 0.0)
    tl.store(dx_ptr + row * stride_dx + cols, cast_out(dx, dx_ptr.dtype.element_ty), mask=inside)


def _cap_args(softcap: float):
    """(c_hi, c_lo, 1/c hi, 1/c lo) and SOFTCAP for a softcap c (0 = off: 1s, never read)."""
    c = float(softcap) if softcap > 0 else 1.0
    return (*split(c), *split(1.0 / c)), dict(SOFTCAP=softcap > 0)


def _partials(logits: torch.Tensor, acc: torch.dtype, softcap: float):
    """Per (row, chunk of V) partial statistics of ``_ce_partial``: part [3, N, n_chunks]."""
    N, V = logits.shape
    chunk, block = row_blocks(N, V)
    n_chunks = triton.cdiv(V, chunk)
    part = torch.empty(3, N, n_chunks, dtype=acc, device=logits.device)
    fp64 = acc == torch.float64
    cap, cap_meta = _cap_args(softcap)
    _ce_partial[(N, n_chunks)](logits, logits.stride(0), part[0], part[1], part[2], V, n_chunks, *cap,
                               CHUNK=chunk, BLOCK=block, ACC_FP64=fp64, **cap_meta)
    return part, n_chunks, fp64


def forward(logits: torch.Tensor, target: torch.Tensor, ignore_index: int, label_smoothing: float,
            softcap: float = 0.0):
    """logits [N, V] (unit column stride), target [N] → (loss [N], lse [2, N] = (M, log S)),
    fp32 (fp64 for fp64 logits); ``softcap`` > 0 caps the logits first (0 = off)."""
    N, V = logits.shape
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    loss = torch.empty(N, dtype=acc, device=logits.device)
    lse = torch.empty(2, N, dtype=acc, device=logits.device)
    if N == 0:
        return loss, lse
    part, n_chunks, fp64 = _partials(logits, acc, softcap)
    cap, cap_meta = _cap_args(softcap)
    _ce_combine[(N,)](logits, logits.stride(0), target, part[0], part[1], part[2], loss, lse,
                      V, n_chunks, ignore_index, *split(label_smoothing), *cap,
                      BLOCK_C=triton.next_power_of_2(n_chunks), ACC_FP64=fp64, **cap_meta)
    return loss, lse


def local_stats(logits: torch.Tensor, target: torch.Tensor, offset: torch.Tensor,
                ignore_index: int, smoothing: bool, softcap: float = 0.0) -> torch.Tensor:
    """Shard mode forward: logits [N, V] = this rank's columns [offset, offset + V) of the
    vocabulary, target [N] global ids, offset int64 [1] on the logits' device → stats [5, N]
    (shift, log S, owned, shift − x_t, Σ(shift − x)) in the accumulation dtype, of the capped
    logits when ``softcap`` > 0."""
    N, V = logits.shape
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    st = torch.empty(5, N, dtype=acc, device=logits.device)
    if N == 0:
        return st
    if V == 0:  # an empty slice: no mass, no target
        st.zero_()
        st[1] = float("-inf")
        return st
    part, n_chunks, fp64 = _partials(logits, acc, softcap)
    cap, cap_meta = _cap_args(softcap)
    _ce_stats[(N,)](logits, logits.stride(0), target, offset, part[0], part[1], part[2], st,
                    N, V, n_chunks, ignore_index, *cap, SMOOTH=bool(smoothing),
                    BLOCK_C=triton.next_power_of_2(n_chunks), ACC_FP64=fp64, **cap_meta)
    return st


def backward(grad_loss, logits, target, lse, out, ignore_index: int, label_smoothing: float,
             shard=None, softcap: float = 0.0):
    """Write d loss / d logits [N, V] into ``out`` (which may be ``logits`` itself). ``shard``:
    None, or int64 [2] = (offset, V_g) on the device when ``logits`` is a vocabulary slice and
    ``lse`` the combined (global) one; lse [2, N]. ``softcap``: as the forward's."""
    N, V = logits.shape
    if N == 0 or V == 0:
        return out
    lse = lse.contiguous()
    block = min(4096, triton.next_power_of_2(max(V, 16)))
    cap, cap_meta = _cap_args(softcap)
    _ce_backward[(N, triton.cdiv(V, block))](
        logits, logits.stride(0), out, out.stride(0), target, lse, grad_loss, grad_loss.stride(0),
        target if shard is None else shard, V, ignore_index, *split(label_smoothing), *cap,
        SHARD=shard is not None, BLOCK=block, ACC_FP64=logits.dtype == torch.float64, **cap_meta)
    return out
