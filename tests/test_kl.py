"""token_logprobs / kl_penalty / kl_from_logprobs / ppo_rewards on every backend against the float64
eager reference (and, for the entropy, a direct formula).

Shapes are tiny and awkward (V = 37, not a multiple of any block) because the Triton kernels run
under the interpreter on CPU; one test uses V = 70,001 to cover the split-vocabulary path.
"""
import pytest
import torch

import rlhf_ops as ro
from rlhf_ops import reference
from rlhf_ops.nn import KLPenaltyModule

from _util import assert_matches, poison_, saved_tensors

FIELDS = ("logprobs", "ref_logprobs", "log_ratio", "kl", "penalty", "entropy")


def _inputs(shape, V, device, dtype=torch.float32, scale=2.0):
    x = (torch.randn(*shape, V, dtype=torch.float32) * scale).to(device=device, dtype=dtype)
    # an independent reference: |log_ratio| = O(1), so its fp32 rounding is not magnified
    r = (torch.randn(*shape, V) * scale).to(device=device, dtype=dtype)
    t = torch.randint(0, V, shape, device=device)
    return x, r, t


def _ref64(x, r, t, beta, est, mask, temperature):
    """(float64 reference KLPenalty, the float64 leaf its gradients are taken against)."""
    x64 = x.detach().double().requires_grad_()
    return reference.kl_penalty(x64, r.double(), t, beta, est, mask, temperature), x64


def _eager(x, r, t, beta, est, mask, temperature):
    """The eager reference run in the inputs' own dtype (fp32 accumulation): the bar for fields
    that are differences of two log-probs (log_ratio, kl, penalty), whose fp32 relative error is
    ulp(|log p|)/|log_ratio| however exact the kernel, too much for one fixed tolerance."""
    return reference.kl_penalty(x.detach(), r, t, beta, est, mask, temperature)


def _direct(x, tokens, temperature):
    """Log-probs at tokens ([...] or [..., K]) and the entropy by the textbook formulas in
    float64 (H = −Σ softmax·log_softmax, 0·log 0 = 0), independent of reference.py."""
    y = x.double() / temperature
    logp = y - torch.logsumexp(y, -1, keepdim=True)
    p = torch.softmax(y, -1)
    plogp = torch.where(p > 0, p * torch.where(p > 0, logp, torch.zeros_like(logp)),
                        torch.zeros_like(p))
    lp = logp.gather(-1, tokens if tokens.dim() == x.dim() else tokens[..., None])
    return (lp if tokens.dim() == x.dim() else lp[..., 0]), -plogp.sum(-1)


def _check_fields(ours, ref, *, eager=None, dtype=torch.float32, what=""):
    assert isinstance(ours, ro.KLPenalty)
    for name in FIELDS:
        a, b = getattr(ours, name), getattr(ref, name)
        assert a.shape == b.shape, f"{what} {name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        assert a.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), name
        if eager is not None and name in ("log_ratio", "kl", "penalty"):
            assert_matches(a, b, getattr(eager, name), tol=1e-5, what=f"{what} {name}")
        else:
            assert_matches(a, b, dtype=dtype, what=f"{what} {name}")


# ------------------------------------------------------------------------------- forward ---

@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("mask_kind", [None, "bool", "float", "int64"])
def test_kl_penalty_forward(backend, device, estimator, mask_kind):
    x, r, t = _inputs((2, 3), 37, device)
    mask = None
    if mask_kind is not None:
        mask = torch.rand(2, 3, device=device) > 0.4
        mask[1] = False  # a row with no real token: penalty 0
        if mask_kind == "float":
            mask = mask.float() * torch.rand(2, 3, device=device)
        if mask_kind == "int64":          # a tokenizer's attention mask
            mask = mask.long()
    out = ro.kl_penalty(x, r, t, beta=0.05, estimator=estimator, mask=mask, temperature=0.7,
                        backend=backend)
    ref, x64 = _ref64(x, r, t, 0.05, estimator, mask, 0.7)
    _check_fields(out, ref, eager=_eager(x, r, t, 0.05, estimator, mask, 0.7), what=f"{backend}/{estimator}/{mask_kind}")
    if mask_kind is not None:
        assert torch.all(out.penalty[1] == 0)
    # the fields are what their names say
    torch.testing.assert_close(out.log_ratio, out.logprobs - out.ref_logprobs)
    m = torch.ones_like(out.kl) if mask is None else mask.to(out.kl.dtype)
    torch.testing.assert_close(out.penalty, -0.05 * out.kl * m)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_forward_backward(backend, device, temperature):
    x, _, t = _inputs((3, 5), 37, device)
    x.requires_grad_(True)
    lp = ro.token_logprobs(x, t, temperature=temperature, backend=backend)
    x64 = x.detach().double().requires_grad_()
    ref = reference.token_logprobs(x64, t, temperature)
    assert lp.shape == (3, 5) and lp.dtype == torch.float32
    assert_matches(lp, ref, what="logprobs")
    g = torch.randn_like(ref)
    (gx,) = torch.autograd.grad(lp, x, g.float())
    (gr,) = torch.autograd.grad(ref, x64, g)
    assert gx.dtype == x.dtype
    assert_matches(gx, gr, dtype=torch.float32, what="dlogits")


def test_token_logprobs_any_leading_shape(backend, device):
    x, _, t = _inputs((7,), 19, device)
    assert_matches(ro.token_logprobs(x, t, backend=backend),
                   reference.token_logprobs(x.double(), t), what="1-D batch")
    x, _, t = _inputs((2, 2, 3), 19, device)
    assert_matches(ro.token_logprobs(x, t, backend=backend),
                   reference.token_logprobs(x.double(), t), what="3-D batch")


