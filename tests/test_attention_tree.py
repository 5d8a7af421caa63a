"""rlhf_ops.attention_tree (shared-prefix attention) on every backend that implements it.

Oracle: float64 ``attention_varlen`` (reference backend) on the expanded sequences: for every
segment s, the queries of s against the keys "ancestors ‖ s" (root first), bottom-right causal.
Each token's output is its own segment's (an ancestor's tokens see only their own ancestors, so
the copies of a prompt's outputs in its children's sequences are the same numbers), and the
gradient of a token's k/v is summed over every sequence that holds it (the gather's backward).
Every buffer the Triton launchers allocate is poisoned with NaN first. Shapes stay tiny: each
Triton program runs in Python under the interpreter.
"""
import importlib

import pytest
import torch

import rlhf_ops as ro
from rlhf_ops import _backend, reference
from _util import assert_matches, poison_, saved_tensors
from conftest import ON_GPU, backend_problem


@pytest.fixture(autouse=True)
def _poison_triton_buffers(monkeypatch):
    if backend_problem("triton") is None:
        kattn = importlib.import_module("rlhf_ops.kernels.attention")
        alloc = kattn._empty
        monkeypatch.setattr(kattn, "_empty", lambda *a, **kw: poison_(alloc(*a, **kw)))


@pytest.fixture(params=["reference", "triton"])
def tree_backend(request):
    """The backends that implement attention_tree (cuda refuses it: test_cuda_refuses)."""
    why = backend_problem(request.param)
    if why:
        pytest.skip(why)
    return request.param


def _cu(lens, device):
    return torch.tensor([0] + torch.tensor(lens, dtype=torch.long).cumsum(0).tolist(), dtype=torch.int32,
                        device=device)


def _chains(parent):
    """Ancestors of every segment, root first."""
    out = []
    for p in parent:
        out.append((out[p] + [p]) if p >= 0 else [])
    return out


def _max_seqlen(lens, parent):
    return max((sum(lens[a] for a in c) + lens[s] for s, c in enumerate(_chains(parent))), default=0)


def _tree(lens, parent, Hq, Hkv, D, dtype, device, mag=1.0):
    """q, k, v [N, H, D] and (cu_seqlens, parent, max_seqlen)."""
    N = sum(lens)
    q = torch.randn(N, Hq, D, dtype=dtype, device=device) * mag
    k = torch.randn(N, Hkv, D, dtype=dtype, device=device) * mag
    v = torch.randn(N, Hkv, D, dtype=dtype, device=device)
    meta = (_cu(lens, device), torch.tensor(parent, dtype=torch.int32, device=device), _max_seqlen(lens, parent))
    return q, k, v, meta


def _run(q, k, v, g, meta, backend, **kw):
    """Output and (dq, dk, dv) of attention_tree for upstream gradient g."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = ro.attention_tree(q, k, v, *meta, backend=backend, **kw)
    return out, torch.autograd.grad(out, (q, k, v), g.to(out.dtype))


def _expanded_oracle(q, k, v, g, meta, scale=None, softcap=0.0):
    """float64 attention_varlen (reference) of each segment's queries against "ancestors ‖ s"."""
    cu, parent = meta[0].tolist(), meta[1].tolist()
    q, k, v = (t.detach().double().clone().requires_grad_() for t in (q, k, v))
    keys = [sum((list(range(cu[a], cu[a + 1])) for a in chain), []) + list(range(cu[s], cu[s + 1]))
            for s, chain in enumerate(_chains(parent))]
    idx = torch.tensor(sum(keys, []), dtype=torch.long, device=q.device)
    lq = [cu[s + 1] - cu[s] for s in range(len(parent))]
    lk = [len(x) for x in keys]
    out = ro.attention_varlen(q, k[idx], v[idx], _cu(lq, q.device), _cu(lk, q.device), max(lq, default=0),
                              max(lk, default=0), causal=True, scale=scale, softcap=softcap,
                              backend="reference")
    grads = torch.autograd.grad(out, (q, k, v), g.double(), allow_unused=True)
    return out, tuple(torch.zeros_like(t) if d is None else d for d, t in zip(grads, (q, k, v)))


