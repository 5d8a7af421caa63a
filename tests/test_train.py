"""The four-stage training loop: stage losses, the RM and PPO formulas, PPO-ptx, resume, DDP, CLI.

Tiny configs only (the ``tiny`` preset): every check runs in seconds on a CPU.
"""
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import rlhf_ops as ro
from rlhf_ops.train import data as D
from rlhf_ops.train.model import GPT, GPTConfig, ScalarHeadGPT
from rlhf_ops.train import Run, SimulatedCrash, main, make_config
from rlhf_ops.train.__main__ import resolve_device
from rlhf_ops.train.run import CheckpointError, load_checkpoint, save_checkpoint
from rlhf_ops.train.config import ConfigError
from rlhf_ops.train.report import numbers
from rlhf_ops.train.summarize import table
from rlhf_ops.train import ppo as P
from rlhf_ops.train.run import paired_difference
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
    with pytest.raises(ConfigError, match="unknown key 'ppo.betta' \\(did you mean 'ppo.beta'\\?\\)"):
        make_config("cpu-demo", ["ppo.betta=1"])
    with pytest.raises(ConfigError, match="sft.steps: expected int"):
        make_config("cpu-demo", ["sft.steps=abc"])
    with pytest.raises(ConfigError, match="ppo.beta: expected KEY=VALUE"):
        make_config("cpu-demo", ["ppo.beta"])
    with pytest.raises(ConfigError, match="--preset"):
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


def test_filler_only_pairs_and_accuracy_by_pair_type():
    from rlhf_ops.train.rm import filler_only_pairs, pair_accuracy
    p = "R abc>"
    resp = ["cba", "cba.", "cbb", "cbb."]                    # judge: 1, .75, .67, .5
    toks = torch.full((1, 4, 12), D.PAD)
    for i, r in enumerate(resp):
        ids = D.encode(p + r + "\n")
        toks[0, i, :len(ids)] = torch.tensor(ids)
    comp = {"tokens": toks, "last": (toks != D.PAD).sum(-1) - 1, "prompts": [p],
            "ranks": torch.tensor([D.ranks_from_scores([D.judge(p, r) for r in resp], 4)])}
    fo = filler_only_pairs(comp)
    assert fo[0].nonzero().tolist() == [[0, 1], [1, 0], [2, 3], [3, 2]]

    class Fixed(torch.nn.Module):                          # scores: filler −1, letters ignored
        def forward(self, tokens, last):
            return -(tokens.gather(1, (last - 1)[:, None]).squeeze(1) == D.STOI[D.FILLER]).float()

    assert pair_accuracy(Fixed(), comp, "cpu", only=fo) == 1.0
    # the other 4 pairs: (cba, cbb) and (cba., cbb.) tie under Fixed → missed; (cba, cbb.) and
    # (cba., cbb) → right and wrong
    assert pair_accuracy(Fixed(), comp, "cpu", only=~fo) == 0.25
    assert pair_accuracy(Fixed(), comp, "cpu") == pytest.approx(3 / 6)


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
    adv, ret = ro.gae(r, v, m, gamma=1.0, lam=0.95)
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


def test_ppo_minibatch_loss_is_the_former_formula(tmp_path):
    """PPO's minibatch loss through rlhf_ops.policy_loss / value_loss is the stage's former formula
    (Σ pg + vf_coef·Σ vf over the response tokens, / their count), written out here, to rounding:
    the library divides each sum by the count before adding them, the former code after, so a
    run's numbers agree to ~1e-7 per step rather than bit for bit. The clipped fraction now counts
    only the tokens where the clip binds (ρ > 1 + ε with A > 0, ρ < 1 − ε with A < 0)."""
    from rlhf_ops.train.config import section
    run, policy, value, b = ppo_batch(tmp_path)
    roll, c = _roll(b), {**section(run.cfg, "ppo"), "value_clip": 0.05}
    roll["old_lp"] = roll["old_lp"] + 0.3 * torch.randn_like(roll["old_lp"])    # ratios across the clip
    params = list(policy.parameters()) + list(value.parameters())
    st = P.minibatch_backward(run, policy, value, roll, None, c)
    g_new = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    m, a, eps = roll["mask"], roll["adv"], c["clip"]
    ratio = torch.exp(policy(roll["inp"], logprobs_of=roll["act"]) - roll["old_lp"])
    pg = torch.maximum(-a * ratio, -a * ratio.clamp(1 - eps, 1 + eps))
    v, old_v, ret = value(roll["inp"]), roll["old_v"], roll["ret"]
    v_clip = old_v + (v - old_v).clamp(-c["value_clip"], c["value_clip"])
    vf = 0.5 * torch.maximum((v - ret) ** 2, (v_clip - ret) ** 2)
    ntok = m.sum()
    ((pg * m).sum() + c["vf_coef"] * (vf * m).sum()).div(ntok).backward()
    torch.testing.assert_close(st[0], (pg * m).sum().detach() / ntok, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(st[1], (vf * m).sum().detach() / ntok, rtol=1e-6, atol=1e-7)
    for p, g in zip(params, g_new):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)
    binds = (((ratio > 1 + eps) & (a > 0)) | ((ratio < 1 - eps) & (a < 0))) & m.bool()
    assert float(st[3]) == pytest.approx(float(binds.sum() / ntok)) and float(st[3]) > 0


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


