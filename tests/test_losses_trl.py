"""rlhf_ops' losses against TRL 1.16's own loss code on the same tensors (loss and gradients, 1e-6
in fp32), through rlhf_ops.integrations._trl_losses (the TRL option → policy_loss /
preference_loss mapping):

* GRPOTrainer._compute_loss, called on a stub trainer whose log-prob forward returns our tensors,
  for every TRL loss type it shares with rlhf_ops (grpo, bnpo, dr_grpo, dapo, cispo), GSPO
  (importance_sampling_level="sequence"), every vLLM importance-sampling mode (token/sequence ×
  truncate/mask, one- and two-sided caps), delta, beta (use_bias_correction_kl=False), the entropy
  bonus, training with gradient accumulation and evaluation. The IS ratio that TRL computes in
  its generation step (``_generate_and_score_completions``, inline code) is reproduced here from
  its source, line by line.
* DPOTrainer._compute_loss (stub model returning our per-token log-probs) for "sigmoid", "hinge",
  "ipo", "robust" and a weighted mixture; CPOTrainer.cpo_loss for "sigmoid", "hinge", "ipo",
  "simpo"; ORPOTrainer.odds_ratio_loss.
* Every TRL option the mapping cannot represent raises.

TRL is a test extra (requirements.txt); the module is skipped where it is not installed.
"""
import math
import types
from collections import defaultdict

import pytest
import torch

trl = pytest.importorskip("trl")

from rlhf_ops.integrations import _trl_losses as TL  # noqa: E402

B, T = 6, 9
TOL = 1e-6


def _config(cls, **kw):
    return cls(output_dir="/tmp/rlhf_ops_trl_losses", report_to=[], bf16=False, use_cpu=True, **kw)


@pytest.fixture(scope="module")
def grpo_config():
    from trl import GRPOConfig
    return lambda **kw: _config(GRPOConfig, per_device_train_batch_size=B, num_generations=2, **kw)


class _Accelerator:
    num_processes = 1
    sync_gradients = True
    device = torch.device("cpu")

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


def _grpo_trainer(args, logps, entropies, *, training, accum):
    """A GRPOTrainer without __init__: the attributes _compute_loss reads, set as TRL's __init__
    sets them from the config, and a log-prob forward that returns our tensors."""
    from trl import GRPOTrainer
    t = GRPOTrainer.__new__(GRPOTrainer)
    t.args = args
    t.model = types.SimpleNamespace(training=training)
    t.accelerator = _Accelerator()
    t.loss_type = args.loss_type
    t.beta = args.beta
    t.epsilon_low = args.epsilon
    t.epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    t.importance_sampling_level = args.importance_sampling_level
    t.use_vllm = args.use_vllm
    t.vllm_importance_sampling_correction = args.vllm_importance_sampling_correction
    t.top_entropy_quantile = args.top_entropy_quantile
    t.off_policy_mask_threshold = args.off_policy_mask_threshold
    t.max_completion_length = args.max_completion_length
    t.current_gradient_accumulation_steps = accum
    t.entropy_coef = args.entropy_coef
    t.use_adaptive_entropy = args.use_adaptive_entropy
    t._entropy_bonus_enabled = args.entropy_coef != 0.0 or args.use_adaptive_entropy
    t.aux_loss_enabled = False
    t._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    t._get_per_token_logps_and_entropies = lambda *a, **k: (logps, entropies, None)
    return t


def trl_is_ratio(args, old, sampling, mask):
    """The importance-sampling ratio of GRPOTrainer._generate_and_score_completions (TRL 1.16),
    transcribed from its source."""
    per_token_logps_diff = (old - sampling) * mask
    per_token_logps_diff = torch.nan_to_num(per_token_logps_diff, nan=0.0)
    if args.vllm_importance_sampling_mode in ["sequence_mask", "sequence_truncate"]:
        logps_diff = per_token_logps_diff.sum(dim=-1, keepdim=True)
    else:
        logps_diff = per_token_logps_diff
    ratio = torch.exp(logps_diff)
    if args.vllm_importance_sampling_mode in ["sequence_truncate", "token_truncate"]:
        ratio = torch.clamp(ratio, min=args.vllm_importance_sampling_clip_min, max=args.vllm_importance_sampling_clip_max)
    else:
        lo = args.vllm_importance_sampling_clip_min if args.vllm_importance_sampling_clip_min is not None else -math.inf
        hi = args.vllm_importance_sampling_clip_max if args.vllm_importance_sampling_clip_max is not None else math.inf
        ratio = ratio.masked_fill((ratio < lo) | (ratio > hi), value=0.0)
    return ratio


