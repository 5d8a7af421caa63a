"""Stage 4 — PPO and PPO-ptx against the reward model, with a per-token KL penalty.

Per RL batch (one episode = one prompt and its sampled response):
  1. sample a response per prompt from the policy π (temperature 1);
  2. reward per token r_t = −β·KL_t (``kl_from_logprobs`` of the policy's and the frozen SFT
     copy's log-probs, both from ``linear_token_logprobs`` on hidden states) plus, at the
     response's last token, the RM score (``ppo_rewards``);
  3. GAE (``rlhf_ops.gae``): δ_t = r_t + γ·V_{t+1} − V_t,  A_t = δ_t + γλ·A_{t+1}  (γ = 1, λ = 0.95),
     returns R_t = A_t + V_t, advantages whitened over the batch's response tokens;
  4. one epoch over minibatches: clipped policy loss  max(−A·ρ, −A·clip(ρ, 1±ε)), ρ = π/π_old
     (``rlhf_ops.policy_loss``, loss_type="ppo"), clipped value loss
     ½·max((V − R)², (V_old + clip(V − V_old, ±ε_v) − R)²) (``rlhf_ops.value_loss``), both token
     means over the global minibatch's response tokens, and for PPO-ptx  γ_ptx·L1 on pretraining
     sequences, all in the same optimizer step.
The policy starts from SFT, the value model from the RM (whose bias makes SFT demos score 0).
β is fixed, or adapted towards ``kl_target`` (Ziegler et al.): β ← β·(1 + clip(KL/target − 1, ±0.2)·n/horizon).
With ``train.shared_prefix`` (default) the log-prob and value forwards run on packed tree batches
(``model.pack_rollout``; GRPO's G completions of a prompt share it, PPO has one response per prompt,
so its batch is the rows without their padding), taken at the response positions only: the same
numbers as the dense padded rows. ``tokens_per_step`` counts the tokens those forwards process.
"""
from __future__ import annotations

import contextlib
import time
import zlib

import torch

import rlhf_ops as ro
from . import data as D
from .model import ScalarHeadGPT, frozen_copy, pack_rollout

from .run import (Run, SimulatedCrash, filler_rate, judge_score, judge_scores, mean_se, paired_difference,
                     pretrain_loss, prompt_tensors, responses, rng_state, set_rng_state, throughput)
from .config import section


def whiten(x, mask, all_sum, eps: float = 1e-8):
    """(x − mean) / std over the masked entries of the global batch."""
    n = all_sum(mask.sum())
    mean = all_sum((x * mask).sum()) / n
    var = all_sum((((x - mean) * mask) ** 2).sum()) / n
    return (x - mean) * torch.rsqrt(var + eps) * mask


def logprobs(model, inp, act, mask, temperature: float, tree=None, entropy: bool = False):
    """log π(act) [B, T] (and the entropy with ``entropy``) from the dense rows, or from the tree
    batch ``tree`` (``pack_rollout`` of these rows) at the mask's positions, 0 elsewhere."""
    if tree is None:
        return model(inp, logprobs_of=act, temperature=temperature, entropy=entropy)
    out = model(None, tree=tree, logprobs_of=act[tree.sel], temperature=temperature, entropy=entropy)
    return tuple(tree.scatter(x) for x in out) if entropy else tree.scatter(out)


def values(model, inp, tree=None):
    """The value model's V [B, T] (from the tree batch: at the mask's positions, 0 elsewhere)."""
    return model(inp) if tree is None else tree.scatter(model(None, tree=tree))


def forward_tokens(inp, tree) -> int:
    """Tokens one forward over these rows processes: the dense rows, or the tree batch."""
    return inp.numel() if tree is None else tree.tokens


