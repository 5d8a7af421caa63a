"""Property-based tests (hypothesis) of every public op against the float64 eager reference.

Each example draws shapes (0, 1, primes, sizes just above the kernels' block sizes), a layout
per input (contiguous; rows padded with NaN junk; a stride-2 last dim with NaN junk between;
transposed; expanded with stride 0), a dtype (fp64/fp32/fp16/bf16; no bf16 for attention under
the interpreter, whose bf16 ``tl.dot`` is broken), values with ±1e4, −inf and NaN sprinkled in,
random ignore/mask/rank patterns, options, and random upstream gradients (zeros included). It
runs the op on a fused backend (triton under the interpreter on CPU; triton and cuda on a GPU)
and compares forward and backward with the op run by the eager reference in float64 on the same
values, under DESIGN's numerics rule: fp64 inputs within 1e-10; otherwise within the error of
the eager reference run in the input dtype ×1.05 plus a small tolerance of the output dtype
(``TOL``), norm-wise, and element-wise for outputs with one element per row (each element
judged on its row's scale). Non-finite values must sit at the same positions with the same sign
as in the reference: a NaN must propagate, not vanish. The reference backend is the oracle; its
own semantics (NaN rows, −inf tokens) are asserted directly.

Profiles (tests/conftest.py): ``ci`` (default) is derandomized — each test draws the same
examples on every run, no database — with ``EXAMPLES`` per test; ``--hypothesis-profile=long``
draws 10× as many at random and saves failures in .pytest_cache/hypothesis/ for replay.

Bugs found by these tests are pinned as explicit ``xfail(strict=True)`` cases at the end of the
file, with the op, backend and input, and excluded from the draws (``assume``) until fixed.
"""
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import rlhf_ops as ro
from rlhf_ops import reference
from _util import assert_elementwise, assert_matches, rel_err
from conftest import DEVICE, ON_GPU, backend_problem

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
# small tolerance on top of eager's own error, by the dtype of the compared output
TOL = {F64: 1e-10, F32: 1e-5, F16: 5e-4, BF16: 4e-3}
FUSED = [pytest.param(b, marks=pytest.mark.skipif(bool(backend_problem(b)), reason=str(backend_problem(b))))
         for b in ("triton", "cuda")]
DOT_DTYPES = [F64, F32, F16] + ([BF16] if ON_GPU else [])


def EXAMPLES(n: int):
    """``n`` examples in the ci profile (max_examples 10); the long profile scales it ×10."""
    return settings(max_examples=max(1, n * settings().max_examples // 10))


# ------------------------------------------------------------------------------- drawing ---

ROWS = st.sampled_from([0, 1, 1, 2, 3, 5, 7, 13])
# vocabularies: tiny, primes, and one past the power-of-two block sizes (BLOCK ≥ 16)
VOCAB = st.sampled_from([1, 2, 3, 7, 16, 17, 31, 33, 65, 129, 257, 1000, 4097])
SPECIALS = st.sampled_from(["none", "none", "big", "neginf", "nan", "mixed"])
LAYOUTS = st.sampled_from(["contiguous", "contiguous", "padded", "strided", "transposed", "expanded"])


def values(shape, gen, special="none", scale=1.0, p=0.15):
    """float64 values: randn·scale with ``special`` values at a fraction p of the positions."""
    x = torch.randn(shape, generator=gen, dtype=F64) * scale
    if special == "none" or x.numel() == 0:
        return x
    hit = torch.rand(shape, generator=gen) < p
    sign = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0).to(F64)
    pick = {"big": 1e4 * sign, "neginf": torch.full(shape, -math.inf, dtype=F64),
            "nan": torch.full(shape, math.nan, dtype=F64)}
    if special == "mixed":
        k = torch.randint(0, 4, shape, generator=gen)
        val = torch.where(k == 0, 1e4 * sign, torch.where(k == 1, -math.inf, torch.where(k == 2, math.nan, x)))
    else:
        val = pick[special]
    return torch.where(hit, val, x)


class Laid:
    """A tensor of ``shape`` in a given memory layout: ``base`` is the allocation (a leaf that
    may require grad), ``view(b)`` maps any tensor shaped like base to the op's input, so the
    same layout is rebuilt in float64 for the reference."""

    def __init__(self, vals: torch.Tensor, layout: str, dtype, grad=False, junk=math.nan):
        self.layout = layout
        shape = tuple(vals.shape)
        if layout == "expanded" and (len(shape) < 2 or shape[0] < 2):
            layout = "contiguous"
        if layout in ("padded", "strided") and (len(shape) == 0 or shape[-1] == 0):
            layout = "contiguous"
        if layout == "transposed" and len(shape) < 2:
            layout = "contiguous"
        if layout == "swap12" and len(shape) < 3:
            layout = "contiguous"
        if layout == "contiguous":
            base, self.view = vals, (lambda b: b)
        elif layout == "padded":       # rows wider than the view, NaN junk in the gap
            pad = torch.full(shape[:-1] + (3,), junk, dtype=F64)
            base, n = torch.cat([vals, pad], -1), shape[-1]
            self.view = lambda b: b[..., :n]
        elif layout == "strided":      # stride 2 over the last dim, junk in between
            base = torch.stack([vals, torch.full_like(vals, junk)], -1).reshape(shape[:-1] + (2 * shape[-1],))
            self.view = lambda b: b[..., ::2]
        elif layout == "transposed":   # last dim outermost in memory
            base = vals.movedim(-1, 0).contiguous()
            self.view = lambda b: b.movedim(0, -1)
        elif layout == "swap12":       # dims 1 and 2 swapped in memory ([B, T, H, D] viewed as [B, H, T, D])
            base = vals.transpose(1, 2).contiguous()
            self.view = lambda b: b.transpose(1, 2)
        elif layout == "expanded":     # every index of dim 0 reads the same data (stride 0)
            base = vals[:1].clone()
            self.view = lambda b: b.expand(shape)
        else:
            raise AssertionError(layout)
        self.base = base.to(dtype).to(DEVICE)
        if not self.base.is_floating_point():
            grad = False
        if grad:
            self.base.requires_grad_()
        self.grad = grad

    def x(self):
        return self.view(self.base)

    def x64(self):
        """The same view of the same values in float64 (a new leaf, made once); integer
        tensors stay as they are."""
        if not hasattr(self, "_b64"):
            b = self.base.detach()
            if b.is_floating_point():
                b = b.to(F64).requires_grad_(self.grad)
            self._b64 = b
        return self.view(self._b64)

    def xdt(self):
        """The same view of a copy in the input dtype (a new leaf, made once): the eager run."""
        if not hasattr(self, "_bdt"):
            self._bdt = self.base.detach().clone().requires_grad_(self.grad)
        return self.view(self._bdt)


def index_tensor(vals: torch.Tensor, layout: str):
    return Laid(vals, layout, torch.int64, junk=0)


def upstream(shape, gen):
    """A random upstream gradient (fp64) with about a fifth of it exactly zero."""
    g = torch.randn(shape, generator=gen, dtype=F64)
    return torch.where(torch.rand(shape, generator=gen) < 0.2, torch.zeros((), dtype=F64), g).to(DEVICE)


def compare(ours, ref64, eager, in_dtype, what, row_scale=None, rounded_in=None, abs_floor=0.0):
    """DESIGN's rule, norm-wise; element-wise too when ``row_scale`` (one element per row) is given.
    The small tolerance is that of the output dtype, or of ``rounded_in`` when the op rounds an
    intermediate to it (the linear ops' logits are materialised in the input dtype)."""
    if ours is None and ref64 is None:
        return
    assert ours is not None and ref64 is not None, f"{what}: one side has no value"
    assert ours.shape == ref64.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(ref64.shape)}"
    tol = max(TOL[ours.dtype], TOL[rounded_in] if rounded_in is not None else 0.0)
    if abs_floor > 0 and rel_err(ours, ref64) < math.inf:
        fin = torch.isfinite(ref64)
        err = float((ours.detach().double() - ref64.detach().double())[fin].norm())
        if err <= abs_floor:       # within the op's documented absolute rounding floor
            return
    if in_dtype == F64:
        assert_matches(ours, ref64, tol=tol, what=what)
        if row_scale is not None:
            assert_elementwise(ours, ref64, tol=tol, atol=row_scale, what=what)
    else:
        assert_matches(ours, ref64, eager, tol=tol, what=what)
        if row_scale is not None:
            assert_elementwise(ours, ref64, eager, tol=tol, atol=row_scale, what=what)


