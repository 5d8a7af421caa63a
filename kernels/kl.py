"""Triton per-token log-probabilities, entropy and the PPO KL penalty: one read of each logit
row forward, one read + one write of the policy row backward. Nothing of size V is kept between
the two.

Notation per row: y = x / T (the temperature divides inside the kernel, no scaled copy),
lse = log Σ_j exp(y_j), p = softmax(y), t_1..t_K = the row's tokens (K ≥ 0; K = 1 for
``kl_penalty`` and for the one-token-per-position form).

Forward, no host sync:
  ``_kl_forward``: grid (rows, chunks). Each program streams its chunk of the policy row (and,
  for kl_penalty, the same chunk of the reference row) in BLOCK tiles, keeping the state
      m = max y,   s = Σ exp(y − m),   h = Σ exp(y − m)·(y − m)
  (h serves the entropy). A tile merges into the running state as
      M = max(m, max tile),  a = exp(m − M),
      s ← a·s + Σ exp(y − M),   h ← a·(h + (m − M)·s) + Σ exp(y − M)·(y − M)
  because exp(y − M)·(y − M) = a·exp(y − m)·((y − m) + (m − M)). Keeping h relative to the
  running max avoids the cancellation of lse − Σ p·y at |y| ~ 1e4.
  Rows up to 65,536 columns are one program, which writes the outputs itself (``_epilogue``);
  wider rows (or few rows) are split, the chunk states stored and merged by ``_kl_combine``
  with the same formulas. Outputs per row:
      logp_k = (y_{t_k} − M) − log S  (K gathered values, the row itself is read once),
      entropy = −Σ p·log p = lse − Σ p·y = log S − H / S,
      for kl_penalty ref_logp likewise, d = logp − ref_logp, kl = d | ½d² | e^{−d} − 1 + d,
      penalty = −β·kl·mask,
  and lse as the pair (M, log S) for the backward. A token out of [0, V) gives NaN for its
  log-prob (the entropy does not depend on the tokens).
Backward, one launch, grid (rows, V / BLOCK), with upstream gradients G_k of the log-probs and
G_H of the entropy (∂logp_k/∂y_j = [j = t_k] − p_j, ∂H/∂y_j = −p_j·(log p_j + H)):
      dx_j = (Σ_k G_k·[j = t_k] − (Σ_k G_k)·p_j − G_H·p_j·(log p_j + H)) / T
with log p_j = (y_j − M) − log S; repeated tokens add up. Where y_j = −inf, p_j = 0 and the
entropy term is taken as 0 (0·log 0 = 0), never 0·(−inf). A row with a token out of [0, V) gets
a NaN gradient row. The backward can run on a column slice of the rows (``col0``: the slice's
first vocabulary id) and write in place, which ``linear_token_logprobs`` uses.
For kl_penalty the caller forms G = g_logp + g_log_ratio + g_kl·∂kl/∂logp.
Logit softcap (SOFTCAP, c > 0, log-probs only — not kl_penalty): each policy logit becomes
c·tanh(x/c) as it is loaded (``_math.softcap``: −inf stays −inf), before the temperature
divides (y = c·tanh(x/c) / T, Gemma's order), so everything above holds for the capped logits;
the backward multiplies dx_j by 1 − tanh²(x_j/c).
Scalars (T, β, c, 1/c) travel in a small tensor of the accumulation dtype so that fp64 stays exact.
Helpers are inline code rather than nested @triton.jit calls where they run per tile: the
interpreter re-patches triton.language on every nested call, which slows the CPU tests a lot.
"""
import torch
import triton
import triton.language as tl

from ._common import cast_out, row_blocks
from ._math import softcap


