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
"""
import torch
import triton
import triton.language as tl

from ._common import cast_out, row_blocks, to_acc



@triton.jit
def _pivot(base, V, ACC_FP64: tl.constexpr):
    """x_0: the row's first logit when it is finite, else 0 (the label-smoothing sum's offset)."""
    x0 = to_acc(tl.load(base, mask=V > 0, other=0.0), ACC_FP64)
    return tl.where((x0 == x0) & (tl.abs(x0) < float("inf")), x0, 0.0)


@triton.jit
def _ce_partial(x_ptr, stride_x, m_ptr, s_ptr, sx_ptr, V, n_chunks,
                CHUNK: tl.constexpr, BLOCK: tl.constexpr, ACC_FP64: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    base = x_ptr + row.to(tl.int64) * stride_x
    m = to_acc(tl.full((), float("-inf"), tl.float32), ACC_FP64)
    s = to_acc(tl.zeros((), tl.float32), ACC_FP64)
    sx = to_acc(tl.zeros((), tl.float32), ACC_FP64)
    x0 = _pivot(base, V, ACC_FP64)
    for off in range(0, CHUNK, BLOCK):
        cols = chunk * CHUNK + off + tl.arange(0, BLOCK)
        inside = cols < V
        x = to_acc(tl.load(base + cols, mask=inside, other=float("-inf")), ACC_FP64)
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
                V, n_chunks, ignore_index, eps,
                BLOCK_C: tl.constexpr, ACC_FP64: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
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
    xt = to_acc(tl.load(x_ptr + row * stride_x + t, mask=valid & in_range, other=0.0), ACC_FP64)
    eps_a = eps + to_acc(tl.zeros((), tl.float32), ACC_FP64)
    loss = log_s + (1.0 - eps_a) * (shift - xt)
    if eps > 0:
        x0 = _pivot(x_ptr + row * stride_x, V, ACC_FP64)
        loss += eps_a * ((shift - x0) - tl.sum(sx, 0) / (V + to_acc(tl.zeros((), tl.float32), ACC_FP64)))
    loss = tl.where(in_range, loss, float("nan"))
    loss = tl.where(valid, loss, 0.0)
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, shift)                          # lse [2, N], N = the grid's rows
    tl.store(lse_ptr + tl.num_programs(0) + row, log_s)


@triton.jit
def _ce_stats(x_ptr, stride_x, t_ptr, off_ptr, m_ptr, s_ptr, sx_ptr, st_ptr, N, V, n_chunks,
              ignore_index, SMOOTH: tl.constexpr, BLOCK_C: tl.constexpr, ACC_FP64: tl.constexpr):
    """Shard mode: this slice's per-row statistics st [5, N] (see the module docstring)."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    have = c < n_chunks
    m = tl.load(m_ptr + row * n_chunks + c, mask=have, other=float("-inf"))
    s = tl.load(s_ptr + row * n_chunks + c, mask=have, other=0.0)
    big = tl.max(m, 0)
    shift = tl.where(big == float("-inf"), 0.0, big)
    log_s = tl.log(tl.sum(s * tl.exp(m - shift), 0))
    t = tl.load(t_ptr + row) - tl.load(off_ptr)          # the target's column in this slice
    owned = (tl.load(t_ptr + row) != ignore_index) & (t >= 0) & (t < V)
    xt = to_acc(tl.load(x_ptr + row * stride_x + t, mask=owned, other=0.0), ACC_FP64)
    zero = to_acc(tl.zeros((), tl.float32), ACC_FP64)
    ls = zero
    if SMOOTH:
        x0 = _pivot(x_ptr + row * stride_x, V, ACC_FP64)
        sx = tl.load(sx_ptr + row * n_chunks + c, mask=have, other=0.0)
        ls = (V + zero) * (shift - x0) - tl.sum(sx, 0)
    tl.store(st_ptr + row, shift)
    tl.store(st_ptr + N + row, log_s)
    tl.store(st_ptr + 2 * N + row, tl.where(owned, 1.0, 0.0) + zero)
    tl.store(st_ptr + 3 * N + row, tl.where(owned, shift - xt, 0.0))
    tl.store(st_ptr + 4 * N + row, ls)