def row_scale(x64: torch.Tensor, temperature: float = 1.0):
    """Per row of [..., V]: 1 + max |finite x| / T, the size of the operands a row result is
    computed from (its rounding scale)."""
    a = torch.where(torch.isfinite(x64), x64.abs(), torch.zeros((), dtype=F64))
    return 1.0 + (a.amax(-1) if x64.shape[-1] else a.sum(-1)) / temperature


def _grads(outs, leaves, gs):
    """Gradients of Σ g·out w.r.t. ``leaves``; a leaf the outputs do not depend on gets zeros."""
    pairs = [(o, g) for o, g in zip(outs, gs) if o is not None and o.requires_grad]
    got = [None] * len(leaves)
    if pairs:
        got = torch.autograd.grad([o for o, _ in pairs], leaves, [g.to(o.dtype) for o, g in pairs],
                                  allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(got, leaves)]


def _lead(data):
    """Leading dims: [N] or [B, T]."""
    if data.draw(st.booleans()):
        return (data.draw(ROWS),)
    return (data.draw(st.sampled_from([1, 2, 3])), data.draw(st.sampled_from([1, 2, 5, 7])))


# ------------------------------------------------------------------------- cross_entropy ---

@pytest.mark.parametrize("backend", FUSED)
@EXAMPLES(20)
@given(data=st.data())
def test_cross_entropy(backend, data):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    lead, V = _lead(data), data.draw(VOCAB, label="V")
    dtype = data.draw(st.sampled_from([F64, F32, F16, BF16]), label="dtype")
    special = data.draw(SPECIALS, label="special")
    reduction = data.draw(st.sampled_from(["mean", "sum", "none"]), label="reduction")
    ls = data.draw(st.sampled_from([0.0, 0.0, 0.1, 1.0]), label="label_smoothing")
    ignore_index = data.draw(st.sampled_from([-100, -100, 0]), label="ignore_index")
    p_ignore = data.draw(st.sampled_from([0.0, 0.3, 1.0]), label="p_ignore")
    inplace = data.draw(st.booleans(), label="inplace_backward")
    lx = Laid(values(lead + (V,), gen, special, scale=data.draw(st.sampled_from([1.0, 30.0]))),
              data.draw(LAYOUTS, label="logits layout"), dtype, grad=True)
    assume(not (inplace and lx.layout == "expanded"))      # test_ce_inplace_backward_expanded_logits
    t = torch.randint(0, V, lead, generator=gen)
    t = torch.where(torch.rand(lead, generator=gen) < p_ignore, torch.full_like(t, ignore_index), t)
    lt = index_tensor(t, data.draw(LAYOUTS, label="target layout"))
    kw = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=ls)
    # the reference in fp64 (the oracle) and in the input dtype (eager)
    ref = reference.cross_entropy(lx.x64(), lt.x(), **kw)
    eager = reference.cross_entropy(lx.xdt(), lt.x(), **kw)
    ours = ro.cross_entropy(lx.x(), lt.x(), backend=backend, inplace_backward=inplace, **kw)
    assert ours.dtype == (F64 if dtype == F64 else F32) and ours.device.type == DEVICE
    valid = (t != ignore_index).to(DEVICE)
    if reduction == "none":
        nan_rows = torch.isnan(lx.x64().detach()).any(-1) & valid
        assert torch.isnan(ref.detach()[nan_rows]).all(), "oracle: a NaN logit in a valid row gives NaN"
        assert (ref.detach()[~valid] == 0).all(), "oracle: an ignored row has loss 0"
    scale = row_scale(lx.x64().detach()) if reduction == "none" else None
    compare(ours, ref, eager, dtype, "loss", scale)
    g = upstream(ref.shape, gen)
    gr, = _grads([ref], [lx._b64], [g])
    ge, = _grads([eager], [lx._bdt], [g])
    go, = _grads([ours], [lx.base], [g])
    compare(go, gr, ge, dtype, "d logits")


# ------------------------------------------------------------------------ token_logprobs ---

@pytest.mark.parametrize("backend", FUSED)
@EXAMPLES(20)
@given(data=st.data())
def test_token_logprobs(backend, data):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    lead, V = _lead(data), data.draw(VOCAB, label="V")
    dtype = data.draw(st.sampled_from([F64, F32, F16, BF16]), label="dtype")
    special = data.draw(SPECIALS, label="special")
    T = data.draw(st.sampled_from([1.0, 1.0, 0.7, 2.5]), label="temperature")
    K = data.draw(st.sampled_from([None, None, 1, 2, 5]), label="K")
    ent = data.draw(st.booleans(), label="return_entropy")
    lx = Laid(values(lead + (V,), gen, special, scale=data.draw(st.sampled_from([1.0, 30.0]))),
              data.draw(LAYOUTS, label="logits layout"), dtype, grad=True)
    tshape = lead + ((K,) if K else ())
    lt = index_tensor(torch.randint(0, V, tshape, generator=gen), data.draw(LAYOUTS, label="tokens layout"))
    kw = dict(temperature=T, return_entropy=ent)
    as_tuple = (lambda o: tuple(o) if ent else (o, None))
    ref = as_tuple(reference.token_logprobs(lx.x64(), lt.x(), **kw))
    eager = as_tuple(reference.token_logprobs(lx.xdt(), lt.x(), **kw))
    ours = as_tuple(ro.token_logprobs(lx.x(), lt.x(), backend=backend, **kw))
    assert ours[0].dtype == (F64 if dtype == F64 else F32) and tuple(ours[0].shape) == tshape
    x64 = lx.x64().detach()
    nan_rows = torch.isnan(x64).any(-1)
    assert torch.isnan(ref[0].detach()[nan_rows]).all(), "oracle: a NaN logit gives NaN log-probs"
    scale = row_scale(x64, T)
    compare(ours[0], ref[0], eager[0], dtype, "logprobs", scale[..., None].expand(tshape) if K else scale)
    compare(ours[1], ref[1], eager[1], dtype, "entropy", scale if ent else None)
    gs = [upstream(tshape, gen), upstream(lead, gen) if ent else None]
    gr, = _grads(ref, [lx._b64], gs)
    ge, = _grads(eager, [lx._bdt], gs)
    go, = _grads(ours, [lx.base], gs)
    compare(go, gr, ge, dtype, "d logits")


