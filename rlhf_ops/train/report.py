"""summary.json and report.md (with PNG plots) from results.json and metrics.jsonl."""
from __future__ import annotations

import json
from pathlib import Path

SUMMARY_KEYS = {
    "pretrain": ("final_loss", "judge_score"),
    "sft": ("final_loss", "judge_score"),
    "rm": ("heldout_pair_accuracy",),
    "ppo": ("judge_score", "judge_minus_sft", "judge_minus_sft_se", "rm_score_start", "rm_score_end", "kl_mean"),
}


def read_metrics(out: Path) -> list[dict]:
    p = out / "metrics.jsonl"
    return [json.loads(ln) for ln in p.read_text().splitlines() if ln] if p.exists() else []


def write_summary(out: Path, cfg: dict, args: dict) -> dict:
    res = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    summary: dict = {}
    for stage, r in res.items():
        for k, v in r.items():
            summary[f"{stage}.{k}"] = v
    summary["wall_seconds"] = sum(r.get("seconds", 0.0) for r in res.values())
    summary["config"] = cfg
    summary["args"] = args
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _plot(path: Path, title: str, series: list[tuple[str, list, list]], ylabel: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for label, xs, ys in series:
        ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=label)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_report(out: Path, summary: dict) -> Path:
    rows = read_metrics(out)
    figs = []

    def series(stage, key):
        pts = [(r["step"], r[key]) for r in rows if r["stage"] == stage and key in r]
        return [p[0] for p in pts], [p[1] for p in pts]

    plots = [
        ("loss_pretrain.png", "pretraining loss L1", [("L1", "pretrain", "loss")], "loss"),
        ("loss_sft.png", "SFT loss L3 = L2 + λ·L1", [("L3", "sft", "loss")], "loss"),
        ("loss_rm.png", "reward-model pairwise loss", [("loss", "rm", "loss")], "loss"),
        ("rm_accuracy.png", "RM held-out pairwise accuracy", [("accuracy", "rm", "heldout_pair_accuracy")],
         "accuracy"),
        ("ppo_reward.png", "PPO: RM score of samples", [("RM score", "ppo", "rm_score")], "score"),
        ("ppo_kl.png", "PPO: KL(π‖π_SFT) per response", [("KL", "ppo", "kl")], "nats"),
        ("ppo_judge.png", "PPO: judge score",
         [("samples (T=1)", "ppo", "sample_judge"), ("greedy, held-out", "ppo", "judge_score")], "judge"),
    ]
    for fname, title, specs, ylabel in plots:
        ser = [(label, *series(stage, key)) for label, stage, key in specs]
        ser = [s for s in ser if s[1]]
        if ser:
            _plot(out / fname, title, ser, ylabel)
            figs.append((title, fname))
    lines = ["# rlhf_ops training run", "",
             f"backend `{summary.get('args', {}).get('backend')}`, device `{summary.get('args', {}).get('device')}`, "
             f"preset `{summary.get('args', {}).get('preset')}`, wall time {summary['wall_seconds']:.0f} s", "",
             "| metric | value |", "|---|---|"]
    for stage, keys in SUMMARY_KEYS.items():
        for k in keys:
            v = summary.get(f"{stage}.{k}")
            if v is not None:
                lines.append(f"| {stage}.{k} | {v:.4f} |")
    d, se = summary.get("ppo.judge_minus_sft"), summary.get("ppo.judge_minus_sft_se")
    if d is not None and se is not None:
        verdict = ("PPO beats SFT" if d > 2 * se else "PPO is worse than SFT" if d < -2 * se
                   else "PPO and SFT are not told apart")
        lines += ["", f"Greedy judge score, PPO − SFT on the same held-out prompts: {d:+.4f} ± {se:.4f} "
                      f"(paired standard error; {summary.get('ppo.prompts_better_than_sft')} prompts better, "
                      f"{summary.get('ppo.prompts_worse_than_sft')} worse): {verdict} at two standard errors."]
    lines.append("")
    for title, fname in figs:
        lines += [f"## {title}", "", f"![{title}]({fname})", ""]
    p = out / "report.md"
    p.write_text("\n".join(lines))
    return p
