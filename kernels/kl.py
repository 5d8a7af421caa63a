"""Triton per-token log-probabilities and the PPO KL penalty: one read of each logit row forward,
one read + one write of the policy row backward. Nothing of size V is kept between the two.

Notation per row: y = x / T (the temperature divides inside the kernel, no scaled copy),
lse = log Σ_j exp(y_j), p = softmax(y), t = the token.

Forward, no host sync:
  ``_kl_forward``: grid (rows, chunks). Each program streams its chunk of the policy row (and,
  for kl_penalty, the same chunk of the reference row) in BLOCK tiles, keeping the state
      m = max y,   s = Σ exp(y − m),   h = Σ exp(y − m)·(y − m)
  (h only serves the policy entropy). A tile merges into the running state as
      M = max(m, max tile),  a = exp(m − M),
      s ← a·s + Σ exp(y − M),   h ← a·(h + (m − M)·s) + Σ exp(y − M)·(y − M)
  because exp(y − M)·(y − M) = a·exp(y − m)·((y − m) + (m − M)). Keeping h relative to the
  running max avoids the cancellation of lse − Σ p·y at |y| ~ 1e4.
  Rows up to 65,536 columns are one program, which writes the outputs itself (``_epilogue``);
  wider rows (or few rows) are split, the chunk states stored and merged by ``_kl_combine``
  with the same formulas. Outputs per row:
      logp = (y_t − M) − log S,   entropy = −Σ p·log p = lse − Σ p·y = log S − H / S,
      ref_logp likewise, d = logp − ref_logp, kl = d | ½d² | e^{−d} − 1 + d, penalty = −β·kl·mask,
  and lse as the pair (M, log S) for the backward. A token out of [0, V) gives NaN for its row.
Backward, one launch, grid (rows, V / BLOCK):
      dx_j = G · ([j = t] − exp((y_j − M) − log S)) / T     (∂logp/∂x_j = ([j = t] − p_j) / T)
where G [rows] = g_logp + g_log_ratio + g_kl·∂kl/∂logp is formed by the caller.
Scalars (T, β) travel in a small tensor of the accumulation dtype so that fp64 stays exact.
Helpers are inline code rather than nested @triton.jit calls where they run per tile: the
interpreter re-patches triton.language on every nested call, which slows the CPU tests a lot.
"""
import torch
import triton
import triton.language as tl

from ._common import cast_out, row_blocks

ESTIMATOR_IDS = {"k1": 1, "k2": 2, "k3": 3}


