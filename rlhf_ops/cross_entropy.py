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
saving lse as the pair (m, log Σ) per row, [N, 2], so that neither the loss nor the backward's
softmax_j = exp((x_j − m) − log Σ) pays for rounding m + log Σ (ulp(m)/2 in fp32).
Backward per element:
    ∂loss/∂x_j = g · (softmax_j − (1−ε)·[j = t] − ε/V)
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _backend, _checks, reference

OP = "cross_entropy"


def _impl_fwd(backend: str):
    if backend == "triton":
        return _backend.triton_kernels("cross_entropy").forward
    return torch.ops.rlhf_ops_cuda.cross_entropy_fwd


def _impl_bwd(backend: str):
    if backend == "triton":
        return _backend.triton_kernels("cross_entropy").backward
    return torch.ops.rlhf_ops_cuda.cross_entropy_bwd


# ------------------------------------------------------------------------------ custom ops ---

@torch.library.custom_op("rlhf_ops::cross_entropy_fwd", mutates_args=())
def cross_entropy_fwd(logits: Tensor, target: Tensor, ignore_index: int, label_smoothing: float,
                      inplace_backward: bool, backend: str) -> tuple[Tensor, Tensor]:
    """logits [N, V] (unit stride over V), target [N] int64 → (loss [N], lse [N, 2]) in acc dtype.
    ``inplace_backward`` only tells the backward where to write."""
    if _backend.debug_checks(logits.device):
        _checks.in_range(OP, "target", target, 0, logits.shape[1], ignore=ignore_index)
    return _impl_fwd(backend)(logits, target, ignore_index, label_smoothing)


@cross_entropy_fwd.register_fake
def _(logits, target, ignore_index, label_smoothing, inplace_backward, backend):
    acc = _checks.acc_dtype(logits.dtype)
    n = logits.shape[0]
    return logits.new_empty((n,), dtype=acc), logits.new_empty((n, 2), dtype=acc)


@torch.library.custom_op("rlhf_ops::cross_entropy_bwd", mutates_args=())
def cross_entropy_bwd(grad_loss: Tensor, logits: Tensor, target: Tensor, lse: Tensor,
                      ignore_index: int, label_smoothing: float, backend: str) -> Tensor:
    """grad_loss [N] (any stride) → grad_logits [N, V] in the logits dtype (a new tensor)."""
    out = torch.empty_like(logits)
    _impl_bwd(backend)(grad_loss, logits, target, lse, out, ignore_index, label_smoothing)
    return out


@cross_entropy_bwd.register_fake
def _(grad_loss, logits, target, lse, ignore_index, label_smoothing, backend):
    return torch.empty_like(logits)


@torch.library.custom_op("rlhf_ops::cross_entropy_bwd_inplace", mutates_args=("logits",))
def cross_entropy_bwd_inplace(grad_loss: Tensor, logits: Tensor, target: Tensor, lse: Tensor,
                              ignore_index: int, label_smoothing: float, backend: str) -> None:
    """As cross_entropy_bwd, but overwrites ``logits`` with the gradient (opt-in)."""
    _impl_bwd(backend)(grad_loss, logits, target, lse, logits, ignore_index, label_smoothing)


@cross_entropy_bwd_inplace.register_fake
def _(grad_loss, logits, target, lse, ignore_index, label_smoothing, backend):
    return None


def _setup_context(ctx, inputs, output):
    logits, target, ignore_index, label_smoothing, inplace_backward, backend = inputs
    ctx.save_for_backward(logits, target, output[1])
    ctx.args = (ignore_index, label_smoothing, backend)
    ctx.inplace = inplace_backward
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_loss, grad_lse):
    logits, target, lse = ctx.saved_tensors
    if ctx.inplace:
        torch.ops.rlhf_ops.cross_entropy_bwd_inplace(grad_loss, logits, target, lse, *ctx.args)
        return logits, None, None, None, None, None
    grad = torch.ops.rlhf_ops.cross_entropy_bwd(grad_loss, logits, target, lse, *ctx.args)
    return grad, None, None, None, None, None


cross_entropy_fwd.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------ public API ---

