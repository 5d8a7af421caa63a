"""``torch.library.opcheck`` on every custom op of the ``rlhf_ops`` namespace, for every fused
backend that runs on this machine's tensors (conftest's DEVICE: the Triton interpreter on CPU;
triton and cuda on a GPU, where bench/gpu_check.sh runs this file on CUDA tensors).

opcheck runs each op's schema check (declared mutation and aliasing), the fake (meta) impl
against the real one, the autograd registration, and AOT dispatch with dynamic shapes — what
``torch.compile`` relies on. The ``reference`` backend has no custom ops.

The list of ops is read from the dispatcher, not written here: every op registered under
``rlhf_ops::`` must have samples in ``SAMPLES`` (``test_every_op_has_samples`` fails otherwise),
so an op added later joins the check or fails CI. Samples are named arguments; arguments the
sample does not name take the schema's default (an op that gains a defaulted option keeps its
samples). Shapes are tiny: opcheck runs each op about ten times and the interpreter is slow.
"""
import importlib
import pkgutil

import pytest
import torch
from torch.library import opcheck

import rlhf_ops
from conftest import DEVICE, backend_problem

NAMESPACE = "rlhf_ops"
FUSED = ("triton", "cuda")


def namespace_ops() -> list[str]:
    """Every op registered under ``rlhf_ops::`` (overload names dropped), after importing every
    module of the package that defines ops (the training loop and integrations define none)."""
    for m in pkgutil.iter_modules(rlhf_ops.__path__):
        if not m.ispkg:
            importlib.import_module(f"rlhf_ops.{m.name}")
    names = set()
    for full in torch._C._dispatch_get_all_op_names():
        ns, _, rest = full.partition("::")
        if ns == NAMESPACE:
            names.add(rest.split(".")[0])
    return sorted(names)


OPS = namespace_ops()


# ------------------------------------------------------------------------------- samples ---
# Each sampler(backend, device) → list of dicts {argument name: value}. Inputs are small and
# of the dtypes each backend accepts (the cuda backend's attention: fp16/bf16, head dim 64).

def _f(*shape, dtype=torch.float32, device="cpu", grad=True, scale=1.0):
    return (torch.randn(*shape, dtype=dtype, device=device) * scale).requires_grad_(grad)


def _ce_fwd(be, dev):
    x = _f(3, 17, device=dev)
    t = torch.tensor([1, -100, 16], device=dev)
    return [dict(logits=x, target=t, ignore_index=-100, label_smoothing=0.0, inplace_backward=False,
                 backend=be),
            dict(logits=_f(2, 17, device=dev, dtype=torch.float64), target=t[:2], ignore_index=-100,
                 label_smoothing=0.25, inplace_backward=True, backend=be, softcap=1.5)]


def _ce_bwd_args(be, dev, softcap=0.0):
    x = torch.randn(3, 17, device=dev)
    t = torch.tensor([1, -100, 16], device=dev)
    _, lse = torch.ops.rlhf_ops.cross_entropy_fwd(x, t, -100, 0.1, False, be, softcap)
    return dict(grad_loss=torch.randn(3, device=dev), logits=x, target=t, lse=lse, ignore_index=-100,
                label_smoothing=0.1, backend=be, softcap=softcap)


def _ce_bwd(be, dev):
    return [_ce_bwd_args(be, dev), _ce_bwd_args(be, dev, softcap=1.5)]


def _lce_fwd(be, dev):
    t = torch.tensor([0, 18, -100], device=dev)
    return [dict(hidden=_f(3, 8, device=dev), weight=_f(19, 8, device=dev), bias=None, target=t,
                 ignore_index=-100, label_smoothing=0.0, backend=be),
            dict(hidden=_f(3, 8, device=dev), weight=_f(19, 8, device=dev), bias=_f(19, device=dev),
                 target=t, ignore_index=-100, label_smoothing=0.1, backend=be, softcap=1.5)]


