"""Numerical helpers shared by the op tests.

Acceptance rule for low precision (as Cut Cross-Entropy tests it): the error of our result
against a float64 reference may not exceed the error of eager PyTorch run in the same dtype,
plus a small tolerance. For fp32/fp64 inputs a fixed tight tolerance applies.
"""
import torch

TIGHT = {torch.float64: 1e-10, torch.float32: 1e-5}


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """‖a − ref‖ / ‖ref‖ in float64, NaN/inf positions compared exactly."""
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    same_nonfinite = (~torch.isfinite(ref)) & (a == ref)
    if torch.isnan(a).any() and not torch.isnan(ref).any():
        return float("inf")
    fin = torch.isfinite(ref) & ~same_nonfinite
    if not torch.equal(torch.isfinite(a), torch.isfinite(ref)):
        return float("inf")
    d = (a[fin] - ref[fin]).norm()
    n = ref[fin].norm()
    return float(d / n) if n > 0 else float(d)


def assert_matches(ours, ref64, eager=None, *, dtype=None, tol=None, what=""):
    """ours vs the float64 reference: tight for fp32/fp64, else no worse than ``eager`` + tol."""
    err = rel_err(ours, ref64)
    if eager is None:
        bound = tol if tol is not None else TIGHT.get(dtype or ours.dtype, 1e-5)
    else:
        bound = rel_err(eager, ref64) * 1.05 + (tol if tol is not None else 2e-3)
    assert err <= bound, f"{what}: relative error {err:.3e} exceeds {bound:.3e}"


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN (floats) so that an element a kernel forgets to write fails the check."""
    if t.is_floating_point():
        t.fill_(float("nan"))
    return t


def saved_tensors(fn):
    """Every distinct tensor autograd saves for backward while ``fn`` runs (works on meta tensors)."""
    seen = {}

    def pack(t):
        seen[id(t)] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return list(seen.values())


def saved_bytes(fn) -> int:
    """Bytes of the tensors saved for backward while ``fn`` runs."""
    return sum(t.numel() * t.element_size() for t in saved_tensors(fn))
