"""Batch-invariant Triton kernels for torch's matmuls, softmaxes and reductions over a dimension.

``rlhf_ops.batch_invariant(aten=True)`` routes aten's mm / addmm / bmm (and so matmul and
linear), _softmax / _log_softmax and their backward, and sum / mean over dimensions through
these kernels. What makes them batch-invariant: every output element is computed by one program
alone, in an order of operations fixed by the sizes it reduces over and by the dtype — never by
the number of rows M, the batch, an autotuner or the number of SMs.

Matmul, C[b] = alpha·A[b]·B[b] + beta·bias (A [M, K], B [K, N], any strides):
  * one persistent kernel: a grid of at most one program per SM (the interpreter: a few); program
    p computes the output tiles p, p + P, p + 2P, … of a fixed (batch, grouped-M, N) tile order.
    A tile is always computed whole by one program, so which program runs it changes nothing;
  * tile shapes come from the dtype only, never from M, N or K; K is never split: each C element
    is Σ_k over K in BLOCK_K steps of ascending k, one ``tl.dot`` per step accumulated in fp32
    (fp64 for fp64);
  * a row of C therefore depends on its row of A, on B, and on nothing else: the same bits
    whatever M is and wherever the row sits (in which tile, at which position in it).
  Under the Triton interpreter (CPU tensors, the tests) a tile is formed by K rank-1 updates,
  acc[i, j] += a[i, k]·b[k, j] in ascending k, instead of ``tl.dot`` (NumPy's matmul, i.e. a CPU
  BLAS whose order of summation is its own business); ``DOT=True`` runs ``tl.dot`` there too
  (tested for correctness).
  The weight gradient of a linear layer, dW = Xᵀ·dY, reduces over the rows: it is a matmul whose
  K is the number of rows, so it cannot be "the same whatever the batch"; it is deterministic
  (no atomics, fixed order: the same call twice gives the same bits).

Softmax / log-softmax (``_softmax_fwd``), one program per row of length L, BLOCK = f(L):
  pass 1, online over the row's blocks in ascending order: m' = max(m, max blk),
          s' = s·exp(m − m') + Σ exp(blk − m');     pass 2: y = exp(x − m)/s  or  (x − m) − log s.
Backward (``_softmax_bwd``), with the forward's output y and upstream g:
  softmax:     dx = y·(g − Σ_j g_j·y_j);   log-softmax: dx = g − exp(y)·Σ_j g_j
  Σ_j in a fixed order: lane j mod BLOCK accumulates its elements in ascending block order, then
  one ``tl.sum`` over the BLOCK lanes.
Sum / mean (``_sum_rows``): the reduced dims are moved last and flattened, x [R, L] with unit
  column stride; one program per output element, the same lane-then-tree order over its L values
  (rows longer than SUM_CHUNK: that per chunk, then over the chunk sums — a function of L only).
"""
import os

import torch
import triton
import triton.language as tl

from ._common import cast_out

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# ------------------------------------------------------------------------------- matmul ---

