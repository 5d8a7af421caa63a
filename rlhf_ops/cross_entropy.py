"""Fused softmax cross-entropy (L1 / L2 of InstructGPT) and its linear-head variant.

Op pattern (every op module follows it):
  * the public function validates its inputs and picks a backend (``_backend.resolve``);
  * ``reference`` runs the eager definition in ``reference.py`` with plain autograd;
  * ``triton`` / ``cuda`` run ``torch.library.custom_op``s in the ``rlhf_ops`` namespace, whose
    bodies call the Triton launchers (``rlhf_ops.kernels.cross_entropy``) or the CUDA ops
    (``torch.ops.rlhf_ops_cuda.*``); fake implementations give shapes for meta tensors and
    torch.compile, ``register_autograd`` wires the backward op.

Forward per row (fp32 accumulation, fp64 for fp64 logits):
    lse  = m + log Σ_j exp(x_j − m), m = max_j x_j     (online softmax, one read of the row)
    loss = lse − (1−ε)·x_t − ε·mean_j x_j              (label smoothing ε; 0 for ignored rows)
saving lse as the pair (m, log Σ) per row, [2, N] (``_layout``), so that neither the loss nor the backward's
softmax_j = exp((x_j − m) − log Σ) pays for rounding m + log Σ (ulp(m)/2 in fp32).
Backward per element:
    ∂loss/∂x_j = g · (softmax_j − (1−ε)·[j = t] − ε/V)

Vocabulary parallel (``process_group=``, or a DTensor sharded over the vocabulary): ``logits``
(``weight`` for the linear op) is this rank's contiguous slice of the vocabulary, targets are
global ids. The kernels write per-row statistics of the slice (``local_stats``), which
``rlhf_ops.distributed`` gathers and combines into the full-vocabulary loss and lse; the backward
above then runs on the slice against that global lse, with the one-hot at t − offset and ε/V
over the global V (``shard`` = (offset, V) on the device).

Logit softcap (``softcap`` = c > 0, Gemma-2's ``final_logit_softcapping``): every formula above
runs on the capped logits x ← c·tanh(x/c) (``reference.softcap_logits``; −inf stays −inf), which
the kernels form as they read each logit; the backward multiplies by 1 − tanh²(x_j/c). Nothing
V-sized is kept: the raw logits (or hidden, weight) are what the backward reads, as without it.
With vocabulary parallelism each rank's slice statistics are those of its capped logits.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _backend, _checks, _layout, _vocab_stats, context_parallel, distributed, reference

OP = "cross_entropy"


def _impl_fwd(backend: str):
    if backend == "triton":
        return _backend.triton_kernels("cross_entropy").forward
    return torch.ops.rlhf_ops_cuda.cross_entropy_fwd


def _impl_stats(backend: str):
    if backend == "triton":
        return _backend.triton_kernels("cross_entropy").local_stats
    return torch.ops.rlhf_ops_cuda.cross_entropy_stats


def _impl_bwd(backend: str):
    if backend == "triton":
        return _backend.triton_kernels("cross_entropy").backward
    return torch.ops.rlhf_ops_cuda.cross_entropy_bwd


# ------------------------------------------------------------------------------ custom ops ---
# ``softcap`` (last, default 0 = off) is c of the logit softcap in every op below.

@torch.library.custom_op("rlhf_ops::cross_entropy_fwd", mutates_args=())
def cross_entropy_fwd(logits: Tensor, target: Tensor, ignore_index: int, label_smoothing: float,
                      inplace_backward: bool, backend: str, softcap: float = 0.0
                      ) -> tuple[Tensor, Tensor]:
    """logits [N, V] (unit stride over V), target [N] int64 → (loss [N], lse [2, N]) in acc dtype.
    ``inplace_backward`` only tells the backward where to write."""
    if _backend.debug_checks(logits.device):
        _checks.in_range(OP, "target", target, 0, logits.shape[1], ignore=ignore_index)
    return _impl_fwd(backend)(logits, target, ignore_index, label_smoothing, softcap)


@cross_entropy_fwd.register_fake
def _(logits, target, ignore_index, label_smoothing, inplace_backward, backend, softcap=0.0):
    acc = _checks.acc_dtype(logits.dtype)
    n = logits.shape[0]
    return logits.new_empty((n,), dtype=acc), logits.new_empty((2, n), dtype=acc)


@torch.library.custom_op("rlhf_ops::cross_entropy_bwd", mutates_args=())
def cross_entropy_bwd(grad_loss: Tensor, logits: Tensor, target: Tensor, lse: Tensor,
                      ignore_index: int, label_smoothing: float, backend: str,
                      shard: Tensor | None = None, softcap: float = 0.0) -> Tensor:
    """grad_loss [N] (any stride) → grad_logits [N, V] in the logits dtype (a new tensor).
    ``shard``: int64 [2] = (offset, global V) when ``logits`` is a vocabulary slice."""
    out = torch.empty_like(logits)
    _impl_bwd(backend)(grad_loss, logits, target, lse, out, ignore_index, label_smoothing, shard,
                       softcap)
    return out


@cross_entropy_bwd.register_fake
def _(grad_loss, logits, target, lse, ignore_index, label_smoothing, backend, shard=None,
      softcap=0.0):
    return torch.empty_like(logits)


@torch.library.custom_op("rlhf_ops::cross_entropy_bwd_inplace", mutates_args=("logits",))
def cross_entropy_bwd_inplace(grad_loss: Tensor, logits: Tensor, target: Tensor, lse: Tensor,
                              ignore_index: int, label_smoothing: float, backend: str,
                              shard: Tensor | None = None, softcap: float = 0.0) -> None:
    """As cross_entropy_bwd, but overwrites ``logits`` with the gradient (opt-in)."""
    _impl_bwd(backend)(grad_loss, logits, target, lse, logits, ignore_index, label_smoothing, shard,
                       softcap)


@cross_entropy_bwd_inplace.register_fake
def _(grad_loss, logits, target, lse, ignore_index, label_smoothing, backend, shard=None,
      softcap=0.0):
    return None


def _setup_context(ctx, inputs, output):
    logits, target, ignore_index, label_smoothing, inplace_backward, backend, softcap = inputs
    ctx.save_for_backward(logits, target, output[1])
    ctx.args = (ignore_index, label_smoothing, backend)
    ctx.softcap = softcap
    ctx.inplace = inplace_backward
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_loss, grad_lse):
    logits, target, lse = ctx.saved_tensors
    if ctx.inplace:
        torch.ops.rlhf_ops.cross_entropy_bwd_inplace(grad_loss, logits, target, lse, *ctx.args,
                                                     softcap=ctx.softcap)
        return logits, None, None, None, None, None, None
    grad = torch.ops.rlhf_ops.cross_entropy_bwd(grad_loss, logits, target, lse, *ctx.args,
                                                softcap=ctx.softcap)
    return grad, None, None, None, None, None, None


cross_entropy_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("rlhf_ops::cross_entropy_vp_fwd", mutates_args=())
def cross_entropy_vp_fwd(logits: Tensor, target: Tensor, offset: Tensor, ignore_index: int,
                         label_smoothing: float, inplace_backward: bool, backend: str, group: str,
                         softcap: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Vocabulary parallel: logits [N, V_r] = this rank's slice from global id ``offset`` (int64
    [1]) → (loss [N], global lse [2, N], shard = (offset, V) int64 [2]), the same on every rank
    of the process group named ``group``."""
    stats = _impl_stats(backend)(logits, target, offset, ignore_index, label_smoothing > 0, softcap)
    return distributed.combine_slices(stats, logits.shape[1], group,
                                      _combine_with_shard(target, offset, ignore_index, label_smoothing))