def test_non_contiguous_inputs(backend, device):
    base = torch.randn(37, 2, 3, device=device)
    x = base.permute(1, 2, 0)  # stride 6 over V
    r = torch.randn(2, 3, 37, device=device)
    t = torch.randint(0, 37, (2, 3), device=device)
    mask = torch.rand(3, 2, device=device).t() > 0.5  # strided mask
    out = ro.kl_penalty(x, r, t, beta=0.1, mask=mask, backend=backend)
    _check_fields(out, _ref64(x, r, t, 0.1, "k1", mask, 1.0)[0], eager=_eager(x, r, t, 0.1, "k1", mask, 1.0),
                  what="strided")
    tt = torch.randint(0, 37, (2, 4), device=device)[:, 1]  # strided 1-D tokens
    xx = torch.randn(2, 37, device=device)
    assert_matches(ro.token_logprobs(xx, tt, backend=backend),
                   reference.token_logprobs(xx.double(), tt), what="strided tokens")


@pytest.mark.parametrize("V", [37, 70_001])
def test_every_output_written(fused_backend, device, monkeypatch, V):
    # Every buffer the launchers allocate (outputs, partial states, the gradient) starts as NaN,
    # so that an element a kernel forgets to write fails the comparison.
    empty, empty_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison_(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison_(empty_like(*a, **k)))
    x, r, t = _inputs((1, 2), V, device)
    x.requires_grad_(True)
    out = ro.kl_penalty(x, r, t, beta=0.1, estimator="k2", backend=fused_backend)
    ref, x64 = _ref64(x, r, t, 0.1, "k2", None, 1.0)
    _check_fields(out, ref, eager=_eager(x, r, t, 0.1, "k2", None, 1.0), what="poisoned")
    (gx,) = torch.autograd.grad(out.logprobs.sum(), x)
    (gr,) = torch.autograd.grad(ref.logprobs.sum(), x64)
    assert_matches(gx, gr, dtype=torch.float32, what="poisoned dlogits")
    assert_matches(ro.token_logprobs(x.detach(), t, backend=fused_backend), ref.logprobs,
                   what="poisoned token_logprobs")
    # [..., K] tokens and the entropy, forward and backward
    tk = torch.stack([t, (t + 5) % V, t], -1)
    lp, ent = ro.token_logprobs(x, tk, return_entropy=True, backend=fused_backend)
    lp64, ent64 = _direct(x64, tk, 1.0)
    assert_matches(lp, lp64, what="poisoned [..., K] logprobs")
    assert_matches(ent, ent64, what="poisoned entropy")
    g1, g2 = torch.randn_like(lp64), torch.randn_like(ent64)
    (gx,) = torch.autograd.grad((lp, ent), x, (g1.float(), g2.float()))
    (gr,) = torch.autograd.grad((lp64, ent64), x64, (g1, g2))
    assert_matches(gx, gr, dtype=torch.float32, what="poisoned dlogits with entropy")


def test_large_vocab(backend, device):
    # V above 65,536: the Triton forward splits each row across programs and combines them.
    V = 70_001
    x, r, t = _inputs((1, 2), V, device, scale=4.0)
    x.requires_grad_(True)
    mask = torch.tensor([[True, False]], device=device)
    out = ro.kl_penalty(x, r, t, beta=0.1, estimator="k3", mask=mask, temperature=1.3,
                        backend=backend)
    ref, x64 = _ref64(x, r, t, 0.1, "k3", mask, 1.3)
    _check_fields(out, ref, eager=_eager(x, r, t, 0.1, "k3", mask, 1.3), what="V=70001")
    g1, g2 = (torch.randn(1, 2, dtype=torch.float64, device=device) for _ in range(2))
    (gx,) = torch.autograd.grad((out.logprobs, out.kl), x, (g1.float(), g2.float()))
    (gr,) = torch.autograd.grad((ref.logprobs, ref.kl), x64, (g1, g2))
    assert_matches(gx, gr, dtype=torch.float32, what="V=70001 dlogits")
    lp = ro.token_logprobs(x.detach(), t, temperature=1.3, backend=backend)
    assert_matches(lp, ref.logprobs, what="V=70001 token_logprobs")


def test_extreme_logits(backend, device):
    # ±1e4 logits, −inf logits, a token whose logit is −inf, a single finite logit per row.
    V = 37
    x, r, t = _inputs((2, 3), V, device)
    x[0, 0, :5] = 1e4
    x[0, 1, 3] = -1e4
    x[0, 1, 4] = 1e4
    x[0, 2, ::2] = float("-inf")
    t[0, 2] = 4                       # −inf policy logit: logprob −inf
    r[0, 2, 5] = float("-inf")
    t[1, 0] = 5
    x[1, 1, :] = float("-inf")
    x[1, 1, 7] = 3.0                  # a single finite logit: logprob 0, entropy 0
    t[1, 1] = 7
    r[1, 2, :] = -1e4
    x.requires_grad_(True)
    out = ro.kl_penalty(x, r, t, beta=0.1, estimator="k1", backend=backend)
    ref, x64 = _ref64(x, r, t, 0.1, "k1", None, 1.0)
    _check_fields(out, ref, eager=_eager(x, r, t, 0.1, "k1", None, 1.0), what="extreme")
    assert out.logprobs[0, 2] == float("-inf")
    assert not torch.isnan(out.logprobs).any()
    assert out.logprobs[1, 1] == 0 and out.entropy[1, 1] == 0
    (gx,) = torch.autograd.grad(out.logprobs.sum() + out.kl[1].sum() + out.entropy.sum(), x)
    (gr,) = torch.autograd.grad(ref.logprobs.sum() + ref.kl[1].sum() + ref.entropy.sum(), x64)
    assert torch.isfinite(gx).all()
    assert_matches(gx, gr, dtype=torch.float32, what="extreme dlogits")
    lp = ro.token_logprobs(x.detach(), t, backend=backend)
    assert lp[0, 2] == float("-inf")
    assert_matches(lp, ref.logprobs, what="extreme token_logprobs")


