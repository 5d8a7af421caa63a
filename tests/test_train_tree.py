"""The reference loop's shared-prefix (tree) batches: GPT's tree forward, PPO's and GRPO's steps.

Oracle: the same models on the dense padded rows (what the loop runs with
``train.shared_prefix=false``), in float64: log-probs and values at the response positions, the
PPO minibatch loss and the GRPO loss, and every parameter's gradient, must agree to fp64 rounding.
"""
import pytest
import torch

import rlhf_ops as ro
from rlhf_ops.train import Run, make_config
from rlhf_ops.train import data as D
from rlhf_ops.train import ppo as P
from rlhf_ops.train.config import section
from rlhf_ops.train.model import GPT, GPTConfig, ScalarHeadGPT, pack_rollout
from _util import assert_matches

CFG = GPTConfig(vocab_size=D.VOCAB_SIZE, block_size=24, n_layer=2, n_head=2, d_model=32, backend="reference")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _models(seed=0):
    torch.manual_seed(seed)
    policy, value = GPT(CFG).double(), ScalarHeadGPT(CFG).double()
    torch.nn.init.normal_(value.head.weight)
    return policy, value


def _rollout(tmp_path, G, n_prompts=3):
    """A real rollout of the tiny policy: n_prompts prompts, G completions of each (consecutive)."""
    run = Run(make_config("tiny"), tmp_path, seed=0, backend="reference")
    policy, _ = _models()
    prompts = [p for p in D.prompts(0, "grpo", 0, n_prompts, run.data_cfg) for _ in range(G)]
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        seq, inp, act, mask, last, _ = P.rollout(run, policy.float(), prompts, gen, 1.0)
    return run, inp, act, mask.double()


def _grads(*models):
    """Every parameter's gradient as one vector: compared norm-wise, since some are zero up to
    rounding (the key projection's bias shifts every score of a row alike: softmax ignores it)."""
    return torch.cat([p.grad.reshape(-1) for m in models for p in m.parameters()])


def test_pack_rollout_layout(tmp_path):
    _, inp, act, mask = _rollout(tmp_path, 3)
    tree = pack_rollout(inp, mask, 3)
    n_prompt = [int(mask[b].argmax()) + 1 for b in range(inp.shape[0])]
    r = mask.sum(1).long().tolist()
    # per group: the prompt once, then each row's response tokens that are inputs (r − 1)
    expect = sum(n_prompt[g] + sum(max(r[b] - 1, 0) for b in range(g, g + 3)) for g in range(0, 9, 3))
    assert tree.tokens == expect < inp.numel()
    assert tree.parent.tolist() == [-1, 0, 0, 0, -1, 4, 4, 4, -1, 8, 8, 8]
    assert tree.rows.shape[0] == int(mask.sum())
    # positions continue from the prompt's length; the packed tokens are the rows' tokens
    for b in range(9):
        g = b // 3
        child = g * 4 + 1 + b % 3
        c0, c1 = tree.cu[child].item(), tree.cu[child + 1].item()
        assert tree.pos[c0:c1].tolist() == list(range(n_prompt[b], n_prompt[b] + c1 - c0))
        assert torch.equal(tree.idx[c0:c1], inp[b, n_prompt[b]:n_prompt[b] + c1 - c0])
    with pytest.raises(ValueError, match="must share one prompt"):
        pack_rollout(inp[1:7], mask[1:7], 3)
    # one row per prompt (PPO): each row one root segment, the rows without their padding
    one = pack_rollout(inp, mask)
    assert one.parent.tolist() == [-1] * 9 and one.tokens == sum(n_prompt[b] + max(r[b] - 1, 0) for b in range(9))


@pytest.mark.parametrize("G", [1, 3])
def test_tree_forward_equals_dense(tmp_path, G):
    _, inp, act, mask = _rollout(tmp_path, G, n_prompts=4 if G == 1 else 3)
    policy, value = _models(1)
    tree = pack_rollout(inp, mask, G)
    m = mask.bool()
    lp_d, ent_d = policy(inp, logprobs_of=act, entropy=True, temperature=0.7)
    lp_t, ent_t = (tree.scatter(x) for x in policy(None, tree=tree, logprobs_of=act[tree.sel], entropy=True,
                                                     temperature=0.7))
    assert_matches(lp_t[m], lp_d[m], what="log-probs")
    assert_matches(ent_t[m], ent_d[m], what="entropy")
    assert torch.equal(lp_t[~m], torch.zeros_like(lp_t[~m]))
    v_d, v_t = value(inp), tree.scatter(value(None, tree=tree))
    assert_matches(v_t[m], v_d[m], what="values")
    # gradients through the tree (the prompt's hidden states summed over its completions)
    w = torch.randn_like(lp_d)
    ((lp_d * w * mask).sum() + (v_d * w * mask).sum()).backward()
    g_d = _grads(policy, value)
    policy.zero_grad(), value.zero_grad()
    ((lp_t * w).sum() + (v_t * w).sum()).backward()
    assert_matches(_grads(policy, value), g_d, what="gradients")