# ---------------------------------------------------------------------------- kl_penalty ---

@pytest.mark.parametrize("backend", FUSED)
@EXAMPLES(20)
@given(data=st.data())
def test_kl_penalty(backend, data):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    lead, V = _lead(data), data.draw(VOCAB, label="V")
    dtype = data.draw(st.sampled_from([F64, F32, F16, BF16]), label="dtype")
    special = data.draw(SPECIALS, label="special")
    T = data.draw(st.sampled_from([1.0, 1.0, 0.7]), label="temperature")
    est = data.draw(st.sampled_from(["k1", "k2", "k3"]), label="estimator")
    beta = data.draw(st.sampled_from([0.0, 0.02, 1.5]), label="beta")
    near = data.draw(st.booleans(), label="ref near policy")
    pol = values(lead + (V,), gen, special, scale=data.draw(st.sampled_from([1.0, 30.0])))
    refv = pol + values(lead + (V,), gen) * (1e-3 if near else 1.0)
    lx = Laid(pol, data.draw(LAYOUTS, label="logits layout"), dtype, grad=True)
    lr = Laid(refv, data.draw(LAYOUTS, label="ref layout"), dtype)
    lt = index_tensor(torch.randint(0, V, lead, generator=gen), data.draw(LAYOUTS, label="tokens layout"))
    mkind = data.draw(st.sampled_from([None, "bool", "float", "int"]), label="mask")
    mask = None
    if mkind:
        m = torch.rand(lead, generator=gen)
        mask = {"bool": m < 0.7, "float": m, "int": (m < 0.7).long()}[mkind].to(DEVICE)
    kw = dict(beta=beta, estimator=est, mask=mask, temperature=T)
    ref = reference.kl_penalty(lx.x64(), lr.x64(), lt.x(), **kw)
    eager = reference.kl_penalty(lx.xdt(), lr.xdt(), lt.x(), **kw)
    ours = ro.kl_penalty(lx.x(), lr.x(), lt.x(), backend=backend, **kw)
    acc = F64 if dtype == F64 else F32
    x64, r64 = lx.x64().detach(), lr.x64().detach()
    scale = row_scale(x64, T) + row_scale(r64, T)
    for f in ref._fields:
        o = getattr(ours, f)
        assert o.dtype == acc and o.shape == lead, (f, o.dtype, o.shape)
        compare(o, getattr(ref, f), getattr(eager, f), dtype, f, scale)
    assert torch.isnan(ref.logprobs.detach()[torch.isnan(x64).any(-1)]).all()
    diff = ["logprobs", "log_ratio", "kl", "entropy"]
    gs = [upstream(lead, gen) for _ in diff]
    gr, = _grads([getattr(ref, f) for f in diff], [lx._b64], gs)
    ge, = _grads([getattr(eager, f) for f in diff], [lx._bdt], gs)
    go, = _grads([getattr(ours, f) for f in diff], [lx.base], gs)
    compare(go, gr, ge, dtype, "d logits")


# ------------------------------------------------------------------ linear_cross_entropy ---

def _linear_inputs(data, gen, dtype, lead, V):
    d = data.draw(st.sampled_from([1, 8, 17]), label="d")
    special = data.draw(st.sampled_from(["none", "none", "big", "nan"]), label="hidden special")
    lh = Laid(values(lead + (d,), gen, special, scale=0.5), data.draw(LAYOUTS, label="hidden layout"),
              dtype, grad=True)
    # not "expanded": V identical weight rows make every logit equal, and the exact gradients
    # w.r.t. hidden and weight cancel to 0, which no relative error can judge
    lw = Laid(values((V, d), gen), data.draw(LAYOUTS.filter(lambda k: k != "expanded"), label="weight layout"),
              dtype, grad=True)
    lb = None
    if data.draw(st.booleans(), label="bias"):
        # −inf bias entries mask vocabulary entries (a realistic use of −inf in a linear head)
        lb = Laid(values((V,), gen, data.draw(st.sampled_from(["none", "neginf"]), label="bias special")),
                  "contiguous", dtype, grad=True)
    return lh, lw, lb


@pytest.mark.parametrize("backend", FUSED)
@EXAMPLES(15)
@given(data=st.data())
def test_linear_cross_entropy(backend, data):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    lead, V = _lead(data), data.draw(VOCAB, label="V")
    dtype = data.draw(st.sampled_from([F64, F32, F16, BF16]), label="dtype")
    lh, lw, lb = _linear_inputs(data, gen, dtype, lead, V)
    reduction = data.draw(st.sampled_from(["mean", "sum", "none"]), label="reduction")
    ls = data.draw(st.sampled_from([0.0, 0.0, 0.2]), label="label_smoothing")
    t = torch.randint(0, V, lead, generator=gen)
    t = torch.where(torch.rand(lead, generator=gen) < 0.3, torch.full_like(t, -100), t)
    lt = index_tensor(t, data.draw(LAYOUTS, label="target layout"))
    kw = dict(reduction=reduction, label_smoothing=ls)
    b = (lambda f: None if lb is None else f(lb))
    ref = reference.linear_cross_entropy(lh.x64(), lw.x64(), lt.x(), b(Laid.x64), **kw)
    eager = reference.linear_cross_entropy(lh.xdt(), lw.xdt(), lt.x(), b(Laid.xdt), **kw)
    ours = ro.linear_cross_entropy(lh.x(), lw.x(), lt.x(), bias=b(Laid.x), backend=backend, **kw)
    assert ours.dtype == (F64 if dtype == F64 else F32)
    compare(ours, ref, eager, dtype, "loss", rounded_in=dtype)
    g = upstream(ref.shape, gen)
    leaves = lambda attr: [getattr(lh, attr), getattr(lw, attr)] + ([getattr(lb, attr)] if lb else [])
    gr = _grads([ref], leaves("_b64"), [g])
    ge = _grads([eager], leaves("_bdt"), [g])
    go = _grads([ours], leaves("base"), [g])
    for name, o, r, e in zip(["d hidden", "d weight", "d bias"], go, gr, ge):
        compare(o, r, e, dtype, name, rounded_in=dtype)


