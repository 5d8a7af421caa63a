"""Per-token log-probabilities (also straight from hidden states), entropy, and the PPO KL penalty
(InstructGPT stage 4).

Follows the op pattern of ``cross_entropy.py``: validation → ``_backend.resolve`` →
``reference`` (eager, ``reference.py``) or ``rlhf_ops::`` custom ops whose bodies run the Triton
launchers (``rlhf_ops.kernels.kl``) or ``torch.ops.rlhf_ops_cuda.kl_fwd`` / ``kl_bwd``.

Forward per row, y = logits / T (T divides inside the kernels, no scaled copy), t_1..t_K = the
row's tokens (K = 1 for tokens [...]):
    lse  = log Σ_j exp(y_j)                         (online softmax, one read of each row)
    logp_k = y_{t_k} − lse,   entropy H = −Σ p·log p = lse − Σ_j p_j·y_j   (p = softmax(y))
    kl_penalty: ref_logp likewise on ref_logits, d = log_ratio = logp − ref_logp,
    kl = d (k1) | ½d² (k2) | e^{−d} − 1 + d (k3),   penalty = −β·kl·mask
Saved for backward: the logits (which exist anyway), the tokens, lse (as the pair shift, log S:
[2, N]), the entropy [N] when it is differentiable and, for k2/k3, d [N].
Backward, one sweep over the row, with upstream gradients G_k (log-probs) and G_H (entropy):
    ∂logp_k/∂x_j = ([j = t_k] − p_j)/T,   ∂H/∂x_j = −p_j·(log p_j + H)/T
    d logits_j = (Σ_k G_k·[j = t_k] − (Σ_k G_k)·p_j − G_H·p_j·(log p_j + H)) / T
where p_j = 0 (a −inf logit) contributes 0 to the entropy term (0·log 0 = 0). For kl_penalty,
G = g_logp + g_log_ratio + g_kl·∂kl/∂logp with ∂kl/∂logp = 1 | d | 1 − e^{−d}.
ref_logits never get a gradient; ref_logprobs and penalty are outputs without gradient (penalty
is a reward term); entropy is differentiable (an entropy bonus trains).

``linear_token_logprobs`` runs the same kernels on logits computed one block at a time from
hidden [N, d] and weight [V, d] (cuBLAS matmuls, never all [N, V] logits):
  forward  — row chunks: logits = hidden[rows] @ Wᵀ + b, then the fused forward on the chunk;
             kept per row: lse [2, N] and the entropy [N] (when asked for);
  backward — vocabulary slices: logits[:, v0:v1] recomputed for all rows, turned into their
             gradient by the fused backward (which knows lse and H, so a slice suffices), then
             dW[v0:v1] = dlogitsᵀ·hidden in one GEMM over all rows (fp32 accumulation inside
             the GEMM, rounded once to W's dtype, as eager), d hidden += dlogits·W[v0:v1] in an
             fp32 [N, d] accumulator, d bias[v0:v1] = Σ_rows dlogits in fp32.
"""
from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _backend, _checks, reference
from .reference import ESTIMATORS, KLPenalty

# masks: bool, float, or the integer attention masks tokenizers return (0 / 1)
MASK_DTYPES = (torch.bool,) + _checks.FLOAT_DTYPES + (torch.int64, torch.int32, torch.int16, torch.int8,
                                                    torch.uint8)

_EST_ID = {"k1": 1, "k2": 2, "k3": 3}

# Bytes of logits (in their own dtype) one block of linear_token_logprobs holds: a forward row
# chunk [rows, V] or a backward vocabulary slice [N, cols].
LINEAR_BLOCK_BYTES = 64 << 20


def _fwd_impl(backend: str, logits: Tensor, ref_logits: Tensor | None, tokens: Tensor,
              mask: Tensor | None, temperature: float, beta: float, estimator: str):
    if backend == "triton":
        return _backend.triton_kernels("kl").forward(logits, ref_logits, tokens, mask, temperature,
                                                     beta, estimator)
    return tuple(torch.ops.rlhf_ops_cuda.kl_fwd(logits, ref_logits, tokens, mask, temperature, beta,
                                                _EST_ID[estimator]))