def _grpo_data(seed):
    g = torch.Generator().manual_seed(seed)
    lp = (-3 * torch.rand(B, T, generator=g)).requires_grad_()
    old = lp.detach() + 0.35 * torch.randn(B, T, generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.2).long()
    mask[0] = 1
    mask[-1] = 0                                    # a completion without tokens
    sampling = old + 0.4 * torch.randn(B, T, generator=g)
    sampling[1, 2] = float("nan")                   # a token vLLM could not score
    return dict(lp=lp, old=old, mask=mask, sampling=sampling,
                ref=lp.detach() + 0.3 * torch.randn(B, T, generator=g),
                adv=torch.randn(B, generator=g), ent=(2 * torch.rand(B, T, generator=g)).requires_grad_())


IS = {   # name → GRPOConfig options
    "no_is": dict(use_vllm=False),
    "token_truncate": dict(vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_max=2.0),
    "token_truncate_2sided": dict(vllm_importance_sampling_mode="token_truncate",
                                  vllm_importance_sampling_clip_min=0.6, vllm_importance_sampling_clip_max=1.6),
    "token_mask": dict(vllm_importance_sampling_mode="token_mask", vllm_importance_sampling_clip_max=1.5),
    "token_mask_2sided": dict(vllm_importance_sampling_mode="token_mask", vllm_importance_sampling_clip_min=0.7,
                              vllm_importance_sampling_clip_max=1.5),
    "sequence_truncate": dict(vllm_importance_sampling_mode="sequence_truncate",
                              vllm_importance_sampling_clip_max=1.8),
    "sequence_mask": dict(vllm_importance_sampling_mode="sequence_mask", vllm_importance_sampling_clip_max=2.5),
    "sequence_mask_2sided": dict(vllm_importance_sampling_mode="sequence_mask", vllm_importance_sampling_clip_min=0.5,
                                 vllm_importance_sampling_clip_max=2.0),
    "sequence_mask_no_cap": dict(vllm_importance_sampling_mode="sequence_mask", vllm_importance_sampling_clip_min=0.4,
                                 vllm_importance_sampling_clip_max=None),
}
EXTRAS = {
    "plain": {},
    "asym_clip": dict(epsilon=0.15, epsilon_high=0.28),
    "delta": dict(delta=1.3),
    "kl": dict(beta=0.05, use_bias_correction_kl=False),
    "entropy": dict(entropy_coef=0.02),
}
CISPO = dict(epsilon_high=2.5)   # TRL's cispo cap is epsilon_high itself (ScaleRL: 5.0)


def _grpo_cases():
    out = []
    for lt in TL.GRPO_TYPES:
        for is_name in IS:
            out.append((lt, "token", is_name, "plain"))
        for ex in EXTRAS:
            if ex != "plain":
                out.append((lt, "token", "token_mask" if ex != "kl" else "sequence_truncate", ex))
    for is_name in ("no_is", "sequence_truncate", "sequence_mask_2sided"):
        for ex in ("plain", "kl", "asym_clip"):
            out.append(("grpo", "sequence", is_name, ex))      # GSPO
    return [pytest.param(*c, id="-".join(c)) for c in out]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("lt,level,is_name,extra", _grpo_cases())