def _flatten(op, logits, target, ignore_index, reduction, label_smoothing):
    _checks.floating(op, "logits", logits, min_ndim=1)
    _checks.index(op, "target", target)
    _checks.same_device(op, "logits", logits, target=target)
    _checks.reduction(op, reduction)
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"rlhf_ops.{op}: target must have shape logits.shape[:-1] = "
                         f"{tuple(logits.shape[:-1])}, got {tuple(target.shape)}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"rlhf_ops.{op}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if not isinstance(ignore_index, int):
        raise TypeError(f"rlhf_ops.{op}: ignore_index must be an int, got {type(ignore_index).__name__}")


def _reference_range_check(op: str, target: Tensor, V: int, ignore_index: int) -> None:
    """The fused ops check targets inside their custom op; eager gather would fail with an
    index error that does not name ``target``, so the reference path checks first (not while
    torch.compile traces: a value check is a host sync)."""
    if _backend.debug_checks(target.device) and not torch.compiler.is_compiling():
        _checks.in_range(op, "target", target, 0, V, ignore=ignore_index)


def _reduce(loss: Tensor, target: Tensor, ignore_index: int, reduction: str, shape) -> Tensor:
    valid = target != ignore_index
    return reference._reduce_rows(loss, valid, reduction, shape)


def cross_entropy(logits: Tensor, target: Tensor, *, ignore_index: int = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0,
                  backend: str | None = None, inplace_backward: bool = False) -> Tensor:
    """Softmax cross-entropy over the last dim of ``logits`` [..., V] with int64 ``target`` [...].

    Same semantics as ``F.cross_entropy`` (ignore_index, reduction, label_smoothing), fp32 result
    (fp64 for fp64 logits), except that ``mean`` over zero non-ignored targets is 0.0 with a zero
    gradient. The fused backends never materialise softmax or log-softmax: forward reads the
    logits once and saves one log-sum-exp per row; backward writes the gradient into a new tensor,
    or, with ``inplace_backward=True``, into the logits buffer itself (the caller's logits are then
    overwritten by their gradient during backward — only use it when nothing else reads them).
    """
    _flatten(OP, logits, target, ignore_index, reduction, label_smoothing)
    be = _backend.resolve(OP, backend, logits.device)
    if be == "reference":
        _reference_range_check(OP, target, logits.shape[-1], ignore_index)
        return reference.cross_entropy(logits, target, ignore_index, reduction, label_smoothing)
    V = logits.shape[-1]
    x = logits.reshape(-1, V)
    if x.shape[0] > 0 and x.stride(-1) != 1:
        x = x.contiguous()
    t = target.reshape(-1).contiguous()        # the kernels index targets by row
    loss, _ = torch.ops.rlhf_ops.cross_entropy_fwd(x, t, ignore_index, float(label_smoothing),
                                                   bool(inplace_backward), be)
    return _reduce(loss, t, ignore_index, reduction, target.shape)


# ------------------------------------------------------------------- linear cross entropy ---

