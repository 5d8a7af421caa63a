"""The KL estimators against an oracle that shares no code with ``rlhf_ops.reference``.

Oracle: numpy extended precision (``np.longdouble``: 64-bit mantissa on x86, quad elsewhere;
float64 where the platform has nothing wider), written from the formulas:
    logp_t = y_t − log Σ_j exp(y_j),  y = x / T          (shifted by max y)
    d  = logp − ref_logp
    k1 = d,   k2 = ½ d²,   k3 = e^{−d} − 1 + d = expm1(−d) + d
    entropy = −Σ_j p_j log p_j
and the identity that defines them as KL estimators: with the token drawn from the policy p,
    E_p[k1] = E_p[k3] = KL(p ‖ q) = Σ_j p_j (log p_j − log q_j)
(k3 because E_p[q/p − 1] = 0), checked exactly by summing over every token of the vocabulary.

The near-zero test is the PPO regime (policy ≈ reference, |log_ratio| ~ 1e-4 … 1.5e-3), judged
element by element in fp32: the closed form e^{−d} − 1 + d cancels there (an error ≈ ulp(1)/d²,
~0.2 relative at d = 7e-4), so an implementation without a small-|d| branch fails it.
"""
import numpy as np
import pytest
import torch

import rlhf_ops as ro
from rlhf_ops import reference
from _util import assert_elementwise, max_rel_err

LD = np.longdouble


def _ld(t: torch.Tensor) -> np.ndarray:
    # exact: every fp16/bf16/fp32/fp64 value is representable in long double
    return t.detach().cpu().double().numpy().astype(LD)


