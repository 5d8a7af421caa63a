"""rlhf_ops.integrations.trl against TRL itself (the pinned version), on tiny random-init models.

* reward loss: TRL's −log σ(r_c − r_r − margin) formula, K-wise ranked batches, and a real
  ``RewardTrainer`` run (TRL's loss, eager attention) vs ours (apply_rlhf_ops + rlhf_ops' loss):
  the same per-step losses and the same final weights (SGD, so that the comparison stays tight);
* the fused LM head vs TRL's own ``add_fused_lm_head`` (log-probs, entropy, loss, gradients,
  temperature, logit scale, shift_labels, num_items_in_batch, an all-ignored batch), and a real
  ``GRPOTrainer`` with ``FusedLMHeadMixin`` vs the plain one;
* GRPO's KL from stored log-probs; the policy-gradient example vs its unpatched run;
* bad use raises.
"""
import copy
import importlib.util
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
from _util import rel_err  # noqa: E402
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

def _pair(temperature=1.0, outputs=("log_probs", "entropy"), backend="reference", **over):
    a = _llama(**over)
    b = copy.deepcopy(a)
    trl_fused_lm_head(a, temperature=temperature, outputs=outputs)
    add_fused_lm_head(b, temperature=temperature, outputs=outputs, backend=backend)
    return a, b


def _compare_heads(a, b, kw):
    oa, ob = a(**kw, fused_lm_head=True), b(**kw, fused_lm_head=True)
    assert type(ob) is type(oa)
    assert torch.equal(ob.label_mask, oa.label_mask)
    for f in ("log_probs", "entropy"):
        x, y = getattr(ob, f), getattr(oa, f)
        assert (x is None) == (y is None), f
        if x is not None:
            assert x.shape == y.shape and rel_err(x, y) <= TOL, f
    assert rel_err(ob.loss, oa.loss) <= TOL
    obj_a = oa.loss + (0 if oa.entropy is None else 0.1 * oa.entropy.sum())
    obj_b = ob.loss + (0 if ob.entropy is None else 0.1 * ob.entropy.sum())
    obj_a.backward()
    obj_b.backward()
    for (n, p), q in zip(b.named_parameters(), a.parameters()):
        assert rel_err(p.grad, q.grad) <= TOL, n


def _lm_batch(B=3, T=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 97, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :3] = 0                                   # left padding, as for prompts
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :5] = -100                              # prompt tokens
    return {k: v.to(DEVICE) for k, v in dict(input_ids=ids, attention_mask=mask, labels=labels).items()}


def test_fused_lm_head_matches_trls(backend):
    a, b = _pair(temperature=0.7, backend=backend)
    _compare_heads(a, b, _lm_batch())


def test_fused_lm_head_options_match_trls():
    inp = _lm_batch()
    a, b = _pair(outputs=("log_probs",))                             # no entropy
    _compare_heads(a, b, dict(inp, num_items_in_batch=torch.tensor(5)))
    a, b = _pair()
    shift = inp["labels"].clone()
    _compare_heads(a, b, dict(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"],
                              shift_labels=shift))                   # scored as given
    a, b = _pair(temperature=1.3)
    for m in (a, b):
        m.config.logit_scale = 2.5                                   # folded into the temperature
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


def test_fused_lm_head_bad_use_raises():
    m = _llama()
    with pytest.raises(ValueError, match=r"outputs \['is_top1'\] are not supported"):
        add_fused_lm_head(m, outputs=("log_probs", "is_top1"))
    with pytest.raises(ValueError, match="temperature must be a number > 0"):
        add_fused_lm_head(m, temperature=0)
    with pytest.raises(ValueError, match="unknown backend"):
        add_fused_lm_head(m, backend="nope")
    gemma = tf.Gemma2ForCausalLM(tf.Gemma2Config(vocab_size=97, hidden_size=32, intermediate_size=32,
                                                 num_hidden_layers=1, num_attention_heads=2,
                                                 num_key_value_heads=1, head_dim=16))
    with pytest.raises(ValueError, match="final_logit_softcapping=30.0"):
        add_fused_lm_head(gemma)
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


def test_grpo_trainer_with_fused_lm_head_mixin():
    """A real GRPOTrainer (reference model, β > 0) with rlhf_ops' head on the policy and the
    reference model: the same logged loss / KL / entropy / reward as the plain trainer."""
    rm = _example("reward_model_trl")
    tok = rm.make_tokenizer()
    path = tempfile.mkdtemp(prefix="rlhf_ops_grpo_")
    _llama(vocab=rm.VOCAB, eos_token_id=1).save_pretrained(path)    # GRPO reloads the reference
    prompts = Dataset.from_list([{"prompt": " ".join(f"w{(7 * i + j) % 60 + 2}" for j in range(2 + i % 3))}
                                 for i in range(8)])

    def good_words(completions, **kw):
        return [float(sum(w in ("w2", "w4", "w6", "w8") for w in c.split())) for c in completions]

    class GRPOTrainer(FusedLMHeadMixin, trl.GRPOTrainer):
        pass

    logs = {}
    for name, cls in (("trl", trl.GRPOTrainer), ("rlhf_ops", GRPOTrainer)):
        model = tf.LlamaForCausalLM.from_pretrained(path).to(DEVICE)
        extra = {}
        if name == "rlhf_ops":
            apply_rlhf_ops(model, loss=False, backend="reference")
            extra["rlhf_ops_backend"] = "reference"
        args = trl.GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=4,
                              num_generations=4, max_completion_length=4, max_steps=3,
                              logging_steps=1, report_to="none", save_strategy="no",
                              use_cpu=DEVICE == "cpu", bf16=False, seed=0, disable_tqdm=True,
                              beta=0.1, learning_rate=0.5, optim="sgd")
        trainer = cls(model=model, reward_funcs=good_words, args=args, train_dataset=prompts,
                      processing_class=tok, **extra)
        trainer.remove_callback(PrinterCallback)
        ours = name == "rlhf_ops"
        for m in (trainer.model, trainer.ref_model):
            assert getattr(m.forward, "_rlhf_ops_fused_lm_head", False) is ours
        trainer.train()
        logs[name] = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs["trl"]) == len(logs["rlhf_ops"]) == 3
    for a, b in zip(logs["rlhf_ops"], logs["trl"]):
        assert a["reward"] == b["reward"]
        for key in ("loss", "kl", "entropy"):
            assert abs(a[key] - b[key]) <= TOL * abs(b[key]) + 1e-6, (key, a, b)
    assert logs["trl"][-1]["kl"] > 0


def test_mixin_needs_a_trl_trainer():
    class NotATrainer(FusedLMHeadMixin):
        pass
    with pytest.raises(TypeError, match="derives from no TRL trainer"):
        NotATrainer()
