"""The batch-invariant, deterministic mode and the train/rollout log-prob parity report.

    with ro.batch_invariant():            # or env RLHF_OPS_BATCH_INVARIANT=1
        ...                               # rlhf_ops' own ops: fixed configs, fixed reduction orders
    with ro.batch_invariant(aten=True):
        ...                               # + torch's mm/addmm/bmm (so matmul, linear), softmax /
                                          #   log_softmax and sum / mean over dims, fwd and bwd
    ro.is_batch_invariant() -> bool
    ro.logprob_parity(logprobs_a, logprobs_b, mask=None) -> ParityReport

What the mode promises and what it does not is written in docs/batch_invariant.md; in short: on
one device, with one version of torch/Triton/rlhf_ops, a row's result (a sequence's, for
attention) has the same bits whatever else is in the batch and wherever the row sits, and the same
call twice gives the same bits (gradients included).

State. The op-level mode is per thread: a block opened in one thread does not change another's
ops, like ``use_backend`` (the env var applies to every thread). An op decides in its forward and
hands the decision to its backward, which autograd may run in another thread. ``aten=True``
changes torch's dispatcher table, which is process-wide: while any thread holds an ``aten=True``
block, those aten ops of CUDA tensors (and of CPU tensors under ``TRITON_INTERPRET=1``) in every
thread run the batch-invariant kernels — also the backward, which autograd runs in its own
threads. Leaving the last such block (also by an exception) restores torch's kernels. Nested
blocks only add guarantees: ``aten`` stays on inside an inner ``batch_invariant()``.

Routing (``aten=True``), registered with ``torch.library.Library("aten", "IMPL")`` for the CUDA
dispatch key (and CPU under the interpreter), below autograd, so torch's derivative formulas run
and their matmuls, softmax backwards and sums come back through these kernels:
  mm, addmm, bmm, baddbmm, mv             rlhf_ops.kernels.batch_invariant.matmul
  _softmax, _log_softmax (+ _backward_data)  .softmax / .softmax_backward
  sum.dim_IntList, mean.dim               .sum_rows
Floating inputs (fp16, bf16, fp32, fp64) run the kernels. Integer and bool inputs run torch's own
kernel (its ``.out`` variant): integer sums are exact, so any order gives the same bits. Complex
inputs raise NotImplementedError.
"""
from __future__ import annotations

import contextlib
import math
import os
import threading
import warnings
from typing import NamedTuple

import torch
from torch import Tensor

from . import _backend, _checks

ENV = "RLHF_OPS_BATCH_INVARIANT"
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_local = threading.local()


def _stack() -> list:
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack


def _env_on() -> bool:
    value = os.environ.get(ENV, "0")
    if value in ("", "0"):
        return False
    if value == "1":
        return True
    raise ValueError(f"{ENV} must be '0' or '1', got {value!r}")


def is_batch_invariant() -> bool:
    """Whether rlhf_ops' ops run batch-invariant in this thread: inside a ``batch_invariant()``
    block, or with the environment variable RLHF_OPS_BATCH_INVARIANT=1."""
    return bool(_stack()) or _env_on()


def aten_routed() -> bool:
    """Whether torch's aten ops are routed through the batch-invariant kernels right now (some
    thread holds a ``batch_invariant(aten=True)`` block)."""
    return _aten_lib is not None


@contextlib.contextmanager
def batch_invariant(*, aten: bool = False):
    """Run rlhf_ops' ops batch-invariant and deterministic inside the block; with ``aten=True``
    also torch's mm/addmm/bmm/baddbmm/mv (matmul, linear), softmax/log_softmax and sum/mean over dims,
    forward and backward (CUDA tensors, and CPU tensors under TRITON_INTERPRET=1). Leaving the
    block, also by an exception, restores the previous state. Usable as a decorator too."""
    if not isinstance(aten, bool):
        raise TypeError(f"rlhf_ops.batch_invariant: aten must be a bool, got {type(aten).__name__}")
    if aten:
        _aten_acquire()
    _stack().append(aten)
    try:
        yield
    finally:
        _stack().pop()
        if aten:
            _aten_release()


