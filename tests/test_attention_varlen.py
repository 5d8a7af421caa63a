"""rlhf_ops.attention_varlen, window / softcap, unpad / pad, and the Triton block shapes a GPU picks.

Oracle: float64 dense eager attention (``reference.attention``) run sequence by sequence, forward
and dQ/dK/dV; the window rule itself is checked against a mask built element by element from
flash-attn's definition and ``F.scaled_dot_product_attention``. Every buffer the Triton launchers
allocate is poisoned with NaN first, so an element a kernel forgets to write fails.
"""
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

import rlhf_ops as ro
from rlhf_ops import reference
from rlhf_ops.nn import CausalSelfAttention
from _util import assert_matches, poison_, saved_tensors
from conftest import ON_GPU, backend_problem


@pytest.fixture(autouse=True)
def _poison_triton_buffers(monkeypatch):
    if backend_problem("triton") is None:
        kattn = importlib.import_module("rlhf_ops.kernels.attention")
        alloc = kattn._empty
        monkeypatch.setattr(kattn, "_empty", lambda *a, **kw: poison_(alloc(*a, **kw)))


@pytest.fixture(params=["reference", "triton"])
def wide_backend(request):
    """Backends that take every dtype, head dim, window and softcap."""
    why = backend_problem(request.param)
    if why:
        pytest.skip(why)
    return request.param


def _cu(lengths, device):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32,
                        device=device)


def _packed(lq, lk, Hq, Hkv, D, dtype, device, mag=1.0):
    q = torch.randn(sum(lq), Hq, D, dtype=dtype, device=device) * mag
    k = torch.randn(sum(lk), Hkv, D, dtype=dtype, device=device) * mag
    v = torch.randn(sum(lk), Hkv, D, dtype=dtype, device=device)
    return q, k, v, (_cu(lq, device), _cu(lk, device), max(lq, default=0), max(lk, default=0))


