"""Every public function × every kind of bad argument: the exception type, and a message that names
the argument (DESIGN: "Inputs that are wrong ... raise ValueError/TypeError/RuntimeError with a
message that names the argument").

Kinds (``KINDS``) and the type each raises: a wrong dtype → TypeError; a wrong shape → ValueError;
a tensor on another device (meta next to cpu) → ValueError; a non-finite scalar option →
ValueError; a negative size → ValueError; an unknown string option → ValueError; a tensor that
requires grad where the op gives it no gradient → ValueError (a gradient silently dropped).

``CASES`` holds one or more rows per (function, kind); ``NOT_APPLICABLE`` says, per function,
which kinds it has no argument for. ``test_table_is_complete`` fails when a public function (or a
kind) is added without rows. Where an op raises the wrong type or an unclear message today, the
row is marked ``xfail(strict=True)`` with the reason: a bug for the op's owner, reported.
"""
import math

import pytest
import torch

import rlhf_ops as ro

KINDS = ("dtype", "shape", "device", "nonfinite", "negative_size", "unknown_string", "requires_grad")
NOT_OPS = {"available_backends", "use_backend", "KLPenalty", "PolicyLoss", "PreferenceLoss",
           # the batch-invariant mode and its host-side parity report (tests/test_batch_invariant.py)
           "batch_invariant", "is_batch_invariant", "logprob_parity", "ParityReport"}
PUBLIC = sorted(set(ro.__all__) - NOT_OPS)


def _f(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def _meta(t):
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


# Valid arguments of each function (CPU, small); a row overrides one of them.
def valid(name):
    i32 = torch.int32
    return {
        "attention": dict(q=_f(1, 2, 5, 16), k=_f(1, 1, 7, 16), v=_f(1, 1, 7, 16)),
        "attention_varlen": dict(q=_f(8, 2, 16), k=_f(10, 1, 16), v=_f(10, 1, 16),
                                 cu_seqlens_q=torch.tensor([0, 3, 8], dtype=i32),
                                 cu_seqlens_k=torch.tensor([0, 4, 10], dtype=i32),
                                 max_seqlen_q=5, max_seqlen_k=6),
        "attention_tree": dict(q=_f(8, 2, 16), k=_f(8, 1, 16), v=_f(8, 1, 16),
                               cu_seqlens=torch.tensor([0, 3, 5, 8], dtype=i32),
                               parent=torch.tensor([-1, 0, 0], dtype=i32), max_seqlen=6),
        "unpad": dict(x=_f(2, 4, 3), attention_mask=torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])),
        "pad": dict(x_packed=_f(5, 3), indices=torch.tensor([0, 1, 4, 5, 6]), batch=2, seqlen=4),
        "cross_entropy": dict(logits=_f(3, 11), target=torch.tensor([0, 5, 10])),
        "linear_cross_entropy": dict(hidden=_f(3, 8), weight=_f(11, 8), target=torch.tensor([0, 5, 10]),
                                     bias=_f(11)),
        "pairwise_reward_loss": dict(rewards=_f(2, 4), ranks=torch.tensor([[0, 1, 2, 3], [1, 0, -1, 2]])),
        "reward_at_last_token": dict(hidden=_f(3, 5, 8), last_index=torch.tensor([4, 0, 2]), weight=_f(8),
                                     bias=_f(1)),
        "token_logprobs": dict(logits=_f(3, 11), tokens=torch.tensor([0, 5, 10])),
        "kl_penalty": dict(logits=_f(3, 11), ref_logits=_f(3, 11), tokens=torch.tensor([0, 5, 10]), beta=0.1,
                           mask=torch.tensor([True, False, True])),
        "ppo_rewards": dict(penalty=_f(2, 5), scores=_f(2), mask=torch.ones(2, 5, dtype=torch.bool)),
        "linear_token_logprobs": dict(hidden=_f(3, 8), weight=_f(11, 8), tokens=torch.tensor([0, 5, 10]),
                                      bias=_f(11)),
        "kl_from_logprobs": dict(logprobs=-_f(2, 5).abs(), ref_logprobs=-_f(2, 5).abs(), beta=0.1,
                                 mask=torch.ones(2, 5)),
        "policy_loss": dict(logprobs=-_f(2, 5).abs(), old_logprobs=-_f(2, 5).abs(), advantages=_f(2),
                            mask=torch.ones(2, 5, dtype=torch.bool), ref_logprobs=-_f(2, 5).abs(), beta=0.1),
        "value_loss": dict(values=_f(2, 5), old_values=_f(2, 5), returns=_f(2, 5), clip=0.2),
        "gae": dict(rewards=_f(2, 5), values=_f(2, 5), mask=torch.ones(2, 5, dtype=torch.bool)),
        "group_advantages": dict(scores=_f(6), group_size=3),
        "sequence_logprobs": dict(logprobs=-_f(2, 5).abs(), mask=torch.ones(2, 5, dtype=torch.bool)),
        "preference_loss": dict(chosen_logps=-_f(3).abs(), rejected_logps=-_f(3).abs(), ref_chosen_logps=_f(3),
                                ref_rejected_logps=_f(3)),
    }[name]


