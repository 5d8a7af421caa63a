"""Per-token log-probabilities and entropy, from logits or straight from hidden states
(InstructGPT stage 4; ``kl.py`` builds the KL penalty on the same kernels).

Follows the op pattern of ``cross_entropy.py``: validation → ``_backend.resolve`` →
``reference`` (eager, ``reference.py``) or ``rlhf_ops::`` custom ops whose bodies run the Triton
launchers (``rlhf_ops.kernels.kl``) or ``torch.ops.rlhf_ops_cuda.kl_fwd`` / ``kl_bwd``.

Forward per row, y = logits / T (T divides inside the kernels, no scaled copy), t_1..t_K = the
row's tokens (K = 1 for tokens [...]):
    lse  = log Σ_j exp(y_j)                         (online softmax, one read of each row)
    logp_k = y_{t_k} − lse,   entropy H = −Σ p·log p = lse − Σ_j p_j·y_j   (p = softmax(y))
Saved for backward: the logits (which exist anyway), the tokens, lse (as the pair shift, log S:
[2, N]) and the entropy [N] when it is differentiable.
Backward, one sweep over the row, with upstream gradients G_k (log-probs) and G_H (entropy):
    ∂logp_k/∂x_j = ([j = t_k] − p_j)/T,   ∂H/∂x_j = −p_j·(log p_j + H)/T
    d logits_j = (Σ_k G_k·[j = t_k] − (Σ_k G_k)·p_j − G_H·p_j·(log p_j + H)) / T
where p_j = 0 (a −inf logit) contributes 0 to the entropy term (0·log 0 = 0).

``linear_token_logprobs`` runs the same kernels on logits computed one block at a time from
hidden [N, d] and weight [V, d] (cuBLAS matmuls, never all [N, V] logits):
  forward  — row chunks: logits = hidden[rows] @ Wᵀ + b, then the fused forward on the chunk;
             kept per row: lse [2, N] and the entropy [N] (when asked for);
  backward — vocabulary slices: logits[:, v0:v1] recomputed for all rows, turned into their
             gradient by the fused backward (which knows lse and H, so a slice suffices), then
             dW[v0:v1] = dlogitsᵀ·hidden in one GEMM over all rows (fp32 accumulation inside
             the GEMM, rounded once to W's dtype, as eager), d hidden += dlogits·W[v0:v1] in an
             fp32 [N, d] accumulator, d bias[v0:v1] = Σ_rows dlogits in fp32.

Vocabulary parallel (``process_group=``, or DTensor inputs sharded over the vocabulary): the
logits (``weight`` for the linear op) are this rank's slice; the unchanged fused forward runs on
the slice with the tokens it owns mapped to local ids, ``rlhf_ops.distributed`` turns its
outputs into per-row statistics, gathers and combines them into the full-vocabulary log-probs,
entropy and lse (identical on every rank). The backward above runs on the slice against the
global lse and entropy with col0 = 0 and vocab = V_r + 1: an owned token is its local column,
another rank's token the id V_r (valid, outside the slice: no one-hot), a token no rank owns −1
(a NaN row, as unsharded). The linear op sums d hidden over the ranks.

Logit softcap (``softcap`` = c > 0, Gemma-2's ``final_logit_softcapping``): the kernels cap each
logit as they read it, then the temperature divides — y = c·tanh(x/c) / T, Gemma's order (the
model caps its logits; sampling at temperature T divides them) —, so every formula above holds
for y; the backward multiplies d logits_j by 1 − tanh²(x_j/c). −inf stays −inf
(``reference.softcap_logits``). Nothing V-sized is kept for it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _backend, _checks, _layout, _vocab_stats, context_parallel, distributed, reference


def _fwd_impl(backend: str, logits: Tensor, ref_logits: Tensor | None, tokens: Tensor,
              mask: Tensor | None, temperature: float, beta: float, estimator: str,
              softcap: float = 0.0):
    est = reference.ESTIMATOR_IDS[estimator]   # the kernels take the estimator's id
    if backend == "triton":
        return _backend.triton_kernels("kl").forward(logits, ref_logits, tokens, mask, temperature,
                                                     beta, est, softcap)
    return tuple(torch.ops.rlhf_ops_cuda.kl_fwd(logits, ref_logits, tokens, mask, temperature, beta,
                                                est, softcap))


def _bwd_impl(backend: str, grad, grad_entropy, logits, tokens, lse, entropy, temperature: float,
              inplace: bool = False, col0: int = 0, vocab: int = -1, softcap: float = 0.0) -> Tensor:
    """The fused backward; ``inplace`` lets Triton write over ``logits`` (CUDA returns a new
    tensor: its token pass reads the logits after the dense pass)."""
    if backend == "triton":
        return _backend.triton_kernels("kl").backward(
            grad, grad_entropy, logits, tokens, lse, entropy, temperature,
            out=logits if inplace else None, col0=col0, vocab=None if vocab < 0 else vocab,
            softcap=softcap)
    return torch.ops.rlhf_ops_cuda.kl_bwd(grad, grad_entropy, logits, tokens, lse, entropy,
                                          temperature, col0, vocab, softcap)


def _grads(g_logp: Tensor | None, g_ent: Tensor | None, tokens: Tensor, lse: Tensor, with_entropy: bool):
    """Upstream gradients as the backward ops take them: a None log-prob gradient (the output
    unused) becomes zeros; an unused or non-differentiable entropy gives None."""
    if g_logp is None:
        g_logp = torch.zeros(tokens.shape, dtype=lse.dtype, device=lse.device)
    return g_logp, (g_ent if with_entropy else None)


# ------------------------------------------------------------------------------ custom ops ---
# ``softcap`` (last, default 0 = off) is c of the logit softcap in every op below.

@torch.library.custom_op("rlhf_ops::token_logprobs_fwd", mutates_args=())
def token_logprobs_fwd(logits: Tensor, tokens: Tensor, temperature: float, backend: str,
                       with_entropy: bool = False, softcap: float = 0.0
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """logits [N, V] (unit stride over V), tokens [N, K] (or [N]) int64 → (logprobs (tokens'
    shape), entropy [N], lse [2, N]); lse is kept as the pair (shift, log Σ exp(y − shift)) so
    that it loses no precision. ``with_entropy`` only says whether the entropy is
    differentiable."""
    if _backend.debug_checks(logits.device):
        _checks.in_range("token_logprobs", "tokens", tokens, 0, logits.shape[1])
    return tuple(_fwd_impl(backend, logits, None, tokens, None, temperature, 0.0, "k1", softcap))


@token_logprobs_fwd.register_fake
def _(logits, tokens, temperature, backend, with_entropy=False, softcap=0.0):
    acc = _checks.acc_dtype(logits.dtype)
    n = logits.shape[0]
    return (logits.new_empty(tokens.shape, dtype=acc), logits.new_empty((n,), dtype=acc),
            logits.new_empty((2, n), dtype=acc))


@torch.library.custom_op("rlhf_ops::token_logprobs_bwd", mutates_args=())
def token_logprobs_bwd(grad: Tensor, logits: Tensor, tokens: Tensor, lse: Tensor,
                       temperature: float, backend: str, grad_entropy: Tensor | None = None,
                       entropy: Tensor | None = None, col0: int = 0, vocab: int = -1,
                       softcap: float = 0.0) -> Tensor:
    """grad (tokens' shape: G), grad_entropy [N] or None (G_H, with the forward's entropy [N])
    → d logits as a new [N, V] tensor in the logits dtype. ``col0``/``vocab``: the logits are
    the columns [col0, col0 + W) of ``vocab``-wide rows (vocabulary parallel; default: whole)."""
    return _bwd_impl(backend, grad, grad_entropy, logits, tokens, lse, entropy, temperature,
                     col0=col0, vocab=vocab, softcap=softcap)


@token_logprobs_bwd.register_fake
def _(grad, logits, tokens, lse, temperature, backend, grad_entropy=None, entropy=None, col0=0,
      vocab=-1, softcap=0.0):
    return torch.empty_like(logits)


def _mark_outputs(ctx, output, with_entropy: bool) -> None:
    """What every log-prob custom op tells autograd about its outputs (logprobs, entropy, lse[,
    backward token ids | logit statistics]): an unused output's gradient arrives as None; lse,
    the token ids and the statistics get none; the entropy only when it was asked for
    (``with_entropy``)."""
    ctx.with_entropy = with_entropy
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(*output[2:])
    if not with_entropy:
        ctx.mark_non_differentiable(output[1])


def _tl_setup(ctx, inputs, output):
    logits, tokens, temperature, backend, with_entropy, softcap = inputs
    ctx.save_for_backward(logits, tokens, output[2], output[1] if with_entropy else None)
    ctx.args = (temperature, backend)
    ctx.softcap = softcap
    _mark_outputs(ctx, output, with_entropy)


def _tl_backward(ctx, g_logp, g_ent, g_lse):
    logits, tokens, lse, ent = ctx.saved_tensors
    g_logp, g_ent = _grads(g_logp, g_ent, tokens, lse, ctx.with_entropy)
    grad = torch.ops.rlhf_ops.token_logprobs_bwd(g_logp, logits, tokens, lse, *ctx.args, g_ent,
                                                 ent if g_ent is not None else None,
                                                 softcap=ctx.softcap)
    return grad, None, None, None, None, None


token_logprobs_fwd.register_autograd(_tl_backward, setup_context=_tl_setup)


# --------------------------------------------------------------- linear token log-probs ops ---

@torch.library.custom_op("rlhf_ops::linear_token_logprobs_fwd", mutates_args=())
def linear_token_logprobs_fwd(hidden: Tensor, weight: Tensor, bias: Tensor | None, tokens: Tensor,
                              temperature: float, with_entropy: bool, backend: str,
                              with_stats: bool = False, softcap: float = 0.0
                              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """hidden [N, d], weight [V, d], tokens [N, K] → (logprobs [N, K], entropy [N], lse [2, N],
    is_top1 [N, K] bool, mean_logit [N]); logits exist one row chunk [rows, V] at a time. The last
    two (empty, [0, K] and [0], unless ``with_stats``) are reductions of the same chunk on every
    backend (reference.logit_stats: the token is the chunk row's first argmax; Σ logits / (V·T))."""
    N, V = hidden.shape[0], weight.shape[0]
    if _backend.debug_checks(hidden.device):
        _checks.in_range("linear_token_logprobs", "tokens", tokens, 0, V)
    acc = _checks.acc_dtype(hidden.dtype)
    logp = hidden.new_empty(tokens.shape, dtype=acc)
    ent = hidden.new_empty((N,), dtype=acc)
    lse = hidden.new_empty((2, N), dtype=acc)
    n_stats = N if with_stats else 0
    top1 = hidden.new_empty((n_stats, tokens.shape[1]), dtype=torch.bool)
    mean = hidden.new_empty((n_stats,), dtype=acc)
    step = _layout.block_len(V, hidden.element_size(), N)
    for s in range(0, N, step):
        logits = F.linear(hidden[s:s + step], weight, bias)
        if with_stats:
            top1[s:s + step], mean[s:s + step] = reference.logit_stats(logits, tokens[s:s + step],
                                                                       temperature, softcap)
        logp[s:s + step], ent[s:s + step], lse[:, s:s + step] = _fwd_impl(
            backend, logits, None, tokens[s:s + step], None, temperature, 0.0, "k1", softcap)
    return logp, ent, lse, top1, mean


@linear_token_logprobs_fwd.register_fake
def _(hidden, weight, bias, tokens, temperature, with_entropy, backend, with_stats=False,
      softcap=0.0):
    acc = _checks.acc_dtype(hidden.dtype)
    n = hidden.shape[0]
    n_stats = n if with_stats else 0
    return (hidden.new_empty(tokens.shape, dtype=acc), hidden.new_empty((n,), dtype=acc),
            hidden.new_empty((2, n), dtype=acc),
            hidden.new_empty((n_stats, tokens.shape[1]), dtype=torch.bool),
            hidden.new_empty((n_stats,), dtype=acc))


@torch.library.custom_op("rlhf_ops::linear_token_logprobs_bwd", mutates_args=())
def linear_token_logprobs_bwd(grad: Tensor, grad_entropy: Tensor | None, hidden: Tensor,
                              weight: Tensor, bias: Tensor | None, tokens: Tensor, lse: Tensor,
                              entropy: Tensor | None, temperature: float, backend: str,
                              vocab: int = -1, group: str = "", softcap: float = 0.0
                              ) -> tuple[Tensor, Tensor, Tensor]:
    """(d hidden, d weight, d bias) over vocabulary slices; d bias is [0] without a bias.
    Vocabulary parallel: ``vocab`` is the row width the kernels check tokens against (V_r + 1,
    see the module docstring) and d hidden is summed over the process group ``group``."""
    N, V = hidden.shape[0], weight.shape[0]
    V_k = V if vocab < 0 else vocab
    acc = _checks.acc_dtype(hidden.dtype)
    d_weight = torch.empty_like(weight) if N > 0 else torch.zeros_like(weight)  # N > 0: all written
    d_bias = torch.zeros((V if bias is not None else 0,), dtype=acc, device=weight.device)
    # d hidden is a sum over the slices: accumulated in fp32 (fp64); it is the output itself
    # when hidden is in the accumulation dtype
    d_hidden = torch.zeros(hidden.shape, dtype=acc, device=hidden.device)
    if N > 0:
        step = _layout.block_len(N, hidden.element_size(), V)
        for v0 in range(0, V, step):
            w = weight[v0:v0 + step]
            logits = F.linear(hidden, w, None if bias is None else bias[v0:v0 + step])
            dl = _bwd_impl(backend, grad, grad_entropy, logits, tokens, lse, entropy, temperature,
                           inplace=True, col0=v0, vocab=V_k, softcap=softcap)
            torch.mm(dl.t(), hidden, out=d_weight[v0:v0 + step])  # one GEMM over every row
            if d_hidden.dtype == dl.dtype:
                d_hidden.addmm_(dl, w)
            else:
                d_hidden += dl @ w
            if bias is not None:
                d_bias[v0:v0 + step] = dl.sum(0, dtype=acc)
    if group:  # column-parallel head: d hidden = Σ_ranks (this slice's part), in fp32 (fp64)
        distributed.all_reduce_(d_hidden, group)
    return d_hidden.to(hidden.dtype), d_weight, d_bias.to(weight.dtype)


@linear_token_logprobs_bwd.register_fake
def _(grad, grad_entropy, hidden, weight, bias, tokens, lse, entropy, temperature, backend,
      vocab=-1, group="", softcap=0.0):
    return (torch.empty_like(hidden), torch.empty_like(weight),
            weight.new_empty((weight.shape[0] if bias is not None else 0,)))


def _ltl_setup(ctx, inputs, output):
    hidden, weight, bias, tokens, temperature, with_entropy, backend, with_stats, softcap = inputs
    ctx.save_for_backward(hidden, weight, bias, tokens, output[2],
                          output[1] if with_entropy else None)
    ctx.args = (temperature, backend)
    ctx.softcap = softcap
    _mark_outputs(ctx, output, with_entropy)


def _ltl_backward(ctx, g_logp, g_ent, g_lse, g_top1, g_mean):
    hidden, weight, bias, tokens, lse, ent = ctx.saved_tensors
    g_logp, g_ent = _grads(g_logp, g_ent, tokens, lse, ctx.with_entropy)
    dh, dw, db = torch.ops.rlhf_ops.linear_token_logprobs_bwd(
        g_logp, g_ent, hidden, weight, bias, tokens, lse, ent if g_ent is not None else None,
        *ctx.args, softcap=ctx.softcap)
    return dh, dw, (db if bias is not None else None), None, None, None, None, None, None


linear_token_logprobs_fwd.register_autograd(_ltl_backward, setup_context=_ltl_setup)


# ------------------------------------------------------------ vocabulary-parallel ops ---
# Each runs the fused forward on this rank's slice and hands the slice statistics to
# ``distributed.combine_slices`` (gathered over the group named ``group``, combined by
# ``_vocab_stats``); the last output holds the token ids for the sharded backward
# (``_vocab_stats.backward_tokens``).

def _slice_stats(backend, logits, tokens, offset, temperature, softcap=0.0):
    """LP_STATS [3 + 2K, N] of a slice [N, V_r] from the fused forward."""
    owned, t_fwd = _vocab_stats.local_tokens(tokens, offset, logits.shape[1])
    logp, ent, lse = _fwd_impl(backend, logits, None, t_fwd, None, temperature, 0.0, "k1", softcap)
    return _vocab_stats.logprob_stats(lse, ent, logp, owned)


def _vp_combine(stats, V_r, K, tokens, offset, group):
    def combine(G, sizes):
        logp, ent, lse = _vocab_stats.logprobs_combine(G, K)
        return (logp.contiguous(), ent, lse, _vocab_stats.backward_tokens(tokens, offset, V_r, sizes))
    return distributed.combine_slices(stats, V_r, group, combine)


@torch.library.custom_op("rlhf_ops::token_logprobs_vp_fwd", mutates_args=())
def token_logprobs_vp_fwd(logits: Tensor, tokens: Tensor, offset: Tensor, temperature: float,
                          backend: str, group: str, with_entropy: bool = False,
                          softcap: float = 0.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """logits [N, V_r] = this rank's slice from global id ``offset`` (int64 [1]), tokens [N, K]
    global ids → (logprobs [N, K], entropy [N], global lse [2, N], backward token ids [N, K])."""
    stats = _slice_stats(backend, logits, tokens, offset, temperature, softcap)
    return _vp_combine(stats, logits.shape[1], tokens.shape[1], tokens, offset, group)


@token_logprobs_vp_fwd.register_fake
def _(logits, tokens, offset, temperature, backend, group, with_entropy=False, softcap=0.0):
    acc = _checks.acc_dtype(logits.dtype)
    n = logits.shape[0]
    return (logits.new_empty(tokens.shape, dtype=acc), logits.new_empty((n,), dtype=acc),
            logits.new_empty((2, n), dtype=acc), torch.empty_like(tokens))


def _tl_vp_setup(ctx, inputs, output):
    logits, tokens, offset, temperature, backend, group, with_entropy, softcap = inputs
    ctx.save_for_backward(logits, output[3], output[2], output[1] if with_entropy else None)
    ctx.args = (temperature, backend)
    ctx.softcap = softcap
    _mark_outputs(ctx, output, with_entropy)


def _tl_vp_backward(ctx, g_logp, g_ent, g_lse, g_tok):
    # no communication: this slice's part of the full-vocabulary gradient
    logits, t_bwd, lse, ent = ctx.saved_tensors
    g_logp, g_ent = _grads(g_logp, g_ent, t_bwd, lse, ctx.with_entropy)
    grad = torch.ops.rlhf_ops.token_logprobs_bwd(g_logp, logits, t_bwd, lse, *ctx.args, g_ent,
                                                 ent if g_ent is not None else None, 0,
                                                 logits.shape[1] + 1, ctx.softcap)
    return grad, None, None, None, None, None, None, None


token_logprobs_vp_fwd.register_autograd(_tl_vp_backward, setup_context=_tl_vp_setup)


@torch.library.custom_op("rlhf_ops::linear_token_logprobs_vp_fwd", mutates_args=())
def linear_token_logprobs_vp_fwd(hidden: Tensor, weight: Tensor, bias: Tensor | None,
                                 tokens: Tensor, offset: Tensor, temperature: float,
                                 with_entropy: bool, backend: str, group: str, softcap: float = 0.0
                                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """weight [V_r, d] (bias [V_r]) = this rank's rows from global id ``offset`` → as
    ``token_logprobs_vp_fwd``; logits exist one row chunk [rows, V_r] at a time."""
    N, V_r = hidden.shape[0], weight.shape[0]
    K = tokens.shape[1]
    stats = hidden.new_empty((3 + 2 * K, N), dtype=_checks.acc_dtype(hidden.dtype))
    step = _layout.block_len(V_r, hidden.element_size(), N)
    for s in range(0, N, step):
        logits = F.linear(hidden[s:s + step], weight, bias)
        stats[:, s:s + step] = _slice_stats(backend, logits, tokens[s:s + step], offset, temperature,
                                            softcap)
    return _vp_combine(stats, V_r, K, tokens, offset, group)


@linear_token_logprobs_vp_fwd.register_fake
def _(hidden, weight, bias, tokens, offset, temperature, with_entropy, backend, group, softcap=0.0):
    acc = _checks.acc_dtype(hidden.dtype)
    n = hidden.shape[0]
    return (hidden.new_empty(tokens.shape, dtype=acc), hidden.new_empty((n,), dtype=acc),
            hidden.new_empty((2, n), dtype=acc), torch.empty_like(tokens))


def _ltl_vp_setup(ctx, inputs, output):
    hidden, weight, bias, tokens, offset, temperature, with_entropy, backend, group, softcap = inputs
    ctx.save_for_backward(hidden, weight, bias, output[3], output[2],
                          output[1] if with_entropy else None)
    ctx.args = (temperature, backend, weight.shape[0] + 1, group, softcap)
    _mark_outputs(ctx, output, with_entropy)


def _ltl_vp_backward(ctx, g_logp, g_ent, g_lse, g_tok):
    hidden, weight, bias, t_bwd, lse, ent = ctx.saved_tensors
    g_logp, g_ent = _grads(g_logp, g_ent, t_bwd, lse, ctx.with_entropy)
    dh, dw, db = torch.ops.rlhf_ops.linear_token_logprobs_bwd(
        g_logp, g_ent, hidden, weight, bias, t_bwd, lse, ent if g_ent is not None else None,
        *ctx.args)
    return dh, dw, (db if bias is not None else None), None, None, None, None, None, None, None


linear_token_logprobs_vp_fwd.register_autograd(_ltl_vp_backward, setup_context=_ltl_vp_setup)


# ------------------------------------------------------------------------------ public API ---

def _check_common(op, logits, tokens, temperature, softcap=0.0, multi_ok=False):
    _checks.floating(op, "logits", logits, min_ndim=1)
    _checks.index(op, "tokens", tokens)
    _checks.same_device(op, "logits", logits, tokens=tokens)
    if logits.shape[-1] == 0:
        raise ValueError(f"rlhf_ops.{op}: logits must have a non-empty last (vocabulary) "
                         f"dimension, got shape {tuple(logits.shape)}")
    multi = _checks.tokens(op, tokens, logits.shape[:-1], "logits.shape[:-1]", multi_ok)
    _checks.temperature(op, temperature)
    _checks.softcap(op, softcap)
    return multi


def token_logprobs(logits: Tensor, tokens: Tensor, *, temperature: float = 1.0,
                   return_entropy: bool = False, softcap: float = 0.0, backend: str | None = None,
                   process_group=None, vocab_offset: int | None = None):
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

    ``softcap`` = c > 0 (a finite float; 0 = off): the logits are soft-capped first, as Gemma-2's
    ``final_logit_softcapping``, and the temperature divides the capped logits:
    log_softmax(c·tanh(logits/c) / temperature) — the model caps its logits, sampling at a
    temperature divides them. Log-probs, entropy and their gradients (× 1 − tanh²(logits/c)) are
    those of the capped distribution, on every backend. A −inf logit stays −inf (masked).

    Vocabulary parallel: with ``process_group``, ``logits`` [..., V_r] is this rank's contiguous
    vocabulary slice (rank order, sizes may differ), ``tokens`` hold global ids and are the same
    on every rank; log-probs and entropy are the full-vocabulary ones on every rank, the
    gradient reaches each rank's slice (``vocab_offset`` and DTensor logits sharded Shard(-1):
    as in ``cross_entropy``).
    """
    op = "token_logprobs"
    call = distributed.VocabCall(op, "logits", logits, -1, process_group, vocab_offset)
    logits = call.local
    with call.checks():
        tokens = call.replicated("tokens", tokens)
        multi = _check_common(op, logits, tokens, temperature, softcap, multi_ok=True)
        _checks.flag(op, "return_entropy", return_entropy)
        be = _backend.resolve(op, backend, logits.device)
    softcap = float(softcap)
    if call.parallel:
        return call.wrap(_token_logprobs_vp(call, logits, tokens, multi, float(temperature),
                                            return_entropy, be, softcap))
    if be == "reference":
        _checks.eager_in_range(op, "tokens", tokens, 0, logits.shape[-1])
        return reference.token_logprobs(logits, tokens, temperature, return_entropy, softcap)
    x = _layout.rows(logits)
    t = tokens.reshape(x.shape[0], tokens.shape[-1] if multi else 1).contiguous()
    logp, ent, _ = torch.ops.rlhf_ops.token_logprobs_fwd(x, t, float(temperature), be,
                                                         return_entropy, softcap)
    logp = logp.reshape(tokens.shape)
    return (logp, ent.reshape(logits.shape[:-1])) if return_entropy else logp


def linear_token_logprobs(hidden: Tensor, weight: Tensor, tokens: Tensor, *, bias: Tensor | None = None,
                          temperature: float = 1.0, return_entropy: bool = False,
                          return_stats: bool = False, softcap: float = 0.0,
                          backend: str | None = None,
                          process_group=None, vocab_offset: int | None = None,
                          weight_shard: str = "vocab"):
    """``token_logprobs(hidden @ weight.T + bias, tokens, ...)`` without holding all [N, V] logits.

    hidden [..., d]; weight [V, d] (an lm_head or a tied embedding); bias [V] or None; tokens
    int64 [...] (= hidden.shape[:-1]) or [..., K] (tokens.dim() == hidden.dim()), as in
    ``token_logprobs``. Returns logprobs shaped like tokens, fp32 (fp64 for fp64 inputs), and
    with ``return_entropy=True`` the tuple ``(logprobs, entropy [...])``; both are differentiable
    w.r.t. hidden, weight and bias. The fused backends compute the logits in blocks of
    ``_layout.LINEAR_BLOCK_BYTES`` (row chunks forward, vocabulary slices backward, cuBLAS matmuls,
    the chosen backend's kernels on each block) and keep for backward only hidden, weight, bias,
    tokens, lse (two numbers per row) and the entropy (one, when asked for). The backward
    holds an fp32 [N, d] accumulator for d hidden; d weight is written slice by slice.

    ``return_stats=True`` appends two per-token/per-row statistics of the same logits, computed
    in the same forward sweep (reductions of each row chunk, no second matmul), without
    gradient: ``is_top1`` (tokens' shape, bool: the token is its row's first maximum logit, as
    argmax) and ``mean_logit`` [...] (the mean over the vocabulary of logits / temperature) —
    what TRL's fused head reports as token accuracy and mean logits. Not with vocabulary
    parallelism.

    ``softcap`` = c > 0: the logits are c·tanh((hidden @ weight.T + bias)/c) before the temperature
    divides them, as in ``token_logprobs`` (Gemma-2's ``final_logit_softcapping``); the gradients
    of hidden, weight and bias carry the factor 1 − tanh². ``mean_logit`` is then the mean of the
    capped logits / T; ``is_top1`` is read from the raw logits, whose argmax is the capped ones'
    (tanh is strictly increasing; in finite precision capping can only merge nearly equal large
    logits into ties, which the raw logits break). Nothing V-sized is kept for it.

    Vocabulary parallel (``process_group``, ``vocab_offset``): ``weight`` [V_r, d] and ``bias``
    [V_r] are this rank's rows of the head (a column-parallel layer), ``hidden`` and ``tokens``
    the same on every rank; the results are the full-vocabulary ones on every rank, ``weight``
    and ``bias`` get their slice's gradient, ``hidden`` the sum over the ranks (one all_reduce
    of [N, d] in the backward). A DTensor ``weight`` (and ``bias``) sharded Shard(0) on a 1-D
    mesh is accepted instead of ``process_group``. ``weight_shard="fsdp"``: such a weight is
    FSDP2's data-parallel shard instead (fully_shard): the op runs on the gathered weight and its
    gradient comes back as a Shard(0) DTensor holding the mean over the ranks.
    """
    op = "linear_token_logprobs"
    weight, bias = context_parallel.head_weights(op, hidden, weight, bias, weight_shard, process_group)
    call = distributed.VocabCall(op, "weight", weight, 0, process_group, vocab_offset)
    weight, bias = call.local, call.sharded("bias", bias)
    with call.checks():
        hidden = call.replicated("hidden", hidden)
        tokens = call.replicated("tokens", tokens)
        multi, be = _check_linear(op, hidden, weight, tokens, bias, temperature, return_entropy,
                                  softcap, backend)
        _checks.flag(op, "return_stats", return_stats)
    softcap = float(softcap)
    if call.parallel:
        if return_stats:
            raise ValueError(f"rlhf_ops.{op}: return_stats=True is not supported with vocabulary "
                             f"parallelism (process_group / a sharded weight)")
        return call.wrap(_linear_token_logprobs_vp(call, hidden, weight, tokens, bias, multi,
                                                   float(temperature), return_entropy, be, softcap))
    V = weight.shape[0]
    if be == "reference":
        _checks.eager_in_range(op, "tokens", tokens, 0, V)
        return reference.linear_token_logprobs(hidden, weight, tokens, bias, temperature,
                                               return_entropy, return_stats, softcap)
    h = hidden.reshape(-1, hidden.shape[-1])
    t = tokens.reshape(h.shape[0], tokens.shape[-1] if multi else 1).contiguous()
    logp, ent, _, top1, mean = torch.ops.rlhf_ops.linear_token_logprobs_fwd(
        h, weight, bias, t, float(temperature), return_entropy, be, return_stats, softcap)
    out = (logp.reshape(tokens.shape),) + ((ent.reshape(hidden.shape[:-1]),) if return_entropy else ())
    if return_stats:
        out += (top1.reshape(tokens.shape), mean.reshape(hidden.shape[:-1]))
    return out if len(out) > 1 else out[0]


def _check_linear(op, hidden, weight, tokens, bias, temperature, return_entropy, softcap, backend):
    """Validate linear_token_logprobs' inputs → (tokens are [..., K], the backend)."""
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
    multi = _checks.tokens(op, tokens, hidden.shape[:-1], "hidden.shape[:-1]", True)
    _checks.temperature(op, temperature)
    _checks.softcap(op, softcap)
    _checks.flag(op, "return_entropy", return_entropy)
    return multi, _backend.resolve(op, backend, hidden.device)


def _lp_results(logp, ent, tokens, lead, return_entropy):
    logp = logp.reshape(tokens.shape)
    return (logp, ent.reshape(lead)) if return_entropy else logp


def _logprobs_combine(K):
    """The reference path's combination: (logprobs [N, K], entropy [N])."""
    return lambda G, sizes: _vocab_stats.logprobs_combine(G, K)[:2]


def _token_logprobs_vp(call, logits, tokens, multi, temperature, return_entropy, be, softcap):
    op = "token_logprobs"
    x = _layout.rows(logits)
    t = tokens.reshape(x.shape[0], tokens.shape[-1] if multi else 1).contiguous()
    logp, ent = call.run(
        be, "tokens", t, x.shape[1],
        distributed.settings(op, "tokens", tokens.shape, logits.dtype, temperature=temperature,
                             return_entropy=return_entropy, softcap=softcap),
        reference=lambda offset: _vocab_stats.logprob_stats_reference(x, t, offset, temperature,
                                                                      softcap),
        combine=_logprobs_combine(t.shape[1]),
        fused=lambda gname, offset: torch.ops.rlhf_ops.token_logprobs_vp_fwd(
            x, t, offset, temperature, be, gname, return_entropy, softcap)[:2])
    return _lp_results(logp, ent, tokens, logits.shape[:-1], return_entropy)


def _linear_token_logprobs_vp(call, hidden, weight, tokens, bias, multi, temperature,
                              return_entropy, be, softcap):
    op = "linear_token_logprobs"
    h = hidden.reshape(-1, hidden.shape[-1])
    t = tokens.reshape(h.shape[0], tokens.shape[-1] if multi else 1).contiguous()

    def reference_stats(offset):  # eager logits of the slice; hidden's gradient summed over ranks
        logits = F.linear(distributed.replicated_input(h, call.group), weight, bias)
        return _vocab_stats.logprob_stats_reference(logits, t, offset, temperature, softcap)

    logp, ent = call.run(
        be, "tokens", t, weight.shape[0],
        distributed.settings(op, "tokens", tokens.shape, hidden.dtype, temperature=temperature,
                             return_entropy=return_entropy, softcap=softcap, d=hidden.shape[-1],
                             bias=bias is not None),
        reference=reference_stats, combine=_logprobs_combine(t.shape[1]),
        fused=lambda gname, offset: torch.ops.rlhf_ops.linear_token_logprobs_vp_fwd(
            h, weight, bias, t, offset, temperature, return_entropy, be, gname, softcap)[:2])
    return _lp_results(logp, ent, tokens, hidden.shape[:-1], return_entropy)
