"""rlhf_ops.attention on every backend against float64 eager attention, forward and dQ/dK/dV.

Under the Triton interpreter (CPU) shapes stay tiny; sequence lengths 255 and larger run on a GPU
only. Every buffer the Triton launchers allocate is poisoned with NaN first (autouse fixture), so an
element a kernel forgets to write fails the comparison.
"""
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

import rlhf_ops as ro
from rlhf_ops import reference
from rlhf_ops.nn import CausalSelfAttention
from _util import assert_matches, poison_, rel_err, saved_bytes
from conftest import DEVICE, ON_GPU, backend_problem

attn_mod = importlib.import_module("rlhf_ops.attention")


@pytest.fixture(autouse=True)
def _poison_triton_buffers(monkeypatch):
    if backend_problem("triton") is None:
        kattn = importlib.import_module("rlhf_ops.kernels.attention")
        alloc = kattn._empty
        monkeypatch.setattr(kattn, "_empty", lambda *a, **kw: poison_(alloc(*a, **kw)))


@pytest.fixture(params=["reference", "triton"])
def wide_backend(request):
    """Backends that take every dtype and head dim (the cuda one is fp16/bf16, D 64/128 only)."""
    why = backend_problem(request.param)
    if why:
        pytest.skip(why)
    return request.param


def _inputs(B, Hq, Hkv, T, S, D, dtype, device, mag=1.0):
    q = torch.randn(B, Hq, T, D, dtype=dtype, device=device) * mag
    k = torch.randn(B, Hkv, S, D, dtype=dtype, device=device) * mag
    v = torch.randn(B, Hkv, S, D, dtype=dtype, device=device)
    return q, k, v