def _eager_lowp(x, r, t, estimator, temperature):
    """What eager code in the logits' own dtype computes (the acceptance baseline)."""
    logp_all = torch.log_softmax(x / temperature, dim=-1)
    lp = logp_all.gather(-1, t[..., None]).squeeze(-1)
    rlp = torch.log_softmax(r / temperature, dim=-1).gather(-1, t[..., None]).squeeze(-1)
    d = lp - rlp.detach()
    kl = reference.kl_from_log_ratio(d, estimator)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return lp, rlp, d, kl, ent


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(backend, device, dtype):
    # scale 1: k3's ∂kl/∂d = 1 − e^{−d} stays far from fp16's overflow
    x, r, t = _inputs((2, 3), 37, device, dtype=dtype, scale=1.0)
    x.requires_grad_(True)
    out = ro.kl_penalty(x, r, t, beta=0.1, estimator="k3", temperature=0.8, backend=backend)
    ref, x64 = _ref64(x, r, t, 0.1, "k3", None, 0.8)
    xe = x.detach().clone().requires_grad_()
    eager = _eager_lowp(xe, r, t, "k3", 0.8)
    for name, e in zip(("logprobs", "ref_logprobs", "log_ratio", "kl", "entropy"), eager):
        o = getattr(out, name)
        assert o.dtype == torch.float32
        assert_matches(o, getattr(ref, name), e, what=f"{dtype} {name}")
    g1, g2, g3 = (torch.randn(2, 3, dtype=torch.float64, device=device) for _ in range(3))
    (gx,) = torch.autograd.grad((out.logprobs, out.kl, out.entropy), x,
                                (g1.float(), g2.float(), g3.float()))
    (gr,) = torch.autograd.grad((ref.logprobs, ref.kl, ref.entropy), x64, (g1, g2, g3))
    (ge,) = torch.autograd.grad((eager[0], eager[3], eager[4]), xe,
                                (g1.to(dtype), g2.to(dtype), g3.to(dtype)))
    assert gx.dtype == dtype
    assert_matches(gx, gr, ge, what=f"{dtype} dlogits")


# ------------------------------------------------------------------------------ backward ---

@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("used", ["all", "kl", "entropy"])
def test_kl_penalty_backward(backend, device, estimator, used):
    x, r, t = _inputs((2, 3), 37, device)
    x.requires_grad_(True)
    out = ro.kl_penalty(x, r, t, beta=0.1, estimator=estimator, temperature=0.9, backend=backend)
    ref, x64 = _ref64(x, r, t, 0.1, estimator, None, 0.9)
    names = {"all": ("logprobs", "log_ratio", "kl", "entropy"), "kl": ("kl",),
             "entropy": ("entropy",)}[used]
    gs = [torch.randn(2, 3, dtype=torch.float64, device=device) for _ in names]
    (gx,) = torch.autograd.grad([getattr(out, n) for n in names], x, [g.float() for g in gs])
    (gr,) = torch.autograd.grad([getattr(ref, n) for n in names], x64, gs)
    assert gx.dtype == x.dtype and gx.shape == x.shape
    assert_matches(gx, gr, dtype=torch.float32, what=f"{estimator}/{used} dlogits")
    for name in ("ref_logprobs", "penalty"):
        assert not getattr(out, name).requires_grad, f"{name} must carry no gradient"
    assert out.entropy.requires_grad, "entropy is differentiable (an entropy bonus trains)"


def test_ref_logits_get_no_grad(backend, device):
    x, r, t = _inputs((1, 2), 11, device)
    x.requires_grad_(True)
    r.requires_grad_(True)
    out = ro.kl_penalty(x, r, t, beta=0.1, estimator="k2", backend=backend)
    out.kl.sum().backward()
    assert x.grad is not None and r.grad is None


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_gradcheck(fused_backend, device, estimator):
    x = torch.randn(1, 2, 5, dtype=torch.float64, device=device, requires_grad=True)
    r = torch.randn(1, 2, 5, dtype=torch.float64, device=device)
    t = torch.randint(0, 5, (1, 2), device=device)

    def f(x):
        o = ro.kl_penalty(x, r, t, beta=0.1, estimator=estimator, temperature=0.7,
                          backend=fused_backend)
        return o.logprobs, o.log_ratio, o.kl, o.entropy

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradcheck(
        lambda x: ro.token_logprobs(x, t, temperature=1.3, backend=fused_backend), (x,))
    tk = torch.tensor([[[0, 3, 0], [4, 4, 1]]], device=device)   # [..., K] with repeats
    assert torch.autograd.gradcheck(
        lambda x: ro.token_logprobs(x, tk, temperature=0.8, return_entropy=True,
                                    backend=fused_backend), (x,))


# ------------------------------------------------------------- compile, meta, empty, errors ---

def test_torch_compile(backend, device):
    import torch._dynamo
    torch._dynamo.reset()
    x, r, t = _inputs((2, 3), 21, device)
    mask = torch.rand(2, 3, device=device) > 0.3

    def step(x, r, t, mask):
        o = ro.kl_penalty(x, r, t, beta=0.1, estimator="k3", mask=mask, temperature=0.9,
                          backend=backend)
        lp = ro.token_logprobs(x, t, temperature=0.9, backend=backend)
        lpk, ent = ro.token_logprobs(x, torch.stack([t, t.flip(-1)], -1), temperature=1.1,
                                     return_entropy=True, backend=backend)
        return (o.kl.sum() + lp.sum() + o.penalty.sum() + o.entropy.sum() + (lpk * lpk).sum()
                - ent.sum())

    cstep = torch.compile(step, fullgraph=True,
                          backend="aot_eager" if device == "cpu" else "inductor")
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    loss_c = cstep(x1, r, t, mask)
    loss_e = step(x2, r, t, mask)
    loss_c.backward()
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(x1.grad, x2.grad)


