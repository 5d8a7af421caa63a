"""Stage 1 — pretraining: L1 = next-token loss over context windows of the task corpus
(half of its answers noisy, as web text is)."""
from __future__ import annotations

from . import data as D

from .run import Run, filler_rate, fit, judge_scores, mean_se, pretrain_loss


def lm_loss(model, x, y, n_global: int, world: int = 1):
    """L1 of this rank's rows → (loss to backpropagate, Σ token losses here, global token count).

    The loss is Σ_here / n_global · world, so DDP's average of the ranks' gradients is the
    gradient of the mean over the global batch."""
    s = model(x, y, reduction="sum")
    return s / n_global * world, s, n_global


def run_pretrain(run: Run) -> dict:
    c, rows = run.cfg, run.local(run.cfg["pretrain.batch"])
    model = run.new_lm()

    def batch(step):
        x, y = D.pretrain_batch(run.seed, step, c["pretrain.batch"], c["model.block_size"], run.data_cfg)
        return x[rows].to(run.device), y[rows].to(run.device), y.numel()

    res = fit(run, "pretrain", {"lm": model}, "lm", batch, lambda m, b: lm_loss(m, *b, run.world))
    resp: list[str] = []
    scores = judge_scores(run, model, desc="pretrain: judge", responses_out=resp)
    res["judge_score"], res["judge_score_se"] = mean_se(scores)
    res["filler_rate"] = filler_rate(resp)
    res["pretrain_loss"] = pretrain_loss(run, model)
    res["seconds"] = run.elapsed()
    run.log("pretrain", c["pretrain.steps"], judge_score=res["judge_score"])
    run.save_result("pretrain", res)
    run.save("pretrain", "final", {"models": {"lm": model.state_dict()},   # the commit point
                                   "model_cfg": vars(model.cfg), "result": res})
    run.remove(("pretrain", "resume"))
    return res