def _varlen(q, k, v, g, meta, backend, **kw):
    """Output and (dq, dk, dv) of attention_varlen for upstream gradient g."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = ro.attention_varlen(q, k, v, *meta, backend=backend, **kw)
    return out, torch.autograd.grad(out, (q, k, v), g.to(out.dtype), allow_unused=True)


def _loop_oracle(q, k, v, g, meta, causal=True, scale=None, window=None, softcap=0.0):
    """float64 dense reference, one sequence at a time, then concatenated."""
    q, k, v = (t.detach().double().clone().requires_grad_() for t in (q, k, v))
    cu_q, cu_k = meta[0].tolist(), meta[1].tolist()
    outs = []
    for b in range(len(cu_q) - 1):
        qs, ks, vs = (t[c[b]:c[b + 1]].transpose(0, 1)[None] for t, c in ((q, cu_q), (k, cu_k), (v, cu_k)))
        outs.append(reference.attention(qs, ks, vs, causal, scale, window, softcap)[0].transpose(0, 1))
    out = torch.cat(outs) if outs else q.new_zeros(q.shape)
    grads = torch.autograd.grad(out, (q, k, v), g.double(), allow_unused=True)
    grads = tuple(torch.zeros_like(t) if gr is None else gr for gr, t in zip(grads, (q, k, v)))
    return out, grads


def _check_varlen(q, k, v, meta, backend, *, eager_bar=False, tol=None, **kw):
    g = torch.randn(q.shape, dtype=torch.float64, device=q.device)
    out, grads = _varlen(q, k, v, g, meta, backend, **kw)
    ref, ref_grads = _loop_oracle(q, k, v, g, meta, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    eager, eager_grads = (_varlen(q, k, v, g, meta, "reference", **kw) if eager_bar
                          else (None, (None,) * 3))
    assert_matches(out, ref, eager, tol=tol, what="out")
    for name, gr, r, e, t in zip(("dq", "dk", "dv"), grads, ref_grads, eager_grads, (q, k, v)):
        assert gr.shape == t.shape and gr.dtype == t.dtype, name
        assert_matches(gr, r, e, tol=tol, what=name)
    return out, grads


# (q lengths, k lengths): ragged, an empty sequence, T == S, T < S and T > S per sequence
LENGTHS = {
    "ragged": ([1, 2, 17, 64, 129, 0], [1, 2, 17, 64, 129, 0]),
    "T<S": ([1, 2, 17, 0, 30], [3, 19, 20, 5, 61]),
    "T>S": ([3, 19, 20, 5, 61], [1, 2, 17, 0, 30]),
}


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", [(4, 2), (2, 1), (2, 2)], ids=["gqa", "mqa", "mha"])
@pytest.mark.parametrize("lengths", list(LENGTHS), ids=list(LENGTHS))
def test_varlen_matches_per_sequence_loop(wide_backend, device, lengths, heads, causal):
    lq, lk = LENGTHS[lengths]
    if lengths == "ragged" and heads != (4, 2):
        lq = lk = [1, 2, 17, 40, 0]          # the long mix once is enough under the interpreter
    q, k, v, meta = _packed(lq, lk, *heads, 16, torch.float64, device)
    _check_varlen(q, k, v, meta, wide_backend, causal=causal)


WINDOWS = [(4, -1), (3, 2), (0, 0), (2, 7), (500, 500), (-1, 3)]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: f"w{w[0]}_{w[1]}")
def test_varlen_window(wide_backend, device, window, causal):
    lq, lk = [5, 40, 0, 33, 1], [9, 33, 4, 40, 1]
    q, k, v, meta = _packed(lq, lk, 4, 2, 32, torch.float64, device)
    _check_varlen(q, k, v, meta, wide_backend, causal=causal, window=window)


@pytest.mark.parametrize("window", [None, (6, 0), (3, 4)], ids=["nowin", "w6_0", "w3_4"])
def test_varlen_softcap(wide_backend, device, window):
    lq, lk = [17, 3, 40], [20, 3, 33]
    q, k, v, meta = _packed(lq, lk, 2, 1, 16, torch.float64, device)
    _check_varlen(q, k, v, meta, wide_backend, softcap=1.5, window=window, scale=0.3)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_softcap_huge_scores(wide_backend, device, sign):
    """|s| ≈ 1e4 capped at 30: saturates tanh (derivative ≈ 0); fp64 exact, fp32 within eager's error."""
    lq, lk = [20, 33], [33, 20]
    q, k, v, meta = _packed(lq, lk, 2, 1, 16, torch.float64, device, mag=1.0)
    q[..., 0] = 400.0 * sign
    k[..., 0] = 100.0            # + 400·100/4 = 1e4 on every score, plus O(1) variation
    for causal in (True, False):
        _check_varlen(q, k, v, meta, wide_backend, causal=causal, softcap=30.0)
        _check_varlen(q.float(), k.float(), v.float(), meta, wide_backend, causal=causal, softcap=30.0,
                      eager_bar=True, tol=1e-6)
    # small scores, large cap: the cap is the identity up to s³/(3c²) and must not lose precision
    q, k, v, meta = _packed(lq, lk, 2, 1, 16, torch.float32, device, mag=0.05)
    _check_varlen(q, k, v, meta, wide_backend, softcap=50.0, eager_bar=True, tol=1e-6)


def test_rows_that_see_nothing_are_zero(wide_backend, device):
    """Queries that see no key output 0 and get 0 gradient; keys no query sees get 0 gradient."""
    # seq 0: T = 9 > S = 3, causal: rows 0..5 see nothing; seq 1: no keys at all
    lq, lk = [9, 4, 2], [3, 0, 6]
    q, k, v, meta = _packed(lq, lk, 2, 1, 16, torch.float64, device)
    out, (dq, dk, dv) = _check_varlen(q, k, v, meta, wide_backend, causal=True)
    for rows in (slice(0, 6), slice(9, 13)):
        assert torch.equal(out[rows], torch.zeros_like(out[rows]))
        assert torch.equal(dq[rows], torch.zeros_like(dq[rows]))
    assert out[6:9].abs().amin(-1).gt(0).all() and out[13:].abs().amin(-1).gt(0).all()
    # causal window (1, 0) in seq 2 (T = 2, S = 6): row 0 sees keys 3..4, row 1 keys 4..5, so
    # keys 0..2 of seq 2 (packed rows 3..5) get no gradient
    out, (dq, dk, dv) = _check_varlen(q, k, v, meta, wide_backend, causal=True, window=(1, 0))
    assert torch.equal(dk[3:6], torch.zeros_like(dk[3:6])) and torch.equal(dv[3:6], torch.zeros_like(dv[3:6]))
    assert dv[6:9].abs().amin(-1).gt(0).all()
    # a non-causal window whose right edge is left of every key for the first rows of seq 0
    out, _ = _check_varlen(q, k, v, meta, wide_backend, causal=False, window=(0, 0))
    assert torch.equal(out[:6], torch.zeros_like(out[:6]))


