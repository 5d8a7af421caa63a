"""The CUDA-tensor path without a GPU: every public op, every custom op (the backward ones called
directly: the autograd engine needs a real CUDA context), the ``nn`` modules and the model's
forward at the ``gpu`` preset's sizes run under ``FakeTensorMode`` on tensors of device "cuda".

What runs is the real wrapper code (validation, backend choice, reshapes, reductions) and the
fake implementation of each custom op; no kernel. That checks, on a CPU-only machine:
  * no host sync on the CUDA path (DESIGN: usable in CUDA graphs): ``.item()``, ``.tolist()``,
    ``bool(t)``/``int(t)`` on a fake tensor raise DataDependentOutputException, and the recorder
    below fails a device→host copy (``.cpu()``) as well;
  * the backend each call reaches (the ``backend`` argument of the ``rlhf_ops::`` op it calls),
    in particular what ``auto`` picks for CUDA tensors;
  * output devices, dtypes and shapes.
The triton backend refuses CUDA tensors while TRITON_INTERPRET=1 (the CPU suite's setting), so
the GPU-like cases unset it for the call (``gpu_env``); nothing reaches a kernel either way.
"""
import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import rlhf_ops as ro
from rlhf_ops import _backend
from conftest import ON_GPU
from test_opcheck import NEEDS_CP_GROUP, NEEDS_GROUP, OPS, SAMPLES, positional

NOT_OPS = {"available_backends", "use_backend", "KLPenalty", "PolicyLoss", "PreferenceLoss",
           # the batch-invariant mode and its host-side parity report (tests/test_batch_invariant.py)
           "batch_invariant", "is_batch_invariant", "logprob_parity", "ParityReport"}
PUBLIC = sorted(set(ro.__all__) - NOT_OPS)
CUDA = torch.device("cuda", 0)
HAS_EXT = _backend.load_extension()


class Recorder(TorchDispatchMode):
    """Records each ``rlhf_ops::`` call with its backend argument, and every device→host copy."""

    def __init__(self):
        super().__init__()
        self.backends, self.host_copies = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.name()
        if name.startswith("rlhf_ops::"):
            names = [a.name for a in func._schema.arguments]
            full = dict(zip(names, args), **kwargs)
            self.backends.append((name, full.get("backend")))
        out = func(*args, **kwargs)
        ins = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outs = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        if any(t.device.type == "cuda" for t in ins) and any(t.device.type == "cpu" for t in outs):
            self.host_copies.append(name)
        return out


@pytest.fixture
def gpu_env(monkeypatch):
    """The environment of a GPU machine: the triton backend may take CUDA tensors.

    The Triton kernel modules are imported first, under the session's setting: a kernel module
    (and triton.jit) imported while TRITON_INTERPRET is unset would stay in compiled mode for the
    rest of the session and break every later interpreter test."""
    import importlib
    import pkgutil
    import rlhf_ops.kernels as K
    for m in pkgutil.iter_modules(K.__path__):
        importlib.import_module(f"rlhf_ops.kernels.{m.name}")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("RLHF_OPS_DEBUG", raising=False)
    monkeypatch.delenv("RLHF_OPS_BACKEND", raising=False)


def run_fake(build, call):
    """``build()`` makes fake CUDA inputs; ``call(*inputs)`` runs under the recorder, which must
    see no device→host copy. Returns (output, [(op, backend), ...])."""
    with FakeTensorMode(allow_non_fake_inputs=False):
        inputs = build()
        with Recorder() as rec:
            out = call(*inputs)
    assert not rec.host_copies, f"device→host copies on the CUDA path: {rec.host_copies}"
    return out, rec.backends


def _r(*shape, dtype=torch.float32, grad=True):
    return torch.randn(*shape, dtype=dtype, device=CUDA).requires_grad_(grad)


def _i(high, *shape, low=0):
    return torch.randint(low, high, shape, device=CUDA)


# ----------------------------------------------------------------------------- public ops ---
# name → (backends it takes, dtype of the float inputs, build, call(inputs, backend), check(out))
# Sizes are not multiples of any block size; dtypes are what the op's CUDA backend accepts.

