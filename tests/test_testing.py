"""rlhf_ops.testing.assert_matches_reference: the eager-relative rule for users' own kernels.

It passes on the library's fused ops and fails, with a message naming the tensor, the index, the
error, the bound and eager's own error, on: a 1-ulp error where eager is exact, a wrong gradient,
a NaN where the reference is finite, an infinity of the wrong sign or where the reference is
finite, a missing or extra output, a wrong shape.
"""
import math

import pytest
import torch

import rlhf_ops as ro
from rlhf_ops.testing import TOLERANCE, assert_matches_reference, compare_to_reference, default_atol
from conftest import DEVICE, backend_problem

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
FUSED = [pytest.param(b, marks=pytest.mark.skipif(bool(backend_problem(b)), reason=str(backend_problem(b))))
         for b in ("triton", "cuda")]


def _bump(t: torch.Tensor, index, ulps: int = 1) -> torch.Tensor:
    """``t`` with element ``index`` moved ``ulps`` representable values up (in t's dtype); the
    gradient passes through unchanged."""
    up = t.detach()
    for _ in range(ulps):
        up = torch.nextafter(up, torch.full_like(up, math.inf))
    delta = torch.zeros_like(up)
    delta[index] = (up - t.detach())[index]          # a whole number of ulps: exact
    return t + delta


class _ScaledGrad(torch.autograd.Function):
    """Identity forward; backward scales the gradient of element ``index`` by ``factor``."""
    @staticmethod
    def forward(ctx, x, index, factor):
        ctx.index, ctx.factor = index, factor
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        g[ctx.index] *= ctx.factor
        return g, None, None


# ---------------------------------------------------------------------- the library's ops ---

@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
def test_passes_on_fused_token_logprobs(backend, dtype):
    """The fused log-probs and entropy (per-row outputs, judged element-wise on the row's scale)
    and the logits' gradient, against the reference backend."""
    x = torch.randn(5, 7, 257, dtype=F64, device=DEVICE) * 3
    x[0, 0, ::3] = -math.inf                        # −inf logits: −inf log-probs must match
    tokens = torch.randint(0, 257, (5, 7), device=DEVICE)
    tokens[0, 0] = 3 * 5                            # a −inf logit's token: log-prob −inf
    scale = 1 + torch.where(torch.isfinite(x), x.abs(), 0).amax(-1)
    rep = assert_matches_reference(
        lambda a, t: ro.token_logprobs(a, t, return_entropy=True, backend=backend),
        lambda a, t: ro.token_logprobs(a, t, return_entropy=True, backend="reference"),
        x, tokens, dtype=dtype, elementwise=True, scale=scale, input_names=["logits", "tokens"])
    names = [(c.tensor, c.kind) for c in rep.checks]
    assert names == [("output 0", "norm"), ("output 0", "elementwise"), ("output 1", "norm"),
                     ("output 1", "elementwise"), ("grad of input 0 (logits)", "norm")]
    assert rep.passed and all(c.bound >= c.atol > 0 for c in rep.checks)


@pytest.mark.parametrize("backend", FUSED)
def test_passes_on_fused_pairwise_reward_loss_with_kept_inputs(backend):
    """A per-prompt margin kept in fp32 (dtype None for it) while the rewards are bf16; the
    ranks (int64) pass through unchanged."""
    rewards = torch.randn(6, 9, dtype=F64, device=DEVICE) * 2
    ranks = torch.randint(-1, 4, (6, 9), device=DEVICE)
    margin = torch.rand(6, device=DEVICE)
    seen = []

    def fused(r, k, m):
        seen.append((r.dtype, k.dtype, m.dtype, r.requires_grad, m.requires_grad))
        return ro.pairwise_reward_loss(r, k, margin=m, reduction="none", backend=backend)
    rep = assert_matches_reference(
        fused, lambda r, k, m: ro.pairwise_reward_loss(r, k, margin=m, reduction="none", backend="reference"),
        rewards, ranks, margin, dtype=[BF16, None, None], grad=[0])
    assert seen == [(BF16, torch.int64, F32, True, False)]
    assert [c.tensor for c in rep.checks] == ["output 0", "grad of input 0"]