def test_nan_or_inf_where_no_probability_flows(wide_backend, device):
    """A row that sees no key outputs exactly 0 with dq = 0 even where a value holds NaN; with a
    softcap, a key holding −inf caps the score to −c (finite, derivative 0): dk, dv stay finite
    as in the reference (padded rows/keys of a tile must not turn 0·∞ into NaN)."""
    q = torch.randn(1, 1, 2, 16, dtype=torch.float64, device=device, requires_grad=True)
    k = torch.randn(1, 1, 1, 16, dtype=torch.float64, device=device, requires_grad=True)
    v0 = torch.randn(1, 1, 1, 16, dtype=torch.float64, device=device)
    v0[..., 3] = math.nan
    v = v0.requires_grad_()
    o = ro.attention(q, k, v, causal=True, backend=wide_backend)     # row 0 sees j ≤ 0 + 1 − 2: none
    dq, = torch.autograd.grad(o, q, torch.ones_like(o))
    assert torch.equal(o[0, 0, 0], torch.zeros_like(o[0, 0, 0]))
    assert torch.equal(dq[0, 0, 0], torch.zeros_like(dq[0, 0, 0]))
    q = torch.randn(1, 1, 1, 16, dtype=torch.float64, device=device)
    k = torch.randn(1, 1, 1, 16, dtype=torch.float64, device=device)
    v = torch.randn(1, 1, 1, 16, dtype=torch.float64, device=device)
    q[..., 2], k[..., 5] = 1e4, -math.inf
    grads = []
    for be in (wide_backend, "reference"):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        o = ro.attention(*leaves, causal=False, softcap=5.0, backend=be)
        grads.append(torch.autograd.grad(o, leaves, torch.ones_like(o)))
    for name, a, b in zip(("dq", "dk", "dv"), *grads):
        assert torch.equal(a.isnan(), b.isnan()), name
        assert_matches(torch.nan_to_num(a), torch.nan_to_num(b), what=name)


def test_empty_and_degenerate_batches(wide_backend, device):
    for lq, lk in (([0], [0]), ([0, 0], [3, 2]), ([3, 2], [0, 0]), ([], [])):
        q, k, v, meta = _packed(lq, lk, 2, 1, 16, torch.float64, device)
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        out = ro.attention_varlen(q, k, v, *meta, backend=wide_backend)
        assert out.shape == q.shape and torch.equal(out, torch.zeros_like(out))
        out.backward(torch.randn_like(out))
        for t in (q, k, v):
            assert t.grad is not None and torch.equal(t.grad, torch.zeros_like(t))


def test_max_seqlen_may_exceed_lengths(wide_backend, device):
    lq, lk = [5, 9], [7, 3]
    q, k, v, meta = _packed(lq, lk, 2, 2, 16, torch.float64, device)
    a = ro.attention_varlen(q, k, v, *meta, backend=wide_backend)
    b = ro.attention_varlen(q, k, v, meta[0], meta[1], 40, 70, backend=wide_backend)
    assert_matches(b, a, what="max_seqlen larger than needed")


# ------------------------------------------------------------------------ window semantics ---

def _flash_window_mask(T, S, causal, window):
    """flash-attn's window_size rule written out element by element."""
    left, right = window if window is not None else (-1, -1)
    if causal:
        right = 0
    mask = torch.zeros(T, S, dtype=torch.bool)
    for i in range(T):
        for j in range(S):
            lo_ok = left < 0 or j >= i + S - T - left
            hi_ok = right < 0 or j <= i + S - T + right
            mask[i, j] = lo_ok and hi_ok
    return mask


@pytest.mark.parametrize("T,S", [(13, 21), (21, 21), (21, 13)])
@pytest.mark.parametrize("window", [None, (4, -1), (3, 2), (-1, 2), (40, 40)], ids=str)
@pytest.mark.parametrize("causal", [True, False])
def test_window_matches_sdpa_with_explicit_mask(wide_backend, device, T, S, window, causal):
    q = torch.randn(1, 2, T, 16, dtype=torch.float64, device=device)
    k = torch.randn(1, 2, S, 16, dtype=torch.float64, device=device)
    v = torch.randn(1, 2, S, 16, dtype=torch.float64, device=device)
    mask = _flash_window_mask(T, S, causal, window).to(device)
    ours = ro.attention(q, k, v, causal=causal, window=window, backend=wide_backend)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    seen = mask.any(-1)                        # SDPA gives NaN for rows without a visible key
    assert_matches(ours[:, :, seen], sdpa[:, :, seen], what="rows that see keys")
    assert torch.equal(ours[:, :, ~seen], torch.zeros_like(ours[:, :, ~seen]))