def _bwd_impl(backend: str, grad, grad_entropy, logits, tokens, lse, entropy, temperature: float,
              inplace: bool = False, col0: int = 0, vocab: int = -1) -> Tensor:
    """The fused backward; ``inplace`` lets Triton write over ``logits`` (CUDA returns a new
    tensor: its token pass reads the logits after the dense pass)."""
    if backend == "triton":
        return _backend.triton_kernels("kl").backward(
            grad, grad_entropy, logits, tokens, lse, entropy, temperature,
            out=logits if inplace else None, col0=col0, vocab=None if vocab < 0 else vocab)
    return torch.ops.rlhf_ops_cuda.kl_bwd(grad, grad_entropy, logits, tokens, lse, entropy,
                                          temperature, col0, vocab)


def _grads(g_logp: Tensor | None, g_ent: Tensor | None, tokens: Tensor, lse: Tensor, with_entropy: bool):
    """Upstream gradients as the backward ops take them: a None log-prob gradient (the output
    unused) becomes zeros; an unused or non-differentiable entropy gives None."""
    if g_logp is None:
        g_logp = torch.zeros(tokens.shape, dtype=lse.dtype, device=lse.device)
    return g_logp, (g_ent if with_entropy else None)


# ------------------------------------------------------------------------------ custom ops ---