@triton.jit
def _epilogue(row, M, S, H, RM, RS, x_ptr, stride_x, r_ptr, stride_r, t_ptr, mask_ptr, prm_ptr,
              logp_ptr, lse_ptr, ref_ptr, ratio_ptr, kl_ptr, pen_ptr, ent_ptr, N, V,
              HAS_REF: tl.constexpr, HAS_MASK: tl.constexpr, ESTIMATOR: tl.constexpr,
              ACC_FP64: tl.constexpr):
    """Row outputs from the merged states (M, S, H) of the policy and (RM, RS) of the reference.
    lse = M + log S is kept as the pair (M, log S) (``lse_ptr`` [2, N]): logp = (y_t − M) − log S
    and the backward's exp((y − M) − log S) then keep their precision at |y| ~ 1e4, where
    rounding M + log S to fp32 would cost ~1e-3 absolute."""
    temp = tl.load(prm_ptr)
    M = tl.where(M == float("-inf"), 0.0, M)
    log_s = tl.log(S)
    t = tl.load(t_ptr + row)
    in_range = (t >= 0) & (t < V)
    yt = tl.load(x_ptr + row * stride_x + t, mask=in_range, other=0.0).to(temp.dtype) / temp
    logp = tl.where(in_range, (yt - M) - log_s, float("nan"))
    tl.store(logp_ptr + row, logp)
    tl.store(lse_ptr + row, M)
    tl.store(lse_ptr + N + row, log_s)
    if HAS_REF:
        tl.store(ent_ptr + row, log_s - H / S)  # entropy = lse − Σ p·y
        rt = tl.load(r_ptr + row * stride_r + t, mask=in_range, other=0.0).to(temp.dtype) / temp
        RM = tl.where(RM == float("-inf"), 0.0, RM)
        ref_logp = tl.where(in_range, (rt - RM) - tl.log(RS), float("nan"))
        d = logp - ref_logp
        if ESTIMATOR == 1:
            kl = d
        elif ESTIMATOR == 2:
            kl = 0.5 * d * d
        else:
            # k3 = exp(−d) − 1 + d. In fp32 the closed form cancels for small |d|: use its Taylor
            # series Σ_{n≥2} (−d)ⁿ/n! (Horner, to 1/11!) for |d| < ½. fp64 has the digits to
            # spare (and its series coefficients would be rounded to fp32 literals).
            kl = tl.exp(-d) - 1.0 + d
            if not ACC_FP64:
                q = 1.0 / 39916800.0
                q = 1.0 / 3628800.0 - d * q
                q = 1.0 / 362880.0 - d * q
                q = 1.0 / 40320.0 - d * q
                q = 1.0 / 5040.0 - d * q
                q = 1.0 / 720.0 - d * q
                q = 1.0 / 120.0 - d * q
                q = 1.0 / 24.0 - d * q
                q = 1.0 / 6.0 - d * q
                q = 0.5 - d * q
                kl = tl.where(tl.abs(d) < 0.5, d * d * q, kl)
        pen = -tl.load(prm_ptr + 1) * kl
        if HAS_MASK:
            pen = pen * tl.load(mask_ptr + row)
        tl.store(ref_ptr + row, ref_logp)
        tl.store(ratio_ptr + row, d)
        tl.store(kl_ptr + row, kl)
        tl.store(pen_ptr + row, pen)