def test_grpo_loss_equals_trl(grpo_config, lt, level, is_name, extra, training):
    opts = dict(loss_type=lt, importance_sampling_level=level, max_completion_length=12,
                steps_per_generation=4, gradient_accumulation_steps=2, **EXTRAS[extra])
    if is_name != "no_is":
        opts.update(use_vllm=True, vllm_importance_sampling_correction=True, **IS[is_name])
    if lt == "cispo":
        opts.update({k: v for k, v in CISPO.items() if "epsilon_high" not in EXTRAS[extra]})
        opts["epsilon_high"] = opts["epsilon_high"] + (1.0 if extra == "asym_clip" else 0.0)
    args = grpo_config(**opts)
    d = _grpo_data(hash((lt, level, is_name, extra)) % 1000)
    accum = 2
    num_items = torch.tensor(float(d["mask"].sum() * 3))        # the generation batch's token count
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": d["mask"],
              "advantages": d["adv"], "old_per_token_logps": d["old"], "num_items_in_batch": num_items}
    if args.beta != 0:
        inputs["ref_per_token_logps"] = d["ref"]
    if args.use_vllm:
        inputs["importance_sampling_ratio"] = trl_is_ratio(args, d["old"], d["sampling"], d["mask"])
    trainer = _grpo_trainer(args, d["lp"], d["ent"], training=training, accum=accum)
    ref = trainer._compute_loss(None, inputs)
    ours = TL.grpo_loss(args, d["lp"], d["old"], d["adv"], d["mask"], sampling_per_token_logps=d["sampling"],
                        ref_per_token_logps=d["ref"], entropies=d["ent"], num_items_in_batch=num_items,
                        gradient_accumulation_steps=accum, training=training)
    assert abs(float(ours.detach()) - float(ref.detach())) <= TOL * (1 + abs(float(ref.detach()))), (ours, ref)
    leaves = [d["lp"], d["ent"]]
    g_ref = torch.autograd.grad(ref, leaves, allow_unused=True)
    g_ours = torch.autograd.grad(ours, leaves, allow_unused=True)
    for a, b, name in zip(g_ours, g_ref, ("logprobs", "entropy")):
        a = torch.zeros_like(leaves[0]) if a is None else a
        b = torch.zeros_like(leaves[0]) if b is None else b
        assert torch.allclose(a, b, rtol=TOL, atol=TOL), (name, (a - b).abs().max())


def test_grpo_on_policy_old_logprobs_none(grpo_config):
    """TRL skips old log-probs when generation and optimisation are aligned (old = logps.detach())."""
    args = grpo_config(loss_type="dapo", steps_per_generation=1)
    d = _grpo_data(7)
    n = d["mask"].sum().float()
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": d["mask"],
              "advantages": d["adv"], "num_items_in_batch": n}
    ref = _grpo_trainer(args, d["lp"], d["ent"], training=True, accum=1)._compute_loss(None, inputs)
    ours = TL.grpo_loss(args, d["lp"], None, d["adv"], d["mask"], num_items_in_batch=n)
    assert abs(float(ours.detach()) - float(ref.detach())) <= TOL
    assert torch.allclose(torch.autograd.grad(ours, d["lp"])[0], torch.autograd.grad(ref, d["lp"])[0], atol=TOL)


REFUSED = [
    ("loss_type", dict(loss_type="sapo")),
    ("loss_type", dict(loss_type="vespo")),
    ("importance_sampling_level", dict(loss_type="dapo", importance_sampling_level="sequence")),
    ("token-level", dict(loss_type="grpo", importance_sampling_level="sequence", use_vllm=True,
                         vllm_importance_sampling_mode="token_truncate")),
    ("use_bias_correction_kl", dict(beta=0.1)),
    ("top_entropy_quantile", dict(top_entropy_quantile=0.2)),
    ("off_policy_mask_threshold", dict(off_policy_mask_threshold=0.5)),
    ("use_adaptive_entropy", dict(use_adaptive_entropy=True)),
    ("delta", dict(delta=1.1, epsilon_high=0.28)),
    ("epsilon_high", dict(loss_type="cispo")),      # TRL's default cap epsilon_high = epsilon = 0.2 < 1
]


@pytest.mark.parametrize("name,opts", REFUSED, ids=[f"{n}-{i}" for i, (n, _) in enumerate(REFUSED)])
def test_grpo_options_that_cannot_be_represented_raise(grpo_config, name, opts):
    args = grpo_config(**opts)
    with pytest.raises(ValueError, match=name):
        TL.grpo_loss_kwargs(args)


