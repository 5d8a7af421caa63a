"""rlhf_ops.integrations.flash: flash-attn's signatures and layouts on top of attention[_varlen].

Checked against an independent fp64 eager computation of flash-attn's semantics (bottom-right
causal, window_size, softcap, GQA), forward and backward, on the reference and Triton backends;
and that every option we cannot honour raises instead of being dropped.
"""
import math

import pytest
import torch

from rlhf_ops.integrations.flash import flash_attn_func, flash_attn_varlen_func
from _util import rel_err
from conftest import DEVICE, backend_problem

BACKENDS = ["reference", "triton"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    why = backend_problem(request.param)
    if why:
        pytest.skip(why)
    return request.param


def _eager(q, k, v, scale, causal, window, softcap):
    """One sequence, flash-attn's meaning, fp64: q [T, H, D], k/v [S, Hkv, D] → [T, H, D]."""
    T, H, D = q.shape
    S, Hkv = k.shape[0], k.shape[1]
    k = k.repeat_interleave(H // Hkv, dim=1)
    v = v.repeat_interleave(H // Hkv, dim=1)
    s = torch.einsum("thd,shd->hts", q, k) * (1 / math.sqrt(D) if scale is None else scale)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(T)[:, None] + (S - T)         # bottom-right: query i sits at key i + S − T
    j = torch.arange(S)[None, :]
    ok = torch.ones(T, S, dtype=torch.bool)
    left, right = window
    if causal:
        right = 0
    if left >= 0:
        ok &= j >= i - left
    if right >= 0:
        ok &= j <= i + right
    s = s.masked_fill(~ok, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)   # a row that sees no key outputs 0
    return torch.einsum("hts,shd->thd", p, v)


OPTIONS = [dict(causal=True), dict(causal=False), dict(causal=True, window_size=(2, 0)),
           dict(causal=False, window_size=(1, 2), softcap=0.7, softmax_scale=0.3)]


def _leaves(*shapes, dtype=torch.float32):
    return [torch.randn(*s, dtype=dtype, device=DEVICE).requires_grad_() for s in shapes]


def _check_grads(outs, ins, refs):
    for o, r, name in zip(outs, refs, ("out", "dq", "dk", "dv")):
        assert rel_err(o, r) <= 1e-5, f"{name}: relative error {rel_err(o, r):.2e}"


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_flash_attn_func_matches_flash_semantics(backend, opts):
    B, T, S, H, Hkv, D = 2, 5, 7, 4, 2, 16          # T ≠ S: bottom-right alignment matters
    q, k, v = _leaves((B, T, H, D), (B, S, Hkv, D), (B, S, Hkv, D))
    g = torch.randn(B, T, H, D, device=DEVICE)
    out = flash_attn_func(q, k, v, backend=backend, **opts)
    assert out.shape == (B, T, H, D) and out.dtype == q.dtype
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)

    q64, k64, v64 = (t.detach().double().cpu().requires_grad_() for t in (q, k, v))
    ref = torch.stack([_eager(q64[b], k64[b], v64[b], opts.get("softmax_scale"), opts["causal"],
                              opts.get("window_size", (-1, -1)), opts.get("softcap", 0.0))
                       for b in range(B)])
    refs = (ref, *torch.autograd.grad(ref, (q64, k64, v64), g.double().cpu()))
    _check_grads((out, dq, dk, dv), (q, k, v), refs)


def test_flash_attn_varlen_func_matches_per_sequence(backend):
    lens_q, lens_k = [3, 0, 6, 1], [4, 2, 6, 5]        # an empty sequence, Tq ≠ Tk
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    H, Hkv, D = 4, 1, 16
    q, k, v = _leaves((sum(lens_q), H, D), (sum(lens_k), Hkv, D), (sum(lens_k), Hkv, D))
    g = torch.randn(sum(lens_q), H, D, device=DEVICE)
    opts = dict(causal=True, window_size=(3, -1), softcap=1.5)
    out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), backend=backend, **opts)
    assert out.shape == q.shape
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)

    q64, k64, v64 = (t.detach().double().cpu().requires_grad_() for t in (q, k, v))
    pieces = []
    for b in range(len(lens_q)):
        sq, sk = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        pieces.append(_eager(q64[sq], k64[sk], v64[sk], None, True, (3, -1), 1.5))
    ref = torch.cat(pieces)
    refs = (ref, *torch.autograd.grad(ref, (q64, k64, v64), g.double().cpu()))
    _check_grads((out, dq, dk, dv), (q, k, v), refs)


