"""Vocabulary parallelism on torch.distributed (gloo, CPU): real multi-process runs.

One spawn of 3 processes runs every case: the 3-rank cases on the whole world, the 2-rank cases on
the subgroup of global ranks [1, 2] (so a group rank differs from the global rank). Each case
draws the same full-vocabulary inputs on every rank (V = 70,001, uneven slices; the 3-rank split
has a slice of width 1), runs the sharded op on this rank's slice and checks, in float64, the
result and every gradient against the single-process op on the full inputs, and that the result
is bitwise the same on every rank. Spawning once keeps the suite's cost to one start-up (imports
and the Triton interpreter's first launch, ~15 s per process on a 2-core machine).

On a CPU machine the cases run on CPU tensors with the reference and Triton (interpreter)
backends. With a GPU they run on CUDA tensors (all three processes share the GPU; the gloo
collectives take CPU copies) with the reference, Triton and CUDA backends: the sharded CUDA and
Triton kernels (slice statistics, the backward with an offset) run there; the error cases then
set RLHF_OPS_DEBUG=1, the checks' switch for CUDA tensors.

The group has a timeout (``_spawn.GROUP_TIMEOUT_S``), and the whole spawn a deadline, so a case that
would hang fails instead. A check inside a case never raises on one rank alone (which would leave
the others waiting in the case's next collective until the deadline, without saying what
differed): every check (``_agree``, ``_close``, ``_raises``, ``same_on_every_rank``) first
gathers every rank's outcome, then raises on every rank with each failing rank's message.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import _spawn

V = 70001
SIZES = {2: [40000, 30001], 3: [23000, 1, 47000]}
# a guard against a hang, not the time budget: on the idle 2-core CI machine the spawn takes
# ~1 min (RLHF_DIST_DEADLINE_S overrides it on a loaded one)
DEADLINE_S = float(os.environ.get("RLHF_DIST_DEADLINE_S", 400))
CASES, case = _spawn.registry()   # (name, worlds, fn); @case(*worlds) adds one
_GROUP = None      # the process group of the case running on this rank (set by _worker)


# --------------------------------------------------------------------------- the worker side ---

class Ctx:
    """One case on one rank: the group, this rank's place in it and its vocabulary slice."""

    def __init__(self, group, world: int, fused: list):
        import torch.distributed as dist
        self.group, self.world = group, world
        self.fused = fused                      # the fused backends that run here
        self.backends = ["reference"] + fused
        self.rank = dist.get_rank(group)
        self.sizes = SIZES[world]
        self.off = sum(self.sizes[:self.rank])
        self.V_r = self.sizes[self.rank]

    def shard(self, full: torch.Tensor, dim: int = -1) -> torch.Tensor:
        return full.narrow(dim, self.off, self.V_r)

    def gather(self, t: torch.Tensor) -> list:
        import torch.distributed as dist
        out = [torch.empty_like(t, device="cpu") for _ in range(self.world)]
        dist.all_gather(out, t.detach().contiguous().cpu(), group=self.group)
        return out

    def same_on_every_rank(self, t: torch.Tensor, what: str):
        t = t.detach().cpu()
        differ = [r for r, o in enumerate(self.gather(t)) if not (
            torch.equal(o.isnan(), t.isnan()) and torch.equal(o.nan_to_num(), t.nan_to_num()))]
        _agree(not differ, f"{what}: rank(s) {differ} differ from rank {self.rank}")


def _agree(ok, msg) -> None:
    """A check of a case, agreed by every rank of its group before anyone raises: each rank
    takes part in one gather of (ok, msg) whatever its outcome, and all raise the same error,
    naming each failing rank and its message, when any failed."""
    import torch.distributed as dist
    out = [None] * dist.get_world_size(_GROUP)
    dist.all_gather_object(out, (bool(ok), str(msg)), group=_GROUP)
    failed = [f"rank {r}: {m}" for r, (o, m) in enumerate(out) if not o]
    if failed:
        raise AssertionError("; ".join(failed))


@contextlib.contextmanager
def _raises(exc, match=None):
    """``pytest.raises``, agreed across the ranks (see ``_agree``); yields its ExceptionInfo."""
    failure = None
    try:
        with pytest.raises(exc, match=match) as info:
            yield info
    except (Exception, pytest.fail.Exception) as e:   # not raised, no match, or another error
        failure = f"{type(e).__name__}: {e}"
    _agree(failure is None, failure)


def _close(ours, ref, what, tol=1e-10):
    from _util import rel_err
    ours = ours.full_tensor() if hasattr(ours, "full_tensor") else ours
    err = rel_err(ours, ref)
    _agree(err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}")


def _grads(out, inputs, g):
    return torch.autograd.grad(out, inputs, g, allow_unused=True, retain_graph=True)


def _worker(rank: int, world: int, init_file: str, out_dir: str, only: str | None):
    dist = _spawn.init(rank, world, init_file)
    groups = {3: dist.group.WORLD, 2: dist.new_group([1, 2])}
    import rlhf_ops as ro
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        torch.set_default_device("cuda")
        fused = ["triton"] + (["cuda"] if "cuda" in ro.available_backends() else [])
    else:
        fused = ["triton"]

    def make_ctx(w):
        global _GROUP
        ctx = Ctx(groups[w], w, fused)
        _GROUP = ctx.group
        return ctx
    _spawn.run_cases(rank, CASES, make_ctx, lambda w: not (w == 2 and rank == 0), out_dir, only)


# --------------------------------------------------------------------------- the pytest side ---

