"""Stage 4, second objective — GRPO against the same reward model, with the KL to SFT in the loss.

Per update (Shao et al. 2024, DeepSeekMath; no value model):
  1. P prompts, G completions of each (temperature 1, the completions of a prompt consecutive);
  2. the reward model scores each completion at its last token; the advantage of a completion is
     its score minus its group's mean, over the group's standard deviation
     (``rlhf_ops.group_advantages``), the same for every token of it;
  3. one epoch over minibatches of whole groups: ``rlhf_ops.policy_loss`` (loss_type
     ``grpo.loss_type``, "grpo" by default: the mean over completions of each one's token mean of
     −min(ρ·A, clip(ρ, 1 ± ε)·A) + β·k3(π‖π_SFT)), ρ = π/π_old against the log-probs of the
     rollout. The reference policy is the frozen SFT model, the same as PPO's KL penalty.
The policy starts from SFT. Evaluation as PPO's: greedy decodes of the same held-out prompts,
scored by the judge, and the paired difference with SFT on them.
With ``train.shared_prefix`` (default) each group's prompt runs once for its G completions
(``model.pack_rollout``, rlhf_ops.attention_tree) in the log-prob forwards.
"""
from __future__ import annotations

import time
import zlib

import torch

import rlhf_ops as ro

from . import data as D
from .config import section
from .model import ScalarHeadGPT, frozen_copy
from .model import pack_rollout
from .ppo import forward_tokens, logprobs, rm_score, rollout, step_costs
from .run import (Run, SimulatedCrash, filler_rate, judge_scores, mean_se, paired_difference, pretrain_loss,
                  rng_state, set_rng_state, throughput)


def check_config(run: Run, c: dict) -> None:
    if c["prompts"] % run.world:
        raise ValueError(f"grpo.prompts ({c['prompts']}) must be divisible by the world size {run.world}")
    local = c["prompts"] // run.world
    if c["minibatch_prompts"] < 1 or local % c["minibatch_prompts"]:
        raise ValueError(f"grpo.minibatch_prompts ({c['minibatch_prompts']}) must divide the prompts of a rank "
                         f"per update ({local})")
    if c["group"] < 2:
        raise ValueError(f"grpo.group ({c['group']}) must be ≥ 2: group advantages compare completions")
    if c["loss_type"] not in ro.losses.LOSS_TYPES or c["loss_type"] == "ppo":
        raise ValueError(f"grpo.loss_type must be one of {ro.losses.LOSS_TYPES[1:]}, got {c['loss_type']!r}")
    if c["scale"] not in ro.losses.ADV_SCALES:
        raise ValueError(f"grpo.scale must be one of {ro.losses.ADV_SCALES}, got {c['scale']!r}")


def run_grpo(run: Run) -> dict:
    """Train a GRPO policy from the SFT checkpoint against the RM; returns its results."""
    c = section(run.cfg, "grpo")
    check_config(run, c)
    ref = frozen_copy(run.load_model("sft", "lm"))
    rm = frozen_copy(run.load_model("rm", "rm", ScalarHeadGPT))
    held = D.eval_prompts(run.seed, run.cfg["eval.n_prompts"], run.data_cfg)
    sft_scores = judge_scores(run, ref, held, desc="grpo: judge of SFT")
    res, state = train_grpo(run, ref, rm, held, sft_scores)
    res["seconds"] = run.elapsed()
    run.save_result("grpo", res)
    run.save("grpo", "final", {"models": {"lm": state}, "model_cfg": vars(ref.cfg), "result": res})
    run.remove(("grpo", "resume"))
    return res