def _is(t, shape, dtype):
    assert isinstance(t, torch.Tensor) and t.device.type == "cuda", t
    assert tuple(t.shape) == tuple(shape) and t.dtype == dtype, (tuple(t.shape), t.dtype, shape, dtype)


F32 = torch.float32


def _case_cross_entropy():
    def build():
        return _r(3, 5, 33, dtype=torch.bfloat16), _i(33, 3, 5)
    return build, lambda x, t, be: (ro.cross_entropy(x, t, backend=be),
                                    ro.cross_entropy(x, t, reduction="none", backend=be)), \
        lambda o: (_is(o[0], (), F32), _is(o[1], (3, 5), F32))


def _case_linear_cross_entropy():
    def build():
        return _r(15, 16, dtype=torch.float16), _r(33, 16, dtype=torch.float16), _i(33, 15), \
            _r(33, dtype=torch.float16)
    return build, lambda h, w, t, b, be: ro.linear_cross_entropy(h, w, t, bias=b, backend=be), \
        lambda o: _is(o, (), F32)


def _case_attention():
    def build():
        return _r(2, 4, 9, 64, dtype=torch.float16), _r(2, 2, 11, 64, dtype=torch.float16), \
            _r(2, 2, 11, 64, dtype=torch.float16)
    return build, lambda q, k, v, be: ro.attention(q, k, v, causal=True, backend=be), \
        lambda o: _is(o, (2, 4, 9, 64), torch.float16)


def _case_attention_window():
    def build():
        return _r(2, 4, 9, 64, dtype=torch.bfloat16), _r(2, 2, 11, 64, dtype=torch.bfloat16), \
            _r(2, 2, 11, 64, dtype=torch.bfloat16)
    return build, lambda q, k, v, be: ro.attention(q, k, v, window=(3, 0), softcap=20.0, backend=be), \
        lambda o: _is(o, (2, 4, 9, 64), torch.bfloat16)


def _case_attention_varlen():
    def build():
        cu_q = torch.tensor([0, 4, 4, 13], dtype=torch.int32, device=CUDA)
        cu_k = torch.tensor([0, 5, 5, 17], dtype=torch.int32, device=CUDA)
        return _r(13, 4, 64, dtype=torch.float16), _r(17, 2, 64, dtype=torch.float16), \
            _r(17, 2, 64, dtype=torch.float16), cu_q, cu_k
    return build, lambda q, k, v, cq, ck, be: ro.attention_varlen(q, k, v, cq, ck, 9, 12, backend=be), \
        lambda o: _is(o, (13, 4, 64), torch.float16)


def _case_attention_tree():
    def build():
        cu = torch.tensor([0, 5, 9, 9, 13], dtype=torch.int32, device=CUDA)
        parent = torch.tensor([-1, 0, 0, 2], dtype=torch.int32, device=CUDA)
        return _r(13, 4, 64, dtype=torch.bfloat16), _r(13, 2, 64, dtype=torch.bfloat16), \
            _r(13, 2, 64, dtype=torch.bfloat16), cu, parent
    return build, lambda q, k, v, cu, p, be: ro.attention_tree(q, k, v, cu, p, 9, softcap=20.0, backend=be), \
        lambda o: _is(o, (13, 4, 64), torch.bfloat16)


def _case_pad():
    def build():
        return _r(7, 3, 16), torch.tensor([0, 1, 2, 5, 6, 8, 9], device=CUDA)
    return build, lambda x, idx, be: ro.pad(x, idx, 2, 5), lambda o: _is(o, (2, 5, 3, 16), F32)


def _case_pairwise_reward_loss():
    def build():
        ranks = torch.tensor([[0, 1, 2, -1, 3, 3], [1, 0, -1, -1, -1, -1]], device=CUDA)
        return _r(2, 6, dtype=torch.bfloat16), ranks
    return build, lambda r, k, be: (ro.pairwise_reward_loss(r, k, backend=be),
                                    ro.pairwise_reward_loss(r, k, reduction="none", margin=0.5, backend=be),
                                    ro.pairwise_reward_loss(r, k, margin=torch.ones(2, device=CUDA), backend=be)), \
        lambda o: (_is(o[0], (), F32), _is(o[1], (2,), F32), _is(o[2], (), F32))