def test_softcap_matches_explicit_formula(wide_backend, device):
    q, k, v = (torch.randn(1, 2, 9, 16, dtype=torch.float64, device=device) * 3 for _ in range(3))
    s = (q @ k.transpose(-1, -2)) * 0.25
    s = 2.0 * torch.tanh(s / 2.0)
    s = s.masked_fill(~torch.ones(9, 9, dtype=torch.bool, device=device).tril(), float("-inf"))
    ref = torch.softmax(s, -1) @ v
    assert_matches(ro.attention(q, k, v, softcap=2.0, backend=wide_backend), ref, what="softcap")


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [(5, -1), (2, 3), (100, 0)], ids=str)
def test_dense_window_softcap_matches_fp64(wide_backend, device, window, causal):
    for T, S, softcap in ((33, 33, 0.0), (17, 40, 1.7), (40, 17, 1.7)):
        q = torch.randn(2, 2, T, 32, dtype=torch.float64, device=device)
        k = torch.randn(2, 1, S, 32, dtype=torch.float64, device=device)
        v = torch.randn(2, 1, S, 32, dtype=torch.float64, device=device)
        g = torch.randn(q.shape, dtype=torch.float64, device=device)
        kw = dict(causal=causal, window=window, softcap=softcap)
        qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
        out = ro.attention(qs, ks, vs, backend=wide_backend, **kw)
        grads = torch.autograd.grad(out, (qs, ks, vs), g)
        qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
        ref = reference.attention(qr, kr, vr, causal, None, window, softcap)
        ref_grads = torch.autograd.grad(ref, (qr, kr, vr), g)
        assert_matches(out, ref, what=f"out {T}x{S} {kw}")
        for name, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
            assert_matches(a, b, what=f"{name} {T}x{S} {kw}")


# ----------------------------------------------------------------------- low precision, fp32 ---

@pytest.mark.parametrize("kw", [{}, {"window": (8, 0), "softcap": 20.0}], ids=["plain", "win_cap"])
def test_varlen_fp16_no_worse_than_eager(wide_backend, device, kw):
    lq, lk = [17, 40, 1, 33], [17, 33, 5, 40]
    q, k, v, meta = _packed(lq, lk, 2, 1, 64, torch.float16, device)
    _check_varlen(q, k, v, meta, wide_backend, eager_bar=True, **kw)


def test_varlen_bf16_gpu(wide_backend, device):
    if wide_backend == "triton" and not ON_GPU:
        pytest.skip("bf16 Triton runs on a GPU only: the CPU interpreter's bf16 tl.dot is broken")
    lq, lk = [17, 40, 1, 33], [17, 33, 5, 40]
    q, k, v, meta = _packed(lq, lk, 2, 1, 64, torch.bfloat16, device)
    _check_varlen(q, k, v, meta, wide_backend, eager_bar=True, window=(8, 0), softcap=20.0)


def test_varlen_fp32(wide_backend, device):
    q, k, v, meta = _packed([17, 40, 0, 9], [20, 33, 3, 9], 2, 1, 32, torch.float32, device)
    _check_varlen(q, k, v, meta, wide_backend, tol=1e-5)


def test_varlen_gradcheck(wide_backend, device):
    q, k, v, meta = _packed([3, 0, 5], [4, 2, 5], 2, 1, 16, torch.float64, device)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    for kw in ({"causal": True}, {"causal": False, "window": (1, 2), "softcap": 0.9}):
        fn = lambda q, k, v: ro.attention_varlen(q, k, v, *meta, scale=0.7, backend=wide_backend, **kw)
        assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


def test_dense_gradcheck_window_softcap(wide_backend, device):
    q, k, v = (torch.randn(1, 2, n, 16, dtype=torch.float64, device=device).requires_grad_()
               for n in (6, 8, 8))
    fn = lambda q, k, v: ro.attention(q, k, v[:, :1], causal=False, window=(2, 1), softcap=1.1,
                                      backend=wide_backend)
    assert torch.autograd.gradcheck(fn, (q, k[:, :1], v), fast_mode=True)