@pytest.mark.parametrize("name", ["reference", "triton", "cuda", "auto"])
def test_meta(name):
    x = torch.empty(2, 3, 50, device="meta", dtype=torch.bfloat16, requires_grad=True)
    r = torch.empty(2, 3, 50, device="meta", dtype=torch.bfloat16)
    t = torch.empty(2, 3, device="meta", dtype=torch.int64)
    mask = torch.empty(2, 3, device="meta", dtype=torch.bool)
    out = ro.kl_penalty(x, r, t, beta=0.1, estimator="k2", mask=mask, backend=name)
    for f in FIELDS:
        o = getattr(out, f)
        assert o.shape == (2, 3) and o.dtype == torch.float32 and o.device.type == "meta", f
    (out.logprobs.sum() + out.kl.sum()).backward()
    assert x.grad.shape == x.shape and x.grad.dtype == x.dtype
    lp = ro.token_logprobs(x, t, backend=name)
    assert lp.shape == (2, 3) and lp.dtype == torch.float32



def _check_saved(fn, name, B, T, V, small_per_token):
    """Fused: the logits are the only [B, T, V] tensor saved, plus a few numbers per token.
    Eager: it saves an fp32 [B, T, V] log-softmax, so this check can fail."""
    saved = saved_tensors(fn)
    big = [s for s in saved if s.numel() >= B * T * V]
    if name == "reference":
        assert any(s.dtype == torch.float32 for s in big), [(s.shape, s.dtype) for s in saved]
    else:
        assert len(big) == 1 and big[0].dtype == torch.bfloat16, [(s.shape, s.dtype) for s in saved]
        assert sum(s.numel() for s in saved if s.numel() < B * T * V) <= small_per_token * B * T


@pytest.mark.parametrize("name", ["reference", "triton", "cuda"])
def test_nothing_of_size_v_saved(name):
    B, T, V = 4, 8, 1000
    x = torch.empty(B, T, V, device="meta", dtype=torch.bfloat16, requires_grad=True)
    r = torch.empty(B, T, V, device="meta", dtype=torch.bfloat16)
    t = torch.empty(B, T, device="meta", dtype=torch.int64)
    for est in ("k1", "k3"):
        # tokens, lse (2), the entropy and, for k3, the log-ratio: 5 numbers per token
        _check_saved(lambda: ro.kl_penalty(x, r, t, beta=0.1, estimator=est, backend=name), name, B, T, V, 5)
    _check_saved(lambda: ro.token_logprobs(x, t, backend=name), name, B, T, V, 3)
    # with a differentiable entropy: one more number per token
    _check_saved(lambda: ro.token_logprobs(x, t, return_entropy=True, backend=name), name, B, T, V, 4)


def test_all_minus_inf_row_has_nan_entropy(backend, device):
    """A row whose logits are all −inf has no distribution: log-prob and entropy are NaN."""
    logits, ref = torch.randn(1, 2, 40, device=device), torch.randn(1, 2, 40, device=device)
    logits[0, 0] = float("-inf")
    kp = ro.kl_penalty(logits, ref, torch.tensor([[3, 4]], device=device), beta=0.1, backend=backend)
    assert torch.isnan(kp.logprobs[0, 0]) and torch.isnan(kp.entropy[0, 0])
    assert torch.isfinite(kp.entropy[0, 1]) and torch.isfinite(kp.logprobs[0, 1])


def test_nan_logit_gives_nan(backend, device):
    """A NaN in a policy row makes its log-prob NaN (as eager), never a finite number."""
    logits, ref = torch.randn(2, 3, 700, device=device), torch.randn(2, 3, 700, device=device)
    logits[0, 0, 0] = float("nan")
    logits[1, 2, 400] = float("nan")
    tokens = torch.randint(0, 700, (2, 3), device=device)
    lp = ro.token_logprobs(logits, tokens, backend=backend)
    kp = ro.kl_penalty(logits, ref, tokens, beta=0.1, backend=backend)
    for t in (lp, kp.logprobs, kp.kl, kp.entropy):
        assert torch.isnan(t[0, 0]) and torch.isnan(t[1, 2])
        assert torch.isfinite(t[0, 1:]).all() and torch.isfinite(t[1, :2]).all()


@pytest.mark.parametrize("shape", [(0, 4), (2, 0)])
def test_empty_batch(backend, device, shape):
    x = torch.randn(*shape, 13, device=device, requires_grad=True)
    r = torch.randn(*shape, 13, device=device)
    t = torch.zeros(shape, dtype=torch.int64, device=device)
    out = ro.kl_penalty(x, r, t, beta=0.1, estimator="k2", backend=backend)
    for f in FIELDS:
        assert getattr(out, f).shape == shape
    (out.logprobs.sum() + out.kl.sum()).backward()
    assert x.grad.shape == x.shape
    assert ro.token_logprobs(x, t, backend=backend).shape == shape


def test_single_row(backend, device):
    x, r, t = _inputs((1, 1), 9, device)
    out = ro.kl_penalty(x, r, t, beta=0.3, estimator="k2", backend=backend)
    _check_fields(out, _ref64(x, r, t, 0.3, "k2", None, 1.0)[0], eager=_eager(x, r, t, 0.3, "k2", None, 1.0),
                  what="single row")