def _lce_bwd(be, dev):
    out = []
    for bias, cap in ((None, 0.0), (torch.randn(19, device=dev), 1.5)):
        h, w = torch.randn(3, 8, device=dev), torch.randn(19, 8, device=dev)
        t = torch.tensor([0, 18, -100], device=dev)
        _, lse = torch.ops.rlhf_ops.linear_cross_entropy_fwd(h, w, bias, t, -100, 0.0, be, cap)
        out.append(dict(grad_loss=torch.randn(3, device=dev), hidden=h, weight=w, bias=bias, target=t,
                        lse=lse, ignore_index=-100, label_smoothing=0.0, backend=be, softcap=cap))
    return out


def _attn_shape(be):
    # B, Hq, Hkv, T, S, D, dtype: GQA, T != S (bottom-right causal), T not a block multiple
    if be == "cuda":
        return 1, 2, 1, 5, 7, 64, torch.float16
    return 1, 2, 1, 5, 7, 16, torch.float32


def _attn_masks(be, n=2):
    """(causal, left, right, softcap) as the public op passes them (causal folded into right = 0):
    causal with a window and a softcap where the backend takes them (cuda does not), and
    non-causal. opcheck checks the registration, not the kernels' masks: two samples suffice."""
    first = (True, -1, 0, 0.0) if be == "cuda" else (True, 2, 0, 5.0)
    return [first, (False, -1, -1, 0.0)][:n]


def _attn_fwd(be, dev):
    B, Hq, Hkv, T, S, D, dt = _attn_shape(be)
    return [dict(q=_f(B, Hq, T, D, dtype=dt, device=dev), k=_f(B, Hkv, S, D, dtype=dt, device=dev),
                 v=_f(B, Hkv, S, D, dtype=dt, device=dev), causal=c, scale=0.25, left=l, right=r,
                 softcap=cap, backend=be)
            for c, l, r, cap in _attn_masks(be)]


def _attn_bwd(be, dev):
    B, Hq, Hkv, T, S, D, dt = _attn_shape(be)
    out = []
    for c, l, r, cap in _attn_masks(be, 1):
        q, k, v = (torch.randn(B, h, n, D, dtype=dt, device=dev) for h, n in ((Hq, T), (Hkv, S), (Hkv, S)))
        o, lse = torch.ops.rlhf_ops.attention_fwd(q, k, v, c, 0.25, l, r, cap, be)
        out.append(dict(dout=torch.randn_like(o), q=q, k=k, v=v, out=o, lse=lse, causal=c, scale=0.25,
                        left=l, right=r, softcap=cap, backend=be))
    return out


def _varlen_inputs(be, dev, grad):
    # three sequences, the middle one empty; q and k lengths differ (bottom-right causal per sequence)
    _, Hq, Hkv, _, _, D, dt = _attn_shape(be)
    cu_q = torch.tensor([0, 3, 3, 8], dtype=torch.int32, device=dev)
    cu_k = torch.tensor([0, 4, 4, 10], dtype=torch.int32, device=dev)
    q = _f(8, Hq, D, dtype=dt, device=dev, grad=grad)
    k, v = (_f(10, Hkv, D, dtype=dt, device=dev, grad=grad) for _ in range(2))
    return q, k, v, cu_q, cu_k, 5, 6


def _varlen_fwd(be, dev):
    out = []
    for c, l, r, cap in _attn_masks(be):
        q, k, v, cu_q, cu_k, mq, mk = _varlen_inputs(be, dev, True)
        out.append(dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=mq,
                        max_seqlen_k=mk, causal=c, scale=0.25, left=l, right=r, softcap=cap, backend=be))
    return out