# ------------------------------------------------------------------- it fails, and says why ---

@pytest.mark.parametrize("dtype", [F16, BF16])
def test_one_ulp_where_eager_is_exact_fails(dtype):
    """x·2 is exact in every dtype, so eager's error is 0 and the bound is atol alone (under half
    an ulp of 1.0 in fp16/bf16): one element one ulp off fails, element-wise, with its index."""
    x = torch.randn(4, 33, dtype=F64, device=DEVICE)
    x[2, 5] = 0.5                                    # 2x = 1.0: one ulp up is eps(dtype) relative
    exact = lambda a: a * 2                          # noqa: E731
    assert_matches_reference(exact, exact, x, dtype=dtype, elementwise=True)     # sanity: passes
    with pytest.raises(AssertionError) as e:
        assert_matches_reference(lambda a: _bump(a * 2, (2, 5)), exact, x, dtype=dtype, elementwise=True)
    msg = str(e.value)
    assert "output 0: worst element relative error" in msg and "index (2, 5)" in msg
    assert "eager's own error 0.000e+00" in msg and "eager exact" in msg
    eps = torch.finfo(dtype).eps
    assert f"{eps:.3e}" in msg, msg                  # the error is exactly one ulp of 1.0
    assert "grad of input 0" not in msg              # the gradient is right


def test_one_ulp_fp32_fails_with_atol_zero():
    """In fp32 the default atol (1e-5) is ~80 ulps; with atol=0 the rule is exact-or-eager."""
    x = torch.randn(64, dtype=F64, device=DEVICE)
    exact = lambda a: a * 2                          # noqa: E731
    bumped = lambda a: _bump(a * 2, (17,))           # noqa: E731
    assert_matches_reference(bumped, exact, x, dtype=F32, elementwise=True)      # within atol
    with pytest.raises(AssertionError, match=r"index \(17,\)"):
        assert_matches_reference(bumped, exact, x, dtype=F32, elementwise=True, atol=0.0)


def test_no_worse_than_eager_passes_where_eager_also_rounds():
    """Eager's own error sets the bound: x/3 in bf16 is off by up to half an ulp; a fused result
    computed in fp32 and rounded once is no worse and passes. One that truncates to bf16 instead
    of rounding to nearest (~1.6x eager's error norm-wise) fails over 4096 elements, where the
    norm-wise atol has shrunk to 5e-4 (over 64 elements it would be 4e-3 and let it through)."""
    x = torch.randn(4096, dtype=F64, device=DEVICE) + 3
    eager = lambda a: a / 3                          # noqa: E731
    assert_matches_reference(lambda a: (a.float() / 3).to(a.dtype), eager, x, dtype=BF16, elementwise=True)

    def truncating(a):                               # drop the low 16 bits of the fp32 quotient
        bits = (a.float() / 3).view(torch.int32) & ~0xFFFF
        return bits.view(torch.float32).to(a.dtype)
    with pytest.raises(AssertionError, match=r"output 0: relative error \(norm\) .* > bound .* atol 5.0e-04"):
        assert_matches_reference(truncating, eager, x, dtype=BF16, grad=False)
    assert compare_to_reference(truncating, eager, x[:64], dtype=BF16, grad=False).passed


def test_wrong_gradient_fails_naming_the_input():
    x = torch.randn(8, 5, dtype=F64, device=DEVICE)
    w = torch.randn(5, dtype=F64, device=DEVICE)
    ref = lambda a, b: (a * b).sum(-1)               # noqa: E731
    fused = lambda a, b: ref(_ScaledGrad.apply(a, (3, 1), 1.5), b)  # noqa: E731
    with pytest.raises(AssertionError) as e:
        assert_matches_reference(fused, ref, x, w, dtype=F32, input_names=["x", "w"])
    msg = str(e.value)
    assert "1 of 3 checks failed in float32" in msg
    assert "grad of input 0 (x): relative error (norm)" in msg and "index (3, 1)" in msg
    assert "eager's own error" in msg and "output 0" not in msg and "grad of input 1" not in msg
    # the forward alone is right
    assert_matches_reference(fused, ref, x, w, dtype=F32, grad=False)