def oracle_logp(x: np.ndarray, tokens: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    y = x / LD(temperature)
    m = y.max(-1, keepdims=True)
    lse = m[..., 0] + np.log(np.exp(y - m).sum(-1))
    return np.take_along_axis(y, tokens[..., None], -1)[..., 0] - lse


def oracle_entropy(x: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    y = x / LD(temperature)
    z = y - y.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -(np.exp(logp) * logp).sum(-1)


def oracle_kl(d: np.ndarray, estimator: str) -> np.ndarray:
    if estimator == "k1":
        return d
    if estimator == "k2":
        return d * d / 2
    return np.expm1(-d) + d


def _t(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(a.astype(np.float64)).to(like.device)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_fields_match_closed_form_fp64(backend, device, estimator):
    """Every KLPenalty field in fp64 against the oracle, element-wise, including |d| from 1e-6 to
    ~10 and a temperature."""
    g = torch.Generator().manual_seed(11)
    N, V, T, beta = 40, 97, 0.8, 0.07
    x = (torch.randn(N, V, generator=g, dtype=torch.float64) * 3).to(device)
    r = x + (torch.randn(N, V, generator=g, dtype=torch.float64)
             * torch.logspace(-6, 0.5, N, dtype=torch.float64)[:, None]).to(device)
    tok = torch.randint(0, V, (N,), generator=g).to(device)
    mask = (torch.rand(N, generator=g) > 0.3).to(device)
    out = ro.kl_penalty(x, r, tok, beta=beta, estimator=estimator, mask=mask, temperature=T,
                        backend=backend)
    lp = oracle_logp(_ld(x), tok.cpu().numpy(), T)
    rlp = oracle_logp(_ld(r), tok.cpu().numpy(), T)
    d = lp - rlp
    kl = oracle_kl(d, estimator)
    want = {"logprobs": lp, "ref_logprobs": rlp, "log_ratio": d, "kl": kl,
            "penalty": -LD(beta) * kl * _ld(mask), "entropy": oracle_entropy(_ld(x), T)}
    # Each element's scale of rounding: log-probs are judged on their own size; d = lp − rlp on
    # its operands' (|lp| + |rlp|); kl on d's scale times ∂kl/∂d (1 | d | 1 − e^{−d}).
    A = np.abs(lp) + np.abs(rlp)
    dkl = {"k1": np.ones_like(d), "k2": np.abs(d), "k3": np.abs(np.expm1(-d))}[estimator]
    scale = {"log_ratio": A, "kl": A * dkl, "penalty": beta * A * dkl}
    for field, w in want.items():
        if estimator == "k3" and field in ("kl", "penalty"):
            continue            # test_k3_fp64_small_d, below
        atol = _t(scale[field], x) if field in scale else 0.0
        assert_elementwise(getattr(out, field), _t(w, x), tol=1e-12, atol=atol,
                           what=f"{field} ({estimator}, {backend})")


def test_k3_fp64_small_d(backend, device):
    """k3 in fp64 for 1e-8 ≤ |d| ≤ 1: element-wise against the oracle, relative to k3 plus the
    rounding d inherits from its operands. fp64 needs a small-|d| form too: e^{−d} − 1 + d has
    an absolute error ~ulp(1) = 2.2e-16, i.e. 2.2e-16/(d²/2) relative (4e-4 at d = 1e-6; the
    triton kernel had exactly that, 8.7e-5 at d ≈ 1e-6, until 9e10df4)."""
    g = torch.Generator().manual_seed(2)
    N, V = 40, 31
    x = torch.randn(N, V, generator=g, dtype=torch.float64).to(device)
    r = x.clone()
    tok = torch.randint(0, V, (N,), generator=g).to(device)
    # shift each reference row's token logit: d ≈ δ·(1 − p_t), δ log-spaced from 1e-8 to 1
    delta = torch.logspace(-8, 0, N, dtype=torch.float64) * (torch.arange(N) % 2 * 2 - 1)
    r[torch.arange(N), tok] -= delta.to(device)
    out = ro.kl_penalty(x, r, tok, beta=0.5, estimator="k3", backend=backend)
    lp, rlp = oracle_logp(_ld(x), tok.cpu().numpy()), oracle_logp(_ld(r), tok.cpu().numpy())
    d = lp - rlp
    scale = _t((np.abs(lp) + np.abs(rlp)) * np.abs(np.expm1(-d)), x)
    want = oracle_kl(d, "k3")
    assert_elementwise(out.kl, _t(want, x), tol=1e-12, atol=scale, what=f"k3 fp64 ({backend})")
    assert_elementwise(out.penalty, _t(-0.5 * want, x), tol=1e-12, atol=0.5 * scale,
                       what=f"penalty fp64 ({backend})")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_expectation_over_the_vocabulary_is_kl(backend, device, dtype):
    """Σ_t p_t·k_t over every token t = KL(p‖q) for k1 and k3, and Σ_t p_t·½d_t² for k2."""
    g = torch.Generator().manual_seed(5)
    V = 53
    pol = torch.randn(V, generator=g, dtype=torch.float64) * 2
    ref = pol + torch.randn(V, generator=g, dtype=torch.float64) * 0.3
    x = pol.expand(V, V).to(dtype).to(device)      # row t scores token t: a stride-0 batch
    r = ref.expand(V, V).to(dtype).to(device)
    tok = torch.arange(V, device=device)
    logp = oracle_logp(_ld(x), tok.cpu().numpy())
    logq = oracle_logp(_ld(r), tok.cpu().numpy())
    p = np.exp(logp)
    kl_true = (p * (logp - logq)).sum()
    k2_true = (p * (logp - logq) ** 2 / 2).sum()
    for est, want in (("k1", kl_true), ("k3", kl_true), ("k2", k2_true)):
        def rel(kl):
            return abs(float((_t(p, x) * kl.double()).sum()) - float(want)) / float(want)
        got = rel(ro.kl_penalty(x, r, tok, beta=1.0, estimator=est, backend=backend).kl)
        if dtype == torch.float64:
            bound = 1e-12
        else:   # eager fp32's own error, ×1.05 + 1e-6
            bound = rel(reference.kl_penalty(x, r, tok, 1.0, est).kl) * 1.05 + 1e-6
        assert got <= bound, f"{est} ({backend}, {dtype}): E_p[k] vs KL: relative {got:.2e} > {bound:.2e}"


def _near_zero_inputs(device, n=256, V=64, seed=3):
    """fp32 policy/reference rows whose token log-probs differ by |d| ∈ [1e-4, 1.5e-3], both
    signs: the token leads by 8 (logp ≈ −0.02, so fp32 rounds d to ~1e-9 absolute) and the
    reference shifts the other logits by c ∈ ±[0.005, 0.06] (d ≈ 0.02·(e^c − 1))."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, V, generator=g) * 0.5
    tok = torch.randint(0, V, (n,), generator=g)
    x[torch.arange(n), tok] = 8.0
    c = torch.empty(n).uniform_(0.005, 0.06, generator=g) * (torch.randint(0, 2, (n,), generator=g) * 2 - 1)
    r = x + c[:, None]
    r[torch.arange(n), tok] = 8.0
    return x.to(device), r.to(device), tok.to(device)


@pytest.mark.parametrize("estimator", ["k3", "k2"])
def test_near_zero_log_ratio_elementwise_fp32(backend, device, estimator):
    """PPO regime, policy ≈ reference, element by element in fp32.

    1. The estimator itself: kl against the oracle's k(d) at the op's own fp32 log_ratio d, so
       only the evaluation of k is judged: within eager fp32's worst element (expm1(−d) + d)
       ×1.05 + 1e-6. The closed form e^{−d} − 1 + d is ~1000× over (error ≈ ulp(1)/d²).
    2. End to end against the oracle at the exact d: log_ratio, kl and penalty, each element
       judged relative to its value plus the rounding scale it inherits from the two log-probs
       (|lp| + |rlp|, times ∂kl/∂d for kl), within eager's worst element ×1.05 + 1e-5.
    """
    x, r, tok = _near_zero_inputs(device)
    out = ro.kl_penalty(x, r, tok, beta=0.1, estimator=estimator, backend=backend)
    eager = reference.kl_penalty(x, r, tok, 0.1, estimator)
    lp = oracle_logp(_ld(x), tok.cpu().numpy())
    rlp = oracle_logp(_ld(r), tok.cpu().numpy())
    d = lp - rlp
    assert 1e-4 <= float(np.abs(d).min()) and float(np.abs(d).max()) <= 2e-3, "inputs left the regime"
    assert (d > 0).any() and (d < 0).any()
    # 1. k evaluated at the op's own d
    own = _t(oracle_kl(_ld(out.log_ratio), estimator), x)
    eager_own = _t(oracle_kl(_ld(eager.log_ratio), estimator), x)
    err = max_rel_err(out.kl, own)
    bound = max_rel_err(eager.kl, eager_own) * 1.05 + 1e-6
    assert err <= bound, f"{estimator}(d) at the op's own d ({backend}): worst element {err:.2e} > {bound:.2e}"
    # 2. end to end
    A = np.abs(lp) + np.abs(rlp)
    dkl = np.abs(np.expm1(-d)) if estimator == "k3" else np.abs(d)
    want = _t(oracle_kl(d, estimator), x)
    assert_elementwise(out.log_ratio, _t(d, x), eager.log_ratio, tol=1e-5, atol=_t(A, x),
                       what=f"log_ratio ({backend})")
    assert_elementwise(out.kl, want, eager.kl, tol=1e-5, atol=_t(A * dkl, x),
                       what=f"{estimator} near 0 ({backend})")
    assert_elementwise(out.penalty, -0.1 * want, eager.penalty, tol=1e-5, atol=_t(0.1 * A * dkl, x),
                       what=f"penalty ({backend})")


@pytest.mark.parametrize("estimator", ["k3", "k2"])
def test_near_zero_gradient_fp32(backend, device, estimator):
    """∂kl/∂logits near d = 0: ∂k3/∂d = 1 − e^{−d} (≈ d) and ∂k2/∂d = d, so the gradient is
    ~d·(onehot − p); judged against the oracle's (∂kl/∂d)·(onehot − p)/T in fp32, relative to eager."""
    x, r, tok = _near_zero_inputs(device, n=64)
    xg = x.clone().requires_grad_()
    out = ro.kl_penalty(xg, r, tok, beta=0.1, estimator=estimator, backend=backend)
    gx, = torch.autograd.grad(out.kl.sum(), xg)
    xe = x.clone().requires_grad_()
    ge, = torch.autograd.grad(reference.kl_penalty(xe, r, tok, 0.1, estimator).kl.sum(), xe)
    xl = _ld(x)
    d = oracle_logp(xl, tok.cpu().numpy()) - oracle_logp(_ld(r), tok.cpu().numpy())
    dk = -np.expm1(-d) if estimator == "k3" else d
    z = xl - xl.max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    onehot = np.zeros_like(p)
    onehot[np.arange(len(d)), tok.cpu().numpy()] = 1
    want = _t(dk[:, None] * (onehot - p), x)
    # rows are independent; within a row the entries span many magnitudes: judge each row's
    # entries on the row's scale
    scale = float(np.abs(dk).min()) * 1e-3
    assert_elementwise(gx, want, ge, tol=1e-5, atol=scale, what=f"d{estimator}/dlogits ({backend})")
