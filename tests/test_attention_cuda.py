"""torch.ops.rlhf_ops_cuda.attention_fwd / attention_bwd (csrc/attention.cu) called directly,
against float64 eager attention (rlhf_ops.reference.attention run in float64, its lse and its
autograd gradients).

Everything except ``test_ops_registered`` needs a GPU and the built extension and is skipped with
that reason otherwise (the kernels cannot run on a CPU). Acceptance is Cut Cross-Entropy's rule:
our error against float64 may not exceed eager PyTorch's own error in the same dtype (+ 2e-3).
The ops allocate their outputs themselves; ``_poison_cache`` fills the caching allocator's free
blocks of those sizes with NaN first so that an element the kernels forget to write shows up.
"""
import importlib
import math
import os

import pytest
import torch

import rlhf_ops as ro
from rlhf_ops import reference
from _util import assert_matches, rel_err
from conftest import ON_GPU, backend_problem


def _extension_problem():
    try:
        importlib.import_module("rlhf_ops._C")
    except ImportError as e:
        return f"the CUDA extension rlhf_ops._C is not built ({e})"
    return None


_WHY_NOT = "needs a GPU (the CUDA kernels cannot run on CPU)" if not ON_GPU else _extension_problem()
gpu = pytest.mark.skipif(_WHY_NOT is not None, reason=_WHY_NOT or "")

FWD_SCHEMA = ("rlhf_ops_cuda::attention_fwd(Tensor q, Tensor k, Tensor v, bool causal, float scale)"
              " -> (Tensor out, Tensor lse)")
BWD_SCHEMA = ("rlhf_ops_cuda::attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, "
              "Tensor lse, bool causal, float scale) -> (Tensor dq, Tensor dk, Tensor dv)")


# ------------------------------------------------------------------------------- helpers ---

def _inputs(B, Hq, Hkv, T, S, D, dtype, mag=1.0):
    q = torch.randn(B, Hq, T, D, device="cuda", dtype=dtype) * mag
    k = torch.randn(B, Hkv, S, D, device="cuda", dtype=dtype) * mag
    v = torch.randn(B, Hkv, S, D, device="cuda", dtype=dtype)
    dout = torch.randn(B, Hq, T, D, device="cuda", dtype=dtype)
    return q, k, v, dout


def _lse64(q, k, causal, scale):
    """log Σ_j exp(scale·q_i·k_j) over the visible keys, float64; −inf for a row that sees none."""
    q, k = q.double(), k.double()
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if causal:
        T, S = q.shape[2], k.shape[2]
        i = torch.arange(T, device=q.device)[:, None]
        j = torch.arange(S, device=q.device)[None, :]
        s = s.masked_fill(j > i + (S - T), float("-inf"))
    return torch.logsumexp(s, dim=-1)


def _eager(q, k, v, dout, causal, scale, dtype=None):
    """Eager attention (out, dq, dk, dv) in ``dtype`` (default: the inputs')."""
    q, k, v = (t.detach().to(dtype or t.dtype).requires_grad_() for t in (q, k, v))
    out = reference.attention(q, k, v, causal, scale)
    grads = torch.autograd.grad(out, (q, k, v), dout.to(out.dtype))
    return (out.detach(), *grads)


def _poison_cache(*tensors_like):
    """Fill freed caching-allocator blocks of the outputs' sizes with NaN (best effort: the next
    allocations of the same sizes reuse them)."""
    held = [torch.full_like(t, float("nan")) for t in tensors_like]
    del held


def _run(q, k, v, dout, causal, scale):
    _poison_cache(q, q[..., 0].float())
    out, lse = torch.ops.rlhf_ops_cuda.attention_fwd(q, k, v, causal, scale)
    _poison_cache(q, k, v, q[..., 0].float())
    dq, dk, dv = torch.ops.rlhf_ops_cuda.attention_bwd(dout, q, k, v, out, lse, causal, scale)
    torch.cuda.synchronize()
    return out, lse, dq, dk, dv


def _check(B, Hq, Hkv, T, S, D, causal, dtype, *, mag=1.0, scale=None):
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    q, k, v, dout = _inputs(B, Hq, Hkv, T, S, D, dtype, mag)
    out, lse, dq, dk, dv = _run(q, k, v, dout, causal, scale)
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == (B, Hq, T) and lse.dtype == torch.float32
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert dq.dtype == dk.dtype == dv.dtype == dtype
    ref = _eager(q, k, v, dout, causal, scale, torch.float64)
    eager = _eager(q, k, v, dout, causal, scale)
    for name, ours, r, e in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), ref, eager):
        assert_matches(ours, r, e, what=f"{name} {dtype} D={D} causal={causal} T={T} S={S}")
    # lse is fp32 from the same (rounded) inputs: only fp32 accumulation/approximate exp2 error.
    assert_matches(lse, _lse64(q, k, causal, scale), tol=2e-5, what="lse")
    return q, k, v, dout, (out, lse, dq, dk, dv)