def _check(q, k, v, meta, backend, *, eager_bar=False, tol=None, **kw):
    g = torch.randn(q.shape, dtype=torch.float64, device=q.device)
    out, grads = _run(q, k, v, g, meta, backend, **kw)
    ref, ref_grads = _expanded_oracle(q, k, v, g, meta, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    eager, eager_grads = _run(q, k, v, g, meta, "reference", **kw) if eager_bar else (None, (None,) * 3)
    assert_matches(out, ref, eager, tol=tol, what="out")
    for name, gr, r, e, t in zip(("dq", "dk", "dv"), grads, ref_grads, eager_grads, (q, k, v)):
        assert gr.shape == t.shape and gr.dtype == t.dtype, name
        assert_matches(gr, r, e, tol=tol, what=name)
    return out, grads


def _group(P, completions):
    """A GRPO group: the prompt (root) and its completions (children)."""
    return [P] + list(completions), [-1] + [0] * len(completions)


# (segment lengths, parents), every forest in depth-first pre-order
TREES = {
    "depth1": ([5, 17, 0, 9], [-1, -1, -1, -1]),                     # plain varlen: every segment a root
    "G1": _group(13, [9]),
    "G3": _group(17, [9, 1, 20]),       # 17 ≡ 1 (mod the interpreter's 16): one prompt key in its last block
    "G8": _group(11, [3, 9, 0, 17, 1, 5, 8, 2]),
    "G16": _group(7, [2, 5, 1, 3, 0, 4, 6, 1, 2, 3, 1, 5, 2, 1, 3, 2]),
    # multi-turn: prompt → answer → user turn → two answers; a second first answer with a follow-up
    "chain": ([11, 6, 5, 7, 4, 3, 5], [-1, 0, 1, 2, 2, 0, 5]),
    # several trees: a group, an empty prompt with children, a chain, a lone root
    "forest": ([9, 4, 6, 0, 5, 3, 7, 5, 2, 4], [-1, 0, 0, -1, 3, 3, -1, 6, 7, -1]),
    # empty segments: children, and an empty child whose own children see the root
    "empty": ([12, 0, 5, 0, 0, 3, 6, 0, 4, 3], [-1, 0, 0, 0, 0, 0, 0, 6, 7, 7]),
}


@pytest.mark.parametrize("name", list(TREES))
def test_matches_varlen_on_expanded_sequences(tree_backend, device, name):
    q, k, v, meta = _tree(*TREES[name], 2, 1, 16, torch.float64, device)
    _check(q, k, v, meta, tree_backend)


@pytest.mark.parametrize("heads", [(4, 2), (2, 2), (3, 1)], ids=["gqa", "mha", "mqa"])
def test_heads(tree_backend, device, heads):
    q, k, v, meta = _tree(*TREES["chain"], *heads, 16, torch.float64, device)
    _check(q, k, v, meta, tree_backend)


@pytest.mark.parametrize("D", [16, 48, 64, 128])
def test_head_dims(tree_backend, device, D):
    q, k, v, meta = _tree([6, 3, 0, 5], [-1, 0, 1, 0], 2, 1, D, torch.float64, device)
    _check(q, k, v, meta, tree_backend)


def test_softcap_and_scale(tree_backend, device):
    q, k, v, meta = _tree(*TREES["chain"], 2, 1, 16, torch.float64, device, mag=3.0)
    _check(q, k, v, meta, tree_backend, softcap=1.5, scale=0.3)
    # softcap changes the result (it is not ignored)
    a = ro.attention_tree(q, k, v, *meta, backend=tree_backend)
    b = ro.attention_tree(q, k, v, *meta, softcap=1.5, backend=tree_backend)
    assert (a - b).abs().max() > 1e-3


def test_depth1_is_attention_varlen(tree_backend, device):
    """Roots only: exactly causal attention_varlen on the same backend's kernels family."""
    lens, parent = TREES["depth1"]
    q, k, v, meta = _tree(lens, parent, 2, 1, 16, torch.float64, device)
    cu = meta[0]
    a = ro.attention_tree(q, k, v, *meta, backend=tree_backend)
    b = ro.attention_varlen(q, k, v, cu, cu, max(lens), max(lens), backend=tree_backend)
    assert_matches(a, b, what="roots only")


def test_prompt_computed_once_equals_separate_sequences(device):
    """A GRPO group: each completion's outputs equal attention over its own "prompt ‖ completion"
    sequence, and the prompt's outputs equal attention over the prompt alone."""
    lens, parent = _group(9, [4, 7, 5])
    q, k, v, meta = _tree(lens, parent, 2, 1, 16, torch.float64, device)
    out = ro.attention_tree(q, k, v, *meta, backend="reference")
    cu = meta[0].tolist()
    for s in range(1, 4):
        rows = list(range(cu[0], cu[1])) + list(range(cu[s], cu[s + 1]))
        full = reference.attention(*(t[rows].transpose(0, 1)[None] for t in (q, k, v)))[0].transpose(0, 1)
        assert_matches(out[cu[s]:cu[s + 1]], full[lens[0]:], what=f"completion {s}")
        assert_matches(out[:cu[1]], full[:lens[0]], what=f"prompt (in sequence {s})")


def test_infinite_key_with_softcap(tree_backend, device):
    """A prompt key holding −inf, softcapped: its scores are −c (finite, derivative 0) for every
    query that sees it. The NaN pattern of the gradients (dq = 0·(−inf) where eager has it) and
    the finite values match the reference: the padded rows of a tile (q = 0, so 0·∞ = NaN) must
    not reach the prompt's dk/dv through the descendants' query range."""
    q, k, v, meta = _tree([5, 3, 4, 0, 2], [-1, 0, 0, 2, 2], 2, 1, 16, torch.float64, device)
    k[2, :, 5] = -float("inf")
    grads = []
    g = torch.randn(q.shape, dtype=torch.float64, device=device)
    for be in (tree_backend, "reference"):
        grads.append(_run(q, k, v, g, meta, be, softcap=5.0))
    for name, a, b in zip(("out", "dq", "dk", "dv"), (grads[0][0],) + grads[0][1], (grads[1][0],) + grads[1][1]):
        assert torch.equal(a.isnan(), b.isnan()), name
        assert_matches(torch.nan_to_num(a), torch.nan_to_num(b), what=name)
    assert torch.isfinite(grads[0][1][2]).all() and torch.isfinite(grads[0][0]).all()


# ----------------------------------------------------------- low precision, determinism ---

def test_fp16_no_worse_than_eager(tree_backend, device):
    q, k, v, meta = _tree(*TREES["G3"], 2, 1, 64, torch.float16, device)
    _check(q, k, v, meta, tree_backend, eager_bar=True, softcap=20.0)


def test_fp32(tree_backend, device):
    q, k, v, meta = _tree(*TREES["chain"], 2, 1, 32, torch.float32, device)
    _check(q, k, v, meta, tree_backend, tol=1e-5)


def test_bf16(tree_backend, device):
    refusal = _backend.unsupported("attention_tree", tree_backend, device, exact=True, dtype=torch.bfloat16)
    if refusal is not None:       # the interpreter's bf16 tl.dot: the capability table says so
        assert tree_backend == "triton" and not ON_GPU and "interpreter" in refusal.reason
        pytest.skip(refusal.reason)
    q, k, v, meta = _tree(*TREES["G3"], 2, 1, 64, torch.bfloat16, device)
    _check(q, k, v, meta, tree_backend, eager_bar=True)


def test_backward_is_deterministic(device):
    if backend_problem("triton"):
        pytest.skip(backend_problem("triton"))
    q, k, v, meta = _tree(*TREES["chain"], 2, 1, 16, torch.float32, device)
    g = torch.randn(q.shape, dtype=torch.float64, device=device)
    _, a = _run(q, k, v, g, meta, "triton", softcap=5.0)
    _, b = _run(q, k, v, g, meta, "triton", softcap=5.0)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_gradcheck(tree_backend, device):
    q, k, v, meta = _tree([3, 2, 0, 2], [-1, 0, 1, 0], 2, 1, 16, torch.float64, device)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    fn = lambda q, k, v: ro.attention_tree(q, k, v, *meta, scale=0.7, softcap=0.9, backend=tree_backend)
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


# ------------------------------------------------------------------ shapes and layouts ---

def test_empty_and_degenerate(tree_backend, device):
    for lens, parent in (([], []), ([0], [-1]), ([0, 0, 0], [-1, 0, 1])):
        q, k, v, meta = _tree(lens, parent, 2, 1, 16, torch.float64, device)
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        out = ro.attention_tree(q, k, v, *meta, backend=tree_backend)
        assert out.shape == q.shape
        out.backward(torch.randn_like(out))
        assert all(t.grad is not None and t.grad.shape == t.shape for t in (q, k, v))
    # a single token
    q, k, v, meta = _tree([1], [-1], 2, 1, 16, torch.float64, device)
    _check(q, k, v, meta, tree_backend)


def test_max_seqlen_may_exceed_the_longest(tree_backend, device):
    q, k, v, meta = _tree(*TREES["G3"], 2, 2, 16, torch.float64, device)
    a = ro.attention_tree(q, k, v, *meta, backend=tree_backend)
    b = ro.attention_tree(q, k, v, meta[0], meta[1], meta[2] + 40, backend=tree_backend)
    assert_matches(b, a, what="max_seqlen larger than needed")


def test_noncontiguous_inputs(tree_backend, device):
    """The [N, H, D] views a packed QKV projection produces (row stride ≠ H·D)."""
    lens, parent = TREES["G3"]
    N, Hq, Hkv, D = sum(lens), 2, 1, 16
    qkv = torch.randn(N, (Hq + 2 * Hkv) * D, dtype=torch.float64, device=device)
    q, k, v = (t.view(N, -1, D) for t in qkv.split([Hq * D, Hkv * D, Hkv * D], -1))
    assert not q.is_contiguous()
    _check(q, k, v, (_cu(lens, device), torch.tensor(parent, dtype=torch.int32, device=device),
                     _max_seqlen(lens, parent)), tree_backend)


def test_compiles_fullgraph(tree_backend, device):
    q, k, v, meta = _tree(*TREES["chain"], 2, 1, 16, torch.float64, device)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    w = torch.randn(q.shape, dtype=torch.float64, device=device)

    def step(q, k, v):
        return (ro.attention_tree(q, k, v, *meta, softcap=2.0, backend=tree_backend) * w).sum()

    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v)
    loss.backward()
    g = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    eager = step(q, k, v)
    eager.backward()
    assert_matches(loss, eager, what="compiled loss")
    for name, a, t in zip("qkv", g, (q, k, v)):
        assert_matches(a, t.grad, what=f"compiled d{name}")