def call(name, **override):
    kw = valid(name)
    kw.update(override)
    return getattr(ro, name)(**kw)


# A row: (function, kind, argument named in the message, override builder, exception type[, xfail]).
# The builder gets the valid arguments and returns the overrides.
def _row(fn, kind, arg, build, exc, xfail=None):
    marks = [pytest.mark.xfail(strict=True, reason=xfail)] if xfail else []
    return pytest.param(fn, kind, arg, build, exc, id=f"{fn}-{kind}-{arg}", marks=marks)


V = valid
NO_GRAD = ("BUG/design (owner: logprobs/kl): a {arg} that requires grad is accepted and silently gets "
           "no gradient (DESIGN: no gradient to it); raise a ValueError naming it, or document it")

VP_OPS = ("cross_entropy", "linear_cross_entropy", "token_logprobs", "linear_token_logprobs", "kl_penalty")

CASES = [
    # ---- attention
    _row("attention", "dtype", "q", lambda a: dict(q=a["q"].long()), TypeError),
    _row("attention", "dtype", "k", lambda a: dict(k=a["k"].half(), v=a["v"].half()), TypeError),
    _row("attention", "shape", "q", lambda a: dict(q=a["q"][0]), ValueError),
    _row("attention", "shape", "v", lambda a: dict(v=a["v"][:, :, :3]), ValueError),
    _row("attention", "shape", "k.shape[1]", lambda a: dict(q=_f(1, 3, 5, 16), k=_f(1, 2, 7, 16), v=_f(1, 2, 7, 16)),
         ValueError),
    _row("attention", "device", "k", lambda a: dict(k=_meta(a["k"])), ValueError),
    _row("attention", "nonfinite", "scale", lambda a: dict(scale=math.inf), ValueError),
    _row("attention", "nonfinite", "softcap", lambda a: dict(softcap=math.nan), ValueError),
    _row("attention", "negative_size", "window", lambda a: dict(window=(-2, 0)), ValueError),
    _row("attention", "unknown_string", "backend", lambda a: dict(backend="flash"), ValueError),
    # ---- attention_varlen
    _row("attention_varlen", "dtype", "q", lambda a: dict(q=a["q"].long()), TypeError),
    _row("attention_varlen", "dtype", "cu_seqlens_q", lambda a: dict(cu_seqlens_q=a["cu_seqlens_q"].long()),
         TypeError),
    _row("attention_varlen", "shape", "q", lambda a: dict(q=a["q"][None]), ValueError),
    _row("attention_varlen", "shape", "cu_seqlens_k", lambda a: dict(cu_seqlens_k=a["cu_seqlens_k"][None]),
         ValueError),
    _row("attention_varlen", "device", "cu_seqlens_q", lambda a: dict(cu_seqlens_q=_meta(a["cu_seqlens_q"])),
         ValueError),
    _row("attention_varlen", "nonfinite", "scale", lambda a: dict(scale=math.nan), ValueError),
    _row("attention_varlen", "nonfinite", "softcap", lambda a: dict(softcap=math.inf), ValueError),
    _row("attention_varlen", "negative_size", "max_seqlen_q", lambda a: dict(max_seqlen_q=-1), ValueError),
    _row("attention_varlen", "negative_size", "window", lambda a: dict(window=(0, -3)), ValueError),
    _row("attention_varlen", "unknown_string", "backend", lambda a: dict(backend="Triton"), ValueError),
    # ---- attention_tree
    _row("attention_tree", "dtype", "q", lambda a: dict(q=a["q"].long()), TypeError),
    _row("attention_tree", "dtype", "parent", lambda a: dict(parent=a["parent"].long()), TypeError),
    _row("attention_tree", "shape", "q", lambda a: dict(q=a["q"][None]), ValueError),
    _row("attention_tree", "shape", "parent", lambda a: dict(parent=a["parent"][:2]), ValueError),
    _row("attention_tree", "device", "parent", lambda a: dict(parent=_meta(a["parent"])), ValueError),
    _row("attention_tree", "nonfinite", "scale", lambda a: dict(scale=math.nan), ValueError),
    _row("attention_tree", "nonfinite", "softcap", lambda a: dict(softcap=math.inf), ValueError),
    _row("attention_tree", "negative_size", "max_seqlen", lambda a: dict(max_seqlen=-1), ValueError),
    _row("attention_tree", "unknown_string", "backend", lambda a: dict(backend="flash"), ValueError),
    # ---- unpad / pad
    _row("unpad", "dtype", "attention_mask", lambda a: dict(attention_mask=a["attention_mask"].float()), TypeError),
    _row("unpad", "shape", "attention_mask", lambda a: dict(attention_mask=a["attention_mask"][:, :3]), ValueError),
    _row("unpad", "shape", "x", lambda a: dict(x=_f(8)), ValueError),
    _row("unpad", "device", "attention_mask", lambda a: dict(attention_mask=_meta(a["attention_mask"])), ValueError),
    _row("pad", "dtype", "indices", lambda a: dict(indices=a["indices"].int()), TypeError),
    _row("pad", "shape", "indices", lambda a: dict(indices=a["indices"][:4]), ValueError),
    _row("pad", "device", "indices", lambda a: dict(indices=_meta(a["indices"])), ValueError),
    _row("pad", "negative_size", "batch", lambda a: dict(batch=-1), ValueError),
    _row("pad", "negative_size", "seqlen", lambda a: dict(seqlen=-4), ValueError),
    # ---- cross_entropy
    _row("cross_entropy", "dtype", "logits", lambda a: dict(logits=a["logits"].long()), TypeError),
    _row("cross_entropy", "dtype", "target", lambda a: dict(target=a["target"].float()), TypeError),
    _row("cross_entropy", "shape", "target", lambda a: dict(target=a["target"][:2]), ValueError),
    _row("cross_entropy", "device", "target", lambda a: dict(target=_meta(a["target"])), ValueError),
    _row("cross_entropy", "nonfinite", "label_smoothing", lambda a: dict(label_smoothing=math.nan), ValueError),
    _row("cross_entropy", "unknown_string", "reduction", lambda a: dict(reduction="avg"), ValueError),
    _row("cross_entropy", "unknown_string", "backend", lambda a: dict(backend="nope"), ValueError),
    # ---- linear_cross_entropy
    _row("linear_cross_entropy", "dtype", "hidden", lambda a: dict(hidden=a["hidden"].long()), TypeError),
    _row("linear_cross_entropy", "dtype", "weight", lambda a: dict(weight=a["weight"].double()), TypeError),
    _row("linear_cross_entropy", "dtype", "target", lambda a: dict(target=a["target"].float()), TypeError),
    _row("linear_cross_entropy", "shape", "weight", lambda a: dict(weight=_f(11, 7)), ValueError),
    _row("linear_cross_entropy", "shape", "bias", lambda a: dict(bias=_f(10)), ValueError),
    _row("linear_cross_entropy", "device", "weight", lambda a: dict(weight=_meta(a["weight"])), ValueError),
    _row("linear_cross_entropy", "nonfinite", "label_smoothing", lambda a: dict(label_smoothing=math.inf),
         ValueError),
    _row("linear_cross_entropy", "unknown_string", "reduction", lambda a: dict(reduction="mean "), ValueError),
    _row("linear_cross_entropy", "unknown_string", "backend", lambda a: dict(backend="cpu"), ValueError),
    # ---- pairwise_reward_loss
    _row("pairwise_reward_loss", "dtype", "rewards", lambda a: dict(rewards=a["rewards"].long()), TypeError),
    _row("pairwise_reward_loss", "dtype", "ranks", lambda a: dict(ranks=a["ranks"].float()), TypeError),
    _row("pairwise_reward_loss", "shape", "ranks", lambda a: dict(ranks=a["ranks"][:, :3]), ValueError),
    _row("pairwise_reward_loss", "shape", "rewards", lambda a: dict(rewards=a["rewards"][0]), ValueError),
    _row("pairwise_reward_loss", "device", "ranks", lambda a: dict(ranks=_meta(a["ranks"])), ValueError),
    _row("pairwise_reward_loss", "nonfinite", "margin", lambda a: dict(margin=math.inf), ValueError),
    _row("pairwise_reward_loss", "nonfinite", "margin", lambda a: dict(margin=math.nan), ValueError),
    _row("pairwise_reward_loss", "dtype", "margin", lambda a: dict(margin=torch.tensor([1, 2])), TypeError),
    _row("pairwise_reward_loss", "shape", "margin", lambda a: dict(margin=_f(3)), ValueError),
    _row("pairwise_reward_loss", "device", "margin", lambda a: dict(margin=_meta(_f(2))), ValueError),
    _row("pairwise_reward_loss", "nonfinite", "margin", lambda a: dict(margin=torch.tensor([0.5, math.nan])),
         ValueError),
    _row("pairwise_reward_loss", "requires_grad", "margin", lambda a: dict(margin=_f(2).requires_grad_()),
         ValueError, NO_GRAD.format(arg="margin tensor").replace("logprobs/kl", "reward")),
    _row("pairwise_reward_loss", "unknown_string", "reduction", lambda a: dict(reduction="batchmean"), ValueError),
    _row("pairwise_reward_loss", "unknown_string", "backend", lambda a: dict(backend=""), ValueError),
    # ---- reward_at_last_token
    _row("reward_at_last_token", "dtype", "hidden", lambda a: dict(hidden=a["hidden"].long()), TypeError),
    _row("reward_at_last_token", "dtype", "last_index", lambda a: dict(last_index=a["last_index"].float()),
         TypeError),
    _row("reward_at_last_token", "dtype", "weight", lambda a: dict(weight=a["weight"].double()), TypeError),
    _row("reward_at_last_token", "shape", "last_index", lambda a: dict(last_index=a["last_index"][:2]), ValueError),
    _row("reward_at_last_token", "shape", "weight", lambda a: dict(weight=_f(2, 8)), ValueError),
    _row("reward_at_last_token", "shape", "bias", lambda a: dict(bias=_f(2)), ValueError),
    _row("reward_at_last_token", "device", "last_index", lambda a: dict(last_index=_meta(a["last_index"])),
         ValueError),
    # ---- token_logprobs
    _row("token_logprobs", "dtype", "logits", lambda a: dict(logits=a["logits"].int()), TypeError),
    _row("token_logprobs", "dtype", "tokens", lambda a: dict(tokens=a["tokens"].int()), TypeError),
    _row("token_logprobs", "shape", "tokens", lambda a: dict(tokens=a["tokens"][:2]), ValueError),
    _row("token_logprobs", "device", "tokens", lambda a: dict(tokens=_meta(a["tokens"])), ValueError),
    _row("token_logprobs", "nonfinite", "temperature", lambda a: dict(temperature=math.inf), ValueError),
    _row("token_logprobs", "nonfinite", "temperature", lambda a: dict(temperature=math.nan), ValueError),
    _row("token_logprobs", "unknown_string", "backend", lambda a: dict(backend="torch"), ValueError),
    # ---- kl_penalty
    _row("kl_penalty", "dtype", "logits", lambda a: dict(logits=a["logits"].long()), TypeError),
    _row("kl_penalty", "dtype", "ref_logits", lambda a: dict(ref_logits=a["ref_logits"].double()), TypeError),
    _row("kl_penalty", "dtype", "tokens", lambda a: dict(tokens=a["tokens"].float()), TypeError),
    _row("kl_penalty", "dtype", "mask", lambda a: dict(mask=a["mask"].to(torch.complex64)), TypeError),
    _row("kl_penalty", "shape", "ref_logits", lambda a: dict(ref_logits=a["ref_logits"][:, :5]), ValueError),
    _row("kl_penalty", "shape", "mask", lambda a: dict(mask=a["mask"][:2]), ValueError),
    _row("kl_penalty", "device", "ref_logits", lambda a: dict(ref_logits=_meta(a["ref_logits"])), ValueError),
    _row("kl_penalty", "device", "mask", lambda a: dict(mask=_meta(a["mask"])), ValueError),
    _row("kl_penalty", "nonfinite", "temperature", lambda a: dict(temperature=math.nan), ValueError),
    _row("kl_penalty", "nonfinite", "beta", lambda a: dict(beta=math.inf), ValueError),
    _row("kl_penalty", "unknown_string", "estimator", lambda a: dict(estimator="k4"), ValueError),
    _row("kl_penalty", "unknown_string", "backend", lambda a: dict(backend="nope"), ValueError),
    _row("kl_penalty", "requires_grad", "ref_logits", lambda a: dict(ref_logits=a["ref_logits"].requires_grad_()),
         ValueError, NO_GRAD.format(arg="ref_logits")),
    _row("kl_penalty", "requires_grad", "mask", lambda a: dict(mask=a["mask"].float().requires_grad_()),
         ValueError, NO_GRAD.format(arg="float mask")),
    # ---- ppo_rewards
    _row("ppo_rewards", "dtype", "penalty", lambda a: dict(penalty=a["penalty"].long()), TypeError),
    _row("ppo_rewards", "dtype", "scores", lambda a: dict(scores=a["scores"].long()), TypeError),
    _row("ppo_rewards", "dtype", "mask", lambda a: dict(mask=a["mask"].to(torch.complex64)), TypeError),
    _row("ppo_rewards", "shape", "scores", lambda a: dict(scores=_f(3)), ValueError),
    _row("ppo_rewards", "shape", "mask", lambda a: dict(mask=a["mask"][:, :4]), ValueError),
    _row("ppo_rewards", "device", "scores", lambda a: dict(scores=_meta(a["scores"])), ValueError),
    _row("ppo_rewards", "requires_grad", "mask", lambda a: dict(mask=a["mask"].float().requires_grad_()),
         ValueError, NO_GRAD.format(arg="float mask")),
    # ---- linear_token_logprobs
    _row("linear_token_logprobs", "dtype", "hidden", lambda a: dict(hidden=a["hidden"].long()), TypeError),
    _row("linear_token_logprobs", "dtype", "bias", lambda a: dict(bias=a["bias"].double()), TypeError),
    _row("linear_token_logprobs", "dtype", "tokens", lambda a: dict(tokens=a["tokens"].float()), TypeError),
    _row("linear_token_logprobs", "shape", "weight", lambda a: dict(weight=_f(11, 9)), ValueError),
    _row("linear_token_logprobs", "shape", "tokens", lambda a: dict(tokens=a["tokens"][:1]), ValueError),
    _row("linear_token_logprobs", "device", "weight", lambda a: dict(weight=_meta(a["weight"])), ValueError),
    _row("linear_token_logprobs", "nonfinite", "temperature", lambda a: dict(temperature=-math.inf), ValueError),
    _row("linear_token_logprobs", "unknown_string", "backend", lambda a: dict(backend="nope"), ValueError),
    # ---- kl_from_logprobs
    _row("kl_from_logprobs", "dtype", "logprobs", lambda a: dict(logprobs=a["logprobs"].long()), TypeError),
    _row("kl_from_logprobs", "dtype", "ref_logprobs", lambda a: dict(ref_logprobs=a["ref_logprobs"].long()),
         TypeError),
    _row("kl_from_logprobs", "shape", "ref_logprobs", lambda a: dict(ref_logprobs=a["ref_logprobs"][0]), ValueError),
    _row("kl_from_logprobs", "shape", "mask", lambda a: dict(mask=a["mask"][:1]), ValueError),
    _row("kl_from_logprobs", "device", "ref_logprobs", lambda a: dict(ref_logprobs=_meta(a["ref_logprobs"])),
         ValueError),
    _row("kl_from_logprobs", "nonfinite", "beta", lambda a: dict(beta=math.nan), ValueError),
    _row("kl_from_logprobs", "unknown_string", "estimator", lambda a: dict(estimator="kl"), ValueError),
    _row("kl_from_logprobs", "requires_grad", "ref_logprobs",
         lambda a: dict(ref_logprobs=a["ref_logprobs"].requires_grad_()), ValueError,
         NO_GRAD.format(arg="ref_logprobs")),
]