@pytest.fixture(scope="module")
def results(tmp_path_factory):
    t0 = time.time()
    out = _spawn.spawn("test_distributed", 3, tmp_path_factory.mktemp("dist"), os.environ.get("RLHF_DIST_ONLY"),
                       DEADLINE_S, "distributed")
    print(f"\ndistributed cases: {time.time() - t0:.1f} s for one 3-process spawn")
    return out


# --------------------------------------------------------------------------------- the cases ---
# Each runs on every rank of its group with the same random inputs.

def _ce_inputs(ctx, rows=8, dtype=torch.float64):
    """Full logits [2, rows/2, V] with the edge cases in its rows, and targets: ignored rows, ids
    at the slice borders (the 1-wide slice of the 3-rank split included), V − 1 and 0."""
    x = torch.randn(rows, V, dtype=torch.float64) * 3
    x[0] = 1e4 + 2 * torch.randn(V, dtype=torch.float64)     # logits near 1e4
    x[1, : V // 2] = -1e4                                    # far-apart values
    x[2] = float("-inf")                                     # mass only in the last slice
    x[2, -5:] = torch.randn(5, dtype=torch.float64)
    x[3] = float("-inf")                                     # ignored row of −inf
    t = torch.randint(0, V, (rows,))
    t[2:8] = torch.tensor([V - 3, -100, ctx.sizes[0] - 1, ctx.sizes[0], V - 1, 0])[:rows - 2]
    return x.to(dtype).reshape(2, rows // 2, V), t.reshape(2, rows // 2)


def _ce_against_full(ctx, backend, **kw):
    import rlhf_ops as ro
    full, t = _ce_inputs(ctx)
    if kw.get("ignore_index", -100) != -100:
        t = torch.where(t == -100, kw["ignore_index"], t)
    x = ctx.shard(full).clone().requires_grad_()
    xf = full.clone().requires_grad_()
    out = ro.cross_entropy(x, t, backend=backend, process_group=ctx.group, **kw)
    ref = ro.cross_entropy(xf, t, backend="reference", **kw)
    g = torch.rand(ref.shape, dtype=torch.float64) + 0.5
    (gx,), (gf,) = _grads(out, [x], g), _grads(ref, [xf], g)
    _close(out, ref, f"loss {kw}")
    _close(gx, ctx.shard(gf), f"grad {kw}")
    ctx.same_on_every_rank(out, "loss")


@case(2, 3)
def ce_reference(ctx):
    _ce_against_full(ctx, "reference", reduction="none")
    _ce_against_full(ctx, "reference", reduction="mean", label_smoothing=0.125, ignore_index=-1)
    _ce_against_full(ctx, "reference", reduction="sum", label_smoothing=0.3)


@case(2, 3)
def ce_fused(ctx):
    for be in ctx.fused:
        _ce_against_full(ctx, be, reduction="none")
        _ce_against_full(ctx, be, reduction="mean", label_smoothing=0.125, ignore_index=-1)


@case(2)
def ce_fused_inplace_backward(ctx):
    import rlhf_ops as ro
    full, t = _ce_inputs(ctx)
    for be in ctx.fused:
        leaf = ctx.shard(full).clone().requires_grad_()
        y = leaf * 1.0
        loss = ro.cross_entropy(y, t, backend=be, process_group=ctx.group, inplace_backward=True)
        buf = y.detach()
        loss.backward()
        xf = full.clone().requires_grad_()
        ro.cross_entropy(xf, t, backend="reference").backward()
        _close(leaf.grad, ctx.shard(xf.grad), "in-place grad")
        _agree(torch.equal(buf, leaf.grad), 'torch.equal(buf, leaf.grad)')


@case(2, 3)
def ce_fp32_near_1e4_no_worse_than_unsharded(ctx):
    """fp32: the sharded op's error against fp64 stays within the unsharded eager one's (×1.05)."""
    import rlhf_ops as ro
    from _util import rel_err
    full = (1e4 + 2 * torch.randn(6, V, dtype=torch.float64))
    full[:, ::7] = -1e4
    t = torch.randint(0, V, (6,))
    x32 = full.float()
    ref = F.cross_entropy(full, t, reduction="none", label_smoothing=0.1)
    eager = F.cross_entropy(x32, t, reduction="none", label_smoothing=0.1)
    for be in ctx.backends:
        out = ro.cross_entropy(ctx.shard(x32), t, reduction="none", label_smoothing=0.1, backend=be,
                               process_group=ctx.group)
        _agree(rel_err(out, ref) <= rel_err(eager, ref) * 1.05 + 1e-6, (be, rel_err(out, ref),
                                                                         rel_err(eager, ref)))


@case(2, 3)
def ce_edge_cases(ctx):
    """Empty batch, a single row, every target ignored (mean 0, zero gradient), a NaN logit."""
    import rlhf_ops as ro
    for be in ctx.backends:
        e = torch.zeros(0, ctx.V_r, dtype=torch.float64, requires_grad=True)
        out = ro.cross_entropy(e, torch.zeros(0, dtype=torch.long), backend=be, process_group=ctx.group)
        _agree(out.item() == 0.0, 'out.item() == 0.0')
        out.backward()
        full = torch.randn(1, V, dtype=torch.float64)
        t = torch.tensor([V - 1])
        x = ctx.shard(full).clone().requires_grad_()
        out = ro.cross_entropy(x, t, backend=be, process_group=ctx.group)
        _close(out, F.cross_entropy(full, t), "single row")
        x = ctx.shard(torch.randn(3, V, dtype=torch.float64)).clone().requires_grad_()
        out = ro.cross_entropy(x, torch.full((3,), -100), backend=be, process_group=ctx.group)
        out.backward()
        _agree(out.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x)),
               "all targets ignored: loss 0 and a zero gradient")
        full = torch.randn(2, V, dtype=torch.float64)
        full[0, V - 2] = float("nan")                       # in the last slice only
        out = ro.cross_entropy(ctx.shard(full), torch.tensor([3, 4]), reduction="none", backend=be,
                               process_group=ctx.group)
        _agree(out[0].isnan() and out[1].isfinite(), out)