# --------------------------------------------------------------------------- GPU checks ---

# (B, Hq, Hkv, T, S): ragged lengths 1, 17, 129, 255; T == S, T < S, T > S; MHA, GQA, MQA.
SHAPES = [
    (1, 2, 2, 1, 1),
    (2, 2, 2, 17, 17),
    (1, 4, 2, 129, 129),      # GQA 2
    (2, 8, 2, 255, 255),      # GQA 4
    (1, 4, 1, 17, 255),       # T < S, MQA
    (1, 2, 2, 255, 129),      # T > S: the first 126 causal rows see no key
    (1, 3, 1, 129, 17),       # T > S, MQA, odd head count
    (1, 2, 1, 1, 129),        # one query over many keys (decoding)
]


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64(shape, D, causal, dtype):
    _check(*shape, D, causal, dtype)


@gpu
@pytest.mark.parametrize("D", [64, 128])
def test_large_scores(D):
    # Scores around ±1e4: softmax is nearly one-hot, exp2 must not overflow or produce NaN.
    _check(1, 2, 1, 129, 129, D, True, torch.bfloat16, mag=1.0, scale=1e4 / D)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_custom_scale(dtype):
    _check(1, 2, 2, 129, 255, 64, True, dtype, scale=0.3)


@gpu
@pytest.mark.parametrize("D", [64, 128])
def test_rows_without_keys(D):
    # Causal with T > S: rows i < T − S see no key → out 0, lse −inf, dq 0 exactly; dk/dv get
    # nothing from them.
    T, S = 200, 70
    q, k, v, dout, (out, lse, dq, dk, dv) = _check(1, 2, 1, T, S, D, True, torch.float16)
    blind = T - S
    assert torch.equal(out[:, :, :blind], torch.zeros_like(out[:, :, :blind]))
    assert torch.isneginf(lse[:, :, :blind]).all() and torch.isfinite(lse[:, :, blind:]).all()
    assert torch.equal(dq[:, :, :blind], torch.zeros_like(dq[:, :, :blind]))
    # Changing the blind rows' dout must not change dk/dv.
    dout2 = dout.clone()
    dout2[:, :, :blind] = torch.randn_like(dout2[:, :, :blind])
    _, dk2, dv2 = torch.ops.rlhf_ops_cuda.attention_bwd(dout2, q, k, v, out, lse, True, 1 / math.sqrt(D))
    assert torch.equal(dk2, dk) and torch.equal(dv2, dv)


@gpu
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_empty(causal):
    scale = 0.125
    for (B, Hq, Hkv, T, S) in [(0, 2, 1, 17, 17), (1, 2, 1, 0, 17), (1, 2, 1, 17, 0)]:
        q, k, v, dout = _inputs(B, Hq, Hkv, T, S, 64, torch.float16)
        out, lse, dq, dk, dv = _run(q, k, v, dout, causal, scale)
        assert out.shape == q.shape and lse.shape == (B, Hq, T)
        assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
        # No key at all (S = 0): out 0, lse −inf, dq 0. No query (T = 0): dk = dv = 0.
        if S == 0:
            assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
            assert torch.equal(dq, torch.zeros_like(dq))
        if T == 0:
            assert torch.equal(dk, torch.zeros_like(dk)) and torch.equal(dv, torch.zeros_like(dv))


@gpu
def test_backward_is_deterministic():
    q, k, v, dout = _inputs(2, 8, 2, 255, 255, 128, torch.bfloat16)
    a = _run(q, k, v, dout, True, 0.1)
    b = _run(q, k, v, dout, True, 0.1)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@gpu
def test_non_contiguous_inputs():
    # Views from a [B, T, H, D] layout (the QKV-split case): same result as contiguous copies.
    B, H, T, D = 2, 4, 129, 64
    q, k, v, dout = (torch.randn(B, T, H, D, device="cuda", dtype=torch.float16).transpose(1, 2)
                     for _ in range(4))
    got = _run(q, k, v, dout, True, 0.125)
    want = _run(*(t.contiguous() for t in (q, k, v, dout)), True, 0.125)
    for x, y in zip(got, want):
        assert torch.equal(x, y)