def test_triton_varlen_backward_is_deterministic(device):
    if backend_problem("triton"):
        pytest.skip(backend_problem("triton"))
    q, k, v, meta = _packed([17, 40, 5], [20, 33, 5], 2, 1, 16, torch.float32, device)
    g = torch.randn(q.shape, dtype=torch.float64, device=device)
    _, a = _varlen(q, k, v, g, meta, "triton", window=(7, 0), softcap=5.0)
    _, b = _varlen(q, k, v, g, meta, "triton", window=(7, 0), softcap=5.0)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_varlen_noncontiguous_inputs(wide_backend, device):
    """The [N, H, D] views a packed QKV projection produces (row stride ≠ H·D)."""
    lq = [7, 19, 2]
    N, Hq, Hkv, D = sum(lq), 4, 2, 16
    qkv = torch.randn(N, (Hq + 2 * Hkv) * D, dtype=torch.float64, device=device)
    q, k, v = qkv.split([Hq * D, Hkv * D, Hkv * D], -1)
    q, k, v = q.view(N, Hq, D), k.view(N, Hkv, D), v.view(N, Hkv, D)
    assert not q.is_contiguous()
    meta = (_cu(lq, device), _cu(lq, device), max(lq), max(lq))
    _check_varlen(q, k, v, meta, wide_backend, causal=True)


# ------------------------------------------------------------------ compile, memory, module ---

def test_varlen_compiles_fullgraph(wide_backend, device):
    lq = [5, 0, 11]
    q, k, v, meta = _packed(lq, lq, 2, 1, 16, torch.float64, device)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    w = torch.randn(q.shape, dtype=torch.float64, device=device)

    def step(q, k, v):
        return (ro.attention_varlen(q, k, v, *meta, window=(3, 0), softcap=2.0, backend=wide_backend)
                * w).sum()

    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v)
    loss.backward()
    g = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    step(q, k, v).backward()
    assert_matches(loss, step(q, k, v), what="compiled loss")
    for name, a, t in zip("qkv", g, (q, k, v)):
        assert_matches(a, t.grad, what=f"compiled d{name}")


@pytest.mark.parametrize("be", ["triton", "cuda"])
def test_varlen_meta_saved_bytes_linear(be):
    """Fused varlen saves q, k, v, out, cu_seqlens and two fp32 numbers per (query row, head):
    O(Nq·Hq), never anything [n, T, S]."""
    Hq, Hkv, D = 8, 2, 64

    def saved(n_seq, T):
        N = n_seq * T
        q = torch.empty(N, Hq, D, dtype=torch.bfloat16, device="meta", requires_grad=True)
        k = torch.empty(N, Hkv, D, dtype=torch.bfloat16, device="meta", requires_grad=True)
        v = torch.empty(N, Hkv, D, dtype=torch.bfloat16, device="meta", requires_grad=True)
        cu = torch.empty(n_seq + 1, dtype=torch.int32, device="meta")
        out = []
        tensors = saved_tensors(lambda: out.append(ro.attention_varlen(q, k, v, cu, cu, T, T, backend=be)))
        assert out[0].shape == q.shape and out[0].device.type == "meta"
        ints = [t for t in tensors if not t.is_floating_point()]
        assert len(ints) == 1 and ints[0].shape == cu.shape, "of the int tensors only cu_seqlens"
        return sum(t.numel() * t.element_size() for t in tensors if t.is_floating_point()), N

    got, N = saved(16, 1024)
    assert got == N * (Hq + 2 * Hkv) * D * 2 + N * Hq * D * 2 + 2 * 4 * N * Hq, got  # q, k, v, out, lse
    assert saved(16, 2048)[0] == 2 * got, "saved bytes must grow linearly in Nq"
    assert saved(64, 256)[0] == got, "saved bytes depend on Nq, not on how it is split"


def test_varlen_meta_backward_and_lse_shape():
    q = torch.empty(300, 8, 64, dtype=torch.float16, device="meta", requires_grad=True)
    k = torch.empty(500, 2, 64, dtype=torch.float16, device="meta", requires_grad=True)
    cu = torch.empty(5, dtype=torch.int32, device="meta")
    for be in ("triton", "cuda"):
        out = ro.attention_varlen(q, k, k, cu, cu, 100, 200, backend=be)
        out.sum().backward()
        assert q.grad.shape == q.shape and k.grad.shape == k.shape
        q.grad = k.grad = None
        _, lse = torch.ops.rlhf_ops.attention_varlen_fwd(q, k, k, cu, cu, 100, 200, True, 0.125, -1, 0,
                                                         0.0, be)
        assert lse.shape == (2, 8, 300) and lse.dtype == torch.float32


# (B, T) masks: left padding, right padding, mixed (a left-padded prompt then a right-padded
# response), holes, and an all-padding row
MASKS = {
    "left": [[0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1], [1, 1, 1, 1, 1, 1, 1]],
    "right": [[1, 1, 1, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1]],
    "mixed": [[0, 0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1, 1]],
    "holes": [[1, 0, 1, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0, 0], [0, 1, 1, 1, 1, 1, 1]],
}


