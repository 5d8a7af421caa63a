"""Stage 3 — reward model.

From the SFT weights with the unembedding replaced by a scalar head. For each prompt, K responses
(K = k_min..k_max) are sampled from the SFT model and ranked by the judge (ties share a rank,
absent responses have rank −1). All K responses of a prompt are one batch element, each response
gets one forward pass, and ``pairwise_reward_loss`` averages −log σ(r_w − r_l) over the C(K,2)
ordered pairs of the prompt. After training the head's bias is shifted so that SFT demonstrations
score 0 on average (the PPO reward baseline of InstructGPT).
"""
from __future__ import annotations

import random
import zlib

import torch
import torch.nn.functional as F

import rlhf_ops as ro
from . import data as D
from .model import GPT, ScalarHeadGPT

from .run import Run, fit, load_checkpoint, prompt_tensors, responses, save_checkpoint


@torch.no_grad()
def make_comparisons(run: Run, sft: GPT, prompts: list[str], tag: str, chunk: int = 512, bar=None) -> dict:
    """tokens [N, K, T], last [N, K] (index of each response's last real token), ranks [N, K].
    ``bar``: a progress bar advanced by one per response sampled."""
    c = run.cfg
    rng = random.Random(f"{run.seed}/{tag}/k")
    ks = [rng.randint(c["rm.k_min"], c["rm.k_max"]) for _ in prompts]
    flat = [p for p, k in zip(prompts, ks) for _ in range(k)]
    gen = torch.Generator(device=run.device).manual_seed(zlib.crc32(f"{run.seed}/{tag}".encode()))
    seqs, lasts, resp = [], [], []
    for i in range(0, len(flat), chunk):
        x, n = prompt_tensors(flat[i:i + chunk], run.device)
        seq, rl = sft.generate(x, n, c["ppo.max_new"], temperature=c["rm.sample_temperature"],
                               eos=D.EOS, pad=D.PAD, generator=gen)
        seqs += list(seq.cpu())
        lasts += (n + rl - 1).tolist()
        resp += responses(seq, n)
        if bar is not None:
            bar.update(seq.shape[0])
    N, K = len(prompts), c["rm.k_max"]
    T = max(len(s) for s in seqs)
    tokens = torch.full((N, K, T), D.PAD, dtype=torch.long)
    last = torch.zeros(N, K, dtype=torch.long)
    ranks = torch.full((N, K), -1, dtype=torch.long)
    j = 0
    for b, (p, k) in enumerate(zip(prompts, ks)):
        for i in range(k):
            tokens[b, i, :len(seqs[j])] = seqs[j]
            last[b, i] = lasts[j]
            j += 1
        scores = [D.judge(p, r) for r in resp[j - k:j]]
        ranks[b] = torch.tensor(D.ranks_from_scores(scores, K))
    return {"tokens": tokens, "last": last, "ranks": ranks, "prompts": prompts}


def has_pair(ranks: torch.Tensor) -> torch.Tensor:
    """[N] bool: the prompt's K responses are not all tied (the loss has a pair to compare)."""
    return ((ranks[:, :, None] < ranks[:, None, :]) & (ranks[:, :, None] >= 0)).flatten(1).any(1)