def _fwd_bwd(q, k, v, g, backend, **kw):
    """Output and (dq, dk, dv) for upstream gradient g; reference backend = eager math."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    if backend == "eager":
        out = reference.attention(q, k, v, kw.get("causal", True), kw.get("scale"), kw.get("window"),
                                  kw.get("softcap", 0.0))
    else:
        out = ro.attention(q, k, v, backend=backend, **kw)
    grads = torch.autograd.grad(out, (q, k, v), g.to(out.dtype))
    return out, grads


def _ref64(q, k, v, g, **kw):
    return _fwd_bwd(q.double(), k.double(), v.double(), g.double(), "eager", **kw)


def _check(q, k, v, backend, *, eager_bar=False, tol=None, **kw):
    """``backend`` vs float64 eager attention; with ``eager_bar`` the bar is eager PyTorch's own
    error in the input dtype (Cut Cross-Entropy rule), else the tight tolerance of the dtype."""
    g = torch.randn(q.shape, dtype=torch.float64, device=q.device)
    out, grads = _fwd_bwd(q, k, v, g, backend, **kw)
    ref, ref_grads = _ref64(q, k, v, g, **kw)
    assert out.dtype == q.dtype and out.shape == q.shape
    eager, eager_grads = _fwd_bwd(q, k, v, g, "eager", **kw) if eager_bar else (None, (None,) * 3)
    assert_matches(out, ref, eager, tol=tol, what="out")
    for name, gr, r, e, t in zip(("dq", "dk", "dv"), grads, ref_grads, eager_grads, (q, k, v)):
        assert gr.dtype == t.dtype and gr.shape == t.shape, name
        assert_matches(gr, r, e, tol=tol, what=name)
    return out, grads


# (B, Hq, Hkv, T, S, D): lengths not multiples of any block, T < S, T > S, GQA, MQA, every head dim.
SHAPES = [
    (1, 2, 2, 17, 17, 16),
    (2, 2, 1, 33, 70, 32),     # T < S, MQA
    (1, 4, 2, 70, 33, 64),     # T > S (causal: the first 37 rows see no key), GQA
    (1, 1, 1, 1, 1, 16),       # a single row
    (1, 2, 1, 1, 33, 16),      # one query (decoding step)
    (1, 1, 1, 129, 129, 16),
    (1, 2, 1, 20, 17, 48),     # head dim that is not a power of two
    (1, 1, 1, 17, 20, 128),
    # S − T ≡ 1 and ≡ BLOCK_N − 1 (mod the interpreter's 16): an off-by-one in the causal key
    # bound is wrong only there (the GPU block sizes: test_gpu_block_shapes_under_interpreter)
    (1, 1, 1, 16, 17, 16),
    (1, 2, 1, 17, 32, 16),
    (1, 1, 1, 40, 73, 16),
]
LONG_SHAPES = [(1, 4, 2, 255, 255, 64), (1, 2, 1, 129, 255, 128), (1, 2, 2, 255, 129, 256)]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_fp64(wide_backend, device, shape, causal):
    q, k, v = _inputs(*shape, torch.float64, device)
    _check(q, k, v, wide_backend, causal=causal)


# Under the interpreter the long shapes run with GPU block shapes (fewer, larger programs: seconds)
_LONG_CPU_LAUNCH = {"fwd": (128, 64), "dkdv": (32, 64), "dq": (64, 64), "delta": 64}


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", LONG_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_long_sequences(wide_backend, device, shape, causal, monkeypatch):
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    if wide_backend == "triton" and not ON_GPU:
        monkeypatch.setattr(_kernels_module(), "launch_config", _LONG_CPU_LAUNCH)
        # fp16 once per shape; bf16 needs a GPU (the CPU interpreter's bf16 tl.dot is broken)
        dtypes = [torch.float32, torch.float16] if causal else [torch.float32]
    for dtype in dtypes:
        q, k, v = _inputs(*shape, dtype, device)
        _check(q, k, v, wide_backend, eager_bar=dtype != torch.float32, causal=causal)


def test_fp32_tf32_gpu(wide_backend, device, monkeypatch):
    if not ON_GPU:
        pytest.skip("TF32 matmuls exist on a GPU only")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    q, k, v = _inputs(2, 4, 2, 200, 255, 64, torch.float32, device)
    # eager fp32 then runs its matmuls in TF32 as well: it is the bar
    _check(q, k, v, wide_backend, eager_bar=True, causal=True)


@pytest.mark.parametrize("causal", [True, False])
def test_fp32(wide_backend, device, causal):
    q, k, v = _inputs(2, 2, 1, 33, 40, 32, torch.float32, device)
    _check(q, k, v, wide_backend, causal=causal)


# (B, Hq, Hkv, T, S, D); D in {64, 128} so that the cuda backend runs them too.
LOWP_SHAPES = [(1, 2, 1, 33, 33, 64), (2, 2, 2, 17, 40, 128), (1, 4, 1, 40, 17, 64)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", LOWP_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_low_precision(backend, device, shape, causal, dtype):
    if dtype == torch.bfloat16 and backend == "triton" and not ON_GPU:
        pytest.skip("bf16 Triton runs on a GPU only: the CPU interpreter's bf16 tl.dot is broken")
    q, k, v = _inputs(*shape, dtype, device)
    _check(q, k, v, backend, eager_bar=True, causal=causal)


def test_custom_scale_gqa(wide_backend, device):
    q, k, v = _inputs(1, 6, 2, 19, 23, 32, torch.float64, device)
    _check(q, k, v, wide_backend, causal=True, scale=0.3)      # 0.3 is not an fp32 number
    _check(q, k, v, wide_backend, causal=False, scale=1.7)


def test_default_scale_is_inverse_sqrt_head_dim(wide_backend, device):
    q, k, v = _inputs(1, 2, 2, 9, 9, 32, torch.float64, device)
    a = ro.attention(q, k, v, backend=wide_backend)
    b = ro.attention(q, k, v, scale=1 / math.sqrt(32), backend=wide_backend)
    assert_matches(a, b, what="scale=None vs 1/sqrt(D)")


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_huge_scores_offset(wide_backend, device, sign):
    # Every score of a row shifted by ±1e4 (a direction shared by all keys), plus O(1) variation:
    # the softmax is unchanged but exp overflows unless the running max is subtracted.
    q, k, v = _inputs(1, 2, 1, 33, 40, 16, torch.float64, device)
    q[..., 0] = 400.0 * sign
    k[..., 0] = 100.0       # scale 1/4: offset 400·100/4 = 1e4
    causal = sign > 0
    _check(q, k, v, wide_backend, causal=causal)
    # fp32 inputs: no worse than eager fp32 against fp64 (forward and gradients)
    _check(q.float(), k.float(), v.float(), wide_backend, eager_bar=True, causal=causal)


def test_huge_scores_one_hot(wide_backend, device):
    # |scores| ≈ 1e4 with no ties: the softmax is one-hot, dq and dk vanish (up to rounding).
    q, k, v = _inputs(1, 2, 1, 33, 40, 16, torch.float64, device, mag=100.0)
    assert (q @ k.transpose(-1, -2)).abs().amax() / 4 > 1e4
    g = torch.randn(q.shape, dtype=torch.float64, device=device)
    out, (dq, dk, dv) = _fwd_bwd(q, k, v, g, wide_backend)
    ref, (rdq, rdk, rdv) = _ref64(q, k, v, g)
    assert_matches(out, ref, what="out")
    assert_matches(dv, rdv, what="dv")
    # dq, dk are ≈ 0 except in rows with a near tie, so compare absolutely: rounding of
    # dp − delta (≈ 1e-15) times scale·|k| (≈ 100) per term.
    assert (dq - rdq).abs().max() < 1e-10 and (dk - rdk).abs().max() < 1e-10


@pytest.mark.parametrize("mag", [16.0, 50.0])
def test_fp32_large_scores_dv_no_worse_than_eager(wide_backend, device, mag):
    """fp32 scores of ~4e3 / ~4e4: backward recomputes p = 2^((u − m) − log2 l) from the saved
    pair; a single fp32 lse = m + log2 l would cost ulp(m)/2 (up to 0.2 % of p) and fail this."""
    torch.manual_seed(int(mag))
    q, k, v = _inputs(1, 2, 1, 33, 40, 16, torch.float32, device, mag=mag)
    g = torch.randn(q.shape, dtype=torch.float64, device=device)
    out, (dq, dk, dv) = _fwd_bwd(q, k, v, g, wide_backend)
    ref, (rdq, rdk, rdv) = _ref64(q, k, v, g)
    eager, (edq, edk, edv) = _fwd_bwd(q, k, v, g, "eager")
    assert_matches(out, ref, eager, tol=1e-6, what="out")
    assert_matches(dv, rdv, eager=edv, tol=1e-6, what="dv")


def test_rows_that_see_no_key_output_zero(wide_backend, device):
    T, S = 40, 17   # bottom-right causal: rows 0..22 see no key
    q, k, v = _inputs(1, 2, 1, T, S, 16, torch.float64, device)
    out, (dq, dk, dv) = _check(q, k, v, wide_backend, causal=True)
    assert torch.equal(out[:, :, :T - S], torch.zeros_like(out[:, :, :T - S]))
    assert torch.equal(dq[:, :, :T - S], torch.zeros_like(dq[:, :, :T - S]))
    assert out[:, :, T - S:].abs().amin(-1).gt(0).all()


@pytest.mark.parametrize("causal", [True, False])
def test_causal_alignment_vs_sdpa(wide_backend, device, causal):
    """T == S: same as SDPA's is_causal; T < S: SDPA with an explicit bottom-right mask."""
    q, k, v = _inputs(1, 2, 2, 21, 21, 16, torch.float64, device)
    ours = ro.attention(q, k, v, causal=causal, backend=wide_backend)
    assert_matches(ours, F.scaled_dot_product_attention(q, k, v, is_causal=causal), what="T == S")
    q2 = q[:, :, :13]
    ours = ro.attention(q2, k, v, causal=causal, backend=wide_backend)
    mask = torch.ones(13, 21, dtype=torch.bool, device=device)
    if causal:
        mask = mask.tril(diagonal=21 - 13)
    sdpa = F.scaled_dot_product_attention(q2, k, v, attn_mask=mask)
    assert_matches(ours, sdpa, what="T < S, bottom-right")
    if causal:  # and it is not top-left
        assert rel_err(ours, F.scaled_dot_product_attention(q2, k, v, is_causal=True)) > 1e-3