def _varlen_bwd(be, dev):
    out = []
    for c, l, r, cap in _attn_masks(be, 1):
        q, k, v, cu_q, cu_k, mq, mk = _varlen_inputs(be, dev, False)
        o, lse = torch.ops.rlhf_ops.attention_varlen_fwd(q, k, v, cu_q, cu_k, mq, mk, c, 0.25, l, r, cap, be)
        out.append(dict(dout=torch.randn_like(o), q=q, k=k, v=v, out=o, lse=lse, cu_seqlens_q=cu_q,
                        cu_seqlens_k=cu_k, max_seqlen_q=mq, max_seqlen_k=mk, causal=c, scale=0.25,
                        left=l, right=r, softcap=cap, backend=be))
    return out


def _tree_inputs(be, dev, grad):
    # a prompt with two completions (one empty) and a grandchild: ancestors walked, descendants' range
    _, Hq, Hkv, _, _, D, dt = _attn_shape(be)
    cu = torch.tensor([0, 4, 7, 7, 9], dtype=torch.int32, device=dev)
    parent = torch.tensor([-1, 0, 0, 2], dtype=torch.int32, device=dev)
    q = _f(9, Hq, D, dtype=dt, device=dev, grad=grad)
    k, v = (_f(9, Hkv, D, dtype=dt, device=dev, grad=grad) for _ in range(2))
    return q, k, v, cu, parent, 7


def _tree_fwd(be, dev):
    q, k, v, cu, parent, m = _tree_inputs(be, dev, True)
    return [dict(q=q, k=k, v=v, cu_seqlens=cu, parent=parent, max_seqlen=m, scale=0.25, softcap=cap,
                 backend=be) for cap in (0.0, 5.0)]


def _tree_bwd(be, dev):
    q, k, v, cu, parent, m = _tree_inputs(be, dev, False)
    o, lse = torch.ops.rlhf_ops.attention_tree_fwd(q, k, v, cu, parent, m, 0.25, 5.0, be)
    return [dict(dout=torch.randn_like(o), q=q, k=k, v=v, out=o, lse=lse, cu_seqlens=cu, parent=parent,
                 max_seqlen=m, scale=0.25, softcap=5.0, backend=be)]


def _call(name, **named):
    """Call rlhf_ops::<name> with named arguments (schema order, defaults filled)."""
    op = getattr(torch.ops.rlhf_ops, name).default
    return op(*positional(op, named))


def _reward_fwd(be, dev):
    ranks = torch.tensor([[0, 1, -1, 2], [1, 1, 0, -1], [-1, -1, -1, -1]], device=dev)
    out = [dict(rewards=_f(3, 4, device=dev), ranks=ranks, margin=0.5, backend=be)]
    if "margins" in _arg_names("pairwise_reward_fwd"):        # per-prompt margins (a tensor)
        out.append(dict(rewards=_f(3, 4, device=dev), ranks=ranks, margin=0.0, backend=be,
                        margins=torch.tensor([0.5, -1.0, 2.0], device=dev)))
    return out


def _gae_fwd(be, dev):
    m = torch.tensor([[1, 1, 0, 1, 1], [0, 1, 1, 1, 0]], dtype=torch.uint8, device=dev)
    cu = torch.tensor([0, 3, 3, 10], dtype=torch.int32, device=dev)
    return [dict(rewards=_f(2, 5, device=dev, grad=False), values=_f(2, 5, device=dev, grad=False), mask=m,
                 cu_seqlens=None, gamma=0.99, lam=0.95, backend=be),
            dict(rewards=_f(10, device=dev, dtype=torch.float64, grad=False),
                 values=_f(10, device=dev, dtype=torch.float64, grad=False), mask=m.reshape(-1), cu_seqlens=cu,
                 gamma=1.0, lam=0.9, backend=be)]


def _arg_names(name):
    return {a.name for a in getattr(torch.ops.rlhf_ops, name).default._schema.arguments}


def _tl_fwd(be, dev):
    t = torch.tensor([[0, 16], [3, 3], [9, 1], [5, 0]], device=dev)    # [N, K], a repeat
    return [dict(logits=_f(4, 17, device=dev), tokens=t, temperature=0.7, with_entropy=e, backend=be,
                 softcap=1.5 if e else 0.0) for e in (False, True)]