def _case_reward_at_last_token():
    def build():
        return _r(6, 9, 16), _i(9, 2, 3), _r(1, 16), _r(1)
    return build, lambda h, i, w, b, be: ro.reward_at_last_token(h, i, w, b), lambda o: _is(o, (2, 3), F32)


def _case_token_logprobs():
    def build():
        return _r(2, 5, 33, dtype=torch.float16), _i(33, 2, 5)
    return build, lambda x, t, be: ro.token_logprobs(x, t, temperature=0.7, backend=be), \
        lambda o: _is(o, (2, 5), F32)


def _case_kl_penalty():
    def build():
        return _r(2, 5, 33, dtype=torch.bfloat16), _r(2, 5, 33, dtype=torch.bfloat16, grad=False), \
            _i(33, 2, 5), torch.ones(2, 5, dtype=torch.bool, device=CUDA)
    return build, lambda x, r, t, m, be: ro.kl_penalty(x, r, t, beta=0.1, estimator="k3", mask=m, backend=be), \
        lambda o: [_is(f, (2, 5), F32) for f in o if f is not None]


def _case_token_logprobs_k_entropy():
    def build():
        return _r(2, 5, 33, dtype=torch.bfloat16), _i(33, 2, 5, 3)
    return build, lambda x, t, be: ro.token_logprobs(x, t, return_entropy=True, backend=be), \
        lambda o: (_is(o[0], (2, 5, 3), F32), _is(o[1], (2, 5), F32))


def _case_linear_token_logprobs():
    def build():
        return _r(2, 5, 16, dtype=torch.float16), _r(33, 16, dtype=torch.float16), _i(33, 2, 5), \
            _r(33, dtype=torch.float16)
    return build, lambda h, w, t, b, be: ro.linear_token_logprobs(h, w, t, bias=b, return_entropy=True, backend=be), \
        lambda o: (_is(o[0], (2, 5), F32), _is(o[1], (2, 5), F32))


def _case_kl_from_logprobs():
    def build():
        return _r(2, 5), _r(2, 5, grad=False), torch.ones(2, 5, dtype=torch.bool, device=CUDA)
    return build, lambda a, b, m, be: ro.kl_from_logprobs(a, b, beta=0.1, estimator="k3", mask=m), \
        lambda o: [_is(f, (2, 5), F32) for f in o if f is not None]


def _case_ppo_rewards():
    def build():
        return _r(2, 5), _r(2), torch.ones(2, 5, dtype=torch.int64, device=CUDA)
    return build, lambda p, s, m, be: ro.ppo_rewards(p, s, m), lambda o: _is(o, (2, 5), F32)


def _case_policy_loss():
    def build():
        cu = torch.tensor([0, 4, 4, 11], dtype=torch.int32, device=CUDA)
        return _r(11), _r(11, grad=False), _r(3, grad=False), _r(11, grad=False), _r(11), cu, \
            torch.tensor(9.0, device=CUDA)
    return build, lambda lp, old, a, roll, ent, cu, n, be: (
        ro.policy_loss(lp, old, a, cu_seqlens=cu, loss_type="dapo", rollout_logprobs=roll,
                       is_correction="sequence_mask", is_cap=(0.5, 2.0), ref_logprobs=old, beta=0.1,
                       entropy=ent, entropy_coef=0.01, num_tokens=n),
        ro.policy_loss(lp.view(1, 11), old.view(1, 11), a[:1], loss_type="gspo")), \
        lambda o: (_is(o[0].loss, (), F32), _is(o[0].per_token, (11,), F32), _is(o[1].ratio, (1, 11), F32))


def _case_value_loss():
    def build():
        return _r(2, 5), _r(2, 5, grad=False), _r(2, 5, grad=False), torch.ones(2, 5, device=CUDA)
    return build, lambda v, o, r, m, be: ro.value_loss(v, o, r, m, clip=0.2, num_tokens=torch.tensor(7, device=CUDA)), \
        lambda o: _is(o, (), F32)


