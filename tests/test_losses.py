"""Policy, value and preference losses, GAE and group advantages (rlhf_ops/losses.py).

The equivalence contract: every loss type × option equals, in float64, a direct transcription of
its equation written here token by token (Python loops over scalars; nothing of losses.py is
called), values and gradients; dense and packed layouts of the same data agree; micro-batches
with ``num_tokens`` sum to the whole batch's gradient for the token-mean types; and for every
option a case built to show it proves that changing the option changes the loss or the gradient
("no silent drift"). GAE: every backend against a plain Python transcription (dense, packed,
multi-run masks, several blocks of the Triton scan). Bad inputs raise naming the argument. A full
GRPO and DPO step at N = 8,192, H = 4,096, V = 151,936 keeps O(N) bytes for backward besides
hidden and weight (meta device). TRL cross-checks: tests/test_losses_trl.py.
"""
import math
import os
import subprocess
import sys

import pytest
import torch

import rlhf_ops as ro
from rlhf_ops import losses as L
from conftest import DEVICE, ON_GPU

F64 = torch.float64
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# =========================================================================== transcriptions ===
# Scalar code, one token at a time, straight from the equations in rlhf_ops/losses.py's docstrings.

def _logsig(x):
    return -torch.log1p(torch.exp(-x))


def _kl(d, est):
    return {"k1": d, "k2": 0.5 * d * d, "k3": torch.exp(-d) - 1 + d}[est]


def t_policy(lp, old, adv, mask, *, loss_type="ppo", clip=(0.2, 0.2), dual_clip=None, rollout=None,
             is_correction=None, is_cap=2.0, ref=None, beta=0.0, kl_estimator="k3", ent=None,
             entropy_coef=0.0, max_len=None, num_tokens=None):
    """(loss, per_token [B][T] list, clip_fraction, approx_kl) of policy_loss on dense [B, T] data."""
    B, T = lp.shape
    el, eh = clip if isinstance(clip, tuple) else (clip, clip)
    if isinstance(is_cap, tuple):
        cap_lo, cap_hi = is_cap
    else:
        cap_lo, cap_hi = 0.0, is_cap
    total, seq_means, count, n_clip, akl = 0.0, [], 0, 0, 0.0
    per_token = [[0.0] * T for _ in range(B)]
    for b in range(B):
        toks = [t for t in range(T) if mask[b, t]]
        a_of = (lambda t: adv[b]) if adv.dim() == 1 else (lambda t: adv[b, t])
        if loss_type == "gspo":
            s = torch.exp(sum(lp[b, t] - old[b, t] for t in toks) / len(toks)) if toks else torch.tensor(1.0, dtype=F64)
        if is_correction and is_correction.startswith("sequence"):
            log_w_seq = sum(float(old[b, t] - rollout[b, t]) for t in toks)
        seq_total = 0.0
        for t in toks:
            a = float(a_of(t))
            if loss_type == "gspo":
                r = s.detach() * torch.exp(lp[b, t] - lp[b, t].detach())
            else:
                r = torch.exp(lp[b, t] - old[b, t])
            rv = float(r.detach())
            if loss_type == "cispo":
                ell = -min(rv, 1 + eh) * a * lp[b, t]
            else:
                ell = -torch.minimum(r * a, torch.clamp(r, 1 - el, 1 + eh) * a)
                if dual_clip is not None and a < 0:
                    ell = torch.minimum(ell, torch.tensor(-dual_clip * a, dtype=F64))
            if is_correction:
                w = math.exp(log_w_seq if is_correction.startswith("sequence") else float(old[b, t] - rollout[b, t]))
                if is_correction.endswith("truncate"):
                    w = min(max(w, cap_lo), cap_hi)
                else:
                    w = w if cap_lo <= w <= cap_hi else 0.0
                ell = ell * w
            if beta:
                ell = ell + beta * _kl(lp[b, t] - ref[b, t], kl_estimator)
            if entropy_coef:
                ell = ell - entropy_coef * ent[b, t]
            per_token[b][t] = ell
            seq_total = seq_total + ell
            count += 1
            high = rv > 1 + eh and a > 0
            low = rv < 1 - el and a < 0
            n_clip += high or (low and loss_type != "cispo")
            rt = math.exp(float(lp[b, t].detach() - old[b, t]))
            akl += (rt - 1) - math.log(rt)
        total = total + seq_total
        seq_means.append(seq_total / len(toks) if toks else 0.0)
    if loss_type in ("ppo", "dapo", "bnpo", "cispo"):
        loss = total / (num_tokens if num_tokens is not None else max(count, 1))
    elif loss_type in ("grpo", "gspo"):
        loss = sum(seq_means) / B
    else:
        loss = total / (B * max_len)
    return loss, per_token, n_clip / max(count, 1), akl / max(count, 1)


def t_value(v, old, ret, mask, clip=None, num_tokens=None):
    total, count = 0.0, 0
    for i in zip(*torch.where(mask)):
        e = (v[i] - ret[i]) ** 2
        if clip is not None:
            vc = old[i] + torch.clamp(v[i] - old[i], -clip, clip)
            e = torch.maximum(e, (vc - ret[i]) ** 2)
        total = total + 0.5 * e
        count += 1
    return total / (num_tokens if num_tokens is not None else max(count, 1))


def t_gae(r, v, m, gamma, lam):
    """One sequence (Python lists): backwards, carrying V and A of the next unmasked token."""
    adv, ret = [0.0] * len(r), [0.0] * len(r)
    v_next = a_next = 0.0
    for t in reversed(range(len(r))):
        if m[t]:
            a = r[t] + gamma * v_next - v[t] + gamma * lam * a_next
            adv[t], ret[t] = a, a + v[t]
            v_next, a_next = v[t], a
    return adv, ret


def t_group(s, G, scale="group_std", eps=1e-6, loo=False):
    out = []
    for g0 in range(0, len(s), G):
        grp = s[g0:g0 + G]
        mean = sum(grp) / G
        std = math.sqrt(sum((x - mean) ** 2 for x in grp) / (G - 1)) if G > 1 else float("nan")
        for x in grp:
            a = x - (sum(grp) - x) / (G - 1) if loo else x - mean
            out.append(a / (std + eps) if scale == "group_std" else a)
    if scale == "batch_std":
        mean = sum(s) / len(s)
        std = math.sqrt(sum((x - mean) ** 2 for x in s) / (len(s) - 1))
        out = [a / (std + eps) for a in out]
    return out


def t_pref(c, r, cref, rref, loss_type, beta=0.1, eps=0.0, gamma=0.0, lc=None, lr=None):
    out = []
    for b in range(c.shape[0]):
        cb, rb = c[b], r[b]
        free = loss_type in ("simpo", "orpo") or cref is None
        crb, rrb = (0.0, 0.0) if free else (cref[b], rref[b])
        if lc is not None:
            cb, rb, crb, rrb = cb / lc[b], rb / lr[b], crb / lc[b], rrb / lr[b]
        h = (cb - crb) - (rb - rrb)
        if loss_type == "sigmoid":
            x = -(1 - eps) * _logsig(beta * h) - eps * _logsig(-beta * h)
        elif loss_type == "robust":
            x = ((1 - eps) * -_logsig(beta * h) - eps * -_logsig(-beta * h)) / (1 - 2 * eps)
        elif loss_type == "ipo":
            x = (h - 1 / (2 * beta)) ** 2
        elif loss_type == "hinge":
            x = torch.clamp(1 - beta * h, min=0)
        elif loss_type == "simpo":
            z = beta * (cb - rb) - gamma
            x = -(1 - eps) * _logsig(z) - eps * _logsig(-z)
        else:
            odds = (cb - torch.log(1 - torch.exp(cb))) - (rb - torch.log(1 - torch.exp(rb)))
            x = -beta * _logsig(odds)
        out.append(x)
    return torch.stack(out)


# ================================================================================= the data ===

def policy_case(B=4, T=6, dtype=F64, dev=DEVICE):
    """Log-probs with ratios spread over the clip region, one sequence fully masked, one full."""
    g = dict(dtype=dtype, device=dev)
    lp = (-3 * torch.rand(B, T, **g)).requires_grad_()
    old = lp.detach() + 0.4 * torch.randn(B, T, **g)
    mask = torch.rand(B, T, device=dev) > 0.25
    mask[0] = True
    mask[-1] = False
    return dict(lp=lp, old=old, mask=mask, adv=torch.randn(B, **g), adv_tok=torch.randn(B, T, **g),
                rollout=old + 0.5 * torch.randn(B, T, **g), ref=lp.detach() + 0.3 * torch.randn(B, T, **g),
                ent=(2 * torch.rand(B, T, **g)).requires_grad_())