def _tl_bwd(be, dev):
    out = []
    for e in (False, True):
        x, t = torch.randn(4, 17, device=dev), torch.tensor([[0, 16], [3, 3], [9, 1], [5, 0]], device=dev)
        cap = 1.5 if e else 0.0
        _, ent, lse = _call("token_logprobs_fwd", logits=x, tokens=t, temperature=0.7, with_entropy=e, backend=be,
                            softcap=cap)
        out.append(dict(grad=torch.randn(4, 2, device=dev), grad_entropy=torch.randn(4, device=dev) if e else None,
                        logits=x, tokens=t, lse=lse, entropy=ent if e else None, temperature=0.7, backend=be,
                        softcap=cap))
    return out


def _ltl_fwd(be, dev):
    t = torch.tensor([[0, 18], [5, 5], [7, 1]], device=dev)
    return [dict(hidden=_f(3, 8, device=dev), weight=_f(19, 8, device=dev), bias=b, tokens=t, temperature=0.9,
                 with_entropy=e, backend=be, with_stats=st, softcap=1.5 if e else 0.0)
            for b, e, st in ((None, False, False), (_f(19, device=dev), True, True))]


def _ltl_bwd(be, dev):
    out = []
    for bias, e in ((None, False), (torch.randn(19, device=dev), True)):
        h, w = torch.randn(3, 8, device=dev), torch.randn(19, 8, device=dev)
        t = torch.tensor([[0, 18], [5, 5], [7, 1]], device=dev)
        cap = 1.5 if e else 0.0
        _, ent, lse, _, _ = _call("linear_token_logprobs_fwd", hidden=h, weight=w, bias=bias, tokens=t,
                                  temperature=0.9, with_entropy=e, backend=be, softcap=cap)
        out.append(dict(grad=torch.randn(3, 2, device=dev), grad_entropy=torch.randn(3, device=dev) if e else None,
                        hidden=h, weight=w, bias=bias, tokens=t, lse=lse, entropy=ent if e else None,
                        temperature=0.9, backend=be, softcap=cap))
    return out


def _kl_fwd(be, dev):
    t = torch.tensor([0, 16, 3, 9], device=dev)
    return [dict(logits=_f(4, 17, device=dev), ref_logits=_f(4, 17, device=dev, grad=False), tokens=t,
                 mask=None, beta=0.1, estimator="k1", temperature=1.0, backend=be),
            dict(logits=_f(4, 17, device=dev), ref_logits=_f(4, 17, device=dev, grad=False), tokens=t,
                 mask=torch.tensor([1.0, 0.0, 1.0, 1.0], device=dev), beta=0.1, estimator="k3",
                 temperature=0.9, backend=be)]


# Ops that need an initialised process group: opcheck runs them in a real 2-rank gloo group in
# tests/test_distributed.py (``opcheck_vocab_parallel_ops``); here they are only listed, and
# test_every_op_has_samples checks that file still names each of them.
NEEDS_GROUP = {"cross_entropy_vp_fwd", "linear_cross_entropy_vp_fwd", "vocab_shard_offset",
               "token_logprobs_vp_fwd", "linear_token_logprobs_vp_fwd", "kl_penalty_vp_fwd"}
# context-parallel ops: opcheck'ed inside the gloo spawn of test_context_parallel
NEEDS_CP_GROUP = {"ring_attention_fwd", "ring_attention_bwd", "cp_attention_varlen_fwd",
                  "cp_attention_varlen_bwd", "cp_all_to_all"}