def test_ppo_minibatch_shared_equals_unshared(tmp_path):
    """PPO's minibatch loss and gradients (policy and value) on a tree batch = on the dense rows."""
    run, inp, act, mask = _rollout(tmp_path, 1, n_prompts=5)
    policy, value = _models(2)
    with torch.no_grad():
        old_lp = policy(inp, logprobs_of=act) + 0.2 * torch.randn_like(mask)
        old_v = value(inp)
    adv = P.whiten(torch.randn_like(mask) * mask, mask, lambda t: t)
    roll = {"inp": inp, "act": act, "mask": mask, "adv": adv, "ret": old_v + adv, "old_lp": old_lp, "old_v": old_v}
    c = {**section(run.cfg, "ppo"), "value_clip": 0.05}
    out = []
    for tree in (None, pack_rollout(inp, mask)):
        policy.zero_grad(), value.zero_grad()
        st = P.minibatch_backward(run, policy, value, {**roll, "tree": tree}, None, c)
        out.append((st, _grads(policy, value)))
    (st_d, g_d), (st_t, g_t) = out
    assert_matches(st_t, st_d, what="pg, vf, ptx, clipped")
    assert float(st_d[3]) > 0                     # the clip binds somewhere: both branches run
    assert_matches(g_t, g_d, what="gradients")
    # and PPO's rollout statistics (log-probs, the KL penalty, values) at the response tokens
    tree = pack_rollout(inp, mask)
    with torch.no_grad():
        lp_t, lp_d = P.logprobs(policy, inp, act, mask, 1.0, tree), P.logprobs(policy, inp, act, mask, 1.0)
        v_t, v_d = P.values(value, inp, tree), P.values(value, inp)
    m = mask.bool()
    assert_matches(lp_t[m], lp_d[m], what="old log-probs")
    # GAE reads the values at the response tokens only: the same advantages and returns
    r = torch.randn_like(mask) * mask
    for a, b in zip(ro.gae(r, v_t, mask, gamma=1.0, lam=0.95), ro.gae(r, v_d, mask, gamma=1.0, lam=0.95)):
        assert_matches(a * mask, b * mask, what="gae")


def test_grpo_loss_shared_equals_unshared(tmp_path):
    """GRPO's policy loss (k3 KL to a reference inside) and gradients on a tree batch of groups of
    G = 3 completions = on the dense rows."""
    G = 3
    _, inp, act, mask = _rollout(tmp_path, G)
    policy, _ = _models(4)
    ref, _ = _models(5)
    adv = ro.group_advantages(torch.randn(inp.shape[0], dtype=torch.float64), G)
    with torch.no_grad():
        old = P.logprobs(policy, inp, act, mask, 1.0) + 0.1 * torch.randn_like(mask)
        ref_lp = P.logprobs(ref, inp, act, mask, 1.0)
    res = []
    for tree in (None, pack_rollout(inp, mask, G)):
        policy.zero_grad()
        lp = P.logprobs(policy, inp, act, mask, 1.0, tree)
        out = ro.policy_loss(lp, old, adv, mask, loss_type="grpo", clip=(0.2, 0.2), beta=0.1, ref_logprobs=ref_lp,
                             kl_estimator="k3")
        out.loss.backward()
        res.append((out.loss.detach(), out.clip_fraction, _grads(policy)))
    assert_matches(res[1][0], res[0][0], what="loss")
    assert float(res[0][1]) > 0 and float(res[1][1]) == float(res[0][1])
    assert_matches(res[1][2], res[0][2], what="gradients")
    tree = pack_rollout(inp, mask, G)
    assert tree.tokens < inp.numel()


def test_grpo_stage_reports_tokens_and_cpu_time(tmp_path):
    """The tiny GRPO stage, shared and unshared: both report tokens and CPU seconds per step; the
    shared run processes fewer tokens."""
    from rlhf_ops.train import main
    out = tmp_path / "run"
    main(["pretrain", "--out", str(out), "--preset", "tiny", "--backend", "reference"])
    main(["sft", "--out", str(out), "--preset", "tiny", "--backend", "reference"])
    main(["rm", "--out", str(out), "--preset", "tiny", "--backend", "reference"])
    res = {}
    for shared in (True, False):
        s = main(["grpo", "--out", str(out), "--preset", "tiny", "--backend", "reference",
                  "--set", f"train.shared_prefix={str(shared).lower()}"])
        res[shared] = s
    assert res[True]["grpo.shared_prefix"] == 1.0 and res[False]["grpo.shared_prefix"] == 0.0
    assert 0 < res[True]["grpo.tokens_per_step"] < res[False]["grpo.tokens_per_step"]
    assert res[True]["grpo.train_cpu_s_per_step"] > 0 and res[False]["grpo.train_cpu_s_per_step"] > 0
    from rlhf_ops.train.summarize import table
    t = table([str(out)])
    assert "grpo: tokens / CPU s per step" in t and "(unshared)" in t