@triton.jit
def _mm_persistent(A, B, C, X, PRM, M, N, K, n_batch,
                   s_ab, s_am, s_ak, s_bb, s_bk, s_bn, s_cb, s_cm, s_cn, s_xb, s_xm, s_xn,
                   HAS_BIAS: tl.constexpr, BIAS_ROW: tl.constexpr, SCALED: tl.constexpr, DOT: tl.constexpr,
                   PREC: tl.constexpr, ACC_FP64: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   GROUP_M: tl.constexpr):
    """C[b] = A[b]·B[b] (SCALED: alpha·A[b]·B[b]; HAS_BIAS: + beta·X[b], X broadcast by its
    strides; BIAS_ROW: its stride over M is 0), alpha and beta read from PRM in the accumulation
    dtype."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_batch = tiles_m * tiles_n
    group_width = GROUP_M * tiles_n
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    for tile in range(tl.program_id(0), n_batch * per_batch, tl.num_programs(0)):
        bt = tile // per_batch
        t = tile - bt * per_batch
        # grouped order: GROUP_M row tiles sweep the column tiles together (B stays in L2)
        first_m = (t // group_width) * GROUP_M
        size_m = tl.minimum(tiles_m - first_m, GROUP_M)
        pm = first_m + (t % group_width) % size_m
        pn = (t % group_width) // size_m
        m0 = pm * BLOCK_M
        n0 = pn * BLOCK_N
        # 64-bit tile origins; 32-bit offsets inside a tile and along K (``_fit`` checks them)
        a_t = A + tl.cast(bt, tl.int64) * s_ab + tl.cast(m0, tl.int64) * s_am
        b_t = B + tl.cast(bt, tl.int64) * s_bb + tl.cast(n0, tl.int64) * s_bn
        row_ok = m0 + rm < M
        col_ok = n0 + rn < N
        if ACC_FP64:
            acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float64)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        if DOT:
            rk = tl.arange(0, BLOCK_K)
            for k0 in range(0, K, BLOCK_K):
                k_ok = k0 + rk < K
                a = tl.load(a_t + (rm[:, None] * s_am + (k0 + rk)[None, :] * s_ak),
                            mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(b_t + ((k0 + rk)[:, None] * s_bk + rn[None, :] * s_bn),
                            mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                acc = tl.dot(a, b, acc, input_precision=PREC)
        else:
            # the interpreter: K rank-1 updates in ascending k, each element's sum in that order
            for k in range(0, K):
                a = tl.load(a_t + (rm * s_am + k * s_ak), mask=row_ok, other=0.0)
                b = tl.load(b_t + (k * s_bk + rn * s_bn), mask=col_ok, other=0.0)
                acc += a.to(acc.dtype)[:, None] * b.to(acc.dtype)[None, :]
        if SCALED:
            acc = acc * tl.load(PRM)
        if HAS_BIAS:
            x_t = X + tl.cast(bt, tl.int64) * s_xb + tl.cast(m0, tl.int64) * s_xm + tl.cast(n0, tl.int64) * s_xn
            if BIAS_ROW:   # one bias row for every output row (linear's bias): load [BLOCK_N] only
                x = tl.load(x_t + rn * s_xn, mask=col_ok, other=0.0)[None, :]
            else:
                x = tl.load(x_t + (rm[:, None] * s_xm + rn[None, :] * s_xn),
                            mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            acc += tl.load(PRM + 1) * x.to(acc.dtype)
        c = C + tl.cast(bt, tl.int64) * s_cb + tl.cast(m0, tl.int64) * s_cm + tl.cast(n0, tl.int64) * s_cn
        tl.store(c + (rm[:, None] * s_cm + rn[None, :] * s_cn), cast_out(acc, C.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])


# Tile configs: (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages), by dtype only. Each
# compiles for sm_80 and sm_90 without register spills (tests/test_batch_invariant.py,
# ``test_kernels_compile_for_gpu_without_spills``; 16-bit 128×256 and 128×128 tiles spilled there,
# 128×128 in the epilogue with a bias).
MM_CONFIGS = {
    "16bit": (128, 64, 64, 8, 8, 3),
    "tf32": (128, 64, 32, 8, 8, 3),
    "fp32": (64, 64, 32, 8, 8, 3),            # IEEE fp32: FMA dots, no tensor cores
    "fp64": (64, 64, 16, 8, 4, 2),
    "interpret": (32, 32, 16, 4, 1, 1),
}
# Under the interpreter ``DOT=False`` (rank-1 updates; see the module docstring). Tests set it.
INTERPRET_DOT = False
_sm_count: dict = {}


def _programs(device) -> int:
    """Programs of the persistent grid: one per SM (the interpreter: 4). Which program computes
    a tile changes nothing in its bits."""
    if device.type != "cuda":
        return 4
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _sm_count:
        _sm_count[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return _sm_count[i]


def _tf32() -> bool:
    return torch.backends.cuda.matmul.allow_tf32


def mm_config(dtype: torch.dtype, device) -> tuple:
    """The tile config of the batch-invariant matmul: a function of the dtype (and, for fp32, of
    torch's allow_tf32 switch) only — M, N and K play no part."""
    if device.type != "cuda":
        return MM_CONFIGS["interpret"]
    if dtype in (torch.float16, torch.bfloat16):
        return MM_CONFIGS["16bit"]
    if dtype == torch.float32:
        return MM_CONFIGS["tf32" if _tf32() else "fp32"]
    return MM_CONFIGS["fp64"]


_INT32 = 2**31
_MAX_TILE = 512          # no tile side of MM_CONFIGS is longer


def _fit(t: torch.Tensor, k_dim: int) -> torch.Tensor:
    """``t`` [Bt, rows, cols], or a contiguous copy, such that the kernel's 32-bit offsets hold:
    within a tile (≤ 512 along the other dim) plus the whole reduction dim ``k_dim``."""
    def ok(x):
        other = 3 - k_dim
        return _MAX_TILE * abs(x.stride(other)) + x.shape[k_dim] * abs(x.stride(k_dim)) < _INT32
    if ok(t):
        return t
    t = t.contiguous()
    if not ok(t):
        raise ValueError(f"rlhf_ops.batch_invariant: a matmul operand of shape {tuple(t.shape)} is too "
                         f"large for the kernel's 32-bit offsets within a batch element")
    return t


def matmul(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None,
           alpha: float = 1.0, beta: float = 1.0, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """a [Bt, M, K] · b [Bt, K, N] (any strides; floating dtypes, all the same) → c [Bt, M, N]
    contiguous, in ``out_dtype`` (default: a's). ``bias``: None or a tensor that expands to
    [Bt, M, N] (its strides are read, nothing is copied); c = alpha·a·b + beta·bias; beta = 0
    ignores the bias (NaN included), as torch.addmm does."""
    Bt, M, K = a.shape
    N = b.shape[2]
    c = torch.empty(Bt, M, N, dtype=out_dtype or a.dtype, device=a.device)
    if c.numel() == 0:
        return c
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    has_bias = bias is not None and beta != 0
    scaled = alpha != 1
    prm = c                                     # never read unless SCALED or HAS_BIAS
    if scaled or has_bias:
        # (alpha, beta) in the accumulation dtype, written by two fills: no host-to-device copy
        prm = torch.empty(2, dtype=acc, device=a.device)
        prm[0] = alpha
        prm[1] = beta
    x = bias.expand(Bt, M, N) if has_bias else c
    if has_bias and _MAX_TILE * (abs(x.stride(1)) + abs(x.stride(2))) >= _INT32:
        x = x.contiguous()
    a, b = _fit(a, 2), _fit(b, 1)
    bm, bn, bk, gm, warps, stages = mm_config(a.dtype, a.device)
    n_tiles = Bt * triton.cdiv(M, bm) * triton.cdiv(N, bn)
    interp = a.device.type != "cuda"
    prec = "tf32" if (a.dtype == torch.float32 and not interp and _tf32()) else "ieee"
    grid = (min(n_tiles, _programs(a.device)),)
    _mm_persistent[grid](a, b, c, x, prm, M, N, K, Bt, *a.stride(), *b.stride(), *c.stride(),
                         *x.stride(), HAS_BIAS=has_bias, BIAS_ROW=has_bias and x.stride(1) == 0,
                         SCALED=scaled,
                         DOT=(not interp) or INTERPRET_DOT, PREC=prec, ACC_FP64=acc == torch.float64,
                         BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm,
                         num_warps=warps, num_stages=stages)
    return c


# ------------------------------------------------------------------------------ softmax ---

@triton.jit
def _softmax_fwd(X, Y, L, s_x, s_y, LOG: tl.constexpr, BLOCK: tl.constexpr, ACC_FP64: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * s_x
    y_row = Y + row * s_y
    cols = tl.arange(0, BLOCK)
    # (helpers are inlined in the loops: the interpreter re-patches triton.language per nested call)
    if ACC_FP64:
        s = tl.zeros((), tl.float64)
    else:
        s = tl.zeros((), tl.float32)
    m = s + float("-inf")
    for off in range(0, L, BLOCK):
        x = tl.load(x_row + off + cols, mask=off + cols < L, other=float("-inf")).to(s.dtype)
        m_new = tl.maximum(m, tl.max(x, 0))
        # while every value seen is −inf, shift by 0 so that (−inf) − (−inf) never makes a NaN
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), 0)
        m = m_new
    shift = tl.where(m == float("-inf"), 0.0, m)   # an all −inf row: s = 0, the result NaN (torch's)
    log_s = tl.log(s)
    for off in range(0, L, BLOCK):
        inside = off + cols < L
        x = tl.load(x_row + off + cols, mask=inside, other=0.0).to(s.dtype)
        if LOG:
            y = (x - shift) - log_s
        else:
            y = tl.exp(x - shift) / s
        tl.store(y_row + off + cols, cast_out(y, Y.dtype.element_ty), mask=inside)


@triton.jit
def _softmax_bwd(G, Yf, DX, L, s_g, s_y, s_dx, LOG: tl.constexpr, BLOCK: tl.constexpr,
                 ACC_FP64: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    if ACC_FP64:
        acc = tl.zeros((BLOCK,), tl.float64)
    else:
        acc = tl.zeros((BLOCK,), tl.float32)
    for off in range(0, L, BLOCK):            # lane j: Σ over its elements, ascending blocks
        inside = off + cols < L
        g = tl.load(G + row * s_g + off + cols, mask=inside, other=0.0).to(acc.dtype)
        if LOG:
            acc += g
        else:
            acc += g * tl.load(Yf + row * s_y + off + cols, mask=inside, other=0.0).to(acc.dtype)
    total = tl.sum(acc, 0)
    for off in range(0, L, BLOCK):
        inside = off + cols < L
        g = tl.load(G + row * s_g + off + cols, mask=inside, other=0.0).to(acc.dtype)
        y = tl.load(Yf + row * s_y + off + cols, mask=inside, other=0.0).to(acc.dtype)
        if LOG:
            dx = g - tl.exp(y) * total
        else:
            dx = y * (g - total)
        tl.store(DX + row * s_dx + off + cols, cast_out(dx, DX.dtype.element_ty), mask=inside)


def row_block(L: int) -> int:
    """The lanes a row of length L is swept with: a function of L only."""
    return min(4096 if not INTERPRET else 512, triton.next_power_of_2(max(L, 16)))


def _warps(block: int) -> int:
    return 4 if block <= 1024 else 8


def softmax(x: torch.Tensor, log: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """Row-wise (log-)softmax of x [R, L] (unit column stride) → [R, L] contiguous."""
    R, L = x.shape
    y = torch.empty(R, L, dtype=out_dtype, device=x.device)
    if R * L == 0:
        return y
    block = row_block(L)
    _softmax_fwd[(R,)](x, y, L, x.stride(0), y.stride(0), LOG=log, BLOCK=block,
                       ACC_FP64=torch.float64 in (x.dtype, out_dtype), num_warps=_warps(block))
    return y


def softmax_backward(g: torch.Tensor, y: torch.Tensor, log: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """dx [R, L] of the (log-)softmax whose output was y [R, L], for upstream g [R, L]."""
    R, L = y.shape
    dx = torch.empty(R, L, dtype=out_dtype, device=y.device)
    if R * L == 0:
        return dx
    block = row_block(L)
    _softmax_bwd[(R,)](g, y, dx, L, g.stride(0), y.stride(0), dx.stride(0), LOG=log, BLOCK=block,
                       ACC_FP64=torch.float64 in (g.dtype, y.dtype, out_dtype), num_warps=_warps(block))
    return dx


# ----------------------------------------------------------------------------- sum / mean ---

@triton.jit
def _sum_rows(X, Y, L, CHUNK, s_x, denom, MEAN: tl.constexpr, BLOCK: tl.constexpr,
              ACC_FP64: tl.constexpr):
    """Grid (rows, chunks): Σ of x[row, chunk·CHUNK : (chunk + 1)·CHUNK] (÷ denom with MEAN) into
    Y[row·chunks + chunk]."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    cols = tl.arange(0, BLOCK)
    if ACC_FP64:
        acc = tl.zeros((BLOCK,), tl.float64)
    else:
        acc = tl.zeros((BLOCK,), tl.float32)
    lo = chunk * CHUNK
    hi = tl.minimum(L, lo + CHUNK)
    for off in range(lo, hi, BLOCK):          # lane j: Σ over its elements, ascending blocks
        acc += tl.load(X + row * s_x + off + cols, mask=off + cols < hi, other=0.0).to(acc.dtype)
    total = tl.sum(acc, 0)
    if MEAN:
        total = total / (denom + tl.zeros((), total.dtype))   # L = 0: 0/0 = NaN, as torch.mean
    tl.store(Y + row * tl.num_programs(1) + chunk, cast_out(total, Y.dtype.element_ty))


# Rows longer than SUM_CHUNK are summed in two fixed stages: Σ of each SUM_CHUNK-long chunk, then
# Σ of the chunk sums in ascending order (a function of L only; without it a long row, such as a
# full reduction, would be one program's sequential sweep).
SUM_CHUNK = 1024 if INTERPRET else 32768


def sum_rows(x: torch.Tensor, mean: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """Σ (or the mean) of each row of x [R, L] (unit column stride) → [R] in ``out_dtype``."""
    R, L = x.shape
    y = torch.empty(R, dtype=out_dtype, device=x.device)
    if R == 0:
        return y
    fp64 = torch.float64 in (x.dtype, out_dtype)
    if L > SUM_CHUNK:
        n = triton.cdiv(L, SUM_CHUNK)
        part = torch.empty(R, n, dtype=torch.float64 if fp64 else torch.float32, device=x.device)
        block = row_block(SUM_CHUNK)
        _sum_rows[(R, n)](x, part, L, SUM_CHUNK, x.stride(0), L, MEAN=False, BLOCK=block,
                          ACC_FP64=fp64, num_warps=_warps(block))
        x, L1 = part, n
    else:
        L1 = L
    block = row_block(L1)
    _sum_rows[(R, 1)](x, y, L1, max(L1, 1), x.stride(0), L, MEAN=mean, BLOCK=block, ACC_FP64=fp64,
                      num_warps=_warps(block))
    return y
