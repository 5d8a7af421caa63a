"""Stage 2 — supervised fine-tuning on demonstrations: L3 = L2 + λ·L1.

L2 is the loss of the response tokens given the prompt (prompt tokens ignored), L1 the LM loss
over the whole demonstration; both are means over their own tokens of the global batch.
"""
from __future__ import annotations

import time

from rlhf_ops import data as D

from .common import Run, fit, judge_score


def run_sft(run: Run) -> dict:
    t0 = time.time()
    c, B = run.cfg, run.cfg["sft.batch"]
    rows, lam = run.local(B), c["sft.lm_coef"]
    model = run.load_model("pretrain", "lm")

    def batch(step):
        b = D.sft_batch(run.seed, step, B, run.data_cfg)
        n2 = (b["y_resp"] != D.IGNORE).sum()         # global token counts (every rank has the batch)
        n1 = (b["y_all"] != D.IGNORE).sum()
        return b["x"][rows].to(run.device), b["y_resp"][rows].to(run.device), \
            b["y_all"][rows].to(run.device), n2.item(), n1.item()

    def loss(m, b):
        x, y2, y1, n2, n1 = b
        # one forward: per-token losses on every real token (L1); L2 is their sum over response
        # tokens, whose targets are the same (y2 ⊂ y1, prompt positions ignored)
        tok = m(x, y1, reduction="none").view(y1.shape)
        s2 = tok[y2 != D.IGNORE].sum()
        l3 = s2 / n2 + lam * tok.sum() / n1
        return l3 * run.world, l3 * n2, n2             # logged: the global L3

    res = fit(run, "sft", {"lm": model}, "lm", batch, loss)
    res["judge_score"] = judge_score(run, model)
    res["seconds"] = time.time() - t0
    run.save("sft", "final", {"models": {"lm": model.state_dict()}, "model_cfg": vars(model.cfg),
                              "result": res})
    run.log("sft", c["sft.steps"], judge_score=res["judge_score"])
    run.save_result("sft", res)
    return res