@pytest.mark.parametrize("kind", list(MASKS))
def test_unpad_pad_round_trip(device, kind):
    mask = torch.tensor(MASKS[kind], device=device)
    x = torch.randn(3, 7, 4, 5, dtype=torch.float64, device=device, requires_grad=True)
    for m in (mask, mask.bool(), mask.to(torch.int32)):
        packed, indices, cu, max_len = ro.unpad(x, m)
        lens = mask.sum(-1)
        assert cu.dtype == torch.int32 and cu.tolist() == [0] + lens.cumsum(0).tolist()
        assert isinstance(max_len, int) and max_len == int(lens.max())
        assert indices.dtype == torch.int64 and packed.shape == (int(lens.sum()), 4, 5)
        # sequence b holds row b's real tokens in their order
        for b in range(3):
            real = mask[b].nonzero().flatten()
            assert torch.equal(packed[cu[b]:cu[b + 1]], x[b, real])
        back = ro.pad(packed, indices, 3, 7)
        assert torch.equal(back, x * mask[..., None, None])
    g = torch.randn(3, 7, 4, 5, dtype=torch.float64, device=device)
    (back * g).sum().backward()
    assert torch.equal(x.grad, g * mask[..., None, None])


def test_unpad_empty_batch(device):
    x = torch.randn(0, 5, 3, device=device)
    packed, indices, cu, max_len = ro.unpad(x, torch.zeros(0, 5, dtype=torch.int64, device=device))
    assert packed.shape == (0, 3) and cu.tolist() == [0] and max_len == 0
    assert ro.pad(packed, indices, 0, 5).shape == (0, 5, 3)


@pytest.mark.parametrize("kind", list(MASKS))
def test_padded_attention_through_unpad_matches_per_row(wide_backend, device, kind):
    """unpad → attention_varlen → pad equals dense attention of each row's real tokens."""
    mask = torch.tensor(MASKS[kind], device=device)
    B, T, H, D = 3, 7, 2, 16
    q, k, v = (torch.randn(B, T, H, D, dtype=torch.float64, device=device) for _ in range(3))
    (qp, idx, cu, m), (kp, _, _, _), (vp, _, _, _) = (ro.unpad(t, mask) for t in (q, k, v))
    out = ro.pad(ro.attention_varlen(qp, kp, vp, cu, cu, m, m, backend=wide_backend), idx, B, T)
    for b in range(B):
        real = mask[b].nonzero().flatten()
        ref = reference.attention(*(t[b, real].transpose(0, 1)[None] for t in (q, k, v)))
        assert_matches(out[b, real], ref[0].transpose(0, 1), what=f"row {b}")
        assert torch.equal(out[b, mask[b] == 0], torch.zeros_like(out[b, mask[b] == 0]))


@pytest.mark.parametrize("kind", ["left", "mixed"])
def test_causal_self_attention_mask_and_packed(wide_backend, device, kind):
    torch.manual_seed(0)
    block = CausalSelfAttention(32, 2, 1, backend=wide_backend).to(device, torch.float64)
    ref_block = CausalSelfAttention(32, 2, 1, backend="reference").to(device, torch.float64)
    ref_block.load_state_dict(block.state_dict())
    mask = torch.tensor(MASKS[kind], device=device)
    x = torch.randn(3, 7, 32, dtype=torch.float64, device=device, requires_grad=True)
    y = block(x, mask)
    assert y.shape == x.shape
    for b in range(3):
        real = mask[b].nonzero().flatten()
        if real.numel():
            assert_matches(y[b, real], ref_block(x[b, real][None])[0], what=f"row {b}")
        assert torch.equal(y[b, mask[b] == 0], torch.zeros_like(y[b, mask[b] == 0]))
    y.sum().backward()
    assert torch.equal(x.grad[mask == 0], torch.zeros_like(x.grad[mask == 0]))
    # no mask: the dense path, unchanged
    assert_matches(block(x), ref_block(x), what="dense path")
    # packed input [N, d] and [1, N, d] with cu_seqlens
    packed, _, cu, m = ro.unpad(x.detach(), mask)
    a = block(packed, cu_seqlens=cu, max_seqlen=m)
    b = block(packed[None], cu_seqlens=cu, max_seqlen=m)
    assert a.shape == packed.shape and b.shape == (1,) + tuple(packed.shape)
    assert_matches(a, y.detach()[mask.bool()], what="packed == padded")
    assert_matches(b[0], a, what="[1, N, d] == [N, d]")