def train_grpo(run: Run, ref, rm, held: list[str], sft_scores: list[float]):
    c = section(run.cfg, "grpo")
    G, steps, temp = c["group"], c["steps"], c["temperature"]
    P = c["prompts"] // run.world                          # this rank's prompts per update
    mb = c["minibatch_prompts"] * G                          # completions per minibatch
    policy = run.load_model("sft", "lm")
    opt = torch.optim.AdamW(policy.parameters(), lr=c["lr"], betas=(0.9, 0.95), weight_decay=0.0)
    start, hist, window = 0, {"kl": [], "rm": []}, []
    ck = run.load("grpo", "resume") if run.resume else None
    if ck is not None:
        run.resumed_from(ck)
        policy.load_state_dict(ck["models"]["policy"])
        opt.load_state_dict(ck["opt"])
        set_rng_state(ck["rng"])
        start, hist, window = ck["step"], ck["hist"], list(ck["window"])
    fwd_tokens, cpu_s, n_steps = list(ck["costs"]) if ck is not None else [0, 0.0, 0]   # log-prob forwards
    run.trim_metrics("grpo", start)
    pol = run.wrap(policy)
    policy.train()
    rm_start = rm_score(run, ref, rm, held, "ppo_eval")     # PPO's held-out sample, for comparison
    loss_kw = dict(loss_type=c["loss_type"], clip=(c["clip"], c["clip_high"]), beta=c["beta"], kl_estimator="k3")
    if c["loss_type"] == "dr_grpo":
        loss_kw["max_len"] = run.cfg["ppo.max_new"]             # the longest completion
    tokens, t_loop = 0, time.time()
    shared = run.cfg["train.shared_prefix"]
    log_every = run.cfg["run.log_every"]
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)

    for step in run.progress(range(start, steps), desc="grpo", initial=start, total=steps):
        if step == run.cfg["run.crash_at_step"]:
            raise SimulatedCrash(f"grpo: simulated interruption at step {step}")
        prompts = D.prompts(run.seed, "grpo", step, c["prompts"], run.data_cfg)[run.local(c["prompts"])]
        group_prompts = [p for p in prompts for _ in range(G)]          # a prompt's G completions together
        gen = torch.Generator(device=run.device).manual_seed(zlib.crc32(f"{run.seed}/grpo/{step}/{run.rank}".encode()))
        with torch.no_grad():
            policy.eval()
            seq, inp, act, mask, last, resp = rollout(run, policy, group_prompts, gen, temp)
            policy.train()
            cpu0 = time.process_time()
            tree = pack_rollout(inp, mask, G) if shared else None
            old_lp = logprobs(policy, inp, act, mask, temp, tree)
            ref_lp = logprobs(ref, inp, act, mask, temp, tree)
            fwd_tokens += 2 * forward_tokens(inp, tree)
            score = rm(seq, last)
            adv = ro.group_advantages(score, G, scale=c["scale"])
        tokens += inp.numel() * run.world
        # one epoch over minibatches of whole groups, in a fixed random order
        perm_g = torch.Generator().manual_seed(zlib.crc32(f"{run.seed}/grpo_perm/{step}".encode()))
        order = torch.randperm(P, generator=perm_g)
        stats = torch.zeros(3, device=run.device)                      # Σ loss, Σ clipped, Σ approx-KL
        n_mb = P * G // mb
        for j in range(n_mb):
            rows = (order[j * c["minibatch_prompts"]:(j + 1) * c["minibatch_prompts"]][:, None] * G
                    + torch.arange(G)).reshape(-1).to(run.device)
            m = mask[rows]
            kw = {}
            if c["loss_type"] in ro.losses.TOKEN_MEAN_TYPES:            # the global minibatch's tokens
                kw["num_tokens"] = run.all_sum(m.sum()).clamp(min=1)
            tree = pack_rollout(inp[rows], m, G) if shared else None
            lp = logprobs(pol, inp[rows], act[rows], m, temp, tree)
            fwd_tokens += forward_tokens(inp[rows], tree)
            out = ro.policy_loss(lp, old_lp[rows], adv[rows], m, ref_logprobs=ref_lp[rows], **loss_kw, **kw)
            # DDP averages the ranks' gradients: sequence means already are global means; a
            # token sum over the global count is multiplied back by the world size
            scale = run.world if "num_tokens" in kw else 1
            opt.zero_grad(set_to_none=True)
            (out.loss * scale).backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), c["grad_clip"])
            opt.step()
            stats += torch.stack([out.loss.detach() * scale, out.clip_fraction, out.approx_kl]) / n_mb
        cpu_s += time.process_time() - cpu0
        n_steps += 1
        # ---- statistics of this batch (global)
        n_seq = len(group_prompts) * run.world
        sums = run.all_sum(torch.stack([score.sum(), ((old_lp - ref_lp) * mask).sum(), mask.sum(),
                                        torch.tensor(sum(D.judge(p, r) for p, r in zip(group_prompts, resp)),
                                                     device=run.device, dtype=torch.float32)]))
        stats = run.all_sum(stats) / run.world
        rec = {"rm_score": float(sums[0]) / n_seq, "kl": float(sums[1]) / n_seq,
               "sample_judge": float(sums[3]) / n_seq, "loss": float(stats[0]), "clip_frac": float(stats[1]),
               "approx_kl": float(stats[2]), "resp_len": float(sums[2]) / n_seq}
        hist["kl"].append(rec["kl"])
        hist["rm"].append(rec["rm_score"])
        window.append(rec)
        if (step + 1) % log_every == 0 or step == steps - 1:
            out_rec = {key: sum(r[key] for r in window) / len(window) for key in window[0]}
            window = []
            if (step + 1) % c["eval_every"] == 0 or step == steps - 1:
                s = judge_scores(run, policy, held, desc="grpo: judge")
                out_rec["judge_score"] = sum(s) / max(len(s), 1)
            run.log("grpo", step + 1, **out_rec)
        if (step + 1) % run.cfg["run.ckpt_every"] == 0 and step + 1 < steps:
            run.save("grpo", "resume", {"models": {"policy": policy.state_dict()}, "opt": opt.state_dict(),
                                        "step": step + 1, "rng": rng_state(), "hist": hist, "window": window,
                                        "costs": [fwd_tokens, cpu_s, n_steps],
                                        "seconds": run.elapsed(), "cpu_seconds": run.elapsed_cpu()})
    policy.eval()
    speed = throughput(run, tokens, time.time() - t_loop)
    tail = max(1, len(hist["kl"]) // 10)
    resp_held: list[str] = []
    scores = judge_scores(run, policy, held, desc="grpo: judge", responses_out=resp_held)
    diff = paired_difference(scores, sft_scores)
    res = {"judge_score": mean_se(scores)[0], "judge_score_se": mean_se(scores)[1],
           "judge_minus_sft": diff["mean"], "judge_minus_sft_se": diff["se"],
           "prompts_better_than_sft": diff["wins"], "prompts_worse_than_sft": diff["losses"],
           "rm_score_start": rm_start, "rm_score_end": rm_score(run, policy, rm, held, "ppo_eval"),
           "kl_mean": sum(hist["kl"]) / max(len(hist["kl"]), 1), "kl_end": sum(hist["kl"][-tail:]) / tail,
           "pretrain_loss": pretrain_loss(run, policy), "filler_rate": filler_rate(resp_held),
           "group": G, **speed, **step_costs(shared, fwd_tokens, cpu_s, n_steps)}
    return res, policy.state_dict()
