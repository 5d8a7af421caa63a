"""Stage 1 — pretraining: L1 = next-token loss over context windows of the task corpus
(half of its answers noisy, as web text is)."""
from __future__ import annotations

import time

from rlhf_ops import data as D

from .common import Run, fit, judge_score


def lm_loss(model, x, y, n_global: int, world: int = 1):
    """L1 of this rank's rows → (loss to backpropagate, Σ token losses here, global token count).

    The loss is Σ_here / n_global · world, so DDP's average of the ranks' gradients is the
    gradient of the mean over the global batch."""
    s = model(x, y, reduction="sum")
    return s / n_global * world, s, n_global


def run_pretrain(run: Run) -> dict:
    t0 = time.time()
    c, rows = run.cfg, run.local(run.cfg["pretrain.batch"])
    model = run.new_lm()

    def batch(step):
        x, y = D.pretrain_batch(run.seed, step, c["pretrain.batch"], c["model.block_size"], run.data_cfg)
        return x[rows].to(run.device), y[rows].to(run.device), y.numel()

    res = fit(run, "pretrain", {"lm": model}, "lm", batch, lambda m, b: lm_loss(m, *b, run.world))
    res["judge_score"] = judge_score(run, model)
    res["seconds"] = time.time() - t0
    run.save("pretrain", "final", {"models": {"lm": model.state_dict()},
                                   "model_cfg": vars(model.cfg), "result": res})
    run.log("pretrain", c["pretrain.steps"], judge_score=res["judge_score"])
    run.save_result("pretrain", res)
    return res