# ------------------------------------------------------------------------------ bad inputs ---

def test_varlen_bad_inputs_raise(device):
    q, k, v, meta = _packed([3, 4], [5, 2], 4, 2, 16, torch.float32, device)
    cu_q, cu_k, mq, mk = meta
    call = lambda **kw: ro.attention_varlen(**{**dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                                      max_seqlen_q=mq, max_seqlen_k=mk), **kw})
    cases = [
        (dict(q=q[None]), ValueError, r"q must be 3-D"),
        (dict(k=k.double(), v=v.double()), TypeError, "k has dtype"),
        (dict(v=v[:, :1]), ValueError, "k and v must have the same shape"),
        (dict(k=k[:, :1].expand(7, 3, 16), v=v[:, :1].expand(7, 3, 16)), ValueError,
         r"multiple of the number of key/value heads \(k.shape\[1\] = 3\)"),
        (dict(k=k[..., :8], v=v[..., :8]), ValueError, "head dim"),
        (dict(cu_seqlens_q=cu_q.long()), TypeError, "cu_seqlens_q must have dtype int32"),
        (dict(cu_seqlens_k=[0, 5, 7]), TypeError, "cu_seqlens_k must be a torch.Tensor"),
        (dict(cu_seqlens_q=cu_q[None]), ValueError, r"cu_seqlens_q must be 1-D"),
        (dict(cu_seqlens_q=cu_q[:0]), ValueError, r"cu_seqlens_q must be 1-D \[n \+ 1\]"),
        (dict(cu_seqlens_k=cu_k[:2]), ValueError, "same length"),
        (dict(cu_seqlens_q=torch.tensor([1, 3, 7], dtype=torch.int32, device=device)), ValueError,
         "cu_seqlens_q must start at 0"),
        (dict(cu_seqlens_k=torch.tensor([0, 5, 4, 7], dtype=torch.int32, device=device),
              cu_seqlens_q=torch.tensor([0, 3, 3, 7], dtype=torch.int32, device=device)), ValueError,
         r"cu_seqlens_k must be non-decreasing, but entry 2 \(4\) is smaller than entry 1 \(5\)"),
        (dict(cu_seqlens_q=torch.tensor([0, 3, 6], dtype=torch.int32, device=device)), ValueError,
         r"last entry of cu_seqlens_q \(6\) must equal .* q.shape\[0\] = 7"),
        (dict(cu_seqlens_k=torch.tensor([0, 5, 8], dtype=torch.int32, device=device)), ValueError,
         r"last entry of cu_seqlens_k \(8\)"),
        (dict(max_seqlen_q=3), ValueError, r"max_seqlen_q = 3 is smaller than the longest sequence"),
        (dict(max_seqlen_k=4), ValueError, r"max_seqlen_k = 4 is smaller"),
        (dict(max_seqlen_q=4.0), TypeError, "max_seqlen_q must be a Python int"),
        (dict(max_seqlen_k=torch.tensor(5)), TypeError, "max_seqlen_k must be a Python int"),
        (dict(max_seqlen_q=-1), ValueError, "max_seqlen_q must be ≥ 0"),
        (dict(window=(3, -2)), ValueError, "window right must be ≥ −1"),
        (dict(window=(-5, 0)), ValueError, "window left must be ≥ −1"),
        (dict(window=3), TypeError, "window must be None or a pair"),
        (dict(window=(1, 2, 3)), TypeError, "window must be None or a pair"),
        (dict(window=(1.0, 2)), TypeError, "window left must be an int"),
        (dict(window=(True, 2)), TypeError, "window left must be an int"),
        (dict(softcap=-1.0), ValueError, "softcap must be a finite number ≥ 0"),
        (dict(softcap=float("inf")), ValueError, "softcap must be a finite number ≥ 0"),
        (dict(softcap="x"), TypeError, "softcap must be a finite number ≥ 0"),
        (dict(softcap=True), TypeError, "softcap must be a finite number ≥ 0"),
        (dict(scale=float("nan")), ValueError, "scale must be None or a finite number"),
        (dict(backend="nope"), ValueError, "backend"),
    ]
    for kw, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            call(**kw)
    # dense attention: the same window / softcap checks
    qd = torch.randn(1, 2, 4, 16, device=device)
    for kw, exc, msg in cases:
        if "window" in kw or "softcap" in kw:
            with pytest.raises(exc, match=msg):
                ro.attention(qd, qd, qd, **kw)
    # the fused backends' limits (meta tensors: no kernel needed to check)
    mq = torch.empty(10, 2, 24, dtype=torch.float16, device="meta")
    cu = torch.empty(3, dtype=torch.int32, device="meta")
    with pytest.raises(ValueError, match="multiples of 16 from 16 to 256, got 24"):
        ro.attention_varlen(mq, mq, mq, cu, cu, 5, 5, backend="triton")
    mq = torch.empty(10, 2, 64, dtype=torch.float16, device="meta")
    cu_big = torch.empty(65537, dtype=torch.int32, device="meta")
    for be in ("triton", "cuda"):
        with pytest.raises(ValueError, match=rf"{be} backend supports a number of sequences .* at most 65535"):
            ro.attention_varlen(mq, mq, mq, cu_big, cu_big, 5, 5, backend=be)
    with pytest.raises(ValueError, match=r"cuda backend does not support window \(got \(4, 0\)\)"):
        ro.attention_varlen(mq, mq, mq, cu, cu, 5, 5, window=(4, 0), backend="cuda")
    with pytest.raises(ValueError, match=r"cuda backend does not support window"):
        ro.attention(mq[None], mq[None], mq[None], causal=False, window=(-1, 3), backend="cuda")
    with pytest.raises(ValueError, match="cuda backend does not support softcap"):
        ro.attention(mq[None], mq[None], mq[None], softcap=30.0, backend="cuda")
    # flash-attn's default window (−1, −1), and a causal window (−1, r), are no window: accepted
    assert ro.attention_varlen(mq, mq, mq, cu, cu, 5, 5, window=(-1, -1), backend="cuda").shape == mq.shape
    assert ro.attention_varlen(mq, mq, mq, cu, cu, 5, 5, window=(-1, 8), backend="cuda").shape == mq.shape
    mq32 = torch.empty(10, 2, 64, dtype=torch.float32, device="meta")
    with pytest.raises(TypeError, match="float16 and bfloat16, got float32"):
        ro.attention_varlen(mq32, mq32, mq32, cu, cu, 5, 5, backend="cuda")


