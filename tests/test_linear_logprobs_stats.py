"""linear_token_logprobs(..., return_stats=True): is_top1 and mean_logit from the forward sweep.

Every backend against the definition written out here in float64 (argmax of the logits == the
token, first maximum on ties; mean over the vocabulary of logits / T): tokens [...] and [..., K],
bias, temperature, several row chunks, a tie at the maximum, ±1e4 and −inf logits, V > 65,536,
an empty batch, leading dims; the log-probs, entropy and gradients are those without the flag;
the statistics carry no gradient; low precision no worse than eager in the same dtype; refused
with vocabulary parallelism; torch.compile(fullgraph=True).
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

import rlhf_ops as ro

from _util import assert_matches
from conftest import DEVICE

layout_mod = importlib.import_module("rlhf_ops._layout")


def _direct(hidden, weight, bias, tokens, temperature):
    """(is_top1, mean_logit) in float64, without reference.py."""
    y = F.linear(hidden.double(), weight.double(), None if bias is None else bias.double())
    top = y.argmax(-1)
    top1 = (top[..., None] == tokens) if tokens.dim() == hidden.dim() else (top == tokens)
    return top1, (y / temperature).mean(-1)


def _inputs(shape, d, V, multi=False, bias=True, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, d, generator=g, dtype=torch.float64)
    w = torch.randn(V, d, generator=g, dtype=torch.float64)
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    tok = torch.randint(0, V, (*shape, 2) if multi else shape, generator=g)
    with torch.no_grad():                   # half the tokens are the row's argmax: both outcomes
        top = F.linear(h, w, b).argmax(-1)
        if multi:
            tok[..., 0] = top
        else:
            tok.view(-1)[::2] = top.view(-1)[::2]
    cast = lambda x: None if x is None else x.to(device=DEVICE, dtype=dtype)   # noqa: E731
    return cast(h), cast(w), cast(b), tok.to(DEVICE)


@pytest.mark.parametrize("multi", [False, True], ids=["tokens", "tokens_k"])
def test_matches_definition_fp64(backend, monkeypatch, multi):
    """Two leading dims, row chunks of 4 rows (several per call), T = 0.7; the other outputs and
    the gradients are those of the call without the flag."""
    monkeypatch.setattr(layout_mod, "block_len", lambda n_other, itemsize, total: min(total, 4))
    h, w, b, tok = _inputs((3, 5), 16, 37, multi=multi)
    top1_want, mean_want = _direct(h, w, b, tok, 0.7)
    for p in (h, w, b):
        p.requires_grad_()
    lp, ent, top1, mean = ro.linear_token_logprobs(h, w, tok, bias=b, temperature=0.7,
                                                   return_entropy=True, return_stats=True, backend=backend)
    assert top1.dtype == torch.bool and top1.shape == tok.shape and mean.shape == h.shape[:-1]
    assert torch.equal(top1, top1_want) and top1.any() and not top1.all()
    assert_matches(mean, mean_want, tol=1e-12, what="mean_logit")
    assert not top1.requires_grad and not mean.requires_grad
    lp0, ent0 = ro.linear_token_logprobs(h, w, tok, bias=b, temperature=0.7, return_entropy=True,
                                         backend=backend)
    assert torch.equal(lp, lp0) and torch.equal(ent, ent0)
    g = torch.autograd.grad((lp.sum() + ent.sum()), (h, w, b))
    g0 = torch.autograd.grad((lp0.sum() + ent0.sum()), (h, w, b))
    for a, c in zip(g, g0):
        assert torch.equal(a, c)


def test_edge_cases(backend):
    """A tie at the maximum (the first index wins, as argmax), logits of ±1e4 and −inf (the
    mean is −inf where a logit is), a single row, an empty batch."""
    h, w, b, tok = _inputs((6,), 8, 19)
    w[7], b[7] = w[3], b[3]                     # tokens 3 and 7: the same logit in every row
    b[3] = b[7] = 1e4                           # ... and the largest
    b[11] = -1e4
    tok[:2], tok[2:4] = 3, 7                    # first maximum: top-1; tied but later: not
    _, top1, mean = ro.linear_token_logprobs(h, w, tok, bias=b, return_stats=True, backend=backend)
    top1_want, mean_want = _direct(h, w, b, tok, 1.0)
    assert top1[:2].all() and not top1[2:4].any() and torch.equal(top1, top1_want)
    assert_matches(mean, mean_want, tol=1e-12, what="mean ±1e4")
    b_inf = b.clone()
    b_inf[5] = float("-inf")
    _, _, mean = ro.linear_token_logprobs(h, w, tok, bias=b_inf, return_stats=True, backend=backend)
    assert torch.equal(mean, torch.full_like(mean, float("-inf")))
    _, top1, mean = ro.linear_token_logprobs(h[:1], w, tok[:1], bias=b, return_stats=True, backend=backend)
    assert top1.shape == (1,) and torch.equal(top1, top1_want[:1])
    _, top1, mean = ro.linear_token_logprobs(h[:0], w, tok[:0], bias=b, return_stats=True, backend=backend)
    assert top1.shape == mean.shape == (0,)


def test_wide_vocabulary(backend):
    """V = 70,001 (> 65,536: the kernels split rows), two rows."""
    h, w, b, tok = _inputs((2,), 4, 70_001, bias=False)
    _, top1, mean = ro.linear_token_logprobs(h, w, tok, return_stats=True, backend=backend)
    top1_want, mean_want = _direct(h, w, None, tok, 1.0)
    assert torch.equal(top1, top1_want)
    assert_matches(mean, mean_want, tol=1e-12, what="mean, V = 70,001")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_low_precision_like_eager(backend, dtype):
    """mean_logit no worse than eager's mean of the logits in the same dtype (vs fp64)."""
    h, w, b, tok = _inputs((40,), 32, 301, dtype=dtype)
    _, _, mean = ro.linear_token_logprobs(h, w, tok, bias=b, temperature=0.9, return_stats=True,
                                       backend=backend)
    _, want = _direct(h, w, b, tok, 0.9)
    eager = (F.linear(h, w, b).float() / 0.9).mean(-1)
    assert_matches(mean, want, eager, tol=1e-6, what=f"mean_logit {dtype}")


def test_compile_fullgraph(backend):
    h, w, b, tok = _inputs((7,), 8, 23)
    fn = torch.compile(lambda h, w, b, t: ro.linear_token_logprobs(h, w, t, bias=b, return_stats=True,
                                                                   backend=backend),
                       fullgraph=True, backend="aot_eager")
    lp, top1, mean = fn(h, w, b, tok)
    lp0, top10, mean0 = ro.linear_token_logprobs(h, w, tok, bias=b, return_stats=True, backend=backend)
    assert torch.equal(top1, top10) and torch.equal(mean, mean0) and torch.equal(lp, lp0)


def test_bad_use_raises():
    h, w, b, tok = _inputs((3,), 4, 9)
    with pytest.raises(TypeError, match="return_stats must be a bool"):
        ro.linear_token_logprobs(h, w, tok, return_stats=1)
