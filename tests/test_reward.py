"""rlhf_ops.pairwise_reward_loss / reward_at_last_token on every backend against float64 references.

Ground truth: ``reference.pairwise_reward_loss`` run in float64 (itself checked against an
explicit loop over pairs). Fused backends: the Triton kernels (single-tile path for K <= 64,
tiled path above, also forced with tiny tiles) and, on a GPU, the CUDA kernel.
"""
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

import rlhf_ops as ro
from rlhf_ops import reference
from rlhf_ops.nn import PairwiseRewardLoss
from _util import assert_matches, poison_, saved_bytes


reward_mod = importlib.import_module("rlhf_ops.reward")
REDUCTIONS = ("mean", "sum", "none")


def _kernels():
    return importlib.import_module("rlhf_ops.kernels.reward")


def _ranks(B, K, device, *, absent=0.25):
    """Random rankings: a permutation per prompt, ties in every other prompt (ranks // 2), and
    about ``absent`` of the responses absent (rank −1 or another negative number)."""
    ranks = torch.argsort(torch.rand(B, K, device=device), dim=1)
    ranks[1::2] //= 2
    gone = torch.rand(B, K, device=device) < absent
    ranks[gone] = -torch.randint(1, 4, (int(gone.sum()),), device=device)
    return ranks


