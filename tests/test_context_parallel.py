"""Context parallelism on torch.distributed (gloo, CPU): real multi-process runs.

One spawn of 4 processes runs every case: the 4-rank cases on the whole world, the 3-rank cases
on global ranks [1, 2, 3] and the 2-rank cases on [2, 3] (so a group rank differs from the global
rank and the ring's peers must be translated). Each case draws the same full-sequence inputs on
every rank, gives each rank its part (zigzag or contiguous), runs the context-parallel op and
checks, in float64, the output and the gradients of q, k, v of this rank's part against the
single-process op on the whole sequence: ring attention (``attention(cp_group=)``), the gathered
varlen path (``attention_varlen(cp_group=)``), Ulysses, the zigzag helpers and FSDP2's sharded
LM-head weight (``fully_shard`` works on CPU with gloo in this torch).

Backends: reference everywhere; Triton (the interpreter, on CPU) on the smallest shapes; with a
GPU the cases run on CUDA tensors (the gloo collectives take CPU copies) and a bf16 case runs the
CUDA backend. Errors: every rank must raise when any rank's inputs are bad, and a valid call right
after must still work (no collective left unmatched). The group has a timeout and the spawn a
deadline, so a hang fails instead of stalling CI; the slowest cases are printed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import _spawn

WORLD = 4
DEADLINE_S = float(os.environ.get("RLHF_CP_DEADLINE_S", 600))
CASES, case = _spawn.registry()   # (name, worlds, fn); @case(*worlds) adds one


# --------------------------------------------------------------------------- the worker side ---

class Ctx:
    def __init__(self, group, world: int, fused: list, device: str):
        import torch.distributed as dist
        self.group, self.world, self.fused, self.device = group, world, fused, device
        self.rank = dist.get_rank(group)

    def split(self, x, dim, layout="zigzag", cu=None):
        from rlhf_ops.distributed import zigzag_split
        if layout == "zigzag":
            return zigzag_split(x, self.group, dim, cu_seqlens=cu)
        return x.chunk(self.world, dim)[self.rank].contiguous()

    def gather(self, t):
        import torch.distributed as dist
        out = [torch.empty_like(t, device="cpu") for _ in range(self.world)]
        dist.all_gather(out, t.detach().contiguous().cpu(), group=self.group)
        return out


def _close(ours, ref, what, tol=1e-10):
    from _util import rel_err
    err = rel_err(ours, ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def _grads(out, inputs, g):
    return torch.autograd.grad(out, inputs, g, allow_unused=True)


def _leaf(x):
    return x.detach().clone().requires_grad_(True)


def _worker(rank: int, world: int, init_file: str, out_dir: str, only: str | None):
    dist = _spawn.init(rank, world, init_file)
    groups = {4: dist.group.WORLD, 3: dist.new_group([1, 2, 3]), 2: dist.new_group([2, 3])}
    import rlhf_ops as ro
    device = "cpu"
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        device = "cuda"
        torch.set_default_device("cuda")
    fused = ["triton"] + (["cuda"] if "cuda" in ro.available_backends() else [])
    _spawn.run_cases(rank, CASES, lambda w: Ctx(groups[w], w, fused, device), lambda w: rank >= WORLD - w,
                     out_dir, only)


# --------------------------------------------------------------------------- the pytest side ---

@pytest.fixture(scope="module")
def results(tmp_path_factory):
    t0 = time.time()
    out = _spawn.spawn("test_context_parallel", WORLD, tmp_path_factory.mktemp("cp"), os.environ.get("RLHF_CP_ONLY"),
                       DEADLINE_S, "context-parallel")
    print(f"\ncontext-parallel cases: {time.time() - t0:.1f} s for one {WORLD}-process spawn")
    return out


# --------------------------------------------------------------------------------- the cases ---

def _qkv(B, Hq, Hkv, T, D, dtype=torch.float64):
    q = torch.randn(B, Hq, T, D, dtype=dtype)
    k = torch.randn(B, Hkv, T, D, dtype=dtype)
    v = torch.randn(B, Hkv, T, D, dtype=dtype)
    return q, k, v, torch.randn(B, Hq, T, D, dtype=dtype)


def _ring_against_full(ctx, be, shapes, combos, tol=1e-10):
    """For each (layout, causal, window, softcap): ring attention on this rank's part vs
    attention on the whole sequence (the reference backend, fp64), out and dq/dk/dv."""
    import rlhf_ops as ro
    B, Hq, Hkv, c, D = shapes
    T = 2 * ctx.world * c
    for layout, causal, window, softcap in combos:
        q, k, v, g = _qkv(B, Hq, Hkv, T, D)
        full = [_leaf(x) for x in (q, k, v)]
        out = ro.attention(*full, causal=causal, window=window, softcap=softcap, backend="reference")
        ref = (out,) + _grads(out, full, g)
        mine = [_leaf(ctx.split(x, 2, layout)) for x in (q, k, v)]
        o = ro.attention(*mine, causal=causal, window=window, softcap=softcap, backend=be,
                         cp_group=ctx.group, cp_layout=layout)
        got = (o,) + _grads(o, mine, ctx.split(g, 2, layout))
        what = f"{be} {layout} causal={causal} window={window} softcap={softcap}"
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
            _close(a, ctx.split(b, 2, layout), f"{what} {name}", tol)


RING_COMBOS = [("zigzag", True, None, 0.0), ("zigzag", False, None, 0.0),
               ("contiguous", True, None, 0.0), ("contiguous", False, None, 0.0),
               ("zigzag", True, (5, 0), 2.0), ("contiguous", True, (4, 0), 0.0),
               ("zigzag", False, (3, 4), 1.5), ("contiguous", False, (7, 0), 0.0)]


@case(2, 3, 4)
def ring_reference(ctx):
    """GQA (4 query heads on 2 kv heads), chunks of 3 tokens, every layout and mask."""
    _ring_against_full(ctx, "reference", (2, 4, 2, 3, 8), RING_COMBOS)


@case(2, 3)
def ring_triton(ctx):
    """The fused kernels in the ring (the interpreter: tiny shapes, D = 16, MQA)."""
    _ring_against_full(ctx, "triton", (1, 2, 1, 2, 16),
                       [("zigzag", True, None, 0.0), ("contiguous", False, None, 0.0),
                        ("zigzag", True, (3, 0), 2.0)])


def _packed(ctx, lens, Hq, Hkv, D, dtype=torch.float64):
    cu = torch.tensor([0] + list(lens), dtype=torch.int64).cumsum(0).to(torch.int32)
    N = int(cu[-1])
    q = torch.randn(N, Hq, D, dtype=dtype)
    k = torch.randn(N, Hkv, D, dtype=dtype)
    v = torch.randn(N, Hkv, D, dtype=dtype)
    return cu, q, k, v, torch.randn(N, Hq, D, dtype=dtype)


def _varlen_against_full(ctx, be, Hq, Hkv, D, units, combos, tol=1e-10):
    import rlhf_ops as ro
    W = ctx.world
    lens = [2 * W * u for u in units]
    for causal, window, softcap in combos:
        cu, q, k, v, g = _packed(ctx, lens, Hq, Hkv, D)
        M = max(lens)
        full = [_leaf(x) for x in (q, k, v)]
        out = ro.attention_varlen(*full, cu, cu, M, M, causal=causal, window=window,
                                  softcap=softcap, backend="reference")
        ref = (out,) + _grads(out, full, g)
        cu_l = cu // W
        mine = [_leaf(ctx.split(x, 0, cu=cu)) for x in (q, k, v)]
        o = ro.attention_varlen(*mine, cu_l, cu_l, M // W, M // W, causal=causal, window=window,
                                softcap=softcap, backend=be, cp_group=ctx.group)
        got = (o,) + _grads(o, mine, ctx.split(g, 0, cu=cu))
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
            _close(a, ctx.split(b, 0, cu=cu), f"{be} varlen causal={causal} window={window} "
                                              f"softcap={softcap} {name}", tol)


@case(2, 3, 4)
def varlen_reference(ctx):
    """Packed sequences of 3, 0, 1 and 2 units of 2W tokens (an empty one included), GQA."""
    _varlen_against_full(ctx, "reference", 4, 2, 8, [3, 0, 1, 2],
                         [(True, None, 0.0), (False, None, 0.0), (True, (5, 0), 2.0)])


@case(2)
def varlen_triton(ctx):
    _varlen_against_full(ctx, "triton", 2, 1, 16, [2, 0, 1], [(True, None, 0.0), (False, None, 1.5)])


@case(2, 3, 4)
def ulysses(ctx):
    """Dense GQA (KV heads divide W, or divide W and are repeated; MQA), window + softcap through
    kwargs, and varlen (global cu_seqlens through kwargs) on the reference backend; every output
    and gradient against the single-process op."""
    import rlhf_ops as ro
    from rlhf_ops.distributed import ulysses_attention
    W = ctx.world
    Hq = 12
    for Hkv, kw in ((W, dict(causal=True)), (1, dict(causal=False, softcap=2.0)),
                    (2 if W != 3 else 3, dict(causal=True, window=(3, 0)))):
        T = 3 * W
        q, k, v, g = _qkv(2, Hq, Hkv, T, 8)
        full = [_leaf(x) for x in (q, k, v)]
        out = ro.attention(*full, backend="reference", **kw)
        ref = (out,) + _grads(out, full, g)
        mine = [_leaf(ctx.split(x, 2, "contiguous")) for x in (q, k, v)]
        o = ulysses_attention(*mine, ctx.group, backend="reference", **kw)
        got = (o,) + _grads(o, mine, ctx.split(g, 2, "contiguous"))
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
            _close(a, ctx.split(b, 2, "contiguous"), f"ulysses Hkv={Hkv} {kw} {name}")
    # packed: the global cu_seqlens pass through; the packed length divides by W
    cu, q, k, v, g = _packed(ctx, [5, 0, 2 * W + 1, (-6) % W + W], Hq, W, 8)
    M = int((cu[1:] - cu[:-1]).max())
    kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=M, max_seqlen_k=M, causal=True,
              window=(2, 0), backend="reference")
    n = q.shape[0]
    assert n % W == 0, n
    full = [_leaf(x) for x in (q, k, v)]
    out = ro.attention_varlen(*full, **kw)
    ref = (out,) + _grads(out, full, g)
    mine = [_leaf(ctx.split(x, 0, "contiguous")) for x in (q, k, v)]
    o = ulysses_attention(*mine, ctx.group, attn=ro.attention_varlen, **kw)
    got = (o,) + _grads(o, mine, ctx.split(g, 0, "contiguous"))
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        _close(a, ctx.split(b, 0, "contiguous"), f"ulysses varlen {name}")


@case(2)
def ulysses_triton(ctx):
    import rlhf_ops as ro
    from rlhf_ops.distributed import ulysses_attention
    q, k, v, g = _qkv(1, 2, 1, 8, 16)
    full = [_leaf(x) for x in (q, k, v)]
    out = ro.attention(*full, causal=True, backend="reference")
    ref = (out,) + _grads(out, full, g)
    mine = [_leaf(ctx.split(x, 2, "contiguous")) for x in (q, k, v)]
    o = ulysses_attention(*mine, ctx.group, causal=True, backend="triton")
    got = (o,) + _grads(o, mine, ctx.split(g, 2, "contiguous"))
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        _close(a, ctx.split(b, 2, "contiguous"), f"ulysses triton {name}")


@case(2, 3, 4)
def zigzag_helpers(ctx):
    """split → merge is the identity (dense and per packed sequence); chunk r and 2W−1−r in that
    order; merge's gradient is this rank's chunks of the merged gradient."""
    from rlhf_ops.distributed import zigzag_merge, zigzag_split
    W, r = ctx.world, ctx.rank
    x = torch.randn(3, 4 * W, 2, dtype=torch.float64)
    part = zigzag_split(x, ctx.group, 1)
    chunks = x.chunk(2 * W, 1)
    assert torch.equal(part, torch.cat([chunks[r], chunks[2 * W - 1 - r]], 1))
    leaf = _leaf(part)
    merged = zigzag_merge(leaf, ctx.group, 1)
    assert torch.equal(merged, x)
    g = torch.randn_like(x)
    (merged * g).sum().backward()
    assert torch.equal(leaf.grad, zigzag_split(g, ctx.group, 1))
    cu = torch.tensor([0, 2 * W, 2 * W, 8 * W, 10 * W], dtype=torch.int32)
    y = torch.arange(10 * W, dtype=torch.float64)[:, None].repeat(1, 3)
    part = zigzag_split(y, ctx.group, 0, cu_seqlens=cu)
    for b in range(4):                    # every sequence's own chunks r and 2W−1−r
        s, e = int(cu[b]), int(cu[b + 1])
        ch = y[s:e].chunk(2 * W) if e > s else []
        lo, hi = s // W, e // W
        want = torch.cat([ch[r], ch[2 * W - 1 - r]]) if e > s else y[:0]
        assert torch.equal(part[lo:hi], want), (b, part[lo:hi], want)
    leaf = _leaf(part)
    merged = zigzag_merge(leaf, ctx.group, 0, cu_seqlens=cu // W)
    assert torch.equal(merged, y)
    g = torch.randn_like(y)
    (merged * g).sum().backward()
    assert torch.equal(leaf.grad, zigzag_split(g, ctx.group, 0, cu_seqlens=cu))


@case(2, 4)
def bytes_sent_match_the_formulas(ctx):
    """The bytes each rank sends for one layer (fwd + bwd: ring, gathered varlen, Ulysses with
    repeated MQA heads) equal bench/bench_context_parallel.expected_bytes, which prints them at the
    GPU shapes."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "bench_cp", Path(__file__).parent.parent / "bench" / "bench_context_parallel.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from rlhf_ops.context_parallel import comm_bytes
    W, T, D = ctx.world, 16 * ctx.world, 8
    for impl, H, Hkv in (("ring", 4, 2), ("gather", 4, 2), ("ulysses", 4, 1), ("ulysses", 8, 4)):
        xs = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in
              (((T // W, H, D), (T // W, Hkv, D), (T // W, Hkv, D)) if impl == "gather" else
               ((1, H, T // W, D), (1, Hkv, T // W, D), (1, Hkv, T // W, D)))]
        with comm_bytes() as sent:
            bench._layer(impl, *xs, ctx.group, "reference")
        want = bench.expected_bytes(impl, W, T, H, Hkv, D, 8)
        assert sent[0] == want, (impl, H, Hkv, sent[0], want)


def _expect(fn, err, match):
    import re
    try:
        fn()
    except err as e:
        assert re.search(match, str(e)), f"wrong message: {e}"
        return
    raise AssertionError(f"no {err.__name__} matching {match!r}")


@case(2, 3)
def errors_on_every_rank(ctx):
    """Bad inputs on one rank, or ranks that disagree, raise on every rank (no hang); after each,
    a valid call still works, so no collective was left unmatched. (CUDA tensors: the checks'
    switch RLHF_OPS_DEBUG=1 is set for the case.)"""
    old = os.environ.get("RLHF_OPS_DEBUG")
    os.environ["RLHF_OPS_DEBUG"] = "1"
    try:
        _errors(ctx)
    finally:
        if old is None:
            del os.environ["RLHF_OPS_DEBUG"]
        else:
            os.environ["RLHF_OPS_DEBUG"] = old


def _errors(ctx):
    import rlhf_ops as ro
    from rlhf_ops.distributed import ulysses_attention
    W, last = ctx.world, ctx.rank == ctx.world - 1
    q, k, v, _ = _qkv(1, 2, 1, 4, 8)

    def ok():
        o = ro.attention(q, k, v, backend="reference", cp_group=ctx.group)
        assert o.shape == q.shape
    rejected = "rank {} of cp_group rejected its inputs".format(W - 1)
    # one rank's own check fails: it raises its own error, the others name it
    bad = q.float() if last else q
    _expect(lambda: ro.attention(bad, k, v, backend="reference", cp_group=ctx.group),
            TypeError if last else ValueError, "same_dtype|dtype|must match" if last else rejected)
    ok()
    # shapes that pass locally but differ between the ranks
    qq, kk, vv = (x[:, :, :2] for x in (q, k, v)) if last else (q, k, v)
    _expect(lambda: ro.attention(qq, kk, vv, backend="reference", cp_group=ctx.group), ValueError,
            "passed different shapes or settings")
    ok()
    _expect(lambda: ro.attention(q, k, v, cp_group=ctx.group, cp_layout="diagonal"), ValueError,
            "cp_layout must be one of")
    _expect(lambda: ro.attention(q[:, :, :3], k[:, :, :3], v[:, :, :3], cp_group=ctx.group),
            ValueError, "must be even")
    _expect(lambda: ro.attention(q, k[:, :, :2], v[:, :, :2], cp_group=ctx.group), ValueError,
            "self-attention")
    _expect(lambda: ro.attention(q, k, v, cp_group="world"), TypeError, "ProcessGroup")
    _expect(lambda: ro.attention(q, k, v, cp_layout="contiguous"), ValueError, "needs cp_group")
    ok()
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    p = [torch.randn(6, 2, 8, dtype=torch.float64) for _ in range(3)]
    _expect(lambda: ro.attention_varlen(*p, cu, cu, 4, 4, causal=False, window=(1, 1),
                                        cp_group=ctx.group), ValueError, "window needs causal")
    odd = torch.tensor([0, 3, 6], dtype=torch.int32)
    _expect(lambda: ro.attention_varlen(*p, odd, odd, 3, 3, cp_group=ctx.group), ValueError,
            "must be even")
    cu_last = torch.tensor([0, 4, 6], dtype=torch.int32) if last else cu
    _expect(lambda: ro.attention_varlen(*p, cu_last, cu_last, 4, 4, cp_group=ctx.group),
            ValueError, "passed different shapes or settings")
    ok()
    if W == 3:
        h = torch.randn(1, 6, 3, 8, dtype=torch.float64)
        kv2 = torch.randn(1, 2, 3, 8, dtype=torch.float64)
        _expect(lambda: ulysses_attention(h, kv2, kv2, ctx.group), ValueError,
                "key/value heads .* must divide")
        _expect(lambda: ulysses_attention(h[:, :4], kv2, kv2, ctx.group), ValueError,
                "query heads .* must divide")
    ok()


@case(2)
def opcheck_context_parallel_ops(ctx):
    """torch.library.opcheck of every custom op of rlhf_ops.context_parallel (schema, fake impl,
    autograd registration, AOT dispatch), reference and Triton."""
    from torch.library import opcheck
    gname = ctx.group.group_name
    q, k, v, g = _qkv(1, 2, 1, 4, 16)
    for be in ["reference", "triton"]:
        args = (q, k, v, gname, True, 0.25, -1, 0, 0.0, be)
        q_ = _leaf(q)
        res = opcheck(torch.ops.rlhf_ops.ring_attention_fwd.default, (q_, _leaf(k), _leaf(v)) + args[3:])
        assert all(x == "SUCCESS" for x in res.values()), (be, res)
        out, lse = torch.ops.rlhf_ops.ring_attention_fwd(*args)
        res = opcheck(torch.ops.rlhf_ops.ring_attention_bwd.default, (g, q, k, v, out, lse) + args[3:])
        assert all(x == "SUCCESS" for x in res.values()), (be, res)
        cu = torch.tensor([0, 2, 2, 6], dtype=torch.int32)
        p = [torch.randn(6, 2, 16, dtype=torch.float64) for _ in range(3)]
        pl = [_leaf(x) for x in p[:2]] + [_leaf(p[2])]
        vargs = (cu, 4, gname, True, 0.25, -1, 0, 0.0, be)
        res = opcheck(torch.ops.rlhf_ops.cp_attention_varlen_fwd.default, tuple(pl) + vargs)
        assert all(x == "SUCCESS" for x in res.values()), (be, res)
        out, lse = torch.ops.rlhf_ops.cp_attention_varlen_fwd(*p, *vargs)
        res = opcheck(torch.ops.rlhf_ops.cp_attention_varlen_bwd.default,
                      (torch.randn_like(out), *p, out, lse) + vargs)
        assert all(x == "SUCCESS" for x in res.values()), (be, res)
    res = opcheck(torch.ops.rlhf_ops.cp_all_to_all.default, (_leaf(torch.randn(2, 4, 3, 5)), gname, 1, 2))
    assert all(x == "SUCCESS" for x in res.values()), res


@case(2)
def torch_compile_fullgraph(ctx):
    """Ring, varlen and Ulysses attention inside torch.compile(fullgraph=True) (aot_eager: the
    graph capture is what is checked) equal the eager calls, forward and backward."""
    import rlhf_ops as ro
    from rlhf_ops.distributed import ulysses_attention
    q, k, v, g = _qkv(1, 2, 2, 8, 8)

    def f(q, k, v):
        a = ro.attention(q, k, v, causal=True, backend="reference", cp_group=ctx.group)
        b = ulysses_attention(q, k, v, ctx.group, causal=True, backend="reference")
        return a + b
    leaves = [_leaf(x) for x in (q, k, v)]
    eager = f(*leaves)
    ge = _grads(eager, leaves, g)
    leaves2 = [_leaf(x) for x in (q, k, v)]
    comp = torch.compile(f, fullgraph=True, backend="aot_eager")(*leaves2)
    gc = _grads(comp, leaves2, g)
    for a, b in zip((comp,) + gc, (eager,) + ge):
        _close(a, b, "compiled", 1e-12)


def _low_precision(ctx, be, run_full, run_cp, inputs, split):
    """bf16 on a GPU: the context-parallel op's error against fp64 (out and gradients) may not
    exceed the unsplit eager op's error in bf16 × 1.05 + a small tolerance."""
    from _util import assert_matches
    *xs, g = inputs
    leaves = [_leaf(x.double()) for x in xs]
    o = run_full(leaves, "reference")
    ref = (o,) + _grads(o, leaves, g.double())
    leaves = [_leaf(x) for x in xs]
    o = run_full(leaves, "reference")
    eager = (o,) + _grads(o, leaves, g)
    mine = [_leaf(split(x)) for x in xs]
    o = run_cp(mine, be)
    got = (o,) + _grads(o, mine, split(g))
    for name, a, r, e in zip(("out", "dq", "dk", "dv"), got, ref, eager):
        assert_matches(a, split(r), split(e), dtype=torch.bfloat16, what=f"{be} bf16 {name}")


if torch.cuda.is_available():
    @case(2)
    def bf16_every_fused_backend_gpu(ctx):
        """Ring (zigzag causal), gathered varlen and Ulysses on the GPU backends (Triton, CUDA:
        D = 64, bf16) against fp64, no worse than eager bf16 on the whole sequence."""
        import rlhf_ops as ro
        from rlhf_ops.distributed import ulysses_attention
        W = ctx.world
        for be in ctx.fused:
            q, k, v, g = (x.to(torch.bfloat16) for x in _qkv(1, 4, 2, 2 * W * 96, 64))
            _low_precision(ctx, be, lambda t, b: ro.attention(*t, causal=True, backend=b),
                           lambda t, b: ro.attention(*t, causal=True, backend=b, cp_group=ctx.group),
                           (q, k, v, g), lambda x: ctx.split(x, 2))
            _low_precision(ctx, be, lambda t, b: ro.attention(*t, causal=True, backend=b),
                           lambda t, b: ulysses_attention(*t, ctx.group, causal=True, backend=b),
                           (q, k, v, g), lambda x: ctx.split(x, 2, "contiguous"))
            lens = [2 * W * u for u in (40, 3, 0, 17)]
            cu, q, k, v, g = _packed(ctx, lens, 4, 2, 64)
            M = max(lens)
            _low_precision(ctx, be,
                           lambda t, b: ro.attention_varlen(*t, cu, cu, M, M, causal=True, backend=b),
                           lambda t, b: ro.attention_varlen(*t, cu // W, cu // W, M // W, M // W,
                                                            causal=True, backend=b, cp_group=ctx.group),
                           tuple(x.to(torch.bfloat16) for x in (q, k, v, g)),
                           lambda x: ctx.split(x, 0, cu=cu))


def _fsdp_linear(ctx, V, d, bias):
    """nn.Linear(d, V) wrapped by fully_shard on a CPU mesh over the 4-rank world."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh("cpu", (ctx.world,))
    # the mesh spans the whole default group; the FSDP cases run on the 4-rank world only
    lin = torch.nn.Linear(d, V, bias=bias, dtype=torch.float64)
    full_w = lin.weight.detach().clone()
    full_b = lin.bias.detach().clone() if bias else None
    fully_shard(lin, mesh=mesh)
    return lin, full_w, full_b


@case(4)
def fsdp_gather_weight(ctx):
    """fully_shard's Shard(0) weight (V = 7 and 3 over 4 ranks: uneven, one rank without rows):
    fsdp_gather gives the whole weight; the gradient arrives as a Shard(0) DTensor holding the
    mean over ranks of each rank's full gradient (FSDP2's reduction), bias too."""
    from rlhf_ops.context_parallel import fsdp_gather, fully_sharded
    from torch.distributed.tensor import DTensor, Shard
    torch.set_default_device("cpu")
    try:
        _fsdp_gather(ctx, fsdp_gather, fully_sharded, DTensor, Shard)
    finally:
        torch.set_default_device(ctx.device)


def _fsdp_gather(ctx, fsdp_gather, fully_sharded, DTensor, Shard):
    for V in (7, 3):
        torch.manual_seed(V)                                    # the same module on every rank
        lin, full_w, full_b = _fsdp_linear(ctx, V, 5, True)
        assert lin.weight.to_local().shape[0] == [[2, 2, 2, 1], [1, 1, 1, 0]][V == 3][ctx.rank]
        assert fully_sharded(lin)
        w = fsdp_gather("test", "weight", lin.weight)
        b = fsdp_gather("test", "bias", lin.bias)
        assert torch.equal(w, full_w) and torch.equal(b, full_b)
        torch.manual_seed(100 + ctx.rank)                       # each rank its own data
        x = torch.randn(6, 5, dtype=torch.float64)
        y = torch.randn(6, V, dtype=torch.float64)
        ((x @ w.t() + b) * y).sum().backward()
        xs, ys = ctx.gather(x), ctx.gather(y)
        want_w = sum(yy.t() @ xx for xx, yy in zip(xs, ys)) / ctx.world
        want_b = sum(yy.sum(0) for yy in ys) / ctx.world
        for p, want in ((lin.weight, want_w), (lin.bias, want_b)):
            assert isinstance(p.grad, DTensor) and p.grad.placements == (Shard(0),), p.grad
            _close(p.grad.full_tensor(), want, "fsdp grad", 1e-12)


@case(4)
def gpt_context_parallel_lm_loss(ctx):
    """rlhf_ops.train.model.GPT with context_parallel=True on the 4-rank world: T = 13 (padded to
    16 = 2W inside), every rank's share ("sum", "none") adds up over the ranks to the unsplit
    model's, "mean" is the whole batch's on every rank, and the parameter gradients summed over
    the ranks (what DDP's average of W·share gives) equal the unsplit ones. The reward/value head
    and PPO's log-probs refuse to run unsplit."""
    import torch.distributed as dist
    from rlhf_ops.train.model import GPT, GPTConfig, ScalarHeadGPT
    cfg = GPTConfig(vocab_size=11, block_size=16, n_layer=2, n_head=2, d_model=16, backend="reference")
    torch.manual_seed(0)
    ref = GPT(cfg).double()
    cpm = GPT(GPTConfig(**{**vars(cfg), "context_parallel": True})).double()
    cpm.load_state_dict(ref.state_dict())
    x = torch.randint(0, 11, (3, 13))
    y = torch.randint(0, 11, (3, 13))
    y[0, :4] = -100
    for red in ("sum", "none"):
        ours, want = cpm(x, y, reduction=red), ref(x, y, reduction=red)
        g = torch.randn_like(want)
        (ours * g).sum().backward()
        (want * g).sum().backward()
        total = ours.detach().clone()
        dist.all_reduce(total, group=ctx.group)
        _close(total, want, f"{red}: Σ of the ranks' shares")
        for (name, p), q in zip(cpm.named_parameters(), ref.parameters()):
            grad = p.grad.clone()
            dist.all_reduce(grad, group=ctx.group)
            _close(grad, q.grad, f"{red}: Σ grad {name}")
            p.grad, q.grad = None, None
    with torch.no_grad():
        _close(cpm(x, y), ref(x, y), "mean")
    _expect(lambda: cpm(x, y), ValueError, "reduction='mean' is for evaluation")
    _expect(lambda: cpm(x, logprobs_of=y.clamp(min=0)), ValueError, "context_parallel")
    _expect(lambda: ScalarHeadGPT(cpm.cfg)(x), ValueError, "context_parallel")


@case(4)
def fsdp_lm_heads(ctx):
    """weight_shard="fsdp" on fully_shard's LM head (V = 7 over 4 ranks: 2, 2, 2, 1 rows; a bias),
    each rank with its own hidden rows and targets: linear_cross_entropy and linear_token_logprobs
    (+ entropy, K = 2 tokens) equal the op on the whole weight, d hidden too, and the weight's and
    bias' gradients are Shard(0) DTensors holding the mean over the ranks of each rank's
    gradient; reference and Triton. The default reading (weight_shard="vocab") of the same weight
    raises on every rank, asking for weight_shard."""
    import rlhf_ops as ro
    torch.set_default_device("cpu")
    try:
        torch.manual_seed(7)
        lin, full_w, full_b = _fsdp_linear(ctx, 7, 16, True)
        torch.manual_seed(200 + ctx.rank)                         # each rank its own rows
        h = torch.randn(5, 16, dtype=torch.float64)
        t = torch.randint(0, 7, (5,))
        t[1] = -100
        tok = torch.randint(0, 7, (5, 2))
        ops = {"ce": lambda hh, w, b, **kw: ro.linear_cross_entropy(hh, w, t, bias=b, reduction="sum", **kw),
               "lp": lambda hh, w, b, **kw: sum(x.sum() for x in ro.linear_token_logprobs(
                   hh, w, tok, bias=b, return_entropy=True, **kw))}
        for be in ("reference", "triton"):
            for name, f in ops.items():
                hl = _leaf(h)
                ours = f(hl, lin.weight, lin.bias, weight_shard="fsdp", backend=be)
                ours.backward()
                hr, wr, br = _leaf(h), _leaf(full_w), _leaf(full_b)
                want = f(hr, wr, br, backend="reference")
                want.backward()
                what = f"{be} {name}"
                _close(ours, want, f"{what} value")
                _close(hl.grad, hr.grad, f"{what} d hidden")
                for p, g in ((lin.weight, wr.grad), (lin.bias, br.grad)):
                    mean = sum(ctx.gather(g)) / ctx.world
                    assert p.grad.placements == lin.weight.placements, p.grad
                    _close(p.grad.full_tensor(), mean, f"{what} FSDP2 gradient (mean over ranks)")
                    p.grad = None
        for name, f in ops.items():
            _expect(lambda: f(h, lin.weight, lin.bias), ValueError, "weight_shard='fsdp'")
        _expect(lambda: ro.linear_cross_entropy(h, lin.weight, t, weight_shard="fsdp",
                                                process_group=ctx.group), ValueError, "one or the other")
        _expect(lambda: ro.linear_cross_entropy(h, lin.weight, t, weight_shard="data"), ValueError,
                "weight_shard must be one of")
    finally:
        torch.set_default_device(ctx.device)


# ------------------------------------------------------------------------------ the tests ---

@pytest.mark.parametrize("key", _spawn.keys(CASES))
def test_context_parallel(results, key):
    _spawn.check(results, key, "RLHF_CP_ONLY")


def test_block_spec_matches_the_global_mask():
    """Every (q chunk, kv chunk) offset, chunk length and window: the trimmed kernel call admits
    exactly the pairs the global mask admits."""
    from rlhf_ops import reference
    from rlhf_ops.context_parallel import block_spec
    for c in (1, 2, 3, 5):
        for d in range(-3 * c, 3 * c + 1):
            for left in (-1, 0, 1, 2, 4, 9):
                for right in (-1, 0, 1, 3, 9):
                    i, j = torch.arange(c)[:, None], torch.arange(c)[None]
                    want = torch.ones(c, c, dtype=torch.bool)
                    if left >= 0:
                        want &= j - i >= d - left
                    if right >= 0:
                        want &= j - i <= d + right
                    got = torch.zeros(c, c, dtype=torch.bool)
                    spec = block_spec(d, c, left, right)
                    if spec is not None:
                        t, s, lft, rgt = spec
                        assert 1 <= t <= c and 1 <= s <= c
                        got[:t, :s] = reference._visible(torch.arange(t)[:, None],
                                                         torch.arange(s)[None], t, s, lft, rgt)
                    assert torch.equal(got, want), (c, d, left, right, spec)


def _train(tmp_path, name, sets, torchrun):
    import socket
    # CPU processes (gloo) also where a GPU is visible: NCCL cannot put two ranks on one GPU
    common = ["pretrain", "--preset", "tiny", "--backend", "reference", "--device", "cpu",
              "--set", "pretrain.steps=3",
              "run.dtype=float64", *sets, "--out", str(tmp_path / name)]
    if not torchrun:
        from rlhf_ops.train.__main__ import main
        main(common)
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "rlhf_ops.train"]
    p = subprocess.run(cmd + common, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]


def _run_record(path: Path):
    ck = torch.load(path / "ckpt" / "pretrain_final.pt", weights_only=False)
    lines = [json.loads(ln) for ln in (path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if r.get("stage") == "pretrain" and "loss" in r]
    return ck, losses, json.loads((path / "results.json").read_text())["pretrain"]


def test_training_loop_context_parallel_and_fsdp_match_one_process(tmp_path):
    """The tiny preset's pretraining in fp64 (3 steps, a resume checkpoint at step 2): under
    torchrun with 2 CPU processes, `--set model.context_parallel=true` (every sequence split
    zigzag, ring attention; every rank the whole batch) and `--set run.fsdp=true` (fully_shard
    instead of DDP) give the losses (to 1e-6), the held-out LM loss and the parameters (to 1e-10)
    of the one-process run — which test_train checks DDP against."""
    t0 = time.time()
    _train(tmp_path, "one", [], torchrun=False)
    _train(tmp_path, "cp", ["model.context_parallel=true"], torchrun=True)
    _train(tmp_path, "fsdp", ["run.fsdp=true"], torchrun=True)
    print(f"\nthree pretraining runs: {time.time() - t0:.1f} s")
    ck1, loss1, res1 = _run_record(tmp_path / "one")
    assert len(loss1) == 3
    for name in ("cp", "fsdp"):
        ck, loss, res = _run_record(tmp_path / name)
        assert loss == pytest.approx(loss1, rel=1e-6), name
        assert res["pretrain_loss"] == pytest.approx(res1["pretrain_loss"], rel=1e-10), name
        assert res["args"]["world_size"] == 2
        for k, v in ck1["models"]["lm"].items():
            assert v.dtype == torch.float64
            torch.testing.assert_close(ck["models"]["lm"][k], v, rtol=1e-10, atol=1e-12, msg=f"{name} {k}")
    assert _run_record(tmp_path / "cp")[0]["model_cfg"]["context_parallel"] is True