def _case_gae():
    def build():
        cu = torch.tensor([0, 3, 3, 10], dtype=torch.int32, device=CUDA)
        return _r(2, 5, grad=False), _r(2, 5, grad=False), torch.ones(2, 5, dtype=torch.bool, device=CUDA), cu
    return build, lambda r, v, m, cu, be: ro.gae(r, v, m, backend=be) + ro.gae(
        r.reshape(-1), v.reshape(-1), m.reshape(-1), cu_seqlens=cu, backend=be), \
        lambda o: [_is(t, s, F32) for t, s in zip(o, [(2, 5), (2, 5), (10,), (10,)])]


def _case_group_advantages():
    return lambda: (_r(8),), lambda s, be: ro.group_advantages(s, 4, leave_one_out=True), lambda o: _is(o, (8,), F32)


def _case_sequence_logprobs():
    def build():
        return _r(9), torch.tensor([0, 2, 9], dtype=torch.int32, device=CUDA)
    return build, lambda lp, cu, be: ro.sequence_logprobs(lp, cu_seqlens=cu, reduce="mean"), lambda o: _is(o, (2,), F32)


def _case_preference_loss():
    def build():
        return _r(3), _r(3), _i(9, 3, low=1), _i(9, 3, low=1)
    return build, lambda c, r, lc, lr, be: ro.preference_loss(c, r, loss_type="simpo", gamma=0.5, chosen_lengths=lc,
                                                              rejected_lengths=lr), \
        lambda o: (_is(o.loss, (), F32), _is(o.per_pair, (3,), F32))


CASES = {
    "cross_entropy": _case_cross_entropy,
    "linear_cross_entropy": _case_linear_cross_entropy,
    "attention": _case_attention,
    "attention_varlen": _case_attention_varlen,
    "attention_tree": _case_attention_tree,
    "pad": _case_pad,
    "pairwise_reward_loss": _case_pairwise_reward_loss,
    "reward_at_last_token": _case_reward_at_last_token,
    "token_logprobs": _case_token_logprobs,
    "kl_penalty": _case_kl_penalty,
    "ppo_rewards": _case_ppo_rewards,
    "linear_token_logprobs": _case_linear_token_logprobs,
    "kl_from_logprobs": _case_kl_from_logprobs,
    "policy_loss": _case_policy_loss,
    "value_loss": _case_value_loss,
    "gae": _case_gae,
    "group_advantages": _case_group_advantages,
    "sequence_logprobs": _case_sequence_logprobs,
    "preference_loss": _case_preference_loss,
}
# Ops without a backend choice (plain torch ops around no custom op).
NO_BACKEND = {"pad", "reward_at_last_token", "ppo_rewards", "kl_from_logprobs", "policy_loss", "value_loss",
              "group_advantages", "sequence_logprobs", "preference_loss"}
# Documented host syncs: unpad reads the row lengths once (the packed size is data-dependent).
SYNCS = {"unpad"}
# What the cuda backend refuses by design (DESIGN: window/softcap and the tree op are reference + Triton).
CUDA_REFUSES = {"attention_window", "attention_tree"}
EXTRA = {"attention_window": _case_attention_window, "token_logprobs_k_entropy": _case_token_logprobs_k_entropy}


def test_every_public_op_has_a_case():
    missing = [n for n in PUBLIC if n not in CASES and n not in SYNCS]
    assert not missing, f"public ops without a fake-CUDA case in tests/test_fake_cuda.py: {missing}"


def _params():
    out = []
    for name in sorted(CASES) + sorted(EXTRA):
        for be in (("none",) if name in NO_BACKEND else ("reference", "triton", "cuda", None)):
            out.append(pytest.param(name, be, id=f"{name}-{be or 'auto'}"))
    return out