def _chunk_rows(n_rows: int, vocab: int, budget_bytes: int = 256 << 20) -> int:
    """Rows per chunk so that one chunk's fp32 logits stay under ``budget_bytes``."""
    return max(1, min(max(n_rows, 1), budget_bytes // (4 * max(vocab, 1))))


@torch.library.custom_op("rlhf_ops::linear_cross_entropy_fwd", mutates_args=())
def linear_cross_entropy_fwd(hidden: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor,
                             ignore_index: int, label_smoothing: float, backend: str
                             ) -> tuple[Tensor, Tensor]:
    """hidden [N, d], weight [V, d] → (loss [N], lse [N, 2]); logits exist one row-chunk at a time."""
    N, V = hidden.shape[0], weight.shape[0]
    if _backend.debug_checks(hidden.device):
        _checks.in_range("linear_cross_entropy", "target", target, 0, V, ignore=ignore_index)
    acc = _checks.acc_dtype(hidden.dtype)
    loss = hidden.new_empty((N,), dtype=acc)
    lse = hidden.new_empty((N, 2), dtype=acc)
    fwd = _impl_fwd(backend)
    step = _chunk_rows(N, V)
    for s in range(0, N, step):
        logits = torch.nn.functional.linear(hidden[s:s + step], weight, bias)
        loss[s:s + step], lse[s:s + step] = fwd(logits, target[s:s + step], ignore_index, label_smoothing)
    return loss, lse


@linear_cross_entropy_fwd.register_fake
def _(hidden, weight, bias, target, ignore_index, label_smoothing, backend):
    acc = _checks.acc_dtype(hidden.dtype)
    n = hidden.shape[0]
    return hidden.new_empty((n,), dtype=acc), hidden.new_empty((n, 2), dtype=acc)


@torch.library.custom_op("rlhf_ops::linear_cross_entropy_bwd", mutates_args=())
def linear_cross_entropy_bwd(grad_loss: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None,
                             target: Tensor, lse: Tensor, ignore_index: int, label_smoothing: float,
                             backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Recompute each chunk's logits, turn them into dlogits in place, then
    d hidden = dlogits · W,  d W += dlogitsᵀ · hidden,  d bias += Σ_rows dlogits."""
    N, V = hidden.shape[0], weight.shape[0]
    acc = _checks.acc_dtype(hidden.dtype)
    d_hidden = torch.empty_like(hidden)
    d_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
    d_bias = torch.zeros((V,), dtype=acc, device=weight.device)
    bwd = _impl_bwd(backend)
    step = _chunk_rows(N, V)
    for s in range(0, N, step):
        h = hidden[s:s + step]
        logits = torch.nn.functional.linear(h, weight, bias)
        bwd(grad_loss[s:s + step], logits, target[s:s + step], lse[s:s + step], logits,
            ignore_index, label_smoothing)
        d_hidden[s:s + step] = logits @ weight
        d_weight.addmm_(logits.t().to(acc), h.to(acc))
        d_bias += logits.sum(0, dtype=acc)
    return d_hidden, d_weight.to(weight.dtype), d_bias.to(weight.dtype)


@linear_cross_entropy_bwd.register_fake
def _(grad_loss, hidden, weight, bias, target, lse, ignore_index, label_smoothing, backend):
    return torch.empty_like(hidden), torch.empty_like(weight), weight.new_empty((weight.shape[0],))


def _lce_setup(ctx, inputs, output):
    hidden, weight, bias, target, ignore_index, label_smoothing, backend = inputs
    ctx.save_for_backward(hidden, weight, bias, target, output[1])
    ctx.args = (ignore_index, label_smoothing, backend)
    ctx.mark_non_differentiable(output[1])


def _lce_backward(ctx, grad_loss, grad_lse):
    hidden, weight, bias, target, lse = ctx.saved_tensors
    dh, dw, db = torch.ops.rlhf_ops.linear_cross_entropy_bwd(
        grad_loss, hidden, weight, bias, target, lse, *ctx.args)
    return dh, dw, (db if bias is not None else None), None, None, None, None


linear_cross_entropy_fwd.register_autograd(_lce_backward, setup_context=_lce_setup)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor, *, bias: Tensor | None = None,
                         ignore_index: int = -100, reduction: str = "mean",
                         label_smoothing: float = 0.0, backend: str | None = None) -> Tensor:
    """``cross_entropy(hidden @ weight.T + bias, target)`` without holding all [N, V] logits.

    hidden [..., d], weight [V, d], bias [V] or None, target [...] int64. The fused backends
    compute the logits one chunk of rows at a time (at most 256 MiB of fp32 logits), keep only
    the per-row log-sum-exp for backward, and recompute each chunk's logits in backward
    (the matmuls run on cuBLAS, the softmax/gradient on the chosen backend's kernels).
    """
    op = "linear_cross_entropy"
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
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"rlhf_ops.{op}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if not isinstance(ignore_index, int):
        raise TypeError(f"rlhf_ops.{op}: ignore_index must be an int, got {type(ignore_index).__name__}")
    be = _backend.resolve(op, backend, hidden.device)
    if be == "reference":
        _reference_range_check(op, target, weight.shape[0], ignore_index)
        return reference.linear_cross_entropy(hidden, weight, target, bias, ignore_index,
                                              reduction, label_smoothing)
    h = hidden.reshape(-1, hidden.shape[-1])
    t = target.reshape(-1).contiguous()
    loss, _ = torch.ops.rlhf_ops.linear_cross_entropy_fwd(h, weight, bias, t, ignore_index,
                                                          float(label_smoothing), be)
    return _reduce(loss, t, ignore_index, reduction, target.shape)
