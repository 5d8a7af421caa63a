"""rlhf_ops.linear_token_logprobs on every backend against token_logprobs(F.linear(...)) and a
direct entropy formula in float64.

The fused backends compute the logits one block at a time (row chunks forward, vocabulary slices
backward); the tests shrink the blocks so that several chunks and slices, none of them a
multiple of the other sizes, run even at tiny shapes (the Triton kernels run under the
interpreter on CPU; the file takes about 40 s there).

Memory (meta device, 8,192 positions × V = 128,256 × d = 4,096, bf16, with the entropy): the
fused backends keep for backward hidden and the weight (the caller's) plus 20 bytes per
position (tokens, lse as two fp32, the entropy): 163,840 bytes; the eager reference keeps
13.7 GB (the bf16 logits, fp32 log-softmax, probabilities and the entropy's products).
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

import rlhf_ops as ro
from rlhf_ops import reference

from _util import assert_matches, poison_, saved_tensors

layout_mod = importlib.import_module("rlhf_ops._layout")


def _small_blocks(monkeypatch, rows, cols, V):
    """Forward row chunks of ``rows`` rows, backward vocabulary slices of ``cols`` columns (the
    op asks for rows with total = N and for columns with total = V)."""
    monkeypatch.setattr(layout_mod, "block_len",
                        lambda n_other, itemsize, total: min(total, cols if total == V else rows))


def _direct(hidden, weight, bias, tokens, temperature):
    """float64 log-probs at tokens ([...] or [..., K]) and entropy −Σ p·log p (0·log 0 = 0) of
    softmax((hidden @ weightᵀ + bias) / T), written out without reference.py."""
    y = F.linear(hidden.double(), weight.double(), None if bias is None else bias.double())
    y = y / temperature
    logp = y - torch.logsumexp(y, -1, keepdim=True)
    p = logp.exp()
    zero = torch.zeros((), dtype=p.dtype, device=p.device)
    ent = -(p * torch.where(p > 0, logp, zero)).sum(-1)
    multi = tokens.dim() == hidden.dim()
    lp = logp.gather(-1, tokens if multi else tokens[..., None])
    return (lp if multi else lp[..., 0]), ent


def _inputs(lead, d, V, device, dtype=torch.float64, with_bias=True):
    h = torch.randn(*lead, d, dtype=torch.float32, device=device).to(dtype)
    w = (torch.randn(V, d, dtype=torch.float32, device=device) * 0.7).to(dtype)
    b = (torch.randn(V, dtype=torch.float32, device=device)).to(dtype) if with_bias else None
    return h, w, b


def _grads_both(fn_out, direct_out, leaves, leaves64, pad=None):
    """Gradients of (logprobs, entropy) under random upstream gradients (zero at padded
    positions), ours and float64."""
    lp, ent = fn_out
    lp64, ent64 = direct_out
    g1, g2 = torch.randn_like(lp64), torch.randn_like(ent64)
    if pad is not None:
        g1[pad] = 0
        g2[pad] = 0
    ours = torch.autograd.grad((lp, ent), leaves, (g1.to(lp.dtype), g2.to(ent.dtype)))
    want = torch.autograd.grad((lp64, ent64), leaves64, (g1, g2))
    return ours, want


# ------------------------------------------------------------------------------ accuracy ---

@pytest.mark.parametrize("with_bias, multi", [(True, True), (False, False)])
def test_matches_token_logprobs_of_linear(backend, device, monkeypatch, with_bias, multi):
    """V = 70,001 (above 65,536, a multiple of no block), temperature 0.8, 7 rows in chunks of
    3, vocabulary slices of 20,000, tokens [..., 3] with repeats (or [...]), padded positions;
    both outputs and their gradients w.r.t. hidden, weight and bias at once."""
    V, d = 70_001, 6
    _small_blocks(monkeypatch, 3, 20_000, V)
    h, w, b = _inputs((7,), d, V, device, with_bias=with_bias)
    t = torch.randint(0, V, (7,), device=device)
    if multi:
        t = torch.stack([t, torch.randint(0, V, (7,), device=device), t], -1)
    pad = torch.zeros(7, dtype=torch.bool, device=device)
    pad[5:] = True                  # padded positions: pad id 0 and a zero upstream gradient
    t[pad] = 0
    leaves = [h.clone().requires_grad_(), w.clone().requires_grad_()]
    leaves += [b.clone().requires_grad_()] if with_bias else []
    out = ro.linear_token_logprobs(leaves[0], leaves[1], t, bias=leaves[2] if with_bias else None,
                                   temperature=0.8, return_entropy=True, backend=backend)
    leaves64 = [x.detach().clone().requires_grad_() for x in leaves]
    want = _direct(leaves64[0], leaves64[1], leaves64[2] if with_bias else None, t, 0.8)
    assert out[0].shape == t.shape and out[1].shape == (7,)
    assert out[0].dtype == out[1].dtype == torch.float64
    assert_matches(out[0], want[0], what="logprobs")
    assert_matches(out[1], want[1], what="entropy")
    # the definition: token_logprobs of the materialised logits
    tl = ro.token_logprobs(F.linear(h, w, b), t, temperature=0.8, backend="reference")
    assert_matches(out[0], tl, what="logprobs vs token_logprobs(F.linear)")
    if multi:
        assert torch.equal(out[0][:, 0], out[0][:, 2])
    ours, ref = _grads_both(out, want, leaves, leaves64, pad)
    for name, g, r in zip(("hidden", "weight", "bias"), ours, ref):
        assert g.dtype == torch.float64
        assert_matches(g, r, what=f"d {name}")
    assert (ours[0][pad] == 0).all(), "a padded position with zero upstream gradient gets none"


def test_logprobs_only_and_entropy_only(backend, device, monkeypatch):
    """return_entropy=False (the [...] form), and an entropy bonus alone (log-probs unused);
    strided hidden and weight (a weight stored transposed, as some tied embeddings are)."""
    V, d = 300, 5
    _small_blocks(monkeypatch, 4, 128, V)
    h, w, b = _inputs((2, 5), d, V, device)
    t = torch.randint(0, V, (2, 5), device=device)
    hh = h.transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    ww = w.t().contiguous().t().requires_grad_()
    assert not hh.is_contiguous() and not ww.is_contiguous()
    lp = ro.linear_token_logprobs(hh, ww, t, bias=b, temperature=1.7, backend=backend)
    assert isinstance(lp, torch.Tensor) and lp.shape == (2, 5)
    h64, w64 = h.clone().requires_grad_(), w.clone().requires_grad_()
    lp64, ent64 = _direct(h64, w64, b, t, 1.7)
    assert_matches(lp, lp64, what="logprobs")
    g = torch.randn_like(lp64)
    ours = torch.autograd.grad(lp, (hh, ww), g)
    want = torch.autograd.grad(lp64, (h64, w64), g, retain_graph=True)
    for name, a, r in zip(("hidden", "weight"), ours, want):
        assert_matches(a, r, what=f"d {name} (log-probs)")
    _, ent = ro.linear_token_logprobs(hh, ww, t, bias=b, temperature=1.7, return_entropy=True,
                                      backend=backend)
    g = torch.randn_like(ent64)
    ours = torch.autograd.grad(ent, (hh, ww), g)
    want = torch.autograd.grad(ent64, (h64, w64), g)
    for name, a, r in zip(("hidden", "weight"), ours, want):
        assert_matches(a, r, what=f"d {name} (entropy)")


def test_minus_inf_logits(backend, device):
    """A bias of −inf masks vocabulary entries in every row: p = 0 there, so they add nothing to
    the entropy nor to its gradient (0·log 0 = 0) and get a zero gradient; a token there has
    log-prob −inf. Large logits (±1e3 before T) stay exact."""
    V, d = 97, 4
    h, w, b = _inputs((3,), d, V, device)
    b[::5] = float("-inf")
    w[7] *= 300.0
    t = torch.tensor([[1, 7], [2, 3], [10, 4]], device=device)   # column 10: −inf logit
    leaves = [h.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()]
    lp, ent = ro.linear_token_logprobs(*leaves[:2], t, bias=leaves[2], return_entropy=True,
                                       backend=backend)
    leaves64 = [x.detach().clone().requires_grad_() for x in leaves]
    lp64, ent64 = _direct(*leaves64[:2], leaves64[2], t, 1.0)
    assert lp[2, 0] == float("-inf") and torch.isfinite(ent).all()
    assert_matches(lp, lp64, what="logprobs")
    assert_matches(ent, ent64, what="entropy")
    g1, g2 = torch.randn_like(lp64), torch.randn_like(ent64)
    g1[2, 0] = 0                      # the −inf log-prob has no gradient to ask for
    ours = torch.autograd.grad((lp, ent), leaves, (g1, g2))
    want = torch.autograd.grad((lp64, ent64), leaves64, (g1, g2))
    for name, a, r in zip(("hidden", "weight", "bias"), ours, want):
        assert torch.isfinite(a).all(), name
        assert_matches(a, r, what=f"d {name}")
    assert (ours[2][::5] == 0).all() and (ours[1][::5] == 0).all()


def test_tied_weight_used_twice(backend, device, monkeypatch):
    """An embedding tied to the LM head: the weight enters the graph twice (embedding lookup and
    the head) and its gradient is the sum of both uses."""
    V, d = 211, 8
    _small_blocks(monkeypatch, 5, 128, V)
    E = (torch.randn(V, d, dtype=torch.float64, device=device) * 0.5).requires_grad_()
    A = torch.randn(d, d, dtype=torch.float64, device=device) * 0.3
    ids = torch.randint(0, V, (3, 4), device=device)

    def model(E, op):
        h = torch.tanh(F.embedding(ids, E) @ A)
        lp, ent = op(h, E)
        return lp.sum() - 0.01 * ent.sum()

    ours = model(E, lambda h, E: ro.linear_token_logprobs(h, E, ids.roll(-1, 1), temperature=0.9,
                                                         return_entropy=True, backend=backend))
    (g,) = torch.autograd.grad(ours, E)
    E64 = E.detach().clone().requires_grad_()
    want = model(E64, lambda h, E: _direct(h, E, None, ids.roll(-1, 1), 0.9))
    (gr,) = torch.autograd.grad(want, E64)
    assert_matches(ours, want, what="loss")
    assert_matches(g, gr, what="d E (both uses)")


@pytest.mark.parametrize("lead", [(0,), (2, 0), ()])
def test_empty_and_single_position(backend, device, lead):
    """No position at all (gradients are zero, of the right shapes), and hidden [d] alone."""
    V, d = 50, 4
    h, w, b = _inputs(lead, d, V, device)
    leaves = [h.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()]
    t = torch.randint(0, V, lead, device=device)
    lp, ent = ro.linear_token_logprobs(*leaves[:2], t, bias=leaves[2], return_entropy=True,
                                       backend=backend)
    assert lp.shape == lead and ent.shape == lead
    (lp.sum() + ent.sum()).backward()
    for x in leaves:
        assert x.grad.shape == x.shape
    if h.numel() == 0:
        assert (leaves[1].grad == 0).all() and (leaves[2].grad == 0).all()
    else:
        lp64, ent64 = _direct(h, w, b, t, 1.0)
        assert_matches(lp, lp64, what="single position")
        lpk = ro.linear_token_logprobs(h, w, torch.tensor([3, 3, 9], device=device), bias=b,
                                       backend=backend)
        assert lpk.shape == (3,) and lpk[0] == lpk[1]


def test_gradcheck(fused_backend, device, monkeypatch):
    _small_blocks(monkeypatch, 2, 3, 7)
    h = torch.randn(3, 4, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(7, 4, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.tensor([[0, 6], [2, 2], [5, 1]], device=device)
    assert torch.autograd.gradcheck(
        lambda h, w, b: ro.linear_token_logprobs(h, w, t, bias=b, temperature=0.9,
                                                 return_entropy=True, backend=fused_backend),
        (h, w, b), fast_mode=True)


def test_torch_compile(backend, device):
    import torch._dynamo as dynamo
    dynamo.reset()
    V, d = 130, 8
    h, w, b = _inputs((2, 3), d, V, device, dtype=torch.float32)
    t = torch.randint(0, V, (2, 3, 2), device=device)

    def step(h, w, b):
        lp, ent = ro.linear_token_logprobs(h, w, t, bias=b, temperature=1.1, return_entropy=True,
                                           backend=backend)
        return -lp.sum() - 0.01 * ent.sum()

    cstep = torch.compile(step, fullgraph=True,
                          backend="aot_eager" if device == "cpu" else "inductor")
    a = [x.clone().requires_grad_() for x in (h, w, b)]
    e = [x.clone().requires_grad_() for x in (h, w, b)]
    loss_c, loss_e = cstep(*a), step(*e)
    loss_c.backward()
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e)
    for x, y in zip(a, e):
        torch.testing.assert_close(x.grad, y.grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_no_worse_than_eager(backend, device, monkeypatch, dtype):
    """fp16/bf16 hidden and weight: log-probs, entropy and every gradient within eager's own
    error in that dtype (+ a small tolerance), eager being log_softmax(F.linear(h, W).float())
    as models run it. (No tl.dot here: the matmuls are torch's, so bf16 runs on CPU too.)"""
    V, d = 500, 32
    _small_blocks(monkeypatch, 5, 128, V)
    h, w, b = _inputs((2, 7), d, V, device, dtype=dtype)
    w = w * 0.3
    t = torch.randint(0, V, (2, 7), device=device)
    leaves = [x.clone().requires_grad_() for x in (h, w, b)]
    out = ro.linear_token_logprobs(*leaves[:2], t, bias=leaves[2], temperature=0.9,
                                   return_entropy=True, backend=backend)
    assert out[0].dtype == torch.float32
    leaves64 = [x.detach().double().requires_grad_() for x in leaves]
    want = _direct(*leaves64[:2], leaves64[2], t, 0.9)
    eager_leaves = [x.detach().clone().requires_grad_() for x in leaves]
    logp_all = torch.log_softmax(F.linear(*eager_leaves).float() / 0.9, -1)
    p = logp_all.exp()
    eager = (logp_all.gather(-1, t[..., None])[..., 0], -(p * logp_all).sum(-1))
    g1, g2 = torch.randn_like(want[0]), torch.randn_like(want[1])
    ours = torch.autograd.grad(out, leaves, (g1.float(), g2.float()))
    ref = torch.autograd.grad(want, leaves64, (g1, g2))
    eg = torch.autograd.grad(eager, eager_leaves, (g1.float(), g2.float()))
    assert_matches(out[0], want[0], eager[0], what=f"{dtype} logprobs")
    assert_matches(out[1], want[1], eager[1], what=f"{dtype} entropy")
    for name, a, r, e in zip(("hidden", "weight", "bias"), ours, ref, eg):
        assert a.dtype == dtype, name
        assert_matches(a, r, e, what=f"{dtype} d {name}")


def test_every_output_written(fused_backend, device, monkeypatch):
    """Every buffer the op allocates starts as NaN: outputs, per-row state, gradients."""
    V, d = 300, 4
    _small_blocks(monkeypatch, 2, 128, V)
    h, w, b = _inputs((5,), d, V, device)
    empty, empty_like, new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison_(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison_(empty_like(*a, **k)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: poison_(new_empty(self, *a, **k)))
    t = torch.randint(0, V, (5, 2), device=device)
    leaves = [x.clone().requires_grad_() for x in (h, w, b)]
    out = ro.linear_token_logprobs(*leaves[:2], t, bias=leaves[2], return_entropy=True,
                                   backend=fused_backend)
    leaves64 = [x.detach().clone().requires_grad_() for x in leaves]
    want = _direct(*leaves64[:2], leaves64[2], t, 1.0)
    ours, ref = _grads_both(out, want, leaves, leaves64)
    assert_matches(out[0], want[0], what="poisoned logprobs")
    assert_matches(out[1], want[1], what="poisoned entropy")
    for name, a, r in zip(("hidden", "weight", "bias"), ours, ref):
        assert_matches(a, r, what=f"poisoned d {name}")


# ------------------------------------------------------------------ memory (meta device) ---

def test_meta_nothing_of_size_v_kept_for_backward():
    """8,192 positions × V = 128,256 × d = 4,096 in bf16 on the meta device: besides hidden and
    the weight (the caller's), backward keeps the tokens, lse and the entropy: 20 bytes per
    position (163,840 bytes), and no tensor with a V-sized dimension but the weight itself.
    Eager keeps the [N, V] logits and an fp32 [N, V] log-softmax (checked, so that this test
    can fail)."""
    N, d, V = 8192, 4096, 128256
    h = torch.empty(N, d, dtype=torch.bfloat16, device="meta", requires_grad=True)
    w = torch.empty(V, d, dtype=torch.bfloat16, device="meta", requires_grad=True)
    t = torch.empty(N, dtype=torch.int64, device="meta")
    for be in ("triton", "cuda"):
        saved = saved_tensors(lambda: ro.linear_token_logprobs(h, w, t, return_entropy=True,
                                                                backend=be))
        big = [s for s in saved if V in s.shape]
        assert all(s.untyped_storage()._cdata == w.untyped_storage()._cdata for s in big), \
            [(tuple(s.shape), s.dtype) for s in big]
        extra = sum(s.nbytes for s in saved
                    if s.untyped_storage()._cdata not in (h.untyped_storage()._cdata,
                                                          w.untyped_storage()._cdata))
        assert extra == 20 * N, (extra, [(tuple(s.shape), s.dtype) for s in saved])
        lp, ent = ro.linear_token_logprobs(h, w, t, return_entropy=True, backend=be)
        assert lp.shape == (N,) and ent.shape == (N,) and lp.dtype == torch.float32
        (lp.sum() + ent.sum()).backward()
        assert h.grad.shape == h.shape and w.grad.shape == w.shape and w.grad.dtype == w.dtype
        h.grad = w.grad = None
    eager = saved_tensors(lambda: ro.linear_token_logprobs(h, w, t, return_entropy=True,
                                                            backend="reference"))
    assert sum(s.nbytes for s in eager if V in s.shape and s is not w) >= 4 * N * V


# --------------------------------------------------------------------------------- errors ---

def test_bad_inputs(backend, device, monkeypatch):
    monkeypatch.setenv("RLHF_OPS_DEBUG", "1")   # value checks for CUDA tensors too
    V, d = 20, 4
    h, w, b = _inputs((2, 3), d, V, device, dtype=torch.float32)
    t = torch.randint(0, V, (2, 3), device=device)
    f = ro.linear_token_logprobs

    def call(**kw):
        args = dict(hidden=h, weight=w, tokens=t)
        args.update(kw)
        return f(args.pop("hidden"), args.pop("weight"), args.pop("tokens"), backend=backend, **args)

    with pytest.raises(TypeError, match="hidden must have dtype"):
        call(hidden=h.long())
    with pytest.raises(ValueError, match="weight must be 2-D"):
        call(weight=w[0])
    with pytest.raises(ValueError, match=r"weight must have shape \[V, d\] with d = hidden.shape\[-1\] = 4"):
        call(weight=w[:, :3])
    with pytest.raises(ValueError, match="non-empty vocabulary"):
        call(weight=w[:0])
    with pytest.raises(TypeError, match="weight has dtype"):
        call(weight=w.double())
    with pytest.raises(ValueError, match=r"bias must have shape \[V\]"):
        call(bias=b[:5])
    with pytest.raises(TypeError, match="bias has dtype"):
        call(bias=b.double())
    with pytest.raises(ValueError, match="weight is on meta"):
        call(weight=w.to("meta"))
    with pytest.raises(TypeError, match="tokens must have dtype"):
        call(tokens=t.int())
    with pytest.raises(ValueError, match=r"tokens must have shape hidden.shape\[:-1\] = \(2, 3\) or"):
        call(tokens=t[:, :2])
    with pytest.raises(ValueError, match="tokens must have shape"):
        call(tokens=torch.zeros(2, 2, 4, dtype=torch.int64, device=device))
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        call(temperature=0.0)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        call(temperature=float("inf"))
    with pytest.raises(TypeError, match="temperature must be a number"):
        call(temperature="1")
    with pytest.raises(TypeError, match="return_entropy must be a bool"):
        call(return_entropy="yes")
    with pytest.raises(TypeError, match="positional"):
        f(h, w, t, b)                              # bias is keyword-only
    for bad in (V, -1):
        tt = t.clone()
        tt[1, 2] = bad
        with pytest.raises(ValueError, match=f"tokens holds {bad}, out of range"):
            call(tokens=tt)
        with pytest.raises(ValueError, match=f"tokens holds {bad}, out of range"):
            call(tokens=torch.stack([t, tt], -1))


def test_unavailable_backend_is_an_error():
    h, w, t = torch.randn(2, 4), torch.randn(10, 4), torch.tensor([1, 2])
    with pytest.raises(RuntimeError, match="cuda"):
        ro.linear_token_logprobs(h, w, t, backend="cuda")   # CPU tensors never run on cuda
    with pytest.raises(ValueError, match="backend"):
        ro.linear_token_logprobs(h, w, t, backend="fast")