# ------------------------------------------------------------------ linear_token_logprobs ---

@pytest.mark.parametrize("backend", FUSED)
@EXAMPLES(15)
@given(data=st.data())
def test_linear_token_logprobs(backend, data):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    lead, V = _lead(data), data.draw(VOCAB, label="V")
    dtype = data.draw(st.sampled_from([F64, F32, F16, BF16]), label="dtype")
    lh, lw, lb = _linear_inputs(data, gen, dtype, lead, V)
    T = data.draw(st.sampled_from([1.0, 0.7]), label="temperature")
    K = data.draw(st.sampled_from([None, None, 1, 3]), label="K")
    ent = data.draw(st.booleans(), label="return_entropy")
    tshape = lead + ((K,) if K else ())
    lt = index_tensor(torch.randint(0, V, tshape, generator=gen), data.draw(LAYOUTS, label="tokens layout"))
    kw = dict(temperature=T, return_entropy=ent)
    as_tuple = (lambda o: tuple(o) if ent else (o, None))
    b = (lambda f: None if lb is None else f(lb))
    ref = as_tuple(reference.linear_token_logprobs(lh.x64(), lw.x64(), lt.x(), b(Laid.x64), **kw))
    eager = as_tuple(reference.linear_token_logprobs(lh.xdt(), lw.xdt(), lt.x(), b(Laid.xdt), **kw))
    ours = as_tuple(ro.linear_token_logprobs(lh.x(), lw.x(), lt.x(), bias=b(Laid.x), backend=backend, **kw))
    assert tuple(ours[0].shape) == tshape and ours[0].dtype == (F64 if dtype == F64 else F32)
    compare(ours[0], ref[0], eager[0], dtype, "logprobs", rounded_in=dtype)
    compare(ours[1], ref[1], eager[1], dtype, "entropy", rounded_in=dtype)
    gs = [upstream(tshape, gen), upstream(lead, gen) if ent else None]
    leaves = lambda attr: [getattr(lh, attr), getattr(lw, attr)] + ([getattr(lb, attr)] if lb else [])
    gr, ge, go = _grads(ref, leaves("_b64"), gs), _grads(eager, leaves("_bdt"), gs), _grads(ours, leaves("base"), gs)
    for name, o, r, e in zip(["d hidden", "d weight", "d bias"], go, gr, ge):
        compare(o, r, e, dtype, name, rounded_in=dtype)


# ------------------------------------------------------------------------------ attention ---

HEADS = st.sampled_from([(1, 1), (2, 1), (2, 2), (4, 2)])
# lengths around the interpreter's 16-wide blocks: S − T ≡ 0, 1, 15 (mod 16) all occur
SEQ = st.sampled_from([0, 1, 2, 5, 15, 16, 17, 18, 33])
ATT_LAYOUTS = st.sampled_from(["contiguous", "contiguous", "swap12", "padded", "strided", "expanded"])


def _attn_options(data):
    causal = data.draw(st.booleans(), label="causal")
    window = data.draw(st.sampled_from([None, None, (-1, 0), (3, -1), (0, 4), (1, 1)]), label="window")
    softcap = data.draw(st.sampled_from([0.0, 0.0, 5.0]), label="softcap")
    scale = data.draw(st.sampled_from([None, 0.3]), label="scale")
    return dict(causal=causal, window=window, softcap=softcap, scale=scale)


def _attn_values(data, gen, shape, specials):
    special = data.draw(st.sampled_from(["none", "none", "big", "nan", "neginf"]), label="special")
    specials.append(special)
    return values(shape, gen, special, scale=data.draw(st.sampled_from([1.0, 4.0])), p=0.05)


def _assume_no_known_attention_bug(specials, opts, masked):
    """Keep the draws off the bugs pinned at the end of the file (until they are fixed)."""
    q_s, k_s, v_s = specials
    # test_attention_all_scores_neginf
    assume("neginf" not in (q_s, k_s))
    # test_attention_nonfinite_masked_key_backward: with a mask, a NaN/−inf reaches masked
    # positions of the backward as 0·NaN
    assume(not (masked and {q_s, k_s, v_s} & {"nan", "neginf"}))