OPTIONS = {   # name → (policy_loss kwargs built from the case, the loss types it applies to)
    "plain": (lambda c: {}, None),
    "clip_asym": (lambda c: {"clip": (0.1, 0.3)}, None),
    "clip_number": (lambda c: {"clip": 0.15}, None),
    "dual_clip": (lambda c: {"dual_clip": 1.1}, "not_cispo"),
    "adv_per_token": (lambda c: {"advantages": c["adv_tok"]}, None),
    "kl_k1": (lambda c: {"ref_logprobs": c["ref"], "beta": 0.1, "kl_estimator": "k1"}, None),
    "kl_k2": (lambda c: {"ref_logprobs": c["ref"], "beta": 0.1, "kl_estimator": "k2"}, None),
    "kl_k3": (lambda c: {"ref_logprobs": c["ref"], "beta": 0.1}, None),
    "entropy": (lambda c: {"entropy": c["ent"], "entropy_coef": 0.05}, None),
    "num_tokens": (lambda c: {"num_tokens": 37}, "token_mean"),
    "num_tokens_tensor": (lambda c: {"num_tokens": torch.tensor(23.0, device=DEVICE)}, "token_mean"),
}
for _mode in L.IS_CORRECTIONS:
    OPTIONS[f"is_{_mode}"] = (lambda c, _m=_mode: {"rollout_logprobs": c["rollout"], "is_correction": _m}, None)
    OPTIONS[f"is_{_mode}_pair"] = (lambda c, _m=_mode: {"rollout_logprobs": c["rollout"], "is_correction": _m,
                                                        "is_cap": (0.5, 1.5)}, None)
OPTIONS["everything"] = (lambda c: {"rollout_logprobs": c["rollout"], "is_correction": "token_mask",
                                    "ref_logprobs": c["ref"], "beta": 0.05, "entropy": c["ent"],
                                    "entropy_coef": 0.01, "clip": (0.1, 0.28), "advantages": c["adv_tok"]}, None)


def _applies(lt, which):
    return which is None or (which == "not_cispo" and lt != "cispo") or (
        which == "token_mean" and lt in L.TOKEN_MEAN_TYPES)


def _policy_kwargs(case, lt, opt):
    kw = {"loss_type": lt, "advantages": case["adv"]}
    if lt == "dr_grpo":
        kw["max_len"] = 7
    kw.update(OPTIONS[opt][0](case))
    return kw


def _t_kwargs(case, kw):
    """The transcription's keyword arguments for the same call."""
    out = dict(loss_type=kw["loss_type"], clip=tuple(kw["clip"]) if isinstance(kw.get("clip"), tuple)
               else kw.get("clip", (0.2, 0.2)), dual_clip=kw.get("dual_clip"),
               rollout=kw.get("rollout_logprobs"), is_correction=kw.get("is_correction"),
               is_cap=kw.get("is_cap", 2.0), ref=kw.get("ref_logprobs"), beta=kw.get("beta", 0.0),
               kl_estimator=kw.get("kl_estimator", "k3"), ent=kw.get("entropy"),
               entropy_coef=kw.get("entropy_coef", 0.0), max_len=kw.get("max_len"))
    nt = kw.get("num_tokens")
    out["num_tokens"] = float(nt) if nt is not None else None
    return out


def _grads(loss, leaves):
    gs = torch.autograd.grad(loss, [x for x in leaves if x is not None and x.requires_grad], allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(gs, [x for x in leaves if x is not None
                                                                          and x.requires_grad])]


def _close(a, b, tol=1e-11, what=""):
    a, b = torch.as_tensor(a, dtype=F64).detach().cpu(), torch.as_tensor(b, dtype=F64).detach().cpu()
    assert torch.allclose(a, b, rtol=tol, atol=tol, equal_nan=True), f"{what}: {a} vs {b}"


# ============================================================================= policy loss ===

POLICY_PARAMS = [pytest.param(lt, opt, id=f"{lt}-{opt}") for lt in L.LOSS_TYPES for opt, (_, which)
                 in OPTIONS.items() if _applies(lt, which)]


@pytest.mark.parametrize("lt,opt", POLICY_PARAMS)
def test_policy_loss_equals_transcription(lt, opt):
    """Loss, per-token ℓ, clip fraction, approx KL and the gradients w.r.t. logprobs (and entropy),
    in float64, against the token-by-token transcription of the loss type's equation."""
    c = policy_case()
    kw = _policy_kwargs(c, lt, opt)
    out = ro.policy_loss(c["lp"], c["old"], mask=c["mask"], **kw)
    adv = kw.pop("advantages")
    ref_loss, ref_tok, ref_cf, ref_akl = t_policy(c["lp"], c["old"], adv, c["mask"], **_t_kwargs(c, {**kw}))
    _close(out.loss, ref_loss, what="loss")
    B, T = c["lp"].shape
    tok = torch.stack([torch.stack([torch.as_tensor(x, dtype=F64) for x in row]) for row in ref_tok])
    _close(out.per_token, tok, what="per_token")
    _close(out.clip_fraction, ref_cf, what="clip_fraction")
    _close(out.approx_kl, ref_akl, what="approx_kl")
    leaves = [c["lp"], c["ent"] if kw.get("entropy") is not None else None]
    for g, gr, name in zip(_grads(out.loss, leaves), _grads(ref_loss, leaves), ("logprobs", "entropy")):
        _close(g, gr, what=f"d loss / d {name}")
    assert out.loss.dtype == F64 and out.per_token.shape == (B, T)
    assert (out.kl is None) == (kw.get("beta", 0.0) == 0)
    if out.kl is not None:
        _close(out.kl, _kl(c["lp"] - kw["ref_logprobs"], kw.get("kl_estimator", "k3")), what="kl")


def test_policy_loss_fields():
    """ratio: r per token (gspo: the sequence's s); is_weight: the IS weight (ones without
    correction); a masked token contributes 0 to per_token."""
    c = policy_case()
    m = c["mask"]
    out = ro.policy_loss(c["lp"], c["old"], c["adv"], m)
    _close(out.ratio, torch.exp(c["lp"] - c["old"]))
    assert torch.equal(out.is_weight, torch.ones_like(out.ratio)) and not out.ratio.requires_grad
    assert torch.all(out.per_token[~m] == 0)
    g = ro.policy_loss(c["lp"], c["old"], c["adv"], m, loss_type="gspo")
    for b in range(3):
        s = math.exp(float((c["lp"][b] - c["old"][b])[m[b]].mean()))
        _close(g.ratio[b], torch.full((6,), s, dtype=F64))
    w = ro.policy_loss(c["lp"], c["old"], c["adv"], m, rollout_logprobs=c["rollout"], is_correction="token_truncate")
    _close(w.is_weight, torch.exp(c["old"] - c["rollout"]).clamp(max=2.0))
    s = ro.policy_loss(c["lp"], c["old"], c["adv"], m, rollout_logprobs=c["rollout"],
                       is_correction="sequence_mask", is_cap=(0.5, 1.5))
    for b in range(4):
        wb = math.exp(float((c["old"][b] - c["rollout"][b])[m[b]].sum()))
        _close(s.is_weight[b], torch.full((6,), wb if 0.5 <= wb <= 1.5 else 0.0, dtype=F64))


def _pack(x, mask, keep_masked):
    """Dense [B, T] → packed [N] (the unmasked tokens only, or every token with the mask)."""
    rows = [x[b] if keep_masked else x[b][mask[b]] for b in range(x.shape[0])]
    lens = [len(r) for r in rows]
    cu = torch.tensor([0] + [sum(lens[:i + 1]) for i in range(len(lens))], dtype=torch.int32, device=x.device)
    return torch.cat(rows), cu


@pytest.mark.parametrize("keep_masked", [True, False], ids=["with_mask", "unmasked_only"])
@pytest.mark.parametrize("lt", L.LOSS_TYPES)
def test_policy_loss_dense_and_packed_agree(lt, keep_masked):
    c = policy_case()
    m = c["mask"]
    kw = _policy_kwargs(c, lt, "everything" if lt != "cispo" else "entropy")
    kw.pop("advantages")
    tok_opts = [k for k in ("rollout_logprobs", "ref_logprobs", "entropy") if k in kw]
    dense = ro.policy_loss(c["lp"], c["old"], c["adv"], m, **kw)
    gd = _grads(dense.loss, [c["lp"]])[0]
    lp_p, cu = _pack(c["lp"], m, keep_masked)
    pk = {k: _pack(kw[k], m, keep_masked)[0] for k in tok_opts}
    packed = ro.policy_loss(lp_p, _pack(c["old"], m, keep_masked)[0], c["adv"],
                            _pack(m, m, keep_masked)[0] if keep_masked else None,
                            cu_seqlens=cu, **{**kw, **pk})
    _close(packed.loss, dense.loss, what="loss")
    gp = _grads(packed.loss, [c["lp"]])[0]
    _close(gp, gd, what="gradient")
    _close(packed.per_token, _pack(dense.per_token, m, keep_masked)[0], what="per_token")
    for f in ("clip_fraction", "approx_kl"):
        _close(getattr(packed, f), getattr(dense, f), what=f)