def informative_comparisons(run: Run, sft: GPT, n: int, prompts_of_round, tag: str,
                            max_rounds: int = 20, bar=None) -> dict:
    """``make_comparisons`` over rounds of prompts (``prompts_of_round(r)``), keeping only prompts
    whose responses are not all tied, until n are kept (or the rounds / prompts run out).

    A prompt on which every sampled response gets the same judge score has no pair, so it adds
    nothing to the loss; a strong SFT model answers most prompts the same way every time (seed 0
    of cpu-demo: 514 of 2000 prompts have a pair), so those are replaced rather than kept.
    """
    parts, kept = [], 0
    for r in range(max_rounds):
        p = prompts_of_round(r)
        if not p or kept >= n:
            break
        comp = make_comparisons(run, sft, p, f"{tag}/{r}", bar=bar)
        idx = has_pair(comp["ranks"]).nonzero().flatten()[:n - kept]
        parts.append({k: (v[idx] if torch.is_tensor(v) else [v[i] for i in idx.tolist()])
                      for k, v in comp.items()})
        kept += idx.numel()
        if bar is not None:
            bar.set_postfix_str(f"{tag}: {kept}/{n} prompts kept")
    if kept == 0:
        raise RuntimeError(f"rm: every sampled response of every {tag} prompt ties under the judge, "
                           f"so there is no comparison to learn from; raise rm.sample_temperature or "
                           f"set rm.informative_only=false")
    T = max(part["tokens"].shape[-1] for part in parts)
    return {"tokens": torch.cat([F.pad(part["tokens"], (0, T - part["tokens"].shape[-1]), value=D.PAD)
                                 for part in parts]),
            "last": torch.cat([part["last"] for part in parts]),
            "ranks": torch.cat([part["ranks"] for part in parts]),
            "prompts": [q for part in parts for q in part["prompts"]]}


def rewards_of(model, tokens, last):
    """tokens [B, K, T] → rewards [B, K]: one forward pass per response."""
    B, K, T = tokens.shape
    return model(tokens.reshape(B * K, T), last.reshape(B * K)).view(B, K)


def rm_loss(model, tokens, last, ranks, n_global: int, world: int = 1, backend=None):
    """pairwise_reward_loss summed over this rank's prompts / prompts with a pair in the global
    batch (· world for DDP's average). Returns (loss to backpropagate, Σ here, n_global)."""
    s = ro.pairwise_reward_loss(rewards_of(model, tokens, last), ranks, reduction="sum", backend=backend)
    return s / n_global * world, s, n_global


@torch.no_grad()
def pair_accuracy(model, comp: dict, device, chunk: int = 64, only=None) -> float:
    """Fraction of ordered pairs (rank_i < rank_j) where the model scores r_i > r_j; ``only``: a
    [N, K, K] bool mask of the pairs to count (default: all)."""
    hit = tot = 0
    for i in range(0, comp["tokens"].shape[0], chunk):
        r = rewards_of(model, comp["tokens"][i:i + chunk].to(device), comp["last"][i:i + chunk].to(device))
        rk = comp["ranks"][i:i + chunk].to(device)
        pair = (rk[:, :, None] < rk[:, None, :]) & (rk[:, :, None] >= 0) & (rk[:, None, :] >= 0)
        if only is not None:
            pair = pair & only[i:i + chunk].to(device)
        hit += int(((r[:, :, None] > r[:, None, :]) & pair).sum())
        tot += int(pair.sum())
    return hit / max(tot, 1)


def filler_only_pairs(comp: dict) -> torch.Tensor:
    """[N, K, K] bool: responses i and j differ only by the filler habit (same answer otherwise)."""
    N, K, _ = comp["tokens"].shape
    out = torch.zeros(N, K, K, dtype=torch.bool)
    for b, p in enumerate(comp["prompts"]):
        resp = [D.decode(comp["tokens"][b, i, len(p):].tolist()) for i in range(K)]
        bare = [r.removesuffix(D.FILLER) for r in resp]
        for i in range(K):
            for j in range(K):
                out[b, i, j] = bare[i] == bare[j] and resp[i] != resp[j]
    return out


@torch.no_grad()
def demo_mean_reward(run: Run, model: ScalarHeadGPT) -> float:
    """Mean reward of SFT demonstrations (prompt + the labeler's response) from the training split."""
    rng = random.Random(f"{run.seed}/rm_bias")
    b = D.demo_tensors([D.demonstration(rng, run.data_cfg) for _ in range(run.cfg["rm.n_bias_demos"])])
    return float(model(b["full"].to(run.device), b["last"].to(run.device)).mean())


