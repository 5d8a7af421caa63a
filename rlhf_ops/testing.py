"""Check an implementation against an eager reference, by the rule rlhf_ops' own tests use.

    from rlhf_ops.testing import assert_matches_reference
    assert_matches_reference(my_fused_ce, lambda x, t: F.cross_entropy(x, t), logits, target,
                             dtype=torch.bfloat16)

The rule (docs/design.md, "Numerics", as Cut Cross-Entropy tests it). The same inputs, rounded to
``dtype``, go three ways: the fused function, the reference function on them (eager PyTorch in the
same dtype) and the reference function on their float64 upcast (the truth). Then, for every output
and for the gradient of every differentiable input,

    err(fused) ≤ factor · err(eager) + atol      (factor 1.05; atol by dtype and size, ``default_atol``)

where err(x) is x's relative error against the float64 result:
  * norm-wise, ‖x − ref‖ / ‖|ref| + scale‖ over the finite positions, for every compared tensor;
  * element-wise too, for outputs whose elements are independent (one per row or token: pass
    ``elementwise``): max_i |x_i − ref_i| / (|ref_i| + scale_i), so that an error confined to a few
    small elements is not hidden by large ones.
``scale_i`` (outputs judged element-wise only; 0 elsewhere) is the size of the operands element i
is computed from: a log-prob of a row of logits, or a log-ratio of two log-probs, carries an error
relative to the row's largest logit, not to itself (the difference of two log-probs of −5 that
agree to 1e-4 is known to ~1e-7 absolute, 1e-3 relative, however it is computed); 0 judges each
element on its own magnitude.
Non-finite values must agree exactly: NaN, +inf and −inf at the same positions as in the float64
result rounded to the compared tensor's dtype (a NaN where the reference is finite fails, and so
does an infinity of the wrong sign), whatever eager does.

The bound is relative to eager's own error, so it tightens where eager is exact and can always
fail: it is never a fixed loose tolerance. ``atol`` only absorbs rounding noise of an equally good
algorithm that rounds in another order (about half an ulp of the compared dtype for fp16/bf16).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

F64 = torch.float64

FACTOR = 1.05
# atol by the dtype of the compared tensor: rounding noise on top of eager's own error. For
# fp16/bf16 it is about half an ulp, sized for a tensor of up to ``NOISE_ELEMENTS`` elements;
# the noise of a norm over n elements shrinks as 1/sqrt(n), and so does the norm-wise atol
# (at 64k elements bf16's is 1.3e-4: a kernel that truncates to bf16 instead of rounding to
# nearest, about twice eager's error, fails; at 64 elements it would pass unnoticed).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-4, torch.bfloat16: 4e-3}
NOISE_ELEMENTS = 64


def default_atol(dtype: torch.dtype, numel: int, kind: str = "norm") -> float:
    """The small tolerance of a compared tensor of ``dtype`` with ``numel`` elements: TOLERANCE,
    and for a norm-wise fp16/bf16 check TOLERANCE · sqrt(NOISE_ELEMENTS / numel) when larger."""
    tol = TOLERANCE.get(dtype, TOLERANCE[torch.float32])
    if kind == "norm" and dtype in (torch.float16, torch.bfloat16) and numel > NOISE_ELEMENTS:
        tol *= math.sqrt(NOISE_ELEMENTS / numel)
    return tol

__all__ = ["assert_matches_reference", "compare_to_reference", "default_atol", "Check", "Report", "FACTOR",
           "TOLERANCE"]


@dataclass
class Check:
    """One compared tensor under one measure."""
    tensor: str                 # "output 0 (loss)", "grad of input 1 (weight)"
    kind: str                   # "norm" | "elementwise"
    fused_err: float
    eager_err: float
    bound: float                # factor · eager_err + atol
    factor: float
    atol: float
    index: tuple | None = None  # where the fused result deviates most (or the first non-finite mismatch)
    fused: float | None = None      # values there
    reference: float | None = None
    eager: float | None = None
    problem: str | None = None  # a failure that is not a size: non-finite mismatch, shape, missing

    @property
    def passed(self) -> bool:
        return self.problem is None and self.fused_err <= self.bound

    @property
    def ratio(self) -> float | None:
        """fused error / eager error; None when eager is exact or non-finite (the bound is then
        atol alone, or none)."""
        if self.eager_err == 0 or math.isinf(self.eager_err):
            return None
        return self.fused_err / self.eager_err

    def describe(self) -> str:
        if self.problem is not None:
            where = f" at index {self.index}" if self.index is not None else ""
            vals = "" if self.fused is None else \
                f": fused {self.fused:.8g}, reference {self.reference:.8g}, eager {_num(self.eager)}"
            return f"{self.tensor}: {self.problem}{where}{vals}"
        what = "relative error (norm)" if self.kind == "norm" else "worst element relative error"
        ratio = self.ratio
        r = ("eager exact" if self.eager_err == 0 else "eager non-finite") if ratio is None \
            else f"{ratio:.3g}x eager"
        head = (f"{self.tensor}: {what} {self.fused_err:.3e} {'<=' if self.passed else '>'} bound "
                f"{self.bound:.3e} = {self.factor:g} x eager's own error {self.eager_err:.3e} + atol "
                f"{self.atol:.1e} ({r})")
        if self.index is not None and self.fused is not None:
            head += (f"; largest deviation at index {self.index}: fused {self.fused:.8g}, "
                     f"reference {self.reference:.8g}, eager {_num(self.eager)}")
        return head


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.8g}"


@dataclass
class Report:
    """Every check of one comparison; ``passed`` when all pass."""
    checks: list = field(default_factory=list)
    dtype: torch.dtype | None = None

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failures(self) -> list:
        return [c for c in self.checks if not c.passed]

    @property
    def worst_ratio(self) -> float | None:
        """The largest fused/eager error ratio among the checks where eager is not exact."""
        rs = [c.ratio for c in self.checks if c.ratio is not None]
        return max(rs) if rs else None

    @property
    def max_rel_err(self) -> float:
        """The largest fused relative error (norm-wise or element-wise) among the checks."""
        return max((c.fused_err for c in self.checks), default=0.0)

    def message(self) -> str:
        bad = self.failures
        dt = "" if self.dtype is None else f" in {str(self.dtype).replace('torch.', '')}"
        lines = [f"{len(bad)} of {len(self.checks)} checks failed{dt} "
                 f"(rule: fused error vs float64 <= factor x eager's error in the same dtype + atol)"]
        lines += ["  " + c.describe() for c in bad]
        return "\n".join(lines)


# ------------------------------------------------------------------------------- measures ---

def _first_index(mask: torch.Tensor) -> tuple:
    return tuple(int(i) for i in mask.nonzero()[0])


def _value(t: torch.Tensor, idx: tuple) -> float:
    return float(t[idx]) if t.dim() else float(t)


def _nonfinite_mismatch(a: torch.Tensor, ref: torch.Tensor):
    """The first index where ``a`` and ``ref`` (same shape, fp64) disagree on a non-finite value
    (NaN, +inf, −inf), or None."""
    bad = ~torch.isfinite(a) | ~torch.isfinite(ref)
    same = (torch.isnan(a) & torch.isnan(ref)) | (a == ref)
    diff = bad & ~same
    return _first_index(diff) if diff.any() else None


def _error(x: torch.Tensor, ref: torch.Tensor, fin: torch.Tensor, kind: str, scale):
    """(error, index of the largest deviation) of x against ref over the finite positions ``fin``."""
    if not fin.any():
        return 0.0, None
    zero = torch.zeros((), dtype=F64, device=x.device)
    d = torch.where(fin, (x - ref).abs(), zero)
    den = torch.where(fin, ref.abs() + scale, zero)       # |ref| + the operands' rounding scale
    if kind == "norm":
        n = den.norm()
        err = float(d.norm() / n) if n > 0 else float(d.norm())
        return err, _first_index(d == d.max())
    r = torch.where(d == 0, zero, d / den)
    return float(r.max()), _first_index(r == r.max())


def _atol(atol, dtype, rounding_dtype, numel: int, kind: str) -> float:
    if atol is not None:
        return float(atol)
    tol = default_atol(dtype, numel, kind)
    return tol if rounding_dtype is None else max(tol, default_atol(rounding_dtype, numel, kind))


def _compare(name: str, fused, eager, ref, *, factor: float, atol, rounding_dtype, elementwise: bool,
             scale) -> list:
    """Checks of one tensor: norm-wise, and element-wise when asked."""
    if fused is None and ref is None:
        return []

    def fail(problem, **kw):
        return [Check(name, "norm", math.inf, 0.0, math.nan, factor, math.nan, problem=problem, **kw)]
    if fused is None or ref is None:
        return fail("the fused result has no value where the reference has one" if fused is None
                    else "the fused result has a value where the reference has none")
    if tuple(fused.shape) != tuple(ref.shape):
        return fail(f"shape {tuple(fused.shape)} differs from the reference's {tuple(ref.shape)}")
    # the truth in the compared dtype decides which values are non-finite (an overflow of the
    # dtype is an infinity both sides must have); errors are then measured in fp64
    ref_r = ref.detach().to(fused.dtype).to(F64) if fused.is_floating_point() else ref.detach().to(F64)
    f64, r64 = fused.detach().to(F64), ref.detach().to(F64)
    e64 = None if eager is None else eager.detach().to(F64)
    bad = _nonfinite_mismatch(f64, ref_r)
    if bad is not None:
        return fail("non-finite values differ from the reference", index=bad, fused=_value(f64, bad),
                    reference=_value(r64, bad), eager=None if e64 is None else _value(e64, bad))
    fin = torch.isfinite(ref_r)
    # eager's own error over the positions where it is finite (an overflow of eager does not
    # loosen the bound elsewhere); the fused result is judged on every finite position
    eager_bad = e64 is None or e64.shape != r64.shape
    fin_e = None if eager_bad else fin & torch.isfinite(e64)
    if scale is None:
        scale = 0.0
    scale = torch.as_tensor(scale, dtype=F64, device=f64.device).abs().expand(r64.shape) if r64.dim() \
        else torch.as_tensor(scale, dtype=F64, device=f64.device).abs().reshape(())
    out = []
    for kind in (("norm", "elementwise") if elementwise else ("norm",)):
        err, idx = _error(f64, r64, fin, kind, scale)
        e_err = math.inf if eager_bad else _error(e64, r64, fin_e, kind, scale)[0]
        a = _atol(atol, fused.dtype, rounding_dtype, fused.numel(), kind)
        c = Check(name, kind, err, e_err, factor * e_err + a, factor, a, index=idx)
        if idx is not None:
            c.fused, c.reference = _value(f64, idx), _value(r64, idx)
            c.eager = None if eager_bad else _value(e64, idx)
        out.append(c)
    return out


# ------------------------------------------------------------------------------- running ---

def _flatten(out) -> list:
    """A function's result as a list of tensors or None (a tensor, or a (named) tuple/list)."""
    if out is None or isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return list(out)
    raise TypeError(f"assert_matches_reference: a function returned {type(out).__name__}; "
                    f"expected a tensor or a tuple of tensors")


