"""The logit softcap of the LM-head ops (``softcap=``, Gemma-2's ``final_logit_softcapping``):
cross_entropy, linear_cross_entropy, token_logprobs and linear_token_logprobs on every backend
against the eager definition written out here in float64 — F.cross_entropy / log_softmax of
c·tanh(z/c), −inf kept −inf, the temperature dividing the capped logits — values and gradients,
the edge cases (±1e4, ±inf, ignored rows, empty batch, a single row, V > 65,536), fp32 no worse
than eager fp32 and bf16/fp16 no worse than eager in the same dtype, the option's effect, the
Triton helper's accuracy in ulps, bad values, torch.compile and the bytes kept for backward.
Vocabulary parallelism with a softcap: tests/test_distributed.py (``softcap_vocab_parallel``).
"""
import importlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import rlhf_ops as ro
from rlhf_ops.kernels._math import softcap as _softcap
from _util import assert_elementwise, assert_matches, rel_err, saved_tensors
from conftest import DEVICE, backend_problem

layout_mod = importlib.import_module("rlhf_ops._layout")
C = 30.0            # Gemma-2's final_logit_softcapping
NINF = float("-inf")


# ------------------------------------------------------------------- the eager definition ---

def cap(z, c=C):
    """c·tanh(z/c), −inf kept (a masked logit stays masked)."""
    return torch.where(z == NINF, z, c * torch.tanh(z / c))


def eager_ce(logits, target, *, c=C, **kw):
    V = logits.shape[-1]
    return F.cross_entropy(cap(logits, c).reshape(-1, V), target.reshape(-1), **kw).reshape(
        target.shape if kw.get("reduction") == "none" else ())


def eager_lp(logits, tokens, *, c=C, temperature=1.0):
    """(log-probs at tokens [...] or [..., K], entropy) of softmax(c·tanh(z/c) / T)."""
    logp = torch.log_softmax(cap(logits, c) / temperature, -1)
    multi = tokens.dim() == logits.dim()
    lp = logp.gather(-1, tokens if multi else tokens[..., None])
    p = logp.exp()
    ent = -(p * torch.where(p > 0, logp, torch.zeros((), dtype=p.dtype, device=p.device))).sum(-1)
    return (lp if multi else lp[..., 0]), ent


def _leaves(*ts, dtype=None):
    return [None if t is None else t.detach().to(dtype or t.dtype).clone().requires_grad_() for t in ts]


def _small_blocks(monkeypatch, n):
    """Row chunks / vocabulary slices of at most ``n`` (several per call at these sizes)."""
    monkeypatch.setattr(layout_mod, "block_len", lambda n_other, itemsize, total: min(total, n))


def _grads(outs, leaves, gs):
    return torch.autograd.grad(outs, [x for x in leaves if x is not None], gs, allow_unused=True)


# ------------------------------------------------------------------------ float64, values + grads ---

@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_cross_entropy_fp64(backend, device, reduction):
    z = torch.randn(2, 5, 257, dtype=torch.float64, device=device) * 40     # tanh far from linear
    t = torch.randint(0, 257, (2, 5), device=device)
    t[0, 1] = t[1, 3] = -1                                                   # ignored (custom index)
    x, xe = _leaves(z, z)
    kw = dict(reduction=reduction, label_smoothing=0.1, ignore_index=-1)
    out = ro.cross_entropy(x, t, softcap=C, backend=backend, **kw)
    ref = eager_ce(xe, t, **kw)
    assert_matches(out, ref, what="loss")
    g = torch.rand(ref.shape, dtype=torch.float64, device=device)
    assert_matches(*(_grads(o, [a], g)[0] for o, a in ((out, x), (ref, xe))), what="d logits")