def test_grpo_config_errors(tmp_path):
    from rlhf_ops.train.config import section
    from rlhf_ops.train.grpo import check_config
    for sets, what in (({"grpo.group": 1}, "grpo.group"), ({"grpo.minibatch_prompts": 3}, "grpo.minibatch_prompts"),
                       ({"grpo.loss_type": "ppo"}, "grpo.loss_type"), ({"grpo.scale": "std"}, "grpo.scale")):
        run = tiny_run(tmp_path, **sets)
        with pytest.raises(ValueError, match=what):
            check_config(run, section(run.cfg, "grpo"))


# ------------------------------------------------------------------ CLI, resume, DDP ---

TINY_ARGS = ["--preset", "tiny", "--backend", "reference"]


@pytest.fixture(scope="module")
def tiny_all(tmp_path_factory):
    out = tmp_path_factory.mktemp("all")
    summary = main(["all", "--out", str(out)] + TINY_ARGS)
    return out, summary


def test_cli_all_end_to_end(tiny_all):
    out, summary = tiny_all
    s = json.loads((out / "summary.json").read_text())
    for k in ("pretrain.final_loss", "pretrain.judge_score", "sft.final_loss", "sft.judge_score",
              "sft.pretrain_loss", "sft.filler_rate", "rm.heldout_pair_accuracy", "ppo.judge_score",
              "ppo.rm_score_start", "ppo.rm_score_end", "ppo.kl_mean", "ppo.pretrain_loss",
              "ppo_ptx.judge_score", "ppo_ptx.pretrain_loss", "ppo_ptx.kl_mean", "grpo.judge_score",
              "grpo.judge_minus_sft", "grpo.judge_minus_sft_se", "grpo.rm_score_start", "grpo.rm_score_end",
              "grpo.kl_mean", "grpo.pretrain_loss", "grpo.filler_rate", "wall_seconds"):
        assert isinstance(s[k], float) and s[k] == s[k], k     # present and not NaN
    assert s == json.loads(json.dumps(summary))
    assert s["ppo.ptx_coef"] == 0.0 and s["ppo_ptx.ptx_coef"] == 27.8   # the second policy is PPO-ptx
    assert abs(s["rm.demo_mean_after_bias"]) < 1e-5            # RM bias: SFT demos score 0
    # the paired PPO − SFT difference is over the same prompts as the two stages' judge scores
    for p in ("ppo", "ppo_ptx", "grpo"):
        assert s[f"{p}.judge_minus_sft"] == pytest.approx(s[f"{p}.judge_score"] - s["sft.judge_score"], abs=1e-9)
        assert s[f"{p}.judge_minus_sft_se"] >= 0
    assert s["ppo.sft_pretrain_loss"] == s["sft.pretrain_loss"]
    # per-stage records: config, args and seconds of the command that ran each stage
    assert set(s["stages"]) == {"pretrain", "sft", "rm", "ppo", "grpo"}
    assert s["grpo.rm_score_start"] == s["ppo.rm_score_start"]   # the same held-out samples of SFT
    for rec in s["stages"].values():
        assert rec["config"]["model.d_model"] == 16 and rec["args"]["preset"] == "tiny"
        assert rec["seconds"] > 0 and rec["cpu_seconds"] > 0
    assert s["wall_seconds"] == pytest.approx(sum(r["seconds"] for r in s["stages"].values()))
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in rows} == {"pretrain", "sft", "rm", "ppo", "ppo_ptx", "grpo"}
    assert [r["step"] for r in rows if r["stage"] == "grpo"] == [1, 2, 3]
    assert any("kl" in r for r in rows) and any("heldout_pair_accuracy" in r for r in rows)
    assert any(r.get("ptx_loss", 0) > 0 for r in rows if r["stage"] == "ppo_ptx")
    report = (out / "report.md").read_text()
    for png in ("judge_by_stage.png", "loss_pretrain.png", "loss_sft.png", "rm_accuracy.png",
                "ppo_rollout_reward.png", "ppo_kl.png", "ppo_judge.png", "grpo_rm_score.png"):
        assert png in report and (out / png).stat().st_size > 1000
    assert "Pretraining loss" in report and "PPO-ptx" in report and "Log-probs from hidden states" in report
    assert "GRPO − SFT on the same held-out prompts" in report
    # every checkpoint, and the RM comparisons, load with weights_only=True; no resume file is left
    assert sorted(p.name for p in (out / "ckpt").glob("*.pt")) == [f"{s}_final.pt" for s in
                                                                   ("grpo", "ppo", "pretrain", "rm", "sft")]
    for p in list((out / "ckpt").glob("*.pt")) + [out / "rm_comparisons.pt"]:
        torch.load(p, weights_only=True)