@triton.jit
def _kl_forward(x_ptr, stride_x, r_ptr, stride_r, t_ptr, mask_ptr, part_ptr, prm_ptr,
                logp_ptr, lse_ptr, ref_ptr, ratio_ptr, kl_ptr, pen_ptr, ent_ptr,
                N, V, n_chunks, SPLIT: tl.constexpr, HAS_REF: tl.constexpr,
                HAS_MASK: tl.constexpr, ESTIMATOR: tl.constexpr, CHUNK: tl.constexpr,
                BLOCK: tl.constexpr, ACC_FP64: tl.constexpr):
    """Grid (rows, chunks). One chunk per row (SPLIT false): the program writes the row outputs;
    otherwise it stores its chunk's states for ``_kl_combine``."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    if ACC_FP64:
        zero = tl.zeros((), tl.float64)
    else:
        zero = tl.zeros((), tl.float32)
    temp = tl.load(prm_ptr)
    xr = x_ptr + row * stride_x
    rr = r_ptr + row * stride_r
    NEG = float("-inf")
    m = zero + NEG   # policy state (m, s, h); empty = (−inf, 0, 0)
    s = zero
    h = zero
    rm = zero + NEG  # reference state (m, s)
    rs = zero
    for off in range(0, CHUNK, BLOCK):
        cols = chunk * CHUNK + off + tl.arange(0, BLOCK)
        inside = cols < V
        y = tl.load(xr + cols, mask=inside, other=NEG).to(zero.dtype) / temp
        # merge the running state with the tile's: shifts are taken as 0 while the max is −inf,
        # and (m − M) as 0 for an empty side, so that no (−inf) − (−inf) or 0·(−inf) appears
        m_new = tl.maximum(m, tl.max(y, 0))
        M = tl.where(m_new == NEG, 0.0, m_new)
        a = tl.exp(m - M)
        dm = tl.where(m == NEG, 0.0, m - M)
        e = tl.exp(y - M)
        z = tl.where(y == NEG, 0.0, y - M)
        h = a * (h + dm * s) + tl.sum(e * z, 0)
        s = a * s + tl.sum(e, 0)
        m = m_new
        if HAS_REF:
            yr = tl.load(rr + cols, mask=inside, other=NEG).to(zero.dtype) / temp
            rm_new = tl.maximum(rm, tl.max(yr, 0))
            RM = tl.where(rm_new == NEG, 0.0, rm_new)
            rs = rs * tl.exp(rm - RM) + tl.sum(tl.exp(yr - RM), 0)
            rm = rm_new
    if SPLIT:
        # part[k, row, chunk] with k = (m, s, h, ref m, ref s)
        i = row * n_chunks + chunk
        plane = N * n_chunks
        tl.store(part_ptr + i, m)
        tl.store(part_ptr + plane + i, s)
        tl.store(part_ptr + 2 * plane + i, h)
        if HAS_REF:
            tl.store(part_ptr + 3 * plane + i, rm)
            tl.store(part_ptr + 4 * plane + i, rs)
    else:
        # with the max as shift the states are already in (M, S, H) form
        _epilogue(row, m, s, h, rm, rs, x_ptr, stride_x, r_ptr, stride_r, t_ptr, mask_ptr, prm_ptr,
                  logp_ptr, lse_ptr, ref_ptr, ratio_ptr, kl_ptr, pen_ptr, ent_ptr, N, V,
                  HAS_REF, HAS_MASK, ESTIMATOR, ACC_FP64)


@triton.jit
def _kl_combine(x_ptr, stride_x, r_ptr, stride_r, t_ptr, mask_ptr, part_ptr, prm_ptr,
                logp_ptr, lse_ptr, ref_ptr, ratio_ptr, kl_ptr, pen_ptr, ent_ptr,
                N, V, n_chunks, HAS_REF: tl.constexpr, HAS_MASK: tl.constexpr,
                ESTIMATOR: tl.constexpr, BLOCK_C: tl.constexpr, ACC_FP64: tl.constexpr):
    """One program per row: merge the chunk states, then write the row outputs."""
    row = tl.program_id(0).to(tl.int64)
    NEG = float("-inf")
    c = tl.arange(0, BLOCK_C)
    have = c < n_chunks
    i = row * n_chunks + c
    plane = N * n_chunks
    # M = max m_c, S = Σ a_c·s_c, H = Σ a_c·(h_c + (m_c − M)·s_c), a_c = exp(m_c − M)
    m = tl.load(part_ptr + i, mask=have, other=NEG)
    s = tl.load(part_ptr + plane + i, mask=have, other=0.0)
    h = tl.load(part_ptr + 2 * plane + i, mask=have, other=0.0)
    big = tl.max(m, 0)
    M = tl.where(big == NEG, 0.0, big)
    a = tl.exp(m - M)
    S = tl.sum(a * s, 0)
    H = tl.sum(a * (h + tl.where(m == NEG, 0.0, m - M) * s), 0)
    RM = M
    RS = S
    if HAS_REF:
        rm = tl.load(part_ptr + 3 * plane + i, mask=have, other=NEG)
        rs = tl.load(part_ptr + 4 * plane + i, mask=have, other=0.0)
        rbig = tl.max(rm, 0)
        RM = tl.where(rbig == NEG, 0.0, rbig)
        RS = tl.sum(rs * tl.exp(rm - RM), 0)
    _epilogue(row, M, S, H, RM, RS, x_ptr, stride_x, r_ptr, stride_r, t_ptr, mask_ptr, prm_ptr,
              logp_ptr, lse_ptr, ref_ptr, ratio_ptr, kl_ptr, pen_ptr, ent_ptr, N, V,
              HAS_REF, HAS_MASK, ESTIMATOR, ACC_FP64)


@triton.jit
def _kl_backward(x_ptr, stride_x, dx_ptr, stride_dx, t_ptr, lse_ptr, stride_lse, g_ptr, stride_g,
                 prm_ptr, V, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < V
    temp = tl.load(prm_ptr)
    t = tl.load(t_ptr + row)
    in_range = (t >= 0) & (t < V)
    shift = tl.load(lse_ptr + row)             # lse = shift + log_s
    log_s = tl.load(lse_ptr + stride_lse + row)
    g = tl.load(g_ptr + row * stride_g).to(temp.dtype) / temp
    x = tl.load(x_ptr + row * stride_x + cols, mask=inside, other=float("-inf"))
    y = x.to(temp.dtype) / temp
    # dx_j = G/T · ([j = t] − softmax_j)
    dx = (tl.where(cols == t, 1.0, 0.0) - tl.exp((y - shift) - log_s)) * g
    dx = tl.where(in_range, dx, float("nan"))
    tl.store(dx_ptr + row * stride_dx + cols, cast_out(dx, dx_ptr.dtype.element_ty), mask=inside)


def _params(logits: torch.Tensor, acc: torch.dtype, temperature: float, beta: float = 0.0):
    # (T, β) in a tiny device tensor, so fp64 runs keep them exact (Triton passes Python floats
    # as fp32). Filled by two fill kernels: no host sync, no host-to-device copy.
    prm = torch.empty(2, dtype=acc, device=logits.device)
    prm[0] = temperature
    prm[1] = beta
    return prm


def forward(logits, ref_logits, tokens, mask, temperature: float, beta: float = 0.0,
            estimator: str = "k1"):
    """logits (and ref_logits) [N, V] with unit column stride, tokens [N] int64, mask [N] in the
    accumulation dtype or None. Returns (logprobs, lse) without ref_logits, else
    (logprobs, ref_logprobs, log_ratio, kl, penalty, entropy, lse), each [N] fp32 (fp64)."""
    N, V = logits.shape
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    has_ref = ref_logits is not None
    # separate tensors: outputs of a custom op may not be views of one another
    out = [torch.empty(N, dtype=acc, device=logits.device) for _ in range(6 if has_ref else 1)]
    out.append(torch.empty(2, N, dtype=acc, device=logits.device))  # lse as (shift, log S)
    if N > 0:
        chunk, block = row_blocks(N, V)
        n_chunks = triton.cdiv(V, chunk)
        fp64 = acc == torch.float64
        prm = _params(logits, acc, temperature, beta)
        part = (torch.empty(5 if has_ref else 3, N, n_chunks, dtype=acc, device=logits.device)
                if n_chunks > 1 else prm)  # one chunk per row needs no partial states
        r = ref_logits if has_ref else logits
        o = out if has_ref else [out[0]] * 7  # without a ref, o[1..5] are never written
        msk = mask if mask is not None else prm
        split = n_chunks > 1
        common = dict(HAS_REF=has_ref, HAS_MASK=mask is not None,
                      ESTIMATOR=ESTIMATOR_IDS[estimator], ACC_FP64=fp64)
        ptrs = (logits, logits.stride(0), r, r.stride(0), tokens, msk, part, prm,
                out[0], out[-1], o[1], o[2], o[3], o[4], o[5], N, V, n_chunks)
        _kl_forward[(N, n_chunks)](*ptrs, SPLIT=split, CHUNK=chunk, BLOCK=block, **common)
        if split:
            _kl_combine[(N,)](*ptrs, BLOCK_C=triton.next_power_of_2(n_chunks), **common)
    return tuple(out)


def backward(grad, logits, tokens, lse, temperature: float):
    """grad [N] (G, any stride) → d logp / d logits · G as a new [N, V] tensor in logits' dtype."""
    N, V = logits.shape
    out = torch.empty_like(logits)
    if N == 0 or V == 0:
        return out
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    block = min(4096, triton.next_power_of_2(max(V, 16)))
    _kl_backward[(N, triton.cdiv(V, block))](
        logits, logits.stride(0), out, out.stride(0), tokens, lse, lse.stride(0),
        grad, grad.stride(0),
        _params(logits, acc, temperature), V, BLOCK=block)
    return out