def test_grpo_mapping():
    """The documented parameter mapping, read off plain attribute bags."""
    ns = types.SimpleNamespace
    assert TL.grpo_loss_kwargs(ns(loss_type="cispo", epsilon=0.2, epsilon_high=5.0)) == {
        "loss_type": "cispo", "clip": (0.2, 4.0)}
    kw = TL.grpo_loss_kwargs(ns(loss_type="dr_grpo", epsilon=0.2, epsilon_high=0.28, delta=2.0, max_completion_length=64,
                                beta=0.04, use_bias_correction_kl=False, use_vllm=True,
                                vllm_importance_sampling_correction=True, vllm_importance_sampling_mode="token_mask",
                                vllm_importance_sampling_clip_min=0.5, vllm_importance_sampling_clip_max=2.0))
    assert kw == {"loss_type": "dr_grpo", "clip": (0.2, 0.28), "dual_clip": 2.0, "max_len": 64, "beta": 0.04,
                  "kl_estimator": "k3", "is_correction": "token_mask", "is_cap": (0.5, 2.0)}
    assert TL.grpo_loss_kwargs(ns(loss_type="grpo", importance_sampling_level="sequence"))["loss_type"] == "gspo"


# ==================================================================================== DPO ===

def _dpo_trainer(args, log_probs):
    from trl import DPOTrainer
    t = DPOTrainer.__new__(DPOTrainer)
    t.args = args
    out = types.SimpleNamespace(log_probs=log_probs, entropy=torch.zeros_like(log_probs),
                                mean_logits=torch.zeros_like(log_probs),
                                is_top1=torch.zeros(log_probs.shape, dtype=torch.bool), aux_loss=None)
    t.model = types.SimpleNamespace(training=True)
    model = lambda **kw: out          # noqa: E731 - TRL calls model(**inputs, labels=..., fused_lm_head=True)
    t.accelerator = _Accelerator()
    t.aux_loss_enabled = False
    t.beta = args.beta
    t.precompute_ref_logps = True
    t.loss_types = args.loss_type
    t.loss_weights = args.loss_weights or [1.0] * len(args.loss_type)
    t.ld_alpha = args.ld_alpha
    t.f_divergence_type = args.f_divergence_type
    t.label_smoothing = args.label_smoothing
    t.use_weighting = args.use_weighting
    t._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    t._total_train_tokens = 0
    t._tp_size = 1
    return t, model


DPO_CASES = [dict(loss_type=["sigmoid"]), dict(loss_type=["sigmoid"], beta=0.5), dict(loss_type=["hinge"]),
             dict(loss_type=["ipo"]), dict(loss_type=["ipo"], beta=1.0), dict(loss_type=["robust"], label_smoothing=0.2),
             dict(loss_type=["sigmoid", "ipo", "hinge"], loss_weights=[0.8, 0.2, 1.0])]


@pytest.mark.parametrize("opts", DPO_CASES, ids=lambda o: "-".join(o["loss_type"]) + "-" + "-".join(
    f"{k}{v}" for k, v in o.items() if k != "loss_type"))