def collect_comparisons(run: Run, sft: GPT) -> dict:
    """The train and held-out comparison sets (SFT samples ranked by the judge); every rank samples
    the same data (same seeds)."""
    c = run.cfg
    n, n_held = c["rm.n_prompts"], c["rm.n_heldout"]
    with run.progress(desc="rm: sampling comparisons", unit="response") as bar:
        if c["rm.informative_only"]:
            train = informative_comparisons(
                run, sft, n, lambda r: D.prompts(run.seed, "rm", r, n, run.data_cfg), "rm_train", bar=bar)
            # the held-out split is small: up to 10·n_held distinct held-out prompts, sampled in
            # rounds of 2·n_held until n_held informative ones are kept
            held_p = D.eval_prompts(run.seed + 1, 10 * n_held, run.data_cfg)
            heldout = informative_comparisons(run, sft, n_held,
                                              lambda r: held_p[2 * n_held * r:2 * n_held * (r + 1)],
                                              "rm_heldout", bar=bar)
        else:
            train = make_comparisons(run, sft, D.prompts(run.seed, "rm", 0, n, run.data_cfg), "rm_train",
                                     bar=bar)
            heldout = make_comparisons(run, sft, D.eval_prompts(run.seed + 1, n_held, run.data_cfg),
                                       "rm_heldout", bar=bar)
    return {"train": train, "heldout": heldout}


def run_rm(run: Run) -> dict:
    c, B = run.cfg, run.cfg["rm.batch"]
    rows = run.local(B)
    sft = run.load_model("sft", "lm").eval()
    data_path = run.out / "rm_comparisons.pt"
    data = load_checkpoint(data_path) if run.resume else None    # sha256-checked, weights_only
    if data is None:
        data = collect_comparisons(run, sft)
        if run.is_main:
            save_checkpoint(data_path, data)
    tr, ho = data["train"], data["heldout"]
    N = tr["tokens"].shape[0]
    model = ScalarHeadGPT.from_lm(sft).to(run.device)

    def batch(step):
        per_epoch = max(1, N // B)
        g = torch.Generator().manual_seed(run.seed * 1000003 + step // per_epoch)
        idx = torch.randperm(N, generator=g)[(step % per_epoch) * B:][:B]
        if idx.numel() < B:
            idx = torch.cat([idx, idx[:B - idx.numel()]]) if idx.numel() else torch.arange(B) % N
        n_pairs = int(has_pair(tr["ranks"][idx]).sum().clamp(min=1))
        idx = idx[rows]
        return (tr["tokens"][idx].to(run.device), tr["last"][idx].to(run.device),
                tr["ranks"][idx].to(run.device), n_pairs)

    res = fit(run, "rm", {"rm": model}, "rm", batch, lambda m, b: rm_loss(m, *b, run.world, run.backend),
              eval_fn=lambda: {"heldout_pair_accuracy": pair_accuracy(model, ho, run.device)},
              eval_every=c["rm.eval_every"])
    res["heldout_pair_accuracy"] = pair_accuracy(model, ho, run.device)
    # what the RM learned: pairs that differ only by the writers' filler habit, and all the others
    fo = filler_only_pairs(ho)
    res["heldout_pair_accuracy_filler_only"] = pair_accuracy(model, ho, run.device, only=fo)
    res["heldout_pair_accuracy_other"] = pair_accuracy(model, ho, run.device, only=~fo)
    rk = ho["ranks"]
    pairs = (rk[:, :, None] < rk[:, None, :]) & (rk[:, :, None] >= 0)
    res["heldout_filler_only_pair_share"] = float((pairs & fo).sum()) / max(1, int(pairs.sum()))
    res["train_pair_accuracy"] = pair_accuracy(model, tr, run.device)
    # reward normalisation: SFT demonstrations score 0 on average
    before = demo_mean_reward(run, model)
    with torch.no_grad():
        model.head.bias -= before
    res["demo_mean_before_bias"], res["demo_mean_after_bias"] = before, demo_mean_reward(run, model)
    res["n_train_prompts"], res["n_heldout_prompts"] = N, ho["tokens"].shape[0]
    res["mean_k"] = float((tr["ranks"] >= 0).sum(1).float().mean())
    res["seconds"] = run.elapsed()
    run.save_result("rm", res)
    run.save("rm", "final", {"models": {"rm": model.state_dict()}, "model_cfg": vars(model.cfg),
                             "result": res})                           # the commit point
    run.remove(("rm", "resume"))
    return res