def test_summarize_prints_the_results_table(tiny_all, capsys):
    out, s = tiny_all
    t = table([str(out), str(out / "summary.json")])
    lines = t.splitlines()
    assert lines[0] == "| | seed 0 | seed 0 | goal |" and set(lines[1]) == set("|-")
    assert all(ln.count("|") == 5 for ln in lines)
    row = {ln.split(" | ")[0][2:]: ln for ln in lines[2:]}
    assert f"{s['sft.judge_score']:.4f} ± {s['sft.judge_score_se']:.4f}" in row["sft.judge_score"]
    assert row["rm.heldout_pair_accuracy"].endswith("≥ 0.8 ✓ |" if s["rm.heldout_pair_accuracy"] >= 0.8
                                                    else "≥ 0.8 ✗ (seed 0, seed 0) |")
    assert "ppo_ptx − SFT, paired" in row
    assert row["grpo − SFT, paired over the same prompts"].endswith(
        "≥ 3 SE ✓ |" if s["grpo.judge_minus_sft"] >= 3 * s["grpo.judge_minus_sft_se"] > 0 else "≥ 3 SE ✗ (seed 0, seed 0) |")
    from rlhf_ops.train import summarize
    summarize.main([str(out)])
    assert capsys.readouterr().out.startswith("| | seed 0 | goal |")


def test_logprob_memory_from_hidden_states_at_the_gpu_preset():
    """Meta-device bytes the PPO minibatch's log-prob op keeps: logits path ≥ the [MB, T, V] fp32
    logits, hidden-state path two fp32 numbers per token."""
    from rlhf_ops.train.report import logprob_memory
    m = logprob_memory(make_config("gpu"))
    N = m["MB"] * m["T"]
    assert (m["MB"], m["d"], m["V"]) == (64, 512, D.VOCAB_SIZE) and m["T"] == 12 + 12 - 1
    assert m["logits"] >= N * m["V"] * 4
    assert m["hidden"] <= N * 8 < m["logits"]
    assert m["rollout_logits_bytes"] == 2 * 256 * m["T"] * m["V"] * 4


def test_paired_difference():
    d = paired_difference([1.0, 0.5, 1.0, 0.75], [1.0, 1.0, 0.5, 0.5])     # differences 0, −.5, .5, .25
    assert d["mean"] == pytest.approx(0.0625) and (d["wins"], d["losses"]) == (2, 1)
    diffs = torch.tensor([0.0, -0.5, 0.5, 0.25], dtype=torch.float64)
    assert d["se"] == pytest.approx(float(diffs.std() / 2))
    with pytest.raises(ValueError, match="equal, non-empty"):
        paired_difference([1.0], [1.0, 0.0])


def test_resolve_device():
    """--device → what torch.cuda.set_device accepts (it refuses torch.device("cuda"): no index)."""
    assert resolve_device("auto", cuda_available=False) == "cpu"
    assert resolve_device("auto", cuda_available=True) == "cuda:0"
    assert resolve_device("cuda", cuda_available=True, local_rank=3) == "cuda:3"    # torchrun rank
    assert resolve_device("cuda:1", cuda_available=True, local_rank=3) == "cuda:1"
    assert resolve_device("cpu", cuda_available=True) == "cpu"
    for arg in ("cuda", "cuda:0", "auto"):
        d = resolve_device(arg, cuda_available=True)
        assert torch.device(d).index is not None          # what set_device needs
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_device("cuda", cuda_available=False)
    for bad in ("gpu", "mps", "cuda:x"):
        with pytest.raises(ConfigError, match="--device"):
            resolve_device(bad, cuda_available=True)


def _cli_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("python -m rlhf_ops.train: error: "), err
    return err


