"""The batch-invariant mode (rlhf_ops.batch_invariant): its state, the aten kernels it routes
torch's ops through, whole models under it, and the log-prob parity report.

What is checked is what docs/batch_invariant.md claims:
  * state: off by default; on inside a block and with RLHF_OPS_BATCH_INVARIANT=1; per thread;
    restored after an exception; aten routing on only while a block with aten=True is open;
  * aten kernels (mm, addmm, bmm — so matmul and linear —, softmax, log_softmax, sum and mean
    over dims, forward and backward) against torch in fp64/fp32 (fp16/bf16 by the eager rule);
  * invariance: a row's result (an output row of a matmul, a softmax row, a reduced element) has
    the same bits alone, in batches of other sizes and at other positions;
  * determinism: the same call twice gives the same bits, outputs and gradients (weight gradients
    included);
  * whole models on the Triton backend: rlhf_ops.train.model's GPT and a tiny Llama patched with
    apply_rlhf_ops give a sequence the same logits alone or in a batch;
  * outside the mode nothing changes: torch's own kernels run (no call reaches ours) and give the
    bits they gave before.
"""
import sys
import threading

import pytest
import torch
import torch.nn.functional as F

import rlhf_ops as ro
from rlhf_ops import _backend
from rlhf_ops.batch_invariant import ENV, ParityReport, aten_routed, plot_parity
from rlhf_ops.kernels import batch_invariant as K
from _util import assert_matches
from conftest import DEVICE

pytestmark = pytest.mark.skipif(
    _backend.unavailable("triton", torch.device(DEVICE)) is not None,
    reason="the aten kernels are Triton kernels: they need a GPU or TRITON_INTERPRET=1")


@pytest.fixture
def calls(monkeypatch):
    """Count the calls that reach each batch-invariant kernel launcher."""
    seen = {n: 0 for n in ("matmul", "softmax", "softmax_backward", "sum_rows")}
    for name in seen:
        fn = getattr(K, name)

        def counted(*a, _fn=fn, _name=name, **k):
            seen[_name] += 1
            return _fn(*a, **k)

        monkeypatch.setattr(K, name, counted)
    return seen


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN payloads and signed zeros included)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
    return torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))


# ======================================================================= mode and state ===