def test_missing_gradient_fails():
    """A fused op that detaches its output where the reference is differentiable."""
    x = torch.randn(6, dtype=F64, device=DEVICE)
    with pytest.raises(AssertionError, match="grad of input 0"):
        assert_matches_reference(lambda a: a.detach() * 2 + 0 * a.sum().detach(), lambda a: a * 2,
                                 x, dtype=F32)


def test_nan_where_the_reference_is_finite_fails():
    x = torch.rand(3, 11, dtype=F64, device=DEVICE) + 0.5
    ref = lambda a: a.log()                          # noqa: E731

    def fused(a):
        out = a.log()
        return torch.where(torch.arange(11, device=a.device) == 4, torch.nan, out)
    with pytest.raises(AssertionError) as e:
        assert_matches_reference(fused, ref, x, dtype=F32, grad=False)
    msg = str(e.value)
    assert "output 0: non-finite values differ from the reference at index (0, 4)" in msg
    assert "fused nan" in msg


def test_nan_that_the_reference_has_passes():
    x = torch.rand(12, dtype=F64, device=DEVICE) - 0.5            # log of a negative: NaN
    assert_matches_reference(lambda a: a.log(), lambda a: a.log(), x, dtype=BF16, grad=False)


def test_mismatched_infinities_fail():
    x = torch.rand(10, dtype=F64, device=DEVICE)
    x[3] = 0.0                                       # log 0 = −inf
    ref = lambda a: a.log()                          # noqa: E731
    assert_matches_reference(ref, ref, x, dtype=F32, grad=False, elementwise=True)
    for wrong, what in ((lambda a: a.log().nan_to_num(neginf=-1e30), "fused -1e+30"),
                        (lambda a: a.log().abs().where(a == 0, a.log()), "fused inf"),
                        (lambda a: a.log().where(a != 0, torch.nan), "fused nan")):
        with pytest.raises(AssertionError) as e:
            assert_matches_reference(wrong, ref, x, dtype=F32, grad=False)
        msg = str(e.value)
        assert "non-finite values differ from the reference at index (3,)" in msg, msg
        assert what in msg and "reference -inf" in msg, msg


def test_an_overflow_of_the_dtype_is_an_infinity_both_sides_have():
    """exp(12) = 162755 overflows fp16: the truth rounded to fp16 is inf, so an inf passes and
    a finite fp16 value there would not."""
    x = torch.tensor([1.0, 12.0, -3.0], dtype=F64, device=DEVICE)
    assert_matches_reference(lambda a: a.exp(), lambda a: a.exp(), x, dtype=F16, grad=False)
    with pytest.raises(AssertionError, match="non-finite values differ"):
        assert_matches_reference(lambda a: a.exp().nan_to_num(posinf=65504.0), lambda a: a.exp(), x,
                                 dtype=F16, grad=False)


def test_shape_and_missing_outputs_fail():
    x = torch.randn(4, 3, dtype=F64, device=DEVICE)
    ref = lambda a: (a.sum(-1), a.amax(-1))          # noqa: E731
    with pytest.raises(AssertionError, match=r"output 1: shape \(4, 1\) differs from the reference's \(4,\)"):
        assert_matches_reference(lambda a: (a.sum(-1), a.amax(-1, keepdim=True)), ref, x, dtype=F32)
    with pytest.raises(AssertionError, match="output 1: the fused result has no value"):
        assert_matches_reference(lambda a: (a.sum(-1), None), ref, x, dtype=F32)
    with pytest.raises(AssertionError, match="returned 1 outputs, the reference 2"):
        assert_matches_reference(lambda a: a.sum(-1), ref, x, dtype=F32)


def test_named_tuple_outputs_are_named():
    x = torch.randn(2, 5, 40, dtype=F64, device=DEVICE)
    r = x + 0.1 * torch.randn_like(x)
    t = torch.randint(0, 40, (2, 5), device=DEVICE)
    ref = lambda a, b: ro.kl_penalty(a, b, t, beta=0.1, backend="reference")  # noqa: E731

    def fused(a, b):
        out = ref(a, b)
        return out._replace(kl=out.kl * (1 + 1e-3))
    with pytest.raises(AssertionError, match=r"output 3 \(kl\): relative error"):
        assert_matches_reference(fused, ref, x, r, dtype=F32, grad=[0])