def _combine_with_shard(target, offset, ignore_index, label_smoothing):
    """The combination of the fused vocabulary-parallel forwards: (loss, global lse, shard)."""
    def combine(G, sizes):
        loss, lse = _vocab_stats.cross_entropy_combine(G, sizes, target, ignore_index, label_smoothing)
        return loss, lse, _vocab_stats.shard_tensor(offset, sizes)
    return combine


@cross_entropy_vp_fwd.register_fake
def _(logits, target, offset, ignore_index, label_smoothing, inplace_backward, backend, group,
      softcap=0.0):
    acc = _checks.acc_dtype(logits.dtype)
    n = logits.shape[0]
    return (logits.new_empty((n,), dtype=acc), logits.new_empty((2, n), dtype=acc),
            logits.new_empty((2,), dtype=torch.int64))


def _vp_setup_context(ctx, inputs, output):
    logits, target, offset, ignore_index, label_smoothing, inplace_backward, backend, group, softcap = inputs
    ctx.save_for_backward(logits, target, output[1], output[2])
    ctx.args = (ignore_index, label_smoothing, backend)
    ctx.softcap = softcap
    ctx.inplace = inplace_backward
    ctx.mark_non_differentiable(output[1], output[2])


def _vp_backward(ctx, grad_loss, grad_lse, grad_shard):
    # no communication: this rank's slice of the full-vocabulary gradient, from the global lse
    logits, target, lse, shard = ctx.saved_tensors
    if ctx.inplace:
        torch.ops.rlhf_ops.cross_entropy_bwd_inplace(grad_loss, logits, target, lse, *ctx.args, shard,
                                                     ctx.softcap)
        return logits, None, None, None, None, None, None, None, None
    grad = torch.ops.rlhf_ops.cross_entropy_bwd(grad_loss, logits, target, lse, *ctx.args, shard,
                                                ctx.softcap)
    return grad, None, None, None, None, None, None, None, None