def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    base = ["pretrain", "--out", str(out)] + TINY_ARGS
    assert "unknown key 'ppo.betta'" in _cli_error(capsys, base + ["--set", "ppo.betta=1"])
    assert "expected int" in _cli_error(capsys, base + ["--set", "sft.steps=abc"])
    assert "expected KEY=VALUE" in _cli_error(capsys, base + ["--set", "ppo.beta"])
    assert "unknown preset 'laptop'" in _cli_error(capsys, ["pretrain", "--out", str(out), "--preset", "laptop"])
    assert "--device" in _cli_error(capsys, base + ["--device", "gpu"])
    for stage, need in (("sft", "pretrain"), ("rm", "sft"), ("ppo", "sft")):
        msg = _cli_error(capsys, [stage, "--out", str(out)] + TINY_ARGS)
        assert f"needs the {need} stage's checkpoint" in msg and f"{need}_final.pt" in msg
    # backends that cannot run here fail before any work, in one line
    if not torch.cuda.is_available():
        assert "--backend cuda on cpu" in _cli_error(capsys, ["pretrain", "--out", str(out), "--preset", "tiny",
                                                             "--backend", "cuda"])
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert "TRITON_INTERPRET=1" in _cli_error(capsys, ["pretrain", "--out", str(out), "--preset", "tiny",
                                                          "--backend", "triton"])
    assert not out.exists()                                 # nothing was created by any of them


def test_failed_stage_leaves_no_empty_folders(tmp_path):
    out = tmp_path / "a" / "run"
    with pytest.raises(SimulatedCrash):
        main(["pretrain", "--out", str(out)] + TINY_ARGS + ["--set", "run.crash_at_step=0"])
    assert not (tmp_path / "a").exists()


def test_resume_on_a_finished_run_says_so(tiny_all, capsys):
    out, summary = tiny_all
    s = main(["all", "--out", str(out), "--resume"] + TINY_ARGS)
    printed = capsys.readouterr().out
    for stage in ("pretrain", "sft", "rm", "ppo", "grpo"):
        assert f"{stage}: already finished in {out}" in printed
    assert "nothing to resume: every stage has finished" in printed
    assert numbers(s) == numbers(summary) and s["stages"] == summary["stages"]