@pytest.mark.parametrize("name,backend", _params())
def test_public_op(gpu_env, name, backend):
    if backend == "cuda" and not HAS_EXT:
        pytest.skip("the CUDA extension rlhf_ops._C is not built")
    build, call, check = (CASES.get(name) or EXTRA[name])()
    if backend == "cuda" and name in CUDA_REFUSES:
        with pytest.raises(ValueError, match="cuda backend does not support"):
            run_fake(build, lambda *xs: call(*xs, backend))
        return
    out, calls = run_fake(build, lambda *xs: call(*xs, None if backend == "none" else backend))
    check(out)
    used = {be for _, be in calls}
    if backend in ("reference", "none"):
        assert not calls, f"{name}: the {backend} path called custom ops {calls}"
    elif backend is None:
        # auto on CUDA tensors: the first backend of the op's preference list that can run —
        # triton on a GPU machine — never the eager reference
        assert used == {"triton"}, f"{name}: auto picked {used} for CUDA tensors ({calls})"
    else:
        assert calls and used == {backend}, f"{name}: backend={backend!r} ran {calls}"


def test_auto_without_triton_picks_cuda(monkeypatch):
    # Where triton cannot take CUDA tensors (here: the interpreter is on), auto falls to cuda.
    if not HAS_EXT:
        pytest.skip("the CUDA extension rlhf_ops._C is not built")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    build, call, check = _case_cross_entropy()
    out, calls = run_fake(build, lambda *xs: call(*xs, None))
    check(out)
    assert {be for _, be in calls} == {"cuda"}, calls


def test_unpad_syncs_once_and_pad_never(gpu_env):
    # unpad is documented to read the row lengths on the host; pad (in the model) must not.
    with FakeTensorMode():
        x = _r(2, 5, 16)
        mask = torch.ones(2, 5, dtype=torch.int64, device=CUDA)
        with pytest.raises(DataDependentOutputException):
            ro.unpad(x, mask)


def test_a_host_sync_is_detected():
    # The mechanism the tests above rely on: a sync on a fake CUDA tensor raises.
    with FakeTensorMode():
        t = torch.randn(3, device=CUDA)
        with pytest.raises(DataDependentOutputException):
            t.sum().item()
        with pytest.raises(DataDependentOutputException):
            bool((t > 0).any())
    with pytest.raises(AssertionError, match="device→host"):
        run_fake(lambda: (torch.randn(3, device=CUDA),), lambda t: t.cpu())


# ----------------------------------------------------------------------------- custom ops ---

@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("name", [op for op in OPS if op not in NEEDS_CP_GROUP])
def test_custom_op(gpu_env, name, backend):
    """Every rlhf_ops:: op (forward and backward, called directly) on fake CUDA tensors, with the
    opcheck samples: outputs on CUDA, no host sync. (The context-parallel ops only chain these
    per block around collectives; tests/test_context_parallel.py runs them on CUDA in gpu_check.sh.)"""
    if backend == "cuda" and not HAS_EXT:
        pytest.skip("the CUDA extension rlhf_ops._C is not built")
    if name in NEEDS_GROUP:
        pytest.skip(f"rlhf_ops::{name} needs a process group (tests/test_distributed.py runs it on CUDA in "
                    "gpu_check.sh)")
    assert name in SAMPLES, f"no sample for rlhf_ops::{name} (tests/test_opcheck.py SAMPLES)"
    op = getattr(torch.ops.rlhf_ops, name).default
    with FakeTensorMode():
        samples = SAMPLES[name](backend, CUDA)
        for named in samples:
            args = positional(op, named)
            with Recorder() as rec:
                out = op(*args)
            assert not rec.host_copies, f"{name}: device→host copies {rec.host_copies}"
            leaves = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
            assert all(t.device.type == "cuda" for t in leaves), [t.device for t in leaves]
            if op._schema.returns and not any(a.alias_info for a in op._schema.arguments):
                assert leaves, f"{name} returned no tensor"


# ---------------------------------------------------------------------- nn modules, model ---

class default_dtype:
    """Build modules in ``dtype`` (``.to(dtype)`` cannot swap fake parameters)."""

    def __init__(self, dtype):
        self.dtype = dtype

    def __enter__(self):
        self.old = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc):
        torch.set_default_dtype(self.old)