@pytest.mark.parametrize("lt", L.TOKEN_MEAN_TYPES)
def test_micro_batches_with_num_tokens_sum_to_the_batch_gradient(lt):
    """Σ over micro-batches of loss(num_tokens = the whole batch's count) has the whole batch's
    gradient (the gradient-accumulation / data-parallel normaliser)."""
    c = policy_case(B=5, T=7)
    c["mask"][-1, :3] = True
    m = c["mask"]
    kw = dict(loss_type=lt, ref_logprobs=c["ref"], beta=0.02, rollout_logprobs=c["rollout"],
              is_correction="token_truncate", entropy=c["ent"], entropy_coef=0.01)
    whole = ro.policy_loss(c["lp"], c["old"], c["adv"], m, **kw)
    g_whole = _grads(whole.loss, [c["lp"], c["ent"]])
    n = int(m.sum())
    total = 0.0
    for rows in (slice(0, 2), slice(2, 3), slice(3, 5)):
        part = {k: (v[rows] if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        total = total + ro.policy_loss(c["lp"][rows], c["old"][rows], c["adv"][rows], m[rows],
                                       num_tokens=torch.tensor(n, device=DEVICE), **part).loss
    _close(total, whole.loss, what="loss")
    for a, b in zip(_grads(total, [c["lp"], c["ent"]]), g_whole):
        _close(a, b, what="gradient")


@pytest.mark.parametrize("lt", L.LOSS_TYPES)
def test_policy_loss_without_unmasked_tokens_is_zero(lt):
    c = policy_case()
    kw = {"max_len": 5} if lt == "dr_grpo" else {}
    m = torch.zeros_like(c["mask"])
    out = ro.policy_loss(c["lp"], c["old"], c["adv"], m, loss_type=lt, ref_logprobs=c["ref"], beta=0.1,
                         entropy=c["ent"], entropy_coef=0.1, **kw)
    assert float(out.loss) == 0.0 and float(out.clip_fraction) == 0.0 and float(out.approx_kl) == 0.0
    for g in _grads(out.loss, [c["lp"], c["ent"]]):
        assert torch.count_nonzero(g) == 0
    lp = torch.zeros(0, dtype=F64, requires_grad=True)     # an empty packed batch
    e = ro.policy_loss(lp, lp.detach(), torch.zeros(0, dtype=F64), cu_seqlens=torch.zeros(1, dtype=torch.int32),
                       loss_type=lt, **kw)
    assert float(e.loss) == 0.0


def test_policy_loss_is_weight_decided_in_log_space():
    """An IS weight of e^800 (overflows fp64) is capped or masked, never inf or NaN."""
    c = policy_case()
    roll = c["rollout"].clone()
    roll[0, 0] = c["old"][0, 0] - 800.0
    for mode in L.IS_CORRECTIONS:
        out = ro.policy_loss(c["lp"], c["old"], c["adv"], c["mask"], rollout_logprobs=roll, is_correction=mode)
        assert torch.isfinite(out.loss) and torch.isfinite(out.is_weight).all(), mode
        expect = 0.0 if mode.endswith("mask") else 2.0
        assert float(out.is_weight[0, 0]) == expect, mode
        assert all(torch.isfinite(g).all() for g in _grads(out.loss, [c["lp"]]))


def test_policy_loss_nan_propagates():
    c = policy_case()
    lp = c["lp"].detach().clone()
    lp[0, 1] = float("nan")
    assert torch.isnan(ro.policy_loss(lp, c["old"], c["adv"], c["mask"]).loss)
    lp = c["lp"].detach().clone()
    lp[-1, 1] = float("nan")     # a masked token: no effect
    assert torch.isfinite(ro.policy_loss(lp, c["old"], c["adv"], c["mask"]).loss)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_policy_loss_low_precision_inputs(dtype):
    """fp32 result for fp32/bf16 inputs, as close to the fp64 result as eager torch in that dtype."""
    c = policy_case()
    kw = dict(loss_type="grpo", ref_logprobs=c["ref"].to(dtype), beta=0.04)
    out = ro.policy_loss(c["lp"].detach().to(dtype), c["old"].to(dtype), c["adv"].to(dtype), c["mask"], **kw)
    assert out.loss.dtype == torch.float32
    ref = t_policy(c["lp"].detach().to(dtype).double(), c["old"].to(dtype).double(), c["adv"].to(dtype).double(),
                   c["mask"], loss_type="grpo", ref=c["ref"].to(dtype).double(), beta=0.04)[0]
    assert abs(float(out.loss) - float(ref)) <= 1e-6 * (1 + abs(float(ref)))


def test_policy_loss_composes_with_linear_token_logprobs():
    """A GRPO step from hidden states: the gradient reaches hidden and the LM head through the fused
    log-prob op (triton under the interpreter) and equals the eager step's."""
    torch.manual_seed(1)
    B, T, H, V = 2, 5, 16, 37
    g = dict(device=DEVICE)
    h = torch.randn(B * T, H, **g, requires_grad=True)
    W = (torch.randn(V, H, **g) / 4).requires_grad_()
    tok = torch.randint(0, V, (B * T,), **g)
    old = torch.randn(B, T, **g) * 0.1 - 3.6
    adv = torch.randn(B, **g)
    mask = torch.rand(B, T, **g) > 0.2
    grads = {}
    for be in ("reference", "triton"):
        if be == "triton" and "triton" not in ro.available_backends():
            pytest.skip("triton is not available")
        lp, ent = ro.linear_token_logprobs(h, W, tok, return_entropy=True, backend=be)
        out = ro.policy_loss(lp.view(B, T), old, adv, mask, loss_type="grpo", ref_logprobs=old, beta=0.04,
                             entropy=ent.view(B, T), entropy_coef=0.01)
        grads[be] = torch.autograd.grad(out.loss, [h, W])
    tol = 2e-3 if ON_GPU else 1e-4           # a GPU's fp32 matmuls may round through TF32
    for a, b in zip(grads["triton"], grads["reference"]):
        assert torch.allclose(a, b, rtol=tol, atol=tol * 1e-2)


# ============================================================================== value loss ===

@pytest.mark.parametrize("clip", [None, 0.2])
@pytest.mark.parametrize("num_tokens", [None, 11])
def test_value_loss_equals_transcription(clip, num_tokens):
    B, T = 3, 7
    v = torch.randn(B, T, dtype=F64, requires_grad=True)
    old = v.detach() + 0.4 * torch.randn(B, T, dtype=F64)
    ret = torch.randn(B, T, dtype=F64)
    m = torch.rand(B, T) > 0.3
    out = ro.value_loss(v, old, ret, m, clip=clip, num_tokens=num_tokens)
    ref = t_value(v, old, ret, m, clip, num_tokens)
    _close(out, ref)
    _close(_grads(out, [v])[0], _grads(ref, [v])[0])
    vp, cu = _pack(v, m, False)
    packed = ro.value_loss(vp, _pack(old, m, False)[0], _pack(ret, m, False)[0], cu_seqlens=cu, clip=clip,
                           num_tokens=num_tokens)
    _close(packed, out)
    none = ro.value_loss(v, old, ret, torch.zeros_like(m), clip=clip)
    assert float(none.detach()) == 0 and torch.count_nonzero(_grads(none, [v])[0]) == 0


# ===================================================================================== GAE ===

def _gae_backends():
    out = ["reference"]
    if "triton" in ro.available_backends():
        out.append("triton")
    if ON_GPU and "cuda" in ro.available_backends():
        out.append("cuda")
    return out


def _multi_run_mask(B, T, dev=DEVICE):
    """Several runs per row (tool tokens masked), a fully masked row, a row ending unmasked."""
    m = torch.rand(B, T, device=dev) > 0.35
    m[0] = True
    m[1] = False
    m[2, :3] = False
    m[2, T - 4:] = False
    return m


def _check_gae(adv, ret, r, v, m, cu, gamma, lam, tol):
    r, v, m = r.double().cpu(), v.double().cpu(), m.cpu()
    adv, ret = adv.double().cpu(), ret.double().cpu()
    if cu is None:
        segs = [(b, slice(None)) for b in range(r.shape[0])]
    else:
        segs = [(None, slice(int(cu[b]), int(cu[b + 1]))) for b in range(cu.shape[0] - 1)]
    for b, sl in segs:
        rr, vv, mm = (r[b], v[b], m[b]) if b is not None else (r[sl], v[sl], m[sl])
        aa, re = (adv[b], ret[b]) if b is not None else (adv[sl], ret[sl])
        ea, er = t_gae(rr.tolist(), vv.tolist(), mm.tolist(), gamma, lam)
        scale = 1 + max([abs(x) for x in ea] + [0.0])
        assert torch.allclose(aa, torch.tensor(ea, dtype=F64), rtol=0, atol=tol * scale), (aa, ea)
        assert torch.allclose(re, torch.tensor(er, dtype=F64), rtol=0, atol=tol * scale), (re, er)


GAE_COEFS = [(1.0, 0.95), (0.99, 0.9), (0.5, 0.0), (0.0, 1.0)]


@pytest.mark.parametrize("gamma,lam", GAE_COEFS, ids=[f"g{g}-l{l}" for g, l in GAE_COEFS])
@pytest.mark.parametrize("backend", _gae_backends())
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_gae_dense(backend, gamma, lam, dtype):
    B, T = 5, 37
    r, v = torch.randn(B, T, dtype=dtype, device=DEVICE), torch.randn(B, T, dtype=dtype, device=DEVICE)
    m = _multi_run_mask(B, T)
    r[~m] = float("nan")            # never read: rewards and values at masked tokens are ignored
    v[~m] = float("nan")
    adv, ret = ro.gae(r, v, m, gamma=gamma, lam=lam, backend=backend)
    assert adv.dtype == (F64 if dtype == F64 else torch.float32) and not adv.requires_grad
    _check_gae(adv, ret, r, v, m, None, gamma, lam, 1e-12 if dtype == F64 else 2e-6)


@pytest.mark.parametrize("backend", _gae_backends())
def test_gae_packed(backend):
    lens = [7, 0, 1, 19, 12]
    cu = torch.tensor([0] + [sum(lens[:i + 1]) for i in range(len(lens))], dtype=torch.int32, device=DEVICE)
    N = sum(lens)
    r, v = torch.randn(N, dtype=F64, device=DEVICE), torch.randn(N, dtype=F64, device=DEVICE)
    m = torch.rand(N, device=DEVICE) > 0.3
    adv, ret = ro.gae(r, v, m, gamma=0.99, lam=0.95, cu_seqlens=cu, backend=backend)
    _check_gae(adv, ret, r, v, m, cu, 0.99, 0.95, 1e-12)
    # the same sequences padded to [B, T] agree with the packed layout
    T = max(lens)
    dense = torch.zeros(len(lens), T, dtype=F64, device=DEVICE)
    dv, dm = dense.clone(), torch.zeros(len(lens), T, dtype=torch.bool, device=DEVICE)
    for b, n in enumerate(lens):
        s = int(cu[b])
        dense[b, :n], dv[b, :n], dm[b, :n] = r[s:s + n], v[s:s + n], m[s:s + n]
    da, dr = ro.gae(dense, dv, dm, gamma=0.99, lam=0.95, backend=backend)
    assert torch.allclose(da[dm], adv[m], atol=1e-12) and torch.allclose(dr[dm], ret[m], atol=1e-12)


def test_gae_triton_scan_across_blocks():
    """The Triton scan with 16-position blocks over sequences of up to 100 tokens: the carries of
    V' and A' cross block boundaries, inside masked gaps too."""
    if "triton" not in ro.available_backends():
        pytest.skip("triton is not available")
    from rlhf_ops.kernels import losses as K
    B, T = 3, 100
    r, v = torch.randn(B, T, dtype=F64, device=DEVICE), torch.randn(B, T, dtype=F64, device=DEVICE)
    m = _multi_run_mask(B, T)
    m[0, 14:35] = False            # a gap spanning a whole block
    adv, ret = K.gae(r, v, m.to(torch.uint8), None, 0.97, 0.9, block=16)
    _check_gae(adv, ret, r, v, m, None, 0.97, 0.9, 1e-12)
    cu = torch.tensor([0, 33, 33, 300], dtype=torch.int32, device=DEVICE)
    r, v, m = r.reshape(-1), v.reshape(-1), m.reshape(-1)
    adv, ret = K.gae(r, v, m.to(torch.uint8), cu, 1.0, 0.95, block=16)
    _check_gae(adv, ret, r, v, m, cu, 1.0, 0.95, 1e-12)


@pytest.mark.parametrize("backend", _gae_backends())
def test_gae_nan_propagates_within_its_sequence(backend):
    B, T = 2, 9
    r, v = torch.randn(B, T, device=DEVICE), torch.randn(B, T, device=DEVICE)
    m = torch.ones(B, T, dtype=torch.bool, device=DEVICE)
    m[:, 6] = False
    r[0, 4] = float("nan")          # unmasked: reaches positions ≤ 4 of row 0 only
    r[1, 6] = float("nan")          # masked: never read
    adv, _ = ro.gae(r, v, m, backend=backend)
    assert torch.isnan(adv[0, :5]).all() and torch.isfinite(adv[0, 5:]).all()
    assert torch.isfinite(adv[1]).all()


@pytest.mark.parametrize("backend", _gae_backends())
def test_gae_low_precision_and_empty(backend):
    B, T = 3, 11
    r, v = torch.randn(B, T, device=DEVICE), torch.randn(B, T, device=DEVICE)
    m = _multi_run_mask(B, T)
    adv, ret = ro.gae(r.bfloat16(), v.bfloat16(), m, backend=backend)
    assert adv.dtype == torch.float32
    _check_gae(adv, ret, r.bfloat16().float(), v.bfloat16().float(), m, None, 1.0, 0.95, 2e-6)
    for shape in ((0, 5), (3, 0)):
        z = torch.zeros(shape, device=DEVICE)
        a, rr = ro.gae(z, z, torch.ones(shape, dtype=torch.bool, device=DEVICE), backend=backend)
        assert a.shape == shape and rr.shape == shape
    for cu in ([0], [0, 0, 0]):
        z = torch.zeros(0, device=DEVICE)
        a, _ = ro.gae(z, z, None, cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=DEVICE), backend=backend)
        assert a.shape == (0,)


def test_gae_matches_the_loop_ppo_used():
    """Bitwise the recursion of the training loop's former private gae (one contiguous run per row,
    left prompt and right padding masked): δ_t = r_t + γ·V_{t+1}·m_{t+1} − V_t, A_t = δ_t + γλ·m_{t+1}·A_{t+1}."""
    B, T, gamma, lam = 4, 13, 1.0, 0.95
    r, v = torch.randn(B, T), torch.randn(B, T)
    pos = torch.arange(T)
    start, end = torch.tensor([0, 2, 3, 5]), torch.tensor([13, 9, 11, 6])
    mask = ((pos >= start[:, None]) & (pos < end[:, None])).float()
    adv = torch.zeros_like(r)
    run = torch.zeros(B)
    for t in reversed(range(T)):
        nxt = mask[:, t + 1] if t + 1 < T else torch.zeros(B)
        v_next = v[:, t + 1] * nxt if t + 1 < T else torch.zeros(B)
        run = r[:, t] + gamma * v_next - v[:, t] + gamma * lam * nxt * run
        adv[:, t] = run
    a, ret = ro.gae(r, v, mask, gamma=gamma, lam=lam, backend="reference")
    assert torch.equal(a, adv * mask) and torch.equal(ret, (adv * mask + v) * mask)


def test_gae_custom_op_opcheck_and_compile():
    if "triton" not in ro.available_backends():
        pytest.skip("triton is not available")
    r, v = torch.randn(2, 9, device=DEVICE), torch.randn(2, 9, device=DEVICE)
    m = (torch.rand(2, 9, device=DEVICE) > 0.3).to(torch.uint8)
    torch.library.opcheck(torch.ops.rlhf_ops.gae_fwd.default, (r, v, m, None, 0.99, 0.95, "triton"))
    cu = torch.tensor([0, 4, 18], dtype=torch.int32, device=DEVICE)
    torch.library.opcheck(torch.ops.rlhf_ops.gae_fwd.default,
                          (r.reshape(-1), v.reshape(-1), m.reshape(-1), cu, 1.0, 0.9, "triton"))
    f = torch.compile(lambda a, b, c: ro.gae(a, b, c, gamma=0.99, backend="triton"), fullgraph=True,
                      backend="aot_eager")
    got = f(r, v, m.bool())
    exp = ro.gae(r, v, m.bool(), gamma=0.99, backend="reference")
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(got, exp))