# ------------------------------------------------------- the block shapes a GPU may select ---

def _gpu_launch_configs():
    """Launch i runs row i (cycled) of each kernel's config table (as tests/test_attention.py)."""
    if backend_problem("triton"):
        return []
    tables = importlib.import_module("rlhf_ops.kernels.attention").TABLES
    n = max(len(t) for t in tables.values())
    return [{name: tuple(t[i % len(t)][:2]) for name, t in tables.items()} | {"delta": 64} for i in range(n)]


@pytest.mark.parametrize("cfg", _gpu_launch_configs(), ids=lambda c: "-".join(
    f"{k}{v[0]}x{v[1]}" for k, v in c.items() if k != "delta"))
def test_gpu_block_shapes_under_interpreter(device, monkeypatch, cfg):
    """The GPU's block shapes and dK/dV orientation on a depth-2 tree whose lengths cross every
    block edge: the root has whole key blocks and a tail in every kernel; its descendants' range
    has whole query blocks of dK/dV and a tail; a grandchild walks two ancestors."""
    if ON_GPU:
        pytest.skip("on a GPU the autotuner runs these configs")
    ka = importlib.import_module("rlhf_ops.kernels.attention")
    monkeypatch.setattr(ka, "launch_config", cfg)
    monkeypatch.setattr(ka, "FWD_ORIENT", False)
    bn = max(cfg["fwd"][1], cfg["dq"][1], cfg["dkdv"][1])
    bm_k, bm_q = cfg["dkdv"][0], cfg["dq"][0]
    lens, parent = [bn + 1, bm_k + 1, bm_q - 1, 0, 3], [-1, 0, 1, 0, 0]
    q, k, v, meta = _tree(lens, parent, 2, 1, 32, torch.float64, device)
    _check(q, k, v, meta, "triton", softcap=1.5)


