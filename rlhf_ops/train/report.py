"""summary.json and report.md (with PNG plots) from results.json and metrics.jsonl.

summary.json holds, flat, every number a stage reported (``"<stage>.<key>"``: ``sft.judge_score``,
``ppo.judge_minus_sft``, ``ppo_ptx.pretrain_loss``, ``grpo.judge_score``, ...), ``wall_seconds`` (the stages' own
seconds, summed), and under ``stages`` the config, command-line args and seconds of the command
that produced each stage — re-running one stage replaces that stage's record only.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

import rlhf_ops as ro
from rlhf_ops._memory import saved_for_backward

from . import data as D
from .config import make_config, section
from .run import read_jsonl, write_text_atomic

STAGE_ORDER = ("pretrain", "sft", "rm", "ppo", "ppo_ptx", "grpo")
RECORD_KEYS = ("config", "args", "seconds", "cpu_seconds")      # per-stage record
# keys that measure time or speed: they differ between two runs of the same commit and seed
TIMING_KEYS = ("seconds", "cpu_seconds", "wall_seconds", "train_tokens_per_s", "peak_mem_bytes",
               "train_cpu_s_per_step")

SUMMARY_KEYS = {
    "pretrain": ("final_loss", "judge_score", "pretrain_loss"),
    "sft": ("final_loss", "judge_score", "filler_rate", "pretrain_loss"),
    "rm": ("heldout_pair_accuracy",),
    "ppo": ("judge_score", "judge_minus_sft", "judge_minus_sft_se", "filler_rate", "rm_score_start",
            "rm_score_end", "kl_mean", "pretrain_loss"),
    "ppo_ptx": ("judge_score", "judge_minus_sft", "judge_minus_sft_se", "filler_rate", "rm_score_end",
                "kl_mean", "pretrain_loss"),
    "grpo": ("judge_score", "judge_minus_sft", "judge_minus_sft_se", "filler_rate", "rm_score_end",
             "kl_mean", "pretrain_loss"),
}

# name, title, [(label, metrics stage, metrics key)], y label, what the figure shows (one line)
PLOTS = [
    ("loss_pretrain.png", "pretraining loss L1", [("L1", "pretrain", "loss")], "loss",
     "Stage 1: the mean next-token loss L1 of the training batches."),
    ("loss_sft.png", "SFT loss L3 = L2 + λ·L1", [("L3", "sft", "loss")], "loss",
     "Stage 2: L2 on the demonstrations' response tokens plus λ times L1 over the whole demonstration."),
    ("loss_rm.png", "reward-model pairwise loss", [("loss", "rm", "loss")], "loss",
     "Stage 3: −log σ(r_w − r_l), averaged over the ranked pairs of each prompt."),
    ("rm_accuracy.png", "RM held-out pairwise accuracy", [("accuracy", "rm", "heldout_pair_accuracy")],
     "accuracy", "Stage 3: the fraction of held-out ranked pairs the RM orders as the judge does."),
    ("ppo_rollout_reward.png", "PPO rollouts: RM score and reward",
     [("raw RM score", "ppo", "rm_score"), ("RM score − β·KL", "ppo", "reward"),
      ("PPO-ptx raw RM score", "ppo_ptx", "rm_score"), ("PPO-ptx RM score − β·KL", "ppo_ptx", "reward")],
     "per response", "Stage 4, the training rollouts (temperature 1) of each update: the raw RM score of "
     "a response, and the reward PPO maximises (RM score minus β times the KL to SFT)."),
    ("ppo_kl.png", "PPO: KL(π‖π_SFT) per response", [("PPO", "ppo", "kl"), ("PPO-ptx", "ppo_ptx", "kl"),
                                                      ("GRPO", "grpo", "kl")],
     "nats", "Stage 4: the KL of the policy to SFT summed over a response's tokens (k1 estimate)."),
    ("ppo_judge.png", "PPO: judge score",
     [("samples (T=1)", "ppo", "sample_judge"), ("greedy, held-out", "ppo", "judge_score"),
      ("PPO-ptx greedy, held-out", "ppo_ptx", "judge_score"), ("GRPO samples (T=1)", "grpo", "sample_judge"),
      ("GRPO greedy, held-out", "grpo", "judge_score")], "judge",
     "Stage 4: the judge's score of the training rollouts and of greedy decodes of the held-out prompts."),
    ("grpo_rm_score.png", "GRPO rollouts: RM score", [("raw RM score", "grpo", "rm_score")], "per response",
     "Stage 4 (GRPO): the raw RM score of the training completions (temperature 1) of each update; the "
     "advantages are these scores relative to their group."),
]


def read_metrics(out: Path) -> list[dict]:
    return read_jsonl(Path(out) / "metrics.jsonl")


def read_results(out: Path) -> dict:
    p = Path(out) / "results.json"
    return json.loads(p.read_text()) if p.exists() else {}


def summary_of(results: dict) -> dict:
    """The flat summary of a results.json dict (see the module docstring)."""
    summary: dict = {}
    stages: dict = {}
    for stage in sorted(results, key=lambda s: STAGE_ORDER.index(s) if s in STAGE_ORDER else 99):
        r = results[stage]
        for k, v in r.items():
            if k not in ("config", "args"):
                summary[f"{stage}.{k}"] = v
        if "config" in r:
            stages[stage] = {k: r[k] for k in RECORD_KEYS if k in r}
    summary["wall_seconds"] = sum(s.get("seconds", 0.0) for s in stages.values())
    summary["stages"] = stages
    return summary


def write_summary(out: Path, cfg: dict | None = None, args: dict | None = None) -> dict:
    summary = summary_of(read_results(out))
    write_text_atomic(Path(out) / "summary.json", json.dumps(summary, indent=1))
    return summary


def numbers(summary: dict) -> dict:
    """The summary's numbers that do not measure time: equal for two runs of one commit and seed."""
    return {k: v for k, v in summary.items()
            if k != "stages" and k.rsplit(".", 1)[-1] not in TIMING_KEYS}


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _plot(path: Path, title: str, series: list[tuple[str, list, list]], ylabel: str):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for label, xs, ys in series:
        ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=label)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _judge_bars(path: Path, summary: dict) -> bool:
    """Greedy held-out judge score of each stage's model, ± one standard error of the mean."""
    bars = [(name, summary.get(f"{s}.judge_score"), summary.get(f"{s}.judge_score_se"))
            for s, name in (("pretrain", "pretrain"), ("sft", "SFT"), ("ppo", "PPO"), ("ppo_ptx", "PPO-ptx"),
                            ("grpo", "GRPO"))]
    bars = [b for b in bars if b[1] is not None]
    if not any(n in ("SFT", "PPO", "GRPO") for n, _, _ in bars):
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    xs = range(len(bars))
    ax.bar(xs, [b[1] for b in bars], yerr=[b[2] or 0.0 for b in bars], capsize=6,
           color=["#bbbbbb", "#4c72b0", "#dd8452", "#55a868", "#8172b3"][:len(bars)])
    ax.set_xticks(list(xs), [b[0] for b in bars])
    for x, (_, v, se) in zip(xs, bars):
        ax.text(x, v + (se or 0) + 0.01, f"{v:.3f}", ha="center", fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("judge score (greedy, held-out)")
    ax.set_title("judge score by stage (± standard error)")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def _bytes(n: int) -> str:
    return f"{n / 2 ** 20:.2f} MiB" if n >= 2 ** 20 else f"{n / 2 ** 10:.1f} KiB"


def logprob_memory(cfg: dict, backend: str = "triton") -> dict:
    """Bytes the PPO minibatch's log-prob op keeps for backward beyond its inputs, measured on the
    meta device at cfg's sizes (the policy's hidden states [MB, T, d], the tied W_e [V, d]):

    * ``logits``: token_logprobs(F.linear(h, W_e), actions) — the [MB, T, V] logits are kept;
    * ``hidden``: linear_token_logprobs(h, W_e, actions) — two numbers per token (lse) are kept.

    T is the longest rollout the preset can produce (longest prompt + ppo.max_new − 1). The fused
    backends' fake implementations run (no kernel), and autograd records what they would keep.
    The rollout's no-grad forward of the policy and of the SFT copy no longer holds two
    [B, T, V] logit tensors either: ``rollout_logits_bytes`` is their size at ppo.batch."""
    dc = D.DataConfig(**section(cfg, "data"))
    longest = max(2 + 2 * dc.max_digits + 2 if k == "A" else 3 + dc.max_len for k in dc.tasks)
    T, MB, B = longest + cfg["ppo.max_new"] - 1, cfg["ppo.minibatch"], cfg["ppo.batch"]
    d, V = cfg["model.d_model"], D.VOCAB_SIZE
    meta = torch.device("meta")

    def kept(fn) -> int:                   # new storages autograd saves, inputs excluded
        return saved_for_backward(lambda a: fn(*a), lambda: [
            torch.empty(MB, T, d, device=meta, requires_grad=True),
            torch.empty(V, d, device=meta, requires_grad=True),
            torch.empty(MB, T, dtype=torch.long, device=meta)])["saved_tensor_bytes"]

    return {"MB": MB, "T": T, "d": d, "V": V, "backend": backend,
            "logits": kept(lambda h, W, a: ro.token_logprobs(torch.nn.functional.linear(h, W), a,
                                                             backend=backend)),
            "hidden": kept(lambda h, W, a: ro.linear_token_logprobs(h, W, a, backend=backend)),
            "rollout_logits_bytes": 2 * B * T * V * 4}


def logprob_memory_line() -> str:
    """What computing PPO's log-probs from hidden states saves at the gpu preset's sizes (meta)."""
    m = logprob_memory(make_config("gpu"))
    return (f"Log-probs from hidden states (`linear_token_logprobs`), measured on the meta device at the "
            f"`gpu` preset's sizes (PPO minibatch {m['MB']} × {m['T']} tokens, d = {m['d']}, V = {m['V']}, "
            f"fp32, fused backend): the policy's log-prob op keeps {_bytes(m['hidden'])} for backward "
            f"instead of {_bytes(m['logits'])} with logits (`token_logprobs` of `F.linear`), "
            f"{_bytes(m['logits'] - m['hidden'])} less per minibatch; the rollout's no-grad forward of "
            f"the policy and the SFT copy no longer holds their two [{make_config('gpu')['ppo.batch']}, "
            f"{m['T']}, {m['V']}] logit tensors ({_bytes(m['rollout_logits_bytes'])}). The saving is V × 4 "
            f"bytes per token: small at this toy's {m['V']}-token vocabulary, GiBs at an LLM's.")


def ptx_verdict(sft: float, ppo: float, ptx: float, pretrained: float | None = None) -> str:
    """Does PPO-ptx keep the pretraining loss closer to SFT's than PPO does (ptx's purpose)?"""
    closer = abs(ptx - sft) < abs(ppo - sft)
    s = (f"Pretraining loss (L1 on held-out corpus windows): SFT {sft:.4f}, PPO {ppo:.4f} ({ppo - sft:+.4f}), "
         f"PPO-ptx {ptx:.4f} ({ptx - sft:+.4f})"
         + (f", the pretrained model {pretrained:.4f}" if pretrained is not None else "") + ": PPO-ptx "
         + ("keeps it closer to SFT's than PPO does." if closer else "does not keep it closer to SFT's than PPO does"))
    if not closer and (ptx - sft) * (ppo - sft) < 0:
        s += (" — it moves it further the other way, below SFT's, towards the pretrained model's: "
              "the γ·L1 term re-fits the corpus.")
    elif not closer:
        s += "."
    return s


# A stage is told apart from SFT when its paired mean difference is at least SE_BAR standard
# errors from 0 — the bar of summarize's table and of the README ("≥ 3 SE").
SE_BAR = 3


def verdict(d: float, se: float, name: str = "PPO") -> str:
    """The verdict on a paired difference d ± se, with the measured margin in standard errors."""
    if se <= 0:   # the same difference on every prompt
        return (f"{name} beats SFT (standard error 0)" if d > 0 else f"{name} is worse than SFT "
                "(standard error 0)" if d < 0 else f"{name} and SFT are not told apart (equal on every prompt)")
    z = d / se
    if z >= SE_BAR:
        return f"{name} beats SFT by {z:.1f} standard errors (the bar is {SE_BAR})"
    if z <= -SE_BAR:
        return f"{name} is worse than SFT by {-z:.1f} standard errors (the bar is {SE_BAR})"
    return f"{name} and SFT are not told apart ({z:+.1f} standard errors; the bar is {SE_BAR})"


def write_report(out: Path, summary: dict) -> Path:
    out = Path(out)
    rows = read_metrics(out)
    figs = []

    def series(stage, key):
        pts = [(r["step"], r[key]) for r in rows if r.get("stage") == stage and key in r]
        return [p[0] for p in pts], [p[1] for p in pts]

    if _judge_bars(out / "judge_by_stage.png", summary):
        figs.append(("judge score by stage", "judge_by_stage.png",
                     "Greedy decodes of the same held-out prompts, scored by the judge; error bars are "
                     "one standard error of the mean over the prompts."))
    for fname, title, specs, ylabel, what in PLOTS:
        ser = [(label, *series(stage, key)) for label, stage, key in specs]
        ser = [s for s in ser if s[1]]
        if ser:
            _plot(out / fname, title, ser, ylabel)
            figs.append((title, fname, what))
    lines = ["# rlhf_ops training run", ""]
    st = summary.get("stages", {})
    if st:
        lines += ["| stage | backend | device | preset | seed | seconds |", "|---|---|---|---|---|---:|"]
        for s, rec in st.items():
            a = rec.get("args", {})
            lines.append(f"| {s} | {a.get('backend')} | {a.get('device')} | {a.get('preset')} | "
                         f"{a.get('seed')} | {rec.get('seconds', 0):.0f} |")
        lines += ["", f"Wall time of the stages: {summary.get('wall_seconds', 0):.0f} s.", ""]
    lines += ["| metric | value |", "|---|---|"]
    for stage, keys in SUMMARY_KEYS.items():
        for k in keys:
            v = summary.get(f"{stage}.{k}")
            if v is not None:
                lines.append(f"| {stage}.{k} | {v:.4f} |")
    for stage, name in (("ppo", "PPO"), ("ppo_ptx", "PPO-ptx"), ("grpo", "GRPO")):
        d, se = summary.get(f"{stage}.judge_minus_sft"), summary.get(f"{stage}.judge_minus_sft_se")
        if d is not None and se is not None:
            lines += ["", f"Greedy judge score, {name} − SFT on the same held-out prompts: {d:+.4f} ± {se:.4f} "
                          f"(paired standard error; {summary.get(f'{stage}.prompts_better_than_sft')} prompts "
                          f"better, {summary.get(f'{stage}.prompts_worse_than_sft')} worse): "
                          f"{verdict(d, se, name)}."]
    sl, pl, xl = (summary.get(k) for k in ("ppo.sft_pretrain_loss", "ppo.pretrain_loss", "ppo_ptx.pretrain_loss"))
    if None not in (sl, pl, xl):
        lines += ["", ptx_verdict(sl, pl, xl, summary.get("pretrain.pretrain_loss"))]
    lines += ["", logprob_memory_line()]
    lines += ["", "RM scores: `ppo.rm_score_start`/`rm_score_end` are the raw RM score of temperature-1 "
                  "samples of the held-out prompts from the SFT model and from the final policy; the "
                  "rollout figure shows the same raw score on each update's training prompts, and the "
                  "reward PPO maximises (raw score − β·KL).", ""]
    for title, fname, what in figs:
        lines += [f"## {title}", "", what, "", f"![{title}]({fname})", ""]
    p = out / "report.md"
    write_text_atomic(p, "\n".join(lines))
    return p