@pytest.mark.skipif(not ON_GPU, reason="the CUDA kernel needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.bfloat16])
def test_gae_cuda_long_sequences(dtype):
    """The CUDA and Triton scans over long sequences (many chunks), dense and packed, against the
    reference loop."""
    B, T = 6, 3001
    r, v = torch.randn(B, T, device="cuda", dtype=dtype), torch.randn(B, T, device="cuda", dtype=dtype)
    m = _multi_run_mask(B, T, "cuda")
    m[3, 100:700] = False
    ref = ro.gae(r, v, m, gamma=0.999, lam=0.95, backend="reference")
    lens = [3001, 0, 5000, 1, 9004]
    cu = torch.tensor([0] + [sum(lens[:i + 1]) for i in range(len(lens))], dtype=torch.int32, device="cuda")
    ref_p = ro.gae(r.reshape(-1), v.reshape(-1), m.reshape(-1), gamma=0.999, lam=0.95, cu_seqlens=cu,
                   backend="reference")
    tol = 1e-10 if dtype == F64 else 1e-4
    for be in ("cuda", "triton"):
        got = ro.gae(r, v, m, gamma=0.999, lam=0.95, backend=be)
        got_p = ro.gae(r.reshape(-1), v.reshape(-1), m.reshape(-1), gamma=0.999, lam=0.95, cu_seqlens=cu,
                       backend=be)
        for x, y in zip(got + got_p, ref + ref_p):
            assert torch.allclose(x, y, rtol=tol, atol=tol * (1 + y.abs().max())), be


# ======================================================================== group advantages ===

@pytest.mark.parametrize("scale", L.ADV_SCALES)
@pytest.mark.parametrize("loo", [False, True])
def test_group_advantages_equal_transcription(scale, loo):
    s = torch.randn(12, dtype=F64, requires_grad=True)
    out = ro.group_advantages(s, 4, scale=scale, eps=1e-4, leave_one_out=loo)
    _close(out, torch.tensor(t_group(s.tolist(), 4, scale, 1e-4, loo), dtype=F64))
    assert out.shape == (12,) and out.requires_grad
    f = ro.group_advantages(s.float(), 3)
    assert f.dtype == torch.float32
    _close(f, torch.tensor(t_group(s.float().double().tolist(), 3), dtype=F64), tol=1e-5)


# ======================================================================= sequence log-probs ===

@pytest.mark.parametrize("reduce", L.SEQ_REDUCES)
def test_sequence_logprobs(reduce):
    c = policy_case()
    m = c["mask"]
    out = ro.sequence_logprobs(c["lp"], m, reduce=reduce)
    exp = []
    for b in range(4):
        toks = [c["lp"][b, t] for t in range(6) if m[b, t]]
        s = sum(toks) if toks else torch.tensor(0.0, dtype=F64)
        exp.append(s / len(toks) if reduce == "mean" and toks else s)
    _close(out, torch.stack([torch.as_tensor(e, dtype=F64) for e in exp]))
    lp, cu = _pack(c["lp"], m, False)
    _close(ro.sequence_logprobs(lp, cu_seqlens=cu, reduce=reduce), out)
    _close(_grads(out.sum(), [c["lp"]])[0], _grads(ro.sequence_logprobs(lp, cu_seqlens=cu, reduce=reduce).sum(),
                                                  [c["lp"]])[0])


# ========================================================================= preference loss ===

def pref_case(B=6):
    c = (-torch.rand(B, dtype=F64) * 20 - 1).requires_grad_()
    r = (-torch.rand(B, dtype=F64) * 20 - 1).requires_grad_()
    return c, r, c.detach() + torch.randn(B, dtype=F64), r.detach() + torch.randn(B, dtype=F64), \
        torch.randint(3, 30, (B,)), torch.randint(3, 30, (B,))


PREF_OPTIONS = {
    "sigmoid": [{}, {"label_smoothing": 0.1}, {"ref": False}, {"beta": 0.5}],
    "robust": [{}, {"label_smoothing": 0.2}, {"ref": False}],
    "ipo": [{}, {"lengths": True}, {"ref": False, "lengths": True}, {"beta": 1.0}],
    "hinge": [{}, {"ref": False}, {"beta": 2.0}],
    "simpo": [{"lengths": True}, {"lengths": True, "gamma": 0.5, "label_smoothing": 0.1}, {}, {"beta": 2.0}],
    "orpo": [{"lengths": True}, {}, {"beta": 0.25, "lengths": True}],
}
PREF_PARAMS = [pytest.param(lt, o, id=f"{lt}-{'-'.join(f'{k}{v}' for k, v in o.items()) or 'plain'}")
               for lt, opts in PREF_OPTIONS.items() for o in opts]


@pytest.mark.parametrize("lt,opt", PREF_PARAMS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_preference_loss_equals_transcription(lt, opt, reduction):
    c, r, cr, rr, lc, lr = pref_case()
    if lt == "orpo" and not opt.get("lengths"):
        c, r = (c.detach() / lc).requires_grad_(), (r.detach() / lr).requires_grad_()   # already averaged
    use_ref = opt.get("ref", True)
    kw = dict(loss_type=lt, beta=opt.get("beta", 0.1), label_smoothing=opt.get("label_smoothing", 0.0),
              gamma=opt.get("gamma", 0.0), reduction=reduction)
    if opt.get("lengths"):
        kw.update(chosen_lengths=lc, rejected_lengths=lr)
    out = ro.preference_loss(c, r, cr if use_ref else None, rr if use_ref else None, **kw)
    per = t_pref(c, r, cr if use_ref else None, rr if use_ref else None, lt, kw["beta"], kw["label_smoothing"],
                 kw["gamma"], lc if opt.get("lengths") else None, lr if opt.get("lengths") else None)
    _close(out.per_pair, per, what="per_pair")
    red = {"mean": per.mean(), "sum": per.sum(), "none": per}[reduction]
    _close(out.loss, red, what="loss")
    for a, b in zip(_grads(out.loss.sum(), [c, r]), _grads(red.sum(), [c, r])):
        _close(a, b, what="gradient")
    # implicit rewards: β·(logp − ref), length-averaged where the type averages; β·logp without ref
    B = c.shape[0]
    ln = (lc, lr) if opt.get("lengths") else (torch.ones(B), torch.ones(B))
    free = lt in L.REFERENCE_FREE or not use_ref
    for got, lp, ref, n in ((out.chosen_rewards, c, cr, ln[0]), (out.rejected_rewards, r, rr, ln[1])):
        _close(got, kw["beta"] * (lp.detach() - (0 if free else ref)) / n, what="rewards")
    _close(out.reward_accuracy, (out.chosen_rewards > out.rejected_rewards).double().mean())


def test_preference_loss_low_precision_and_empty():
    c, r, cr, rr, _, _ = pref_case()
    out = ro.preference_loss(c.detach().bfloat16(), r.detach().bfloat16(), cr.bfloat16(), rr.bfloat16())
    assert out.loss.dtype == torch.float32
    ref = t_pref(c.detach().bfloat16().double(), r.detach().bfloat16().double(), cr.bfloat16().double(),
                 rr.bfloat16().double(), "sigmoid").mean()
    assert abs(float(out.loss) - float(ref)) < 1e-6
    z = torch.zeros(0)
    e = ro.preference_loss(z, z, z, z)
    assert float(e.loss) == 0 and float(e.reward_accuracy) == 0 and e.per_pair.shape == (0,)


# =================================================================== no silent drift ===
# For every option: a case built to show it, where changing the option changes the loss or
# the gradient. An option that is accepted and ignored fails here.

def _outputs(fn):
    """(value tensors, gradient tensors) of fn() → (outputs, leaves)."""
    outs, leaves = fn()
    outs = [o for o in (outs if isinstance(outs, (tuple, list)) else [outs]) if isinstance(o, torch.Tensor)]
    loss = sum(o.sum() for o in outs if o.requires_grad)
    gs = _grads(loss, leaves) if isinstance(loss, torch.Tensor) and leaves else []
    return [o.detach() for o in outs], gs


def _differs(base, alt):
    a, b = _outputs(base), _outputs(alt)
    diff = any(x.shape != y.shape or not torch.allclose(x, y, rtol=1e-9, atol=1e-12, equal_nan=True)
               for xs, ys in zip(a, b) for x, y in zip(xs, ys))
    return diff


def _drift_cases():
    """name → (base fn, [alternative fns]); each fn returns (outputs, leaves)."""
    c = policy_case(B=4, T=8, dev="cpu")
    c["mask"][-1, :4] = True
    lp, m = c["lp"], c["mask"]
    # every row spans ratios 0.5 .. 2 (both clip regions), advantages of both signs
    old = lp.detach() - torch.linspace(-0.7, 0.7, 8, dtype=F64) * torch.tensor([1.0, -1.0, 0.8, -0.6], dtype=F64)[:, None]
    adv = torch.tensor([1.0, -1.0, 0.5, -2.0], dtype=F64)
    # IS weights: token weights from 0.4 to 2.7, sequence weights 1.5, 0.6, 3.0 and 1.1
    n = m.sum(1, keepdim=True).clamp(min=1).double()
    seq_w = torch.tensor([1.5, 0.6, 3.0, 1.1], dtype=F64)[:, None].log()
    tok_w = torch.linspace(-0.9, 1.0, 8, dtype=F64)
    c["rollout"] = old - torch.where(m, seq_w / n + tok_w - (tok_w * m).sum(1, keepdim=True) / n, tok_w)

    def pl(**kw):
        kw.setdefault("loss_type", "ppo")
        if kw["loss_type"] == "dr_grpo":
            kw.setdefault("max_len", 9)
        a = kw.pop("advantages", adv)
        mm = kw.pop("mask", m)
        return lambda: (ro.policy_loss(lp, old, a, mm, **kw)[:2], [lp, c["ent"]])

    cases = {}
    # loss types with different aggregation or per-token loss (ppo, dapo and bnpo are one formula
    # by the contract — three names for three sources — and are checked equal instead)
    distinct = ("ppo", "grpo", "dr_grpo", "gspo", "cispo")
    cases["loss_type"] = (pl(), [pl(loss_type=t) for t in distinct[1:]])
    for t in distinct[1:]:
        cases[f"loss_type-{t}-vs-grpo"] = (pl(loss_type="grpo"), [pl(loss_type=t)] if t != "grpo" else [])
    cases["clip-eps_low"] = (pl(), [pl(clip=(0.05, 0.2))])
    cases["clip-eps_high"] = (pl(), [pl(clip=(0.2, 0.05))])
    cases["clip-eps_high-cispo"] = (pl(loss_type="cispo"), [pl(loss_type="cispo", clip=(0.2, 0.05))])
    cases["dual_clip"] = (pl(), [pl(dual_clip=1.05), pl(dual_clip=1.2)])
    roll = c["rollout"]
    for mode in L.IS_CORRECTIONS:
        cases[f"is_correction-{mode}"] = (pl(), [pl(rollout_logprobs=roll, is_correction=mode)])
        cases[f"is_cap-{mode}"] = (pl(rollout_logprobs=roll, is_correction=mode),
                                   [pl(rollout_logprobs=roll, is_correction=mode, is_cap=1.3),
                                    pl(rollout_logprobs=roll, is_correction=mode, is_cap=(0.7, 2.0))])
        cases[f"rollout_logprobs-{mode}"] = (pl(rollout_logprobs=roll, is_correction=mode),
                                             [pl(rollout_logprobs=roll + 0.3, is_correction=mode)])
    cases["is_correction-token-vs-sequence"] = (pl(rollout_logprobs=roll, is_correction="token_truncate"),
                                                [pl(rollout_logprobs=roll, is_correction="sequence_truncate"),
                                                 pl(rollout_logprobs=roll, is_correction="token_mask")])
    cases["beta"] = (pl(), [pl(ref_logprobs=c["ref"], beta=0.1), pl(ref_logprobs=c["ref"], beta=-0.1)])
    cases["ref_logprobs"] = (pl(ref_logprobs=c["ref"], beta=0.1), [pl(ref_logprobs=c["ref"] + 0.2, beta=0.1)])
    cases["kl_estimator"] = (pl(ref_logprobs=c["ref"], beta=0.1),
                             [pl(ref_logprobs=c["ref"], beta=0.1, kl_estimator=e) for e in ("k1", "k2")])
    cases["kl_estimator-k1-vs-k2"] = (pl(ref_logprobs=c["ref"], beta=0.1, kl_estimator="k1"),
                                      [pl(ref_logprobs=c["ref"], beta=0.1, kl_estimator="k2")])
    cases["entropy_coef"] = (pl(entropy=c["ent"]), [pl(entropy=c["ent"], entropy_coef=0.1)])
    cases["entropy"] = (pl(entropy=c["ent"], entropy_coef=0.1), [pl(entropy=c["ent"] * 2, entropy_coef=0.1)])
    cases["max_len"] = (pl(loss_type="dr_grpo"), [pl(loss_type="dr_grpo", max_len=20)])
    for t in L.TOKEN_MEAN_TYPES:
        cases[f"num_tokens-{t}"] = (pl(loss_type=t), [pl(loss_type=t, num_tokens=50),
                                                      pl(loss_type=t, num_tokens=torch.tensor(3.0))])
    cases["mask"] = (pl(), [pl(mask=None), pl(mask=m & (torch.rand_like(lp) > 0.5))])
    cases["advantages"] = (pl(), [pl(advantages=c["adv_tok"])])
    flat, cu = _pack(lp, torch.ones_like(m), True)
    for t in ("grpo", "gspo", "dr_grpo"):
        kw = {"max_len": 9} if t == "dr_grpo" else {}
        cu2 = torch.tensor([0, 5, 8, 20, 32], dtype=torch.int32)
        cases[f"cu_seqlens-{t}"] = (
            lambda kw=kw, t=t: (ro.policy_loss(flat, old.reshape(-1), adv, cu_seqlens=cu, loss_type=t, **kw)[:2], [lp]),
            [lambda kw=kw, t=t: (ro.policy_loss(flat, old.reshape(-1), adv, cu_seqlens=cu2, loss_type=t, **kw)[:2],
                                 [lp])])

    # value loss
    v = torch.randn(3, 6, dtype=F64, requires_grad=True)
    vold = v.detach() + torch.randn(3, 6, dtype=F64)
    ret = v.detach() + torch.randn(3, 6, dtype=F64)
    vm = torch.rand(3, 6) > 0.3

    def vl(**kw):
        mm = kw.pop("mask", vm)
        return lambda: (ro.value_loss(v, vold, ret, mm, **kw), [v])
    cases["value_loss-clip"] = (vl(), [vl(clip=0.2), vl(clip=0.5)])
    cases["value_loss-mask"] = (vl(), [vl(mask=None)])
    cases["value_loss-num_tokens"] = (vl(), [vl(num_tokens=40)])

    # gae (no gradient: the outputs)
    r, val = torch.randn(3, 10, dtype=F64), torch.randn(3, 10, dtype=F64)
    gm = _multi_run_mask(3, 10, "cpu")

    def ga(**kw):
        mm = kw.pop("mask", gm)
        cu_ = kw.pop("cu_seqlens", None)
        if cu_ is not None:
            return lambda: (ro.gae(r.reshape(-1), val.reshape(-1), mm.reshape(-1), cu_seqlens=cu_, **kw), [])
        return lambda: (ro.gae(r, val, mm, **kw), [])
    cases["gae-gamma"] = (ga(), [ga(gamma=0.9)])
    cases["gae-lam"] = (ga(), [ga(lam=0.5)])
    cases["gae-mask"] = (ga(), [ga(mask=torch.ones_like(gm))])
    cases["gae-cu_seqlens"] = (ga(cu_seqlens=torch.tensor([0, 10, 20, 30], dtype=torch.int32)),
                               [ga(cu_seqlens=torch.tensor([0, 4, 20, 30], dtype=torch.int32))])

    # group advantages
    s = torch.randn(8, dtype=F64, requires_grad=True)

    def gadv(G=4, **kw):
        return lambda: (ro.group_advantages(s, G, **kw), [s])
    cases["group_advantages-scale"] = (gadv(), [gadv(scale="batch_std"), gadv(scale="none")])
    cases["group_advantages-batch-vs-none"] = (gadv(scale="batch_std"), [gadv(scale="none")])
    cases["group_advantages-eps"] = (gadv(), [gadv(eps=0.5)])
    cases["group_advantages-leave_one_out"] = (gadv(), [gadv(leave_one_out=True)])
    cases["group_advantages-group_size"] = (gadv(), [gadv(G=2)])

    # sequence log-probs
    cases["sequence_logprobs-reduce"] = (lambda: (ro.sequence_logprobs(lp, m), [lp]),
                                         [lambda: (ro.sequence_logprobs(lp, m, reduce="mean"), [lp])])
    cases["sequence_logprobs-mask"] = (lambda: (ro.sequence_logprobs(lp, m), [lp]),
                                       [lambda: (ro.sequence_logprobs(lp), [lp])])

    # preference loss
    pc, pr, pcr, prr, lc, lr = pref_case()

    def pf(lt="sigmoid", ref=True, lengths=False, **kw):
        ln = dict(chosen_lengths=lc, rejected_lengths=lr) if lengths else {}
        return lambda: (ro.preference_loss(pc, pr, pcr if ref else None, prr if ref else None, loss_type=lt,
                                           **ln, **kw)[:2], [pc, pr])
    cases["preference-loss_type"] = (pf(), [pf(t) for t in L.PREFERENCE_TYPES if t not in ("sigmoid", "robust")])
    for t in L.PREFERENCE_TYPES:
        if t != "robust":
            cases[f"preference-loss_type-{t}-vs-robust"] = (pf("robust", label_smoothing=0.1),
                                                            [pf(t, label_smoothing=0.1)] if t in L.SMOOTHED_TYPES
                                                            else [pf(t)])
    for t in L.PREFERENCE_TYPES:
        ln = t in ("simpo", "orpo")
        cases[f"preference-beta-{t}"] = (pf(t, lengths=ln), [pf(t, lengths=ln, beta=0.3)])
    for t in L.SMOOTHED_TYPES:
        cases[f"preference-label_smoothing-{t}"] = (pf(t), [pf(t, label_smoothing=0.2)])
    cases["preference-gamma-simpo"] = (pf("simpo", lengths=True), [pf("simpo", lengths=True, gamma=1.0)])
    for t in L.LENGTH_TYPES:
        cases[f"preference-lengths-{t}"] = (pf(t), [pf(t, lengths=True)])
    for t in ("sigmoid", "robust", "ipo", "hinge"):
        cases[f"preference-ref-{t}"] = (pf(t), [pf(t, ref=False)])
    cases["preference-reduction"] = (pf(), [pf(reduction="sum"), pf(reduction="none")])
    return cases


def test_no_silent_drift():
    cases = _drift_cases()
    ignored = [f"{name} #{i}" for name, (base, alts) in cases.items() for i, alt in enumerate(alts)
               if not _differs(base, alt)]
    assert not ignored, f"options that change neither the loss nor the gradient: {ignored}"
    # the token-mean synonyms are one formula (TOKEN_MEAN_TYPES in rlhf_ops/losses.py: ppo, dapo,
    # bnpo: Σℓ / (num_tokens or count))
    c = policy_case(dev="cpu")
    ref = ro.policy_loss(c["lp"], c["old"], c["adv"], c["mask"]).loss
    for t in ("dapo", "bnpo"):
        assert float(ro.policy_loss(c["lp"], c["old"], c["adv"], c["mask"], loss_type=t).loss) == float(ref)


# ================================================================================ bad input ===

def _pl(**over):
    c = policy_case(B=2, T=3, dev="cpu")
    kw = dict(logprobs=c["lp"], old_logprobs=c["old"], advantages=c["adv"], mask=c["mask"])
    kw.update(over)
    return lambda: ro.policy_loss(**kw)


P2 = torch.zeros(2, 3)
CU = torch.tensor([0, 2, 5], dtype=torch.int32)
BAD = [
    # (id, call, exception, the text the message must hold)
    ("policy-loss_type", _pl(loss_type="ppo2"), ValueError, "loss_type"),
    ("policy-is_correction", _pl(is_correction="token", rollout_logprobs=P2), ValueError, "is_correction"),
    ("policy-kl_estimator", _pl(kl_estimator="k4"), ValueError, "kl_estimator"),
    ("policy-old-shape", _pl(old_logprobs=torch.zeros(2, 4)), ValueError, "old_logprobs"),
    ("policy-old-dtype", _pl(old_logprobs=torch.zeros(2, 3, dtype=torch.int64)), TypeError, "old_logprobs"),
    ("policy-logprobs-dtype", _pl(logprobs=torch.zeros(2, 3, dtype=torch.int64)), TypeError, "logprobs"),
    ("policy-logprobs-1d-without-cu", _pl(logprobs=torch.zeros(6), old_logprobs=torch.zeros(6)), ValueError,
     "cu_seqlens"),
    ("policy-advantages-shape", _pl(advantages=torch.zeros(3)), ValueError, "advantages"),
    ("policy-mask-shape", _pl(mask=torch.ones(3, 2)), ValueError, "mask"),
    ("policy-mask-dtype", _pl(mask=torch.ones(2, 3, dtype=torch.complex64)), TypeError, "mask"),
    ("policy-cu-not-covering", _pl(logprobs=torch.zeros(6), old_logprobs=torch.zeros(6), mask=None,
                                   cu_seqlens=CU), ValueError, "cu_seqlens"),
    ("policy-cu-start", _pl(logprobs=torch.zeros(5), old_logprobs=torch.zeros(5), mask=None,
                            cu_seqlens=torch.tensor([1, 2, 5], dtype=torch.int32)), ValueError, "cu_seqlens"),
    ("policy-cu-decreasing", _pl(logprobs=torch.zeros(5), old_logprobs=torch.zeros(5), mask=None,
                                 cu_seqlens=torch.tensor([0, 3, 2, 5], dtype=torch.int32)), ValueError, "cu_seqlens"),
    ("policy-cu-dtype", _pl(logprobs=torch.zeros(5), old_logprobs=torch.zeros(5), mask=None,
                            cu_seqlens=CU.long()), TypeError, "cu_seqlens"),
    ("policy-dr_grpo-without-max_len", _pl(loss_type="dr_grpo"), ValueError, "max_len"),
    ("policy-max_len-bad", _pl(loss_type="dr_grpo", max_len=0), ValueError, "max_len"),
    ("policy-max_len-ignored", _pl(max_len=10), ValueError, "max_len"),
    ("policy-num_tokens-grpo", _pl(loss_type="grpo", num_tokens=10), ValueError, "num_tokens"),
    ("policy-num_tokens-zero", _pl(num_tokens=0), ValueError, "num_tokens"),
    ("policy-num_tokens-shape", _pl(num_tokens=torch.ones(2)), ValueError, "num_tokens"),
    ("policy-dual_clip-low", _pl(dual_clip=0.9), ValueError, "dual_clip"),
    ("policy-dual_clip-cispo", _pl(loss_type="cispo", dual_clip=3.0), ValueError, "dual_clip"),
    ("policy-clip-negative", _pl(clip=(-0.1, 0.2)), ValueError, "clip"),
    ("policy-clip-triple", _pl(clip=(0.1, 0.2, 0.3)), ValueError, "clip"),
    ("policy-clip-type", _pl(clip="0.2"), TypeError, "clip"),
    ("policy-is-without-rollout", _pl(is_correction="token_mask"), ValueError, "rollout_logprobs"),
    ("policy-rollout-without-is", _pl(rollout_logprobs=P2), ValueError, "is_correction"),
    ("policy-is_cap-without-is", _pl(is_cap=3.0), ValueError, "is_cap"),
    ("policy-is_cap-nonpositive", _pl(is_correction="token_mask", rollout_logprobs=P2, is_cap=0.0), ValueError,
     "is_cap"),
    ("policy-is_cap-order", _pl(is_correction="token_mask", rollout_logprobs=P2, is_cap=(2.0, 1.0)), ValueError,
     "is_cap"),
    ("policy-rollout-shape", _pl(is_correction="token_mask", rollout_logprobs=torch.zeros(3)), ValueError,
     "rollout_logprobs"),
    ("policy-beta-without-ref", _pl(beta=0.1), ValueError, "ref_logprobs"),
    ("policy-beta-nan", _pl(beta=float("nan"), ref_logprobs=P2), ValueError, "beta"),
    ("policy-beta-type", _pl(beta="0.1", ref_logprobs=P2), TypeError, "beta"),
    ("policy-ref-shape", _pl(beta=0.1, ref_logprobs=torch.zeros(2, 2)), ValueError, "ref_logprobs"),
    ("policy-entropy_coef-without-entropy", _pl(entropy_coef=0.1), ValueError, "entropy"),
    ("policy-entropy-shape", _pl(entropy_coef=0.1, entropy=torch.zeros(3, 2)), ValueError, "entropy"),
    ("value-shape", lambda: ro.value_loss(P2, torch.zeros(2, 2), P2), ValueError, "old_values"),
    ("value-returns-dtype", lambda: ro.value_loss(P2, P2, P2.long()), TypeError, "returns"),
    ("value-clip", lambda: ro.value_loss(P2, P2, P2, clip=-1.0), ValueError, "clip"),
    ("value-cu", lambda: ro.value_loss(torch.zeros(4), torch.zeros(4), torch.zeros(4), cu_seqlens=CU), ValueError,
     "cu_seqlens"),
    ("gae-values-shape", lambda: ro.gae(P2, torch.zeros(3, 2), None), ValueError, "values"),
    ("gae-mask-shape", lambda: ro.gae(P2, P2, torch.ones(2, 2)), ValueError, "mask"),
    ("gae-rewards-dtype", lambda: ro.gae(P2.long(), P2, None), TypeError, "rewards"),
    ("gae-rewards-3d", lambda: ro.gae(torch.zeros(2, 3, 1), torch.zeros(2, 3, 1), None), ValueError, "rewards"),
    ("gae-gamma", lambda: ro.gae(P2, P2, None, gamma=-0.5), ValueError, "gamma"),
    ("gae-lam", lambda: ro.gae(P2, P2, None, lam=float("inf")), ValueError, "lam"),
    ("gae-cu", lambda: ro.gae(torch.zeros(4), torch.zeros(4), None, cu_seqlens=CU), ValueError, "cu_seqlens"),
    ("gae-backend", lambda: ro.gae(P2, P2, None, backend="gpu"), ValueError, "backend"),
    ("gae-cuda-on-cpu", lambda: ro.gae(P2, P2, None, backend="cuda"), RuntimeError, "cuda"),
    ("group-not-dividing", lambda: ro.group_advantages(torch.zeros(6), 4), ValueError, "group_size"),
    ("group-size-zero", lambda: ro.group_advantages(torch.zeros(6), 0), ValueError, "group_size"),
    ("group-scale", lambda: ro.group_advantages(torch.zeros(6), 3, scale="std"), ValueError, "scale"),
    ("group-std-of-one", lambda: ro.group_advantages(torch.zeros(6), 1), ValueError, "group_std"),
    ("group-loo-of-one", lambda: ro.group_advantages(torch.zeros(6), 1, scale="none", leave_one_out=True),
     ValueError, "leave_one_out"),
    ("group-scores-2d", lambda: ro.group_advantages(torch.zeros(2, 3), 3), ValueError, "scores"),
    ("group-eps", lambda: ro.group_advantages(torch.zeros(6), 3, eps=-1.0), ValueError, "eps"),
    ("seq-reduce", lambda: ro.sequence_logprobs(P2, reduce="max"), ValueError, "reduce"),
    ("seq-mask", lambda: ro.sequence_logprobs(P2, torch.ones(3)), ValueError, "mask"),
    ("pref-loss_type", lambda: ro.preference_loss(torch.zeros(2), torch.zeros(2), loss_type="kto"), ValueError,
     "loss_type"),
    ("pref-shape", lambda: ro.preference_loss(torch.zeros(2), torch.zeros(3)), ValueError, "rejected_logps"),
    ("pref-2d", lambda: ro.preference_loss(P2, P2), ValueError, "chosen_logps"),
    ("pref-one-ref", lambda: ro.preference_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2)), ValueError,
     "ref_rejected_logps"),
    ("pref-beta", lambda: ro.preference_loss(torch.zeros(2), torch.zeros(2), beta=0.0), ValueError, "beta"),
    ("pref-smoothing-half", lambda: ro.preference_loss(torch.zeros(2), torch.zeros(2), label_smoothing=0.5),
     ValueError, "label_smoothing"),
    ("pref-smoothing-hinge", lambda: ro.preference_loss(torch.zeros(2), torch.zeros(2), loss_type="hinge",
                                                        label_smoothing=0.1), ValueError, "label_smoothing"),
    ("pref-gamma-sigmoid", lambda: ro.preference_loss(torch.zeros(2), torch.zeros(2), gamma=1.0), ValueError,
     "gamma"),
    ("pref-lengths-sigmoid", lambda: ro.preference_loss(torch.zeros(2), torch.zeros(2),
                                                        chosen_lengths=torch.ones(2), rejected_lengths=torch.ones(2)),
     ValueError, "lengths"),
    ("pref-one-length", lambda: ro.preference_loss(torch.zeros(2), torch.zeros(2), loss_type="simpo",
                                                   chosen_lengths=torch.ones(2)), ValueError, "rejected_lengths"),
    ("pref-length-zero", lambda: ro.preference_loss(torch.zeros(2), torch.zeros(2), loss_type="simpo",
                                                    chosen_lengths=torch.tensor([1, 0]),
                                                    rejected_lengths=torch.ones(2)), ValueError, "chosen_lengths"),
    ("pref-reduction", lambda: ro.preference_loss(torch.zeros(2), torch.zeros(2), reduction="avg"), ValueError,
     "reduction"),
]