@torch.library.custom_op("rlhf_ops::token_logprobs_fwd", mutates_args=())
def token_logprobs_fwd(logits: Tensor, tokens: Tensor, temperature: float, backend: str,
                       with_entropy: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """logits [N, V] (unit stride over V), tokens [N, K] (or [N]) int64 → (logprobs (tokens'
    shape), entropy [N], lse [2, N]); lse is kept as the pair (shift, log Σ exp(y − shift)) so
    that it loses no precision. ``with_entropy`` only says whether the entropy is
    differentiable."""
    if _backend.debug_checks(logits.device):
        _checks.in_range("token_logprobs", "tokens", tokens, 0, logits.shape[1])
    return tuple(_fwd_impl(backend, logits, None, tokens, None, temperature, 0.0, "k1"))


@token_logprobs_fwd.register_fake
def _(logits, tokens, temperature, backend, with_entropy=False):
    acc = _checks.acc_dtype(logits.dtype)
    n = logits.shape[0]
    return (logits.new_empty(tokens.shape, dtype=acc), logits.new_empty((n,), dtype=acc),
            logits.new_empty((2, n), dtype=acc))


@torch.library.custom_op("rlhf_ops::token_logprobs_bwd", mutates_args=())
def token_logprobs_bwd(grad: Tensor, logits: Tensor, tokens: Tensor, lse: Tensor,
                       temperature: float, backend: str, grad_entropy: Tensor | None = None,
                       entropy: Tensor | None = None) -> Tensor:
    """grad (tokens' shape: G), grad_entropy [N] or None (G_H, with the forward's entropy [N])
    → d logits as a new [N, V] tensor in the logits dtype."""
    return _bwd_impl(backend, grad, grad_entropy, logits, tokens, lse, entropy, temperature)


@token_logprobs_bwd.register_fake
def _(grad, logits, tokens, lse, temperature, backend, grad_entropy=None, entropy=None):
    return torch.empty_like(logits)


def _tl_setup(ctx, inputs, output):
    logits, tokens, temperature, backend, with_entropy = inputs
    ctx.save_for_backward(logits, tokens, output[2], output[1] if with_entropy else None)
    ctx.args = (temperature, backend)
    ctx.with_entropy = with_entropy
    ctx.set_materialize_grads(False)   # an unused output's gradient arrives as None
    ctx.mark_non_differentiable(output[2])
    if not with_entropy:
        ctx.mark_non_differentiable(output[1])


def _tl_backward(ctx, g_logp, g_ent, g_lse):
    logits, tokens, lse, ent = ctx.saved_tensors
    g_logp, g_ent = _grads(g_logp, g_ent, tokens, lse, ctx.with_entropy)
    grad = torch.ops.rlhf_ops.token_logprobs_bwd(g_logp, logits, tokens, lse, *ctx.args, g_ent,
                                                 ent if g_ent is not None else None)
    return grad, None, None, None, None


token_logprobs_fwd.register_autograd(_tl_backward, setup_context=_tl_setup)


@torch.library.custom_op("rlhf_ops::kl_penalty_fwd", mutates_args=())
def kl_penalty_fwd(logits: Tensor, ref_logits: Tensor, tokens: Tensor, mask: Tensor | None,
                   beta: float, estimator: str, temperature: float, backend: str
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """[N, V] logits, tokens [N] → (logprobs, ref_logprobs, log_ratio, kl, penalty, entropy),
    each [N], and the policy's lse [2, N] for the backward."""
    if _backend.debug_checks(logits.device):
        _checks.in_range("kl_penalty", "tokens", tokens, 0, logits.shape[1])
    return tuple(_fwd_impl(backend, logits, ref_logits, tokens, mask, temperature, beta, estimator))


@kl_penalty_fwd.register_fake
def _(logits, ref_logits, tokens, mask, beta, estimator, temperature, backend):
    acc = _checks.acc_dtype(logits.dtype)
    n = logits.shape[0]
    return tuple(logits.new_empty((n,), dtype=acc) for _ in range(6)) + (
        logits.new_empty((2, n), dtype=acc),)


def _kl_setup(ctx, inputs, output):
    logits, ref_logits, tokens, mask, beta, estimator, temperature, backend = inputs
    logp, ref_logp, log_ratio, kl, penalty, entropy, lse = output
    # k1's derivative is 1: only k2/k3 need the [N] log-ratio.
    ctx.save_for_backward(logits, tokens, lse, log_ratio if estimator != "k1" else None, entropy)
    ctx.args = (temperature, backend)
    ctx.estimator = estimator
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(ref_logp, penalty, lse)


def _kl_backward(ctx, g_logp, g_ref, g_ratio, g_kl, g_pen, g_ent, g_lse):
    logits, tokens, lse, d, ent = ctx.saved_tensors
    G = None
    for g in (g_logp, g_ratio):         # ∂d/∂logp = 1; ref_logp carries no gradient
        if g is not None:
            G = g if G is None else G + g
    if g_kl is not None:
        if ctx.estimator == "k1":
            gk = g_kl                   # ∂kl/∂d = 1
        else:
            # k2: ∂(½d²)/∂d = d; k3: ∂(e^{−d} − 1 + d)/∂d = 1 − e^{−d}. where: a zero upstream
            # gradient stays zero even where ∂kl/∂d is infinite (−inf logp)
            dkl = d if ctx.estimator == "k2" else -torch.expm1(-d)
            gk = torch.where(g_kl != 0, g_kl * dkl, torch.zeros_like(g_kl))
        G = gk if G is None else G + gk
    G, g_ent = _grads(G, g_ent, tokens, lse, True)
    grad = torch.ops.rlhf_ops.token_logprobs_bwd(G, logits, tokens, lse, *ctx.args, g_ent,
                                                 ent if g_ent is not None else None)
    return grad, None, None, None, None, None, None, None


kl_penalty_fwd.register_autograd(_kl_backward, setup_context=_kl_setup)


# --------------------------------------------------------------- linear token log-probs ops ---

def _block_len(n_other: int, itemsize: int, total: int) -> int:
    """How many rows (or columns) of ``n_other`` logits each fit in LINEAR_BLOCK_BYTES: at least
    128 (or ``total``), a multiple of 128 when above it (whole GEMM tiles)."""
    n = LINEAR_BLOCK_BYTES // max(1, n_other * itemsize)
    n = max(128, n - n % 128)
    return max(1, min(total, n))


@torch.library.custom_op("rlhf_ops::linear_token_logprobs_fwd", mutates_args=())
def linear_token_logprobs_fwd(hidden: Tensor, weight: Tensor, bias: Tensor | None, tokens: Tensor,
                              temperature: float, with_entropy: bool, backend: str
                              ) -> tuple[Tensor, Tensor, Tensor]:
    """hidden [N, d], weight [V, d], tokens [N, K] → (logprobs [N, K], entropy [N], lse [2, N]);
    logits exist one row chunk [rows, V] at a time."""
    N, V = hidden.shape[0], weight.shape[0]
    if _backend.debug_checks(hidden.device):
        _checks.in_range("linear_token_logprobs", "tokens", tokens, 0, V)
    acc = _checks.acc_dtype(hidden.dtype)
    logp = hidden.new_empty(tokens.shape, dtype=acc)
    ent = hidden.new_empty((N,), dtype=acc)
    lse = hidden.new_empty((2, N), dtype=acc)
    step = _block_len(V, hidden.element_size(), N)
    for s in range(0, N, step):
        logits = F.linear(hidden[s:s + step], weight, bias)
        logp[s:s + step], ent[s:s + step], lse[:, s:s + step] = _fwd_impl(
            backend, logits, None, tokens[s:s + step], None, temperature, 0.0, "k1")
    return logp, ent, lse


@linear_token_logprobs_fwd.register_fake
def _(hidden, weight, bias, tokens, temperature, with_entropy, backend):
    acc = _checks.acc_dtype(hidden.dtype)
    n = hidden.shape[0]
    return (hidden.new_empty(tokens.shape, dtype=acc), hidden.new_empty((n,), dtype=acc),
            hidden.new_empty((2, n), dtype=acc))


@torch.library.custom_op("rlhf_ops::linear_token_logprobs_bwd", mutates_args=())
def linear_token_logprobs_bwd(grad: Tensor, grad_entropy: Tensor | None, hidden: Tensor,
                              weight: Tensor, bias: Tensor | None, tokens: Tensor, lse: Tensor,
                              entropy: Tensor | None, temperature: float, backend: str
                              ) -> tuple[Tensor, Tensor, Tensor]:
    """(d hidden, d weight, d bias) over vocabulary slices; d bias is [0] without a bias."""
    N, V = hidden.shape[0], weight.shape[0]
    acc = _checks.acc_dtype(hidden.dtype)
    d_weight = torch.empty_like(weight) if N > 0 else torch.zeros_like(weight)  # N > 0: all written
    d_bias = torch.zeros((V if bias is not None else 0,), dtype=acc, device=weight.device)
    # d hidden is a sum over the slices: accumulated in fp32 (fp64); it is the output itself
    # when hidden is in the accumulation dtype
    d_hidden = torch.zeros(hidden.shape, dtype=acc, device=hidden.device)
    if N > 0:
        step = _block_len(N, hidden.element_size(), V)
        for v0 in range(0, V, step):
            w = weight[v0:v0 + step]
            logits = F.linear(hidden, w, None if bias is None else bias[v0:v0 + step])
            dl = _bwd_impl(backend, grad, grad_entropy, logits, tokens, lse, entropy, temperature,
                           inplace=True, col0=v0, vocab=V)
            torch.mm(dl.t(), hidden, out=d_weight[v0:v0 + step])  # one GEMM over every row
            if d_hidden.dtype == dl.dtype:
                d_hidden.addmm_(dl, w)
            else:
                d_hidden += dl @ w
            if bias is not None:
                d_bias[v0:v0 + step] = dl.sum(0, dtype=acc)
    return d_hidden.to(hidden.dtype), d_weight, d_bias.to(weight.dtype)


@linear_token_logprobs_bwd.register_fake
def _(grad, grad_entropy, hidden, weight, bias, tokens, lse, entropy, temperature, backend):
    return (torch.empty_like(hidden), torch.empty_like(weight),
            weight.new_empty((weight.shape[0] if bias is not None else 0,)))


def _ltl_setup(ctx, inputs, output):
    hidden, weight, bias, tokens, temperature, with_entropy, backend = inputs
    ctx.save_for_backward(hidden, weight, bias, tokens, output[2],
                          output[1] if with_entropy else None)
    ctx.args = (temperature, backend)
    ctx.with_entropy = with_entropy
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(output[2])
    if not with_entropy:
        ctx.mark_non_differentiable(output[1])


def _ltl_backward(ctx, g_logp, g_ent, g_lse):
    hidden, weight, bias, tokens, lse, ent = ctx.saved_tensors
    g_logp, g_ent = _grads(g_logp, g_ent, tokens, lse, ctx.with_entropy)
    dh, dw, db = torch.ops.rlhf_ops.linear_token_logprobs_bwd(
        g_logp, g_ent, hidden, weight, bias, tokens, lse, ent if g_ent is not None else None,
        *ctx.args)
    return dh, dw, (db if bias is not None else None), None, None, None, None


linear_token_logprobs_fwd.register_autograd(_ltl_backward, setup_context=_ltl_setup)


# ------------------------------------------------------------------------------ public API ---

def _rows(x: Tensor) -> Tensor:
    """[..., V] → [N, V] with unit stride over V (a copy only when the layout needs one)."""
    x = x.reshape(-1, x.shape[-1])
    return x.contiguous() if x.shape[0] > 0 and x.stride(-1) != 1 else x


def _check_temperature(op, temperature):
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"rlhf_ops.{op}: temperature must be a number, got "
                        f"{type(temperature).__name__}")
    if not 0.0 < float(temperature) < float("inf"):
        raise ValueError(f"rlhf_ops.{op}: temperature must be a finite number > 0, got {temperature}")


def _check_flag(op, name, value):
    if not isinstance(value, bool):
        raise TypeError(f"rlhf_ops.{op}: {name} must be a bool, got {type(value).__name__}")


def _check_tokens(op, tokens, lead, what, multi_ok):
    """tokens [*lead] (one per position) or, when ``multi_ok``, [*lead, K] — the K form is
    recognised by tokens.dim() == len(lead) + 1 (the dimension count of the logits / hidden).
    Returns whether tokens are [..., K]."""
    lead = tuple(lead)
    multi = multi_ok and tokens.dim() == len(lead) + 1
    if multi and tuple(tokens.shape[:-1]) == lead:
        return True
    if tuple(tokens.shape) == lead:
        return False
    want = f"{what} = {lead}" + (f" or {what} + (K,) = {lead + ('K',)}" if multi_ok else "")
    raise ValueError(f"rlhf_ops.{op}: tokens must have shape {want}, got {tuple(tokens.shape)}")


def _check_common(op, logits, tokens, temperature, multi_ok=False):
    _checks.floating(op, "logits", logits, min_ndim=1)
    _checks.index(op, "tokens", tokens)
    _checks.same_device(op, "logits", logits, tokens=tokens)
    if logits.shape[-1] == 0:
        raise ValueError(f"rlhf_ops.{op}: logits must have a non-empty last (vocabulary) "
                         f"dimension, got shape {tuple(logits.shape)}")
    multi = _check_tokens(op, tokens, logits.shape[:-1], "logits.shape[:-1]", multi_ok)
    _check_temperature(op, temperature)
    return multi


def _eager_token_check(op, tokens, V):
    # The fused backends check inside their custom op; the reference would index out of bounds.
    if _backend.debug_checks(tokens.device) and not torch.compiler.is_compiling():
        _checks.in_range(op, "tokens", tokens, 0, V)


def _check_beta(op, beta):
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real):
        raise TypeError(f"rlhf_ops.{op}: beta must be a number, got {type(beta).__name__}")