def test_empty_inputs(wide_backend, device):
    for B, T, S in ((0, 5, 5), (2, 0, 5), (2, 5, 0)):
        q, k, v = (t.requires_grad_() for t in _inputs(B, 2, 1, T, S, 16, torch.float64, device))
        out = ro.attention(q, k, v, backend=wide_backend, causal=False)
        assert out.shape == q.shape
        assert torch.equal(out, torch.zeros_like(out))   # S = 0: nothing to attend to
        out.backward(torch.randn_like(out))
        for t in (q, k, v):
            assert t.grad.shape == t.shape and torch.equal(t.grad, torch.zeros_like(t))


def test_gradcheck(wide_backend, device):
    q, k, v = (t.requires_grad_() for t in _inputs(1, 2, 1, 5, 7, 16, torch.float64, device))
    for causal in (True, False):
        fn = lambda q, k, v: ro.attention(q, k, v, causal=causal, scale=0.7, backend=wide_backend)
        assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


def test_noncontiguous_inputs_and_grad(wide_backend, device):
    # the transposed views a QKV split produces, and a non-contiguous upstream gradient
    B, T, Hq, Hkv, D = 2, 19, 4, 2, 16
    qkv = torch.randn(B, T, (Hq + 2 * Hkv) * D, dtype=torch.float64, device=device)
    q, k, v = qkv.split([Hq * D, Hkv * D, Hkv * D], -1)
    q, k, v = (t.reshape(B, T, -1, D).transpose(1, 2) for t in (q, k, v))
    assert not q.is_contiguous()
    g = torch.randn(B, T, Hq, D, dtype=torch.float64, device=device).transpose(1, 2)
    out, grads = _fwd_bwd(q, k, v, g, wide_backend, causal=True)
    ref, ref_grads = _ref64(q, k, v, g, causal=True)
    assert_matches(out, ref, what="out")
    for name, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_matches(a, b, what=name)