cross_entropy_vp_fwd.register_autograd(_vp_backward, setup_context=_vp_setup_context)


# ------------------------------------------------------------------------------ public API ---

def _check_args(op, logits, target, ignore_index, reduction, label_smoothing, softcap):
    """Validate cross_entropy's arguments (raises; returns nothing)."""
    _checks.floating(op, "logits", logits, min_ndim=1)
    _checks.index(op, "target", target)
    _checks.same_device(op, "logits", logits, target=target)
    _checks.reduction(op, reduction)
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"rlhf_ops.{op}: target must have shape logits.shape[:-1] = "
                         f"{tuple(logits.shape[:-1])}, got {tuple(target.shape)}")
    _checks.label_smoothing(op, label_smoothing)
    _checks.ignore_index(op, ignore_index)
    _checks.softcap(op, softcap)


def _reduce(loss: Tensor, target: Tensor, ignore_index: int, reduction: str, shape) -> Tensor:
    valid = target != ignore_index
    return reference._reduce_rows(loss, valid, reduction, shape)


def cross_entropy(logits: Tensor, target: Tensor, *, ignore_index: int = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0, softcap: float = 0.0,
                  backend: str | None = None, inplace_backward: bool = False,
                  process_group=None, vocab_offset: int | None = None) -> Tensor:
    """Softmax cross-entropy over the last dim of ``logits`` [..., V] with int64 ``target`` [...].

    Same semantics as ``F.cross_entropy`` (ignore_index, reduction, label_smoothing), fp32 result
    (fp64 for fp64 logits), except that ``mean`` over zero non-ignored targets is 0.0 with a zero
    gradient. The fused backends never materialise softmax or log-softmax: forward reads the
    logits once and saves one log-sum-exp per row; backward writes the gradient into a new tensor,
    or, with ``inplace_backward=True``, into the logits buffer itself (the caller's logits are then
    overwritten by their gradient during backward — only use it when nothing else reads them).

    ``softcap`` = c > 0 (a finite float; 0 = off) soft-caps the logits before the softmax, as
    Gemma-2's ``final_logit_softcapping``: x → c·tanh(x/c), forward and backward (the gradient
    carries the factor 1 − tanh²(x/c)), every backend, label smoothing included (its mean is over
    the capped logits). A −inf logit stays −inf (a masked token stays masked; the formula would
    give −c). Nothing V-sized is kept for it.

    Vocabulary parallel: with ``process_group`` (a ``torch.distributed`` group), ``logits``
    [..., V_r] is this rank's contiguous slice of the vocabulary, in rank order (sizes may
    differ); ``target`` holds global ids and, like the leading shape and the options, is the
    same on every rank. The result is the full-vocabulary loss on every rank; the gradient
    reaches each rank's slice. ``vocab_offset`` (this rank's first global id) skips the
    all_gather that finds it (where no check runs). A DTensor ``logits`` sharded ``Shard(-1)``
    on a 1-D mesh is accepted instead, and gives a replicated DTensor, as ``loss_parallel()``.
    Per row, k numbers per rank cross the network, never a V-sized tensor (``rlhf_ops.distributed``).
    """
    call = distributed.VocabCall(OP, "logits", logits, -1, process_group, vocab_offset)
    logits = call.local
    with call.checks():
        target = call.replicated("target", target)
        _check_args(OP, logits, target, ignore_index, reduction, label_smoothing, softcap)
        be = _backend.resolve(OP, backend, logits.device)
    softcap = float(softcap)
    if call.parallel:
        return call.wrap(_cross_entropy_vp(call, logits, target, ignore_index, reduction,
                                           float(label_smoothing), be, bool(inplace_backward),
                                           softcap))
    if be == "reference":
        _checks.eager_in_range(OP, "target", target, 0, logits.shape[-1], ignore=ignore_index)
        return reference.cross_entropy(logits, target, ignore_index, reduction, label_smoothing,
                                       softcap)
    V = logits.shape[-1]
    x = _layout.rows(logits)
    if inplace_backward and x.shape[0] > 1 and x.stride(0) < V:
        # rows share memory (an expand()ed view): one buffer cannot hold every row's gradient
        raise ValueError(f"rlhf_ops.{OP}: inplace_backward=True needs logits whose rows do not overlap "
                         f"in memory, got shape {tuple(logits.shape)} with strides {tuple(logits.stride())} "
                         f"(an expand()ed view?); pass logits.contiguous() or inplace_backward=False")
    t = target.reshape(-1).contiguous()        # the kernels index targets by row
    loss, _ = torch.ops.rlhf_ops.cross_entropy_fwd(x, t, ignore_index, float(label_smoothing),
                                                   bool(inplace_backward), be, softcap)
    return _reduce(loss, t, ignore_index, reduction, target.shape)