@case(2, 3)
def linear_ce(ctx):
    """hidden replicated, weight/bias rows sliced: loss, d hidden (summed over ranks), d W, d b
    against the full head; the fused path in several row chunks."""
    import rlhf_ops as ro
    import importlib
    layout_mod = importlib.import_module("rlhf_ops._layout")
    N, d = 9, 16
    h = torch.randn(N, d, dtype=torch.float64)
    w = torch.randn(V, d, dtype=torch.float64) * 0.5
    b = torch.randn(V, dtype=torch.float64)
    t = torch.randint(0, V, (N,))
    t[::4] = -100
    t[1], t[2] = ctx.sizes[0] - 1, ctx.sizes[0]
    block_len = layout_mod.block_len
    layout_mod.block_len = lambda n_other, itemsize, total: 4
    try:
        for be, ls in [("reference", 0.125)] + [(be, ls) for be in ctx.fused for ls in (0.125, 0.0)]:
            args = [h.clone().requires_grad_(), ctx.shard(w, 0).clone().requires_grad_(),
                    ctx.shard(b, 0).clone().requires_grad_()]
            out = ro.linear_cross_entropy(args[0], args[1], t, bias=args[2], label_smoothing=ls,
                                          backend=be, process_group=ctx.group)
            ref_args = [a.clone().requires_grad_() for a in (h, w, b)]
            ref = F.cross_entropy(ref_args[0] @ ref_args[1].T + ref_args[2], t, label_smoothing=ls)
            _close(out, ref, f"{be} loss")
            g, gr = _grads(out, args, None), _grads(ref, ref_args, None)
            _close(g[0], gr[0], f"{be} d hidden")
            _close(g[1], ctx.shard(gr[1], 0), f"{be} d weight")
            _close(g[2], ctx.shard(gr[2], 0), f"{be} d bias")
            ctx.same_on_every_rank(out, "loss")
            ctx.same_on_every_rank(g[0], "d hidden")
    finally:
        layout_mod.block_len = block_len


@case(2, 3)
def vocab_offset_given(ctx):
    """vocab_offset= gives the same result; a wrong one is an error on every rank (CPU checks)."""
    import rlhf_ops as ro
    full, t = _ce_inputs(ctx, rows=4)
    x = ctx.shard(full)
    a = ro.cross_entropy(x, t, backend=ctx.fused[0], process_group=ctx.group)
    b = ro.cross_entropy(x, t, backend=ctx.fused[0], process_group=ctx.group, vocab_offset=ctx.off)
    _agree(torch.equal(a, b), 'torch.equal(a, b)')
    wrong = ctx.off + 1 if ctx.rank == 0 else ctx.off
    with _debug_checks(), _raises(ValueError, match="vocab_offset=1 on rank 0, but the slice sizes"):
        ro.cross_entropy(x, t, process_group=ctx.group, vocab_offset=wrong)


class _debug_checks:
    """RLHF_OPS_DEBUG=1 inside the block: the value checks' switch for CUDA tensors (a no-op on
    CPU tensors, which are always checked)."""

    def __enter__(self):
        self.old = os.environ.get("RLHF_OPS_DEBUG")
        os.environ["RLHF_OPS_DEBUG"] = "1"

    def __exit__(self, *exc):
        if self.old is None:
            os.environ.pop("RLHF_OPS_DEBUG")
        else:
            os.environ["RLHF_OPS_DEBUG"] = self.old


@case(2, 3)
def out_of_range_target_is_the_unsharded_error(ctx):
    """A target outside every slice: the unsharded op's ValueError, on every rank, both backends;
    a bad target on one rank only: an error on every rank too (no rank left waiting). On CUDA
    tensors without the debug checks: a NaN row instead."""
    import rlhf_ops as ro
    full = torch.randn(3, V, dtype=torch.float64)
    if full.is_cuda:
        for be in ctx.backends:
            out = ro.cross_entropy(ctx.shard(full), torch.tensor([1, V, 2]), reduction="none",
                                   backend=be, process_group=ctx.group)
            _agree(out[1].isnan() and out[[0, 2]].isfinite().all(), (be, out))
    with _debug_checks():
        _out_of_range_errors(ctx, ro, full)


def _out_of_range_errors(ctx, ro, full):
    for bad in (V, -5):
        t = torch.tensor([1, bad, 2])
        with _raises(ValueError) as unsharded:
            ro.cross_entropy(full, t)
        _agree(f"target holds {bad}, out of range [0, {V}) or -100" in str(unsharded.value),
               f"unsharded message: {unsharded.value}")
        for be in ctx.backends:
            with _raises(ValueError) as sharded:
                ro.cross_entropy(ctx.shard(full), t, backend=be, process_group=ctx.group)
            _agree(str(sharded.value) == str(unsharded.value), 'str(sharded.value) == str(unsharded.value)')
            with _raises(ValueError, match=f"linear_cross_entropy: target holds {bad}"):
                ro.linear_cross_entropy(full[:, :4], ctx.shard(torch.randn(V, 4, dtype=torch.float64), 0),
                                        t, backend=be, process_group=ctx.group)
    t = torch.tensor([1, V + 7 if ctx.rank == 1 else 3, 2])
    with _raises(ValueError, match=rf"target holds {V + 7}( \(on rank 1\))?, out of range"):
        ro.cross_entropy(ctx.shard(full), t, process_group=ctx.group)