# =============================================================== aten routing (aten=True) ===

_aten_lock = threading.Lock()
_aten_count = 0
_aten_lib: torch.library.Library | None = None


def _aten_problem() -> str | None:
    if _backend.unavailable("triton", "cuda") is None and torch.cuda.is_available():
        return None
    if _backend.triton_interpret():
        return None
    return ("it routes torch's ops of CUDA tensors (no GPU is visible) and of CPU tensors only "
            "under the Triton interpreter (TRITON_INTERPRET=1 set before importing rlhf_ops)")


def _aten_acquire() -> None:
    global _aten_count, _aten_lib
    with _aten_lock:
        if _aten_count == 0:
            why = _aten_problem()
            if why is not None:
                raise RuntimeError(f"rlhf_ops.batch_invariant(aten=True) cannot run here: {why}")
            lib = torch.library.Library("aten", "IMPL")
            keys = ("CPU",) if _backend.triton_interpret() else ("CUDA",)
            with warnings.catch_warnings():   # overriding aten's kernel is the point here
                warnings.filterwarnings("ignore", message=".*[Oo]verrid.*registered kernel")
                for name, fn in _ATEN_IMPLS.items():
                    for key in keys:
                        lib.impl(name, fn, key)
            _aten_lib = lib
        _aten_count += 1


def _aten_release() -> None:
    global _aten_count, _aten_lib
    with _aten_lock:
        _aten_count -= 1
        if _aten_count == 0:
            _aten_lib._destroy()
            _aten_lib = None


def _kernels():
    return _backend.triton_kernels("batch_invariant")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _routed(op: str, *tensors: Tensor) -> bool:
    """True: run our kernel; False: integer/bool inputs, run torch's own (exact) kernel."""
    dtypes = {t.dtype for t in tensors}
    if dtypes <= set(_FLOATS):
        return True
    if all(not d.is_floating_point and not d.is_complex for d in dtypes):
        return False
    raise NotImplementedError(f"rlhf_ops.batch_invariant(aten=True): aten::{op} on "
                              f"{', '.join(sorted(_name(d) for d in dtypes))} tensors is not routed "
                              f"(floating and integer dtypes are)")


def _check_mm(op: str, a: Tensor, b: Tensor, ndim: int) -> None:
    if a.dim() != ndim or b.dim() != ndim:
        raise RuntimeError(f"{op}: both arguments must be {ndim}-D, got shapes {tuple(a.shape)} and "
                           f"{tuple(b.shape)}")
    if a.shape[-1] != b.shape[-2] or (ndim == 3 and a.shape[0] != b.shape[0]):
        raise RuntimeError(f"{op}: shapes cannot be multiplied ({tuple(a.shape)} and {tuple(b.shape)})")
    if a.dtype != b.dtype:
        raise RuntimeError(f"{op}: expected both arguments to have the same dtype, got "
                           f"{_name(a.dtype)} and {_name(b.dtype)}")


def _mm(a: Tensor, b: Tensor) -> Tensor:
    _check_mm("mm", a, b, 2)
    if not _routed("mm", a, b):
        return torch.ops.aten.mm.out(a, b, out=a.new_empty(a.shape[0], b.shape[1]))
    return _kernels().matmul(a[None], b[None])[0]


def _bmm(a: Tensor, b: Tensor) -> Tensor:
    _check_mm("bmm", a, b, 3)
    if not _routed("bmm", a, b):
        return torch.ops.aten.bmm.out(a, b, out=a.new_empty(a.shape[0], a.shape[1], b.shape[2]))
    return _kernels().matmul(a, b)