@pytest.mark.parametrize("call,exc,text", [pytest.param(c, e, t, id=i) for i, c, e, t in BAD])
def test_bad_input(call, exc, text):
    with pytest.raises(exc) as info:
        call()
    assert text in str(info.value), f"the message does not name {text!r}: {info.value}"


# ========================================================================= memory (meta) ===

N_MEM, H_MEM, V_MEM = 8192, 4096, 151936


def _kept(call, make):
    sys.path.insert(0, ROOT) if ROOT not in sys.path else None
    from bench import memory
    return memory.saved_for_backward(call, make)


def _meta(*shape, dtype=torch.bfloat16, grad=False):
    return torch.empty(*shape, dtype=dtype, device="meta").requires_grad_(grad)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_grpo_and_dpo_steps_keep_no_vocab_sized_tensor(backend):
    """A full GRPO step (linear_token_logprobs + entropy + policy_loss with IS correction, KL and
    entropy bonus) and a DPO step (linear_token_logprobs + sequence_logprobs + preference_loss) at
    N = 8,192, H = 4,096, V = 151,936 in bf16, on the meta device (the fused op's fake
    implementation, autograd records what would be kept): besides hidden and weight, O(N) bytes —
    here at most 128 bytes per token, where eager keeps [N, V] logits (4.6 GiB in bf16 alone).
    Backward runs too."""
    G, T = 16, N_MEM // 16
    idx = lambda *s: torch.empty(*s, dtype=torch.int64, device="meta")   # noqa: E731

    def grpo(a):
        h, W, tok, old, roll, ref, adv, mask = a
        lp, ent = ro.linear_token_logprobs(h, W, tok, return_entropy=True, backend=backend)
        out = ro.policy_loss(lp.view(G, T), old, adv, mask, loss_type="grpo", rollout_logprobs=roll,
                             is_correction="token_truncate", ref_logprobs=ref, beta=0.04, entropy=ent.view(G, T),
                             entropy_coef=0.01)
        return out.loss

    def grpo_inputs():
        f = lambda: _meta(G, T, dtype=torch.float32)   # noqa: E731
        return [_meta(N_MEM, H_MEM, grad=True), _meta(V_MEM, H_MEM, grad=True), idx(N_MEM), f(), f(), f(),
                _meta(G, dtype=torch.float32), torch.empty(G, T, dtype=torch.bool, device="meta")]

    def dpo(a):
        h, W, tok, ref_c, ref_r, mask = a
        lp = ro.linear_token_logprobs(h, W, tok, backend=backend).view(2 * G, T // 2)
        s = ro.sequence_logprobs(lp, mask)
        return ro.preference_loss(s[:G], s[G:], ref_c, ref_r).loss

    def dpo_inputs():
        return [_meta(N_MEM, H_MEM, grad=True), _meta(V_MEM, H_MEM, grad=True), idx(N_MEM),
                _meta(G, dtype=torch.float32), _meta(G, dtype=torch.float32),
                torch.empty(2 * G, T // 2, dtype=torch.bool, device="meta")]

    for name, call, make in (("grpo", grpo, grpo_inputs), ("dpo", dpo, dpo_inputs)):
        r = _kept(call, make)
        assert r["saved_bytes"] <= 128 * N_MEM, (name, r)
        inputs = make()
        call(inputs).backward()
        assert inputs[0].grad.shape == (N_MEM, H_MEM) and inputs[1].grad.shape == (V_MEM, H_MEM), name
    eager = _kept(lambda a: grpo_eager(*a), lambda: grpo_inputs()[:5])
    assert eager["saved_bytes"] >= 2 * N_MEM * V_MEM       # the logits, at least once in bf16


def grpo_eager(h, W, tok, old, roll):
    logits = h @ W.T
    lp = torch.log_softmax(logits.float(), -1).gather(-1, tok[:, None]).squeeze(-1)
    return ro.policy_loss(lp.view(old.shape), old, torch.zeros(old.shape[0], device="meta"),
                          loss_type="grpo").loss
# =================================================================================== bench ===

def test_bench_losses_smoke():
    """bench/bench_losses.py at its CPU smoke size under pytest (every case, eager only) and its
    table entry."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
                        "--bench-size", "smoke", "bench/bench_losses.py"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    # the smoke cases: the policy-head step (eager, fwd+bwd) and gae (the per-position loop)
    assert "2 passed" in p.stdout and "skipped" not in p.stdout, p.stdout[-2000:]
    sys.path.insert(0, ROOT) if ROOT not in sys.path else None
    from bench import bench_losses
    rows = bench_losses.main(["--size", "smoke"])
    assert {(r["op"], r["impl"]) for r in rows if r["status"] == "ok"} == {("policy_head_step", "eager"),
                                                                          ("gae", "loop")}
    big = {c.op: c for c in bench_losses.cases("quick")}
    N, H, V = 8192, 4096, 151936
    assert big["policy_head_step"].shape == {"N": N, "H": H, "V": V}
    assert big["policy_head_step"].flop["fwd+bwd"] == 6 * N * H * V and big["gae"].shape == {"B": 64, "T": 8192}