@triton.jit
def _epilogue(row, M, S, H, RM, RS, x_ptr, stride_x, r_ptr, stride_r, t_ptr, K, mask_ptr, prm_ptr,
              logp_ptr, lse_ptr, ref_ptr, ratio_ptr, kl_ptr, pen_ptr, ent_ptr, N, V,
              HAS_REF: tl.constexpr, HAS_MASK: tl.constexpr, ESTIMATOR: tl.constexpr,
              SOFTCAP: tl.constexpr, ACC_FP64: tl.constexpr):
    """Row outputs from the merged states (M, S, H) of the policy and (RM, RS) of the reference.
    lse = M + log S is kept as the pair (M, log S) (``lse_ptr`` [2, N]): logp = (y_t − M) − log S
    and the backward's exp((y − M) − log S) then keep their precision at |y| ~ 1e4, where
    rounding M + log S to fp32 would cost ~1e-3 absolute. Tokens and the per-token outputs are
    [N, K] (K = 1 with a reference)."""
    temp = tl.load(prm_ptr)
    M = tl.where(M == float("-inf"), 0.0, M)
    log_s = tl.log(S)
    tl.store(lse_ptr + row, M)
    tl.store(lse_ptr + N + row, log_s)
    tl.store(ent_ptr + row, log_s - H / S)  # entropy = lse − Σ p·y
    RM = tl.where(RM == float("-inf"), 0.0, RM)
    for k in range(0, K):
        i = row * K + k
        t = tl.load(t_ptr + i)
        in_range = (t >= 0) & (t < V)
        yt = tl.load(x_ptr + row * stride_x + t, mask=in_range, other=0.0).to(temp.dtype)
        if SOFTCAP:
            yt, _ = softcap(yt, tl.load(prm_ptr + 2), tl.load(prm_ptr + 3))
        yt = yt / temp
        logp = tl.where(in_range, (yt - M) - log_s, float("nan"))
        tl.store(logp_ptr + i, logp)
        if HAS_REF:
            rt = tl.load(r_ptr + row * stride_r + t, mask=in_range, other=0.0).to(temp.dtype) / temp
            ref_logp = tl.where(in_range, (rt - RM) - tl.log(RS), float("nan"))
            d = logp - ref_logp
            if ESTIMATOR == 1:
                kl = d
            elif ESTIMATOR == 2:
                kl = 0.5 * d * d
            else:
                # k3 = exp(−d) − 1 + d. The closed form cancels for small |d| (its absolute error
                # is ~ulp(1), k3 ≈ d²/2): for |d| < ½ use the Taylor series Σ_{n≥2} (−d)ⁿ/n!.
                # fp32: Horner to 1/11! (literals are fp32). fp64: to 1/20! in the nested form
                # ½·(1 − d/3·(1 − d/4·(… (1 − d/20)))), dividing by exact integers in fp64, so
                # that no coefficient is an fp32-rounded literal; truncation < 1e-25 relative.
                kl = tl.exp(-d) - 1.0 + d
                if ACC_FP64:
                    q = d * 0.0 + 1.0
                    for n in tl.static_range(20, 2, -1):
                        q = 1.0 - d * q / n
                    kl = tl.where(tl.abs(d) < 0.5, 0.5 * d * d * q, kl)
                else:
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
                pen = pen * tl.load(mask_ptr + i)
            tl.store(ref_ptr + i, ref_logp)
            tl.store(ratio_ptr + i, d)
            tl.store(kl_ptr + i, kl)
            tl.store(pen_ptr + i, pen)


@triton.jit
def _kl_forward(x_ptr, stride_x, r_ptr, stride_r, t_ptr, K, mask_ptr, part_ptr, prm_ptr,
                logp_ptr, lse_ptr, ref_ptr, ratio_ptr, kl_ptr, pen_ptr, ent_ptr,
                N, V, n_chunks, SPLIT: tl.constexpr, HAS_REF: tl.constexpr,
                HAS_MASK: tl.constexpr, ESTIMATOR: tl.constexpr, CHUNK: tl.constexpr,
                BLOCK: tl.constexpr, SOFTCAP: tl.constexpr, ACC_FP64: tl.constexpr):
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
        y = tl.load(xr + cols, mask=inside, other=NEG).to(zero.dtype)
        if SOFTCAP:  # −inf (the tile's padding included) stays −inf
            y, _ = softcap(y, tl.load(prm_ptr + 2), tl.load(prm_ptr + 3))
        y = y / temp
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
        _epilogue(row, m, s, h, rm, rs, x_ptr, stride_x, r_ptr, stride_r, t_ptr, K, mask_ptr,
                  prm_ptr, logp_ptr, lse_ptr, ref_ptr, ratio_ptr, kl_ptr, pen_ptr, ent_ptr, N, V,
                  HAS_REF, HAS_MASK, ESTIMATOR, SOFTCAP, ACC_FP64)