def _mv(a: Tensor, v: Tensor) -> Tensor:
    if a.dim() != 2 or v.dim() != 1 or a.shape[1] != v.shape[0]:
        raise RuntimeError(f"mv: expected a matrix and a vector of matching size, got shapes "
                           f"{tuple(a.shape)} and {tuple(v.shape)}")
    _check_mm("mv", a, v[:, None], 2)
    if not _routed("mv", a, v):
        return torch.ops.aten.mv.out(a, v, out=a.new_empty(a.shape[0]))
    return _kernels().matmul(a[None], v[None, :, None])[0, :, 0]


def _baddbmm(bias: Tensor, a: Tensor, b: Tensor, *, beta=1, alpha=1) -> Tensor:
    _check_mm("baddbmm", a, b, 3)
    if bias.dtype != a.dtype:
        raise RuntimeError(f"baddbmm: self has dtype {_name(bias.dtype)} but batch1 has {_name(a.dtype)}")
    shape = (a.shape[0], a.shape[1], b.shape[2])
    if not _routed("baddbmm", bias, a, b):
        return torch.ops.aten.baddbmm.out(bias, a, b, beta=beta, alpha=alpha, out=a.new_empty(shape))
    return _kernels().matmul(a, b, _expand(bias, shape, "baddbmm"), float(alpha), float(beta))


def _expand(bias: Tensor, shape, op: str) -> Tensor:
    try:
        return bias.expand(shape)
    except RuntimeError as e:
        raise RuntimeError(f"{op}: self of shape {tuple(bias.shape)} does not broadcast to "
                           f"{tuple(shape)}") from e


def _addmm(bias: Tensor, a: Tensor, b: Tensor, *, beta=1, alpha=1) -> Tensor:
    _check_mm("addmm", a, b, 2)
    if bias.dtype != a.dtype:
        raise RuntimeError(f"addmm: self has dtype {_name(bias.dtype)} but mat1 has {_name(a.dtype)}")
    if not _routed("addmm", bias, a, b):
        out = a.new_empty(a.shape[0], b.shape[1])
        return torch.ops.aten.addmm.out(bias, a, b, beta=beta, alpha=alpha, out=out)
    x = _expand(bias, (a.shape[0], b.shape[1]), "addmm")
    return _kernels().matmul(a[None], b[None], x[None], float(alpha), float(beta))[0]


def _rows(x: Tensor, dim: int) -> tuple[Tensor, tuple]:
    """x with ``dim`` moved last, as [R, L] with unit column stride, and the moved shape."""
    moved = x.movedim(dim, -1)
    x2 = moved.reshape(-1, moved.shape[-1]) if x.dim() else x.reshape(1, 1)
    if x2.shape[1] > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    return x2, moved.shape


def _back(y2: Tensor, moved_shape, dim: int, like: Tensor) -> Tensor:
    if like.dim() == 0:
        return y2.reshape(())
    y = y2.view(moved_shape).movedim(-1, dim)
    return y if dim in (-1, like.dim() - 1) else y.contiguous()


def _softmax_impl(x: Tensor, dim: int, half_to_float: bool, log: bool) -> Tensor:
    op = "_log_softmax" if log else "_softmax"
    if x.dtype not in _FLOATS:
        raise NotImplementedError(f"rlhf_ops.batch_invariant(aten=True): aten::{op} on "
                                  f"{_name(x.dtype)} tensors is not routed")
    out_dtype = torch.float32 if half_to_float else x.dtype
    x2, shape = _rows(x, dim)
    return _back(_kernels().softmax(x2, log, out_dtype), shape, dim, x)


def _softmax_bwd_impl(g: Tensor, y: Tensor, dim: int, input_dtype: torch.dtype, log: bool) -> Tensor:
    g2, shape = _rows(g, dim)
    y2, _ = _rows(y, dim)
    return _back(_kernels().softmax_backward(g2, y2, log, input_dtype), shape, dim, y)


