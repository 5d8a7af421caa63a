"""rlhf_ops.integrations.trl against TRL itself (the pinned version), on tiny random-init models.

* reward loss: TRL's −log σ(r_c − r_r − margin) formula, K-wise ranked batches, and a real
  ``RewardTrainer`` run (TRL's loss, eager attention) vs ours (apply_rlhf_ops + rlhf_ops' loss):
  the same per-step losses and the same final weights (SGD, so that the comparison stays tight);
* the fused LM head vs TRL's own ``add_fused_lm_head`` (every output — log-probs, entropy,
  log Σp², mean logit, top-1 —, loss, gradients, temperature, logit scale, shift_labels,
  num_items_in_batch, an all-ignored batch, bf16 on Triton), the extra outputs against their fp64
  definition;
* TRL's SFT, DPO, KTO, GRPO and RLOO trainers with ``FusedLMHeadMixin`` (+ apply_rlhf_ops) vs the
  plain trainers: every logged metric step by step, the final parameters; GRPO and DPO losses
  through rlhf_ops; options that cannot be represented raise; the one-time log line;
* GRPO's KL from stored log-probs; the policy-gradient example vs its unpatched run;
* bad use raises.
"""
import copy
import importlib.util
import logging
import random
from unittest import mock
import pathlib
import sys
import tempfile

import pytest
import torch

tf = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from transformers import PrinterCallback  # noqa: E402
from trl.trainer.utils import add_fused_lm_head as trl_fused_lm_head  # noqa: E402

import rlhf_ops as ro  # noqa: E402
from rlhf_ops.integrations.transformers import apply_rlhf_ops  # noqa: E402
from rlhf_ops.integrations.trl import (DataCollatorForRankedPreference, FusedLMHeadMixin,  # noqa: E402
                                       RewardTrainer, add_fused_lm_head, per_token_kl, reward_loss)
import rlhf_ops.integrations.trl as trl_integration  # noqa: E402
from _util import assert_matches, rel_err  # noqa: E402
from conftest import DEVICE, backend_problem  # noqa: E402

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
TOL = 1e-5


def _example(name):
    spec = importlib.util.spec_from_file_location(f"_example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(params=["reference", "triton"])
def backend(request):
    why = backend_problem(request.param)
    if why:
        pytest.skip(why)
    return request.param


def _llama(layers=1, vocab=97, seed=0, **over):
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, initializer_range=0.2, pad_token_id=0, **over)
    return tf.LlamaForCausalLM(cfg).to(DEVICE)


# ----------------------------------------------------------------------------- reward loss ---

@pytest.mark.parametrize("margin", [None, 0.5, "tensor"])
def test_reward_loss_is_trls_formula(backend, margin):
    B = 7
    c = torch.randn(B, device=DEVICE, requires_grad=True)
    r = torch.randn(B, device=DEVICE, requires_grad=True)
    m = torch.rand(B, device=DEVICE) * 2 if margin == "tensor" else margin
    ours = reward_loss(c, r, m, backend=backend)
    want = -torch.nn.functional.logsigmoid(c.double() - r.double() - (0.0 if m is None else
                                           (m.double() if torch.is_tensor(m) else m))).mean()
    assert rel_err(ours, want) <= TOL
    g_ours = torch.autograd.grad(ours, (c, r))
    g_want = torch.autograd.grad(want, (c, r))
    for a, b in zip(g_ours, g_want):
        assert rel_err(a, b) <= TOL


def test_ranked_collator():
    col = DataCollatorForRankedPreference(pad_token_id=0)
    out = col([{"responses_ids": [[5, 6, 7], [8], [9, 9]], "ranks": [1, 0, 2], "margin": 0.5},
               {"responses_ids": [[3, 4], [2, 2, 2, 2]], "ranks": [0, 1], "margin": 0.0}])
    assert out["input_ids"].shape == (6, 4) and out["attention_mask"].shape == (6, 4)
    assert out["input_ids"][0].tolist() == [5, 6, 7, 0] and out["attention_mask"][0].tolist() == [1, 1, 1, 0]
    assert out["attention_mask"][5].sum() == 0                      # the absent third response
    assert out["ranks"].tolist() == [[1, 0, 2], [0, 1, -1]]
    assert out["margin"].tolist() == [0.5, 0.0]
    with pytest.raises(ValueError, match="2 responses_ids but 3 ranks"):
        col([{"responses_ids": [[1], [2]], "ranks": [0, 1, 2]}])