def test_backward_is_deterministic(fused_backend, device):
    dtype = torch.float32 if fused_backend == "triton" else torch.float16
    D = 16 if fused_backend == "triton" else 64
    q, k, v = _inputs(1, 2, 1, 37, 37, D, dtype, device)
    g = torch.randn(q.shape, dtype=torch.float64, device=device)
    _, a = _fwd_bwd(q, k, v, g, fused_backend)
    _, b = _fwd_bwd(q, k, v, g, fused_backend)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_bad_inputs_raise(device):
    q, k, v = _inputs(2, 4, 2, 8, 8, 16, torch.float32, device)
    with pytest.raises(ValueError, match="q must be 4-D"):
        ro.attention(q[0], k, v)
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        ro.attention(q, None, v)
    with pytest.raises(TypeError, match="q must have dtype"):
        ro.attention(q.long(), k.long(), v.long())
    with pytest.raises(TypeError, match="k has dtype"):
        ro.attention(q, k.double(), v)
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        ro.attention(q, k, v[:, :, :5])
    with pytest.raises(ValueError, match="batch size"):
        ro.attention(q, k[:1], v[:1])
    with pytest.raises(ValueError, match="head dim"):
        ro.attention(q, k[..., :8], v[..., :8])
    with pytest.raises(ValueError, match=r"multiple of the number of key/value heads \(k.shape\[1\] = 3\)"):
        ro.attention(q, k[:, :1].expand(2, 3, 8, 16), v[:, :1].expand(2, 3, 8, 16))
    with pytest.raises(ValueError, match="backend"):
        ro.attention(q, k, v, backend="nope")
    # head dims the triton backend does not take (meta tensors: no kernel needed to check)
    for D in (8, 24, 272):
        mq = torch.empty(1, 2, 4, D, device="meta")
        with pytest.raises(ValueError, match="multiples of 16 from 16 to 256, got"):
            ro.attention(mq, mq, mq, backend="triton")
    # the cuda backend: head dims 64/128, fp16/bf16, CUDA tensors
    mq = torch.empty(1, 2, 4, 32, dtype=torch.float16, device="meta")
    with pytest.raises(ValueError, match=r"cuda backend supports head dims .*\(64, 128\), got 32"):
        ro.attention(mq, mq, mq, backend="cuda")
    mq = torch.empty(1, 2, 4, 64, dtype=torch.float32, device="meta")
    with pytest.raises(TypeError, match="float16 and bfloat16, got float32"):
        ro.attention(mq, mq, mq, backend="cuda")
    # the fused kernels launch a (tiles, heads, batch) grid: batch and heads each ≤ 65535
    for be in ("triton", "cuda"):
        for shape in ((65536, 1, 4, 64), (1, 65536, 4, 64)):
            mq = torch.empty(*shape, dtype=torch.float16, device="meta")
            with pytest.raises(ValueError, match=rf"{be} backend supports a batch size .* at most 65535"):
                ro.attention(mq, mq, mq, backend=be)
    mq = torch.empty(65535, 2, 4, 64, dtype=torch.float16, device="meta")  # B·H > 65535 is fine
    assert ro.attention(mq, mq[:, :1], mq[:, :1], backend="triton").shape == mq.shape
    for bad in ("x", True):
        with pytest.raises(TypeError, match="scale must be None or a finite number"):
            ro.attention(q, k, v, scale=bad)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scale must be None or a finite number"):
            ro.attention(q, k, v, scale=bad)
    with pytest.raises(ValueError, match=r"x must have shape \[B, T, d_model = 32\], got \(4, 32\)"):
        CausalSelfAttention(32, 2)(torch.randn(4, 32))
    for args, name in (((32, 0), "n_heads"), ((32, 2, 0), "n_kv_heads"), ((0, 2), "d_model")):
        with pytest.raises(ValueError, match=f"{name} must be a positive int"):
            CausalSelfAttention(*args)
    c = torch.randn(1, 2, 4, 64, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
        ro.attention(c, c, c, backend="cuda")


@pytest.mark.parametrize("be", ["triton", "cuda"])
def test_meta_tensors(be):
    q = torch.empty(2, 8, 300, 64, dtype=torch.bfloat16, device="meta", requires_grad=True)
    k = torch.empty(2, 2, 500, 64, dtype=torch.bfloat16, device="meta", requires_grad=True)
    v = torch.empty(2, 2, 500, 64, dtype=torch.bfloat16, device="meta", requires_grad=True)
    out = ro.attention(q, k, v, backend=be)
    assert out.device.type == "meta" and out.shape == q.shape and out.dtype == q.dtype
    out.sum().backward()
    for t in (q, k, v):
        assert t.grad.shape == t.shape and t.grad.dtype == t.dtype and t.grad.device.type == "meta"
    _, lse = torch.ops.rlhf_ops.attention_fwd(q, k, v, True, 0.125, -1, 0, 0.0, be)
    # every fused backend keeps the base-2 pair (max, log2 Σ) per row
    assert lse.shape == (2, 2, 8, 300) and lse.dtype == torch.float32



def test_saved_for_backward_is_linear_in_T():
    B, H, D = 2, 8, 64

    def saved(backend, T):
        q, k, v = (torch.empty(B, H, T, D, dtype=torch.bfloat16, device="meta", requires_grad=True)
                   for _ in range(3))
        return saved_bytes(lambda: ro.attention(q, k, v, backend=backend))

    T = 4096
    qkvo = 4 * B * H * T * D * 2
    fused = saved("triton", T)
    assert fused <= qkvo + B * H * T * 8, f"fused saves {fused} bytes, more than q, k, v, out and lse"
    assert saved("triton", 2 * T) == 2 * fused, "saved bytes must grow linearly in T"
    eager = saved("reference", T)
    assert eager >= B * H * T * T * 2, "eager saves the T×T probabilities"


def test_causal_self_attention_eager(device):
    # CausalSelfAttention calls rlhf_ops.attention (the function, reached through nn.py's module alias)
    block = CausalSelfAttention(32, 2, 1, backend="reference").to(device, torch.float64)
    x = torch.randn(2, 5, 32, dtype=torch.float64, device=device)
    y = block(x)
    q, k, v = block.qkv(x).split([32, 16, 16], -1)
    q, k, v = (t.reshape(2, 5, -1, 16).transpose(1, 2) for t in (q, k, v))
    ref = block.proj(reference.attention(q, k, v, True).transpose(1, 2).reshape(2, 5, 32))
    assert_matches(y, ref, what="block output")


@pytest.mark.parametrize("n_kv_heads", [2, 1])
def test_causal_self_attention_compiled(fused_backend, device, n_kv_heads):
    if fused_backend == "cuda":
        d_model, n_heads, dtype = 128, 2, torch.float16    # head dim 64
    else:
        d_model, n_heads, dtype = 32, 2, torch.float64     # head dim 16
    torch.manual_seed(0)
    block = CausalSelfAttention(d_model, n_heads, n_kv_heads, backend=fused_backend).to(device, dtype)
    ref_block = CausalSelfAttention(d_model, n_heads, n_kv_heads, backend="reference").to(device, torch.float64)
    ref_block.load_state_dict({k: v.double() for k, v in block.state_dict().items()})
    x = torch.randn(2, 13, d_model, dtype=dtype, device=device)
    w = torch.randn(2, 13, d_model, dtype=dtype, device=device)

    def step(x):
        return (block(x) * w).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(x)
    loss.backward()
    ref = (ref_block(x.double()) * w.double()).sum()
    ref.backward()
    tol = 1e-10 if dtype == torch.float64 else 2e-2
    assert_matches(loss, ref, tol=tol, what="compiled loss")
    for (name, p), (_, r) in zip(block.named_parameters(), ref_block.named_parameters()):
        assert p.grad is not None, name
        assert_matches(p.grad, r.grad, tol=tol, what=f"grad {name}")


# ------------------------------------------------------- the block shapes a GPU may select ---

def _kernels_module():
    return importlib.import_module("rlhf_ops.kernels.attention")


def _gpu_launch_configs():
    """Launch i runs row i (cycled) of each kernel's config table: every block shape a GPU
    config can select, each kernel's at least once."""
    if backend_problem("triton"):
        return []
    tables = _kernels_module().TABLES
    n = max(len(t) for t in tables.values())
    return [{name: tuple(t[i % len(t)][:2]) for name, t in tables.items()} | {"delta": 64}
            for i in range(n)]


@pytest.mark.parametrize("cfg", _gpu_launch_configs(), ids=lambda c: f"triton-{_cfg_id(c)}")
def test_gpu_block_shapes_under_interpreter(device, monkeypatch, cfg):
    """The interpreter runs the GPU's block shapes and its dK/dV orientation (k·qᵀ), on shapes
    with S − T ≡ 1 and ≡ BLOCK_N − 1 modulo each block size, dense and varlen, window, softcap."""
    if ON_GPU:
        pytest.skip("on a GPU the autotuner runs these configs")
    ka = _kernels_module()
    monkeypatch.setattr(ka, "launch_config", cfg)
    monkeypatch.setattr(ka, "FWD_ORIENT", False)
    bn_f, bm_q, bn_q = cfg["fwd"][1], cfg["dq"][0], cfg["dq"][1]
    bm_k, bn_k = cfg["dkdv"]
    T = 37
    for S in sorted({T + 1, T + bn_f - 1, T + bn_q - 1, T + bn_k + 1, T + bm_k - 1}):
        q, k, v = _inputs(1, 2, 1, T, S, 32, torch.float64, device)
        _check(q, k, v, "triton", causal=True)
    q, k, v = _inputs(1, 2, 1, T + bm_q + 1, T, 32, torch.float64, device)     # T > S
    _check(q, k, v, "triton", causal=True, window=(bn_f + 3, 0), softcap=2.0)
    # varlen: sequences across block edges; a window narrower than a block; softcap
    lq, lk = [bm_q + 1, 3, 0, bn_f - 1], [bn_k + 2, 5, 4, bm_k - 1]
    cu = lambda l: torch.tensor([0] + torch.tensor(l).cumsum(0).tolist(), dtype=torch.int32, device=device)
    q = torch.randn(sum(lq), 2, 32, dtype=torch.float64, device=device)
    k = torch.randn(sum(lk), 1, 32, dtype=torch.float64, device=device)
    v = torch.randn(sum(lk), 1, 32, dtype=torch.float64, device=device)
    for kw in ({"causal": True}, {"causal": False, "window": (5, 2), "softcap": 1.5}):
        g = torch.randn(q.shape, dtype=torch.float64, device=device)
        qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
        out = ro.attention_varlen(qs, ks, vs, cu(lq), cu(lk), max(lq), max(lk), backend="triton", **kw)
        grads = torch.autograd.grad(out, (qs, ks, vs), g)
        qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
        ref = ro.attention_varlen(qr, kr, vr, cu(lq), cu(lk), max(lq), max(lk), backend="reference", **kw)
        ref_grads = torch.autograd.grad(ref, (qr, kr, vr), g)
        assert_matches(out, ref, what=f"varlen out {kw}")
        for name, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
            assert_matches(a, b, what=f"varlen {name} {kw}")


# The sliding window's left bound: an off-by-one in the first key a query block sees, or in the
# last query a key block is seen by, is wrong only where WL − (S − T) ≡ 1 (mod the block size) —
# the left-window twin of the causal bound above. Windows (1, 0) and (17, 0) put that residue at
# every block size of 16 and more (T = S), (0, 0) the residue 0; T, S ∈ {17, 32, 48} move it.
_WINDOW_SHAPES = [(T, S) for T in (17, 32, 48) for S in (17, 32, 48)]


def _window_configs():
    """("interp16", None): the interpreter's 16×16 blocks; then every GPU table block shape."""
    return [pytest.param("interp16", None, id="triton-interp16")] + [
        pytest.param(_cfg_id(c), c, id=f"triton-{_cfg_id(c)}") for c in _gpu_launch_configs()]


def _cfg_id(cfg) -> str:
    return "-".join(f"{k}{v[0]}x{v[1]}" for k, v in cfg.items() if k != "delta")


@pytest.mark.parametrize("name,cfg", _window_configs())
def test_window_left_bound(device, monkeypatch, name, cfg):
    """triton vs the fp64 reference, out and dq/dk/dv, at windows (1, 0), (0, 0), (17, 0) and
    T, S ∈ {17, 32, 48}, at the interpreter's blocks and at each GPU block shape."""
    why = backend_problem("triton")
    if why:
        pytest.skip(why)
    if cfg is not None:
        if ON_GPU:
            pytest.skip("on a GPU the autotuner runs these configs")
        ka = _kernels_module()
        monkeypatch.setattr(ka, "launch_config", cfg)
        monkeypatch.setattr(ka, "FWD_ORIENT", False)
    for T, S in _WINDOW_SHAPES:
        q, k, v = _inputs(1, 2, 1, T, S, 16, torch.float64, device)
        for window in ((1, 0), (0, 0), (17, 0)):
            try:
                _check(q, k, v, "triton", causal=True, window=window)
            except AssertionError as e:
                raise AssertionError(f"T={T} S={S} window={window} blocks {name}: {e}") from None


def test_autotune_selection_fits_and_prunes_known_spills():
    """The pruner (pure Python): never empty, every kept config fits shared memory with its
    stages, and the spilling configs found by the offline audit are never selected."""
    if backend_problem("triton") and not _kernels_available():
        pytest.skip("triton is not installed")
    ka = _kernels_module()
    limits = {"sm_80": 163 * 1024, "sm_90": 227 * 1024, "sm_86": 99 * 1024}
    for kernel, table in ka.TABLES.items():
        assert len(table) <= 5, f"{kernel}: a short list, so that a new length bucket tunes fast"
        for arch, limit in limits.items():
            for block_d in (16, 32, 64, 128, 256):
                for elem in (2, 4, 8):
                    rows = ka.select(kernel, block_d, elem, limit)
                    assert rows, (kernel, arch, block_d, elem)
                    if elem == 2:
                        assert table[-1] not in rows or table[-1][4], "16-bit finds a row before the last"
                    for bm, bn, w, st, d16, d32 in rows:
                        if elem == 8:
                            continue      # fp64 runs the fallback, which at D=256 needs sm_90
                        assert block_d <= (d16 if elem == 2 else d32)
                        # known limit (docs/attention.md): fp32 backward at D=256 needs > 99 KB
                        if not (arch == "sm_86" and elem == 4 and block_d == 256 and kernel != "fwd"):
                            assert ka.smem_bytes(kernel, bm, bn, st, block_d, elem) <= limit, (
                                kernel, arch, block_d, elem, (bm, bn, w, st))
    # configs the offline resource audit rejected: sm_80 D=256 fwd 128×32 w4 (23 KB of spills), sm_90 fp32 fwd 64×64, D=128 dK/dV
    # 64×64 w4 (736 B on sm_90)
    assert not any(r[:3] == (128, 32, 4) for r in ka.select("fwd", 256, 2, limits["sm_80"]))
    assert not any(r[:2] == (64, 64) for r in ka.select("fwd", 128, 4, limits["sm_90"]))
    assert not any(r[:3] == (64, 64, 4) for r in ka.select("dkdv", 128, 2, limits["sm_90"]))
    # buckets: every rollout length of one power-of-two range shares a tuning entry
    assert [ka.length_bucket(n) for n in (1, 64, 65, 1000, 1024, 1025)] == [64, 64, 128, 1024, 1024, 2048]


def _kernels_available():
    try:
        _kernels_module()
        return True
    except ImportError:
        return False
