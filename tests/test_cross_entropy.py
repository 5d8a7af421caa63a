"""rlhf_ops.cross_entropy / linear_cross_entropy on every backend against the float64 reference."""
import importlib

import pytest
import torch
import torch.nn.functional as F

import rlhf_ops as ro
from rlhf_ops import reference
from _util import assert_matches, rel_err, saved_tensors

from conftest import DEVICE

layout_mod = importlib.import_module("rlhf_ops._layout")


def _ref64(logits, target, **kw):
    return reference.cross_entropy(logits.detach().double().requires_grad_(), target, **kw)


def _check(logits, target, backend, *, reduction="mean", grad_out=None, **kw):
    """Forward and gradient of ``backend`` vs the float64 reference on the same inputs."""
    x = logits.detach().clone().requires_grad_()
    before = x.detach().clone()
    out = ro.cross_entropy(x, target, reduction=reduction, backend=backend, **kw)
    x64 = logits.detach().double().requires_grad_()
    ref = reference.cross_entropy(x64, target, reduction=reduction, **kw)
    assert out.dtype == (torch.float64 if logits.dtype == torch.float64 else torch.float32)
    assert out.shape == ref.shape
    g = torch.randn(ref.shape, dtype=torch.float64, device=ref.device) if grad_out is None else grad_out
    gx, = torch.autograd.grad(out, x, g.to(out.dtype))
    gr, = torch.autograd.grad(ref, x64, g)
    assert torch.equal(x.detach(), before), "the caller's logits were modified"
    assert gx.dtype == logits.dtype and gx.shape == logits.shape
    return out, ref, gx, gr