def test_bad_inputs(backend, device, monkeypatch):
    monkeypatch.setenv("RLHF_OPS_DEBUG", "1")  # value checks for CUDA tensors too
    x, r, t = _inputs((2, 3), 11, device)

    def kl(**kw):
        args = dict(logits=x, ref_logits=r, tokens=t, beta=0.1)
        args.update(kw)
        lg, rf, tk = args.pop("logits"), args.pop("ref_logits"), args.pop("tokens")
        return ro.kl_penalty(lg, rf, tk, backend=backend, **args)

    with pytest.raises(TypeError, match="tokens"):
        kl(tokens=t.int())
    with pytest.raises(ValueError, match="tokens"):
        kl(tokens=t[:, :2])
    with pytest.raises(TypeError, match="logits"):
        kl(logits=x.long())
    with pytest.raises(TypeError, match="ref_logits"):
        kl(ref_logits=r.double())
    with pytest.raises(ValueError, match="ref_logits"):
        kl(ref_logits=r[..., :10])
    with pytest.raises(ValueError, match="mask"):
        kl(mask=torch.ones(2, 4, dtype=torch.bool, device=device))
    with pytest.raises(TypeError, match="mask"):
        kl(mask=torch.ones(2, 3, dtype=torch.complex64, device=device))
    with pytest.raises(ValueError, match="estimator"):
        kl(estimator="k4")
    with pytest.raises(ValueError, match="temperature"):
        kl(temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        kl(temperature=-1.0)
    for bad in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            kl(temperature=bad)
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            ro.token_logprobs(x, t, temperature=bad, backend=backend)
    with pytest.raises(TypeError, match="beta"):
        kl(beta="0.1")
    with pytest.raises(ValueError, match="ref_logits"):
        kl(ref_logits=r.to("meta"))
    with pytest.raises(ValueError, match="logits"):
        ro.token_logprobs(x[..., :0], t, backend=backend)
    with pytest.raises(ValueError, match="tokens"):
        ro.token_logprobs(x, t[0], backend=backend)
    bad = t.clone()
    bad[1, 2] = 11
    with pytest.raises(ValueError, match="tokens"):
        kl(tokens=bad)
    bad[1, 2] = -1
    with pytest.raises(ValueError, match="tokens"):
        ro.token_logprobs(x, bad, backend=backend)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the out-of-range rule "
                    "without debug checks applies to CUDA tensors only")
def test_out_of_range_token_gives_nan_on_gpu(fused_backend, device, monkeypatch):
    monkeypatch.setenv("RLHF_OPS_DEBUG", "0")
    x, r, t = _inputs((2, 3), 37, device)
    x.requires_grad_(True)
    t[1, 1] = 37
    t[0, 2] = -5
    out = ro.kl_penalty(x, r, t, beta=0.1, estimator="k3", backend=fused_backend)
    bad = torch.zeros(2, 3, dtype=torch.bool, device=device)
    bad[1, 1] = bad[0, 2] = True
    for f in ("logprobs", "ref_logprobs", "log_ratio", "kl", "penalty"):
        o = getattr(out, f)
        assert torch.isnan(o[bad]).all() and torch.isfinite(o[~bad]).all(), f
    out.logprobs.sum().backward()
    assert torch.isnan(x.grad[bad]).all() and torch.isfinite(x.grad[~bad]).all()
    lp = ro.token_logprobs(x.detach(), t, backend=fused_backend)
    assert torch.isnan(lp[bad]).all() and torch.isfinite(lp[~bad]).all()
    # [..., K]: the bad token's log-prob is NaN, its row's gradient too; the entropy is unaffected
    tk = torch.stack([t.clamp(0, 36), t], -1)
    x.grad = None
    lp, ent = ro.token_logprobs(x, tk, return_entropy=True, backend=fused_backend)
    assert torch.isnan(lp[..., 1][bad]).all() and torch.isfinite(lp[..., 0]).all()
    assert torch.isfinite(ent).all()
    (lp[..., 0].sum() + ent.sum()).backward()
    assert torch.isnan(x.grad[bad]).all() and torch.isfinite(x.grad[~bad]).all()


def test_module(backend, device):
    x, r, t = _inputs((2, 3), 17, device)
    mask = torch.rand(2, 3, device=device) > 0.5
    mod = KLPenaltyModule(beta=0.2, estimator="k2", temperature=1.1, backend=backend)
    out = mod(x, r, t, mask)
    _check_fields(out, _ref64(x, r, t, 0.2, "k2", mask, 1.1)[0], eager=_eager(x, r, t, 0.2, "k2", mask, 1.1),
                  what="module")
    import rlhf_ops.nn
    assert rlhf_ops.nn.KLPenalty is KLPenaltyModule and isinstance(out, ro.KLPenalty)


# ---------------------------------------------------------------------------- ppo_rewards ---

def _ppo_rewards_loop(penalty, scores, mask):
    out = penalty.clone()
    for b in range(penalty.shape[0]):
        real = [i for i in range(penalty.shape[1]) if bool(mask[b, i])]
        if real:
            out[b, real[-1]] += scores[b]
    return out


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_ppo_rewards(device, mask_dtype):
    B, T = 5, 7
    penalty = torch.randn(B, T, device=device)
    scores = torch.randn(B, device=device)
    mask = torch.zeros(B, T, dtype=torch.bool, device=device)
    mask[0, :4] = True           # right padding
    mask[1, 3:] = True           # left padding
    mask[2] = True               # no padding
    mask[4, 2:5] = True          # padded on both sides
    # row 3: all zero — gets no score
    mask = mask.to(mask_dtype)
    out = ro.ppo_rewards(penalty, scores, mask)
    expect = _ppo_rewards_loop(penalty, scores, mask)
    torch.testing.assert_close(out, expect, rtol=0, atol=0)
    assert torch.equal(out[3], penalty[3])
    assert out[1, 6] == penalty[1, 6] + scores[1] and out[4, 4] == penalty[4, 4] + scores[4]


def test_ppo_rewards_no_tokens(device):
    out = ro.ppo_rewards(torch.zeros(3, 0, device=device), torch.ones(3, device=device),
                         torch.zeros(3, 0, dtype=torch.bool, device=device))
    assert out.shape == (3, 0)