def _vp_settings(op, target, dtype, ignore_index, reduction, label_smoothing, softcap,
                 **extra) -> str:
    return distributed.settings(op, "leading", target.shape, dtype, **extra, ignore_index=ignore_index,
                                reduction=reduction, label_smoothing=label_smoothing,
                                softcap=softcap)


def _reference_combine(t, ignore_index, label_smoothing):
    return lambda G, sizes: _vocab_stats.cross_entropy_combine(G, sizes, t, ignore_index,
                                                               label_smoothing)[0]


def _cross_entropy_vp(call, logits, target, ignore_index, reduction, label_smoothing, be, inplace,
                      softcap):
    x = _layout.rows(logits)
    t = target.reshape(-1).contiguous()
    loss = call.run(
        be, "target", t, x.shape[1],
        _vp_settings(OP, target, logits.dtype, ignore_index, reduction, label_smoothing, softcap),
        ignore_index=ignore_index,
        reference=lambda offset: _vocab_stats.cross_entropy_stats_reference(
            x, t, offset, ignore_index, label_smoothing > 0, softcap),
        combine=_reference_combine(t, ignore_index, label_smoothing),
        fused=lambda gname, offset: torch.ops.rlhf_ops.cross_entropy_vp_fwd(
            x, t, offset, ignore_index, label_smoothing, inplace, be, gname, softcap)[0])
    return _reduce(loss, t, ignore_index, reduction, target.shape)


# ------------------------------------------------------------------- linear cross entropy ---

@torch.library.custom_op("rlhf_ops::linear_cross_entropy_fwd", mutates_args=())
def linear_cross_entropy_fwd(hidden: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor,
                             ignore_index: int, label_smoothing: float, backend: str,
                             softcap: float = 0.0) -> tuple[Tensor, Tensor]:
    """hidden [N, d], weight [V, d] → (loss [N], lse [2, N]); logits exist one row chunk at a time."""
    N, V = hidden.shape[0], weight.shape[0]
    if _backend.debug_checks(hidden.device):
        _checks.in_range("linear_cross_entropy", "target", target, 0, V, ignore=ignore_index)
    acc = _checks.acc_dtype(hidden.dtype)
    loss = hidden.new_empty((N,), dtype=acc)
    lse = hidden.new_empty((2, N), dtype=acc)
    fwd = _impl_fwd(backend)
    step = _layout.block_len(V, hidden.element_size(), N)
    for s in range(0, N, step):
        logits = torch.nn.functional.linear(hidden[s:s + step], weight, bias)
        loss[s:s + step], lse[:, s:s + step] = fwd(logits, target[s:s + step], ignore_index,
                                                   label_smoothing, softcap)
    return loss, lse