SAMPLES = {
    "cross_entropy_fwd": _ce_fwd,
    "cross_entropy_bwd": _ce_bwd,
    "cross_entropy_bwd_inplace": _ce_bwd,
    "linear_cross_entropy_fwd": _lce_fwd,
    "linear_cross_entropy_bwd": _lce_bwd,
    "attention_fwd": _attn_fwd,
    "attention_bwd": _attn_bwd,
    "attention_varlen_fwd": _varlen_fwd,
    "attention_varlen_bwd": _varlen_bwd,
    "attention_tree_fwd": _tree_fwd,
    "attention_tree_bwd": _tree_bwd,
    "pairwise_reward_fwd": _reward_fwd,
    "token_logprobs_fwd": _tl_fwd,
    "token_logprobs_bwd": _tl_bwd,
    "linear_token_logprobs_fwd": _ltl_fwd,
    "linear_token_logprobs_bwd": _ltl_bwd,
    "kl_penalty_fwd": _kl_fwd,
    "gae_fwd": _gae_fwd,
}


def positional(op, named: dict) -> tuple:
    """The sample's named arguments in schema order; an argument it does not name takes the
    schema default (an error if there is none, naming it)."""
    args = []
    names = set()
    for a in op._schema.arguments:
        names.add(a.name)
        if a.name in named:
            args.append(named[a.name])
        elif a.has_default_value():
            args.append(a.default_value)
        else:
            raise AssertionError(f"the opcheck sample of {op} does not give argument {a.name!r}, "
                                 f"which has no default: update SAMPLES in {__file__}")
    extra = set(named) - names
    assert not extra, f"the opcheck sample of {op} names arguments the op does not take: {extra}"
    return tuple(args)


def test_namespace_is_found():
    # The discovery itself works (a broken discovery would make the coverage test vacuous).
    assert {"cross_entropy_fwd", "attention_fwd", "kl_penalty_fwd"} <= set(OPS), OPS


def test_every_op_has_samples():
    missing = [op for op in OPS if op not in SAMPLES and op not in NEEDS_GROUP | NEEDS_CP_GROUP]
    assert not missing, (f"custom ops in the {NAMESPACE} namespace without an opcheck sample: "
                         f"{missing}; add them to SAMPLES in tests/test_opcheck.py")
    import os
    dist_tests = open(os.path.join(os.path.dirname(__file__), "test_distributed.py")).read()
    unchecked = [op for op in NEEDS_GROUP & set(OPS) if f'"{op}"' not in dist_tests]
    assert not unchecked, f"ops that need a process group and are not opcheck'ed in test_distributed: {unchecked}"
    cp_tests = open(os.path.join(os.path.dirname(__file__), "test_context_parallel.py")).read()
    unchecked = [op for op in NEEDS_CP_GROUP & set(OPS) if f"torch.ops.rlhf_ops.{op}.default" not in cp_tests]
    assert not unchecked, f"context-parallel ops not opcheck'ed in test_context_parallel: {unchecked}"


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("name", [op for op in OPS if op not in NEEDS_GROUP | NEEDS_CP_GROUP])
def test_opcheck(name, backend):
    # ops that need a process group are opcheck'ed in the spawns of test_distributed.py and
    # test_context_parallel.py (test_every_op_has_samples holds both lists to that)
    why = backend_problem(backend)
    if why:
        pytest.skip(why)
    assert name in SAMPLES, f"no opcheck sample for rlhf_ops::{name} (see test_every_op_has_samples)"
    op = getattr(torch.ops.rlhf_ops, name).default
    torch.manual_seed(0)
    try:
        samples = SAMPLES[name](backend, DEVICE)
        for named in samples:
            res = opcheck(op, positional(op, named), raise_exception=False)
            bad = {k: v for k, v in res.items() if v != "SUCCESS"}
            if bad and all(isinstance(v, NotImplementedError) for v in bad.values()):
                raise next(iter(bad.values()))
            assert not bad, f"rlhf_ops::{name} ({backend}, {DEVICE}): {bad}"
    except NotImplementedError as e:
        # an op whose kernel has not landed yet on this backend (it says so to users as well)
        pytest.xfail(f"rlhf_ops::{name} is not implemented on {backend} yet: {e}")