def test_state_default_block_nesting_and_exception(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert not ro.is_batch_invariant() and not aten_routed()
    with ro.batch_invariant():
        assert ro.is_batch_invariant() and not aten_routed()
        with ro.batch_invariant(aten=True):
            assert ro.is_batch_invariant() and aten_routed()
            with ro.batch_invariant():            # an inner block keeps aten routing on
                assert aten_routed()
            assert aten_routed()
        assert ro.is_batch_invariant() and not aten_routed()
    assert not ro.is_batch_invariant()
    with pytest.raises(KeyError):
        with ro.batch_invariant(aten=True):
            raise KeyError("boom")
    assert not ro.is_batch_invariant() and not aten_routed()

    @ro.batch_invariant()
    def inside():
        return ro.is_batch_invariant()
    assert inside() and not ro.is_batch_invariant()


def test_state_is_per_thread(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    seen = {}
    with ro.batch_invariant(aten=True):
        t = threading.Thread(target=lambda: seen.update(mode=ro.is_batch_invariant(), aten=aten_routed()))
        t.start()
        t.join()
    # the op-level mode is this thread's; torch's dispatcher table (aten) is the process's
    assert seen == {"mode": False, "aten": True}


def test_env_var(monkeypatch):
    monkeypatch.setenv(ENV, "1")
    assert ro.is_batch_invariant()
    monkeypatch.setenv(ENV, "0")
    assert not ro.is_batch_invariant()
    monkeypatch.setenv(ENV, "yes")
    with pytest.raises(ValueError, match=ENV):
        ro.is_batch_invariant()


def test_bad_arguments_and_unavailable(monkeypatch):
    with pytest.raises(TypeError, match="aten must be a bool"):
        with ro.batch_invariant(aten=1):
            pass
    monkeypatch.setattr(_backend, "triton_interpret", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="aten=True.*cannot run here"):
        with ro.batch_invariant(aten=True):
            pass
    assert not ro.is_batch_invariant() and not aten_routed()


def test_outside_the_mode_nothing_changes(calls):
    a = torch.randn(37, 24, device=DEVICE)
    w = torch.randn(16, 24, device=DEVICE)
    fns = [lambda: a @ w.T, lambda: F.linear(a, w, w[:, 0]), lambda: torch.log_softmax(a, -1),
           lambda: torch.softmax(a, 0), lambda: a.sum(-1), lambda: a.mean(0)]
    before = [f() for f in fns]
    with ro.batch_invariant(aten=True):
        inside = [f() for f in fns]
    assert calls == {"matmul": 2, "softmax": 2, "softmax_backward": 0, "sum_rows": 2}
    calls.update({k: 0 for k in calls})
    after = [f() for f in fns]
    assert sum(calls.values()) == 0
    assert all(bits_equal(x, y) for x, y in zip(before, after))
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(before, inside))


# =================================================================== aten kernels: values ===

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matmuls_match_torch(dtype):
    g = dict(dtype=dtype, device=DEVICE)
    a, b = torch.randn(37, 21, **g), torch.randn(21, 19, **g)
    bias_row, bias_col = torch.randn(19, **g), torch.randn(37, 1, **g)
    A3, B3, bias3 = torch.randn(3, 9, 21, **g), torch.randn(3, 21, 5, **g), torch.randn(1, 1, 5, **g)
    x3, W = torch.randn(2, 7, 21, **g), torch.randn(11, 21, **g)
    cases = {
        "mm": lambda: a @ b,
        "mm transposed operands": lambda: b.T @ a.T,
        "addmm row bias, alpha, beta": lambda: torch.addmm(bias_row, a, b, beta=0.5, alpha=-2.0),
        "addmm column bias": lambda: torch.addmm(bias_col, a, b),
        "addmm beta=0 ignores NaN": lambda: torch.addmm(torch.full_like(bias_row, float("nan")), a, b, beta=0),
        "bmm": lambda: torch.bmm(A3, B3),
        "baddbmm": lambda: torch.baddbmm(bias3.expand(3, 9, 5), A3, B3, beta=2.0, alpha=0.5),
        "mv (matmul with a vector)": lambda: a @ b[:, 0],
        "matmul 3D@2D": lambda: x3 @ W.T,
        "linear": lambda: F.linear(x3, W, W[:, 0]),
        "empty K": lambda: a[:, :0] @ b[:0],
        "empty M": lambda: a[:0] @ b,
    }
    ref = {k: f() for k, f in cases.items()}
    with ro.batch_invariant(aten=True):
        got = {k: f() for k, f in cases.items()}
    for k in cases:
        assert got[k].shape == ref[k].shape and got[k].dtype == ref[k].dtype, k
        assert_matches(got[k], ref[k], dtype=dtype, what=k)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_matmul_low_precision_eager_rule(dtype):
    a, w = torch.randn(45, 40, device=DEVICE), torch.randn(24, 40, device=DEVICE)
    bias = torch.randn(24, device=DEVICE)
    ref64 = F.linear(a.double(), w.double(), bias.double())
    eager = F.linear(a.to(dtype), w.to(dtype), bias.to(dtype))
    with ro.batch_invariant(aten=True):
        ours = F.linear(a.to(dtype), w.to(dtype), bias.to(dtype))
    assert ours.dtype == dtype
    assert_matches(ours, ref64, eager, what=f"linear {dtype}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_matmul_dot_path(monkeypatch, dtype):
    """The tl.dot form a GPU runs, exercised under the interpreter too (bf16 dots are wrong there)."""
    monkeypatch.setattr(K, "INTERPRET_DOT", True)
    a, b = torch.randn(2, 37, 40, device=DEVICE), torch.randn(2, 40, 19, device=DEVICE)
    bias = torch.randn(19, device=DEVICE)
    ref64 = 0.5 * torch.bmm(a.double(), b.double()) + 2.0 * bias.double()
    ours = K.matmul(a.to(dtype), b.to(dtype), bias.to(dtype), alpha=0.5, beta=2.0)
    eager = None if dtype != torch.float16 else (0.5 * torch.bmm(a.to(dtype), b.to(dtype)) + 2.0 * bias.to(dtype))
    assert_matches(ours, ref64, eager, dtype=dtype, what="dot path")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_softmax_and_reductions_match_torch(dtype):
    x = torch.randn(3, 4, 40, dtype=dtype, device=DEVICE)
    x[0, 1, :7] = float("-inf")
    x[1, 2] = float("-inf")                                       # a row with no finite value
    long = torch.randn(2, 2 * K.SUM_CHUNK + 123, dtype=dtype, device=DEVICE)   # two-stage sums
    fns = {
        "log_softmax -1": lambda t: F.log_softmax(t, -1),
        "softmax -1": lambda t: F.softmax(t, -1),
        "softmax dim 1": lambda t: F.softmax(t, 1),
        "log_softmax dim 0": lambda t: F.log_softmax(t, 0),
        "sum -1": lambda t: t.nan_to_num(neginf=-5.0).sum(-1),
        "sum (0, 2) keepdim": lambda t: t.nan_to_num(neginf=-5.0).sum((0, 2), keepdim=True),
        "mean 1": lambda t: t.nan_to_num(neginf=-5.0).mean(1),
        "mean all": lambda t: t.nan_to_num(neginf=-5.0).mean(),
    }
    for name, fn in fns.items():
        outs = []
        for mode in (False, True):
            t = x.clone().requires_grad_()
            with ro.batch_invariant(aten=mode):
                y = fn(t)
                gen = torch.Generator().manual_seed(1)
                y.backward(torch.randn(y.shape, generator=gen, dtype=dtype).to(DEVICE))
            outs.append((y.detach(), t.grad))
        (y0, g0), (y1, g1) = outs
        assert y1.shape == y0.shape and y1.dtype == y0.dtype, name
        assert_matches(y1, y0, dtype=dtype, what=name)
        assert_matches(g1, g0, dtype=dtype, what=name + " grad")
    with ro.batch_invariant(aten=True):
        got = (long.sum(-1), long.mean(-1), torch.arange(12, device=DEVICE).view(3, 4).sum(0),
               torch.ones(3, 5, dtype=torch.bool, device=DEVICE).sum(-1), x[:, :, :0].mean(-1),
               torch.arange(6, device=DEVICE).view(2, 3).sum(-1, dtype=dtype),
               F.log_softmax(x[0, 0].half(), -1, dtype=torch.float32))
    assert_matches(got[0], long.sum(-1), dtype=dtype, what="long sum")
    assert_matches(got[1], long.mean(-1), dtype=dtype, what="long mean")
    assert torch.equal(got[2], torch.arange(12, device=DEVICE).view(3, 4).sum(0))     # integer sums
    assert torch.equal(got[3], torch.full((3,), 5, device=DEVICE))
    assert got[4].isnan().all() and got[4].shape == (3, 4)                             # mean of nothing
    assert got[5].dtype == dtype and got[5].tolist() == [3.0, 12.0]
    assert got[6].dtype == torch.float32
    assert_matches(got[6], F.log_softmax(x[0, 0].half().float(), -1), tol=1e-6, what="half → float")


def test_unsupported_dtype_raises():
    z = torch.randn(3, 3, dtype=torch.complex64, device=DEVICE)
    with ro.batch_invariant(aten=True):
        with pytest.raises(NotImplementedError, match="aten::mm on complex64"):
            z @ z
        with pytest.raises(RuntimeError, match="same dtype"):
            torch.randn(2, 3, device=DEVICE) @ torch.randn(3, 2, dtype=torch.float64, device=DEVICE)


# ============================================================ aten kernels: invariance ===

def _alone_and_in_batches(fn, rows: torch.Tensor, idx: int, sizes=(1, 7, 40)):
    """fn(batch) for batches that hold row ``idx`` of ``rows`` at several positions; returns the
    row's results (first: the row alone)."""
    out = [fn(rows[idx:idx + 1])[0]]
    for n in sizes:
        for pos in sorted({0, n // 2, n - 1}):
            others = torch.randn((n,) + rows.shape[1:], dtype=rows.dtype, device=rows.device)
            others[pos] = rows[idx]
            out.append(fn(others)[pos])
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_rows_are_batch_invariant(dtype):
    W = torch.randn(40, 24, device=DEVICE).to(dtype)      # N = 40: two column tiles
    bias = torch.randn(40, device=DEVICE).to(dtype)
    rows = torch.randn(3, 24, device=DEVICE).to(dtype)
    with ro.batch_invariant(aten=True):
        for fn in (lambda x: x @ W.T, lambda x: F.linear(x, W, bias),
                   lambda x: torch.bmm(x[None], W.T[None])[0]):
            res = _alone_and_in_batches(fn, rows, 1)
            assert all(bits_equal(r, res[0]) for r in res)


def test_softmax_and_sum_rows_are_batch_invariant():
    rows = torch.randn(3, 1100, device=DEVICE)   # interpreter: 3 blocks a row, sums in 2 stages
    with ro.batch_invariant(aten=True):
        for fn in (lambda x: F.log_softmax(x, -1), lambda x: F.softmax(x, -1), lambda x: x.sum(-1),
                   lambda x: x.mean(-1), lambda x: x.T.sum(0)):      # the last: a strided reduction
            res = _alone_and_in_batches(fn, rows, 2, sizes=(1, 6))
            assert all(bits_equal(r, res[0]) for r in res)


def test_same_call_twice_same_bits_outputs_and_grads():
    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 40).to(DEVICE)
    x = torch.randn(37, 48, device=DEVICE)

    def step():
        lin.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        y = F.log_softmax(lin(xi), -1)
        (y * torch.linspace(-1, 1, 40, device=DEVICE)).mean(-1).sum().backward()
        return [y, xi.grad, lin.weight.grad, lin.bias.grad]

    with ro.batch_invariant(aten=True):
        first, second = step(), step()
    assert all(bits_equal(p, q) for p, q in zip(first, second))


# ==================================================================== whole models ===

def _check_sequence_invariant(forward, seq: torch.Tensor, vocab: int):
    """forward(idx [B, T]) → [B, T, V]: row ``seq`` alone, and at several positions of batches
    of 2 and 3, must give bitwise the same output."""
    T = seq.shape[0]
    with ro.use_backend("triton"), ro.batch_invariant(aten=True), torch.no_grad():
        alone = forward(seq[None])[0]
        for B, pos in ((2, 1), (3, 0)):
            idx = torch.randint(0, vocab, (B, T), device=seq.device)
            idx[pos] = seq
            assert bits_equal(forward(idx)[pos], alone), (B, pos)
    return alone


def test_gpt_forward_is_batch_invariant():
    from rlhf_ops.train.model import GPT, GPTConfig
    cfg = GPTConfig(vocab_size=32, block_size=32, n_layer=2, n_head=2, d_model=32, backend="triton")
    model = GPT(cfg).to(DEVICE).eval()
    seq = torch.randint(0, 32, (16,), device=DEVICE)
    alone = _check_sequence_invariant(model, seq, 32)
    with torch.no_grad():
        ref = model(seq[None])[0]
    assert_matches(alone, ref, dtype=torch.float32, tol=1e-5, what="GPT logits vs outside the mode")


def test_llama_with_rlhf_ops_is_batch_invariant():
    tf = pytest.importorskip("transformers")
    from rlhf_ops.integrations.transformers import apply_rlhf_ops
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                         attn_implementation="eager", bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = apply_rlhf_ops(tf.LlamaForCausalLM(cfg).to(DEVICE).eval())
    seq = torch.randint(0, 64, (16,), device=DEVICE)
    alone = _check_sequence_invariant(lambda idx: model(input_ids=idx).logits, seq, 64)
    with torch.no_grad():
        ref = model(input_ids=seq[None]).logits[0]
    assert_matches(alone, ref, dtype=torch.float32, tol=1e-5, what="Llama logits vs outside the mode")


# ==================================================================== parity report ===

def _f32(*vals):
    return torch.tensor(vals, dtype=torch.float32)


def test_logprob_parity_fields_by_hand(tmp_path):
    inf = float("inf")
    a = torch.stack([_f32(-1.0, -2.0, -inf, -0.25), _f32(-0.5, -0.1, -3.0, -1.0)])
    b = a.clone()
    b[0, 1] = -1.99                                       # |d| > 1e-3
    b[1, 0] = torch.nextafter(a[1, 0], torch.tensor(0.0))  # one ulp apart
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])     # position 3: no unmasked token
    r = ro.logprob_parity(a, b, mask)
    assert isinstance(r, ParityReport)
    d01 = float(b[0, 1]) - float(a[0, 1])                 # the fp32 values' exact difference
    d10 = float(b[1, 0]) - float(a[1, 0])
    ds = [0.0, d01, 0.0, d10, 0.0]                        # 5 unmasked tokens; −inf = −inf exactly
    import math
    assert r.max_abs == pytest.approx(abs(d01), rel=1e-12)
    assert r.mean_abs == pytest.approx((abs(d01) + abs(d10)) / 5, rel=1e-12)
    assert r.frac_exact == pytest.approx(3 / 5)
    assert r.frac_above_1e3 == pytest.approx(1 / 5)
    assert r.k3 == pytest.approx(sum(math.expm1(-d) + d for d in ds) / 5, rel=1e-9)
    pp = r.per_position
    assert pp.shape == (4,) and pp.dtype == torch.float64
    assert pp[0].item() == pytest.approx(abs(d10) / 2) and pp[1].item() == pytest.approx(abs(d01) / 2)
    assert pp[2].item() == 0.0 and math.isnan(pp[3].item())

    same = ro.logprob_parity(a[0], a[0].clone())          # 1-D, no mask
    assert same.frac_exact == 1.0 and same.max_abs == 0.0 and same.k3 == 0.0 and same.per_position is None
    empty = ro.logprob_parity(a, b, torch.zeros_like(mask))
    assert all(math.isnan(v) for v in empty[:5])
    path = plot_parity({"mode off": r, "mode on": ro.logprob_parity(a, a.clone())}, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 0 and path.endswith("p.png")


def test_logprob_parity_bad_input():
    a = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="logprobs_b must have shape"):
        ro.logprob_parity(a, torch.zeros(3, 2))
    with pytest.raises(TypeError, match="logprobs_b has dtype"):
        ro.logprob_parity(a, torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\[N\] or \[B, T\]"):
        ro.logprob_parity(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match="mask must have shape"):
        ro.logprob_parity(a, a, torch.ones(3, dtype=torch.bool))
    with pytest.raises(TypeError, match="logprobs_a must have dtype"):
        ro.logprob_parity(torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64))


# ================================================================ GPU code, compiled here ===
# The kernels' GPU form (tl.dot, the configs of MM_CONFIGS, 4096-wide row blocks) is compiled for
# sm_80 and sm_90 with ptxas (no GPU needed) in a subprocess without TRITON_INTERPRET: every
# config must compile without register spills. Matmul layouts: A row-major with B = Wᵀ (a linear
# layer, "NT") or B row-major ("NN"); biases: none, one row (F.linear's), a full [M, N] tile.

def _gpu_compile_tasks():
    tasks = []
    for cc in (80, 90):
        for cfg, dt, prec in (("16bit", "bf16", "ieee"), ("tf32", "fp32", "tf32"), ("fp32", "fp32", "ieee"),
                              ("fp64", "fp64", "ieee")):
            for layout, bias in (("NT", "row"), ("NN", "none"), ("NT", "full")):
                tasks.append(dict(kind="mm", cc=cc, cfg=cfg, dt=dt, prec=prec, layout=layout, bias=bias))
        for dt in ("bf16", "fp32"):
            for kernel in ("softmax_fwd", "softmax_bwd"):
                for log in (True, False):
                    tasks.append(dict(kind=kernel, cc=cc, dt=dt, log=log))
            tasks.append(dict(kind="sum_rows", cc=cc, dt=dt))
    return tasks


def _gpu_compile_one(task):
    """Compile one task; registers and spills from ptxas's report."""
    import contextlib
    import io
    import os
    import re

    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from rlhf_ops.kernels import batch_invariant as KB

    if task["kind"] == "mm":
        fn = KB._mm_persistent
        bm, bn, bk, gm, warps, stages = KB.MM_CONFIGS[task["cfg"]]
        consts = dict(HAS_BIAS=task["bias"] != "none", BIAS_ROW=task["bias"] == "row", SCALED=True, DOT=True,
                      PREC=task["prec"], ACC_FP64=task["dt"] == "fp64", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                      GROUP_M=gm, s_ak=1, s_cn=1, s_xn=1, **({"s_bk": 1} if task["layout"] == "NT" else {"s_bn": 1}))
        ptrs = {"A": task["dt"], "B": task["dt"], "C": task["dt"], "X": task["dt"],
                "PRM": "fp64" if task["dt"] == "fp64" else "fp32"}
    else:
        fn = {"softmax_fwd": KB._softmax_fwd, "softmax_bwd": KB._softmax_bwd, "sum_rows": KB._sum_rows}[task["kind"]]
        warps, stages = KB._warps(4096), 1
        consts = dict(BLOCK=4096, ACC_FP64=False, **({"MEAN": True} if task["kind"] == "sum_rows" else {"LOG": task["log"]}))
        ptrs = {n: task["dt"] for n in ("X", "Y", "G", "Yf", "DX")}
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name in ptrs:
            sig[name] = "*" + ptrs[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "i32"
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                           target=GPUTarget("cuda", task["cc"], 32), options=dict(num_warps=warps, num_stages=stages))
    except Exception as e:  # noqa: BLE001 - reported as this task's failure
        return {**task, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    spill = re.search(r"(\d+) bytes spill stores", log.getvalue())
    regs = re.search(r"Used (\d+) registers", log.getvalue())
    return {**task, "spill": int(spill.group(1)) if spill else -1, "regs": int(regs.group(1)) if regs else -1}


def _gpu_compile_main():
    import json
    import sys
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(2) as ex:
        res = list(ex.map(_gpu_compile_one, _gpu_compile_tasks()))
    json.dump(res, open(sys.argv[2], "w"))


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU the kernels are compiled and run by the other tests")
def test_kernels_compile_for_gpu_without_spills(tmp_path):
    import json
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    out = tmp_path / "res.json"
    p = subprocess.run([sys.executable, __file__, "compile", str(out)], env=env, capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads(out.read_text())
    assert len(res) == len(_gpu_compile_tasks())
    bad = [r for r in res if "error" in r or r["spill"] != 0]
    assert not bad, bad


# ======================================================================== benchmark ===

def test_bench_smoke(tmp_path):
    """bench/bench_batch_invariant.py runs every case with the mode off and on (CPU: tiny shapes
    under the interpreter, one timed run each: a check that the code runs, not a speed)."""
    import json
    import os
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)
    from bench import bench_batch_invariant as bb
    out = tmp_path / "rows.json"
    rows = bb.main(["--size", "smoke", "--out", str(out)])
    want = {c.op for c in bb.aten_cases("smoke") + bb.op_cases("smoke")}
    assert {r["op"] for r in rows} == want
    assert all(r["off"]["status"] == "ok" and r["on"]["status"] == "ok" for r in rows), rows
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(rows))


if __name__ == "__main__" and sys.argv[1:2] == ["compile"]:
    _gpu_compile_main()