def _dims(x: Tensor, dim) -> list[int]:
    """The reduced dims, normalised and sorted (None or []: all of them)."""
    n = max(x.dim(), 1)
    if dim is None or len(dim) == 0:
        return list(range(x.dim()))
    out = sorted({d % n for d in dim})
    if len(out) != len(dim):
        raise RuntimeError(f"dim {list(dim)} appears multiple times in the list of dims")
    return out if x.dim() else []


def _reduce_shape(x: Tensor, dims: list[int], keepdim: bool) -> list[int]:
    return [1 if d in dims else s for d, s in enumerate(x.shape) if keepdim or d not in dims]


def _reduce(x: Tensor, dim, keepdim: bool, dtype, mean: bool) -> Tensor:
    dims = _dims(x, dim)
    shape = _reduce_shape(x, dims, keepdim)
    kept = [d for d in range(x.dim()) if d not in dims]
    x2 = x.permute(kept + dims).reshape(math.prod(x.shape[d] for d in kept), -1) if x.dim() else x.reshape(1, 1)
    if x2.shape[1] > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    return _kernels().sum_rows(x2, mean, dtype).view(shape)


def _sum(x: Tensor, dim=None, keepdim: bool = False, *, dtype=None) -> Tensor:
    out_dtype = dtype or (x.dtype if x.dtype.is_floating_point or x.dtype.is_complex else torch.int64)
    if x.dtype.is_complex or out_dtype.is_complex:
        _routed("sum.dim_IntList", x, torch.empty(0, dtype=out_dtype))     # raises
    if not out_dtype.is_floating_point:          # an integer sum is exact: torch's own kernel
        out = x.new_empty(_reduce_shape(x, _dims(x, dim), keepdim), dtype=out_dtype)
        return torch.ops.aten.sum.IntList_out(x, dim, keepdim, dtype=dtype, out=out)
    if x.dtype != out_dtype and x.dtype not in _FLOATS:
        x = x.to(out_dtype)                      # as torch: the integers are cast, then summed
    return _reduce(x, dim, keepdim, out_dtype, mean=False)


def _mean(x: Tensor, dim=None, keepdim: bool = False, *, dtype=None) -> Tensor:
    out_dtype = dtype or x.dtype
    if not out_dtype.is_floating_point:
        raise RuntimeError(f"mean(): could not infer output dtype. Input dtype must be either a "
                           f"floating point or complex dtype. Got: {_name(out_dtype)}")
    if x.dtype not in _FLOATS:
        x = x.to(out_dtype)
    _routed("mean.dim", x)
    return _reduce(x, dim, keepdim, out_dtype, mean=True)


_ATEN_IMPLS = {
    "mm": _mm,
    "bmm": _bmm,
    "addmm": _addmm,
    "baddbmm": _baddbmm,
    "mv": _mv,
    "_softmax": lambda x, dim, half_to_float: _softmax_impl(x, dim, half_to_float, log=False),
    "_log_softmax": lambda x, dim, half_to_float: _softmax_impl(x, dim, half_to_float, log=True),
    "_softmax_backward_data": lambda g, y, dim, input_dtype: _softmax_bwd_impl(g, y, dim, input_dtype, False),
    "_log_softmax_backward_data": lambda g, y, dim, input_dtype: _softmax_bwd_impl(g, y, dim, input_dtype, True),
    "sum.dim_IntList": _sum,
    "mean.dim": _mean,
}


# ============================================================================== parity ===

class ParityReport(NamedTuple):
    """``logprob_parity``'s report over the unmasked tokens, d = logprobs_b − logprobs_a (NaN
    everywhere when there is no unmasked token)."""
    max_abs: float          # max |d|
    mean_abs: float         # mean |d|
    frac_exact: float       # fraction of tokens whose two log-probs are bitwise equal
    frac_above_1e3: float   # fraction with |d| > 1e-3
    k3: float               # mean of exp(−d) − 1 + d (the k3 KL estimate of the mismatch)
    per_position: Tensor | None   # [T] float64 (CPU): mean |d| at each position; None for 1-D inputs