# ---- the policy / value / preference losses, GAE, group advantages (rlhf_ops/losses.py; its own
# bad-input cases are in tests/test_losses.py)
CASES += [
    _row("policy_loss", "dtype", "old_logprobs", lambda a: dict(old_logprobs=a["old_logprobs"].long()), TypeError),
    _row("policy_loss", "shape", "advantages", lambda a: dict(advantages=_f(3)), ValueError),
    _row("policy_loss", "device", "old_logprobs", lambda a: dict(old_logprobs=_meta(a["old_logprobs"])), ValueError),
    _row("policy_loss", "nonfinite", "beta", lambda a: dict(beta=math.nan), ValueError),
    _row("policy_loss", "negative_size", "max_len", lambda a: dict(loss_type="dr_grpo", max_len=-1), ValueError),
    _row("policy_loss", "unknown_string", "loss_type", lambda a: dict(loss_type="ppo2"), ValueError),
    _row("value_loss", "dtype", "returns", lambda a: dict(returns=a["returns"].long()), TypeError),
    _row("value_loss", "shape", "old_values", lambda a: dict(old_values=_f(2, 4)), ValueError),
    _row("value_loss", "device", "returns", lambda a: dict(returns=_meta(a["returns"])), ValueError),
    _row("value_loss", "nonfinite", "clip", lambda a: dict(clip=math.nan), ValueError),
    _row("value_loss", "negative_size", "num_tokens", lambda a: dict(num_tokens=-3), ValueError),
    _row("gae", "dtype", "rewards", lambda a: dict(rewards=a["rewards"].long()), TypeError),
    _row("gae", "shape", "values", lambda a: dict(values=_f(5, 2)), ValueError),
    _row("gae", "device", "values", lambda a: dict(values=_meta(a["values"])), ValueError),
    _row("gae", "nonfinite", "gamma", lambda a: dict(gamma=math.nan), ValueError),
    _row("gae", "unknown_string", "backend", lambda a: dict(backend="loop"), ValueError),
    _row("group_advantages", "dtype", "scores", lambda a: dict(scores=a["scores"].long()), TypeError),
    _row("group_advantages", "shape", "scores", lambda a: dict(scores=_f(2, 3)), ValueError),
    _row("group_advantages", "nonfinite", "eps", lambda a: dict(eps=math.inf), ValueError),
    _row("group_advantages", "negative_size", "group_size", lambda a: dict(group_size=-3), ValueError),
    _row("group_advantages", "unknown_string", "scale", lambda a: dict(scale="std"), ValueError),
    _row("sequence_logprobs", "dtype", "logprobs", lambda a: dict(logprobs=a["logprobs"].long()), TypeError),
    _row("sequence_logprobs", "shape", "mask", lambda a: dict(mask=a["mask"][:1]), ValueError),
    _row("sequence_logprobs", "device", "mask", lambda a: dict(mask=_meta(a["mask"])), ValueError),
    _row("sequence_logprobs", "unknown_string", "reduce", lambda a: dict(reduce="max"), ValueError),
    _row("preference_loss", "dtype", "chosen_logps", lambda a: dict(chosen_logps=a["chosen_logps"].long()),
         TypeError),
    _row("preference_loss", "shape", "rejected_logps", lambda a: dict(rejected_logps=_f(4)), ValueError),
    _row("preference_loss", "device", "ref_chosen_logps",
         lambda a: dict(ref_chosen_logps=_meta(a["ref_chosen_logps"])), ValueError),
    _row("preference_loss", "nonfinite", "beta", lambda a: dict(beta=math.inf), ValueError),
    _row("preference_loss", "negative_size", "chosen_lengths",
         lambda a: dict(loss_type="ipo", chosen_lengths=torch.tensor([3, -1, 2]),
                        rejected_lengths=torch.tensor([2, 2, 2])), ValueError),
    _row("preference_loss", "unknown_string", "loss_type", lambda a: dict(loss_type="kto"), ValueError),
]