def _rm_run(mod, baseline, backend, steps, batch_size):
    model = mod.make_model(layers=1)
    return mod.run(steps, baseline=baseline, backend=backend, layers=1, batch_size=batch_size,
                   n_examples=batch_size * steps, model=model, eval_pairs=0, log=False)


def test_reward_trainer_matches_trl(backend):
    mod = _example("reward_model_trl")
    steps, batch_size = (3, 8) if backend == "reference" else (2, 3)   # the interpreter is slow
    base = _rm_run(mod, True, None, steps, batch_size)
    ours = _rm_run(mod, False, backend, steps, batch_size)
    assert len(base["losses"]) == len(ours["losses"]) == steps
    for a, b in zip(ours["losses"], base["losses"]):
        assert abs(a - b) <= TOL * abs(b) + 1e-7, (ours["losses"], base["losses"])
    for (n, p), q in zip(ours["model"].named_parameters(), base["model"].parameters()):
        assert rel_err(p, q) <= TOL, n


def test_reward_trainer_ranked_batches():
    """K-wise ranked data: the first step's loss is pairwise_reward_loss of the initial model's
    rewards, each response scored on its own by the eager model."""
    mod = _example("reward_model_trl")
    data = mod.make_dataset(8, ranked=4)
    init = mod.make_model(layers=1)
    with torch.no_grad():
        B, K = len(data), max(len(ex["ranks"]) for ex in data)
        rewards = torch.zeros(B, K, dtype=torch.float64)
        ranks = torch.full((B, K), -1)
        for b, ex in enumerate(data):
            for j, ids in enumerate(ex["responses_ids"]):
                rewards[b, j] = init(input_ids=torch.tensor([ids])).logits.item()
                ranks[b, j] = ex["ranks"][j]
    want = ro.pairwise_reward_loss(rewards, ranks, backend="reference").item()
    assert (ranks < 0).any() and (ranks.max(1).values >= 2).all()   # absent responses, K-wise
    out = mod.run(1, ranked=4, layers=1, n_examples=8, model=copy.deepcopy(init), eval_pairs=0,
                  log=False, backend="reference")
    assert abs(out["losses"][0] - want) <= TOL * want


# --------------------------------------------------------------------------- fused LM head ---

ALL_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def _pair(temperature=1.0, outputs=ALL_OUTPUTS, backend="reference", **over):
    a = _llama(**over)
    b = copy.deepcopy(a)
    trl_fused_lm_head(a, temperature=temperature, outputs=outputs)
    add_fused_lm_head(b, temperature=temperature, outputs=outputs, backend=backend)
    return a, b


def _compare_heads(a, b, kw):
    oa, ob = a(**kw, fused_lm_head=True), b(**kw, fused_lm_head=True)
    assert type(ob) is type(oa)
    assert torch.equal(ob.label_mask, oa.label_mask)
    for f in ALL_OUTPUTS:
        x, y = getattr(ob, f), getattr(oa, f)
        assert (x is None) == (y is None), f
        if x is None:
            continue
        assert x.shape == y.shape and x.dtype == y.dtype, f
        if f == "is_top1":
            assert torch.equal(x, y)
        else:
            assert rel_err(x, y) <= TOL, f
        assert x.requires_grad == y.requires_grad, f            # only log_probs and entropy
    assert rel_err(ob.loss, oa.loss) <= TOL
    obj_a = oa.loss + (0 if oa.entropy is None else 0.1 * oa.entropy.sum())
    obj_b = ob.loss + (0 if ob.entropy is None else 0.1 * ob.entropy.sum())
    obj_a.backward()
    obj_b.backward()
    for (n, p), q in zip(b.named_parameters(), a.parameters()):
        assert rel_err(p.grad, q.grad) <= TOL, n
    return ob


