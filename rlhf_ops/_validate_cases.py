"""The case table of ``python -m rlhf_ops.validate``: which ops, on which inputs.

Adding an op is one ``Op(...)`` entry in ``OPS``: the op's name in ``rlhf_ops``, how its
positional tensors are passed (``call``), and a few ``Case``s, each a builder of float64 inputs
(the runner rounds them to every dtype) with the op's keyword options. An entry whose op this
rlhf_ops does not have is left out of the run (``Op.function()`` is None), so entries may
precede the op; likewise a case whose options the op does not take yet. Ops with a ``backend=``
argument are checked on every fused backend against their ``reference`` backend; ops without one
against their definition in ``rlhf_ops.reference`` (an op with neither has nothing to be compared
with and is listed as such).

Every builder takes ``(gen, big)``: a seeded generator and whether GPU-sized shapes are wanted
(CPU shapes are tiny: the Triton interpreter runs each program in Python). The matrix covers odd
sizes, vocabularies past 65,536, ignored rows, ±1e4 and −inf logits, GQA/MQA, rows without keys
and empty sequences; ``quick=True`` marks the cases of ``--quick``.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

F64 = torch.float64


@dataclass
class Inputs:
    """What one case passes to the op: ``args`` positionally (floating-point tensors in float64,
    rounded to the run's dtype by the runner unless listed in ``keep``; index tensors and Python
    values as they are), the inputs whose gradients are compared (``grad``) and the outputs judged
    element-wise with their per-element rounding scale (``elementwise``: index → scale)."""
    args: tuple
    grad: tuple = (0,)
    keep: tuple = ()
    elementwise: dict = field(default_factory=dict)
    names: tuple = ()


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable          # (gen: torch.Generator, big: bool) -> Inputs; big = GPU-sized shapes
    options: dict = field(default_factory=dict)   # keyword options of the op
    quick: bool = False      # part of --quick


@dataclass(frozen=True)
class Op:
    name: str                # attribute of rlhf_ops
    call: Callable           # (op function, *args, **options) -> result
    cases: tuple
    rounds_in_dtype: bool = False  # it rounds an intermediate to the input dtype (the linear
    #                                heads' logits, as eager does): that dtype's atol applies

    def function(self):
        import rlhf_ops
        return getattr(rlhf_ops, self.name, None)

    def has_backend_arg(self) -> bool:
        return "backend" in inspect.signature(self.function()).parameters


# --- input makers (float64 on the CPU; the runner moves them to the device) ---

def _randn(gen, *shape, scale=1.0):
    return torch.randn(shape, generator=gen, dtype=F64) * scale


def _randint(gen, high, *shape):
    return torch.randint(0, high, shape, generator=gen)


def _size(big: bool, cpu: int, gpu: int) -> int:
    return gpu if big else cpu


def row_scale(x: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per row of [..., V]: 1 + max |finite x| / T, the size of the operands a row's result is
    computed from (its rounding scale), as tests/test_properties.py uses."""
    a = torch.where(torch.isfinite(x), x.abs(), torch.zeros((), dtype=x.dtype))
    return 1.0 + (a.amax(-1) if x.shape[-1] else a.sum(-1)) / temperature