def test_ppo_rewards_bad_shapes(device):
    p = torch.randn(2, 5, device=device)
    ones = torch.ones(2, 5, dtype=torch.bool, device=device)
    with pytest.raises(ValueError, match="mask"):
        ro.ppo_rewards(p, torch.randn(2, device=device), ones[:, :4])
    with pytest.raises(ValueError, match="scores"):
        ro.ppo_rewards(p, torch.randn(3, device=device), ones)
    with pytest.raises(TypeError, match="penalty"):
        ro.ppo_rewards(p.long(), torch.randn(2, device=device), torch.ones(2, 5, device=device))


# ------------------------------------------- token_logprobs: K tokens, entropy with gradient ---

@pytest.mark.parametrize("V, temperature", [(37, 0.7), (70_001, 1.3)])
def test_token_logprobs_k_tokens_and_entropy(backend, device, V, temperature):
    """tokens [..., K] with repeated tokens, entropy, both outputs' gradients at once, against
    the direct formulas in float64; V = 70,001 takes the split-row path."""
    shape = (2, 3) if V < 1000 else (1, 2)
    x, _, t = _inputs(shape, V, device, scale=3.0)
    tk = torch.stack([t, torch.randint(0, V, shape, device=device), t, t], -1)  # repeats
    if V < 1000:
        x[0, 0, :4] = 1e4                     # ±1e4 and −inf logits in one row each
        x[0, 0, 4] = -1e4
        x[1, 2, ::3] = float("-inf")
        tk[1, 2, 1] = 3                       # a token whose logit is −inf: log-prob −inf
    x.requires_grad_(True)
    lp, ent = ro.token_logprobs(x, tk, temperature=temperature, return_entropy=True,
                                backend=backend)
    x64 = x.detach().double().requires_grad_()
    lp64, ent64 = _direct(x64, tk, temperature)
    assert lp.shape == tk.shape and ent.shape == shape and lp.dtype == ent.dtype == torch.float32
    assert_matches(lp, lp64, what="[..., K] logprobs")
    assert_matches(ent, ent64, what="entropy")
    assert torch.equal(lp[..., 0], lp[..., 2]) and torch.equal(lp[..., 0], lp[..., 3])
    g1, g2 = torch.randn_like(lp64), torch.randn_like(ent64)
    g1[torch.isinf(lp64)] = 0                 # d(−inf)/dx is not defined; its gradient stays 0
    (gx,) = torch.autograd.grad((lp, ent), x, (g1.float(), g2.float()))
    (gr,) = torch.autograd.grad((lp64, ent64), x64, (g1, g2))
    assert torch.isfinite(gx).all()
    assert_matches(gx, gr, dtype=torch.float32, what="d logits (log-probs and entropy)")
    # the [...] form is the K = 1 column of the [..., K] form
    lp1, ent1 = ro.token_logprobs(x.detach(), t, temperature=temperature, return_entropy=True,
                                  backend=backend)
    assert lp1.shape == shape
    assert_matches(lp1, lp64[..., 0], what="[...] logprobs")
    assert_matches(ent1, ent64, what="[...] entropy")


def test_entropy_gradient_alone(backend, device):
    """Only the entropy used (an entropy bonus): the log-prob gradient is absent, not zero-filled
    by the caller; and the reverse: log-probs used, entropy asked for but unused."""
    x, _, t = _inputs((3, 2), 23, device)
    x.requires_grad_(True)
    x64 = x.detach().double().requires_grad_()
    lp64, ent64 = _direct(x64, t, 0.9)
    _, ent = ro.token_logprobs(x, t, temperature=0.9, return_entropy=True, backend=backend)
    g = torch.randn_like(ent64)
    (gx,) = torch.autograd.grad(ent, x, g.float())
    (gr,) = torch.autograd.grad(ent64, x64, g, retain_graph=True)
    assert_matches(gx, gr, dtype=torch.float32, what="d entropy")
    lp, _ = ro.token_logprobs(x, t, temperature=0.9, return_entropy=True, backend=backend)
    (gx,) = torch.autograd.grad(lp.sum(), x)
    (gr,) = torch.autograd.grad(lp64.sum(), x64)
    assert_matches(gx, gr, dtype=torch.float32, what="d logprobs, entropy unused")
    out = ro.kl_penalty(x, x.detach() * 0.5, t, beta=0.1, temperature=0.9, backend=backend)
    (gx,) = torch.autograd.grad(out.entropy, x, g.float())
    (gr,) = torch.autograd.grad(_direct(x64, t, 0.9)[1], x64, g)
    assert_matches(gx, gr, dtype=torch.float32, what="kl_penalty d entropy")


def test_token_logprobs_no_tokens_per_position(backend, device):
    """tokens [..., 0]: no log-prob, the entropy still there and differentiable."""
    x = torch.randn(2, 3, 11, device=device, requires_grad=True)
    t = torch.zeros(2, 3, 0, dtype=torch.int64, device=device)
    lp, ent = ro.token_logprobs(x, t, return_entropy=True, backend=backend)
    assert lp.shape == (2, 3, 0) and ent.shape == (2, 3)
    (gx,) = torch.autograd.grad(ent.sum() + lp.sum(), x)
    x64 = x.detach().double().requires_grad_()
    (gr,) = torch.autograd.grad(_direct(x64, t, 1.0)[1].sum(), x64)
    assert_matches(gx, gr, dtype=torch.float32, what="entropy gradient, K = 0")


def test_token_logprobs_new_argument_errors(backend, device):
    x, r, t = _inputs((2, 3), 11, device)
    with pytest.raises(TypeError, match="return_entropy must be a bool"):
        ro.token_logprobs(x, t, return_entropy=1, backend=backend)
    with pytest.raises(ValueError, match=r"tokens must have shape .*\(2, 3, 'K'\)"):
        ro.token_logprobs(x, torch.zeros(2, 4, 2, dtype=torch.int64, device=device), backend=backend)
    with pytest.raises(ValueError, match="tokens"):
        ro.token_logprobs(x, torch.zeros(2, 3, 2, 1, dtype=torch.int64, device=device), backend=backend)
    with pytest.raises(ValueError, match=r"tokens must have shape logits.shape\[:-1\]"):
        ro.kl_penalty(x, r, torch.stack([t, t], -1), beta=0.1, backend=backend)
    if device == "cpu":   # value checks run eagerly for CPU tensors
        bad = torch.stack([t, t], -1)
        bad[1, 1, 1] = 11
        with pytest.raises(ValueError, match="tokens holds 11"):
            ro.token_logprobs(x, bad, backend=backend)