def _attn_floor(q64, k64, v64, g, scale, dtype):
    """Absolute error floor of the flash-style backward: it forms delta_i = Σ_d dO_id·O_id from
    the output rounded to ``dtype``, so dS carries eps·|dO|·|v| even where the exact dS is 0
    (one visible key, a saturated softmax: dq and dk cancel to 0 there and no relative error
    can judge them). Returns the floors of ‖dq − ref‖ and ‖dk − ref‖."""
    eps = torch.finfo(dtype).eps

    def amax(t):
        t = torch.where(torch.isfinite(t), t.abs(), torch.zeros((), dtype=F64, device=t.device))
        return float(t.max()) if t.numel() else 0.0
    a = eps * scale * float(g.norm()) * amax(v64) * 8
    return a * amax(k64), a * amax(q64) * math.sqrt(q64.shape[1] // max(k64.shape[1], 1))


@pytest.mark.parametrize("backend", FUSED)
@EXAMPLES(10)
@given(data=st.data())
def test_attention(backend, data):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    B = data.draw(st.sampled_from([1, 2]), label="B")
    (Hq, Hkv), T, S = data.draw(HEADS, label="heads"), data.draw(SEQ, label="T"), data.draw(SEQ, label="S")
    D = data.draw(st.sampled_from([16, 32]), label="D")
    dtype = data.draw(st.sampled_from(DOT_DTYPES if backend == "triton" else [F16, BF16, F32, F64]),
                      label="dtype")
    opts = _attn_options(data)
    if backend == "cuda":
        assume(dtype in (F16, BF16) and opts["window"] is None and opts["softcap"] == 0)
        D = 64
    sp = []
    lq = Laid(_attn_values(data, gen, (B, Hq, T, D), sp), data.draw(ATT_LAYOUTS, label="q layout"), dtype, grad=True)
    lk = Laid(_attn_values(data, gen, (B, Hkv, S, D), sp), data.draw(ATT_LAYOUTS, label="k layout"), dtype, grad=True)
    lv = Laid(_attn_values(data, gen, (B, Hkv, S, D), sp), data.draw(ATT_LAYOUTS, label="v layout"), dtype, grad=True)
    _assume_no_known_attention_bug(sp, opts, opts["causal"] or opts["window"] is not None)
    ref = reference.attention(lq.x64(), lk.x64(), lv.x64(), **opts)
    eager = reference.attention(lq.xdt(), lk.xdt(), lv.xdt(), **opts)
    ours = ro.attention(lq.x(), lk.x(), lv.x(), backend=backend, **opts)
    assert ours.dtype == dtype and ours.shape == (B, Hq, T, D)
    compare(ours, ref, eager, dtype, "out")
    g = upstream(ref.shape, gen)
    gr = _grads([ref], [lq._b64, lk._b64, lv._b64], [g])
    ge = _grads([eager], [lq._bdt, lk._bdt, lv._bdt], [g])
    go = _grads([ours], [lq.base, lk.base, lv.base], [g])
    floor = _attn_floor(lq.x64().detach(), lk.x64().detach(), lv.x64().detach(), g,
                        opts["scale"] or 1 / math.sqrt(D), dtype)
    for name, o, r, e, f in zip(["dq", "dk", "dv"], go, gr, ge, floor + (0.0,)):
        compare(o, r, e, dtype, name, abs_floor=f)


@pytest.mark.parametrize("backend", FUSED)
@EXAMPLES(8)
@given(data=st.data())
def test_attention_varlen(backend, data):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    n = data.draw(st.sampled_from([0, 1, 2, 3]), label="n")
    lens_q = [data.draw(SEQ, label="len q") for _ in range(n)]
    lens_k = [data.draw(SEQ, label="len k") for _ in range(n)]
    (Hq, Hkv), D = data.draw(HEADS, label="heads"), data.draw(st.sampled_from([16, 32]), label="D")
    dtype = data.draw(st.sampled_from(DOT_DTYPES if backend == "triton" else [F16, BF16]), label="dtype")
    opts = _attn_options(data)
    if backend == "cuda":
        assume(opts["window"] is None and opts["softcap"] == 0)
        D = 64
    extra = data.draw(st.sampled_from([0, 0, 3]), label="max_seqlen slack")
    mq, mk = max(lens_q, default=0) + extra, max(lens_k, default=0) + extra

    def cu(lens):
        return torch.tensor([0] + list(torch.tensor(lens, dtype=torch.long).cumsum(0).tolist()) if lens else [0],
                            dtype=torch.int32, device=DEVICE)
    Nq, Nk = sum(lens_q), sum(lens_k)
    sp = []
    lq = Laid(_attn_values(data, gen, (Nq, Hq, D), sp), data.draw(ATT_LAYOUTS, label="q layout"), dtype, grad=True)
    lk = Laid(_attn_values(data, gen, (Nk, Hkv, D), sp), data.draw(ATT_LAYOUTS, label="k layout"), dtype, grad=True)
    lv = Laid(_attn_values(data, gen, (Nk, Hkv, D), sp), data.draw(ATT_LAYOUTS, label="v layout"), dtype, grad=True)
    args = (cu(lens_q), cu(lens_k), mq, mk)
    _assume_no_known_attention_bug(sp, opts, n > 1 or opts["causal"] or opts["window"] is not None)
    ref = reference.attention_varlen(lq.x64(), lk.x64(), lv.x64(), *args, **opts)
    eager = reference.attention_varlen(lq.xdt(), lk.xdt(), lv.xdt(), *args, **opts)
    ours = ro.attention_varlen(lq.x(), lk.x(), lv.x(), *args, backend=backend, **opts)
    assert ours.dtype == dtype and ours.shape == (Nq, Hq, D)
    compare(ours, ref, eager, dtype, "out")
    g = upstream(ref.shape, gen)
    gr = _grads([ref], [lq._b64, lk._b64, lv._b64], [g])
    ge = _grads([eager], [lq._bdt, lk._bdt, lv._bdt], [g])
    go = _grads([ours], [lq.base, lk.base, lv.base], [g])
    floor = _attn_floor(lq.x64().detach()[None].transpose(1, 2), lk.x64().detach()[None].transpose(1, 2),
                        lv.x64().detach(), g, opts["scale"] or 1 / math.sqrt(D), dtype)
    for name, o, r, e, f in zip(["dq", "dk", "dv"], go, gr, ge, floor + (0.0,)):
        compare(o, r, e, dtype, name, abs_floor=f)


# ------------------------------------------------------------------- pairwise_reward_loss ---

@pytest.mark.parametrize("backend", FUSED)
@EXAMPLES(20)
@given(data=st.data())
def test_pairwise_reward_loss(backend, data):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    B = data.draw(ROWS, label="B")
    # K: the single-tile path up to 64, tiled above (32-wide tiles)
    K = data.draw(st.sampled_from([1, 2, 3, 4, 9, 16, 17, 33, 64, 65, 97]), label="K")
    dtype = data.draw(st.sampled_from([F64, F32, F16, BF16]), label="dtype")
    special = data.draw(st.sampled_from(["none", "none", "big", "nan", "neginf", "mixed"]), label="special")
    reduction = data.draw(st.sampled_from(["mean", "sum", "none"]), label="reduction")
    margin = data.draw(st.sampled_from([0.0, 0.0, 0.5, -2.0, "tensor"]), label="margin")
    if margin == "tensor":            # one margin per prompt (no gradient to it)
        margin = (torch.rand(B, generator=gen, dtype=F64) * 3 - 1).to(DEVICE)
    lr = Laid(values((B, K), gen, special, scale=data.draw(st.sampled_from([1.0, 20.0]))),
              data.draw(LAYOUTS, label="rewards layout"), dtype, grad=True)
    n_ranks = data.draw(st.sampled_from([1, 2, 3, K]), label="distinct ranks")
    ranks = torch.randint(0, n_ranks, (B, K), generator=gen)
    p_absent = data.draw(st.sampled_from([0.0, 0.3, 1.0]), label="p_absent")
    ranks = torch.where(torch.rand(B, K, generator=gen) < p_absent, torch.full_like(ranks, -1), ranks)
    lk = index_tensor(ranks, data.draw(LAYOUTS, label="ranks layout"))
    mdt = (lambda dt: margin.to(F64 if dt == F64 else F32) if isinstance(margin, torch.Tensor) else margin)
    ref = reference.pairwise_reward_loss(lr.x64(), lk.x(), reduction, mdt(F64))
    eager = reference.pairwise_reward_loss(lr.xdt(), lk.x(), reduction, mdt(dtype))
    ours = ro.pairwise_reward_loss(lr.x(), lk.x(), reduction=reduction, margin=mdt(dtype), backend=backend)
    assert ours.dtype == (F64 if dtype == F64 else F32)
    if reduction == "none":
        r64, k = lr.x64().detach(), lk.x().to(DEVICE)
        present = k >= 0
        has_pair = ((k[:, :, None] < k[:, None, :]) & present[:, :, None] & present[:, None, :]).flatten(1).any(1)
        nan_in = (torch.isnan(r64) & present).any(1) & has_pair
        assert torch.isnan(ref.detach()[nan_in]).all(), "oracle: a NaN reward in a pair gives NaN"
        assert (ref.detach()[~has_pair] == 0).all(), "oracle: a prompt without a pair has loss 0"
    compare(ours, ref, eager, dtype, "loss", row_scale(lr.x64().detach()) if reduction == "none" else None)
    g = upstream(ref.shape, gen)
    gr, = _grads([ref], [lr._b64], [g])
    ge, = _grads([eager], [lr._bdt], [g])
    go, = _grads([ours], [lr.base], [g])
    compare(go, gr, ge, dtype, "d rewards")


# ---------------------------------------------- ops without a backend (plain torch ops) ---

@EXAMPLES(30)
@given(data=st.data())
def test_reward_at_last_token(data):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    N, T, d = data.draw(ROWS, label="N"), data.draw(st.sampled_from([1, 2, 7]), label="T"), \
        data.draw(st.sampled_from([1, 4, 9]), label="d")
    assume(T > 0 or N == 0)
    dtype = data.draw(st.sampled_from([F64, F32, F16, BF16]), label="dtype")
    lh = Laid(values((N, T, d), gen, data.draw(SPECIALS, label="special")), data.draw(LAYOUTS, label="hidden layout"),
              dtype, grad=True)
    wshape = data.draw(st.sampled_from([(d,), (1, d)]), label="weight shape")
    lw = Laid(values(wshape, gen), "contiguous", dtype, grad=True)
    lb = Laid(values((1,), gen), "contiguous", dtype, grad=True) if data.draw(st.booleans(), label="bias") else None
    idx_shape = data.draw(st.sampled_from([(N,), (1, N)]), label="index shape")
    li = index_tensor(torch.randint(0, T, idx_shape, generator=gen), data.draw(LAYOUTS, label="index layout"))

    def formula(h, w, b):          # the definition, written out: h[n, idx[n]] · w + b
        i = li.x().reshape(N)
        r = (h[torch.arange(N, device=h.device), i] * w.reshape(1, d)).sum(-1)
        return (r if b is None else r + b.reshape(())).reshape(idx_shape)

    ref = formula(lh.x64(), lw.x64(), lb.x64() if lb else None)
    eager = formula(lh.xdt(), lw.xdt(), lb.xdt() if lb else None)
    ours = ro.reward_at_last_token(lh.x(), li.x(), lw.x(), lb.x() if lb else None)
    assert ours.dtype == dtype and tuple(ours.shape) == idx_shape
    compare(ours, ref, eager, dtype, "rewards")
    g = upstream(ref.shape, gen)
    leaves = lambda attr: [getattr(lh, attr), getattr(lw, attr)] + ([getattr(lb, attr)] if lb else [])
    for name, o, r, e in zip(["d hidden", "d weight", "d bias"], _grads([ours], leaves("base"), [g]),
                             _grads([ref], leaves("_b64"), [g]), _grads([eager], leaves("_bdt"), [g])):
        compare(o, r, e, dtype, name)


def _eager_kl(lp, rlp, est):
    """What a user writes in the working dtype (fp32 for ≤ fp32 inputs)."""
    d = lp - rlp
    return {"k1": d, "k2": 0.5 * d * d, "k3": torch.expm1(-d) + d}[est]


@EXAMPLES(30)
@given(data=st.data())
def test_kl_from_logprobs(data):
    """No kernel (torch ops): judged against the long-double oracle of test_kl_oracle, and
    against what a user writes in the working dtype (d = lp − rlp, expm1(−d) + d)."""
    from test_kl_oracle import _ld, oracle_kl
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    shape = _lead(data)
    dtype = data.draw(st.sampled_from([F64, F32, F16, BF16]), label="dtype")
    est = data.draw(st.sampled_from(["k1", "k2", "k3"]), label="estimator")
    beta = data.draw(st.sampled_from([0.0, 0.05, 2.0]), label="beta")
    spread = data.draw(st.sampled_from([1e-3, 1.0]), label="|log ratio| scale")
    special = data.draw(st.sampled_from(["none", "none", "neginf", "nan"]), label="special")
    lp = -values(shape, gen).abs() * 3
    rlp = lp + values(shape, gen) * spread
    if special != "none":
        lp = torch.where(torch.rand(shape, generator=gen) < 0.1,
                         torch.tensor(-math.inf if special == "neginf" else math.nan, dtype=F64), lp)
    ll = Laid(lp, data.draw(LAYOUTS, label="logprobs layout"), dtype, grad=True)
    lr = Laid(rlp, data.draw(LAYOUTS, label="ref layout"), dtype)
    mask = (torch.rand(shape, generator=gen) < 0.6).to(DEVICE) if data.draw(st.booleans(), label="mask") else None
    out = ro.kl_from_logprobs(ll.x(), lr.x(), beta=beta, estimator=est, mask=mask)
    acc = F64 if dtype == F64 else F32
    assert out.entropy is None and all(getattr(out, f).dtype == acc for f in out._fields[:5])
    d = _ld(ll.x()) - _ld(lr.x())
    want = torch.from_numpy(oracle_kl(d, est).astype("float64")).to(DEVICE)
    eager = _eager_kl(ll.xdt().to(acc), lr.xdt().to(acc), est)
    d64 = (ll.x64() - lr.x64()).detach()
    A = ll.x64().detach().abs() + lr.x64().detach().abs()
    scale = A * {"k1": torch.ones_like(d64), "k2": d64.abs(), "k3": torch.expm1(-d64).abs()}[est]
    compare(out.kl, want, eager, dtype, "kl", row_scale=scale)
    m64 = 1.0 if mask is None else mask.to(F64)
    compare(out.penalty, -beta * want * m64, -beta * eager * (1.0 if mask is None else mask.to(acc)),
            dtype, "penalty")
    g = upstream(shape, gen)
    go, = _grads([out.kl], [ll.base], [g])
    gr, = _grads([_eager_kl(ll.x64(), lr.x64(), est)], [ll._b64], [g])
    ge, = _grads([eager], [ll._bdt], [g])
    compare(go, gr, ge, dtype, "d logprobs")


@EXAMPLES(30)
@given(data=st.data())
def test_ppo_rewards(data):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    lead, T = _lead(data), data.draw(st.sampled_from([0, 1, 2, 5]), label="T")
    dtype = data.draw(st.sampled_from([F64, F32, F16, BF16]), label="dtype")
    lp = Laid(values(lead + (T,), gen, data.draw(SPECIALS, label="special")), data.draw(LAYOUTS, label="penalty layout"),
              dtype, grad=True)
    ls = Laid(values(lead, gen), "contiguous", dtype, grad=True)
    pattern = data.draw(st.sampled_from(["right", "left", "holes", "none", "all"]), label="mask pattern")
    pos = torch.arange(T)
    L = torch.randint(0, T + 1, lead, generator=gen)[..., None]
    m = {"right": pos < L, "left": pos >= T - L, "holes": torch.rand(lead + (T,), generator=gen) < 0.5,
         "none": torch.zeros(lead + (T,), dtype=torch.bool), "all": torch.ones(lead + (T,), dtype=torch.bool)}[pattern]
    mdt = data.draw(st.sampled_from([torch.bool, torch.int64, F32]), label="mask dtype")
    mask = m.to(mdt).to(DEVICE)

    def formula(p, s):           # p + s at each row's last set position (none: no score)
        out = p.clone()
        for idx in torch.cartesian_prod(*[torch.arange(n) for n in lead]).reshape(-1, len(lead)).tolist() \
                if all(lead) else []:
            where = m[tuple(idx)].nonzero()
            if len(where):
                out[tuple(idx) + (int(where[-1]),)] += s[tuple(idx)]
        return out

    ours = ro.ppo_rewards(lp.x(), ls.x(), mask)
    ref = formula(lp.x64(), ls.x64())
    eager = formula(lp.xdt(), ls.xdt())
    assert ours.dtype == dtype
    compare(ours, ref, eager, dtype, "rewards")
    g = upstream(ref.shape, gen)
    for name, o, r, e in zip(["d penalty", "d scores"], _grads([ours], [lp.base, ls.base], [g]),
                             _grads([ref], [lp._b64, ls._b64], [g]), _grads([eager], [lp._bdt, ls._bdt], [g])):
        compare(o, r, e, dtype, name)


# ------------------------------------------------------------------------------ unpad / pad ---

@EXAMPLES(30)
@given(data=st.data())
def test_unpad_pad_roundtrip(data):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    B, T = data.draw(st.sampled_from([0, 1, 2, 5]), label="B"), data.draw(st.sampled_from([0, 1, 3, 8]), label="T")
    rest = data.draw(st.sampled_from([(), (3,), (2, 4)]), label="trailing dims")
    dtype = data.draw(st.sampled_from([F64, F32, F16, BF16]), label="dtype")
    lx = Laid(values((B, T) + rest, gen, data.draw(SPECIALS, label="special")),
              data.draw(LAYOUTS, label="x layout"), dtype, grad=True)
    pattern = data.draw(st.sampled_from(["right", "left", "holes", "none", "all"]), label="mask pattern")
    pos = torch.arange(T)
    L = torch.randint(0, T + 1, (B, 1), generator=gen)
    m = {"right": pos < L, "left": pos >= T - L, "holes": torch.rand(B, T, generator=gen) < 0.5,
         "none": torch.zeros(B, T, dtype=torch.bool), "all": torch.ones(B, T, dtype=torch.bool)}[pattern]
    mask = m.to(data.draw(st.sampled_from([torch.bool, torch.int64, torch.int32]), label="mask dtype")).to(DEVICE)
    x = lx.x()
    packed, indices, cu, max_len = ro.unpad(x, mask)
    # the definition: real tokens of row 0, then row 1, ..., in order
    flat = x.detach().reshape((B * T,) + rest)
    want_idx = m.reshape(-1).nonzero().reshape(-1).to(DEVICE)
    lens = m.sum(-1)
    assert torch.equal(indices, want_idx) and indices.dtype == torch.int64
    assert cu.dtype == torch.int32 and cu.tolist() == [0] + lens.cumsum(0).tolist()
    assert max_len == (int(lens.max()) if B else 0) and isinstance(max_len, int)
    assert torch.allclose(packed.detach(), flat[want_idx], equal_nan=True, rtol=0, atol=0)
    back = ro.pad(packed, indices, B, T)
    expect = torch.where(m.to(DEVICE).reshape((B, T) + (1,) * len(rest)), x.detach(), torch.zeros((), dtype=dtype))
    assert back.dtype == dtype and torch.allclose(back.detach(), expect, equal_nan=True, rtol=0, atol=0)
    # gradients: unpad is a gather, pad a scatter: d x = the upstream gradient at real tokens, 0 elsewhere
    g = upstream(back.shape, gen).to(dtype)
    gx, = torch.autograd.grad(back, lx.base, g, allow_unused=True)
    x_leaf = lx.base.detach().clone().requires_grad_()
    e = torch.where(m.to(DEVICE).reshape((B, T) + (1,) * len(rest)), lx.view(x_leaf), torch.zeros((), dtype=dtype))
    ge, = torch.autograd.grad(e, x_leaf, g, allow_unused=True)
    if gx is None or ge is None:
        assert (gx is None or not gx.any()) and (ge is None or not ge.any())
    else:
        assert torch.equal(gx, ge), "d x of pad(unpad(x)) is the upstream gradient at the real tokens"


# ------------------------------------------------------------- rounding of low-precision outputs ---

@pytest.mark.parametrize("dtype", [BF16, F16])
@pytest.mark.parametrize("op", ["cross_entropy", "token_logprobs", "kl_penalty"])
@pytest.mark.parametrize("backend", FUSED)
def test_low_precision_gradient_rounding(backend, op, dtype):
    """The gradients written in bf16/fp16 are rounded like eager's (to nearest even): over 64k
    elements the rounding noise averages out, so the bar is eager's error ×1.05 + 1e-4 — a kernel
    that truncates (error ≈ 2× eager's) fails it, where the property tests' per-dtype tolerance
    (sized for a few elements) would not."""
    g = torch.Generator().manual_seed(3)
    x64 = torch.randn(64, 1000, generator=g, dtype=F64) * 3
    t = torch.randint(0, 1000, (64,), generator=g).to(DEVICE)
    r = (x64 + torch.randn(64, 1000, generator=g, dtype=F64)).to(dtype).to(DEVICE)
    up = torch.randn(64, generator=g, dtype=F64).to(DEVICE)
    run = {"cross_entropy": lambda x, be: ro.cross_entropy(x, t, reduction="none", backend=be),
           "token_logprobs": lambda x, be: ro.token_logprobs(x, t, backend=be),
           "kl_penalty": lambda x, be: ro.kl_penalty(x, r.to(x.dtype), t, beta=0.1, estimator="k3", backend=be).kl}[op]
    grads = {}
    for be, xd in ((backend, dtype), ("reference", dtype), ("reference", F64)):
        x = x64.to(dtype).to(xd).to(DEVICE).requires_grad_()
        out = run(x, be)
        grads[(be, xd)], = torch.autograd.grad(out, x, up.to(out.dtype))
    ref = grads[("reference", F64)]
    ours, eager = rel_err(grads[(backend, dtype)], ref), rel_err(grads[("reference", dtype)], ref)
    assert ours <= eager * 1.05 + 1e-4, f"{op} d logits in {dtype}: error {ours:.3e}, eager's {eager:.3e}"


# ------------------------------------------------- bugs found, pinned until fixed (reported) ---

def _fused_only(backend):
    if backend_problem(backend):
        pytest.skip(backend_problem(backend))


@pytest.mark.parametrize("backend", ["triton", "cuda"])
# found by test_cross_entropy: inplace_backward=True on expanded logits wrote every row's gradient
# into the one shared row (error 0.53); such logits are now refused with a clear error
def test_ce_inplace_backward_expanded_logits(backend):
    _fused_only(backend)
    base = torch.tensor([[[0.3, -1.2]]], dtype=F64, device=DEVICE, requires_grad=True)
    t = torch.tensor([[0], [1]], device=DEVICE)
    with pytest.raises(ValueError, match="inplace_backward=True needs logits whose rows do not overlap"):
        ro.cross_entropy(base.expand(2, 1, 2), t, reduction="sum", backend=backend, inplace_backward=True)
    g, = torch.autograd.grad(ro.cross_entropy(base.expand(2, 1, 2).contiguous(), t, reduction="sum",
                                              backend=backend, inplace_backward=True), base)
    b64 = base.detach().clone().requires_grad_()
    want, = torch.autograd.grad(reference.cross_entropy(b64.expand(2, 1, 2), t, reduction="sum"), b64)
    assert_matches(g, want, tol=1e-12, what="d logits")


@pytest.mark.parametrize("backend", ["triton"])
# found by test_attention (T = S = 1, softcap 5, −inf in k: NaN dk/dv on triton); fixed in 5d17081
def test_attention_softcap_infinite_score_backward(backend):
    _fused_only(backend)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 1, 16, generator=g, dtype=F64)
    k = torch.randn(1, 1, 1, 16, generator=g, dtype=F64)
    v = torch.randn(1, 1, 1, 16, generator=g, dtype=F64)
    q[..., 2], k[..., 5] = 1e4, -math.inf
    outs = []
    for be in (backend, "reference"):
        leaves = [x.clone().to(DEVICE).requires_grad_() for x in (q, k, v)]
        o = ro.attention(*leaves, causal=False, softcap=5.0, backend=be)
        outs.append(torch.autograd.grad(o, leaves, torch.ones_like(o))[2])
    assert torch.isfinite(outs[1]).all()
    assert_matches(outs[0], outs[1], tol=1e-12, what="dv")