# vocabulary-parallel options of the five vocabulary ops
CASES += [_row(fn, "dtype", "process_group", lambda a: dict(process_group="world"), TypeError) for fn in VP_OPS]
CASES += [_row(fn, "negative_size", "vocab_offset", lambda a: dict(vocab_offset=-2), ValueError)
          for fn in VP_OPS]

# the logit softcap of the four LM-head ops: a finite number ≥ 0 (a tensor is a TypeError)
SOFTCAP_OPS = ("cross_entropy", "linear_cross_entropy", "token_logprobs", "linear_token_logprobs")
CASES += [_row(fn, "nonfinite", "softcap", lambda a: dict(softcap=math.nan), ValueError) for fn in SOFTCAP_OPS]
CASES += [_row(fn, "dtype", "softcap", lambda a: dict(softcap=torch.tensor(30.0, requires_grad=True)), TypeError)
          for fn in SOFTCAP_OPS]

# Kinds a function has no argument for (so no row can exist).
NOT_APPLICABLE = {
    "attention": {"requires_grad": "q, k, v all take gradients"},
    "attention_varlen": {"requires_grad": "cu_seqlens are int32 (cannot require grad)"},
    "attention_tree": {"requires_grad": "cu_seqlens and parent are int32 (cannot require grad)"},
    "unpad": {"nonfinite": "no scalar option", "negative_size": "no size argument",
              "unknown_string": "no string option", "requires_grad": "x takes a gradient, the mask is integer"},
    "pad": {"nonfinite": "no scalar option", "unknown_string": "no string option",
            "requires_grad": "x_packed takes a gradient, indices are int64"},
    "cross_entropy": {"requires_grad": "target is int64"},
    "linear_cross_entropy": {"requires_grad": "hidden, weight, bias take gradients"},
    "pairwise_reward_loss": {"negative_size": "no size argument"},
    "reward_at_last_token": {"nonfinite": "no scalar option", "negative_size": "no size argument",
                             "unknown_string": "no string option",
                             "requires_grad": "hidden, weight, bias take gradients"},
    "token_logprobs": {"requires_grad": "tokens are int64"},
    "kl_penalty": {},
    "ppo_rewards": {"nonfinite": "no scalar option", "negative_size": "no size argument",
                    "unknown_string": "no string option"},
    "linear_token_logprobs": {"requires_grad": "hidden, weight, bias take gradients"},
    "kl_from_logprobs": {"negative_size": "no size argument"},
    # DESIGN.md: the inputs without a gradient in the formulas (old / rollout / ref log-probs,
    # advantages, returns, old values, lengths) are constants: detached, documented
    "policy_loss": {"requires_grad": "old/rollout/ref log-probs and advantages are constants (DESIGN)"},
    "value_loss": {"unknown_string": "no string option",
                   "requires_grad": "old_values and returns are constants (DESIGN)"},
    "gae": {"negative_size": "no size argument", "requires_grad": "gae has no gradient (DESIGN)"},
    "group_advantages": {"device": "one tensor argument", "requires_grad": "scores take a gradient"},
    "sequence_logprobs": {"nonfinite": "no scalar option", "negative_size": "no size argument",
                          "requires_grad": "logprobs take a gradient, the mask is a mask"},
    "preference_loss": {"requires_grad": "ref log-probs and lengths are constants (DESIGN)"},
}