def _names(out, n: int) -> list:
    fields = getattr(type(out), "_fields", None)
    if fields:
        return [f"output {i} ({f})" for i, f in enumerate(fields)]
    return [f"output {i}" for i in range(n)]


def _per_input(value, n: int, what: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"assert_matches_reference: {what} has {len(value)} entries for {n} inputs")
        return list(value)
    return [value] * n


def compare_to_reference(fused_fn: Callable, reference_fn: Callable, *inputs: Any,
                         dtype: torch.dtype | Sequence[torch.dtype | None] | None = None,
                         grad: bool | Iterable[int] = True, factor: float = FACTOR,
                         atol: float | None = None, rounding_dtype: torch.dtype | None = None,
                         elementwise: bool | Iterable[int] = False, scale: Any = None,
                         grad_outputs: Sequence | None = None, input_names: Sequence[str] | None = None,
                         seed: int = 0) -> Report:
    """``assert_matches_reference`` without the raise: the ``Report`` of every check (errors,
    eager's errors, bounds, ratios, where the largest deviation is). Same arguments."""
    n = len(inputs)
    dtypes = _per_input(dtype, n, "dtype")
    names = list(input_names) if input_names is not None else [None] * n
    if len(names) != n:
        raise ValueError(f"assert_matches_reference: input_names has {len(names)} entries for {n} inputs")
    floats = [i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor) and x.is_floating_point()]
    want_grad = set(floats) if grad is True else set() if grad is False else set(grad)
    if not want_grad <= set(floats):
        raise ValueError(f"assert_matches_reference: grad names inputs {sorted(want_grad - set(floats))} "
                         f"that are not floating-point tensors")

    # the inputs each run gets: the values rounded to dtype, as separate leaves
    def leaves(to64: bool) -> list:
        out = []
        for i, x in enumerate(inputs):
            if i in floats:
                x = x.detach()
                if dtypes[i] is not None:
                    x = x.to(dtypes[i])
                x = x.to(F64) if to64 else x.clone()
                x.requires_grad_(i in want_grad)
            out.append(x)
        return out
    x_fused, x_eager, x_ref = leaves(False), leaves(False), leaves(True)
    out_f, out_e, out_r = fused_fn(*x_fused), reference_fn(*x_eager), reference_fn(*x_ref)
    fs, es, rs = _flatten(out_f), _flatten(out_e), _flatten(out_r)
    if len(fs) != len(rs):
        raise AssertionError(f"assert_matches_reference: the fused function returned {len(fs)} outputs, "
                             f"the reference {len(rs)}")
    onames = _names(out_r, len(rs))
    ew = set(range(len(rs))) if elementwise is True else set() if elementwise is False else set(elementwise)
    scales = scale if isinstance(scale, Mapping) else {i: scale for i in ew}
    report = Report(dtype=next((d for d in dtypes if d is not None), None))
    for i, (f, e, r) in enumerate(zip(fs, es, rs)):
        report.checks += _compare(onames[i], f, e, r, factor=factor, atol=atol, rounding_dtype=rounding_dtype,
                                  elementwise=i in ew, scale=scales.get(i))
    if not want_grad:
        return report

    # gradients of Σ g·output for one upstream gradient g per differentiable output (fp64, seeded)
    gen = torch.Generator().manual_seed(seed)
    diff = [i for i, r in enumerate(rs) if isinstance(r, torch.Tensor) and r.requires_grad]
    if grad_outputs is None:
        gs = {i: torch.randn(rs[i].shape, generator=gen, dtype=F64).to(rs[i].device) for i in diff}
    else:
        gs = {i: g for i, g in enumerate(grad_outputs) if g is not None and i in diff}

    def grads(outs, xs):
        # an output of the wrong shape has failed above; it sends no gradient
        pairs = [(outs[i], gs[i]) for i in gs if isinstance(outs[i], torch.Tensor) and outs[i].requires_grad
                 and outs[i].shape == gs[i].shape]
        idx = sorted(want_grad)
        got = [None] * len(idx)
        if pairs:
            got = torch.autograd.grad([o for o, _ in pairs], [xs[j] for j in idx],
                                      [g.to(o.dtype) for o, g in pairs], allow_unused=True)
        return {j: torch.zeros_like(xs[j]) if g is None else g for j, g in zip(idx, got)}
    g_f, g_e, g_r = grads(fs, x_fused), grads(es, x_eager), grads(rs, x_ref)
    for j in sorted(want_grad):
        name = f"grad of input {j}" + (f" ({names[j]})" if names[j] else "")
        report.checks += _compare(name, g_f[j], g_e[j], g_r[j], factor=factor, atol=atol,
                                  rounding_dtype=rounding_dtype, elementwise=False, scale=None)
    return report