# ------------------------------------------------------------------------ kl_from_logprobs ---

@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_from_logprobs_matches_kl_penalty(device, estimator):
    """Same fields as kl_penalty computes from the logits (entropy None), gradient to logprobs
    only, masks of every kind."""
    x, r, t = _inputs((2, 5), 29, device)
    mask = (torch.rand(2, 5, device=device) > 0.3).long()
    x64 = x.double().requires_grad_()
    kp = reference.kl_penalty(x64, r.double(), t, 0.07, estimator, mask, 0.8)
    lp = kp.logprobs.detach().float().requires_grad_()
    ref = kp.ref_logprobs.float().requires_grad_()       # gets no gradient
    out = ro.kl_from_logprobs(lp, ref, beta=0.07, estimator=estimator, mask=mask)
    assert isinstance(out, ro.KLPenalty) and out.entropy is None
    for name in ("logprobs", "ref_logprobs", "log_ratio", "kl", "penalty"):
        o = getattr(out, name)
        assert o.shape == (2, 5) and o.dtype == torch.float32, name
        want = getattr(kp, name)
        e = reference.kl_from_logprobs(lp.detach(), ref.detach(), 0.07, estimator, mask)
        assert_matches(o, want, getattr(e, name), tol=1e-6, what=name)
    assert not out.ref_logprobs.requires_grad and not out.penalty.requires_grad
    assert out.kl.requires_grad and out.log_ratio.requires_grad
    g1, g2 = torch.randn(2, 5, dtype=torch.float64, device=device), torch.randn(2, 5, dtype=torch.float64, device=device)
    glp, = torch.autograd.grad((out.kl, out.log_ratio), lp, (g1.float(), g2.float()))
    lp64 = kp.logprobs.detach().requires_grad_()
    d = lp64 - kp.ref_logprobs
    kl64 = {"k1": d, "k2": 0.5 * d * d, "k3": torch.exp(-d) - 1 + d}[estimator]
    gr, = torch.autograd.grad((kl64, d), lp64, (g1, g2))
    assert_matches(glp, gr, dtype=torch.float32, what="d logprobs")
    ro.kl_from_logprobs(lp, ref, beta=0.07, estimator=estimator).kl.sum().backward()
    assert ref.grad is None and lp.grad is not None
    # bool and float masks, and no mask
    for m in (mask.bool(), mask.float() * 0.5, None):
        o = ro.kl_from_logprobs(lp, ref, beta=0.07, estimator=estimator, mask=m)
        mm = torch.ones(2, 5, device=device) if m is None else m.float()
        torch.testing.assert_close(o.penalty, -0.07 * o.kl.detach() * mm)


def test_kl_from_logprobs_k3_small_ratio_numerics(device):
    """|d| ≪ 1 in fp32: the k3 series keeps full precision where e^{−d} − 1 + d cancels."""
    d = torch.tensor([1e-6, -3e-5, 1e-4, -2e-3, 0.3, -0.49, 0.51, -4.0], device=device)
    ref = torch.full_like(d, -7.25)
    lp = (ref.double() + d.double()).float()
    dd = (lp.double() - ref.double())               # the exact difference of the fp32 inputs
    exact = dd * dd * 0.5 - dd ** 3 / 6 + dd ** 4 / 24 - dd ** 5 / 120 + dd ** 6 / 720
    exact = torch.where(dd.abs() < 0.1, exact, torch.expm1(-dd) + dd)
    lpg = lp.clone().requires_grad_()
    out = ro.kl_from_logprobs(lpg, ref, beta=1.0, estimator="k3")
    rel = ((out.kl.double() - exact).abs() / exact).max().item()
    assert rel < 1e-6, rel
    naive = torch.expm1(-(lp - ref)) + (lp - ref)   # the closed form in fp32: far off
    assert ((naive.double() - exact).abs() / exact).max().item() > 1e-5  # the bar can fail
    (g,) = torch.autograd.grad(out.kl.sum(), lpg)
    assert_matches(g, -torch.expm1(-dd), tol=1e-6, what="d k3 / d logprobs")
    # fp64 inputs stay fp64
    out64 = ro.kl_from_logprobs(lp.double(), ref.double(), beta=1.0, estimator="k3")
    assert out64.kl.dtype == torch.float64
    assert_matches(out64.kl, exact, tol=1e-9, what="fp64 k3")


def _k3_series(d):
    """k3 of float64 values d by its Taylor series in Python floats (|d| < ½), ~1e-16 relative."""
    out = []
    for x in d.tolist():
        term, total, n = x * x / 2, 0.0, 2
        while abs(term) > 1e-40:
            total += term
            n += 1
            term *= -x / n
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