def minibatch_backward(run: Run, pol, val, roll: dict, ptx, c: dict) -> torch.Tensor:
    """Backpropagate one PPO(-ptx) minibatch into .grad of the policy and the value model.

    Loss = policy_loss + vf_coef·value_loss, both Σ over this rank's response tokens / n with
    n = the response tokens of the global minibatch (``num_tokens``), + ptx_coef · L1(pretraining
    rows) — one optimizer step takes both. Returns [pg loss, vf loss, L1, clipped fraction] (this
    rank's share of the global values); the clipped fraction counts the tokens where the clip is
    active (ρ > 1 + ε with A > 0, or ρ < 1 − ε with A < 0).
    """
    temp, m = c["temperature"], roll["mask"]
    ntok = run.all_sum(m.sum()).clamp(min=1)          # response tokens of the global minibatch
    l1 = torch.zeros((), device=m.device)
    if ptx is not None:
        x, y, n_global = ptx
        with (pol.no_sync() if run.world > 1 else contextlib.nullcontext()):
            # accumulated locally, all-reduced together with the PPO gradient below
            l1 = pol(x, y, reduction="sum") / n_global
            (c["ptx_coef"] * l1 * run.world).backward()
    # log π(a_t) straight from the hidden states (linear_token_logprobs: no [B, T, V] logits)
    tree = roll.get("tree")
    lp = logprobs(pol, roll["inp"], roll["act"], m, temp, tree)
    pg = ro.policy_loss(lp, roll["old_lp"], roll["adv"], m, loss_type="ppo", clip=c["clip"], num_tokens=ntok)
    vf = ro.value_loss(values(val, roll["inp"], tree), roll["old_v"], roll["ret"], m, clip=c["value_clip"],
                       num_tokens=ntok)
    ((pg.loss + c["vf_coef"] * vf) * run.world).backward()
    clipped = pg.clip_fraction * m.sum() / ntok
    return torch.stack([pg.loss.detach(), vf.detach(), l1.detach(), clipped])


def rollout(run: Run, policy, prompts: list[str], gen: torch.Generator, temperature: float):
    """Sample responses of up to ``ppo.max_new`` tokens (PPO's and GRPO's); returns seq [B, T],
    inputs/actions [B, T−1], mask [B, T−1], last [B]."""
    x, n = prompt_tensors(prompts, run.device)
    seq, rl = policy.generate(x, n, run.cfg["ppo.max_new"], temperature=temperature, eos=D.EOS,
                              pad=D.PAD, generator=gen)
    seq = seq[:, :int((n + rl).max())]
    inp, act = seq[:, :-1], seq[:, 1:]
    pos = torch.arange(act.shape[1], device=run.device)
    # action t is token t+1: the response occupies tokens n .. n+rl−1, i.e. actions n−1 .. n+rl−2
    mask = ((pos >= (n - 1)[:, None]) & (pos < (n + rl - 1)[:, None])).float()
    return seq, inp, act, mask, n + rl - 1, responses(seq, n)


def step_costs(shared: bool, fwd_tokens: int, cpu_s: float, n_steps: int) -> dict:
    """Per update of this invocation: the tokens the log-prob / value forwards processed (this
    rank's) and the CPU seconds from the rollout's end to the last optimizer step (log-probs,
    RM, values, advantages, the minibatch updates: what the shared prefix changes)."""
    n = max(n_steps, 1)
    return {"shared_prefix": bool(shared), "tokens_per_step": fwd_tokens / n, "train_cpu_s_per_step": cpu_s / n}


@torch.no_grad()
def rm_score(run: Run, policy, rm, prompts: list[str], tag: str) -> float:
    """Mean RM score of temperature-1 samples (a fixed generator, so start and end compare)."""
    gen = torch.Generator(device=run.device).manual_seed(zlib.crc32(f"{run.seed}/{tag}".encode()))
    seq, _, _, _, last, _ = rollout(run, policy, prompts, gen, run.cfg["ppo.temperature"])
    return float(rm(seq, last).mean())