def _check_estimator(op, estimator):
    if estimator not in ESTIMATORS:
        raise ValueError(f"rlhf_ops.{op}: estimator must be one of {ESTIMATORS}, got {estimator!r}")


def _check_mask(op, mask, shape, what):
    if mask is not None:
        _checks.tensor(op, "mask", mask, dtypes=MASK_DTYPES)
        _checks.shape(op, "mask", mask, shape, what)


def token_logprobs(logits: Tensor, tokens: Tensor, *, temperature: float = 1.0,
                   return_entropy: bool = False, backend: str | None = None):
    """``log_softmax(logits / temperature)`` at ``tokens`` without materialising log_softmax.

    logits [..., V] (fp16/bf16/fp32/fp64). tokens int64, either [...] (= logits.shape[:-1], one
    token per position → logprobs [...]) or [..., K] (tokens.dim() == logits.dim() and
    tokens.shape[:-1] == logits.shape[:-1]: K tokens per position, e.g. top-K candidates or a
    chosen/rejected pair → logprobs [..., K]; the row is still read once, repeated tokens are
    allowed). Result fp32 (fp64 for fp64 logits), differentiable w.r.t. logits.
    ``return_entropy=True`` returns ``(logprobs, entropy)``, entropy [...] = −Σ p·log p of
    softmax(logits / temperature), differentiable (∂H/∂x_j = −p_j·(log p_j + H)/temperature;
    a −inf logit has p_j = 0 and contributes 0 to both H and the gradient).
    A token whose logit is −inf gets −inf (and a finite gradient); a row with a NaN logit, or
    with every logit −inf, gets NaN. Tokens out of [0, V) raise ValueError for CPU tensors (and
    with RLHF_OPS_DEBUG=1); on CUDA without debug checks their log-probs and their row's gradient
    are NaN.
    """
    op = "token_logprobs"
    multi = _check_common(op, logits, tokens, temperature, multi_ok=True)
    _check_flag(op, "return_entropy", return_entropy)
    be = _backend.resolve(op, backend, logits.device)
    if be == "reference":
        _eager_token_check(op, tokens, logits.shape[-1])
        return reference.token_logprobs(logits, tokens, temperature, return_entropy)
    x = _rows(logits)
    t = tokens.reshape(x.shape[0], tokens.shape[-1] if multi else 1).contiguous()
    logp, ent, _ = torch.ops.rlhf_ops.token_logprobs_fwd(x, t, float(temperature), be,
                                                         return_entropy)
    logp = logp.reshape(tokens.shape)
    return (logp, ent.reshape(logits.shape[:-1])) if return_entropy else logp


