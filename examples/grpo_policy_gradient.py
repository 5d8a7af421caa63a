"""A GRPO-style policy-gradient loop with rlhf_ops' fused LM head and KL from stored log-probs.

    python examples/grpo_policy_gradient.py              # rlhf_ops: attention, LM head, KL
    python examples/grpo_policy_gradient.py --baseline   # eager attention + TRL's own fused head

A tiny random-init Llama policy is rewarded for completions made of "good" tokens (ids 3–7), a
preference made up in the script; each prompt gets a group of G sampled completions, the
advantage is the reward standardised within the group (GRPO), the loss is the clipped
policy-gradient term plus β·KL to a frozen reference, token-averaged. The per-token log-probs
and entropies come from ``model(..., labels=labels, fused_lm_head=True)`` — TRL's fused-LM-head
contract, here ``rlhf_ops.integrations.trl.add_fused_lm_head`` (``linear_token_logprobs``: no
[tokens, vocab] logits, runs on the CPU too); the reference log-probs are computed once and the
KL is ``per_token_kl`` (``kl_from_logprobs``, GRPO's k3). Nothing is downloaded. On a 2-core CPU
it takes about 2 minutes (126 s measured); that run shows the loop learns (the mean reward
rises), it says nothing about speed (a GPU is used when there is one). The lines that matter:

    apply_rlhf_ops(policy, loss=False)                          # attention (+ generation)
    add_fused_lm_head(policy, outputs=("log_probs", "entropy"))
    out = policy(ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    kl = per_token_kl(out.log_probs, ref_log_probs)
"""
from __future__ import annotations

import argparse
import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rlhf_ops.integrations.transformers import apply_rlhf_ops
from rlhf_ops.integrations.trl import add_fused_lm_head, per_token_kl

VOCAB, PAD = 32, 0
GOOD = range(3, 8)


def make_policy(seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, pad_token_id=PAD, attn_implementation="eager")
    return LlamaForCausalLM(cfg)


def reward(completions: torch.Tensor) -> torch.Tensor:
    """Fraction of completion tokens that are good."""
    good = torch.zeros(VOCAB, dtype=torch.bool)
    good[list(GOOD)] = True
    return good[completions].float().mean(-1)


def prompts(n: int, gen: torch.Generator):
    """n random prompts of 2–5 tokens, left-padded (as generation wants) → ids, mask."""
    lens = torch.randint(2, 6, (n,), generator=gen)
    L = int(lens.max())
    ids = torch.full((n, L), PAD)
    mask = torch.zeros(n, L, dtype=torch.long)
    for i, n_i in enumerate(lens.tolist()):
        ids[i, L - n_i:] = torch.randint(8, VOCAB, (n_i,), generator=gen)
        mask[i, L - n_i:] = 1
    return ids, mask


def run(steps: int = 20, *, baseline: bool = False, backend: str | None = None, layers: int = 2,
        n_prompts: int = 8, group: int = 4, new_tokens: int = 8, beta: float = 0.04,
        clip: float = 0.2, lr: float = 1e-2, optim: str = "adam", seed: int = 0,
        log: bool = True) -> dict:
    """Run ``steps`` updates; return per-step losses, mean rewards, KLs and entropies."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    policy = make_policy(seed, layers).to(device)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    if baseline:                                   # eager attention, TRL's own fused head
        from trl.trainer.utils import add_fused_lm_head as trl_head
        trl_head(policy, outputs=("log_probs", "entropy"))
        trl_head(ref)
    else:
        for m in (policy, ref):
            apply_rlhf_ops(m, loss=False, backend=backend)
        add_fused_lm_head(policy, outputs=("log_probs", "entropy"), backend=backend)
        add_fused_lm_head(ref, backend=backend)
    opt = (torch.optim.Adam if optim == "adam" else torch.optim.SGD)(policy.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed + 1)
    torch.manual_seed(seed + 2)                    # sampling in generate() (all devices)
    hist = {"loss": [], "reward": [], "kl": [], "entropy": []}
    for step in range(steps):
        p_ids, p_mask = prompts(n_prompts, gen)
        p_ids = p_ids.repeat_interleave(group, 0).to(device)
        p_mask = p_mask.repeat_interleave(group, 0).to(device)
        with torch.no_grad():
            policy.eval()
            seqs = policy.generate(input_ids=p_ids, attention_mask=p_mask, do_sample=True,
                                   max_new_tokens=new_tokens, top_k=0, pad_token_id=PAD,
                                   eos_token_id=None)
            policy.train()
        completions = seqs[:, p_ids.shape[1]:]
        r = reward(completions.cpu()).to(device)
        groups = r.view(n_prompts, group)
        adv = ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)).view(-1)

        mask = torch.cat([p_mask, torch.ones_like(completions)], 1)
        labels = seqs.masked_fill(mask == 0, -100)
        labels[:, :p_ids.shape[1]] = -100          # score the completion only
        with torch.no_grad():
            old = policy(input_ids=seqs, attention_mask=mask, labels=labels, fused_lm_head=True)
            ref_logp = ref(input_ids=seqs, attention_mask=mask, labels=labels,
                           fused_lm_head=True).log_probs[:, -new_tokens:]
        out = policy(input_ids=seqs, attention_mask=mask, labels=labels, fused_lm_head=True)
        logp = out.log_probs[:, -new_tokens:]
        ratio = torch.exp(logp - old.log_probs[:, -new_tokens:])
        pg = -torch.min(ratio * adv[:, None], ratio.clamp(1 - clip, 1 + clip) * adv[:, None])
        kl = per_token_kl(logp, ref_logp)          # GRPO's k3
        loss = (pg + beta * kl).mean()             # every completion token counts once
        opt.zero_grad()
        loss.backward()
        opt.step()
        hist["loss"].append(loss.item())
        hist["reward"].append(r.mean().item())
        hist["kl"].append(kl.mean().item())
        hist["entropy"].append(out.entropy[:, -new_tokens:].mean().item())
        if log and (step % 5 == 0 or step == steps - 1):
            print(f"step {step:3d}  reward {hist['reward'][-1]:.3f}  kl {hist['kl'][-1]:.4f}  "
                  f"entropy {hist['entropy'][-1]:.3f}  loss {hist['loss'][-1]:+.4f}")
    return hist


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--backend", default=None, help="rlhf_ops backend (default: auto)")
    p.add_argument("--baseline", action="store_true", help="eager attention + TRL's fused head")
    a = p.parse_args(argv)
    hist = run(a.steps, baseline=a.baseline, backend=a.backend)
    print(f"mean reward {sum(hist['reward'][:5]) / 5:.3f} (first 5 steps) → "
          f"{sum(hist['reward'][-5:]) / 5:.3f} (last 5)")
    return hist


if __name__ == "__main__":
    main()