@gpu
def test_bad_inputs_name_the_argument():
    q, k, v, _ = _inputs(1, 4, 2, 17, 17, 64, torch.float16)
    fwd = torch.ops.rlhf_ops_cuda.attention_fwd
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        fwd(q.float(), k.float(), v.float(), True, 0.1)
    with pytest.raises(RuntimeError, match="k and v must have q's dtype"):
        fwd(q, k.bfloat16(), v, True, 0.1)
    q96, k96, v96, _ = _inputs(1, 4, 2, 17, 17, 96, torch.float16)
    with pytest.raises(RuntimeError, match="64 or 128"):
        fwd(q96, k96, v96, True, 0.1)
    with pytest.raises(RuntimeError, match="multiple of the number of kv heads"):
        fwd(q[:, :3], k, v, True, 0.1)
    with pytest.raises(RuntimeError, match="v must have k's shape"):
        fwd(q, k, v[:, :, :5], True, 0.1)
    with pytest.raises(RuntimeError, match="q must be a CUDA tensor"):
        fwd(q.cpu(), k, v, True, 0.1)
    out, lse = fwd(q, k, v, True, 0.1)
    bwd = torch.ops.rlhf_ops_cuda.attention_bwd
    with pytest.raises(RuntimeError, match="lse must be"):
        bwd(out, q, k, v, out, lse.double(), True, 0.1)
    with pytest.raises(RuntimeError, match="dout must have q's shape"):
        bwd(out[:, :, :5], q, k, v, out, lse, True, 0.1)


@gpu
def test_public_api_uses_these_ops():
    q, k, v, dout = _inputs(1, 4, 2, 129, 129, 64, torch.bfloat16)
    out, lse, dq, dk, dv = _run(q, k, v, dout, True, 0.125)
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    o = ro.attention(qq, kk, vv, causal=True, scale=0.125, backend="cuda")
    grads = torch.autograd.grad(o, (qq, kk, vv), dout)
    assert torch.equal(o, out)
    for x, y in zip(grads, (dq, dk, dv)):
        assert torch.equal(x, y)


@gpu
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_cross_check_triton_large(causal):
    why = backend_problem("triton")
    if why:
        pytest.skip(why)
    B, Hq, Hkv, T, S, D, dtype = 1, 8, 2, 2048, 2048, 128, torch.bfloat16
    scale = 1 / math.sqrt(D)
    q, k, v, dout = _inputs(B, Hq, Hkv, T, S, D, dtype)
    ours = _run(q, k, v, dout, causal, scale)
    ours = (ours[0], *ours[2:])
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    o = ro.attention(qq, kk, vv, causal=causal, scale=scale, backend="triton")
    tri = (o.detach(), *torch.autograd.grad(o, (qq, kk, vv), dout))
    ref = _eager(q, k, v, dout, causal, scale, torch.float64)
    eager = _eager(q, k, v, dout, causal, scale)
    for name, a, t, r, e in zip(("out", "dq", "dk", "dv"), ours, tri, ref, eager):
        assert_matches(a, r, e, what=f"cuda {name}")
        # The two fused backends agree with each other to within the eager error budget.
        bound = 2 * rel_err(e, r) + 2e-3
        assert rel_err(a, t) <= bound, f"{name}: cuda vs triton {rel_err(a, t):.3e} > {bound:.3e}"


# ------------------------------------------------------------------- runs on every machine ---

def test_ops_registered():
    why = _extension_problem()
    if why:
        pytest.skip(why)
    c = importlib.import_module("rlhf_ops._C")
    names = set(torch._C._dispatch_get_all_op_names())
    if "rlhf_ops_cuda::attention_fwd" not in names:
        so = os.path.getmtime(c.__file__)
        src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "csrc", "attention.cu")
        if os.path.exists(src) and so < os.path.getmtime(src):
            pytest.skip(f"{c.__file__} was built before csrc/attention.cu changed; rebuild it "
                        "(RLHF_OPS_BUILD_CUDA=1 pip install --no-build-isolation -e .)")
    assert str(torch.ops.rlhf_ops_cuda.attention_fwd.default._schema) == FWD_SCHEMA
    assert str(torch.ops.rlhf_ops_cuda.attention_bwd.default._schema) == BWD_SCHEMA
    # Registered for the CUDA dispatch key only: CPU tensors are refused by the dispatcher.
    assert torch._C._dispatch_has_kernel_for_dispatch_key("rlhf_ops_cuda::attention_fwd", "CUDA")
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("rlhf_ops_cuda::attention_fwd", "CPU")