def linear_token_logprobs(hidden: Tensor, weight: Tensor, tokens: Tensor, *, bias: Tensor | None = None,
                          temperature: float = 1.0, return_entropy: bool = False,
                          backend: str | None = None):
    """``token_logprobs(hidden @ weight.T + bias, tokens, ...)`` without holding all [N, V] logits.

    hidden [..., d]; weight [V, d] (an lm_head or a tied embedding); bias [V] or None; tokens
    int64 [...] (= hidden.shape[:-1]) or [..., K] (tokens.dim() == hidden.dim()), as in
    ``token_logprobs``. Returns logprobs shaped like tokens, fp32 (fp64 for fp64 inputs), and
    with ``return_entropy=True`` the tuple ``(logprobs, entropy [...])``; both are differentiable
    w.r.t. hidden, weight and bias. The fused backends compute the logits in blocks of
    ``LINEAR_BLOCK_BYTES`` (row chunks forward, vocabulary slices backward, cuBLAS matmuls,
    the chosen backend's kernels on each block) and keep for backward only hidden, weight, bias,
    tokens, lse (two numbers per row) and the entropy (one, when asked for). The backward
    holds an fp32 [N, d] accumulator for d hidden; d weight is written slice by slice.
    """
    op = "linear_token_logprobs"
    _checks.floating(op, "hidden", hidden, min_ndim=1)
    _checks.floating(op, "weight", weight, ndim=2)
    _checks.index(op, "tokens", tokens)
    if bias is not None:
        _checks.floating(op, "bias", bias)
    _checks.same_device(op, "hidden", hidden, weight=weight, tokens=tokens, bias=bias)
    _checks.same_dtype(op, "hidden", hidden, weight=weight, bias=bias)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"rlhf_ops.{op}: weight must have shape [V, d] with d = hidden.shape[-1] = "
                         f"{hidden.shape[-1]}, got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"rlhf_ops.{op}: weight must have a non-empty vocabulary (V > 0), got "
                         f"shape {tuple(weight.shape)}")
    if bias is not None:
        _checks.shape(op, "bias", bias, (weight.shape[0],), "[V]")
    multi = _check_tokens(op, tokens, hidden.shape[:-1], "hidden.shape[:-1]", True)
    _check_temperature(op, temperature)
    _check_flag(op, "return_entropy", return_entropy)
    be = _backend.resolve(op, backend, hidden.device)
    V = weight.shape[0]
    if be == "reference":
        _eager_token_check(op, tokens, V)
        return reference.linear_token_logprobs(hidden, weight, tokens, bias, temperature,
                                               return_entropy)
    h = hidden.reshape(-1, hidden.shape[-1])
    t = tokens.reshape(h.shape[0], tokens.shape[-1] if multi else 1).contiguous()
    logp, ent, _ = torch.ops.rlhf_ops.linear_token_logprobs_fwd(h, weight, bias, t,
                                                                float(temperature),
                                                                return_entropy, be)
    logp = logp.reshape(tokens.shape)
    return (logp, ent.reshape(hidden.shape[:-1])) if return_entropy else logp