def _lm_batch(B=3, T=9, seed=1, model=None):
    """Left-padded rows with masked prompt tokens. With ``model``, every other label is the
    model's own top-1 token there, so that is_top1 holds for some tokens and not for others."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 97, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :3] = 0                                   # left padding, as for prompts
    ids = ids.masked_fill(mask == 0, 0)
    if model is not None:                             # greedy continuation at odd positions
        with torch.no_grad():
            for t in range(5, T, 2):
                ids[:, t] = model(input_ids=ids[:, :t].to(DEVICE),
                                  attention_mask=mask[:, :t].to(DEVICE)).logits[:, -1].argmax(-1).cpu()
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :5] = -100                              # prompt tokens
    return {k: v.to(DEVICE) for k, v in dict(input_ids=ids, attention_mask=mask, labels=labels).items()}


def test_fused_lm_head_matches_trls(backend):
    """Every output of TRL's head — log-probs, entropy, log Σp², mean logit, top-1 — at a
    temperature, with a logit scale folded in; loss and gradients."""
    a, b = _pair(temperature=0.7, backend=backend)
    for m in (a, b):
        m.config.logit_scale = 2.5
    out = _compare_heads(a, b, _lm_batch(model=a))
    assert 0 < int(out.is_top1.sum()) < int(out.label_mask.sum())   # both outcomes occur


def test_fused_lm_head_softcap_matches_trls(backend):
    """Gemma-style final_logit_softcapping c (here with a logit scale and a temperature): every
    output of TRL's head, which takes c·tanh(scale·z/c) / T, loss and gradients; c = 1 bites on
    these logits (|z| ~ 3)."""
    a, b = _pair(temperature=0.7, backend=backend, logit_scale=1.5, final_logit_softcapping=1.0)
    inp = _lm_batch(model=a)
    out = _compare_heads(a, b, inp)
    assert 0 < int(out.is_top1.sum()) < int(out.label_mask.sum())
    _, plain = _pair(temperature=0.7, backend=backend, logit_scale=1.5)
    assert rel_err(plain(**inp, fused_lm_head=True).log_probs, out.log_probs) > 0.05


def test_log_sum_sq_probs_against_fp64_definition():
    """log Σ p² with y = (h Wᵀ + b) / T from its definition in fp64, over row blocks smaller than
    the batch (is_top1 and mean_logits come from linear_token_logprobs: test_linear_logprobs_stats)."""
    g = torch.Generator().manual_seed(0)
    n, d, V = 13, 8, 37
    h = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(V, d, generator=g, dtype=torch.float64)
    b = torch.randn(V, generator=g, dtype=torch.float64)
    p = ((h @ w.T + b) / 0.7).softmax(-1)
    with mock.patch.object(trl_integration, "STATS_BLOCK_BYTES", 5 * V * 8):  # blocks of 5 rows
        got = trl_integration._log_sum_sq_probs(h, w, b, 0.7)
    assert got.dtype == torch.float64 and rel_err(got, (p * p).sum(-1).log()) <= 1e-12


def test_fused_lm_head_options_match_trls():
    inp = _lm_batch()
    a, b = _pair(outputs=("log_probs",))                             # no entropy
    _compare_heads(a, b, dict(inp, num_items_in_batch=torch.tensor(5)))
    a, b = _pair()
    shift = inp["labels"].clone()
    _compare_heads(a, b, dict(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"],
                              shift_labels=shift))                   # scored as given
    a, b = _pair(temperature=1.3)
    _compare_heads(a, b, inp)
    a, b = _pair()
    _compare_heads(a, b, dict(inp, labels=torch.full_like(inp["labels"], -100)))   # all ignored
    _, b = _pair()
    out = b(**dict(inp, labels=torch.full_like(inp["labels"], -100)), fused_lm_head=True)
    assert out.loss.item() == 0.0 and out.loss.requires_grad


def test_fused_lm_head_with_patched_attention_and_generation():
    """apply_rlhf_ops and the fused head together; generate() is the model's own."""
    a, b = _pair()
    apply_rlhf_ops(b, loss=False, backend="reference")
    _compare_heads(a, b, _lm_batch())
    inp = _lm_batch()
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(a.generate(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"], **kw),
                       b.generate(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"], **kw))


@pytest.mark.skipif(DEVICE != "cpu", reason="the Triton interpreter runs on CPU tensors only")
def test_fused_lm_head_bf16_triton():
    """bf16 on the Triton backend under the interpreter: linear_token_logprobs has no tl.dot, so
    it runs; its log-probs are as accurate as TRL's bf16 head (vs the fp32 head)."""
    a, b = _pair(backend="triton", outputs=("log_probs",))
    inp = _lm_batch()
    want = a(**inp, fused_lm_head=True).log_probs.detach()
    a16, b16 = a.to(torch.bfloat16), b.to(torch.bfloat16)
    got = b16(**inp, fused_lm_head=True).log_probs
    assert_matches(got[inp["labels"][:, 1:] != -100], want[inp["labels"][:, 1:] != -100],
                   a16(**inp, fused_lm_head=True).log_probs[inp["labels"][:, 1:] != -100],
                   what="bf16 log-probs")


def test_fused_lm_head_bad_use_raises():
    m = _llama()
    with pytest.raises(ValueError, match=r"outputs \['logits'\] are not supported"):
        add_fused_lm_head(m, outputs=("log_probs", "logits"))
    with pytest.raises(ValueError, match="temperature must be a number > 0"):
        add_fused_lm_head(m, temperature=0)
    with pytest.raises(ValueError, match="unknown backend"):
        add_fused_lm_head(m, backend="nope")
    add_fused_lm_head(m)
    with pytest.raises(ValueError, match="fused_lm_head=True needs labels"):
        m(input_ids=torch.ones(1, 3, dtype=torch.long, device=DEVICE), fused_lm_head=True)


def test_per_token_kl_is_grpos():
    lp = (torch.randn(4, 6, device=DEVICE) - 2).requires_grad_()
    ref = torch.randn(4, 6, device=DEVICE) - 2
    mask = torch.rand(4, 6, device=DEVICE) > 0.3
    kl = per_token_kl(lp, ref, mask=mask)
    lp64, ref64 = lp.double(), ref.double()
    want = (torch.exp(ref64 - lp64) - (ref64 - lp64) - 1) * mask        # TRL GRPO's formula
    assert rel_err(kl, want) <= TOL
    assert rel_err(torch.autograd.grad(kl.sum(), lp)[0], torch.autograd.grad(want.sum(), lp)[0]) <= TOL
    assert rel_err(per_token_kl(lp, ref, estimator="k1"), lp - ref) <= TOL


# ------------------------------------------------------------------------- policy gradient ---

def test_policy_gradient_example_matches_unpatched():
    mod = _example("grpo_policy_gradient")
    kw = dict(steps=3, layers=1, n_prompts=4, group=4, new_tokens=6, lr=0.5, optim="sgd", log=False)
    base = mod.run(baseline=True, **kw)
    ours = mod.run(backend="reference", **kw)
    assert base["reward"] == ours["reward"]                  # the same sampled completions
    for key in ("loss", "kl", "entropy"):
        for x, y in zip(ours[key], base[key]):
            assert abs(x - y) <= TOL * abs(y) + 1e-7, (key, ours[key], base[key])
    assert base["kl"][-1] > 0                                # the policy moved off the reference


def test_policy_gradient_example_triton():
    why = backend_problem("triton")
    if why:
        pytest.skip(why)
    mod = _example("grpo_policy_gradient")
    kw = dict(steps=2, layers=1, n_prompts=2, group=2, new_tokens=2, lr=0.5, optim="sgd", log=False)
    base = mod.run(baseline=True, **kw)
    ours = mod.run(backend="triton", **kw)
    assert base["reward"] == ours["reward"]
    for key in ("loss", "kl", "entropy"):
        for x, y in zip(ours[key], base[key]):
            assert abs(x - y) <= TOL * abs(y) + 1e-7, (key, ours[key], base[key])


# ------------------------------------------------------------------ TRL trainers with the mixin ---

def _words(rng, n):
    return " ".join(f"w{rng.randrange(2, 60)}" for _ in range(n))


def _dataset(kind):
    rng = random.Random(0)
    if kind == "sft":   # mostly "w2": after a step the model predicts it (token accuracy > 0)
        rows = [{"text": " ".join(rng.choice(["w2"] * 6 + ["w5", "w9"]) for _ in range(rng.randint(3, 8)))}
                for _ in range(12)]
    elif kind == "prompts":
        rows = [{"prompt": _words(rng, 2 + i % 3)} for i in range(8)]
    elif kind == "dpo":
        rows = [{"prompt": _words(rng, 2 + i % 3), "chosen": " " + _words(rng, 2 + i % 2),
                 "rejected": " " + _words(rng, 3 - i % 2)} for i in range(8)]
    elif kind == "kto":
        rows = [{"prompt": _words(rng, 2 + i % 3), "completion": " " + _words(rng, 2 + i % 2),
                 "label": bool(i % 2)} for i in range(8)]
    return Dataset.from_list(rows)


def _good_words(completions, **kw):
    return [float(sum(w in ("w2", "w4", "w6", "w8") for w in c.split())) for c in completions]


TRAINERS = {   # TRL trainer, its config, data, the extra config and constructor arguments
    "sft": ("SFTTrainer", "SFTConfig", "sft", dict(per_device_train_batch_size=4), {}),
    "dpo": ("DPOTrainer", "DPOConfig", "dpo", dict(per_device_train_batch_size=4, beta=0.5), {}),
    "kto": ("KTOTrainer", "KTOConfig", "kto", dict(per_device_train_batch_size=4), {}),
    "grpo": ("GRPOTrainer", "GRPOConfig", "prompts",
             dict(per_device_train_batch_size=4, num_generations=4, max_completion_length=4,
                  beta=0.1, use_bias_correction_kl=False),
             dict(reward_funcs=_good_words)),
    "rloo": ("RLOOTrainer", "RLOOConfig", "prompts",
             dict(per_device_train_batch_size=4, num_generations=4, max_completion_length=4),
             dict(reward_funcs=_good_words)),
}


def _train(name, ours, path, tok, steps=3):
    """Three SGD steps of a TRL trainer on the saved tiny Llama: the plain trainer (TRL's head,
    eager attention) or the mixin one (rlhf_ops' head and, for GRPO/DPO, loss; rlhf_ops
    attention). → (logged rows, final parameters)."""
    trainer_name, config_name, data, conf, extra = TRAINERS[name]
    cls = getattr(trl, trainer_name)
    if ours:
        cls = type(trainer_name, (FusedLMHeadMixin, cls), {})
        extra = dict(extra, rlhf_ops_backend="reference")
    model = tf.LlamaForCausalLM.from_pretrained(path).to(DEVICE)   # the reference model: path
    if ours:
        apply_rlhf_ops(model, loss=False, backend="reference")
    args = getattr(trl, config_name)(
        output_dir=tempfile.mkdtemp(), max_steps=steps, logging_steps=1, report_to="none",
        save_strategy="no", use_cpu=DEVICE == "cpu", bf16=False, seed=0, disable_tqdm=True,
        learning_rate=0.5, optim="sgd", **conf)
    trainer = cls(model=model, args=args, train_dataset=_dataset(data), processing_class=tok,
                  **extra)
    trainer.remove_callback(PrinterCallback)
    for m in (trainer.model, getattr(trainer, "ref_model", None)):
        if m is not None:
            assert getattr(m.forward, "_rlhf_ops_fused_lm_head", False) is ours
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return logs, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


@pytest.fixture(scope="module")
def saved_llama():
    rm = _example("reward_model_trl")
    path = tempfile.mkdtemp(prefix="rlhf_ops_trl_")
    _llama(vocab=rm.VOCAB, eos_token_id=1).save_pretrained(path)
    return path, rm.make_tokenizer()


@pytest.mark.parametrize("name", list(TRAINERS))
def test_trl_trainer_with_mixin_matches_plain(name, saved_llama, caplog, monkeypatch):
    """Each trainer the README names, plain vs FusedLMHeadMixin + apply_rlhf_ops: the same logged
    metrics (loss, entropy, token accuracy, mean logits, rewards, KL, ...) step by step and the same
    final parameters. GRPO and DPO compute their loss through rlhf_ops (counted); one log line says
    what is rlhf_ops'."""
    calls = []
    for fn in ("grpo_loss", "dpo_loss"):
        real = getattr(trl_integration._trl_losses, fn)
        monkeypatch.setattr(trl_integration._trl_losses, fn,
                            lambda *a, _f=real, _n=fn, **k: calls.append(_n) or _f(*a, **k))
    trl_integration._LOGGED.clear()
    path, tok = saved_llama
    base, p_base = _train(name, False, path, tok)
    assert not calls
    with caplog.at_level(logging.WARNING, logger=trl_integration.__name__):
        ours, p_ours = _train(name, True, path, tok)
    lines = [r.getMessage() for r in caplog.records if "rlhf_ops computes" in r.getMessage()]
    assert len(lines) == 1 and TRAINERS[name][0] in lines[0] and "attention: rlhf_ops" in lines[0]
    want_calls = {"grpo": "grpo_loss", "dpo": "dpo_loss"}.get(name)
    assert set(calls) == ({want_calls} if want_calls else set()) and len(calls) >= (3 if want_calls else 0)
    assert len(base) == len(ours) == 3
    keys = set(base[0]) - {"epoch", "step", "learning_rate", "step_time"}
    assert {"loss", "grad_norm", "entropy"} <= keys, keys
    for a, b in zip(ours, base):
        assert set(a) == set(b)
        # the loss to 1e-6 relative; metrics that are differences of log-probs (rewards, margins)
        # to 1e-6 of their scale; the gradient norm to 5e-6: DPO's saturated σ(−β·Δ) turns the
        # ~1e-7 rounding of each summed log-prob into ~1e-6 of its gradient
        for k in sorted(keys):
            tol = {"loss": 1e-6 * abs(b[k]), "grad_norm": 5e-6 * abs(b[k])}.get(k, 1e-6 * max(abs(b[k]), 1.0))
            assert abs(a[k] - b[k]) <= tol + 1e-9, (k, a[k], b[k])
    if "mean_token_accuracy" in keys:                 # is_top1 holds for some tokens
        assert any(r["mean_token_accuracy"] > 0 for r in base)
    for n, p in p_base.items():
        assert rel_err(p_ours[n], p) <= 1e-6, n
    assert any(rel_err(p, q) > 1e-3 for p, q in zip(p_base.values(),
                                                    tf.LlamaForCausalLM.from_pretrained(path).parameters()))


def test_model_init_kwargs_attn_implementation(saved_llama, monkeypatch):
    """A TRL trainer that loads the model itself: model_init_kwargs={"attn_implementation":
    "rlhf_ops"} (after importing the integration) runs its attention on rlhf_ops; the same
    losses as with eager attention."""
    import rlhf_ops.integrations.transformers as rit
    path, tok = saved_llama
    calls = []
    real = rit.flash_attn_varlen_func
    monkeypatch.setattr(rit, "flash_attn_varlen_func", lambda *a, **k: calls.append(1) or real(*a, **k))
    losses = {}
    for impl in ("eager", "rlhf_ops"):
        args = trl.SFTConfig(output_dir=tempfile.mkdtemp(), max_steps=2, logging_steps=1,
                             report_to="none", save_strategy="no", use_cpu=DEVICE == "cpu", bf16=False,
                             seed=0, disable_tqdm=True, learning_rate=0.5, optim="sgd",
                             per_device_train_batch_size=4, model_init_kwargs={"attn_implementation": impl})
        trainer = trl.SFTTrainer(model=path, args=args, train_dataset=_dataset("sft"), processing_class=tok)
        trainer.remove_callback(PrinterCallback)
        assert trainer.model.config._attn_implementation == impl
        trainer.train()
        losses[impl] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        assert (len(calls) > 0) == (impl == "rlhf_ops")
    assert len(losses["eager"]) == 2
    for a, b in zip(losses["rlhf_ops"], losses["eager"]):
        assert abs(a - b) <= TOL * abs(b), losses


def test_mixin_refuses_trl_options_rlhf_ops_cannot_represent(saved_llama):
    """GRPO's default KL correction (use_bias_correction_kl=True with beta ≠ 0) and DPO's WPO
    weighting have no rlhf_ops formula: the mixin raises at construction instead of training on
    another objective."""
    path, tok = saved_llama
    model = tf.LlamaForCausalLM.from_pretrained(path).to(DEVICE)
    common = dict(output_dir=tempfile.mkdtemp(), report_to="none", use_cpu=DEVICE == "cpu", bf16=False)
    grpo = type("GRPOTrainer", (FusedLMHeadMixin, trl.GRPOTrainer), {})
    with pytest.raises(ValueError, match="use_bias_correction_kl"):
        grpo(model=model, reward_funcs=_good_words, processing_class=tok, train_dataset=_dataset("prompts"),
             args=trl.GRPOConfig(beta=0.1, num_generations=2, per_device_train_batch_size=2, **common))
    dpo = type("DPOTrainer", (FusedLMHeadMixin, trl.DPOTrainer), {})
    with pytest.raises(ValueError, match="use_weighting"):
        dpo(model=model, ref_model=copy.deepcopy(model), processing_class=tok, train_dataset=_dataset("dpo"),
            args=trl.DPOConfig(use_weighting=True, **common))


def test_mixin_needs_a_trl_trainer():
    class NotATrainer(FusedLMHeadMixin):
        pass
    with pytest.raises(TypeError, match="derives from no TRL trainer"):
        NotATrainer()
