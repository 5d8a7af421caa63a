"""Numerical helpers shared by the op tests.

Acceptance rule for low precision (as Cut Cross-Entropy tests it): the error of our result
against a float64 reference may not exceed the error of eager PyTorch run in the same dtype,
plus a small tolerance. For fp32/fp64 inputs a fixed tight tolerance applies.
"""
import torch

from rlhf_ops._memory import packed_for_backward

TIGHT = {torch.float64: 1e-10, torch.float32: 1e-5}


def _nonfinite_differ(a: torch.Tensor, ref: torch.Tensor) -> bool:
    """True unless ``a`` and ``ref`` hold the same non-finite values at the same positions:
    NaN where ref is NaN, +inf where ref is +inf, −inf where ref is −inf (and nowhere else)."""
    bad_a, bad_r = ~torch.isfinite(a), ~torch.isfinite(ref)
    if not torch.equal(bad_a, bad_r):
        return True
    x, y = a[bad_r], ref[bad_r]
    nan_x, nan_y = torch.isnan(x), torch.isnan(y)
    return not (torch.equal(nan_x, nan_y) and torch.equal(x[~nan_y], y[~nan_y]))


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """‖a − ref‖ / ‖ref‖ in float64 over the finite positions; inf unless the non-finite
    positions agree exactly (NaN with NaN, +inf with +inf, −inf with −inf)."""
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    if a.shape != ref.shape or _nonfinite_differ(a, ref):
        return float("inf")
    fin = torch.isfinite(ref)
    d = (a[fin] - ref[fin]).norm()
    n = ref[fin].norm()
    return float(d / n) if n > 0 else float(d)


def max_rel_err(a: torch.Tensor, ref: torch.Tensor, atol=0.0) -> float:
    """Element-wise: max_i |a_i − ref_i| / (|ref_i| + atol_i) over the finite positions (0/0 = 0);
    inf unless the non-finite positions agree exactly. Unlike ``rel_err``'s one norm, an error
    confined to a few small elements is not hidden by large ones. ``atol`` (a number or a tensor
    broadcast to ``ref``) is each element's scale of rounding: an element computed as a difference
    of operands of size A carries an error relative to A, not to itself (0: every element is
    judged on its own magnitude)."""
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    if a.shape != ref.shape or _nonfinite_differ(a, ref):
        return float("inf")
    fin = torch.isfinite(ref)
    if not fin.any():
        return 0.0
    atol = torch.as_tensor(atol, dtype=torch.float64).detach().cpu().abs().expand(ref.shape)
    d = (a[fin] - ref[fin]).abs()
    den = ref[fin].abs() + atol[fin]
    r = torch.where(d == 0, torch.zeros_like(d), d / den)
    return float(r.max())


def assert_matches(ours, ref64, eager=None, *, dtype=None, tol=None, what=""):
    """ours vs the float64 reference: tight for fp32/fp64, else no worse than ``eager`` + tol."""
    err = rel_err(ours, ref64)
    if eager is None:
        bound = tol if tol is not None else TIGHT.get(dtype or ours.dtype, 1e-5)
    else:
        bound = rel_err(eager, ref64) * 1.05 + (tol if tol is not None else 2e-3)
    assert err <= bound, f"{what}: relative error {err:.3e} exceeds {bound:.3e}"


def assert_elementwise(ours, ref64, eager=None, *, dtype=None, tol=None, atol=0.0, what=""):
    """Element-wise form of ``assert_matches`` for outputs whose elements are independent (one
    per row or token): the worst element's relative error (``max_rel_err``) may not exceed the
    tight bound of ``dtype`` (fp32/fp64), or eager's own worst element in the same dtype × 1.05
    + tol."""
    err = max_rel_err(ours, ref64, atol)
    if eager is None:
        bound = tol if tol is not None else TIGHT.get(dtype or ours.dtype, 1e-5)
    else:
        bound = max_rel_err(eager, ref64, atol) * 1.05 + (tol if tol is not None else 2e-3)
    assert err <= bound, f"{what}: worst element relative error {err:.3e} exceeds {bound:.3e}"


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN (floats) so that an element a kernel forgets to write fails the check."""
    if t.is_floating_point():
        t.fill_(float("nan"))
    return t


def saved_tensors(fn):
    """Every distinct tensor autograd saves for backward while ``fn`` runs (works on meta tensors;
    the recorder is rlhf_ops._memory's, the one bench.memory counts with)."""
    with packed_for_backward() as packed:
        fn()
    return list({id(t): t for t in packed}.values())


def saved_bytes(fn) -> int:
    """Bytes of the tensors saved for backward while ``fn`` runs."""
    return sum(t.numel() * t.element_size() for t in saved_tensors(fn))