def kl_penalty(logits: Tensor, ref_logits: Tensor, tokens: Tensor, *, beta: float,
               estimator: str = "k1", mask: Tensor | None = None, temperature: float = 1.0,
               backend: str | None = None) -> KLPenalty:
    """Per-token PPO quantities from policy ``logits`` and frozen ``ref_logits`` [B, T, V]
    (any leading shape) and the sampled ``tokens`` [B, T] int64, in one pass over both.

    Returns ``KLPenalty(logprobs, ref_logprobs, log_ratio, kl, penalty, entropy)``, each
    ``tokens.shape``, fp32 (fp64 for fp64 logits):
      logprobs     log softmax(logits/T)[token]       differentiable
      ref_logprobs same for ref_logits                no gradient (ref_logits get none)
      log_ratio    logprobs − ref_logprobs            differentiable
      kl           k1 = log_ratio, k2 = ½·log_ratio², k3 = exp(−log_ratio) − 1 + log_ratio;
                   differentiable
      penalty      −beta·kl·mask                      no gradient (a reward term)
      entropy      policy entropy −Σ p·log p          differentiable (an entropy bonus trains;
                   a −inf logit contributes 0)
    ``mask`` (bool, float or integer such as an attention mask, ``tokens.shape``) scales only the
    penalty; None means all ones. For stored reference log-probs use ``kl_from_logprobs``.
    """
    op = "kl_penalty"
    _check_common(op, logits, tokens, temperature)
    _checks.floating(op, "ref_logits", ref_logits)
    _checks.same_device(op, "logits", logits, ref_logits=ref_logits, mask=mask)
    _checks.same_dtype(op, "logits", logits, ref_logits=ref_logits)
    _checks.shape(op, "ref_logits", ref_logits, logits.shape, "logits.shape")
    _check_mask(op, mask, tokens.shape, "tokens.shape")
    _check_estimator(op, estimator)
    _check_beta(op, beta)
    be = _backend.resolve(op, backend, logits.device)
    if be == "reference":
        _eager_token_check(op, tokens, logits.shape[-1])
        return reference.kl_penalty(logits, ref_logits, tokens, beta, estimator, mask, temperature)
    acc = _checks.acc_dtype(logits.dtype)
    m = None if mask is None else mask.reshape(-1).to(acc).contiguous()
    out = torch.ops.rlhf_ops.kl_penalty_fwd(_rows(logits), _rows(ref_logits),
                                            tokens.reshape(-1).contiguous(), m,
                                            float(beta), estimator, float(temperature), be)
    return KLPenalty(*(o.reshape(tokens.shape) for o in out[:6]))