@pytest.mark.parametrize("backend", ["reference", "triton"])
# found by test_attention_varlen (a NaN in v reached rows that see no key, reference and triton); fixed in 5d17081
def test_attention_nan_value_row_without_keys(backend):
    if backend != "reference":
        _fused_only(backend)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 2, 16, generator=g, dtype=F64).to(DEVICE).requires_grad_()
    k = torch.randn(1, 1, 1, 16, generator=g, dtype=F64).to(DEVICE).requires_grad_()
    v0 = torch.randn(1, 1, 1, 16, generator=g, dtype=F64)
    v0[..., 3] = math.nan
    v = v0.to(DEVICE).requires_grad_()
    o = ro.attention(q, k, v, causal=True, backend=backend)       # query 0 sees keys j ≤ 0 + 1 − 2: none
    dq, = torch.autograd.grad(o, q, torch.ones_like(o))
    assert (o[0, 0, 0] == 0).all(), f"the row without keys outputs {o[0, 0, 0]}"
    assert (dq[0, 0, 0] == 0).all(), f"the row without keys gets dq {dq[0, 0, 0]}"


def test_rel_err_inf_sign_and_position():
    """The helper itself (tests/_util.py): +inf vs −inf, +inf vs NaN, and an error in one small
    element among large ones are all failures."""
    from _util import max_rel_err
    inf, nan = math.inf, math.nan
    ref = torch.tensor([1.0, inf, -inf, nan, 2.0])
    assert rel_err(ref.clone(), ref) == 0.0
    for bad in ([1.0, -inf, -inf, nan, 2.0], [1.0, nan, -inf, nan, 2.0], [1.0, inf, -inf, 3.0, 2.0],
                [1.0, inf, inf, nan, 2.0]):
        assert rel_err(torch.tensor(bad), ref) == inf, bad
        assert max_rel_err(torch.tensor(bad), ref) == inf, bad
    big = torch.tensor([1e6, 1e6, 1e-3])
    off = torch.tensor([1e6, 1e6, 2e-3])
    assert rel_err(off, big) < 1e-9 and max_rel_err(off, big) == 1.0


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.xfail(strict=True, reason="BUG (owner: attention; reference.py _softmax_attend and the triton backward): "
                   "a NaN (or ±inf) in a key that a query row cannot see (causal mask, window, another varlen "
                   "sequence) reaches that row's dq as 0·NaN: the forward is right (only rows that see the key "
                   "are NaN), but the reference's dq is NaN on every row and the triton dq on the rows that share "
                   "a block with the key (4 of 20 here). Found by test_attention_varlen (fp64, two sequences, "
                   "NaN in the other sequence's key)")