@linear_cross_entropy_fwd.register_fake
def _(hidden, weight, bias, target, ignore_index, label_smoothing, backend, softcap=0.0):
    acc = _checks.acc_dtype(hidden.dtype)
    n = hidden.shape[0]
    return hidden.new_empty((n,), dtype=acc), hidden.new_empty((2, n), dtype=acc)


@torch.library.custom_op("rlhf_ops::linear_cross_entropy_bwd", mutates_args=())
def linear_cross_entropy_bwd(grad_loss: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None,
                             target: Tensor, lse: Tensor, ignore_index: int, label_smoothing: float,
                             backend: str, shard: Tensor | None = None, group: str = "",
                             softcap: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Recompute each chunk's logits, turn them into dlogits in place, then
    d hidden = dlogits · W,  d W += dlogitsᵀ · hidden,  d bias += Σ_rows dlogits.
    Vocabulary parallel (``shard``, ``group``): W is this rank's slice, so d hidden is this
    slice's part; it is summed over the group (in the accumulation dtype) before it returns."""
    N, V = hidden.shape[0], weight.shape[0]
    acc = _checks.acc_dtype(hidden.dtype)
    d_hidden = torch.empty_like(hidden) if not group else hidden.new_empty(hidden.shape, dtype=acc)
    d_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
    d_bias = torch.zeros((V,), dtype=acc, device=weight.device)
    bwd = _impl_bwd(backend)
    step = _layout.block_len(V, hidden.element_size(), N)
    for s in range(0, N, step):
        h = hidden[s:s + step]
        logits = torch.nn.functional.linear(h, weight, bias)
        bwd(grad_loss[s:s + step], logits, target[s:s + step], lse[:, s:s + step].contiguous(),
            logits, ignore_index, label_smoothing, shard, softcap)
        d_hidden[s:s + step] = logits @ weight
        d_weight.addmm_(logits.t().to(acc), h.to(acc))
        d_bias += logits.sum(0, dtype=acc)
    if group:  # column-parallel head: d hidden = Σ_ranks dlogits_r · W_r
        d_hidden = distributed.all_reduce_(d_hidden, group).to(hidden.dtype)
    return d_hidden, d_weight.to(weight.dtype), d_bias.to(weight.dtype)


@linear_cross_entropy_bwd.register_fake
def _(grad_loss, hidden, weight, bias, target, lse, ignore_index, label_smoothing, backend,
      shard=None, group="", softcap=0.0):
    return torch.empty_like(hidden), torch.empty_like(weight), weight.new_empty((weight.shape[0],))


def _lce_setup(ctx, inputs, output):
    hidden, weight, bias, target, ignore_index, label_smoothing, backend, softcap = inputs
    ctx.save_for_backward(hidden, weight, bias, target, output[1])
    ctx.args = (ignore_index, label_smoothing, backend)
    ctx.softcap = softcap
    ctx.mark_non_differentiable(output[1])


def _lce_backward(ctx, grad_loss, grad_lse):
    hidden, weight, bias, target, lse = ctx.saved_tensors
    dh, dw, db = torch.ops.rlhf_ops.linear_cross_entropy_bwd(
        grad_loss, hidden, weight, bias, target, lse, *ctx.args, softcap=ctx.softcap)
    return dh, dw, (db if bias is not None else None), None, None, None, None, None


linear_cross_entropy_fwd.register_autograd(_lce_backward, setup_context=_lce_setup)


@torch.library.custom_op("rlhf_ops::linear_cross_entropy_vp_fwd", mutates_args=())
def linear_cross_entropy_vp_fwd(hidden: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor,
                                offset: Tensor, ignore_index: int, label_smoothing: float,
                                backend: str, group: str, softcap: float = 0.0
                                ) -> tuple[Tensor, Tensor, Tensor]:
    """Vocabulary parallel: weight [V_r, d] (bias [V_r]) = this rank's slice from global id
    ``offset`` → (loss [N], global lse [2, N], shard int64 [2]); logits one row chunk at a time."""
    N, V_r = hidden.shape[0], weight.shape[0]
    stats = hidden.new_empty((5, N), dtype=_checks.acc_dtype(hidden.dtype))
    fn = _impl_stats(backend)
    step = _layout.block_len(V_r, hidden.element_size(), N)
    for s in range(0, N, step):
        logits = torch.nn.functional.linear(hidden[s:s + step], weight, bias)
        stats[:, s:s + step] = fn(logits, target[s:s + step], offset, ignore_index, label_smoothing > 0,
                                  softcap)
    return distributed.combine_slices(stats, V_r, group,
                                      _combine_with_shard(target, offset, ignore_index, label_smoothing))


@linear_cross_entropy_vp_fwd.register_fake
def _(hidden, weight, bias, target, offset, ignore_index, label_smoothing, backend, group,
      softcap=0.0):
    acc = _checks.acc_dtype(hidden.dtype)
    n = hidden.shape[0]
    return (hidden.new_empty((n,), dtype=acc), hidden.new_empty((2, n), dtype=acc),
            hidden.new_empty((2,), dtype=torch.int64))


def _lce_vp_setup(ctx, inputs, output):
    hidden, weight, bias, target, offset, ignore_index, label_smoothing, backend, group, softcap = inputs
    ctx.save_for_backward(hidden, weight, bias, target, output[1], output[2])
    ctx.args = (ignore_index, label_smoothing, backend)
    ctx.group = group
    ctx.softcap = softcap
    ctx.mark_non_differentiable(output[1], output[2])


def _lce_vp_backward(ctx, grad_loss, grad_lse, grad_shard):
    hidden, weight, bias, target, lse, shard = ctx.saved_tensors
    dh, dw, db = torch.ops.rlhf_ops.linear_cross_entropy_bwd(
        grad_loss, hidden, weight, bias, target, lse, *ctx.args, shard, ctx.group, ctx.softcap)
    return dh, dw, (db if bias is not None else None), None, None, None, None, None, None, None


linear_cross_entropy_vp_fwd.register_autograd(_lce_vp_backward, setup_context=_lce_vp_setup)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor, *, bias: Tensor | None = None,
                         ignore_index: int = -100, reduction: str = "mean",
                         label_smoothing: float = 0.0, softcap: float = 0.0,
                         backend: str | None = None,
                         process_group=None, vocab_offset: int | None = None,
                         weight_shard: str = "vocab") -> Tensor:
    """``cross_entropy(hidden @ weight.T + bias, target)`` without holding all [N, V] logits.

    hidden [..., d], weight [V, d], bias [V] or None, target [...] int64. The fused backends
    compute the logits one chunk of rows at a time (``_layout.block_len``), keep only
    the per-row log-sum-exp for backward, and recompute each chunk's logits in backward
    (the matmuls run on cuBLAS, the softmax/gradient on the chosen backend's kernels).
    ``softcap`` = c > 0 caps the logits, c·tanh((hidden @ weight.T + bias)/c), as in
    ``cross_entropy`` (Gemma-2's ``final_logit_softcapping``; the gradients of hidden, weight and
    bias carry the factor 1 − tanh²); still nothing V-sized is kept for backward.

    Vocabulary parallel (``process_group``, ``vocab_offset`` as in ``cross_entropy``): ``weight``
    [V_r, d] and ``bias`` [V_r] are this rank's rows of the LM head (a column-parallel layer);
    ``hidden`` and ``target`` are the same on every rank. The loss is the full-vocabulary loss on
    every rank; ``weight``/``bias`` get their slice's gradient, ``hidden`` the sum over the ranks
    (one all_reduce of [N, d] in the backward). A DTensor ``weight`` sharded ``Shard(0)`` on a
    1-D mesh (``bias`` ``Shard(0)`` too) is accepted instead of ``process_group``.
    ``weight_shard="fsdp"``: such a weight is FSDP2's data-parallel shard instead (fully_shard; each
    rank its own rows of data): the op runs on the gathered weight and its gradient comes back as
    a Shard(0) DTensor holding the mean over the ranks (``context_parallel.head_weights``).
    """
    op = "linear_cross_entropy"
    weight, bias = context_parallel.head_weights(op, hidden, weight, bias, weight_shard, process_group)
    call = distributed.VocabCall(op, "weight", weight, 0, process_group, vocab_offset)
    weight, bias = call.local, call.sharded("bias", bias)
    with call.checks():
        hidden = call.replicated("hidden", hidden)
        target = call.replicated("target", target)
        be = _check_linear(op, hidden, weight, target, bias, ignore_index, reduction,
                           label_smoothing, softcap, backend)
    softcap = float(softcap)
    if call.parallel:
        return call.wrap(_linear_cross_entropy_vp(call, hidden, weight, target, bias, ignore_index,
                                                  reduction, float(label_smoothing), be, softcap))
    if be == "reference":
        _checks.eager_in_range(op, "target", target, 0, weight.shape[0], ignore=ignore_index)
        return reference.linear_cross_entropy(hidden, weight, target, bias, ignore_index,
                                              reduction, label_smoothing, softcap)
    h = hidden.reshape(-1, hidden.shape[-1])
    t = target.reshape(-1).contiguous()
    loss, _ = torch.ops.rlhf_ops.linear_cross_entropy_fwd(h, weight, bias, t, ignore_index,
                                                          float(label_smoothing), be, softcap)
    return _reduce(loss, t, ignore_index, reduction, target.shape)