def test_linear_cross_entropy_fp64(backend, device, monkeypatch):
    _small_blocks(monkeypatch, 5)
    h = torch.randn(13, 24, dtype=torch.float64, device=device)
    w = torch.randn(257, 24, dtype=torch.float64, device=device) * 8          # logits ~ ±40
    b = torch.randn(257, dtype=torch.float64, device=device) * 10
    t = torch.randint(0, 257, (13,), device=device)
    t[::4] = -100
    ours, eager = _leaves(h, w, b), _leaves(h, w, b)
    out = ro.linear_cross_entropy(ours[0], ours[1], t, bias=ours[2], softcap=C, label_smoothing=0.05,
                                  backend=backend)
    ref = eager_ce(F.linear(*eager), t, label_smoothing=0.05)
    assert_matches(out, ref, what="loss")
    for name, a, r in zip(("hidden", "weight", "bias"), _grads(out, ours, None), _grads(ref, eager, None)):
        assert_matches(a, r, what=f"d {name}")


def test_token_logprobs_fp64(backend, device):
    z = torch.randn(3, 4, 129, dtype=torch.float64, device=device) * 40
    t = torch.randint(0, 129, (3, 4, 2), device=device)
    t[0, 0, 1] = t[0, 0, 0]                                                  # a repeated token
    x, xe = _leaves(z, z)
    lp, ent = ro.token_logprobs(x, t, softcap=C, temperature=0.7, return_entropy=True, backend=backend)
    rlp, rent = eager_lp(xe, t, temperature=0.7)
    assert_matches(lp, rlp, what="logprobs")
    assert_matches(ent, rent, what="entropy")
    g = (torch.rand(rlp.shape, dtype=torch.float64, device=device),
         torch.rand(rent.shape, dtype=torch.float64, device=device))
    assert_matches(_grads((lp, ent), [x], g)[0], _grads((rlp, rent), [xe], g)[0], what="d logits")
    # the order is the documented one: capping c·tanh(z/T / c) instead would be another distribution
    other = torch.log_softmax(cap(z / 0.7), -1).gather(-1, t)
    assert rel_err(lp, other) > 1e-2


def test_linear_token_logprobs_fp64(backend, device, monkeypatch):
    _small_blocks(monkeypatch, 6)
    h = torch.randn(11, 16, dtype=torch.float64, device=device)
    w = torch.randn(300, 16, dtype=torch.float64, device=device) * 10
    b = torch.randn(300, dtype=torch.float64, device=device) * 10
    t = torch.randint(0, 300, (11, 2), device=device)
    logits = F.linear(h, w, b)
    t[0, 0] = logits[0].argmax()                                             # is_top1 true somewhere
    ours, eager = _leaves(h, w, b), _leaves(h, w, b)
    lp, ent, top1, mean = ro.linear_token_logprobs(ours[0], ours[1], t, bias=ours[2], softcap=C,
                                                   temperature=0.8, return_entropy=True,
                                                   return_stats=True, backend=backend)
    rlp, rent = eager_lp(F.linear(*eager), t, temperature=0.8)
    assert_matches(lp, rlp, what="logprobs")
    assert_matches(ent, rent, what="entropy")
    # statistics: the capped logits' mean / T; top-1 is the argmax of the raw (= capped) logits
    assert torch.equal(top1, logits.argmax(-1, keepdim=True) == t) and top1[0, 0]
    assert_matches(mean, cap(logits).mean(-1) / 0.8, what="mean_logit")
    g = (torch.rand(11, 2, dtype=torch.float64, device=device),
         torch.rand(11, dtype=torch.float64, device=device))
    for name, a, r in zip(("hidden", "weight", "bias"), _grads((lp, ent), ours, g),
                          _grads((rlp, rent), eager, g)):
        assert_matches(a, r, what=f"d {name}")


# ------------------------------------------------------------------------------ edge cases ---