def run_ppo(run: Run) -> dict:
    """Train the PPO policy (γ_ptx = ``ppo.ptx_coef``); then, if ``ppo.ptx_compare_coef`` > 0, a
    second policy from the same SFT and RM checkpoints with that γ_ptx (PPO-ptx, ``ppo_ptx.*``),
    on the same prompts, so that the two differ only in the pretraining term."""
    c = section(run.cfg, "ppo")
    if c["batch"] % c["minibatch"]:
        raise ValueError(f"ppo.batch ({c['batch']}) must be a multiple of ppo.minibatch ({c['minibatch']})")
    if c["minibatch"] % run.world:
        raise ValueError(f"ppo.minibatch ({c['minibatch']}) must be divisible by the world size {run.world}")
    sft = run.load_model("sft", "lm")
    ref = frozen_copy(sft)
    rm = frozen_copy(run.load_model("rm", "rm", ScalarHeadGPT))
    held = D.eval_prompts(run.seed, run.cfg["eval.n_prompts"], run.data_cfg)
    # what every policy is compared with (deterministic: recomputed when a run resumes)
    base = {"sft_scores": judge_scores(run, ref, held, desc="ppo: judge of SFT"),
            "rm_score_start": rm_score(run, ref, rm, held, "ppo_eval"),
            "sft_pretrain_loss": pretrain_loss(run, ref)}
    phases = [("ppo", c["ptx_coef"])]
    if c["ptx_compare_coef"] > 0:
        phases.append(("ppo_ptx", c["ptx_compare_coef"]))
    out, models = {}, {}
    for phase, gamma in phases:
        done = run.load(phase, "done") if run.resume else None
        if done is None:
            res, state = train_policy(run, phase, gamma, ref, rm, held, base)
            run.save_result(phase, res, record=phase == "ppo")
            run.save(phase, "done", {"models": state, "result": res})
        else:
            res, state = done["result"], done["models"]
        out[phase] = res
        models.update({(k if phase == "ppo" else f"{k}_{phase}"): v for k, v in state.items()})
    res = out["ppo"]
    if "ppo_ptx" in out:      # ptx's reason: a pretraining loss closer to SFT's than plain PPO's
        res["ptx_pretrain_loss_gap"] = out["ppo_ptx"]["pretrain_loss"] - base["sft_pretrain_loss"]
    res["sft_pretrain_loss"] = base["sft_pretrain_loss"]
    res["seconds"] = run.elapsed()
    run.save_result("ppo", res)
    run.save("ppo", "final", {"models": models, "model_cfg": vars(sft.cfg), "result": res})   # commit
    run.remove(*[(phase, kind) for phase, _ in phases for kind in ("resume", "done")])
    return res