def test_varlen_debug_checks_for_cuda_tensors(monkeypatch):
    """On CUDA tensors the value checks cost a host sync: only with RLHF_OPS_DEBUG=1. Checked
    here through the check function itself with a CUDA-like device decision."""
    from rlhf_ops import _backend
    assert _backend.debug_checks(torch.device("cpu"))
    assert not _backend.debug_checks(torch.device("cuda"))
    monkeypatch.setenv("RLHF_OPS_DEBUG", "1")
    assert _backend.debug_checks(torch.device("cuda"))


def test_unpad_pad_bad_inputs(device):
    x = torch.randn(2, 5, 3, device=device)
    m = torch.ones(2, 5, dtype=torch.int64, device=device)
    with pytest.raises(TypeError, match="attention_mask must be bool or integer"):
        ro.unpad(x, m.float())
    with pytest.raises(ValueError, match=r"attention_mask must have shape \[B, T\] = x.shape\[:2\] = \(2, 5\)"):
        ro.unpad(x, m[:, :4])
    with pytest.raises(TypeError, match="attention_mask must be a torch.Tensor"):
        ro.unpad(x, [[1, 1]])
    with pytest.raises(ValueError, match=r"x must be a tensor \[B, T, ...\]"):
        ro.unpad(x[0, 0], m)
    packed, idx, cu, mx = ro.unpad(x, m)
    with pytest.raises(TypeError, match="indices must be an int64 tensor"):
        ro.pad(packed, idx.int(), 2, 5)
    with pytest.raises(ValueError, match="indices has 9 entries but x_packed has 10 rows"):
        ro.pad(packed, idx[:9], 2, 5)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, batch·seqlen = 8\)"):
        ro.pad(packed, idx, 2, 4)
    with pytest.raises(ValueError, match="seqlen must be an int ≥ 0"):
        ro.pad(packed, idx, 2, -1)
    with pytest.raises(ValueError, match="batch must be an int ≥ 0"):
        ro.pad(packed, idx, 2.0, 5)
    block = CausalSelfAttention(32, 2)
    with pytest.raises(ValueError, match="needs both cu_seqlens and max_seqlen"):
        block(torch.randn(4, 32), cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"packed x \(with cu_seqlens\) must have shape \[N, d_model = 32\]"):
        block(torch.randn(2, 4, 32), cu_seqlens=cu, max_seqlen=4)
    with pytest.raises(ValueError, match="either attention_mask"):
        block(torch.randn(4, 32), torch.ones(1, 4), cu_seqlens=cu, max_seqlen=4)