def _poison_allocator(device, *nbytes):
    """On CUDA, hand the caching allocator blocks full of NaN so that the op's own outputs (same
    sizes) start as NaN; on CPU the fused tests poison explicit buffers instead."""
    if device == "cuda":
        bufs = [torch.full((max(n // 4, 1),), float("nan"), device=device) for n in nbytes]
        del bufs


def _run(rewards, ranks, backend, reduction, g=None, margin=0.0):
    """(ours, ref64, our grad, ref grad) for the upstream gradient ``g`` (float64; random if None)."""
    B, K = rewards.shape
    _poison_allocator(rewards.device.type, 8 * B, 8 * B, 8 * B * K)
    x = rewards.detach().clone().requires_grad_()
    out = ro.pairwise_reward_loss(x, ranks, reduction=reduction, margin=margin, backend=backend)
    x64 = rewards.detach().double().requires_grad_()
    ref = reference.pairwise_reward_loss(x64, ranks, reduction, margin)
    assert out.dtype == (torch.float64 if rewards.dtype == torch.float64 else torch.float32)
    assert out.shape == ref.shape == ((B,) if reduction == "none" else ())
    if g is None:
        g = torch.randn(ref.shape, dtype=torch.float64, device=ref.device)
    gx, = torch.autograd.grad(out, x, g.to(out.dtype))
    gr, = torch.autograd.grad(ref, x64, g)
    assert gx.dtype == rewards.dtype and gx.shape == rewards.shape
    return out, ref, gx, gr


def _loop_oracle(rewards, ranks, margin=0.0):
    """Per-prompt loss and gradient by an explicit Python loop over pairs (float64 math);
    ``margin`` a float or one per prompt (a list or tensor [B])."""
    loss, grad = [], []
    B = rewards.shape[0]
    margins = margin.tolist() if isinstance(margin, torch.Tensor) else (
        list(margin) if isinstance(margin, (list, tuple)) else [margin] * B)
    for r, k, margin in zip(rewards.double().tolist(), ranks.tolist(), margins):
        total, n, g = 0.0, 0, [0.0] * len(r)
        for i in range(len(r)):
            for j in range(len(r)):
                if 0 <= k[i] < k[j]:
                    d = r[i] - r[j] - margin
                    total += max(-d, 0.0) + math.log1p(math.exp(-abs(d)))   # −log σ(d)
                    s = 1.0 / (1.0 + math.exp(d)) if d > -700 else 1.0        # σ(−d)
                    g[i] -= s
                    g[j] += s
                    n += 1
        m = max(n, 1)
        loss.append(total / m)
        grad.append([x / m for x in g])
    return torch.tensor(loss, dtype=torch.float64), torch.tensor(grad, dtype=torch.float64)


# -------------------------------------------------------------------------------- accuracy ---

@pytest.mark.parametrize("K", [2, 4, 9, 17, 70])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_reference(backend, device, K, dtype):
    B = 5 if K <= 64 else 3
    rewards = (torch.randn(B, K, device=device) * 3).to(dtype)
    ranks = _ranks(B, K, device)
    for reduction in REDUCTIONS:
        out, ref, gx, gr = _run(rewards, ranks, backend, reduction)
        assert_matches(out, ref, dtype=dtype, what=f"loss K={K} {reduction}")
        assert_matches(gx, gr, dtype=dtype, what=f"grad K={K} {reduction}")


def test_reference_matches_loop_oracle(device):
    B, K = 5, 6
    rewards = torch.randn(B, K, dtype=torch.float64, device=device) * 4
    ranks = _ranks(B, K, device)
    loss, grad = _loop_oracle(rewards.cpu(), ranks.cpu())
    x = rewards.clone().requires_grad_()
    out = reference.pairwise_reward_loss(x, ranks, "none")
    out.sum().backward()
    assert_matches(out, loss, what="reference loss vs loop")
    assert_matches(x.grad, grad, what="reference grad vs loop")


@pytest.mark.parametrize("margin", [0.0, 0.7])
def test_single_prompt_vs_loop_oracle(backend, device, margin):
    rewards = torch.randn(1, 5, dtype=torch.float64, device=device)
    ranks = torch.tensor([[3, 0, 2, -1, 1]], device=device)
    loss, grad = _loop_oracle(rewards.cpu(), ranks.cpu(), margin)
    x = rewards.clone().requires_grad_()
    out = ro.pairwise_reward_loss(x, ranks, reduction="none", margin=margin, backend=backend)
    out.sum().backward()
    assert_matches(out, loss, what="loss")
    assert_matches(x.grad, grad, what="grad")


@pytest.mark.parametrize("K", [9, 70])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_margin(backend, device, K, dtype):
    B = 4 if K <= 64 else 2
    rewards = (torch.randn(B, K, device=device) * 2).to(dtype)
    ranks = _ranks(B, K, device)
    for margin in (0.1, -1.5):
        out, ref, gx, gr = _run(rewards, ranks, backend, "none", margin=margin)
        assert_matches(out, ref, dtype=dtype, what=f"loss margin={margin}")
        assert_matches(gx, gr, dtype=dtype, what=f"grad margin={margin}")


@pytest.mark.parametrize("K, dtype", [(9, torch.float64), (70, torch.float32), (9, torch.float16)])
def test_margin_per_prompt(backend, device, K, dtype):
    """margin as a tensor [B], one per prompt (TRL's margin column): against the loop oracle in
    float64, the fp64 reference, and equal to the float form where all margins agree; the margin
    gets no gradient even when it requires one."""
    B = 5 if K <= 64 else 2
    rewards = (torch.randn(B, K, device=device) * 2).to(dtype)
    ranks = _ranks(B, K, device)
    margins = (torch.randn(B, device=device) * 1.5).to(torch.float32)
    margins[0] = 0.0
    for reduction in ("none", "mean"):
        out, ref, gx, gr = _run(rewards, ranks, backend, reduction, margin=margins)
        tight = torch.float32 if dtype == torch.float16 else dtype   # fp32 math on fp16 values
        assert_matches(out, ref, dtype=tight, what=f"loss, margins [B] {reduction}")
        if dtype != torch.float16:   # an fp16 gradient is judged below against eager
            assert_matches(gx, gr, dtype=dtype, what=f"grad, margins [B] {reduction}")
    loss, grad = _loop_oracle(rewards.cpu(), ranks.cpu(), margins.cpu())
    x = rewards.double().clone().requires_grad_()
    got = ro.pairwise_reward_loss(x, ranks, reduction="none", margin=margins.double(), backend=backend)
    got.sum().backward()
    assert_matches(got, loss.to(device), what="loss vs loop oracle")
    assert_matches(x.grad, grad.to(device), what="grad vs loop oracle")
    same = ro.pairwise_reward_loss(rewards, ranks, reduction="none", backend=backend,
                                   margin=torch.full((B,), 0.75, dtype=dtype, device=device))
    assert torch.equal(same, ro.pairwise_reward_loss(rewards, ranks, reduction="none", margin=0.75,
                                                     backend=backend))
    m = margins.clone().requires_grad_()
    ro.pairwise_reward_loss(rewards.float().requires_grad_(), ranks, margin=m, backend=backend).backward()
    assert m.grad is None, "the margin must get no gradient"


def test_margin_per_prompt_fp16_grad_no_worse_than_eager(backend, device):
    B, K = 16, 9
    rewards = (torch.randn(B, K, device=device) * 3).half()
    ranks = _ranks(B, K, device)
    margins = torch.rand(B, device=device) * 2
    present = ranks >= 0
    better = (ranks[:, :, None] < ranks[:, None, :]) & present[:, :, None]
    n = better.sum((1, 2))
    g = torch.randn(B, dtype=torch.float64, device=device)
    out, ref, gx, gr = _run(rewards, ranks, backend, "none", g, margin=margins)
    x = rewards.detach().clone().requires_grad_()
    d = x[:, :, None] - x[:, None, :] - margins.half()[:, None, None]
    eager = (-F.logsigmoid(d) * better).sum((1, 2)) / n.clamp(min=1).half()
    ge, = torch.autograd.grad(eager, x, g.half())
    assert_matches(gx, gr, ge, what="fp16 grad with margins [B]")


@pytest.mark.parametrize("K, tile", [(9, 4), (17, 8)])
def test_triton_tiled_path_with_small_tiles(device, monkeypatch, K, tile):
    """The large-K Triton kernel, forced on small K with tiles that do not divide K."""
    kr = _kernels()
    monkeypatch.setattr(kr, "MAX_SMALL_K", 2)
    monkeypatch.setattr(kr, "TILE", tile)
    rewards = torch.randn(3, K, dtype=torch.float64, device=device) * 3
    ranks = _ranks(3, K, device)
    for reduction, margin in (("mean", 0.0), ("none", 0.3),
                              ("none", torch.randn(3, dtype=torch.float64, device=device))):
        out, ref, gx, gr = _run(rewards, ranks, "triton", reduction, margin=margin)
        assert_matches(out, ref, what=f"tiled loss {reduction}")
        assert_matches(gx, gr, what=f"tiled grad {reduction}")


@pytest.mark.parametrize("K", [3, 70])
def test_triton_kernel_writes_every_output(device, K):
    """Outputs poisoned before the launch; both kernels must write every element."""
    kr = _kernels()
    B = 5
    rewards = torch.randn(B, K, dtype=torch.float32, device=device) * 2
    ranks = _ranks(B, K, device)
    ranks[0] = -1  # a prompt with no response at all
    loss = poison_(torch.empty(B, device=device))
    npairs = torch.full((B,), -99, dtype=torch.int64, device=device)
    grad = poison_(torch.empty(B, K, device=device))
    margins = torch.randn(B, device=device)
    kr.launch(rewards, ranks, 0.0, loss, npairs, grad, margins)
    x = rewards.double().requires_grad_()
    ref = reference.pairwise_reward_loss(x, ranks, "none", margins.double())
    ref.sum().backward()
    present = ranks >= 0
    expect_n = ((ranks[:, :, None] < ranks[:, None, :]) & present[:, :, None]).sum((1, 2))
    assert torch.equal(npairs, expect_n)
    assert_matches(loss, ref, dtype=torch.float32, what="loss")
    assert_matches(grad, x.grad, dtype=torch.float32, what="grad")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_no_worse_than_eager(backend, device, dtype):
    B, K = 16, 9
    rewards = (torch.randn(B, K, device=device) * 4).to(dtype)
    ranks = _ranks(B, K, device)
    present = ranks >= 0
    better = (ranks[:, :, None] < ranks[:, None, :]) & present[:, :, None]
    n = better.sum((1, 2))
    for reduction in ("mean", "none"):
        g = torch.randn((B,) if reduction == "none" else (), dtype=torch.float64, device=device)
        out, ref, gx, gr = _run(rewards, ranks, backend, reduction, g)
        # The loss is computed in fp32 from the exact fp16/bf16 values: fp32-tight.
        assert_matches(out, ref, dtype=torch.float32, what=f"{dtype} loss")
        # The gradient comes back in the rewards dtype: no worse than eager PyTorch in it.
        x = rewards.detach().clone().requires_grad_()
        per_pair = -F.logsigmoid(x[:, :, None] - x[:, None, :]) * better
        per_prompt = per_pair.sum((1, 2)) / n.clamp(min=1).to(dtype)
        eager = per_prompt if reduction == "none" else per_prompt.sum() / (n > 0).sum().clamp(min=1)
        ge, = torch.autograd.grad(eager, x, g.to(dtype))
        assert_matches(gx, gr, ge, what=f"{dtype} grad {reduction}")


@pytest.mark.parametrize("scale", [80.0, 1e4])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_large_rewards(backend, device, scale, dtype):
    B, K = 6, 9
    rewards = ((torch.rand(B, K, device=device) * 2 - 1) * scale).to(dtype)
    rewards[0, :2] = torch.tensor([scale, -scale])
    ranks = _ranks(B, K, device, absent=0.1)
    ranks[0, :2] = torch.tensor([1, 0])  # the worst reward ranked best: loss ≈ 2·scale
    for reduction in ("mean", "none"):
        out, ref, gx, gr = _run(rewards, ranks, backend, reduction)
        assert torch.isfinite(out).all() and torch.isfinite(gx).all()
        assert_matches(out, ref, dtype=dtype, what=f"loss ±{scale}")
        assert_matches(gx, gr, dtype=dtype, what=f"grad ±{scale}")


def test_absent_rewards_are_never_read(backend, device):
    B, K = 4, 6
    rewards = torch.randn(B, K, dtype=torch.float64, device=device)
    ranks = _ranks(B, K, device, absent=0.0)
    ranks[:, 1] = -1
    ranks[:, 4] = -2
    clean = rewards.clone()
    clean[:, [1, 4]] = 0.0
    junk = rewards.clone()
    junk[:, 1] = float("nan")
    junk[:, 4] = torch.tensor([float("inf"), float("-inf"), 1e30, float("nan")], dtype=torch.float64)
    for reduction in ("mean", "none"):
        out, ref, gx, gr = _run(junk, ranks, backend, reduction)
        out_c, ref_c, gx_c, gr_c = _run(clean, ranks, backend, reduction)
        assert torch.isfinite(out).all() and torch.isfinite(gx).all()
        assert_matches(out, ref_c, what="loss with junk in absent rewards")
        assert_matches(gx, gr, what="grad with junk in absent rewards")
        assert (gx[:, [1, 4]] == 0).all()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, interpreter
def test_minus_inf_reward_of_a_winner(backend, device):
    rewards = torch.randn(2, 4, dtype=torch.float64, device=device)
    rewards[0, 2] = float("-inf")
    ranks = torch.tensor([[1, 2, 0, 3], [0, 1, 2, 3]], device=device)
    out, ref, gx, gr = _run(rewards, ranks, backend, "none")
    assert out[0] == float("inf") and torch.isfinite(out[1])
    assert_matches(out, ref, what="loss")   # inf compared exactly
    assert_matches(gx, gr, what="grad")     # σ(−(−inf)) = 1: a finite gradient


def test_prompts_without_pairs(backend, device):
    # K = 1 everywhere: loss exactly 0, gradient exactly 0, for every reduction.
    one = torch.randn(5, 1, device=device)
    for reduction in REDUCTIONS:
        x = one.clone().requires_grad_()
        out = ro.pairwise_reward_loss(x, torch.zeros(5, 1, dtype=torch.long, device=device),
                                      reduction=reduction, backend=backend)
        out.sum().backward()
        assert (out == 0).all() and (x.grad == 0).all()
    # Mixed batch: prompt 1 all tied, prompt 3 all absent, prompt 4 a single response.
    B, K = 6, 5
    rewards = torch.randn(B, K, dtype=torch.float64, device=device)
    ranks = _ranks(B, K, device, absent=0.0)
    ranks[1] = 2
    ranks[3] = -1
    ranks[4] = torch.tensor([-1, -1, 0, -1, -1])
    lonely = [1, 3, 4]
    for reduction in REDUCTIONS:
        out, ref, gx, gr = _run(rewards, ranks, backend, reduction)
        assert_matches(out, ref, what=f"loss {reduction}")
        assert_matches(gx, gr, what=f"grad {reduction}")
        assert (gx[lonely] == 0).all()
        if reduction == "none":
            assert (out[lonely] == 0).all()
    per = ro.pairwise_reward_loss(rewards, ranks, reduction="none", backend=backend)
    mean = ro.pairwise_reward_loss(rewards, ranks, reduction="mean", backend=backend)
    assert_matches(mean, per.sum() / (B - len(lonely)), what="mean over prompts with a pair")


def test_empty_batch(backend, device):
    x = torch.randn(0, 4, device=device, requires_grad=True)
    ranks = torch.zeros(0, 4, dtype=torch.long, device=device)
    assert ro.pairwise_reward_loss(x, ranks, reduction="none", backend=backend).shape == (0,)
    for reduction in ("mean", "sum"):
        out = ro.pairwise_reward_loss(x, ranks, reduction=reduction, backend=backend)
        assert out.shape == () and out.item() == 0.0
        out.backward()
        assert x.grad.shape == (0, 4)


def test_non_contiguous_inputs(backend, device):
    K, B = 9, 6
    rewards = torch.randn(K, B, dtype=torch.float64, device=device).t()
    ranks = _ranks(B, 2 * K, device)[:, ::2]
    assert not rewards.is_contiguous() and not ranks.is_contiguous()
    out, ref, gx, gr = _run(rewards, ranks, backend, "none")
    assert_matches(out, ref, what="loss")
    assert_matches(gx, gr, what="grad")


def test_gradcheck(fused_backend, device):
    rewards = torch.randn(3, 5, dtype=torch.float64, device=device, requires_grad=True)
    ranks = torch.tensor([[0, 1, 2, 3, 4], [2, 0, 2, -1, 1], [4, -1, 0, 3, 0]], device=device)
    for reduction, margin in (("mean", 0.0), ("none", 0.5),
                              ("sum", torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64, device=device))):
        assert torch.autograd.gradcheck(
            lambda r: ro.pairwise_reward_loss(r, ranks, reduction=reduction, margin=margin,
                                              backend=fused_backend), (rewards,))


def test_triton_gradcheck_tiled_path(device, monkeypatch):
    kr = _kernels()
    monkeypatch.setattr(kr, "MAX_SMALL_K", 2)
    monkeypatch.setattr(kr, "TILE", 4)
    rewards = torch.randn(2, 6, dtype=torch.float64, device=device, requires_grad=True)
    ranks = torch.tensor([[5, 0, 1, -1, 3, 3], [0, 1, 2, 3, 4, 5]], device=device)
    assert torch.autograd.gradcheck(
        lambda r: ro.pairwise_reward_loss(r, ranks, reduction="none", backend="triton"), (rewards,),
        fast_mode=True)


# ------------------------------------------------------------------ meta, compile, memory ---


def test_meta_tensors_and_saved_bytes():
    B, K = 4096, 9
    x = torch.empty(B, K, dtype=torch.bfloat16, device="meta", requires_grad=True)
    ranks = torch.empty(B, K, dtype=torch.long, device="meta")
    for be in ("reference", "triton", "cuda"):
        for reduction in REDUCTIONS:
            out = ro.pairwise_reward_loss(x, ranks, reduction=reduction, backend=be)
            assert out.device.type == "meta" and out.dtype == torch.float32
            assert out.shape == ((B,) if reduction == "none" else ())
            out.sum().backward()
            assert x.grad.shape == (B, K) and x.grad.dtype == torch.bfloat16
            x.grad = None
    for be in ("triton", "cuda"):
        fused = saved_bytes(lambda: ro.pairwise_reward_loss(x * 1, ranks, backend=be))
        assert fused <= 4 * B * K + 64, f"{be} saves {fused} bytes; O(B·K) = {4 * B * K} expected"
    eager = saved_bytes(lambda: ro.pairwise_reward_loss(x * 1, ranks, backend="reference"))
    assert eager >= B * K * K, "eager keeps [B, K, K] pair tensors (the test would not see a regression)"


def test_torch_compile_fullgraph(fused_backend, device):
    head = torch.nn.Linear(8, 1, dtype=torch.float64, device=device)
    feats = torch.randn(6, 5, 8, dtype=torch.float64, device=device)
    ranks = _ranks(6, 5, device)

    margins = torch.rand(6, dtype=torch.float64, device=device)

    def step(feats, margins):
        rewards = head(feats).squeeze(-1)
        return ro.pairwise_reward_loss(rewards, ranks, margin=margins, backend=fused_backend)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(feats, margins)
    out.backward()
    g_c = head.weight.grad.clone()
    head.zero_grad()
    ref = reference.pairwise_reward_loss(head(feats).squeeze(-1), ranks, margin=margins)
    ref.backward()
    assert_matches(out, ref, what="compiled loss")
    assert_matches(g_c, head.weight.grad, what="compiled grad")


def test_nn_module_matches_functional(backend, device):
    rewards = torch.randn(5, 4, dtype=torch.float64, device=device)
    ranks = _ranks(5, 4, device)
    for reduction in REDUCTIONS:
        mod = PairwiseRewardLoss(reduction=reduction, backend=backend)
        out, ref, gx, gr = _run(rewards, ranks, backend, reduction)
        x = rewards.clone().requires_grad_()
        got = mod(x, ranks)
        assert_matches(got, ref, what=f"module {reduction}")
        got.sum().backward()
        x64 = rewards.clone().requires_grad_()
        reference.pairwise_reward_loss(x64, ranks, reduction).sum().backward()
        assert_matches(x.grad, x64.grad, what=f"module grad {reduction}")
    margins = torch.randn(5, dtype=torch.float64, device=device)
    mod = PairwiseRewardLoss(reduction="none", margin=0.3, backend=backend)
    assert_matches(mod(rewards, ranks, margins),
                   reference.pairwise_reward_loss(rewards, ranks, "none", margins), what="module margins")
    assert_matches(mod(rewards, ranks), reference.pairwise_reward_loss(rewards, ranks, "none", 0.3),
                   what="module float margin")


# ------------------------------------------------------------------------------ bad input ---

def test_bad_inputs_raise(device):
    r = torch.randn(3, 4, device=device)
    k = _ranks(3, 4, device)
    op = ro.pairwise_reward_loss
    with pytest.raises(TypeError, match="ranks"):
        op(r, k.float())
    with pytest.raises(TypeError, match="ranks"):
        op(r, k.int())
    with pytest.raises(TypeError, match="rewards"):
        op(k, k)
    with pytest.raises(ValueError, match="rewards"):
        op(r.reshape(-1), k)
    with pytest.raises(ValueError, match="ranks"):
        op(r, k[:, :3])
    with pytest.raises(ValueError, match="ranks"):
        op(r, k.reshape(-1))
    with pytest.raises(ValueError, match="ranks"):
        op(r, k.to("meta"))
    with pytest.raises(ValueError, match="reduction"):
        op(r, k, reduction="avg")
    with pytest.raises(ValueError, match="backend"):
        op(r, k, backend="fast")
    with pytest.raises(TypeError, match="rewards"):
        op([[0.0, 1.0]], k)
    with pytest.raises(ValueError, match=r"margin must have shape \[B\] \(one per prompt\) = \(3,\)"):
        op(r, k, margin=torch.tensor(0.5, device=device))
    with pytest.raises(ValueError, match="margin must have shape"):
        op(r, k, margin=torch.zeros(4, device=device))
    with pytest.raises(TypeError, match="margin must have dtype"):
        op(r, k, margin=torch.zeros(3, dtype=torch.int64, device=device))
    with pytest.raises(ValueError, match="margin is on meta"):
        op(r, k, margin=torch.zeros(3, device="meta"))
    with pytest.raises(TypeError, match="margin must be a Python float or a float tensor"):
        op(r, k, margin="0.5")
    with pytest.raises(TypeError, match="margin"):
        op(r, k, margin=True)
    with pytest.raises(ValueError, match="margin"):
        op(r, k, margin=float("inf"))
    if device == "cpu":  # value checks run eagerly for CPU tensors
        for bad in (float("nan"), float("-inf")):
            m = torch.zeros(3, device=device)
            m[1] = bad
            with pytest.raises(ValueError, match="margin must be finite"):
                op(r, k, margin=m)


def test_unavailable_backend_is_an_error():
    r = torch.randn(2, 3)
    k = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(RuntimeError, match="cuda"):
        ro.pairwise_reward_loss(r, k, backend="cuda")   # CPU tensors never run on cuda


# ----------------------------------------------------------------------------- reward head ---

@pytest.mark.parametrize("with_bias", [False, True])
def test_reward_at_last_token(device, with_bias):
    B, K, T, d = 3, 4, 7, 16
    hidden = torch.randn(B * K, T, d, dtype=torch.float64, device=device, requires_grad=True)
    last = torch.randint(0, T, (B, K), device=device)
    head = torch.nn.Linear(d, 1, bias=with_bias, dtype=torch.float64, device=device)
    got = ro.reward_at_last_token(hidden, last, head.weight, head.bias)
    assert got.shape == (B, K)
    want = torch.stack([head(hidden[n, last.reshape(-1)[n]]) for n in range(B * K)]).reshape(B, K)
    assert_matches(got, want, what="rewards")
    got.sum().backward()
    gh = hidden.grad.clone()
    hidden.grad = None
    want.sum().backward()
    assert_matches(gh, hidden.grad, what="d hidden")
    flat = ro.reward_at_last_token(hidden, last.reshape(-1), head.weight.reshape(-1), head.bias)
    assert flat.shape == (B * K,) and torch.equal(flat, got.reshape(-1))


def test_reward_at_last_token_feeds_the_loss(backend, device):
    B, K, T, d = 2, 4, 5, 8
    hidden = torch.randn(B * K, T, d, device=device)
    last = torch.randint(0, T, (B, K), device=device)
    w = torch.randn(d, device=device, requires_grad=True)
    loss = ro.pairwise_reward_loss(ro.reward_at_last_token(hidden, last, w), _ranks(B, K, device),
                                   backend=backend)
    loss.backward()
    assert loss.shape == () and w.grad.shape == (d,) and torch.isfinite(w.grad).all()


def test_reward_at_last_token_bad_inputs(device):
    h = torch.randn(4, 5, 8, device=device)
    w = torch.randn(8, device=device)
    idx = torch.tensor([0, 4, 2, 1], device=device)
    f = ro.reward_at_last_token
    with pytest.raises(ValueError, match="hidden"):
        f(h[0], idx, w)
    with pytest.raises(TypeError, match="last_index"):
        f(h, idx.float(), w)
    with pytest.raises(ValueError, match="last_index"):
        f(h, idx[:3], w)
    with pytest.raises(ValueError, match="weight"):
        f(h, idx, torch.randn(7, device=device))
    with pytest.raises(ValueError, match="bias"):
        f(h, idx, w, torch.zeros(2, device=device))
    with pytest.raises(TypeError, match="weight"):
        f(h, idx, w.double())
    if device == "cpu":  # value checks run eagerly for CPU tensors
        with pytest.raises(ValueError, match="last_index"):
            f(h, torch.tensor([0, 5, 2, 1]), w)
        with pytest.raises(ValueError, match="last_index"):
            f(h, torch.tensor([0, -1, 2, 1]), w)


def test_reward_at_last_token_out_of_range_is_nan_without_checks(device, monkeypatch):
    """Without the eager value check (CUDA tensors, RLHF_OPS_DEBUG unset) an index outside
    [0, T) gives a NaN reward for that response, never a memory fault or a plausible number."""
    monkeypatch.setattr(reward_mod._backend, "debug_checks", lambda dev: False)
    h = torch.randn(4, 5, 8, device=device)
    w = torch.randn(8, device=device)
    out = ro.reward_at_last_token(h, torch.tensor([0, 5, -1, 4], device=device), w)
    assert torch.isnan(out[1]) and torch.isnan(out[2])
    assert torch.isfinite(out[[0, 3]]).all()
    assert_matches(out[[0, 3]], torch.stack([h[0, 0] @ w, h[3, 4] @ w]), what="in-range rewards")


def test_reward_at_last_token_meta():
    h = torch.empty(4096 * 9, 512, 64, device="meta", requires_grad=True)
    idx = torch.empty(4096, 9, dtype=torch.long, device="meta")
    w = torch.empty(64, device="meta", requires_grad=True)
    out = ro.reward_at_last_token(h, idx, w)
    assert out.shape == (4096, 9) and out.device.type == "meta"