@pytest.mark.parametrize("backend", [None, "triton", "cuda"])
def test_nn_modules(gpu_env, backend):
    if backend == "cuda" and not HAS_EXT:
        pytest.skip("the CUDA extension rlhf_ops._C is not built")
    from rlhf_ops import nn as rnn
    bf = torch.bfloat16
    with FakeTensorMode():
        with torch.device(CUDA), default_dtype(bf):   # bf16: what the cuda attention takes
            attn = rnn.CausalSelfAttention(256, 4, n_kv_heads=2, backend=backend)
        x, t = _r(3, 7, 33, dtype=bf), _i(33, 3, 7)
        h, w, th = _r(21, 16), _r(33, 16), _i(33, 21)
        a = _r(2, 11, 256, dtype=bf)
        r, k = _r(2, 4), torch.tensor([[0, 1, 2, 3], [1, 0, -1, -1]], device=CUDA)
        with Recorder() as rec:
            ce = rnn.CrossEntropyLoss(backend=backend)(x, t)
            lce = rnn.LinearCrossEntropyLoss(backend=backend)(h, w, th)
            y = attn(a)
            rl = rnn.PairwiseRewardLoss(backend=backend)(r, k)
            kl = rnn.KLPenaltyModule(beta=0.05, estimator="k2", backend=backend)(x, x.detach(), t)
    assert not rec.host_copies, rec.host_copies
    _is(ce, (), F32), _is(lce, (), F32), _is(y, (2, 11, 256), bf), _is(rl, (), F32)
    [_is(f, (3, 7), F32) for f in kl if f is not None]
    assert {be for _, be in rec.backends} == {backend or "triton"}, rec.backends
    assert len({op for op, _ in rec.backends}) == 5, rec.backends


@pytest.mark.parametrize("backend", [None, "triton", "cuda"])
def test_model_forward_gpu_preset(gpu_env, backend):
    """GPT and ScalarHeadGPT at the gpu preset's sizes (6 layers, d_model 512, 8 heads, block 128),
    fp32 as the training loop builds them; bf16 for the cuda backend, whose attention takes only
    fp16/bf16 (autocast cannot be checked here: CUDA autocast is off without a GPU)."""
    if backend == "cuda" and not HAS_EXT:
        pytest.skip("the CUDA extension rlhf_ops._C is not built")
    from rlhf_ops.train import data as D
    from rlhf_ops.train.model import GPT, GPTConfig, ScalarHeadGPT
    from rlhf_ops.train.config import make_config, section
    cfg = GPTConfig(vocab_size=D.VOCAB_SIZE, backend=backend, **section(make_config("gpu"), "model"))
    dt = torch.bfloat16 if backend == "cuda" else F32
    B, T = 4, cfg.block_size
    with FakeTensorMode():
        with torch.device(CUDA), default_dtype(dt):
            lm, rm = GPT(cfg), ScalarHeadGPT(cfg)
        idx = _i(cfg.vocab_size, B, T)
        targets = _i(cfg.vocab_size, B, T)
        last = _i(T, B)
        with Recorder() as rec:
            logits = lm(idx)
            loss = lm(idx, targets)
            values = rm(idx)
            rewards = rm(idx, last)
    assert not rec.host_copies, rec.host_copies
    _is(logits, (B, T, cfg.vocab_size), dt), _is(loss, (), F32)
    _is(values, (B, T), dt), _is(rewards, (B,), dt)
    assert loss.requires_grad
    ops = {op for op, _ in rec.backends}
    assert {"rlhf_ops::attention_fwd", "rlhf_ops::linear_cross_entropy_fwd"} <= ops, ops
    assert {be for _, be in rec.backends} == {backend or "triton"}, rec.backends


@pytest.mark.skipif(not ON_GPU, reason="the real-CUDA counterpart of the fake checks needs a GPU")
def test_fake_matches_real_on_gpu():
    # On a GPU: the fake outputs' shapes/dtypes equal the real ones for the public ops.
    for name, case in sorted(CASES.items()):
        build, call, check = case()
        with torch.no_grad():
            inputs = build()
            real = call(*inputs, None)
        check(real)