def _extreme(device, V=300):
    """Rows: ±1e4, half −1e4, −inf past 5 entries, −inf at every other entry, one +inf (capped to
    c: a finite loss), an ordinary row."""
    z = torch.randn(6, V, dtype=torch.float64, device=device) * 40
    z[0] = torch.randn(V, dtype=torch.float64, device=device).sign() * 1e4
    z[1, : V // 2] = -1e4
    z[2, 5:] = NINF
    z[3, 1::2] = NINF
    z[4, 7] = float("inf")
    t = torch.tensor([3, 0, 2, 4, 7, 9], device=device)
    return z, t


def test_cross_entropy_edges(backend, device):
    z, t = _extreme(device)
    t = torch.cat([t, torch.tensor([-100], device=device)])                  # an ignored row of −inf
    z = torch.cat([z, torch.full((1, z.shape[1]), NINF, dtype=z.dtype, device=device)])
    x, xe = _leaves(z, z)
    out = ro.cross_entropy(x, t, softcap=C, reduction="none", backend=backend)
    ref = torch.cat([eager_ce(xe[:6], t[:6], reduction="none"), torch.zeros(1, dtype=z.dtype, device=device)])
    assert torch.isfinite(out).all()
    assert_matches(out, ref, what="loss")
    g = torch.rand(7, dtype=torch.float64, device=device)
    gx, gr = _grads(out, [x], g)[0], _grads(ref, [xe], g)[0]
    assert torch.isfinite(gx).all() and not gx[6].any()
    assert_matches(gx, gr, what="d logits")
    # every row ignored: mean 0 with a zero gradient; an empty batch; a single row
    x = _leaves(z[:2])[0]
    out = ro.cross_entropy(x, torch.full((2,), -100, device=device), softcap=C, backend=backend)
    out.backward()
    assert out.item() == 0.0 and not x.grad.any()
    empty = _leaves(z[:0])[0]
    out = ro.cross_entropy(empty, t[:0], softcap=C, reduction="none", backend=backend)
    assert out.shape == (0,)
    out.sum().backward()
    assert empty.grad.shape == (0, z.shape[1])
    one = ro.cross_entropy(z[5:6], t[5:6], softcap=C, reduction="none", backend=backend)
    assert_matches(one, eager_ce(z[5:6], t[5:6], reduction="none"), what="single row")


def test_token_logprobs_edges(backend, device):
    z, t = _extreme(device)
    t = torch.stack([t, torch.tensor([0, 1, 6, 1, 7, 9], device=device)], -1)   # [6, 2]: −inf tokens
    x, xe = _leaves(z, z)
    lp, ent = ro.token_logprobs(x, t, softcap=C, return_entropy=True, backend=backend)
    rlp, rent = eager_lp(xe, t)
    # −inf stays −inf: a token on a −inf logit has log-prob −inf (−c − lse if it were capped)
    assert lp[2, 1] == NINF and lp[3, 1] == NINF and torch.isfinite(lp[4]).all()
    assert_matches(lp, rlp, what="logprobs")
    assert_matches(ent, rent, what="entropy")
    g = (torch.rand(6, 2, dtype=torch.float64, device=device), torch.rand(6, dtype=torch.float64, device=device))
    gx, gr = _grads((lp, ent), [x], g)[0], _grads((rlp, rent), [xe], g)[0]
    assert torch.isfinite(gx).all()
    assert_matches(gx, gr, what="d logits")
    empty = ro.token_logprobs(z[:0], t[:0], softcap=C, backend=backend)
    assert empty.shape == (0, 2)


def test_vocab_above_65536(backend, device):
    V = 70001
    z = torch.randn(2, V, dtype=torch.float64, device=device) * 40
    t = torch.tensor([5, V - 1], device=device)
    x, xe = _leaves(z, z)
    out = ro.cross_entropy(x, t, softcap=C, reduction="none", backend=backend)
    lp, ent = ro.token_logprobs(x, t, softcap=C, return_entropy=True, backend=backend)
    ref = eager_ce(xe, t, reduction="none")
    rlp, rent = eager_lp(xe, t)
    for a, r, what in ((out, ref, "loss"), (lp, rlp, "logprobs"), (ent, rent, "entropy")):
        assert_matches(a, r, what=what)
    g = torch.rand(2, dtype=torch.float64, device=device)
    assert_matches(_grads((out, lp, ent), [x], (g, g, g))[0], _grads((ref, rlp, rent), [xe], (g, g, g))[0],
                   what="d logits")


# ---------------------------------------------------------------------- low precision ---

def _low(op, dtype, device):
    """(number of outputs, ours, float64, eager in dtype) — outputs then gradients — of ``op``."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    if op in ("cross_entropy", "token_logprobs"):
        z = (torch.randn(24, 500, generator=gen, dtype=torch.float64) * 40).to(device)
        t = torch.randint(0, 500, (24,), generator=gen).to(device)
        args = (z,)
    else:
        h = torch.randn(24, 32, generator=gen, dtype=torch.float64).to(device)
        w = (torch.randn(500, 32, generator=gen, dtype=torch.float64) * 7).to(device)
        t = torch.randint(0, 500, (24,), generator=gen).to(device)
        args = (h, w)
    kw = dict(reduction="none") if "cross" in op else dict(return_entropy=True, temperature=0.9)
    fn = getattr(ro, op)

    def run(dt, be):
        leaves = _leaves(*args, dtype=dt)
        outs = fn(*leaves, t, softcap=C, backend=be, **kw)
        outs = outs if isinstance(outs, tuple) else (outs,)
        gs = [torch.rand(o.shape, generator=gen, dtype=torch.float64).to(device) for o in outs]
        return list(outs) + list(_grads(outs, leaves, [g.to(o.dtype) for g, o in zip(gs, outs)]))

    state = gen.get_state()
    res = []
    for dt, be in ((dtype, None), (torch.float64, "reference"), (dtype, "reference")):
        gen.set_state(state)                           # the same upstream gradients for all three
        res.append(run(dt, be))
    return (2 if "token" in op else 1), *res


LOW = [(op, dt) for op in ("cross_entropy", "token_logprobs") for dt in (torch.float32, torch.bfloat16,
                                                                          torch.float16)] + \
      [(op, dt) for op in ("linear_cross_entropy", "linear_token_logprobs") for dt in (torch.float32,
                                                                                      torch.bfloat16)]


@pytest.mark.parametrize("op,dtype", LOW)
def test_low_precision_no_worse_than_eager(backend, device, op, dtype):
    """fp32: error ≤ eager fp32's × 1.05 + 1e-6 (element-wise on the per-row outputs, with the
    row's operand size 1 + c/T as the rounding scale); bf16/fp16 (the linear ops round their
    logits to it, as eager does; bf16 only for them): ≤ eager's in that dtype × 1.05 + 2e-3."""
    with ro.use_backend(backend):
        n_out, ours, ref, eager = _low(op, dtype, device)
    for i, (a, r, e) in enumerate(zip(ours, ref, eager)):
        if dtype == torch.float32:
            assert_matches(a, r, e, tol=1e-6, what=f"{op} fp32 #{i}")
            if i < n_out:                              # per-row outputs: also element by element
                assert_elementwise(a, r, e, tol=1e-6, atol=1 + C / 0.9, what=f"{op} fp32 #{i}")
        else:
            assert_matches(a, r, e, what=f"{op} {dtype} #{i}")