# ----------------------------------------------------------------------------- the report ---

def test_report_numbers():
    """compare_to_reference returns the numbers without raising: errors, eager's errors, the
    bound = factor · eager + atol, the ratio, where the largest deviation is."""
    x = torch.randn(50, dtype=F64, device=DEVICE)
    eager = lambda a: a / 3                          # noqa: E731
    rep = compare_to_reference(lambda a: _bump(a / 3, (7,), 3), eager, x, dtype=BF16, grad=False,
                               elementwise=True, factor=1.5, atol=1e-6)
    assert not rep.passed and len(rep.failures) >= 1
    for c in rep.checks:
        assert c.bound == pytest.approx(1.5 * c.eager_err + 1e-6)
        assert c.ratio == pytest.approx(c.fused_err / c.eager_err)
        assert c.index == (7,)
    assert rep.worst_ratio == max(c.ratio for c in rep.checks)
    assert rep.max_rel_err == max(c.fused_err for c in rep.checks)
    # the defaults: factor 1.05, atol by the compared tensor's dtype (50 elements: no shrinking)
    rep = compare_to_reference(eager, eager, x, dtype=F16, grad=False)
    assert rep.passed and rep.checks[0].atol == TOLERANCE[F16] and rep.checks[0].ratio == 1.0
    # rounding_dtype: a fp32 output of a function that rounds through bf16 gets bf16's atol
    rep = compare_to_reference(lambda a: a.float() * 2, lambda a: a.float() * 2, x, dtype=BF16, grad=False,
                               rounding_dtype=BF16)
    assert rep.checks[0].atol == TOLERANCE[BF16]


def test_scale_judges_a_difference_on_its_operands():
    """p − q of nearly equal operands is exact in eager fp32 (Sterbenz); (p + 1) − (q + 1) rounds
    p + 1 first, an error of ulp(|p| + 1) that is huge relative to p − q but not relative to the
    operands. With the operands' size as ``scale`` it passes; judged on its own magnitude it fails."""
    p = torch.randn(40, dtype=F64, device=DEVICE) * 5
    q = p + 1e-4 * torch.randn(40, dtype=F64, device=DEVICE)
    ref = lambda a, b: a - b                         # noqa: E731
    fused = lambda a, b: (a + 1) - (b + 1)           # noqa: E731
    rep = compare_to_reference(fused, ref, p, q, dtype=F32, elementwise=True, scale=p.abs() + q.abs() + 1)
    assert rep.passed, rep.message()
    rep = compare_to_reference(fused, ref, p, q, dtype=F32, elementwise=True)
    assert [c.kind for c in rep.failures] == ["norm", "elementwise"]


def test_default_atol_shrinks_with_size_for_low_precision():
    assert default_atol(BF16, 1) == default_atol(BF16, 64) == TOLERANCE[BF16]
    assert default_atol(BF16, 64 * 1024) == pytest.approx(TOLERANCE[BF16] / 32)
    assert default_atol(F16, 256) == pytest.approx(TOLERANCE[F16] / 2)
    assert default_atol(BF16, 64 * 1024, "elementwise") == TOLERANCE[BF16]     # a max does not average
    assert default_atol(F32, 10**6) == TOLERANCE[F32] and default_atol(F64, 10**6) == TOLERANCE[F64]


def test_bad_arguments():
    x = torch.randn(3, dtype=F64)
    t = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(ValueError, match="grad names inputs"):
        compare_to_reference(lambda a, b: a, lambda a, b: a, x, t, grad=[1])
    with pytest.raises(ValueError, match="dtype has 1 entries for 2 inputs"):
        compare_to_reference(lambda a, b: a, lambda a, b: a, x, t, dtype=[F32])
    with pytest.raises(TypeError, match="returned dict"):
        compare_to_reference(lambda a: {"a": a}, lambda a: {"a": a}, x)