@case(2, 3)
def mismatched_inputs_are_errors(ctx):
    """One rank passes another shape, option or targets: a ValueError on every rank (not a hang;
    the group's timeout would turn a hang into a failure)."""
    import rlhf_ops as ro
    with _debug_checks():
        _mismatched(ctx, ro)


def _mismatched(ctx, ro):
    full = torch.randn(4, V, dtype=torch.float64)
    t = torch.randint(0, V, (4,))
    last = ctx.rank == ctx.world - 1
    x = ctx.shard(full)
    with _raises(ValueError, match=r"different shapes or settings .*rank 0: cross_entropy\(leading "
                                         r"shape \(4,\).*rank \d: cross_entropy\(leading shape \(3,\)"):
        ro.cross_entropy(x[:3] if last else x, t[:3] if last else t, process_group=ctx.group)
    with _raises(ValueError, match="label_smoothing=0.1"):
        ro.cross_entropy(x, t, process_group=ctx.group, label_smoothing=0.1 if last else 0.0,
                         backend=ctx.fused[0])
    t2 = t.clone()
    t2[0] = (t2[0] + 1) % V if last else t2[0]
    with _raises(ValueError, match="target differs between the ranks"):
        ro.cross_entropy(x, t2, process_group=ctx.group)
    # one rank's own inputs are inconsistent (target [3] for logits [4, V_r]): it raises its
    # error, the others one that points at it
    msg = "target must have shape" if last else f"rank {ctx.world - 1} of process_group rejected its inputs"
    for be in ctx.backends:
        with _raises(ValueError, match=msg):
            ro.cross_entropy(x, t[:3] if last else t, process_group=ctx.group, backend=be)
        with _raises((ValueError, TypeError), match=msg if not last else "target"):
            ro.linear_cross_entropy(full[:, :4], ctx.shard(torch.randn(V, 4, dtype=torch.float64), 0),
                                    t.int() if last else t, process_group=ctx.group, backend=be)


@case(3)
def a_check_failing_on_one_rank_fails_on_every_rank(ctx):
    """The agreement itself: a check that fails on rank 1 only raises on every rank, naming rank 1
    and its message, and the ranks meet at the next collective (no rank left waiting)."""
    with pytest.raises(AssertionError, match=r"^rank 1: only rank 1 fails$"):
        _agree(ctx.rank != 1, "only rank 1 fails")
    with pytest.raises(AssertionError, match=r"^rank 0: Failed: DID NOT RAISE"):
        with _raises(ValueError):
            if ctx.rank != 0:
                raise ValueError("ranks 1 and 2 raise")
    assert [int(t) for t in ctx.gather(torch.tensor([ctx.rank]))] == [0, 1, 2]


@case(2)
def bad_arguments(ctx):
    import rlhf_ops as ro
    x, t = torch.randn(2, ctx.V_r), torch.tensor([0, 1])
    with _raises(TypeError, match="process_group must be a torch.distributed.ProcessGroup"):
        ro.cross_entropy(x, t, process_group="world")
    with _raises(ValueError, match="vocab_offset must be None or an int >= 0"):
        ro.cross_entropy(x, t, process_group=ctx.group, vocab_offset=-1)
    with _raises(ValueError, match="vocab_offset needs a process_group"):
        ro.cross_entropy(x, t, vocab_offset=0)



# ------------------------------------------------------- log-probs, entropy, KL penalty ---

def _lp_inputs(ctx, lead=(2, 3), K=3):
    """Full logits [*lead, V] with edge rows (near 1e4, mass only in the last slice, a −inf at a
    token) and tokens [*lead, K] at the slice borders (the 1-wide slice too), repeated in a row."""
    n = lead[0] * lead[1]
    x = torch.randn(n, V, dtype=torch.float64) * 3
    x[0] = 1e4 + 2 * torch.randn(V, dtype=torch.float64)
    x[1] = float("-inf")
    x[1, -7:] = torch.randn(7, dtype=torch.float64)
    t = torch.randint(0, V, (n, K))
    t[1, 0] = V - 2
    t[2, : min(K, 3)] = torch.tensor([ctx.sizes[0] - 1, ctx.sizes[0], V - 1])[:K]
    t[3, -1] = t[3, 0]                                    # a repeated token
    x[4, t[4, 0]] = float("-inf")                         # a token whose logit is −inf
    return x.reshape(*lead, V), t.reshape(*lead, K)


def _lp_against_full(ctx, be, K, temperature):
    import rlhf_ops as ro
    full, t = _lp_inputs(ctx, K=K)
    if K == 1:
        t = t[..., 0]
    x = ctx.shard(full).clone().requires_grad_()
    xf = full.clone().requires_grad_()
    lp, ent = ro.token_logprobs(x, t, temperature=temperature, return_entropy=True, backend=be,
                                process_group=ctx.group)
    rlp, rent = ro.token_logprobs(xf, t, temperature=temperature, return_entropy=True,
                                  backend="reference")
    _close(lp, rlp, f"{be} logprobs K={K}")
    _close(ent, rent, f"{be} entropy K={K}")
    g1, g2 = torch.rand(rlp.shape, dtype=torch.float64), torch.rand(rent.shape, dtype=torch.float64)
    fin1 = torch.where(rlp.isfinite(), g1, 0.0)           # −inf log-probs: no gradient through them
    (gx,), (gf,) = _grads((lp, ent), [x], (fin1, g2)), _grads((rlp, rent), [xf], (fin1, g2))
    _close(gx, ctx.shard(gf), f"{be} grad K={K}")
    (gx,), (gf,) = _grads(lp, [x], fin1), _grads(rlp, [xf], fin1)   # log-probs alone
    _close(gx, ctx.shard(gf), f"{be} grad (log-probs only) K={K}")
    ctx.same_on_every_rank(lp, "logprobs")
    ctx.same_on_every_rank(ent, "entropy")