def test_positional_order_and_neutral_options_as_flash_attn(backend):
    B, T, H, D = 1, 4, 2, 16
    q, k, v = (t.detach() for t in _leaves((B, T, H, D), (B, T, H, D), (B, T, H, D)))
    # flash-attn 2.x order: dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
    # deterministic, return_attn_probs
    a = flash_attn_func(q, k, v, 0.0, 0.25, True, (-1, -1), 0.0, None, True, False, backend=backend)
    b = flash_attn_func(q, k, v, softmax_scale=0.25, causal=True, deterministic=False,
                        seqused_k=None, backend=backend)
    assert torch.equal(a, b)
    cu = torch.tensor([0, T], dtype=torch.int32, device=DEVICE)
    c = flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, torch.tensor(T), T, 0.0, 0.25, True,
                               backend=backend, block_table=None)
    assert torch.equal(c, a[0])


def test_unsupported_options_raise():
    q = torch.randn(1, 4, 2, 16, device=DEVICE)
    cu = torch.tensor([0, 4], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="dropout_p=0.1 is not supported"):
        flash_attn_func(q, q, q, dropout_p=0.1)
    with pytest.raises(ValueError, match="dropout_p"):
        flash_attn_varlen_func(q[0], q[0], q[0], cu, cu, 4, 4, 0.5)
    with pytest.raises(ValueError, match="alibi_slopes is not supported"):
        flash_attn_func(q, q, q, alibi_slopes=torch.ones(2, device=DEVICE))
    with pytest.raises(ValueError, match="return_attn_probs=True"):
        flash_attn_func(q, q, q, return_attn_probs=True)
    with pytest.raises(ValueError, match="block_table is not supported"):
        flash_attn_varlen_func(q[0], q[0], q[0], cu, cu, 4, 4,
                               block_table=torch.zeros(1, 1, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="seqused_q is not supported"):
        flash_attn_varlen_func(q[0], q[0], q[0], cu, cu, 4, 4, seqused_q=torch.tensor([4]))
    with pytest.raises(TypeError, match="window_size must be a pair"):
        flash_attn_func(q, q, q, window_size=3)
    with pytest.raises(TypeError, match="max_seqlen_q must be an int"):
        flash_attn_varlen_func(q[0], q[0], q[0], cu, cu, 4.0, 4)
    with pytest.raises(ValueError, match=r"q must be a 4-D tensor \[B, T, H, D\]"):
        flash_attn_func(q[0], q, q)
    with pytest.raises(ValueError, match="backend"):
        flash_attn_func(q, q, q, backend="nope")


@pytest.mark.skipif(DEVICE != "cpu", reason="the Triton interpreter runs on CPU tensors only")
def test_bf16_triton_under_interpreter_raises():
    q = torch.randn(1, 4, 2, 16, dtype=torch.bfloat16)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(TypeError, match="flash_attn_func: bfloat16 inputs on the Triton backend under the CPU interpreter"):
        flash_attn_func(q, q, q, causal=True, backend="triton")
    with pytest.raises(TypeError, match="bfloat16"):
        flash_attn_varlen_func(q[0], q[0], q[0], cu, cu, 4, 4, backend="triton")
    out = flash_attn_func(q, q, q, causal=True, backend="reference")      # fine on the reference
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