def test_attention_nonfinite_masked_key_backward(backend):
    if backend != "reference":
        _fused_only(backend)
    g = torch.Generator().manual_seed(0)
    T = 20
    q = torch.randn(1, 1, T, 16, generator=g, dtype=F64).to(DEVICE).requires_grad_()
    k0 = torch.randn(1, 1, T, 16, generator=g, dtype=F64)
    k0[0, 0, T - 1, 4] = math.nan                    # seen by the last query only
    k = k0.to(DEVICE).requires_grad_()
    v = torch.randn(1, 1, T, 16, generator=g, dtype=F64).to(DEVICE).requires_grad_()
    o = ro.attention(q, k, v, causal=True, backend=backend)
    assert torch.isfinite(o[0, 0, :-1]).all() and torch.isnan(o[0, 0, -1]).any()
    dq, = torch.autograd.grad(o[0, 0, :-1].sum(), q)     # rows that never see the NaN key
    assert torch.isfinite(dq).all(), f"dq rows with NaN: {dq.isnan().any(-1).sum().item()}"


@pytest.mark.parametrize("backend", ["triton"])
@pytest.mark.xfail(strict=True, reason="BUG/undefined (owner: attention): a query row whose every visible score is "
                   "−inf (a −inf in q or k; here S = 1) outputs NaN in the reference (softmax of −inf) but 0 on the "
                   "triton kernel (treated as a row that sees no key); DESIGN defines 0 only for rows the mask "
                   "leaves without keys. Found by test_attention (fp16, T = 33, S = 1, −inf in q) and "
                   "test_attention_varlen (fp64, −inf in k). Pick one and document it")
def test_attention_all_scores_neginf(backend):
    _fused_only(backend)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 3, 16, generator=g, dtype=F64)
    k = torch.randn(1, 1, 1, 16, generator=g, dtype=F64).abs()
    v = torch.randn(1, 1, 1, 16, generator=g, dtype=F64)
    q[..., 0, :] = -q[..., 0, :].abs()
    q[..., 0, 3] = -math.inf                          # row 0: its one score is −inf
    out = ro.attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), causal=False, backend=backend)
    ref = reference.attention(q, k, v, causal=False)
    assert_matches(out, ref.to(DEVICE), tol=1e-12, what="out")