def test_dpo_loss_equals_trl(opts):
    from trl import DPOConfig
    args = _config(DPOConfig, **opts)
    g = torch.Generator().manual_seed(3)
    P, L = 4, 10
    completion_mask = torch.zeros(2 * P, L, dtype=torch.long)
    for i, n in enumerate([3, 7, 9, 5, 8, 2, 6, 9]):
        completion_mask[i, L - n:] = 1                      # prompt first, then the completion
    shift = completion_mask[:, 1:]
    lp = (-torch.rand(2 * P, L - 1, generator=g) * 4).requires_grad_()
    log_probs = lp * shift                                   # the fused head's zero at masked labels
    ref_c, ref_r = -torch.rand(P, generator=g) * 20, -torch.rand(P, generator=g) * 20
    trainer, model = _dpo_trainer(args, log_probs)
    inputs = {"input_ids": torch.zeros(2 * P, L, dtype=torch.long), "attention_mask": torch.ones(2 * P, L),
              "completion_mask": completion_mask, "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
    ref = trainer._compute_loss(model, inputs, return_outputs=False)
    ours = TL.dpo_loss(args, log_probs, ref_c, ref_r, completion_mask)
    assert abs(float(ours.detach()) - float(ref.detach())) <= TOL * (1 + abs(float(ref.detach()))), (ours, ref)
    a, b = torch.autograd.grad(ours, lp, retain_graph=True)[0], torch.autograd.grad(ref, lp)[0]
    assert torch.allclose(a, b, rtol=TOL, atol=TOL), (a - b).abs().max()


@pytest.mark.parametrize("opts,name", [(dict(loss_type=["exo_pair"], label_smoothing=1e-3), "loss_type"),
                                       (dict(f_divergence_type="js_divergence"), "f_divergence_type"),
                                       (dict(ld_alpha=0.5), "ld_alpha"), (dict(use_weighting=True), "use_weighting")])
def test_dpo_options_that_cannot_be_represented_raise(opts, name):
    from trl import DPOConfig
    with pytest.raises(ValueError, match=name):
        TL.dpo_loss_kwargs(_config(DPOConfig, **opts))


# ============================================================================== CPO / ORPO ===

def _pairs(seed):
    g = torch.Generator().manual_seed(seed)
    P = 5
    lc, lr = torch.randint(2, 30, (P,), generator=g), torch.randint(2, 30, (P,), generator=g)
    c = (-torch.rand(P, generator=g) * lc * 1.5).requires_grad_()
    r = (-torch.rand(P, generator=g) * lr * 1.5).requires_grad_()
    return c, r, lc, lr


@pytest.mark.parametrize("opts", [dict(loss_type="sigmoid"), dict(loss_type="sigmoid", label_smoothing=0.1),
                                  dict(loss_type="hinge", beta=0.5), dict(loss_type="ipo"),
                                  dict(loss_type="simpo", simpo_gamma=0.5, beta=2.0),
                                  dict(loss_type="simpo", simpo_gamma=1.0, beta=2.5, label_smoothing=0.2)],
                         ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()))
def test_cpo_loss_equals_trl(opts):
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    args = _config(CPOConfig, **opts)
    t = CPOTrainer.__new__(CPOTrainer)
    t.alpha, t.loss_type, t.beta = args.alpha, args.loss_type, args.beta
    t.simpo_gamma, t.label_smoothing, t.accelerator = args.simpo_gamma, args.label_smoothing, _Accelerator()
    c, r, lc, lr = _pairs(5)
    avg = args.loss_type in ("ipo", "simpo")                   # CPO's concatenated_forward averages for these
    losses, _, _ = t.cpo_loss(c / lc if avg else c, r / lr if avg else r)
    ref = losses.mean()
    ours = TL.cpo_loss(args, c, r, lc, lr)
    assert abs(float(ours.detach()) - float(ref.detach())) <= TOL * (1 + abs(float(ref.detach())))
    for a, b in zip(torch.autograd.grad(ours, [c, r]), torch.autograd.grad(ref, [c, r])):
        assert torch.allclose(a, b, rtol=TOL, atol=TOL)


def test_cpo_alphapo_raises():
    from trl.experimental.cpo import CPOConfig
    with pytest.raises(ValueError, match="alpha"):
        TL.cpo_loss_kwargs(_config(CPOConfig, alpha=0.5))


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_orpo_loss_equals_trl(beta):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    args = _config(ORPOConfig, beta=beta)
    t = ORPOTrainer.__new__(ORPOTrainer)
    t.beta, t.accelerator = args.beta, _Accelerator()
    c, r, lc, lr = _pairs(9)
    losses = t.odds_ratio_loss(c / lc, r / lr)[0]
    ref = -losses.mean()                        # ORPO's loss is nll − mean(losses)
    ours = TL.orpo_loss(args, c, r, lc, lr)
    assert abs(float(ours.detach()) - float(ref.detach())) <= TOL * (1 + abs(float(ref.detach())))
    for a, b in zip(torch.autograd.grad(ours, [c, r]), torch.autograd.grad(ref, [c, r])):
        assert torch.allclose(a, b, rtol=TOL, atol=TOL)