# -------------------------------------------------------------------- the option's effect ---

def test_softcap_changes_the_result(backend, device):
    """softcap 0 (off) vs 30 differ; a very large c is the uncapped op (c·tanh(z/c) → z)."""
    z = torch.randn(4, 97, dtype=torch.float64, device=device) * 40
    t = torch.randint(0, 97, (4,), device=device)
    h = torch.randn(4, 8, dtype=torch.float64, device=device)
    w = torch.randn(97, 8, dtype=torch.float64, device=device) * 10
    calls = {
        "cross_entropy": lambda c: ro.cross_entropy(z, t, softcap=c, backend=backend),
        "token_logprobs": lambda c: ro.token_logprobs(z, t, softcap=c, backend=backend),
        "linear_cross_entropy": lambda c: ro.linear_cross_entropy(h, w, t, softcap=c, backend=backend),
        "linear_token_logprobs": lambda c: ro.linear_token_logprobs(h, w, t, softcap=c, backend=backend),
    }
    for name, f in calls.items():
        off, on, huge = f(0.0), f(C), f(1e7)
        assert rel_err(on, off) > 1e-2, name
        assert_matches(huge, off, tol=1e-9, what=f"{name}: c = 1e7 vs off")


def test_inplace_backward(fused_backend, device):
    z = torch.randn(6, 77, dtype=torch.float64, device=device) * 40
    t = torch.randint(0, 77, (6,), device=device)
    leaf = z.clone().requires_grad_()
    y = leaf * 1.0                                                           # a logits buffer
    loss = ro.cross_entropy(y, t, softcap=C, backend=fused_backend, inplace_backward=True)
    buf = y.detach()
    loss.backward()
    xe = _leaves(z)[0]
    eager_ce(xe, t).backward()
    assert_matches(leaf.grad, xe.grad, what="d logits")
    assert torch.equal(buf, leaf.grad), "in-place mode writes the gradient into the logits buffer"