def test_rerunning_one_stage_replaces_only_its_record(tiny_all, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(tiny_all[0], out)
    before = json.loads((out / "summary.json").read_text())
    s = main(["sft", "--out", str(out)] + TINY_ARGS + ["--set", "sft.steps=2", "--seed", "0"])
    assert s["stages"]["sft"]["config"]["sft.steps"] == 2
    for stage in ("pretrain", "rm", "ppo"):                  # the others keep their own records
        assert s["stages"][stage] == before["stages"][stage]
        assert s["stages"][stage]["config"]["sft.steps"] == 4
    assert s["wall_seconds"] == pytest.approx(sum(r["seconds"] for r in s["stages"].values()))
    assert "| sft | reference | cpu | tiny | 0 |" in (out / "report.md").read_text()


def _params(path, name):
    return torch.load(path, weights_only=True)["models"][name]


def _stage_lines(out, stage):
    return [ln for ln in (out / "metrics.jsonl").read_text().splitlines() if f'"stage": "{stage}"' in ln]


@pytest.mark.parametrize("stage,name", [("pretrain", "lm"), ("ppo", "lm"), ("grpo", "lm")])
def test_resume_after_interruption_matches_uninterrupted(tiny_all, tmp_path, stage, name):
    ref_out, _ = tiny_all
    out = tmp_path / "run"
    (out / "ckpt").mkdir(parents=True)
    if stage in ("ppo", "grpo"):                     # start from the same pretrain/SFT/RM checkpoints
        for s in ("pretrain", "sft", "rm"):
            for f in (ref_out / "ckpt").glob(f"{s}_final.pt*"):
                shutil.copy(f, out / "ckpt")
        steps = make_config("tiny")[f"{stage}.steps"]
    else:
        steps = make_config("tiny")["pretrain.steps"]
    args = [stage, "--out", str(out)] + TINY_ARGS
    # ckpt_every=2: the crash at step 3 loses step 2's work, which the resumed run redoes
    with pytest.raises(SimulatedCrash):
        main(args + ["--set", f"run.crash_at_step={steps - 1}", f"{stage}.steps={steps}"])
    assert (out / "ckpt" / f"{stage}_resume.pt").exists() and not (out / "ckpt" / f"{stage}_final.pt").exists()
    main(args + ["--resume"])
    a, b = _params(out / "ckpt" / f"{stage}_final.pt", name), _params(ref_out / "ckpt" / f"{stage}_final.pt", name)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert _stage_lines(out, stage) == _stage_lines(ref_out, stage)     # metrics: nothing lost or doubled


def test_corrupt_checkpoint_is_refused_with_a_clear_message(tiny_all, tmp_path, capsys):
    src = tiny_all[0]
    good = load_checkpoint(src / "ckpt" / "sft_final.pt")
    for damage in ("flip", "truncate", "no-sidecar"):
        out = tmp_path / damage
        (out / "ckpt").mkdir(parents=True)
        for f in (src / "ckpt").glob("*_final.pt*"):
            shutil.copy(f, out / "ckpt")
        p = out / "ckpt" / "sft_final.pt"
        data = bytearray(p.read_bytes())
        if damage == "flip":
            data[len(data) // 2] ^= 0x01
            p.write_bytes(bytes(data))
        elif damage == "truncate":
            p.write_bytes(bytes(data[:len(data) // 3]))
        else:
            (out / "ckpt" / "sft_final.pt.sha256").unlink()
        with pytest.raises(CheckpointError, match="sft_final.pt is truncated or corrupt.*not loaded"):
            load_checkpoint(p)
        with pytest.raises(SystemExit) as e:                # the CLI: one line, no traceback
            main(["rm", "--out", str(out)] + TINY_ARGS)
        err = capsys.readouterr().err
        assert e.value.code == 1 and len(err.strip().splitlines()) == 1 and "sft_final.pt" in err
    # killed between the data's rename and the digest's: the new digest waits in .sha256.tmp
    p = tmp_path / "x.pt"
    save_checkpoint(p, {"a": torch.ones(3)})
    side = p.with_name("x.pt.sha256")
    old = side.read_text()
    save_checkpoint(p, good)
    os.replace(side, p.with_name("x.pt.sha256.tmp"))
    side.write_text(old)
    assert load_checkpoint(p)["result"] == good["result"] and not p.with_name("x.pt.sha256.tmp").exists()


KILL_SCRIPT_TIMEOUT = 120


def test_kill_9_at_random_moments_then_resume_is_bit_identical(tiny_all, tmp_path):
    """kill -9 of `all` at random moments (one of them halfway through a checkpoint write), each
    followed by --resume; the final summary numbers and weights equal the uninterrupted run's."""
    import random
    import signal
    import time
    ref_out, ref = tiny_all
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "rlhf_ops.train", "all", "--out", str(out)] + TINY_ARGS
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rng = random.Random(17)
    kills = 0
    # 1: die halfway through writing the 3rd checkpoint (pretrain's resume file at step 2... )
    p = subprocess.run(cmd + ["--set", "run.die_in_save=3"], env=env, capture_output=True, text=True,
                       timeout=KILL_SCRIPT_TIMEOUT)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    kills += 1
    assert list((out / "ckpt").glob("*.tmp"))                # a torn temporary file was left behind
    # 2-4: SIGKILL a random moment after a stage has started
    for _ in range(3):
        proc = subprocess.Popen(cmd + ["--resume"], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True)
        started = False
        for line in proc.stdout:
            if line.startswith("[rlhf_ops.train] stage"):
                started = True
                break
        if started:
            time.sleep(rng.uniform(0.0, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=KILL_SCRIPT_TIMEOUT)
        kills += proc.returncode == -signal.SIGKILL
    p = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=KILL_SCRIPT_TIMEOUT)
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert kills >= 2
    assert numbers(s) == numbers(ref)                      # every number, bit for bit (floats ==)
    for stage, name in (("pretrain", "lm"), ("sft", "lm"), ("rm", "rm"), ("ppo", "lm"), ("ppo", "lm_ppo_ptx"),
                        ("grpo", "lm")):
        a, b = _params(out / "ckpt" / f"{stage}_final.pt", name), _params(ref_out / "ckpt" / f"{stage}_final.pt", name)
        assert all(torch.equal(a[k], b[k]) for k in a), (stage, name)
    for stage in ("pretrain", "sft", "rm", "ppo", "ppo_ptx", "grpo"):
        assert _stage_lines(out, stage) == _stage_lines(ref_out, stage), stage


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
    # Adam turns a gradient of ~1e-9 (qkv's bias) into a step of up to lr: the two processes'
    # summation order moves such weights by ~1e-6, while a wrong batch split moves many by ~lr
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    losses = [[json.loads(ln)["loss"] for ln in _stage_lines(tmp_path / d, "pretrain") if '"loss"' in ln]
              for d in ("ddp", "one")]
    assert len(losses[0]) == 3 and losses[0] == pytest.approx(losses[1], rel=1e-6)   # same global mean
    s = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert s["stages"]["pretrain"]["args"]["world_size"] == 2


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