def test_table_is_complete():
    have = {(p.values[0], p.values[1]) for p in CASES}
    missing = []
    for fn in PUBLIC:
        na = NOT_APPLICABLE.get(fn)
        if na is None:
            missing.append(f"{fn}: not in the table")
            continue
        for kind in KINDS:
            if kind not in na and (fn, kind) not in have:
                missing.append(f"{fn} × {kind}")
            if kind in na and (fn, kind) in have:
                missing.append(f"{fn} × {kind}: both a row and 'not applicable'")
    assert not missing, "tests/test_bad_input.py CASES / NOT_APPLICABLE: " + "; ".join(missing)


@pytest.mark.parametrize("fn,kind,arg,build,exc", CASES)
def test_bad_argument(fn, kind, arg, build, exc):
    args = valid(fn)
    over = build(args)
    with pytest.raises(Exception) as info:
        call(fn, **over)
    e = info.value
    assert type(e) is exc, f"{fn} with bad {arg} ({kind}) raised {type(e).__name__}: {e}"
    assert arg in str(e), f"{fn} with bad {arg} ({kind}): the message does not name {arg!r}: {e}"


def test_use_backend_unknown_name():
    with pytest.raises(ValueError, match="use_backend"):
        with ro.use_backend("gpu"):
            pass