@case(2, 3)
def token_logprobs_against_full(ctx):
    for be in ctx.backends:
        _lp_against_full(ctx, be, K=3, temperature=0.7)
        _lp_against_full(ctx, be, K=1, temperature=1.0)


@case(2, 3)
def linear_token_logprobs_against_full(ctx):
    """hidden replicated, weight/bias rows sliced; tokens [N, 2]; entropy; the fused backward in
    several vocabulary slices."""
    import importlib
    import rlhf_ops as ro
    layout_mod = importlib.import_module("rlhf_ops._layout")
    N, d = 7, 16
    h = torch.randn(N, d, dtype=torch.float64)
    w = torch.randn(V, d, dtype=torch.float64) * 0.5
    b = torch.randn(V, dtype=torch.float64)
    t = torch.randint(0, V, (N, 2))
    t[1] = torch.tensor([ctx.sizes[0] - 1, ctx.sizes[0]])
    t[2, 1] = t[2, 0]
    block = layout_mod.LINEAR_BLOCK_BYTES
    layout_mod.LINEAR_BLOCK_BYTES = 8192 * N * 8          # ~8k columns per backward slice
    try:
        for be in ctx.backends:
            args = [h.clone().requires_grad_(), ctx.shard(w, 0).clone().requires_grad_(),
                    ctx.shard(b, 0).clone().requires_grad_()]
            lp, ent = ro.linear_token_logprobs(args[0], args[1], t, bias=args[2], temperature=0.9,
                                               return_entropy=True, backend=be, process_group=ctx.group)
            ref_args = [a.clone().requires_grad_() for a in (h, w, b)]
            rlp, rent = ro.token_logprobs(ref_args[0] @ ref_args[1].T + ref_args[2], t,
                                          temperature=0.9, return_entropy=True, backend="reference")
            _close(lp, rlp, f"{be} logprobs")
            _close(ent, rent, f"{be} entropy")
            g = (torch.rand(N, 2, dtype=torch.float64), torch.rand(N, dtype=torch.float64))
            gs, gr = _grads((lp, ent), args, g), _grads((rlp, rent), ref_args, g)
            _close(gs[0], gr[0], f"{be} d hidden")
            _close(gs[1], ctx.shard(gr[1], 0), f"{be} d weight")
            _close(gs[2], ctx.shard(gr[2], 0), f"{be} d bias")
            ctx.same_on_every_rank(lp, "logprobs")
            ctx.same_on_every_rank(gs[0], "d hidden")
    finally:
        layout_mod.LINEAR_BLOCK_BYTES = block


@case(2, 3)
def kl_penalty_every_estimator(ctx):
    """Every field and the gradient of logprobs, log_ratio, kl and entropy together, k1/k2/k3,
    with a mask and a temperature, against the unsharded reference."""
    import rlhf_ops as ro
    full, t = _lp_inputs(ctx, lead=(2, 3), K=1)
    t = t[..., 0]
    ref_full = full + 0.3 * torch.randn_like(full)
    ref_full[1, 1] = full[1, 1]                           # the same −inf pattern
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    # the estimators live in code every backend shares (the combination, the backward's G):
    # all three on the reference backend, k2 and k3 on the fused ones
    for be in ctx.backends:
        for est in ("k1", "k2", "k3") if be == "reference" else ("k2", "k3"):
            x = ctx.shard(full).clone().requires_grad_()
            xf = full.clone().requires_grad_()
            out = ro.kl_penalty(x, ctx.shard(ref_full), t, beta=0.1, estimator=est, mask=mask,
                                temperature=1.3, backend=be, process_group=ctx.group)
            ref = ro.kl_penalty(xf, ref_full, t, beta=0.1, estimator=est, mask=mask,
                                temperature=1.3, backend="reference")
            for name in ref._fields:
                _close(getattr(out, name), getattr(ref, name), f"{be} {est} {name}")
                ctx.same_on_every_rank(getattr(out, name), name)
            fin = ref.logprobs.isfinite() & ref.ref_logprobs.isfinite()
            gs = [torch.where(fin, torch.rand(t.shape, dtype=torch.float64), 0.0) for _ in range(4)]

            def obj(r):
                return (gs[0] * r.logprobs + gs[1] * r.log_ratio + gs[2] * r.kl + gs[3] * r.entropy).sum()
            (gx,), (gf,) = _grads(obj(out), [x], None), _grads(obj(ref), [xf], None)
            # rows with an infinite log-ratio: eager autograd gives k2/k3 0·inf = NaN there even
            # with a zero upstream gradient (the fused backward gives 0); compared elsewhere
            _close(gx[fin], ctx.shard(gf)[fin], f"{be} {est} grad")