@triton.jit
def _kl_combine(x_ptr, stride_x, r_ptr, stride_r, t_ptr, K, mask_ptr, part_ptr, prm_ptr,
                logp_ptr, lse_ptr, ref_ptr, ratio_ptr, kl_ptr, pen_ptr, ent_ptr,
                N, V, n_chunks, HAS_REF: tl.constexpr, HAS_MASK: tl.constexpr,
                ESTIMATOR: tl.constexpr, BLOCK_C: tl.constexpr, SOFTCAP: tl.constexpr,
                ACC_FP64: tl.constexpr):
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
    _epilogue(row, M, S, H, RM, RS, x_ptr, stride_x, r_ptr, stride_r, t_ptr, K, mask_ptr, prm_ptr,
              logp_ptr, lse_ptr, ref_ptr, ratio_ptr, kl_ptr, pen_ptr, ent_ptr, N, V,
              HAS_REF, HAS_MASK, ESTIMATOR, SOFTCAP, ACC_FP64)


@triton.jit
def _kl_backward(x_ptr, stride_x, dx_ptr, stride_dx, t_ptr, K, lse_ptr, stride_lse,
                 g_ptr, stride_g0, stride_g1, gh_ptr, stride_gh, ent_ptr, prm_ptr, col0, V, W,
                 BLOCK: tl.constexpr, HAS_GH: tl.constexpr, SOFTCAP: tl.constexpr,
                 ACC_FP64: tl.constexpr):
    """Grid (rows, W / BLOCK) over the columns [col0, col0 + W) of a V-wide row (W = V unless
    the caller passes a slice); x and dx point at the slice's first column (they may alias)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < W
    if ACC_FP64:
        zero = tl.zeros((BLOCK,), tl.float64)
    else:
        zero = tl.zeros((BLOCK,), tl.float32)
    temp = tl.load(prm_ptr)
    shift = tl.load(lse_ptr + row)             # lse = shift + log_s
    log_s = tl.load(lse_ptr + stride_lse + row)
    x = tl.load(x_ptr + row * stride_x + cols, mask=inside, other=float("-inf"))
    y = x.to(zero.dtype)
    if SOFTCAP:  # y = c·tanh(x/c); the chain rule's factor 1 − tanh² is applied below
        y, dcap = softcap(y, tl.load(prm_ptr + 2), tl.load(prm_ptr + 3))
    y = y / temp
    logp = (y - shift) - log_s
    p = tl.exp(logp)
    # token terms: Σ_k G_k·[j = t_k] (repeated tokens add up) and Σ_k G_k
    tok = zero
    g_sum = tl.sum(zero, 0)
    n_bad = tl.zeros((), tl.int32)
    for k in range(0, K):
        t = tl.load(t_ptr + row * K + k)
        g = tl.load(g_ptr + row * stride_g0 + k * stride_g1).to(zero.dtype)
        n_bad += ((t < 0) | (t >= V)).to(tl.int32)
        g_sum += g
        tok += tl.where(cols + col0 == t, g, 0.0)
    dx = tok - g_sum * p
    if HAS_GH:
        # −G_H·p_j·(log p_j + H); 0·log 0 = 0 where y_j = −inf (p_j = 0)
        gh = tl.load(gh_ptr + row * stride_gh).to(zero.dtype)
        ent = tl.load(ent_ptr + row)
        dx -= gh * p * (tl.where(y == float("-inf"), 0.0, logp) + ent)
    if SOFTCAP:
        dx = dx * dcap
    dx = tl.where(n_bad == 0, dx / temp, float("nan"))
    tl.store(dx_ptr + row * stride_dx + cols, cast_out(dx, dx_ptr.dtype.element_ty), mask=inside)


def _params(logits: torch.Tensor, acc: torch.dtype, temperature: float, beta: float = 0.0,
            softcap: float = 0.0):
    # (T, β[, c, 1/c]) in a tiny device tensor, so fp64 runs keep them exact (Triton passes Python
    # floats as fp32). Filled by fill kernels: no host sync, no host-to-device copy. c and 1/c
    # only with a softcap (the kernels read them only then).
    prm = torch.empty(4 if softcap > 0 else 2, dtype=acc, device=logits.device)
    prm[0] = temperature
    prm[1] = beta
    if softcap > 0:
        prm[2] = softcap
        prm[3] = 1.0 / softcap
    return prm


def forward(logits, ref_logits, tokens, mask, temperature: float, beta: float = 0.0,
            estimator: int = 1, softcap: float = 0.0):
    """logits (and ref_logits) [N, V] with unit column stride; tokens [N] or [N, K] int64
    (contiguous; [N] with ref_logits); mask [N] in the accumulation dtype or None; estimator
    the KL estimator's id (1 = k1, 2 = k2, 3 = k3: rlhf_ops.reference.ESTIMATOR_IDS).
    Returns (logprobs (tokens' shape), entropy [N], lse [2, N]) without ref_logits, else
    (logprobs, ref_logprobs, log_ratio, kl, penalty, entropy, lse), each [N]; fp32 (fp64).
    ``softcap`` > 0 (without ref_logits only): of the logits c·tanh(logits/c), divided by T."""
    if softcap > 0 and ref_logits is not None:
        raise ValueError("kernels.kl.forward: softcap applies to the log-prob form only (no ref_logits)")
    N, V = logits.shape
    K = tokens.shape[1] if tokens.dim() == 2 else 1
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    dev = logits.device
    has_ref = ref_logits is not None
    # separate tensors: outputs of a custom op may not be views of one another
    logp = torch.empty(tokens.shape, dtype=acc, device=dev)
    ent = torch.empty(N, dtype=acc, device=dev)
    lse = torch.empty(2, N, dtype=acc, device=dev)  # (shift, log S)
    ref = [torch.empty(N, dtype=acc, device=dev) for _ in range(4)] if has_ref else []
    if N > 0:
        chunk, block = row_blocks(N, V)
        n_chunks = triton.cdiv(V, chunk)
        fp64 = acc == torch.float64
        prm = _params(logits, acc, temperature, beta, softcap)
        part = (torch.empty(5 if has_ref else 3, N, n_chunks, dtype=acc, device=dev)
                if n_chunks > 1 else prm)  # one chunk per row needs no partial states
        r = ref_logits if has_ref else logits
        o = ref if has_ref else [logp] * 4  # without a ref these four are never written
        msk = mask if mask is not None else prm
        split = n_chunks > 1
        common = dict(HAS_REF=has_ref, HAS_MASK=mask is not None,
                      ESTIMATOR=int(estimator), SOFTCAP=softcap > 0, ACC_FP64=fp64)
        tok = tokens if tokens.numel() else torch.zeros(1, dtype=tokens.dtype, device=dev)  # K = 0
        ptrs = (logits, logits.stride(0), r, r.stride(0), tok, K, msk, part, prm,
                logp, lse, o[0], o[1], o[2], o[3], ent, N, V, n_chunks)
        _kl_forward[(N, n_chunks)](*ptrs, SPLIT=split, CHUNK=chunk, BLOCK=block, **common)
        if split:
            _kl_combine[(N,)](*ptrs, BLOCK_C=triton.next_power_of_2(n_chunks), **common)
    if has_ref:
        return (logp, *ref, ent, lse)
    return logp, ent, lse


def backward(grad, grad_entropy, logits, tokens, lse, entropy, temperature: float, out=None,
             col0: int = 0, vocab: int | None = None, softcap: float = 0.0):
    """d/d logits of Σ grad·logprobs + Σ grad_entropy·entropy, in the logits' dtype.

    grad: tokens' shape ([N] or [N, K], any strides); grad_entropy [N] or None (then
    ``entropy`` may be None too); logits [N, W] with unit column stride: the columns
    [col0, col0 + W) of rows of ``vocab`` (default W) entries; tokens contiguous. Writes into
    ``out`` (a new tensor when None; it may be ``logits`` itself) and returns it. ``softcap``: as
    the forward's."""
    N, W = logits.shape
    V = W if vocab is None else vocab
    out = torch.empty_like(logits) if out is None else out
    if N == 0 or W == 0:
        return out
    K = tokens.shape[1] if tokens.dim() == 2 else 1
    g = grad if grad.dim() == 2 else grad[:, None]
    if K == 0:  # nothing to read: placeholders of the right dtypes (never dereferenced)
        tokens = torch.zeros(1, dtype=tokens.dtype, device=tokens.device)
        g = lse[:, :1]
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    has_gh = grad_entropy is not None
    gh = grad_entropy if has_gh else lse
    block = min(4096, triton.next_power_of_2(max(W, 16)))
    _kl_backward[(N, triton.cdiv(W, block))](
        logits, logits.stride(0), out, out.stride(0), tokens, K, lse, lse.stride(0),
        g, g.stride(0), g.stride(1), gh, gh.stride(0), entropy if has_gh else lse,
        _params(logits, acc, temperature, softcap=softcap), col0, V, W,
        BLOCK=block, HAS_GH=has_gh, SOFTCAP=softcap > 0, ACC_FP64=acc == torch.float64)
    return out