# --------------------------------------------------------------------- memory, FLOPs ---

@pytest.mark.parametrize("be", ["triton", "reference"])
def test_meta_saved_bytes(be):
    """Triton saves q, k, v, out, two fp32 numbers per (token, head), cu_seqlens and parent: O(N·Hq),
    nothing per key sequence. (The reference keeps its gathered [n, H, max_seqlen, ·] blocks.)"""
    Hq, Hkv, D = 8, 2, 64

    def saved(P, R, G):
        N = P + G * R
        q = torch.empty(N, Hq, D, dtype=torch.bfloat16, device="meta", requires_grad=True)
        k = torch.empty(N, Hkv, D, dtype=torch.bfloat16, device="meta", requires_grad=True)
        v = torch.empty(N, Hkv, D, dtype=torch.bfloat16, device="meta", requires_grad=True)
        cu = torch.empty(G + 2, dtype=torch.int32, device="meta")
        parent = torch.empty(G + 1, dtype=torch.int32, device="meta")
        out = []
        tensors = saved_tensors(lambda: out.append(ro.attention_tree(q, k, v, cu, parent, P + R, backend=be)))
        assert out[0].shape == q.shape and out[0].device.type == "meta"
        return sum(t.numel() * t.element_size() for t in tensors if t.is_floating_point()), N

    got, N = saved(1024, 256, 8)
    if be == "triton":
        assert got == N * (Hq + 2 * Hkv) * D * 2 + N * Hq * D * 2 + 2 * 4 * N * Hq, got
        assert saved(2048, 512, 8)[0] == 2 * got, "saved bytes grow linearly in N"
    else:
        assert got > N * (Hq + 2 * Hkv) * D * 2


