"""Stage 2 — supervised fine-tuning on demonstrations: L3 = L2 + λ·L1.

L2 is the loss of the response tokens given the prompt (prompt tokens ignored), L1 the LM loss
over the whole demonstration; both are means over their own tokens of the global batch.
"""
from __future__ import annotations

from . import data as D

from .run import Run, filler_rate, fit, judge_scores, mean_se, pretrain_loss


def sft_loss(model, x, y_resp, y_all, n_resp: int, n_all: int, lam: float, world: int = 1):
    """L3 = L2 + λ·L1 of this rank's rows, normalised by the global token counts.

    One forward: per-token losses on every real token give L1; L2 sums them over the response
    tokens, whose targets are the same (y_resp ⊂ y_all, prompt positions ignored).
    Returns (loss to backpropagate, this rank's share of L3 · n_resp, n_resp).
    """
    tok = model(x, y_all, reduction="none").view(y_all.shape)
    l2 = tok[y_resp != D.IGNORE].sum() / n_resp
    l3 = l2 + lam * tok.sum() / n_all
    return l3 * world, l3 * n_resp, n_resp


def run_sft(run: Run) -> dict:
    c, B = run.cfg, run.cfg["sft.batch"]
    rows, lam = run.local(B), c["sft.lm_coef"]
    model = run.load_model("pretrain", "lm")

    def batch(step):
        b = D.sft_batch(run.seed, step, B, run.data_cfg, c["sft.n_demos"])
        n2 = (b["y_resp"] != D.IGNORE).sum()         # global token counts (every rank has the batch)
        n1 = (b["y_all"] != D.IGNORE).sum()
        return b["x"][rows].to(run.device), b["y_resp"][rows].to(run.device), \
            b["y_all"][rows].to(run.device), n2.item(), n1.item()

    res = fit(run, "sft", {"lm": model}, "lm", batch, lambda m, b: sft_loss(m, *b, lam, run.world))
    resp: list[str] = []
    scores = judge_scores(run, model, desc="sft: judge", responses_out=resp)
    res["judge_score"], res["judge_score_se"] = mean_se(scores)
    res["filler_rate"] = filler_rate(resp)
    res["pretrain_loss"] = pretrain_loss(run, model)
    res["seconds"] = run.elapsed()
    run.log("sft", c["sft.steps"], judge_score=res["judge_score"])
    run.save_result("sft", res)
    run.save("sft", "final", {"models": {"lm": model.state_dict()}, "model_cfg": vars(model.cfg),
                              "result": res})                          # the commit point
    run.remove(("sft", "resume"))
    return res