def test_k3_small_log_ratio(backend, device):
    """k3 at 1e-9 ≤ |d| < ½ in fp64 (kl_penalty) and fp32 (kl_from_logprobs): relative to the
    exact k3 of the computed d, where e^{−d} − 1 + d alone keeps no digit at |d| = 1e-9."""
    delta = torch.tensor([1e-9, -1e-7, 2e-5, -3e-3, 0.2, -0.45], dtype=torch.float64)
    x = torch.randn(1, 6, 9, dtype=torch.float64, device=device)
    t = torch.randint(0, 9, (1, 6), device=device)
    r = x.clone()
    r[0, torch.arange(6), t[0]] -= delta.to(device)
    out = ro.kl_penalty(x, r, t, beta=1.0, estimator="k3", backend=backend)
    exact = _k3_series(out.log_ratio.cpu().reshape(-1)).reshape(1, 6)
    rel = ((out.kl.cpu() - exact).abs() / exact).max().item()
    assert rel < 1e-12, rel
    d = out.log_ratio.detach()
    closed = torch.exp(-d) - 1 + d                       # what the bar rules out
    assert ((closed.cpu() - exact).abs() / exact).max().item() > 1e-6
    zero = torch.zeros(6, device=device)                 # d = delta exactly (in fp32)
    o32 = ro.kl_from_logprobs(delta.float().to(device), zero, beta=1.0, estimator="k3")
    exact32 = _k3_series(o32.log_ratio.double().cpu())
    assert ((o32.kl.double().cpu() - exact32).abs() / exact32).max().item() < 1e-6


def test_kl_from_logprobs_low_precision_compile_meta_empty(device):
    lp = (torch.randn(3, 4, device=device) - 3).half().requires_grad_()
    ref = (torch.randn(3, 4, device=device) - 3).half()
    out = ro.kl_from_logprobs(lp, ref, beta=0.1, estimator="k3")
    assert out.kl.dtype == torch.float32
    d = lp.detach().double() - ref.double()
    assert_matches(out.kl, torch.expm1(-d) + d, tol=1e-6, what="fp16 inputs, fp32 math")
    out.kl.sum().backward()
    assert lp.grad.dtype == torch.float16

    def step(lp, ref, mask):
        o = ro.kl_from_logprobs(lp, ref, beta=0.2, estimator="k3", mask=mask)
        return o.kl.sum() + o.penalty.sum()

    import torch._dynamo as dynamo
    dynamo.reset()
    a = torch.randn(2, 7, device=device, requires_grad=True)
    b = torch.randn(2, 7, device=device)
    m = torch.rand(2, 7, device=device) > 0.5
    c = torch.compile(step, fullgraph=True, backend="aot_eager")(a, b, m)
    (gc_,) = torch.autograd.grad(c, a)
    e = step(a, b, m)
    (ge,) = torch.autograd.grad(e, a)
    torch.testing.assert_close(c, e)
    torch.testing.assert_close(gc_, ge)
    meta = torch.empty(4096, 1024, device="meta", requires_grad=True)
    o = ro.kl_from_logprobs(meta, torch.empty(4096, 1024, device="meta"), beta=0.1, estimator="k2")
    assert o.kl.shape == (4096, 1024) and o.kl.device.type == "meta"
    empty = ro.kl_from_logprobs(torch.zeros(0, 5, device=device), torch.zeros(0, 5, device=device),
                                beta=0.1)
    assert empty.kl.shape == (0, 5)


def test_kl_from_logprobs_errors(device):
    lp, ref = torch.randn(2, 3, device=device), torch.randn(2, 3, device=device)
    f = ro.kl_from_logprobs
    with pytest.raises(TypeError, match="logprobs"):
        f(lp.long(), ref, beta=0.1)
    with pytest.raises(TypeError, match="ref_logprobs"):
        f(lp, ref.long(), beta=0.1)
    with pytest.raises(ValueError, match="ref_logprobs must have shape"):
        f(lp, ref[:, :2], beta=0.1)
    with pytest.raises(ValueError, match="ref_logprobs"):
        f(lp, ref.to("meta"), beta=0.1)
    with pytest.raises(ValueError, match="estimator"):
        f(lp, ref, beta=0.1, estimator="k4")
    with pytest.raises(TypeError, match="beta"):
        f(lp, ref, beta=None)
    with pytest.raises(ValueError, match="beta must be finite"):
        f(lp, ref, beta=float("nan"))
    with pytest.raises(ValueError, match="mask"):
        f(lp, ref, beta=0.1, mask=torch.ones(3, 2, dtype=torch.bool, device=device))
    with pytest.raises(TypeError, match="mask"):
        f(lp, ref, beta=0.1, mask=torch.ones(2, 3, dtype=torch.complex64, device=device))
    with pytest.raises(TypeError, match="positional"):
        f(lp, ref, 0.1)                          # beta is keyword-only


def test_estimator_ids_agree_with_the_kernels():
    """One table (reference.ESTIMATOR_IDS) names the estimators' ids; the Triton and CUDA kernels
    compare against literals, which must give each id its own formula (k1 = d, k2 = ½d², k3 the
    rest) and accept exactly the table's ids."""
    import os
    import re
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    formula = {"d": "k1", "0.5 * d * d": "k2", "acc_t(0.5) * d * d": "k2"}
    triton_src = open(os.path.join(root, "kernels", "kl.py")).read()
    got = {formula[f]: int(i) for i, f in
           re.findall(r"ESTIMATOR == (\d+):\s*\n\s*kl = ([^\n]+)", triton_src)}
    cuda_src = open(os.path.join(root, "csrc", "kl.cu")).read()
    m = re.search(r"estimator == (\d+) \? (d) : estimator == (\d+) \? ([^:]+?) : k3\(d\)", cuda_src)
    assert m, "csrc/kl.cu: the estimator selection was not found"
    cuda = {formula[m.group(2)]: int(m.group(1)), formula[m.group(4).strip()]: int(m.group(3))}
    lo, hi = map(int, re.search(r"estimator >= (\d+) && estimator <= (\d+)", cuda_src).groups())
    ids = reference.ESTIMATOR_IDS
    assert got == {k: ids[k] for k in ("k1", "k2")}, f"kernels/kl.py: {got} vs {ids}"
    assert cuda == {k: ids[k] for k in ("k1", "k2")}, f"csrc/kl.cu: {cuda} vs {ids}"
    assert (lo, hi) == (min(ids.values()), max(ids.values())) and ids["k3"] not in (ids["k1"], ids["k2"])
    assert reference.ESTIMATORS == tuple(ids)