def test_meta_backward_and_lse_shape():
    q = torch.empty(300, 8, 64, dtype=torch.float16, device="meta", requires_grad=True)
    k = torch.empty(300, 2, 64, dtype=torch.float16, device="meta", requires_grad=True)
    cu = torch.empty(5, dtype=torch.int32, device="meta")
    parent = torch.empty(4, dtype=torch.int32, device="meta")
    out = ro.attention_tree(q, k, k, cu, parent, 200, backend="triton")
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape
    _, lse = torch.ops.rlhf_ops.attention_tree_fwd(q, k, k, cu, parent, 200, 0.125, 0.0, "triton")
    assert lse.shape == (2, 8, 300) and lse.dtype == torch.float32


def test_bench_shape_flops_and_bytes():
    """The bench shape (P = 4,096, R = 1,024, G = 8, H = 32, D = 128, bf16): attention FLOPs and
    bytes kept for backward of one layer, tree vs the expanded varlen batch, on the meta device."""
    import os
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:          # bench/ lives beside tests/, not installed
        sys.path.insert(0, root)
    from bench.bench_attention_tree import costs, main

    c = costs(P=4096, R=1024, G=8, H=32, D=128)
    # causal pairs: prompt P(P+1)/2, each completion R·P + R(R+1)/2; 4·D flops per pair forward
    tree_pairs = 4096 * 4097 // 2 + 8 * (1024 * 4096 + 1024 * 1025 // 2)
    flat_pairs = 8 * (5120 * 5121 // 2)
    assert c["tree"]["fwd_flops"] == 4 * 128 * 32 * tree_pairs
    assert c["varlen"]["fwd_flops"] == 4 * 128 * 32 * flat_pairs
    assert c["tree"]["tokens"] == 4096 + 8 * 1024 and c["varlen"]["tokens"] == 8 * 5120
    # bytes kept for backward scale with the tokens: 3.2× fewer here (40,960 / 12,288 tokens)
    ratio = c["varlen"]["saved_bytes"] / c["tree"]["saved_bytes"]
    assert abs(ratio - 40960 / 12288) < 1e-9, ratio
    assert c["varlen"]["fwd_flops"] / c["tree"]["fwd_flops"] > 1.5
    # the bench script's CPU smoke run: every implementation runs (reference backend, tiny shapes)
    import importlib.util
    rows, _ = main(["--size", "smoke"])
    expect = {("attention_tree", "tree_reference"), ("attention_tree", "expanded_reference")}
    if importlib.util.find_spec("transformers"):      # the GRPO step runs a transformers Llama
        expect |= {("grpo_step", "shared"), ("grpo_step", "unshared")}
    assert {(r["op"], r["impl"]) for r in rows if r["status"] == "ok"} == expect, rows


# ------------------------------------------------------------------------------ bad inputs ---

def test_bad_inputs_raise(device):
    lens, parent = [5, 3, 2, 4], [-1, 0, 1, 0]
    q, k, v, (cu, par, m) = _tree(lens, parent, 4, 2, 16, torch.float32, device)
    i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=device)
    call = lambda **kw: ro.attention_tree(**{**dict(q=q, k=k, v=v, cu_seqlens=cu, parent=par, max_seqlen=m), **kw})
    cases = [
        (dict(q=q[None]), ValueError, r"q must be 3-D"),
        (dict(k=k.double(), v=v.double()), TypeError, "k has dtype"),
        (dict(k=k[:10], v=v[:10]), ValueError, r"q, k and v must hold the same N packed tokens"),
        (dict(k=k[..., :8], v=v[..., :8]), ValueError, "head dim"),
        (dict(cu_seqlens=cu.long()), TypeError, "cu_seqlens must have dtype int32"),
        (dict(parent=par.long()), TypeError, "parent must have dtype int32"),
        (dict(parent=[-1, 0, 1, 0]), TypeError, "parent must be a torch.Tensor"),
        (dict(cu_seqlens=cu[None]), ValueError, r"cu_seqlens must be 1-D"),
        (dict(parent=par[:3]), ValueError, r"cu_seqlens must have one entry more than parent"),
        (dict(max_seqlen=4.0), TypeError, "max_seqlen must be a Python int"),
        (dict(max_seqlen=-1), ValueError, "max_seqlen must be ≥ 0"),
        (dict(max_seqlen=m - 1), ValueError, rf"max_seqlen = {m - 1} is smaller than the longest "
                                             r"\"ancestors ‖ segment\" length \(10, segment 2\)"),
        # the tree: parent[s] ≥ s, not in pre-order, cu_seqlens not covering the tokens
        (dict(parent=i32([-1, 0, 2, 0])), ValueError, r"parent\[2\] = 2: a segment's parent must be an "
                                                     r"earlier segment"),
        (dict(parent=i32([-1, 3, 1, 0])), ValueError, r"parent\[1\] = 3"),
        (dict(parent=i32([-1, 0, -2, 0])), ValueError, r"parent\[2\] = -2"),
        (dict(parent=i32([-1, 0, 0, 1])), ValueError, r"not in depth-first pre-order: segment 3's parent 1 "
                                                     r"is neither segment 2 nor one of its ancestors"),
        (dict(cu_seqlens=i32([0, 5, 8, 10, 13])), ValueError, r"last entry of cu_seqlens \(13\) must equal "
                                                             r"the number of packed tokens q.shape\[0\] = 14"),
        (dict(cu_seqlens=i32([1, 5, 8, 10, 14])), ValueError, "cu_seqlens must start at 0"),
        (dict(cu_seqlens=i32([0, 5, 3, 10, 14])), ValueError, r"cu_seqlens must be non-decreasing, but entry 2"),
        (dict(softcap=-1.0), ValueError, "softcap must be a finite number ≥ 0"),
        (dict(scale=float("nan")), ValueError, "scale must be None or a finite number"),
        (dict(backend="nope"), ValueError, "backend"),
    ]
    for kw, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            call(**kw)
    # a subtree that is fine: a grandchild after its parent, then a new child of the root
    call(parent=i32([-1, 0, 1, 0]))