def _extreme_logits(gen, N, V):
    """N ≥ 4 rows of randn·2 but: row 0 scaled to ~±1e4, row 1 half −1e4, row 2 −inf past its
    first 5 entries, row 3 −inf at every other entry."""
    x = _randn(gen, N, V, scale=2.0)
    x[0] *= 1e4 / 2
    x[1, : V // 2] = -1e4
    x[2, 5:] = -math.inf
    x[3, 1::2] = -math.inf
    return x


def _targets(gen, V, shape, p_ignore=0.0, ignore_index=-100):
    t = _randint(gen, V, *shape)
    if p_ignore:
        t = torch.where(torch.rand(shape, generator=gen) < p_ignore, torch.full_like(t, ignore_index), t)
    return t


def _finite_targets(x, t):
    """Targets moved onto a finite logit of their row (a −inf target logit is an infinite loss)."""
    ok = torch.isfinite(x.gather(-1, t.clamp(min=0)[..., None]).squeeze(-1)) | (t < 0)
    first = torch.isfinite(x).to(torch.int8).argmax(-1)
    return torch.where(ok, t, first)


# cross_entropy(logits, target)
def _ce_odd(gen, big):
    N, V = _size(big, 13, 257), _size(big, 257, 32003)
    return Inputs((_randn(gen, N, V, scale=3.0), _targets(gen, V, (N,), 1 / 3)), names=("logits", "target"))


def _ce_none(x, t):
    return Inputs((x, t), elementwise={0: row_scale(x)}, names=("logits", "target"))


def _ce_big_vocab(gen, big):
    N = _size(big, 2, 67)
    return _ce_none(_randn(gen, N, 70001, scale=3.0), _targets(gen, 70001, (N,)))


def _ce_extreme(gen, big):
    N, V = _size(big, 6, 64), _size(big, 300, 4099)
    x = _extreme_logits(gen, N, V)
    return _ce_none(x, _finite_targets(x, _targets(gen, V, (N,))))


def _ce_all_ignored(gen, big):
    return Inputs((_randn(gen, 5, 100), torch.full((5,), -100)), names=("logits", "target"))


def _ce_3d(gen, big):
    B, T, V = 2, _size(big, 7, 129), _size(big, 129, 4096)
    return Inputs((_randn(gen, B, T, V), _targets(gen, V, (B, T), 0.3, ignore_index=0)),
                  names=("logits", "target"))


def _ce_empty(gen, big):
    return _ce_none(_randn(gen, 0, 33), _targets(gen, 33, (0,)))


# linear_cross_entropy(hidden, weight, target, bias)
def _linear_args(gen, big, N, d, V, bias=True):
    h = _randn(gen, N, d, scale=d ** -0.5 * 2)
    w = _randn(gen, V, d)
    b = _randn(gen, V) if bias else None
    return h, w, b


def _lce_odd(gen, big):
    N, d, V = _size(big, 13, 515), _size(big, 24, 256), _size(big, 257, 32003)
    h, w, b = _linear_args(gen, big, N, d, V)
    return Inputs((h, w, _targets(gen, V, (N,), 1 / 3), b), grad=(0, 1, 3),
                  names=("hidden", "weight", "target", "bias"))


def _lce_big_vocab(gen, big):
    N, d = _size(big, 2, 64), _size(big, 16, 128)
    h, w, _ = _linear_args(gen, big, N, d, 70001, bias=False)
    return Inputs((h, w, _targets(gen, 70001, (N,)), None), grad=(0, 1),
                  names=("hidden", "weight", "target", "bias"))


def _lce_masked_vocab(gen, big):
    N, d, V = _size(big, 9, 256), _size(big, 16, 128), _size(big, 300, 4099)
    h, w, b = _linear_args(gen, big, N, d, V)
    b[::3] = -math.inf                                   # a masked vocabulary: −inf bias entries
    t = 1 + 3 * _randint(gen, (V - 2) // 3 + 1, N)       # targets on unmasked entries
    return Inputs((h, w, t, b), grad=(0, 1), names=("hidden", "weight", "target", "bias"))


# token_logprobs(logits, tokens) -> logprobs (, entropy)
def _tl(x, t, temperature=1.0, k=False):
    s = row_scale(x, temperature)
    return Inputs((x, t), elementwise={0: s[..., None] if k else s, 1: s}, names=("logits", "tokens"))


def _tl_odd(gen, big):
    B, T, V = 3, _size(big, 5, 129), _size(big, 257, 4099)
    return _tl(_randn(gen, B, T, V, scale=3.0), _randint(gen, V, B, T), 0.7)


def _tl_k(gen, big):
    N, V = _size(big, 7, 257), _size(big, 1000, 32003)
    return _tl(_randn(gen, N, V, scale=3.0), _randint(gen, V, N, 3), k=True)


def _tl_big_vocab(gen, big):
    N = _size(big, 2, 64)
    return _tl(_randn(gen, N, 70001, scale=3.0), _randint(gen, 70001, N))


def _tl_extreme(gen, big):
    N, V = _size(big, 6, 64), _size(big, 300, 4099)
    x = _extreme_logits(gen, N, V)
    return _tl(x, _finite_targets(x, _randint(gen, V, N)))


def _tl_single(gen, big):
    return _tl(_randn(gen, 1, 17), _randint(gen, 17, 1))


# linear_token_logprobs(hidden, weight, tokens, bias)
def _ltl_odd(gen, big):
    N, d, V = _size(big, 13, 515), _size(big, 24, 256), _size(big, 257, 32003)
    h, w, b = _linear_args(gen, big, N, d, V)
    return Inputs((h, w, _randint(gen, V, N), b), grad=(0, 1, 3), names=("hidden", "weight", "tokens", "bias"))


def _ltl_big_vocab(gen, big):
    N, d = _size(big, 2, 64), _size(big, 16, 128)
    h, w, _ = _linear_args(gen, big, N, d, 70001, bias=False)
    return Inputs((h, w, _randint(gen, 70001, N, 2), None), grad=(0, 1),
                  names=("hidden", "weight", "tokens", "bias"))


# kl_penalty(logits, ref_logits, tokens, mask)
def _kl(gen, x, r, mask, temperature=1.0):
    t = _finite_targets(x, _randint(gen, x.shape[-1], *x.shape[:-1]))
    s = row_scale(x, temperature) + row_scale(r, temperature)
    return Inputs((x, r, t, mask), keep=(3,), elementwise={i: s for i in range(6)},
                  names=("logits", "ref_logits", "tokens", "mask"))


def _kl_near(gen, big):
    B, T, V = 2, _size(big, 7, 129), _size(big, 257, 4099)
    x = _randn(gen, B, T, V, scale=3.0)
    return _kl(gen, x, x + 1e-3 * _randn(gen, B, T, V), torch.rand(B, T, generator=gen))


def _kl_extreme(gen, big):
    N = _size(big, 4, 64)
    x = _extreme_logits(gen, N, 70001)
    r = torch.where(torch.isfinite(x), x + _randn(gen, N, 70001), x)
    return _kl(gen, x, r, (torch.rand(N, generator=gen) < 0.7), temperature=0.7)


# kl_from_logprobs(logprobs, ref_logprobs, mask)
def _klp(gen, big, spread, mask):
    B, T = 3, _size(big, 37, 1031)
    lp = -_randn(gen, B, T).abs() * 3
    rlp = lp + _randn(gen, B, T) * spread
    s = lp.abs() + rlp.abs() + 1.0
    return Inputs((lp, rlp, mask(B, T)), keep=(2,), elementwise={i: s for i in range(5)},
                  names=("logprobs", "ref_logprobs", "mask"))


# pairwise_reward_loss(rewards, ranks, margin)
def _ranks(gen, B, K, n_ranks, p_absent):
    r = _randint(gen, n_ranks, B, K)
    return torch.where(torch.rand(B, K, generator=gen) < p_absent, torch.full_like(r, -1), r)


def _rw_ties(gen, big):
    B = _size(big, 5, 257)
    return Inputs((_randn(gen, B, 9, scale=2.0), _ranks(gen, B, 9, 4, 0.2), 0.0), names=("rewards", "ranks"))


def _rw_tiled(gen, big):
    B = _size(big, 3, 65)
    x = _randn(gen, B, 65, scale=2.0)
    return Inputs((x, _ranks(gen, B, 65, 65, 0.1), torch.rand(B, generator=gen) * 3 - 1),
                  keep=(2,), elementwise={0: row_scale(x)}, names=("rewards", "ranks", "margin"))


def _rw_big(gen, big):
    B = _size(big, 4, 64)
    x = _randn(gen, B, 4, scale=1e4)
    return Inputs((x, _ranks(gen, B, 4, 4, 0.0), 0.0), elementwise={0: row_scale(x)}, names=("rewards", "ranks"))


# attention(q, k, v); head dim 64 so that every backend (cuda: 64/128) runs it
def _qkv(gen, q_shape, kv_shape, scale=1.0):
    return (_randn(gen, *q_shape, scale=scale), _randn(gen, *kv_shape, scale=scale),
            _randn(gen, *kv_shape))


def _att(gen, B, Hq, Hkv, T, S, D=64, scale=1.0):
    return Inputs(_qkv(gen, (B, Hq, T, D), (B, Hkv, S, D), scale), grad=(0, 1, 2), names=("q", "k", "v"))


def _att_gqa(gen, big):
    T = _size(big, 33, 257)
    return _att(gen, 2, _size(big, 4, 8), 2, T, T)


def _att_no_keys(gen, big):      # causal, T > S: the first T − S queries see no key (zeros, zero grads)
    return _att(gen, 1, 2, 1, _size(big, 20, 300), _size(big, 9, 131))


def _att_cross(gen, big):
    return _att(gen, 2, 2, 2, _size(big, 17, 129), _size(big, 40, 515))


def _att_mqa_big(gen, big):
    T = _size(big, 24, 256)
    return _att(gen, 1, 4, 1, T, T, scale=4.0)


def _att_window(gen, big):
    T = _size(big, 40, 300)
    return _att(gen, 1, 2, 2, T, T)


# attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
def _cu(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)


def _varlen(gen, lens_q, lens_k, Hq=4, Hkv=2, D=64):
    q, k, v = _qkv(gen, (sum(lens_q), Hq, D), (sum(lens_k), Hkv, D))
    return Inputs((q, k, v, _cu(lens_q), _cu(lens_k), max(lens_q), max(lens_k)), grad=(0, 1, 2),
                  names=("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k"))


def _varlen_packed(gen, big):    # an empty sequence among them
    lens = [17, 0, 33, 5] if not big else [257, 0, 1000, 31]
    return _varlen(gen, lens, lens)


def _varlen_no_keys(gen, big):   # per sequence T ≠ S; T > S leaves queries without keys
    return _varlen(gen, [20, 5, 1], [9, 24, 0], Hq=2, Hkv=1) if not big else \
        _varlen(gen, [300, 50, 7], [131, 400, 0], Hq=2, Hkv=1)


# attention_tree(q, k, v, cu_seqlens, parent, max_seqlen): a prompt (root) and its completions
def _tree(gen, big):
    lens = [9, 5, 0, 7] if not big else [200, 57, 0, 130]
    q, k, v = _qkv(gen, (sum(lens), 4, 64), (sum(lens), 2, 64))
    parent = torch.tensor([-1, 0, 0, 0], dtype=torch.int32)
    return Inputs((q, k, v, _cu(lens), parent, lens[0] + max(lens[1:])), grad=(0, 1, 2),
                  names=("q", "k", "v", "cu_seqlens", "parent"))


def _tree_chain(gen, big):      # multi-turn: prompt → answer → user turn → two answers (one empty); a branch
    lens = [11, 6, 5, 7, 0, 3, 5] if not big else [300, 120, 65, 200, 0, 97, 150]
    parent = [-1, 0, 1, 2, 2, 0, 5]
    total = [0] * len(lens)
    for s, p in enumerate(parent):
        total[s] = lens[s] + (total[p] if p >= 0 else 0)
    q, k, v = _qkv(gen, (sum(lens), 4, 64), (sum(lens), 1, 64))
    return Inputs((q, k, v, _cu(lens), torch.tensor(parent, dtype=torch.int32), max(total)), grad=(0, 1, 2),
                  names=("q", "k", "v", "cu_seqlens", "parent"))


# gae(rewards, values, mask) -> (advantages, returns): forward only (a return, not a loss)
def _gae_dense(gen, big):
    B, T = 3, _size(big, 37, 2049)
    mask = torch.rand(B, T, generator=gen) < 0.8      # several runs per sequence (multi-turn)
    mask[2] = False
    return Inputs((_randn(gen, B, T), _randn(gen, B, T), mask), grad=(), names=("rewards", "values", "mask"))


# policy_loss(logprobs, old_logprobs, advantages, mask) -> PolicyLoss
def _policy(gen, big):
    B, T = 4, _size(big, 19, 1031)
    lp = -_randn(gen, B, T).abs()
    old = lp + 0.3 * _randn(gen, B, T)
    return Inputs((lp, old, _randn(gen, B), torch.rand(B, T, generator=gen) < 0.8), keep=(1, 2),
                  names=("logprobs", "old_logprobs", "advantages", "mask"))


# preference_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
def _pref(gen, big):
    B = _size(big, 9, 257)
    c, r = -_randn(gen, B).abs() * 30, -_randn(gen, B).abs() * 30
    return Inputs((c, r, c + _randn(gen, B), r + _randn(gen, B)), grad=(0, 1), keep=(2, 3),
                  names=("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps"))


def _linear_call(fn, h, w, t, b, **o):
    return fn(h, w, t, bias=b, **o)


def _kl_call(fn, x, r, t, m, **o):
    return fn(x, r, t, mask=m, **o)


def _klp_call(fn, lp, rlp, m, **o):
    return fn(lp, rlp, mask=m, **o)


def _rw_call(fn, x, ranks, margin, **o):
    return fn(x, ranks, margin=margin, **o)


def _plain_call(fn, *a, **o):
    return fn(*a, **o)


OPS = (
    Op("cross_entropy", _plain_call, (
        Case("odd sizes, 1/3 rows ignored, mean", _ce_odd, quick=True),
        Case("V = 70,001 (> 65,536), label smoothing 0.1", _ce_big_vocab,
             dict(reduction="none", label_smoothing=0.1), quick=True),
        Case("±1e4 and −inf logits", _ce_extreme, dict(reduction="none"), quick=True),
        Case("every row ignored, mean (0, zero gradient)", _ce_all_ignored),
        Case("[B, T, V], ignore_index 0, sum", _ce_3d, dict(ignore_index=0, reduction="sum")),
        Case("empty batch", _ce_empty, dict(reduction="none")),
        Case("logit softcap 30, label smoothing 0.1", _ce_extreme,
             dict(reduction="none", softcap=30.0, label_smoothing=0.1), quick=True),
    )),
    Op("linear_cross_entropy", _linear_call, (
        Case("odd sizes, bias, 1/3 rows ignored, mean", _lce_odd, quick=True),
        Case("V = 70,001, no bias", _lce_big_vocab, dict(reduction="none"), quick=True),
        Case("−inf bias entries (masked vocabulary), sum", _lce_masked_vocab,
             dict(reduction="sum")),
        Case("logit softcap 30", _lce_odd, dict(softcap=30.0), quick=True),
    ), rounds_in_dtype=True),
    Op("token_logprobs", _plain_call, (
        Case("[B, T, V] odd sizes, temperature 0.7, entropy", _tl_odd,
             dict(temperature=0.7, return_entropy=True), quick=True),
        Case("K = 3 tokens per position, entropy", _tl_k, dict(return_entropy=True), quick=True),
        Case("V = 70,001, entropy", _tl_big_vocab, dict(return_entropy=True), quick=True),
        Case("±1e4 and −inf logits, entropy", _tl_extreme, dict(return_entropy=True), quick=True),
        Case("single row", _tl_single),
        Case("logit softcap 30, ±1e4 and −inf logits, entropy", _tl_extreme,
             dict(softcap=30.0, return_entropy=True), quick=True),
    )),
    Op("linear_token_logprobs", _linear_call, (
        Case("odd sizes, bias, temperature 0.7, entropy", _ltl_odd,
             dict(temperature=0.7, return_entropy=True), quick=True),
        Case("V = 70,001, K = 2 tokens, no bias", _ltl_big_vocab, dict(return_entropy=True), quick=True),
        Case("logit softcap 30, entropy", _ltl_odd, dict(softcap=30.0, return_entropy=True), quick=True),
    ), rounds_in_dtype=True),
    Op("kl_penalty", _kl_call, (
        Case("k3, reference near the policy, float mask", _kl_near, dict(beta=0.1, estimator="k3"), quick=True),
        Case("k2, V = 70,001, ±1e4 and −inf logits, bool mask", _kl_extreme,
             dict(beta=0.05, estimator="k2", temperature=0.7), quick=True),
    )),
    Op("kl_from_logprobs", _klp_call, (
        Case("k3, |log ratio| ~ 1e-3, bool mask", lambda g, b: _klp(
            g, b, 1e-3, lambda B, T: torch.rand(B, T, generator=g) < 0.7), dict(beta=0.1, estimator="k3"),
            quick=True),
        Case("k2, no mask", lambda g, b: _klp(g, b, 1.0, lambda B, T: None), dict(beta=0.05, estimator="k2")),
    )),
    Op("pairwise_reward_loss", _rw_call, (
        Case("K = 9, tied ranks, absent responses, mean", _rw_ties, quick=True),
        Case("K = 65 (tiled), margin per prompt", _rw_tiled, dict(reduction="none"), quick=True),
        Case("rewards of ±1e4", _rw_big, dict(reduction="none")),
    )),
    Op("attention", _plain_call, (
        Case("causal, GQA 2:1 heads, odd T = S", _att_gqa, dict(causal=True), quick=True),
        Case("causal, T > S: rows without keys", _att_no_keys, dict(causal=True), quick=True),
        Case("not causal, T < S", _att_cross, dict(causal=False)),
        Case("MQA, scores ×16", _att_mqa_big, dict(causal=True)),
        Case("sliding window (16, 0), softcap 30", _att_window, dict(causal=True, window=(16, 0), softcap=30.0)),
    )),
    Op("attention_varlen", _plain_call, (
        Case("4 sequences, one empty, GQA, causal", _varlen_packed, dict(causal=True), quick=True),
        Case("T ≠ S per sequence: rows without keys", _varlen_no_keys, dict(causal=True)),
    )),
    Op("attention_tree", _plain_call, (
        Case("a prompt and 3 completions (one empty), GQA", _tree, quick=True),
        Case("depth 3: turns with branches, an empty one, MQA, softcap 30", _tree_chain, dict(softcap=30.0)),
    )),
    Op("gae", _plain_call, (
        Case("[B, T], masks with gaps, a fully masked row", _gae_dense, dict(gamma=0.99, lam=0.95), quick=True),
    )),
    Op("policy_loss", _plain_call, (
        Case("ppo, dual clip 3, mask", _policy, dict(loss_type="ppo", dual_clip=3.0), quick=True),
        Case("grpo, mask", _policy, dict(loss_type="grpo")),
    )),
    Op("preference_loss", _plain_call, (
        Case("sigmoid (DPO), label smoothing 0.1", _pref, dict(loss_type="sigmoid", label_smoothing=0.1),
             quick=True),
        Case("ipo", _pref, dict(loss_type="ipo")),
    )),
)