def kl_from_logprobs(logprobs: Tensor, ref_logprobs: Tensor, *, beta: float, estimator: str = "k1",
                     mask: Tensor | None = None) -> KLPenalty:
    """``kl_penalty``'s fields from per-token log-probs, for trainers that stored the reference
    model's log-probs (e.g. [B, T]) instead of its logits. Plain torch ops, no kernel.

    logprobs and ref_logprobs: float tensors of one shape (any), on one device. Returns
    ``KLPenalty(logprobs, ref_logprobs, log_ratio, kl, penalty, entropy=None)`` in fp32 (fp64 when
    either input is fp64), with the same estimators (k1 = d, k2 = ½d², k3 = e^{−d} − 1 + d for
    d = logprobs − ref_logprobs; k3 by its Taylor series for |d| < ½ below fp64, as the kernels)
    and masking (``mask`` bool / float / integer of the same shape scales only the penalty).
    Differentiable w.r.t. ``logprobs`` only: ref_logprobs and penalty carry no gradient.
    """
    op = "kl_from_logprobs"
    _checks.floating(op, "logprobs", logprobs)
    _checks.floating(op, "ref_logprobs", ref_logprobs)
    _checks.same_device(op, "logprobs", logprobs, ref_logprobs=ref_logprobs, mask=mask)
    _checks.shape(op, "ref_logprobs", ref_logprobs, logprobs.shape, "logprobs.shape")
    _check_mask(op, mask, logprobs.shape, "logprobs.shape")
    _check_estimator(op, estimator)
    _check_beta(op, beta)
    if not abs(float(beta)) < float("inf"):
        raise ValueError(f"rlhf_ops.{op}: beta must be finite, got {beta}")
    return reference.kl_from_logprobs(logprobs, ref_logprobs, float(beta), estimator, mask)


def ppo_rewards(penalty: Tensor, scores: Tensor, mask: Tensor) -> Tensor:
    """Per-token PPO reward: ``penalty`` [..., T] plus each row's reward-model ``scores`` [...] at
    its last real token (the last position where ``mask`` [..., T] is set; left padding works).
    A row whose mask is all zero gets no score."""
    op = "ppo_rewards"
    _checks.floating(op, "penalty", penalty, min_ndim=1)
    _checks.floating(op, "scores", scores)
    _checks.tensor(op, "mask", mask, dtypes=MASK_DTYPES)
    _checks.same_device(op, "penalty", penalty, scores=scores, mask=mask)
    _checks.shape(op, "mask", mask, penalty.shape, "penalty.shape")
    _checks.shape(op, "scores", scores, penalty.shape[:-1], "penalty.shape[:-1]")
    return reference.ppo_rewards(penalty, scores, mask)