@case(2)
def logprob_ops_errors(ctx):
    """Tokens outside every slice: the unsharded ValueError on every rank; a mismatched option:
    an error on every rank."""
    import rlhf_ops as ro
    with _debug_checks():
        full = torch.randn(3, V, dtype=torch.float64)
        t = torch.tensor([1, V, 2])
        with _raises(ValueError) as unsharded:
            ro.token_logprobs(full, t)
        for be in ctx.backends:
            with _raises(ValueError) as sharded:
                ro.token_logprobs(ctx.shard(full), t, backend=be, process_group=ctx.group)
            _agree(str(sharded.value) == str(unsharded.value), 'str(sharded.value) == str(unsharded.value)')
            with _raises(ValueError, match=f"kl_penalty: tokens holds {V}, out of range"):
                ro.kl_penalty(ctx.shard(full), ctx.shard(full), t, beta=0.1, backend=be,
                              process_group=ctx.group)
            with _raises(ValueError, match=f"linear_token_logprobs: tokens holds {V}"):
                ro.linear_token_logprobs(full[:, :4], ctx.shard(torch.randn(V, 4, dtype=torch.float64), 0),
                                         t, backend=be, process_group=ctx.group)
        with _raises(ValueError, match="temperature=0.5"):
            ro.token_logprobs(ctx.shard(full), torch.tensor([1, 2, 3]), process_group=ctx.group,
                              temperature=0.5 if ctx.rank == 1 else 1.0)


@case(2)
def softcap_vocab_parallel(ctx):
    """softcap= (c·tanh(z/c) before the softmax) on the four vocabulary ops: each rank's slice
    statistics are those of its capped logits, so the sharded results and gradients are the
    unsharded ones (label smoothing, an ignored row, K = 2 tokens, entropy, a temperature, a −inf
    logit that stays −inf), reference and fused; a rank with another softcap is an error."""
    import rlhf_ops as ro
    c = 30.0
    full, t = _ce_inputs(ctx, rows=4)                     # ±1e4, −inf, an ignored row of −inf
    tk = torch.stack([t.clamp(min=0), torch.full_like(t, ctx.sizes[0])], -1)
    fl = full.clone()                                     # log-probs: no row without mass
    fl[1, 1] = torch.randn(V, dtype=torch.float64) * 40
    fl[0, 1, ctx.sizes[0]] = float("-inf")                # a token on a −inf logit (rank 1's slice)
    N, d = 5, 8
    h = torch.randn(N, d, dtype=torch.float64)
    w = torch.randn(V, d, dtype=torch.float64) * 10
    tl = torch.tensor([3, ctx.sizes[0] - 1, -100, ctx.sizes[0], V - 1])
    for be in ctx.backends:
        x, xf = ctx.shard(full).clone().requires_grad_(), full.clone().requires_grad_()
        out = ro.cross_entropy(x, t, softcap=c, label_smoothing=0.1, reduction="none", backend=be,
                               process_group=ctx.group)
        ref = ro.cross_entropy(xf, t, softcap=c, label_smoothing=0.1, reduction="none", backend="reference")
        _close(out, ref, f"{be} cross_entropy")
        g = torch.rand(ref.shape, dtype=torch.float64)
        _close(_grads(out, [x], g)[0], ctx.shard(_grads(ref, [xf], g)[0]), f"{be} cross_entropy grad")
        x, xf = ctx.shard(fl).clone().requires_grad_(), fl.clone().requires_grad_()
        lp, ent = ro.token_logprobs(x, tk, softcap=c, temperature=0.7, return_entropy=True, backend=be,
                                    process_group=ctx.group)
        rlp, rent = ro.token_logprobs(xf, tk, softcap=c, temperature=0.7, return_entropy=True,
                                      backend="reference")
        _agree(lp[0, 1, 1] == float("-inf"), "a −inf logit stays −inf under the softcap")
        _close(lp, rlp, f"{be} token_logprobs")
        _close(ent, rent, f"{be} entropy")
        gs = (torch.where(rlp.isfinite(), torch.rand(rlp.shape, dtype=torch.float64), 0.0),
              torch.rand(rent.shape, dtype=torch.float64))
        _close(_grads((lp, ent), [x], gs)[0], ctx.shard(_grads((rlp, rent), [xf], gs)[0]),
               f"{be} token_logprobs grad")
        hw = [h.clone().requires_grad_(), ctx.shard(w, 0).clone().requires_grad_()]
        hf = [h.clone().requires_grad_(), w.clone().requires_grad_()]
        loss = ro.linear_cross_entropy(*hw, tl, softcap=c, backend=be, process_group=ctx.group)
        rloss = ro.linear_cross_entropy(*hf, tl, softcap=c, backend="reference")
        _close(loss, rloss, f"{be} linear_cross_entropy")
        a, r = _grads(loss, hw, None), _grads(rloss, hf, None)
        _close(a[0], r[0], f"{be} linear_cross_entropy d hidden")
        _close(a[1], ctx.shard(r[1], 0), f"{be} linear_cross_entropy d weight")
        lp, ent = ro.linear_token_logprobs(*hw, tl.clamp(min=0), softcap=c, return_entropy=True,
                                           backend=be, process_group=ctx.group)
        rlp, rent = ro.linear_token_logprobs(*hf, tl.clamp(min=0), softcap=c, return_entropy=True,
                                             backend="reference")
        _close(lp, rlp, f"{be} linear_token_logprobs")
        _close(ent, rent, f"{be} linear entropy")
        a, r = _grads((lp, ent), hw, (torch.ones_like(lp), ent.detach())), \
            _grads((rlp, rent), hf, (torch.ones_like(rlp), rent.detach()))
        _close(a[0], r[0], f"{be} linear_token_logprobs d hidden")
        _close(a[1], ctx.shard(r[1], 0), f"{be} linear_token_logprobs d weight")
    with _debug_checks(), _raises(ValueError, match="softcap"):
        ro.token_logprobs(ctx.shard(fl), tk, process_group=ctx.group, softcap=c if ctx.rank == 1 else 0.0)