def test_torch_compile_fullgraph(backend, device):
    z = torch.randn(3, 40, dtype=torch.float64, device=device) * 40
    t = torch.randint(0, 40, (3,), device=device)

    def step(x):
        return ro.cross_entropy(x, t, softcap=C, backend=backend) + \
            ro.token_logprobs(x, t, softcap=C, temperature=0.5, backend=backend).sum()

    x, xc = _leaves(z, z)
    step(x).backward()
    torch.compile(step, fullgraph=True, backend="aot_eager")(xc).backward()
    assert_matches(xc.grad, x.grad, what="compiled d logits")


# ------------------------------------------------------------------------------ bad values ---

_Z, _H, _W, _T = torch.randn(2, 5) * 40, torch.randn(2, 3), torch.randn(5, 3) * 20, torch.tensor([0, 4])
OPS = {
    "cross_entropy": lambda **kw: ro.cross_entropy(_Z, _T, **kw),
    "linear_cross_entropy": lambda **kw: ro.linear_cross_entropy(_H, _W, _T, **kw),
    "token_logprobs": lambda **kw: ro.token_logprobs(_Z, _T, **kw),
    "linear_token_logprobs": lambda **kw: ro.linear_token_logprobs(_H, _W, _T, **kw),
}


@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("value,exc", [(-1.0, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
                                       (torch.tensor(30.0, requires_grad=True), TypeError),
                                       (torch.tensor(30.0), TypeError), ("30", TypeError), (True, TypeError)])
def test_bad_softcap(name, value, exc):
    with pytest.raises(exc, match="softcap") as info:
        OPS[name](softcap=value, backend="reference")
    assert type(info.value) is exc


def test_ints_and_numpy_floats_are_accepted():
    for name, f in OPS.items():
        a = f(softcap=30.0, backend="reference")
        assert torch.equal(a, f(softcap=30, backend="reference")), name
        assert torch.equal(a, f(softcap=np.float64(30.0), backend="reference")), name
        assert not torch.equal(a, f(softcap=0, backend="reference")), name


# --------------------------------------------------------------------------------- memory ---

@pytest.mark.parametrize("name", ["triton", "cuda"])
def test_nothing_v_sized_kept_for_backward(name):
    """On the meta device (rlhf_ops._memory's count, as bench/memory.py): with a softcap the fused
    backends keep exactly what they keep without it — for the logits ops the caller's logits and
    a few numbers per row, for the linear ops nothing of size N·V at all."""
    N, V, d = 64, 5000, 32
    x = torch.empty(N, V, device="meta", dtype=torch.bfloat16, requires_grad=True)
    h = torch.empty(N, d, device="meta", dtype=torch.bfloat16, requires_grad=True)
    w = torch.empty(V, d, device="meta", dtype=torch.bfloat16, requires_grad=True)
    t = torch.empty(N, device="meta", dtype=torch.int64)
    calls = {
        "cross_entropy": lambda c: ro.cross_entropy(x, t, softcap=c, backend=name),
        "token_logprobs": lambda c: ro.token_logprobs(x, t, softcap=c, return_entropy=True, backend=name),
        "linear_cross_entropy": lambda c: ro.linear_cross_entropy(h, w, t, softcap=c, backend=name),
        "linear_token_logprobs": lambda c: ro.linear_token_logprobs(h, w, t, softcap=c, return_entropy=True,
                                                                    backend=name),
    }
    for op, f in calls.items():
        with_cap, without = saved_tensors(lambda: f(C)), saved_tensors(lambda: f(0.0))
        kept = sorted((tuple(s.shape), str(s.dtype)) for s in with_cap)
        assert kept == sorted((tuple(s.shape), str(s.dtype)) for s in without), op
        big = [(tuple(s.shape), s.dtype) for s in with_cap if s.numel() >= N * V]
        assert big == ([] if "linear" in op else [((N, V), torch.bfloat16)]), (op, kept)


# ------------------------------------------------------------------ the Triton helper itself ---

@triton.jit
def _softcap_kernel(X, Y, D, n, c, ic, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    y, d = _softcap(tl.load(X + o, mask=o < n), c, ic)
    tl.store(Y + o, y, mask=o < n)
    tl.store(D + o, d, mask=o < n)


@pytest.mark.skipif(backend_problem("triton") is not None, reason=backend_problem("triton") or "")
def test_triton_softcap_helper_ulps():
    """kernels/_math.softcap in fp32 (on a GPU with the GPU's instructions): c·tanh(x/c) within
    4 ulp of the float64 value, mean ≤ 0.35 (measured under the interpreter: 3.2 and 0.25; eager
    torch: 2.0 and 0.23 — the rounding of x/c and of the product by c come on top of the tanh's);
    its derivative within 4 ulp, mean ≤ 0.6, for |x| ≤ 2c (measured: 2.5 and 0.43; eager's
    1 − tanh² cancels: 12 ulp; past 2c the rounding of x/c alone moves 1 − tanh² by several ulp);
    −inf stays −inf with derivative 1, ±1e30 and +inf give ±c and 0, NaN stays NaN."""
    x = torch.cat([torch.linspace(-400, 400, 20001), torch.logspace(-6, 3.5, 4001),
                   -torch.logspace(-6, 3.5, 4001),
                   torch.tensor([0.0, 1e30, -1e30, NINF, float("inf"), float("nan")])]).float().to(DEVICE)
    y, d = torch.empty_like(x), torch.empty_like(x)
    _softcap_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, d, x.numel(), C, 1.0 / C, BLOCK=1024)
    fin = torch.isfinite(x)
    x64 = x[fin].double()
    ref = (C * torch.tanh(x64 / C)).cpu().numpy()
    ulp = np.spacing(np.abs(ref).astype(np.float32)).astype(np.float64)
    err = np.abs(y[fin].double().cpu().numpy() - ref) / ulp
    assert err.max() <= 4.0 and err.mean() <= 0.35, (err.max(), err.mean())
    dref = (1.0 - torch.tanh(x64 / C) ** 2).cpu().numpy()
    ok = np.abs(x64.cpu().numpy()) <= 2 * C
    derr = np.abs(d[fin].double().cpu().numpy() - dref)[ok] / np.spacing(dref[ok].astype(np.float32))
    assert derr.max() <= 4.0 and derr.mean() <= 0.6, (derr.max(), derr.mean())
    assert y[-3].item() == NINF and d[-3].item() == 1.0
    assert y[-2].item() == C and d[-2].item() == 0.0
    assert torch.isnan(y[-1]) and torch.isnan(d[-1])
    assert y[-5].item() == C and y[-4].item() == -C                   # saturated, finite derivative
    assert d[-5].item() == 0.0 and d[-4].item() == 0.0
    # fp64 to a few fp64 ulps, x/c past 354 included (where e^{−2x/c} is subnormal)
    x = torch.cat([torch.linspace(-12000, 12000, 24001, dtype=torch.float64),
                   torch.logspace(-9, 3, 2001, dtype=torch.float64)]).to(DEVICE)
    y, d = torch.empty_like(x), torch.empty_like(x)
    _softcap_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, d, x.numel(), C, 1.0 / C, BLOCK=1024)
    assert_elementwise(y, C * torch.tanh(x / C), tol=1e-14, what="fp64 c·tanh(x/c)")
    assert_elementwise(d, torch.cosh(x / C) ** -2, tol=1e-12, atol=1e-30, what="fp64 1 − tanh²")