def test_cuda_refuses_and_triton_limits():
    """The capability table: the cuda backend has no tree kernels (an error naming the op), and
    triton's head-dim limit; meta tensors need no kernel."""
    q = torch.empty(10, 2, 64, dtype=torch.float16, device="meta")
    cu = torch.empty(3, dtype=torch.int32, device="meta")
    parent = torch.empty(2, dtype=torch.int32, device="meta")
    with pytest.raises(ValueError, match=r"rlhf_ops.attention_tree: the cuda backend does not support "
                                         r"attention_tree .* use backend='triton' or 'reference'"):
        ro.attention_tree(q, q, q, cu, parent, 5, backend="cuda")
    q24 = torch.empty(10, 2, 24, dtype=torch.float16, device="meta")
    with pytest.raises(ValueError, match="multiples of 16 from 16 to 256, got 24"):
        ro.attention_tree(q24, q24, q24, cu, parent, 5, backend="triton")
    assert _backend.unsupported("attention_tree", "cuda", "meta") is not None
    assert _backend.AUTO_PREFERENCE["attention_tree"][0] == "triton"
    if _backend.triton_interpret():
        r = _backend.unsupported("attention_tree", "triton", "cpu", exact=True, dtype=torch.bfloat16)
        assert r is not None and r.error is TypeError and "bfloat16" in r.reason
        assert _backend.unsupported("attention_tree", "triton", "cpu", dtype=torch.bfloat16) is None