_INT_OF = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
           torch.bfloat16: torch.int16}


def logprob_parity(logprobs_a: Tensor, logprobs_b: Tensor, mask: Tensor | None = None) -> ParityReport:
    """How far two computations of the same tokens' log-probs are apart (e.g. a ``rollout``
    engine's and the training forward's): logprobs_a, logprobs_b [N] or [B, T] of one floating
    dtype; mask like them (bool or 0/1; None: every token). Tokens whose two values are bitwise
    equal (−inf with −inf included) have d = 0. One host read (a report, not an op)."""
    op = "logprob_parity"
    a = _checks.floating(op, "logprobs_a", logprobs_a)
    b = _checks.floating(op, "logprobs_b", logprobs_b)
    if a.dim() not in (1, 2):
        raise ValueError(f"rlhf_ops.{op}: logprobs_a must be [N] or [B, T], got shape {tuple(a.shape)}")
    _checks.shape(op, "logprobs_b", b, a.shape, "logprobs_a.shape")
    _checks.same_dtype(op, "logprobs_a", a, logprobs_b=b)
    _checks.same_device(op, "logprobs_a", a, logprobs_b=b, mask=mask)
    if mask is None:
        m = torch.ones(a.shape, dtype=torch.bool, device=a.device)
    else:
        _checks.tensor(op, "mask", mask, dtypes=_checks.MASK_DTYPES)
        _checks.shape(op, "mask", mask, a.shape, "logprobs_a.shape")
        m = mask != 0
    a, b = a.detach(), b.detach()
    exact = a.view(_INT_OF[a.dtype]) == b.view(_INT_OF[b.dtype])
    d = torch.where(exact, torch.zeros((), dtype=torch.float64, device=a.device), b.double() - a.double())
    ad = d.abs()
    mf = m.double()
    n = mf.sum()
    stats = torch.stack([
        torch.where(m, ad, torch.zeros_like(ad)).max() if m.any() else ad.new_tensor(0.0),
        (ad * mf).sum(), (exact.double() * mf).sum(), ((ad > 1e-3).double() * mf).sum(),
        ((torch.expm1(-d) + d) * mf).sum(), n])
    stats = stats.cpu().tolist()     # the one host read
    count = stats[5]
    if count == 0:
        nan = float("nan")
        max_abs = mean_abs = frac_exact = frac_big = k3 = nan
    else:
        max_abs = stats[0]
        mean_abs, frac_exact, frac_big, k3 = (s / count for s in stats[1:5])
    per_position = None
    if a.dim() == 2:
        cnt = mf.sum(0)
        per_position = ((ad * mf).sum(0) / cnt).cpu()     # 0/0 = NaN where no unmasked token
        per_position[cnt.cpu() == 0] = float("nan")
    return ParityReport(max_abs, mean_abs, frac_exact, frac_big, k3, per_position)


def plot_parity(reports: dict, path: str, title: str = "train/rollout log-prob mismatch") -> str:
    """One line per report (name → ParityReport with per_position): mean |Δ| per position on a
    symmetric-log axis (exact zeros sit on the axis), frac_exact and max |Δ| in the legend.
    Writes a PNG to ``path`` and returns it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for name, r in reports.items():
        if r.per_position is None:
            raise ValueError(f"plot_parity: report {name!r} has no per_position (1-D inputs)")
        y = r.per_position.numpy()
        ax.plot(range(len(y)), y, marker=".", label=f"{name}: exact {r.frac_exact:.3f}, "
                                                    f"max |Δ| {r.max_abs:.2e}")
    ax.set_yscale("symlog", linthresh=1e-9)
    ax.set_xlabel("position")
    ax.set_ylabel("mean |Δ log-prob|")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