SHAPES = [(1, 7), (37, 1000), (3, 70001), (2, 3, 129)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_reference_fp64(backend, device, shape, reduction):
    V = shape[-1]
    logits = torch.randn(shape, dtype=torch.float64, device=device) * 3
    target = torch.randint(0, V, shape[:-1], device=device)
    target.view(-1)[::3] = -100  # some ignored rows
    out, ref, gx, gr = _check(logits, target, backend, reduction=reduction)
    assert_matches(out, ref, what="loss")
    assert_matches(gx, gr, what="grad")


@pytest.mark.parametrize("ls", [0.125, 0.3])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_label_smoothing(backend, device, ls, reduction):
    logits = torch.randn(19, 333, dtype=torch.float64, device=device)
    target = torch.randint(0, 333, (19,), device=device)
    target[4] = 7
    target[5] = -1  # a custom ignore_index
    grad_out = torch.rand(19, dtype=torch.float64, device=device) * 3 if reduction == "none" else None
    out, ref, gx, gr = _check(logits, target, backend, reduction=reduction, grad_out=grad_out,
                              label_smoothing=ls, ignore_index=-1)
    # 0.3 is not exact in the fp32 scalar a Triton kernel receives: allow that rounding.
    tol = 1e-10 if ls == 0.125 else 1e-7
    assert_matches(out, ref, tol=tol, what="loss")
    assert_matches(gx, gr, tol=tol, what="grad")
    # and the reference itself agrees with PyTorch
    torch_out = F.cross_entropy(logits, target, reduction=reduction, label_smoothing=ls, ignore_index=-1)
    assert_matches(ref, torch_out, what="reference vs F.cross_entropy")


def test_all_targets_ignored_mean_is_zero(backend, device):
    logits = torch.randn(5, 50, device=device, requires_grad=True)
    target = torch.full((5,), -100, device=device)
    out = ro.cross_entropy(logits, target, backend=backend)
    assert out.item() == 0.0 and torch.isfinite(out)
    out.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_extreme_and_minus_inf_logits(backend, device):
    logits = torch.randn(9, 300, dtype=torch.float64, device=device)
    logits[0] *= 1e4
    logits[1, :150] = -1e4
    logits[2, 10:] = float("-inf")
    logits[3, ::2] = float("-inf")
    target = torch.randint(0, 300, (9,), device=device)
    target[2] = 3
    target[3] = 1  # odd position: finite
    out, ref, gx, gr = _check(logits, target, backend, reduction="none")
    assert torch.isfinite(out).all()
    assert_matches(out, ref, what="loss")
    assert torch.isfinite(gx).all()
    assert_matches(gx, gr, what="grad")


@pytest.mark.parametrize("ls", [0.0, 0.1])
@pytest.mark.parametrize("far", [False, True])
def test_fp32_logits_near_1e4_no_worse_than_eager(backend, device, ls, far):
    """Near-tied fp32 logits of ~1e4: rounding lse = m + log s to fp32 would cost ulp(1e4)/2 ≈ 5e-4
    in every softmax of the backward, and a label-smoothing sum of V raw logits ulp(V·1e4); the
    kernels keep (m, log s) apart and sum x − x_0, and match eager."""
    x = (1e4 + 2 * torch.randn(32, 300, dtype=torch.float64, device=device)).float()
    if far:
        x[:, ::7] = -1e4
    target = torch.randint(0, 300, (32,), device=device)
    ref64 = x.double().requires_grad_()
    ref = F.cross_entropy(ref64, target, reduction="none", label_smoothing=ls)
    g = torch.rand(32, dtype=torch.float64, device=device)
    gr, = torch.autograd.grad(ref, ref64, g)
    for fn, name in ((lambda a: ro.cross_entropy(a, target, reduction="none", label_smoothing=ls,
                                                 backend=backend), "ours"),
                     (lambda a: F.cross_entropy(a, target, reduction="none", label_smoothing=ls), "eager")):
        xi = x.clone().requires_grad_()
        out = fn(xi)
        gx, = torch.autograd.grad(out, xi, g.float())
        if name == "ours":
            ours = (out, gx)
        else:
            eager = (out, gx)
    assert_matches(ours[0], ref, eager[0], tol=1e-6, what="loss")
    assert_matches(ours[1], gr, eager[1], tol=1e-6, what="grad")


def test_nan_logit_gives_nan(backend, device):
    """A NaN anywhere in a row makes that row's loss NaN (as eager), never a finite number."""
    logits = torch.randn(3, 700, device=device)
    logits[0, 0] = float("nan")          # first element: the running max starts at −inf
    logits[1, 333] = float("nan")
    target = torch.tensor([5, 1, 2], device=device)
    out = ro.cross_entropy(logits, target, reduction="none", backend=backend)
    assert torch.isnan(out[:2]).all() and torch.isfinite(out[2])


def test_minus_inf_target_gives_inf_loss(backend, device):
    logits = torch.randn(2, 40, device=device)
    logits[0, 5] = float("-inf")
    target = torch.tensor([5, 1], device=device)
    out = ro.cross_entropy(logits, target, reduction="none", backend=backend)
    ref = F.cross_entropy(logits, target, reduction="none")
    assert out[0] == float("inf") and ref[0] == float("inf")
    assert torch.allclose(out[1], ref[1], rtol=1e-5, atol=1e-6)


def test_empty_batch(backend, device):
    logits = torch.randn(0, 17, device=device, requires_grad=True)
    target = torch.zeros(0, dtype=torch.long, device=device)
    for red in ("mean", "sum"):
        out = ro.cross_entropy(logits, target, reduction=red, backend=backend)
        assert out.item() == 0.0
        out.backward()
    assert ro.cross_entropy(logits, target, reduction="none", backend=backend).shape == (0,)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_no_worse_than_eager(backend, device, dtype):
    V = 5000
    logits = (torch.randn(24, V, device=device) * 4).to(dtype)
    target = torch.randint(0, V, (24,), device=device)
    target[::5] = -100
    out, ref, gx, gr = _check(logits, target, backend, reduction="none")
    xe = logits.detach().clone().requires_grad_()
    eager = F.cross_entropy(xe.float() if device == "cpu" and dtype == torch.float16 else xe,
                            target, reduction="none")
    g = torch.randn(ref.shape, dtype=torch.float64, device=device)
    ge, = torch.autograd.grad(eager, xe, g.to(eager.dtype))
    if dtype == torch.float32:
        assert_matches(out, ref, tol=1e-5, what="loss")
        assert_matches(gx, gr, tol=1e-5, what="grad")
    else:
        assert_matches(out, ref, eager, tol=1e-3, what="loss")
        # the gradient is stored in the input dtype: judge by eager's own rounding error
        assert rel_err(gx, gr) <= 2 * rel_err(ge, gr) + 5e-3


def test_gradcheck(fused_backend, device):
    x = torch.randn(4, 9, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.tensor([0, 8, -100, 4], device=device)
    for red in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda z: ro.cross_entropy(z, t, reduction=red, label_smoothing=0.25, backend=fused_backend), (x,))


def test_out_of_range_target_raises_on_cpu(backend):
    if DEVICE != "cpu":
        pytest.skip("eager value checks run for CPU tensors (or with RLHF_OPS_DEBUG=1)")
    x = torch.randn(3, 10)
    for bad in (10, -5):
        with pytest.raises(ValueError, match=rf"cross_entropy: target holds {bad}, out of range \[0, 10\)"):
            ro.cross_entropy(x, torch.tensor([1, bad, 2]), backend=backend)
        with pytest.raises(ValueError, match=rf"linear_cross_entropy: target holds {bad}, out of range"):
            ro.linear_cross_entropy(x, torch.randn(10, 10), torch.tensor([1, bad, 2]), backend=backend)


def test_non_contiguous_targets(backend, device):
    """Targets are read by row: a strided or expanded target is made contiguous first."""
    x = torch.randn(6, 50, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(50, 50, dtype=torch.float64, device=device, requires_grad=True)
    for t in (torch.randint(0, 50, (12,), device=device)[::2], torch.tensor([7], device=device).expand(6)):
        assert not t.is_contiguous()
        for ours, ref in ((lambda: ro.cross_entropy(x, t, reduction="none", backend=backend),
                           lambda: F.cross_entropy(x, t, reduction="none")),
                          (lambda: ro.linear_cross_entropy(x, w, t, reduction="none", backend=backend),
                           lambda: F.cross_entropy(x @ w.T, t, reduction="none"))):
            out, expect = ours(), ref()
            torch.testing.assert_close(out, expect)
            g = torch.randn(6, dtype=torch.float64, device=device)
            torch.testing.assert_close(torch.autograd.grad(out, (x, w), g, allow_unused=True)[0],
                                       torch.autograd.grad(expect, (x, w), g, allow_unused=True)[0])


def test_ignored_rows_of_minus_inf_get_zero_gradient(backend, device):
    """docs/design.md: mean over zero non-ignored targets is 0 with a zero gradient — also when those
    rows' logits are all −inf."""
    x = torch.full((2, 30), float("-inf"), device=device, requires_grad=True)
    loss = ro.cross_entropy(x, torch.tensor([-100, -100], device=device), backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.skipif(DEVICE != "cuda", reason="the in-kernel NaN rule is for CUDA tensors (needs a GPU)")
def test_out_of_range_target_is_nan_on_gpu(fused_backend):
    x = torch.randn(3, 10, device="cuda")
    out = ro.cross_entropy(x, torch.tensor([1, 10, 2], device="cuda"), reduction="none", backend=fused_backend)
    assert torch.isnan(out[1]) and torch.isfinite(out[0]) and torch.isfinite(out[2])


def test_bad_inputs_raise(device):
    x = torch.randn(4, 10, device=device)
    t = torch.randint(0, 10, (4,), device=device)
    with pytest.raises(TypeError, match="target"):
        ro.cross_entropy(x, t.int())
    with pytest.raises(TypeError, match="logits"):
        ro.cross_entropy(x.long(), t)
    with pytest.raises(ValueError, match="target"):
        ro.cross_entropy(x, t[:3])
    with pytest.raises(ValueError, match="reduction"):
        ro.cross_entropy(x, t, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        ro.cross_entropy(x, t, label_smoothing=1.5)
    with pytest.raises(ValueError, match="backend"):
        ro.cross_entropy(x, t, backend="tpu")
    with pytest.raises(ValueError, match="weight"):
        ro.linear_cross_entropy(torch.randn(4, 8, device=device), torch.randn(10, 7, device=device), t)
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        ro.linear_cross_entropy(torch.randn(4, 8, device=device), torch.randn(10, 8, device=device), t,
                                ignore_index=-100.0)


def test_unavailable_backends_are_errors(monkeypatch):
    x, t = torch.randn(2, 5), torch.tensor([0, 1])
    with pytest.raises(RuntimeError, match="cuda"):
        ro.cross_entropy(x, t, backend="cuda")  # CPU tensors: never the cuda backend
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        ro.cross_entropy(x, t, backend="triton")


def test_backend_selection(monkeypatch, device):
    x, t = torch.randn(3, 6, device=device), torch.tensor([0, 1, 2], device=device)
    assert "reference" in ro.available_backends()
    with ro.use_backend("reference"):   # the context, not auto, chooses (auto picks a fused backend on CUDA)
        from rlhf_ops import _backend
        assert _backend.resolve("cross_entropy", None, x.device) == "reference"
        assert torch.equal(ro.cross_entropy(x, t), reference.cross_entropy(x, t))
    with pytest.raises(ValueError, match="backend"):
        with ro.use_backend("nope"):
            pass
    monkeypatch.setenv("RLHF_OPS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="RLHF_OPS_BACKEND"):
        ro.cross_entropy(x, t)
    monkeypatch.setenv("RLHF_OPS_BACKEND", "reference")
    from rlhf_ops import _backend
    assert _backend.resolve("cross_entropy", None, x.device) == "reference"
    with ro.use_backend("triton"):
        assert _backend.resolve("cross_entropy", None, torch.device("meta")) == "triton"
        assert _backend.resolve("cross_entropy", "reference", x.device) == "reference"


def test_inplace_backward_overwrites_logits_with_gradient(fused_backend, device):
    x = torch.randn(6, 77, dtype=torch.float64, device=device)
    t = torch.randint(0, 77, (6,), device=device)
    leaf = x.clone().requires_grad_()
    y = leaf * 1.0  # a non-leaf "logits" buffer, as a model's output would be
    loss = ro.cross_entropy(y, t, backend=fused_backend, inplace_backward=True)
    y_buf = y.detach()
    loss.backward()
    ref = x.clone().requires_grad_()
    reference.cross_entropy(ref, t).backward()
    assert_matches(leaf.grad, ref.grad, what="grad")
    assert torch.equal(y_buf, leaf.grad), "in-place mode writes the gradient into the logits buffer"


def test_torch_compile_fullgraph(fused_backend, device):
    lin = torch.nn.Linear(16, 40, dtype=torch.float64, device=device)
    h = torch.randn(2, 5, 16, dtype=torch.float64, device=device)
    t = torch.randint(0, 40, (2, 5), device=device)

    def step(h):
        return ro.cross_entropy(lin(h), t, label_smoothing=0.125, backend=fused_backend)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(h)
    out.backward()
    g_c = lin.weight.grad.clone()
    lin.zero_grad()
    ref = reference.cross_entropy(lin(h), t, label_smoothing=0.125)
    ref.backward()
    assert_matches(out, ref, what="compiled loss")
    assert_matches(g_c, lin.weight.grad, what="compiled grad")



def test_meta_tensors_and_saved_bytes():
    N, V = 8192, 128256
    x = torch.empty(N, V, dtype=torch.bfloat16, device="meta", requires_grad=True)
    t = torch.empty(N, dtype=torch.long, device="meta")
    for be in ("triton", "cuda"):
        out = ro.cross_entropy(x, t, backend=be)
        assert out.device.type == "meta" and out.shape == ()
        out.backward()
        assert x.grad.shape == x.shape and x.grad.dtype == x.dtype
        x.grad = None
    fused = saved_tensors(lambda: ro.cross_entropy(x * 1, t, backend="triton"))
    eager = saved_tensors(lambda: ro.cross_entropy(x * 1, t, backend="reference"))
    fused_extra = sum(s.nbytes for s in fused if tuple(s.shape) != (N, V))
    assert fused_extra <= 64 * N, f"fused saves more than O(N) beyond the logits: {fused}"
    assert sum(s.nbytes for s in eager) >= 4 * N * V, "eager saves an fp32 [N, V] log-softmax"


# ------------------------------------------------------------------- linear cross entropy ---

@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("chunked", [False, True])
def test_linear_cross_entropy(backend, device, with_bias, chunked, monkeypatch):
    if chunked:  # force several row chunks through the fused path
        monkeypatch.setattr(layout_mod, "block_len", lambda n_other, itemsize, total: 5)
    N, d, V = 23, 16, 301
    h = torch.randn(N, d, dtype=torch.float64, device=device)
    w = torch.randn(V, d, dtype=torch.float64, device=device) * 0.5
    b = torch.randn(V, dtype=torch.float64, device=device) if with_bias else None
    t = torch.randint(0, V, (N,), device=device)
    t[::4] = -100
    args = [h.clone().requires_grad_(), w.clone().requires_grad_()]
    if with_bias:
        args.append(b.clone().requires_grad_())
    out = ro.linear_cross_entropy(args[0], args[1], t, bias=args[2] if with_bias else None,
                                  label_smoothing=0.125, backend=backend)
    ref_args = [a.detach().clone().requires_grad_() for a in args]
    logits = ref_args[0] @ ref_args[1].T + (ref_args[2] if with_bias else 0)
    ref = F.cross_entropy(logits, t, label_smoothing=0.125)
    assert_matches(out, ref, what="loss")
    grads = torch.autograd.grad(out, args)
    ref_grads = torch.autograd.grad(ref, ref_args)
    for name, g, r in zip("hwb", grads, ref_grads):
        assert_matches(g, r, what=f"grad {name}")


def test_linear_cross_entropy_leading_dims_and_fp16(backend, device):
    h = torch.randn(2, 7, 32, device=device).half()
    w = (torch.randn(500, 32, device=device) * 0.2).half()
    t = torch.randint(0, 500, (2, 7), device=device)
    out = ro.linear_cross_entropy(h, w, t, reduction="none", backend=backend)
    ref = reference.linear_cross_entropy(h.double(), w.double(), t, reduction="none")
    eager = F.cross_entropy((h.float() @ w.float().T).half().float().reshape(14, 500), t.reshape(14),
                            reduction="none").reshape(2, 7)
    assert out.shape == (2, 7)
    assert_matches(out, ref, eager, tol=2e-3, what="fp16 linear CE")


def test_linear_cross_entropy_meta_saves_no_logits():
    N, d, V = 8192, 4096, 128256
    h = torch.empty(N, d, dtype=torch.bfloat16, device="meta", requires_grad=True)
    w = torch.empty(V, d, dtype=torch.bfloat16, device="meta", requires_grad=True)
    t = torch.empty(N, dtype=torch.long, device="meta")
    saved = saved_tensors(lambda: ro.linear_cross_entropy(h * 1, w, t, backend="triton"))
    assert all(tuple(s.shape) != (N, V) for s in saved), [s.shape for s in saved]
    out = ro.linear_cross_entropy(h, w, t, backend="cuda")
    out.backward()
    assert h.grad.shape == h.shape and w.grad.shape == w.shape


def test_nn_module_matches_functional(backend, device):
    x = torch.randn(3, 4, 50, device=device)
    t = torch.randint(0, 50, (3, 4), device=device)
    mod = ro_nn().CrossEntropyLoss(label_smoothing=0.1, backend=backend)
    assert torch.allclose(mod(x, t), F.cross_entropy(x.reshape(12, 50), t.reshape(12), label_smoothing=0.1),
                          rtol=1e-5, atol=1e-6)
    assert "label_smoothing" in repr(mod)


def ro_nn():
    import rlhf_ops.nn
    return rlhf_ops.nn