def train_policy(run: Run, phase: str, ptx_coef: float, ref, rm, held: list[str], base: dict):
    """PPO (γ_ptx = ptx_coef) from the SFT policy and a value model from the RM; resumable under
    the checkpoint name ``phase``. Returns (results, {"lm": policy, "value": value} state dicts)."""
    c = section(run.cfg, "ppo")
    B, MB, steps = c["batch"], c["minibatch"], c["steps"]
    rows = run.local(B)
    n_mb, mb_local = B // MB, MB // run.world
    ptx_rows = int(round(c["ptx_per_episode"] * MB)) if ptx_coef > 0 else 0
    if ptx_rows % run.world:
        raise ValueError(f"pretraining rows per minibatch ({ptx_rows}) must be divisible by the world size")
    cw = {**c, "ptx_coef": ptx_coef}
    policy = run.load_model("sft", "lm")
    value = run.load_model("rm", "rm", ScalarHeadGPT)
    opt = torch.optim.AdamW([{"params": list(policy.parameters()), "lr": c["lr"]},
                             {"params": list(value.parameters()), "lr": c["value_lr"]}],
                            betas=(0.9, 0.95), weight_decay=0.0)
    beta, start, hist, window = c["beta"], 0, {"kl": [], "rm": []}, []
    ck = run.load(phase, "resume") if run.resume else None
    if ck is not None:
        run.resumed_from(ck)
        policy.load_state_dict(ck["models"]["policy"])
        value.load_state_dict(ck["models"]["value"])
        opt.load_state_dict(ck["opt"])
        set_rng_state(ck["rng"])
        beta, start, hist, window = ck["beta"], ck["step"], ck["hist"], list(ck["window"])
    costs = list(ck["costs"]) if ck is not None else [0, 0.0, 0]
    fwd_tokens, cpu_s, n_steps = costs          # the log-prob / value forwards of the updates
    run.trim_metrics(phase, start)
    pol, val = run.wrap(policy), run.wrap(value)
    policy.train(), value.train()
    temp, log_every = c["temperature"], run.cfg["run.log_every"]
    shared = run.cfg["train.shared_prefix"]
    tokens, t_loop = 0, time.time()
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)

    for step in run.progress(range(start, steps), desc=phase, initial=start, total=steps):
        if step == run.cfg["run.crash_at_step"]:
            raise SimulatedCrash(f"{phase}: simulated interruption at step {step}")
        # ---- 1-3: rollout, rewards, advantages (no grad). Both phases see the same prompts.
        prompts = D.prompts(run.seed, "ppo", step, B, run.data_cfg)[rows]
        gen = torch.Generator(device=run.device).manual_seed(
            zlib.crc32(f"{run.seed}/ppo/{step}/{run.rank}".encode()))
        with torch.no_grad():
            policy.eval()
            seq, inp, act, mask, last, resp = rollout(run, policy, prompts, gen, temp)
            policy.train()
            cpu0 = time.process_time()
            tree = pack_rollout(inp, mask) if shared else None
            # log-probs of the policy and of the SFT reference (and the policy's entropy) from
            # hidden states; the per-token KL penalty from the two log-probs
            lp, ent = logprobs(policy, inp, act, mask, temp, tree, entropy=True)
            kp = ro.kl_from_logprobs(lp, logprobs(ref, inp, act, mask, temp, tree), beta=beta, mask=mask)
            score = rm(seq, last)
            old_v = values(value, inp, tree)
            fwd_tokens += 3 * forward_tokens(inp, tree)
            rewards = ro.ppo_rewards(kp.penalty, score, mask)
            adv, ret = ro.gae(rewards, old_v, mask, gamma=c["gamma"], lam=c["lam"], backend=run.backend)
            adv = whiten(adv, mask, run.all_sum)
            old_lp = kp.logprobs
        tokens += inp.numel() * run.world * c["epochs"] + (ptx_rows * run.cfg["model.block_size"] * n_mb
                                                           * c["epochs"])
        # ---- 4: one epoch (by default) over minibatches, PPO-ptx in the same optimizer step.
        # The first value_warmup steps fit only the value model (its per-token outputs start as
        # the RM's, which are meaningful only at the last token): the policy's lr is 0 there.
        opt.param_groups[0]["lr"] = 0.0 if step < c["value_warmup"] else c["lr"]
        stats = torch.zeros(4, device=run.device)            # Σ pg, Σ vf, Σ ptx, Σ clipped
        perm_g = torch.Generator().manual_seed(zlib.crc32(f"{run.seed}/ppo_perm/{step}".encode()))
        k = 0
        for _ in range(c["epochs"]):
            perm = torch.randperm(len(prompts), generator=perm_g).to(run.device)
            for j in range(n_mb):
                mb = perm[j * mb_local:(j + 1) * mb_local]
                ptx = None
                if ptx_rows:
                    x, y = D.pretrain_batch(run.seed, step * n_mb * c["epochs"] + k, ptx_rows,
                                            run.cfg["model.block_size"], run.data_cfg, stream="ptx")
                    sl = run.local(ptx_rows)
                    ptx = (x[sl].to(run.device), y[sl].to(run.device), y.numel())
                roll = {"inp": inp[mb], "act": act[mb], "mask": mask[mb], "adv": adv[mb], "ret": ret[mb],
                        "old_lp": old_lp[mb], "old_v": old_v[mb],
                        "tree": pack_rollout(inp[mb], mask[mb]) if shared else None}
                fwd_tokens += 2 * forward_tokens(roll["inp"], roll["tree"])
                opt.zero_grad(set_to_none=True)
                stats += minibatch_backward(run, pol, val, roll, ptx, cw)
                torch.nn.utils.clip_grad_norm_(policy.parameters(), c["grad_clip"])   # each model on
                torch.nn.utils.clip_grad_norm_(value.parameters(), c["grad_clip"])    # its own norm
                opt.step()
                k += 1
        cpu_s += time.process_time() - cpu0
        n_steps += 1
        # ---- statistics of this batch (global)
        n_seq = len(prompts) * run.world
        kl_seq = run.all_sum((kp.kl * mask).sum()) / n_seq              # KL(π‖π_SFT) per response
        sums = run.all_sum(torch.stack([score.sum(), (ent * mask).sum(), mask.sum(),
                                        torch.tensor(sum(D.judge(p, r) for p, r in zip(prompts, resp)),
                                                     device=run.device, dtype=torch.float32)]))
        stats = run.all_sum(stats) / (n_mb * c["epochs"])
        rec = {"rm_score": float(sums[0]) / n_seq, "kl": float(kl_seq), "beta": beta,
               "reward": float(sums[0]) / n_seq - beta * float(kl_seq),
               "sample_judge": float(sums[3]) / n_seq, "entropy": float(sums[1] / sums[2]),
               "pg_loss": float(stats[0]), "vf_loss": float(stats[1]), "ptx_loss": float(stats[2]),
               "clip_frac": float(stats[3]), "resp_len": float(sums[2]) / n_seq}
        hist["kl"].append(rec["kl"])
        hist["rm"].append(rec["rm_score"])
        window.append(rec)
        if c["kl_target"] > 0:                                # adaptive KL controller
            err = max(-0.2, min(0.2, rec["kl"] / c["kl_target"] - 1))
            beta = beta * (1 + err * B / c["kl_horizon"])
        if (step + 1) % log_every == 0 or step == steps - 1:
            out = {key: sum(r[key] for r in window) / len(window) for key in window[0]}
            window = []
            if (step + 1) % c["eval_every"] == 0 or step == steps - 1:
                out["judge_score"] = judge_score(run, policy, held, desc=f"{phase}: judge")
            run.log(phase, step + 1, **out)
        if (step + 1) % run.cfg["run.ckpt_every"] == 0 and step + 1 < steps:
            run.save(phase, "resume", {"models": {"policy": policy.state_dict(), "value": value.state_dict()},
                                       "opt": opt.state_dict(), "step": step + 1, "rng": rng_state(),
                                       "beta": beta, "hist": hist, "window": window,
                                       "costs": [fwd_tokens, cpu_s, n_steps],
                                       "seconds": run.elapsed(), "cpu_seconds": run.elapsed_cpu()})
    policy.eval(), value.eval()
    speed = throughput(run, tokens, time.time() - t_loop)
    tail = max(1, len(hist["kl"]) // 10)
    # greedy judge scores of the policy and of the frozen SFT copy on the same held-out prompts:
    # the paired difference says whether PPO beat SFT by more than the evaluation's noise
    resp_held: list[str] = []
    scores = judge_scores(run, policy, held, desc=f"{phase}: judge", responses_out=resp_held)
    diff = paired_difference(scores, base["sft_scores"])
    res = {"judge_score": mean_se(scores)[0], "judge_score_se": mean_se(scores)[1],
           "judge_minus_sft": diff["mean"], "judge_minus_sft_se": diff["se"],
           "prompts_better_than_sft": diff["wins"], "prompts_worse_than_sft": diff["losses"],
           "rm_score_start": base["rm_score_start"],
           "rm_score_end": rm_score(run, policy, rm, held, "ppo_eval"),
           "kl_mean": sum(hist["kl"]) / max(len(hist["kl"]), 1),
           "kl_end": sum(hist["kl"][-tail:]) / tail,
           "pretrain_loss": pretrain_loss(run, policy),
           "filler_rate": filler_rate(resp_held),
           "beta_final": beta, "ptx_coef": ptx_coef, "ptx_rows_per_minibatch": ptx_rows, **speed,
           **step_costs(shared, fwd_tokens, cpu_s, n_steps)}
    return res, {"lm": policy.state_dict(), "value": value.state_dict()}