@triton.jit
def _ce_backward(x_ptr, stride_x, dx_ptr, stride_dx, t_ptr, lse_ptr, g_ptr, stride_g, shard_ptr,
                 V, ignore_index, eps, SHARD: tl.constexpr, BLOCK: tl.constexpr,
                 ACC_FP64: tl.constexpr):
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
    # ∂loss/∂x_j = softmax_j − (1−ε)·[j = t] − ε/V
    eps_a = eps + to_acc(tl.zeros((), tl.float32), ACC_FP64)
    dx = tl.exp((x - shift) - log_s) - tl.where(cols + off == t, 1.0 - eps_a, 0.0) - eps_a / (V_g + to_acc(tl.zeros((), tl.float32), ACC_FP64))
    dx = tl.where(in_range, dx * g, float("nan"))
    dx = tl.where(valid, dx, 0.0)
    tl.store(dx_ptr + row * stride_dx + cols, cast_out(dx, dx_ptr.dtype.element_ty), mask=inside)


def _partials(logits: torch.Tensor, acc: torch.dtype):
    """Per (row, chunk of V) partial statistics of ``_ce_partial``: part [3, N, n_chunks]."""
    N, V = logits.shape
    chunk, block = row_blocks(N, V)
    n_chunks = triton.cdiv(V, chunk)
    part = torch.empty(3, N, n_chunks, dtype=acc, device=logits.device)
    fp64 = acc == torch.float64
    _ce_partial[(N, n_chunks)](logits, logits.stride(0), part[0], part[1], part[2], V, n_chunks,
                               CHUNK=chunk, BLOCK=block, ACC_FP64=fp64)
    return part, n_chunks, fp64


def forward(logits: torch.Tensor, target: torch.Tensor, ignore_index: int, label_smoothing: float):
    """logits [N, V] (unit column stride), target [N] → (loss [N], lse [2, N] = (M, log S)),
    fp32 (fp64 for fp64 logits)."""
    N, V = logits.shape
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    loss = torch.empty(N, dtype=acc, device=logits.device)
    lse = torch.empty(2, N, dtype=acc, device=logits.device)
    if N == 0:
        return loss, lse
    part, n_chunks, fp64 = _partials(logits, acc)
    _ce_combine[(N,)](logits, logits.stride(0), target, part[0], part[1], part[2], loss, lse,
                      V, n_chunks, ignore_index, float(label_smoothing),
                      BLOCK_C=triton.next_power_of_2(n_chunks), ACC_FP64=fp64)
    return loss, lse


def local_stats(logits: torch.Tensor, target: torch.Tensor, offset: torch.Tensor,
                ignore_index: int, smoothing: bool) -> torch.Tensor:
    """Shard mode forward: logits [N, V] = this rank's columns [offset, offset + V) of the
    vocabulary, target [N] global ids, offset int64 [1] on the logits' device → stats [5, N]
    (shift, log S, owned, shift − x_t, Σ(shift − x)) in the accumulation dtype."""
    N, V = logits.shape
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    st = torch.empty(5, N, dtype=acc, device=logits.device)
    if N == 0:
        return st
    if V == 0:  # an empty slice: no mass, no target
        st.zero_()
        st[1] = float("-inf")
        return st
    part, n_chunks, fp64 = _partials(logits, acc)
    _ce_stats[(N,)](logits, logits.stride(0), target, offset, part[0], part[1], part[2], st,
                    N, V, n_chunks, ignore_index, SMOOTH=bool(smoothing),
                    BLOCK_C=triton.next_power_of_2(n_chunks), ACC_FP64=fp64)
    return st


def backward(grad_loss, logits, target, lse, out, ignore_index: int, label_smoothing: float,
             shard=None):
    """Write d loss / d logits [N, V] into ``out`` (which may be ``logits`` itself). ``shard``:
    None, or int64 [2] = (offset, V_g) on the device when ``logits`` is a vocabulary slice and
    ``lse`` the combined (global) one; lse [2, N]."""
    N, V = logits.shape
    if N == 0 or V == 0:
        return out
    lse = lse.contiguous()
    block = min(4096, triton.next_power_of_2(max(V, 16)))
    _ce_backward[(N, triton.cdiv(V, block))](
        logits, logits.stride(0), out, out.stride(0), target, lse, grad_loss, grad_loss.stride(0),
        target if shard is None else shard, V, ignore_index, float(label_smoothing),
        SHARD=shard is not None, BLOCK=block, ACC_FP64=logits.dtype == torch.float64)
    return out