@case(3)
def dtensor_matches_loss_parallel(ctx):
    """A DTensor sharded Shard(-1) on a 1-D mesh in place of process_group: the same loss and
    gradient as loss_parallel() with F.cross_entropy, and a replicated DTensor back. CPU tensors (a CPU mesh) also on a GPU machine."""
    with torch.device("cpu"):
        _dtensor(ctx, ["reference"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else []))


def _dtensor(ctx, backends):
    import rlhf_ops as ro
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import loss_parallel
    mesh = init_device_mesh("cpu", (ctx.world,))
    full = torch.randn(5, V, dtype=torch.float64) * 2
    t = torch.randint(0, V, (5,))
    t[3] = -100
    for be in backends:
        for red in ("mean", "none"):
            ours_x = distribute_tensor(full, mesh, [Shard(-1)]).requires_grad_()
            theirs_x = distribute_tensor(full, mesh, [Shard(-1)]).requires_grad_()
            ours = ro.cross_entropy(ours_x, t, reduction=red, backend=be)
            _agree(ours.placements == (Replicate(),), ours.placements)
            with loss_parallel():
                theirs = F.cross_entropy(theirs_x, t, reduction=red)
                theirs.backward(torch.ones_like(theirs))
            ours.backward(torch.ones_like(ours))
            _close(ours.full_tensor(), theirs.full_tensor(), f"{be} {red} loss")
            _agree(ours_x.grad.placements == (Shard(1),), 'ours_x.grad.placements == (Shard(1),)')
            _close(ours_x.grad.full_tensor(), theirs_x.grad.full_tensor(), f"{be} {red} grad")
    # token_logprobs and kl_penalty on DTensors: replicated DTensors back, the full results
    tk = torch.randint(0, V, (5,))
    ref_full = full + torch.randn_like(full)
    for be in backends:
        xd = distribute_tensor(full, mesh, [Shard(-1)]).requires_grad_()
        lp, ent = ro.token_logprobs(xd, tk, return_entropy=True, backend=be)
        rlp, rent = ro.token_logprobs(full, tk, return_entropy=True)
        _agree(lp.placements == (Replicate(),), 'lp.placements == (Replicate(),)')
        _close(lp.full_tensor(), rlp, f"{be} DTensor logprobs")
        _close(ent.full_tensor(), rent, f"{be} DTensor entropy")
        res = ro.kl_penalty(xd, distribute_tensor(ref_full, mesh, [Shard(-1)]), tk, beta=0.2,
                            estimator="k3", backend=be)
        rres = ro.kl_penalty(full, ref_full, tk, beta=0.2, estimator="k3")
        for name in rres._fields:
            _close(getattr(res, name).full_tensor(), getattr(rres, name), f"{be} DTensor {name}")
        res.kl.sum().backward()
        xf = full.clone().requires_grad_()
        ro.kl_penalty(xf, ref_full, tk, beta=0.2, estimator="k3").kl.sum().backward()
        _close(xd.grad.full_tensor(), xf.grad, f"{be} DTensor kl grad")
    # linear: a Shard(0) weight
    h = torch.randn(5, 8, dtype=torch.float64)
    w = torch.randn(V, 8, dtype=torch.float64)
    wd = distribute_tensor(w, mesh, [Shard(0)]).requires_grad_()
    out = ro.linear_cross_entropy(h, wd, t, backend=backends[-1])
    wf = w.clone().requires_grad_()
    ref = F.cross_entropy(h @ wf.T, t)
    _close(out.full_tensor(), ref, "linear loss")
    out.backward()
    ref.backward()
    _close(wd.grad.full_tensor(), wf.grad, "linear d weight")


@case(2)
def torch_compile_fullgraph(ctx):
    """The sharded fused path is opaque custom ops: torch.compile(fullgraph=True) traces it."""
    import rlhf_ops as ro
    full, t = _ce_inputs(ctx, rows=4)
    x = ctx.shard(full)

    def step(z):
        return ro.cross_entropy(z * 1.0, t, label_smoothing=0.125, backend=ctx.fused[0],
                                process_group=ctx.group)

    xc = x.clone().requires_grad_()
    out = torch.compile(step, fullgraph=True, backend="aot_eager")(xc)
    out.backward()
    xf = full.clone().requires_grad_()
    ref = ro.cross_entropy(xf, t, label_smoothing=0.125)
    ref.backward()
    _close(out, ref, "compiled loss")
    _close(xc.grad, ctx.shard(xf.grad), "compiled grad")