def _check_linear(op, hidden, weight, target, bias, ignore_index, reduction, label_smoothing,
                  softcap, backend) -> str:
    """Validate linear_cross_entropy's inputs; the backend that runs it."""
    _checks.floating(op, "hidden", hidden, min_ndim=1)
    _checks.floating(op, "weight", weight, ndim=2)
    _checks.index(op, "target", target)
    _checks.same_device(op, "hidden", hidden, weight=weight, target=target, bias=bias)
    _checks.same_dtype(op, "hidden", hidden, weight=weight, bias=bias)
    _checks.reduction(op, reduction)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"rlhf_ops.{op}: weight must have shape [V, d] with d = hidden.shape[-1] = "
                         f"{hidden.shape[-1]}, got {tuple(weight.shape)}")
    if bias is not None:
        _checks.shape(op, "bias", bias, (weight.shape[0],), "[V]")
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"rlhf_ops.{op}: target must have shape hidden.shape[:-1] = "
                         f"{tuple(hidden.shape[:-1])}, got {tuple(target.shape)}")
    _checks.label_smoothing(op, label_smoothing)
    _checks.ignore_index(op, ignore_index)
    _checks.softcap(op, softcap)
    return _backend.resolve(op, backend, hidden.device)


def _linear_cross_entropy_vp(call, hidden, weight, target, bias, ignore_index, reduction,
                             label_smoothing, be, softcap):
    op = "linear_cross_entropy"
    h = hidden.reshape(-1, hidden.shape[-1])
    t = target.reshape(-1).contiguous()

    def reference_stats(offset):  # eager logits of the slice; hidden's gradient summed over ranks
        logits = torch.nn.functional.linear(distributed.replicated_input(h, call.group), weight, bias)
        return _vocab_stats.cross_entropy_stats_reference(logits, t, offset, ignore_index,
                                                         label_smoothing > 0, softcap)

    loss = call.run(
        be, "target", t, weight.shape[0],
        _vp_settings(op, target, hidden.dtype, ignore_index, reduction, label_smoothing, softcap,
                     d=hidden.shape[-1], bias=bias is not None),
        ignore_index=ignore_index, reference=reference_stats,
        combine=_reference_combine(t, ignore_index, label_smoothing),
        fused=lambda gname, offset: torch.ops.rlhf_ops.linear_cross_entropy_vp_fwd(
            h, weight, bias, t, offset, ignore_index, label_smoothing, be, gname, softcap)[0])
    return _reduce(loss, t, ignore_index, reduction, target.shape)
