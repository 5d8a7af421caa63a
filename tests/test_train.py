"""The four-stage training loop: stage losses, the RM and PPO formulas, PPO-ptx, resume, DDP, CLI.

Tiny configs only (the ``tiny`` preset): every check runs in seconds on a CPU.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import rlhf_ops as ro
from rlhf_ops import data as D
from rlhf_ops.model import GPT, GPTConfig, ScalarHeadGPT, frozen_copy
from rlhf_ops.train import Run, SimulatedCrash, main, make_config
from rlhf_ops.train import ppo as P
from rlhf_ops.train.common import paired_difference
from rlhf_ops.train.pretrain import lm_loss
from rlhf_ops.train.rm import has_pair, informative_comparisons, make_comparisons, rewards_of, rm_loss
from rlhf_ops.train.sft import sft_loss

TINY = GPTConfig(vocab_size=D.VOCAB_SIZE, block_size=24, n_layer=1, n_head=1, d_model=16, backend="reference")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny models: one thread avoids OpenMP oversubscription on a shared 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_run(tmp_path, **sets):
    return Run(make_config("tiny", sets), tmp_path, seed=0, backend="reference")


def fit_fixed(params, loss_fn, steps=25, lr=1e-2):
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


# ------------------------------------------------------------------------------- config ---

def test_config_presets_and_overrides():
    cfg = make_config("cpu-demo", ["ppo.beta=0.05", "sft.steps=7", "run.progress=false", "data.tasks=RS"])
    assert cfg["ppo.beta"] == 0.05 and cfg["sft.steps"] == 7 and cfg["run.progress"] is False
    assert cfg["data.tasks"] == "RS" and cfg["sft.lm_coef"] == 0.5
    d = make_config("gpu")                    # paper defaults unless a preset scales them for a toy
    assert (d["ppo.beta"], d["ppo.ptx_coef"], d["ppo.ptx_per_episode"], d["ppo.clip"]) == (0.02, 27.8, 8.0, 0.2)
    assert (d["ppo.gamma"], d["ppo.lam"], d["ppo.epochs"], d["ppo.temperature"]) == (1.0, 0.95, 1, 1.0)
    assert make_config("gpu")["model.d_model"] > make_config("cpu-demo")["model.d_model"]
    with pytest.raises(ValueError, match="unknown key 'ppo.betta'"):
        make_config("cpu-demo", ["ppo.betta=1"])
    with pytest.raises(ValueError, match="sft.steps: expected int"):
        make_config("cpu-demo", ["sft.steps=abc"])
    with pytest.raises(ValueError, match="--preset"):
        make_config("laptop")


# ------------------------------------------------------------- each stage's loss falls ---

def test_pretrain_loss_falls_on_fixed_batch():
    m = GPT(TINY)
    x, y = D.pretrain_batch(0, 0, 4, 24, D.DataConfig())
    losses = fit_fixed(m.parameters(), lambda: lm_loss(m, x, y, y.numel())[0])
    assert losses[-1] < 0.8 * losses[0]
    # the loss is the mean next-token cross-entropy of the batch
    torch.testing.assert_close(lm_loss(m, x, y, y.numel())[0],
                               F.cross_entropy(m(x).reshape(-1, D.VOCAB_SIZE), y.reshape(-1)))


def test_sft_loss_is_l2_plus_lambda_l1_and_falls():
    m = GPT(TINY)
    b = D.sft_batch(0, 0, 4, D.DataConfig())
    x, y2, y1 = b["x"], b["y_resp"], b["y_all"]
    n2, n1 = int((y2 != -100).sum()), int((y1 != -100).sum())
    logits = m(x).reshape(-1, D.VOCAB_SIZE)
    l2 = F.cross_entropy(logits, y2.reshape(-1), ignore_index=-100)
    l1 = F.cross_entropy(logits, y1.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(sft_loss(m, x, y2, y1, n2, n1, 0.5)[0], l2 + 0.5 * l1)
    assert n2 < n1                                              # prompt tokens are not in L2
    losses = fit_fixed(m.parameters(), lambda: sft_loss(m, x, y2, y1, n2, n1, 0.5)[0])
    assert losses[-1] < 0.8 * losses[0]


def comparison_batch(tmp_path):
    run = tiny_run(tmp_path)
    sft = GPT(TINY)
    return make_comparisons(run, sft, D.prompts(0, "t", 0, 5, run.data_cfg), "t")


def test_rm_loss_is_the_design_formula(tmp_path):
    comp = comparison_batch(tmp_path)
    rm = ScalarHeadGPT(TINY).double()
    torch.nn.init.normal_(rm.head.weight)
    ranks = comp["ranks"].clone()
    ranks[0, :3] = torch.tensor([0, 0, 1])                       # a tie and a worse one
    ranks[1] = torch.where(ranks[1] >= 0, torch.zeros_like(ranks[1]), ranks[1])   # all tied: no pair
    r = rewards_of(rm, comp["tokens"], comp["last"])
    n_with_pairs = 0
    total = torch.zeros((), dtype=torch.float64)
    for b in range(r.shape[0]):                                  # −1/C · Σ_{rank_i < rank_j} log σ(r_i − r_j)
        pairs = [(i, j) for i in range(r.shape[1]) for j in range(r.shape[1])
                 if 0 <= ranks[b, i] < ranks[b, j]]
        if pairs:
            n_with_pairs += 1
            total = total - sum(F.logsigmoid(r[b, i] - r[b, j]) for i, j in pairs) / len(pairs)
    expected = total / n_with_pairs
    got = rm_loss(rm, comp["tokens"], comp["last"], ranks, n_with_pairs)[0]
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert ranks.shape[1] == make_config("tiny")["rm.k_max"] and (comp["ranks"] == -1).any()


def test_rm_loss_falls_on_fixed_batch(tmp_path):
    comp = comparison_batch(tmp_path)
    rm = ScalarHeadGPT(TINY)
    n = int(((comp["ranks"][:, :, None] < comp["ranks"][:, None, :]) & (comp["ranks"][:, :, None] >= 0))
            .flatten(1).any(1).sum())
    losses = fit_fixed(rm.parameters(), lambda: rm_loss(rm, comp["tokens"], comp["last"], comp["ranks"], n)[0],
                       steps=40, lr=3e-2)
    assert losses[-1] < 0.8 * losses[0]


def test_informative_comparisons_keep_only_prompts_with_a_pair(tmp_path):
    run = tiny_run(tmp_path)
    sft = GPT(TINY)
    rounds = []

    def prompts_of_round(r):
        rounds.append(r)
        return D.prompts(0, "t", r, 6, run.data_cfg)

    comp = informative_comparisons(run, sft, 10, prompts_of_round, "t")
    assert has_pair(comp["ranks"]).all() and comp["tokens"].shape[0] == len(comp["prompts"]) == 10
    assert len(rounds) >= 2                                     # 6 prompts a round cannot give 10
    for b, p in enumerate(comp["prompts"]):                     # each row still belongs to its prompt
        x = comp["tokens"][b, 0, :len(p)]
        assert D.decode(x.tolist(), stop_at_eos=False) == p
    # every response the same (EOS at once): no pair anywhere, a clear error instead of empty data
    mute = GPT(TINY)
    with torch.no_grad():
        mute.trunk.ln_f.weight.zero_()
        mute.trunk.ln_f.bias.zero_()
        mute.trunk.ln_f.bias[0] = 1.0
        mute.trunk.wte.weight.zero_()
        mute.trunk.wte.weight[D.EOS, 0] = 100.0
    with pytest.raises(RuntimeError, match="rm.informative_only"):
        informative_comparisons(run, mute, 4, lambda r: D.prompts(0, "t", r, 4, run.data_cfg), "t",
                                max_rounds=2)
    assert not has_pair(torch.tensor([[0, 0, -1], [1, 1, 1]])).any()
    assert has_pair(torch.tensor([[0, 1, -1]])).all()


# ------------------------------------------------------------------------------- PPO ---

def ppo_batch(tmp_path, beta=0.02, **sets):
    run = tiny_run(tmp_path, **sets)
    policy = GPT(TINY)
    ref = GPT(TINY)                   # a different reference so that the KL is not zero
    value = ScalarHeadGPT(TINY)
    torch.nn.init.normal_(value.head.weight)
    prompts = D.prompts(0, "ppo", 0, 6, run.data_cfg)
    gen = torch.Generator().manual_seed(0)
    seq, inp, act, mask, last, _ = P.rollout(run, policy, prompts, gen, 1.0)
    with torch.no_grad():
        kp = ro.kl_penalty(policy(inp), ref(inp), act, beta=beta, mask=mask)
        score = value(seq, last)
        old_v = value(inp)
    return run, policy, value, dict(seq=seq, inp=inp, act=act, mask=mask, last=last, kp=kp, score=score,
                                    old_v=old_v, prompts=prompts)


def test_ppo_reward_is_minus_beta_kl_plus_score_at_last_token(tmp_path):
    beta = 0.05
    _, _, _, b = ppo_batch(tmp_path, beta=beta)
    mask, kp, last = b["mask"], b["kp"], b["last"]
    rewards = ro.ppo_rewards(kp.penalty, b["score"], mask)
    expected = -beta * kp.kl * mask
    for i in range(mask.shape[0]):
        resp = mask[i].nonzero().flatten()
        n = len(D.encode(b["prompts"][i]))
        assert resp[0] == n - 1                              # first action = first response token
        assert resp[-1] == last[i] - 1                       # last action = the last real token
        assert (mask[i, resp[0]:resp[-1] + 1] == 1).all()
        expected[i, last[i] - 1] += b["score"][i]
    torch.testing.assert_close(rewards, expected)
    assert float(kp.kl.abs().sum()) > 0


def test_gae_and_whitening():
    r = torch.tensor([[0.0, 0.1, -0.2, 1.0, 0.0]])
    v = torch.tensor([[9.0, 0.5, 0.4, 0.3, 7.0]])
    m = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0]])
    adv, ret = P.gae(r, v, m, gamma=1.0, lam=0.95)
    d3 = 1.0 - 0.3                                   # δ_t = r_t + V_{t+1} − V_t, none past the end
    d2 = -0.2 + 0.3 - 0.4
    d1 = 0.1 + 0.4 - 0.5
    exp = torch.tensor([[0.0, d1 + 0.95 * (d2 + 0.95 * d3), d2 + 0.95 * d3, d3, 0.0]])
    torch.testing.assert_close(adv, exp)
    torch.testing.assert_close(ret, (exp + v) * m)
    w = P.whiten(adv, m, lambda t: t)
    sel = w[m.bool()]
    assert abs(float(sel.mean())) < 1e-5 and abs(float(sel.std(unbiased=False)) - 1) < 1e-3
    assert float(w[~m.bool()].abs().sum()) == 0


def _roll(b):
    mask = b["mask"]
    adv = P.whiten(torch.randn_like(mask) * mask, mask, lambda t: t)
    return {"inp": b["inp"], "act": b["act"], "mask": mask, "adv": adv, "ret": b["old_v"] + adv,
            "old_lp": b["kp"].logprobs, "old_v": b["old_v"]}


def test_ppo_loss_falls_on_fixed_batch(tmp_path):
    from rlhf_ops.train.config import section
    run, policy, value, b = ppo_batch(tmp_path)
    roll, c = _roll(b), {**section(run.cfg, "ppo"), "value_clip": 10.0}
    opt = torch.optim.Adam(list(policy.parameters()) + list(value.parameters()), lr=3e-3)
    tot = []
    for _ in range(30):
        opt.zero_grad()
        st = P.minibatch_backward(run, policy, value, roll, None, c)
        opt.step()
        tot.append(float(st[0] + c["vf_coef"] * st[1]))
    # at the start ρ = 1 and V = V_old: pg = −mean(A) = 0 (whitened), vf = ½·mean(A²)·vf_coef
    assert abs(tot[0] - 0.5 * c["vf_coef"]) < 0.05
    assert tot[-1] < tot[0] - 0.15


def test_ptx_adds_gamma_times_grad_of_l1(tmp_path):
    from rlhf_ops.train.config import section
    run, policy, value, b = ppo_batch(tmp_path)
    roll, c = _roll(b), section(run.cfg, "ppo")
    c["ptx_coef"] = 27.8
    x, y = D.pretrain_batch(0, 0, 3, 24, run.data_cfg, stream="ptx")

    def grads(ptx):
        policy.zero_grad(), value.zero_grad()
        P.minibatch_backward(run, policy, value, roll, ptx, c)
        return [p.grad.clone() for p in policy.parameters()]

    g_ppo = grads(None)
    g_ptx = grads((x, y, y.numel()))
    policy.zero_grad()
    policy(x, y).backward()                          # ∇L1, the mean LM loss of the pretraining rows
    for a, b_, l1 in zip(g_ptx, g_ppo, [p.grad for p in policy.parameters()]):
        torch.testing.assert_close(a - b_, 27.8 * l1, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ CLI, resume, DDP ---

@pytest.fixture(scope="module")
def tiny_all(tmp_path_factory):
    out = tmp_path_factory.mktemp("all")
    summary = main(["all", "--out", str(out), "--preset", "tiny", "--backend", "reference"])
    return out, summary


def test_cli_all_end_to_end(tiny_all):
    out, summary = tiny_all
    s = json.loads((out / "summary.json").read_text())
    for k in ("pretrain.final_loss", "pretrain.judge_score", "sft.final_loss", "sft.judge_score",
              "rm.heldout_pair_accuracy", "ppo.judge_score", "ppo.rm_score_start", "ppo.rm_score_end",
              "ppo.kl_mean", "wall_seconds"):
        assert isinstance(s[k], float) and s[k] == s[k], k     # present and not NaN
    assert s["config"]["model.d_model"] == 16 and s == json.loads(json.dumps(summary))
    assert abs(s["rm.demo_mean_after_bias"]) < 1e-5            # RM bias: SFT demos score 0
    # the paired PPO − SFT difference is over the same prompts as the two stages' judge scores
    assert s["ppo.judge_minus_sft"] == pytest.approx(s["ppo.judge_score"] - s["sft.judge_score"], abs=1e-9)
    assert s["ppo.judge_minus_sft_se"] >= 0
    assert s["ppo.prompts_better_than_sft"] + s["ppo.prompts_worse_than_sft"] <= s["config"]["eval.n_prompts"]
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in rows} == {"pretrain", "sft", "rm", "ppo"}
    assert any("kl" in r for r in rows) and any("heldout_pair_accuracy" in r for r in rows)
    report = (out / "report.md").read_text()
    for png in ("loss_pretrain.png", "loss_sft.png", "rm_accuracy.png", "ppo_reward.png", "ppo_kl.png",
                "ppo_judge.png"):
        assert png in report and (out / png).stat().st_size > 1000
    for stage in ("pretrain", "sft", "rm", "ppo"):
        assert (out / "ckpt" / f"{stage}_final.pt").exists()


def test_paired_difference():
    d = paired_difference([1.0, 0.5, 1.0, 0.75], [1.0, 1.0, 0.5, 0.5])     # differences 0, −.5, .5, .25
    assert d["mean"] == pytest.approx(0.0625) and (d["wins"], d["losses"]) == (2, 1)
    diffs = torch.tensor([0.0, -0.5, 0.5, 0.25], dtype=torch.float64)
    assert d["se"] == pytest.approx(float(diffs.std() / 2))
    with pytest.raises(ValueError, match="equal, non-empty"):
        paired_difference([1.0], [1.0, 0.0])


def _params(path, name):
    return torch.load(path, weights_only=False)["models"][name]


def _stage_lines(out, stage):
    return [ln for ln in (out / "metrics.jsonl").read_text().splitlines() if f'"stage": "{stage}"' in ln]


@pytest.mark.parametrize("stage,name", [("pretrain", "lm"), ("ppo", "lm")])
def test_resume_after_interruption_matches_uninterrupted(tiny_all, tmp_path, stage, name):
    ref_out, _ = tiny_all
    out = tmp_path / "run"
    (out / "ckpt").mkdir(parents=True)
    if stage == "ppo":                               # start from the same pretrain/SFT/RM checkpoints
        for s in ("pretrain", "sft", "rm"):
            shutil.copy(ref_out / "ckpt" / f"{s}_final.pt", out / "ckpt")
        steps = make_config("tiny")["ppo.steps"]
    else:
        steps = make_config("tiny")["pretrain.steps"]
    args = [stage, "--out", str(out), "--preset", "tiny", "--backend", "reference"]
    # ckpt_every=2: the crash at step 3 loses step 2's work, which the resumed run redoes
    with pytest.raises(SimulatedCrash):
        main(args + ["--set", f"run.crash_at_step={steps - 1}", f"{stage}.steps={steps}"])
    assert (out / "ckpt" / f"{stage}_resume.pt").exists() and not (out / "ckpt" / f"{stage}_final.pt").exists()
    main(args + ["--resume"])
    a, b = _params(out / "ckpt" / f"{stage}_final.pt", name), _params(ref_out / "ckpt" / f"{stage}_final.pt", name)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert _stage_lines(out, stage) == _stage_lines(ref_out, stage)     # metrics: nothing lost or doubled


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_one(tmp_path):
    """torchrun with 2 CPU processes (gloo) trains on the same global batch as 1 process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["pretrain", "--preset", "tiny", "--backend", "reference", "--set", "pretrain.steps=3",
              "run.ckpt_every=100"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "rlhf_ops.train"]
    p = subprocess.run(cmd + common + ["--out", str(tmp_path / "ddp")], env=env, capture_output=True,
                       text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    main(common + ["--out", str(tmp_path / "one")])
    a = _params(tmp_path / "ddp" / "ckpt" / "pretrain_final.pt", "lm")
    b = _params(tmp_path / "one" / "ckpt" / "pretrain_final.pt", "lm")
    moved = _params(tmp_path / "one" / "ckpt" / "pretrain_final.pt", "lm")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    s = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert s["args"]["world_size"] == 2
    del moved


def test_fused_backend_matches_reference_in_a_training_step(fused_backend, device):
    """One L1 step of the model on a fused backend: loss and gradients as with the reference ops."""
    import dataclasses
    ref = GPT(TINY).to(device)
    fused = GPT(dataclasses.replace(TINY, backend=fused_backend)).to(device)
    fused.load_state_dict(ref.state_dict())
    x, y = (t.to(device) for t in D.pretrain_batch(0, 0, 3, 24, D.DataConfig()))
    l_ref, l_fused = ref(x, y), fused(x, y)
    l_ref.backward(), l_fused.backward()
    torch.testing.assert_close(l_fused, l_ref, rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(fused.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-5, msg=name)