def assert_matches_reference(fused_fn: Callable, reference_fn: Callable, *inputs: Any,
                             dtype: torch.dtype | Sequence[torch.dtype | None] | None = None,
                             grad: bool | Iterable[int] = True, factor: float = FACTOR,
                             atol: float | None = None, rounding_dtype: torch.dtype | None = None,
                             elementwise: bool | Iterable[int] = False, scale: Any = None,
                             grad_outputs: Sequence | None = None, input_names: Sequence[str] | None = None,
                             seed: int = 0) -> Report:
    """Assert that ``fused_fn(*inputs)`` matches ``reference_fn(*inputs)``, forward and backward,
    under the eager-relative rule of the module docstring; return the ``Report`` when it does.

    inputs: positional arguments of both functions. Floating-point tensors are rounded to
        ``dtype`` (one dtype, or one per input with None = keep the input's own) and given to
        each run as a fresh leaf; the float64 reference gets the same rounded values upcast.
        Other tensors (indices, bool masks) and non-tensors are passed unchanged.
    grad: True (every floating-point input), False (forward only), or the indices of the
        inputs whose gradients are compared. One random upstream gradient (fp64, from ``seed``)
        per output that requires grad in the reference is back-propagated through all three runs.
    factor, atol: the rule's factor (1.05) and the small tolerance (None: ``default_atol`` of the
        compared tensor's dtype and size).
    rounding_dtype: a dtype the function rounds an intermediate to (a linear head that materialises
        its logits in the input dtype): the default atol is the larger of that dtype's and the
        compared tensor's.
    elementwise: True, False or the output indices also judged element-wise (outputs with one
        independent element per row/token); ``scale``: for those, the per-element rounding scale
        (a number or a tensor broadcast to the output; or a mapping from output index to one).
    grad_outputs: upstream gradients per output instead of random ones (None entries: none).
    input_names: names for the messages ("grad of input 0 (logits)").

    Raises AssertionError naming every failing tensor ("output 1 (entropy)", "grad of input 0"),
    the measure, the index of the largest deviation with the fused, reference and eager values
    there, the error and the bound, and eager's own error.
    """
    report = compare_to_reference(fused_fn, reference_fn, *inputs, dtype=dtype, grad=grad, factor=factor,
                                  atol=atol, rounding_dtype=rounding_dtype, elementwise=elementwise,
                                  scale=scale, grad_outputs=grad_outputs, input_names=input_names, seed=seed)
    if not report.passed:
        raise AssertionError(report.message())
    return report
