"""The README's results table, printed from the summary.json of one or more runs.

    python -m rlhf_ops.train.summarize runs/seed0 runs/seed1 [--markdown-only]

One column per run (labelled with its seed), one row per reported number, and the goal each row
is held to, marked ✓ when every run meets it and ✗ (with the runs that miss) when one
does not. Nothing here is typed by hand, so the table cannot drift from what the code produces.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TIME_GOAL_S = 720.0     # `all` (five stages: PPO and GRPO included) within 12 minutes


def load(run: str | Path) -> dict:
    p = Path(run)
    p = p if p.suffix == ".json" else p / "summary.json"
    if not p.exists():
        raise SystemExit(f"python -m rlhf_ops.train.summarize: error: {p} does not exist")
    return json.loads(p.read_text())


def _seed(s: dict, fallback: str) -> str:
    for rec in s.get("stages", {}).values():
        if "args" in rec:
            return f"seed {rec['args'].get('seed')}"
    return fallback


def _f(v, digits=4, sign=False):
    if v is None:
        return "—"
    return f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"


def cpu_seconds(s: dict) -> float | None:
    vals = [rec.get("cpu_seconds") for rec in s.get("stages", {}).values()]
    return sum(vals) if vals and None not in vals else None


def _versus_sft(g, stage: str) -> tuple[str, bool | None]:
    """A policy's judge score minus SFT's, paired over the same held-out prompts: the cell (the
    difference ± its standard error, the prompts better and worse, the margin in SEs) and whether
    it meets the goal (above 0 by at least 3 SE)."""
    d, se = g(f"{stage}.judge_minus_sft"), g(f"{stage}.judge_minus_sft_se")
    cell = (f"{_f(d, sign=True)} ± {_f(se)} ({g(f'{stage}.prompts_better_than_sft')} better, "
            f"{g(f'{stage}.prompts_worse_than_sft')} worse; {d / se:.1f} SE)" if None not in (d, se) and se > 0
            else f"{_f(d, sign=True)} ± {_f(se)}")
    return cell, None if None in (d, se) else d > 0 and d >= 3 * se


def rows(s: dict) -> list[tuple[str, str, bool | None]]:
    """(metric, cell, goal met?) for one run; None: no goal on that row."""
    g = s.get
    out = [("pretrain.judge_score", _f(g("pretrain.judge_score")), None)]
    sft, pre = g("sft.judge_score"), g("pretrain.judge_score")
    out.append(("sft.judge_score", f"{_f(sft)} ± {_f(g('sft.judge_score_se'))}",
                None if None in (sft, pre) else sft > pre))
    out.append(("sft.filler_rate (greedy answers with the filler)", _f(g("sft.filler_rate"), 3), None))
    acc = g("rm.heldout_pair_accuracy")
    out.append(("rm.heldout_pair_accuracy", _f(acc, 3), None if acc is None else acc >= 0.8))
    a, b = g("ppo.rm_score_start"), g("ppo.rm_score_end")
    out.append(("ppo.rm_score_start → rm_score_end (raw RM score, held-out samples)",
                f"{_f(a, 3)} → {_f(b, 3)}", None if None in (a, b) else b > a))
    out.append(("ppo.kl_mean (nats per response)", _f(g("ppo.kl_mean"), 3), g("ppo.kl_mean") is not None))
    out.append(("ppo.judge_score", f"{_f(g('ppo.judge_score'))} ± {_f(g('ppo.judge_score_se'))}", None))
    out.append(("ppo − SFT, paired over the same prompts", *_versus_sft(g, "ppo")))
    out.append(("ppo.filler_rate", _f(g("ppo.filler_rate"), 3), None))
    if g("ppo_ptx.judge_score") is not None:
        d2, se2 = g("ppo_ptx.judge_minus_sft"), g("ppo_ptx.judge_minus_sft_se")
        out.append(("ppo_ptx.judge_score (γ_ptx = "
                    f"{_f(g('ppo_ptx.ptx_coef'), 1)})", f"{_f(g('ppo_ptx.judge_score'))} ± "
                    f"{_f(g('ppo_ptx.judge_score_se'))}", None))
        out.append(("ppo_ptx − SFT, paired", f"{_f(d2, sign=True)} ± {_f(se2)}", None))
        sl, pl, xl = g("ppo.sft_pretrain_loss"), g("ppo.pretrain_loss"), g("ppo_ptx.pretrain_loss")
        if None not in (sl, pl, xl):
            out.append(("pretraining loss: pretrained / SFT / PPO / PPO-ptx",
                        f"{_f(g('pretrain.pretrain_loss'), 3)} / {sl:.3f} / {pl:.3f} ({pl - sl:+.3f}) / "
                        f"{xl:.3f} ({xl - sl:+.3f})", None))
            closer = abs(xl - sl) < abs(pl - sl)
            out.append(("PPO-ptx keeps the pretraining loss closer to SFT's than PPO",
                        "yes" if closer else ("no (overshoots: lower than SFT's)" if (xl - sl) * (pl - sl) < 0
                                              else "no"), None))
    if g("grpo.judge_score") is not None:
        a, b = g("grpo.rm_score_start"), g("grpo.rm_score_end")
        out.append(("grpo.rm_score_start → rm_score_end", f"{_f(a, 3)} → {_f(b, 3)}",
                    None if None in (a, b) else b > a))
        out.append(("grpo.kl_mean (nats per response)", _f(g("grpo.kl_mean"), 3), None))
        out.append(("grpo.judge_score", f"{_f(g('grpo.judge_score'))} ± {_f(g('grpo.judge_score_se'))}", None))
        out.append(("grpo − SFT, paired over the same prompts", *_versus_sft(g, "grpo")))
        out.append(("grpo.filler_rate", _f(g("grpo.filler_rate"), 3), None))
    for stage in ("ppo", "grpo"):
        tok, sec = g(f"{stage}.tokens_per_step"), g(f"{stage}.train_cpu_s_per_step")
        if tok is not None and sec is not None:
            how = "shared prefix" if g(f"{stage}.shared_prefix") else "unshared"
            out.append((f"{stage}: tokens / CPU s per step (log-prob and value forwards, updates)",
                        f"{tok:,.0f} / {sec:.3f} s ({how})", None))
    wall, cpu = g("wall_seconds"), cpu_seconds(s)
    out.append(("wall time, all stages (measured)", f"{wall:.0f} s" if wall is not None else "—",
                None if wall is None else wall <= TIME_GOAL_S))
    out.append(("CPU time of the training process (≈ wall on an unshared core)",
                f"{cpu:.0f} s" if cpu is not None else "—", None if cpu is None else cpu <= TIME_GOAL_S))
    return out


GOALS = {"sft.judge_score": "> pretrain", "rm.heldout_pair_accuracy": "≥ 0.8",
         "ppo.rm_score_start → rm_score_end (raw RM score, held-out samples)": "rises",
         "ppo.kl_mean (nats per response)": "reported",
         "ppo − SFT, paired over the same prompts": "≥ 3 SE",
         "grpo.rm_score_start → rm_score_end": "rises",
         "grpo − SFT, paired over the same prompts": "≥ 3 SE",
         "wall time, all stages (measured)": "≤ 12 min",
         "CPU time of the training process (≈ wall on an unshared core)": "≤ 12 min"}


def table(runs: list[str]) -> str:
    summaries = [load(r) for r in runs]
    heads = [_seed(s, Path(r).name) for s, r in zip(summaries, runs)]
    per_run = [{m: (cell, met) for m, cell, met in rows(s)} for s in summaries]
    order = list(dict.fromkeys(m for r in per_run for m in r))
    lines = ["| | " + " | ".join(heads) + " | goal |", "|---" * (len(heads) + 2) + "|"]
    for metric in order:
        cells = [r.get(metric, ("—", None)) for r in per_run]
        goal = GOALS.get(metric, "")
        met = [c[1] for c in cells]
        if goal and all(m is not None for m in met):
            missed = [h for h, m in zip(heads, met) if not m]
            goal += " ✓" if not missed else f" ✗ ({', '.join(missed)})"
        lines.append(f"| {metric} | " + " | ".join(c[0] for c in cells) + f" | {goal} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(prog="python -m rlhf_ops.train.summarize", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run folders (with summary.json) or summary.json files")
    a = ap.parse_args(argv)
    t = table(a.runs)
    sys.stdout.write(t)
    return t


if __name__ == "__main__":
    main()