@case(2)
def opcheck_vocab_parallel_ops(ctx):
    """torch.library.opcheck (schema, fake impl, autograd registration, AOT dispatch) on the
    custom ops that take a process group, run in a real group (every rank makes the same calls).
    Small slices of 5 and 8 ids (opcheck runs each op about ten times)."""
    from torch.library import opcheck
    g = ctx.group.group_name
    sizes = [5, 8]
    V_r, off = sizes[ctx.rank], torch.full((1,), sum(sizes[:ctx.rank]))
    t = torch.tensor([1, -100, 5])
    tk = torch.tensor([[1, 5], [12, 1], [4, 6]])

    def f(*shape, dtype=torch.float32):
        return torch.randn(*shape, dtype=dtype).requires_grad_()

    for be in ctx.fused:
        samples = [
            ("vocab_shard_offset", dict(target=t, local_vocab=V_r, ignore_index=-100, vocab_offset=-1,
                                        op="cross_entropy", name="target", config="c", group=g)),
            ("cross_entropy_vp_fwd", dict(logits=f(3, V_r), target=t, offset=off, ignore_index=-100,
                                          label_smoothing=0.25, inplace_backward=False, backend=be, group=g,
                                          softcap=1.5)),
            ("linear_cross_entropy_vp_fwd", dict(hidden=f(3, 8), weight=f(V_r, 8), bias=f(V_r), target=t,
                                                 offset=off, ignore_index=-100, label_smoothing=0.1,
                                                 backend=be, group=g)),
            ("token_logprobs_vp_fwd", dict(logits=f(3, V_r), tokens=tk, offset=off, temperature=0.8,
                                           backend=be, group=g, with_entropy=True, softcap=1.5)),
            ("linear_token_logprobs_vp_fwd", dict(hidden=f(3, 8), weight=f(V_r, 8), bias=f(V_r),
                                                  tokens=tk, offset=off, temperature=1.0,
                                                  with_entropy=False, backend=be, group=g)),
            ("kl_penalty_vp_fwd", dict(logits=f(3, V_r), ref_logits=f(3, V_r).detach(), tokens=tk[:, 0].contiguous(),
                                       offset=off, mask=torch.tensor([1.0, 0.0, 1.0]), beta=0.1,
                                       estimator="k3", temperature=1.0, backend=be, group=g)),
        ]
        for name, kw in samples:
            op = getattr(torch.ops.rlhf_ops, name).default
            res = opcheck(op, tuple(kw[a.name] if a.name in kw else a.default_value
                                    for a in op._schema.arguments))
            _agree(all(v == "SUCCESS" for v in res.values()), (name, be, res))


@case(3)
def gpt_vocab_parallel_lm_loss(ctx):
    """rlhf_ops.train.model.GPT with vocab_parallel=True under a 3-rank world: its LM loss reads this
    rank's rows of the tied W_e (uneven: 13/12/12 of 37); loss and every parameter's gradient
    (W_e gathered whole) equal those of the unsplit model, on every rank. Reference backend: the
    fused kernels of the sharded loss are covered by linear_ce (Triton's attention in fp64 under
    the interpreter would cost more than the rest of this file)."""
    import rlhf_ops.train.model as M
    calls = []
    split = M.split_replicated
    M.split_replicated = lambda w, g: calls.append(1) or split(w, g)
    try:
        for be in ["reference"]:
            cfg = M.GPTConfig(vocab_size=37, block_size=8, n_layer=1, n_head=1, d_model=16,
                              backend=be)
            torch.manual_seed(0)
            ref = M.GPT(cfg).double()
            vp = M.GPT(M.GPTConfig(**{**vars(cfg), "vocab_parallel": True})).double()
            vp.load_state_dict(ref.state_dict())
            x = torch.randint(0, 37, (2, 8))
            y = torch.randint(0, 37, (2, 8))
            y[0, :3] = -100
            a, b = vp(x, y), ref(x, y)
            a.backward()
            b.backward()
            _close(a, b, f"{be} loss")
            ctx.same_on_every_rank(a, "loss")
            for (name, p), q in zip(vp.named_parameters(), ref.parameters()):
                _close(p.grad, q.grad, f"{be} grad {name}")
                ctx.same_on_every_rank(p.grad, f"grad {name}")
    finally:
        M.split_replicated = split
    _agree(len(calls) == 1, 'len(calls) == 1')


# ------------------------------------------------------------------------------ the tests ---

@pytest.mark.parametrize("key", _spawn.keys(CASES))
def test_vocab_parallel(results, key):
    _spawn.check(results, key, "RLHF_DIST_ONLY")


def test_vocab_parallel_training_matches_one_process(tmp_path):
    """`--set model.vocab_parallel=true` under torchrun (2 CPU processes, gloo): the LM head's
    vocabulary is split over the ranks, both train on the whole batch, and the parameters after
    three pretraining steps equal those of the unsplit single-process run."""
    import socket
    from rlhf_ops.train.__main__ import main
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["pretrain", "--preset", "tiny", "--backend", "reference", "--set", "pretrain.steps=3",
              "run.ckpt_every=100"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "rlhf_ops.train"]
    p = subprocess.run(cmd + common + ["model.vocab_parallel=true", "--out", str(tmp_path / "vp")],
                       env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    main(common + ["--out", str(tmp_path / "one")])
    a = torch.load(tmp_path / "vp" / "ckpt" / "pretrain_final.pt", weights_only=False)
    b = torch.load(tmp_path / "one" / "ckpt" / "pretrain_final.pt", weights_only=False)
    assert a["model_cfg"]["vocab_parallel"] is True and b["model_cfg"]["vocab_parallel"] is False
    for k, v in b["models"]["lm"].items():
        ours = a["models"]["lm"][k]
        if k.endswith("attn.qkv.bias"):
            # the key bias shifts every score of a query alike: its exact gradient is 0, so both
            # runs hold only rounding noise there (~1e-6 after Adam normalises it), not comparable
            d = v.shape[0] // 3
            assert ours[d:2 * d].abs().max() < 1e-5 and v[d:2 * d].abs().max() < 1e-5
            ours, v = torch.cat([ours[:d], ours[2 * d:]]), torch.cat([v[:d], v[2 * d:]])
        torch.testing.assert_close(ours, v, rtol=1e-5, atol=1e-6, msg=k)
    s = json.loads((tmp_path / "vp" / "summary.json").read_text())
    assert s["stages"]["pretrain"]["args"]["world_size"] == 2