def test_non_tensor_arguments_are_type_errors():
    # a list where a tensor belongs: TypeError naming the argument, for each function's first tensor
    firsts = {"attention": "q", "attention_varlen": "q", "attention_tree": "q", "unpad": "x", "pad": "x_packed",
              "cross_entropy": "logits", "linear_cross_entropy": "hidden", "pairwise_reward_loss": "rewards",
              "reward_at_last_token": "hidden", "token_logprobs": "logits", "kl_penalty": "logits",
              "ppo_rewards": "penalty", "linear_token_logprobs": "hidden", "kl_from_logprobs": "logprobs",
              "policy_loss": "logprobs", "value_loss": "values", "gae": "rewards", "group_advantages": "scores",
              "sequence_logprobs": "logprobs", "preference_loss": "chosen_logps"}
    assert set(firsts) == set(PUBLIC), set(PUBLIC) ^ set(firsts)
    bad = []
    for fn, arg in firsts.items():
        try:
            call(fn, **{arg: [[1.0, 2.0]]})
            bad.append(f"{fn}: accepted a list for {arg}")
        except (TypeError, ValueError) as e:
            if arg not in str(e):
                bad.append(f"{fn}: {type(e).__name__} without naming {arg}: {e}")
        except Exception as e:  # noqa: BLE001 - reported below
            bad.append(f"{fn}: {type(e).__name__}: {e}")
    assert not bad, bad
