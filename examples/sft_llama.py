"""Supervised fine-tuning of a Llama with the transformers Trainer, on rlhf_ops in one line.

    python examples/sft_llama.py                # padded batches
    python examples/sft_llama.py --packed       # padding-free: DataCollatorWithFlattening
    python examples/sft_llama.py --baseline     # the same run without rlhf_ops

A tiny random-init Llama learns to answer a prompt of digits with the same digits sorted
(loss on the response tokens only). Nothing is downloaded: the data are token ids made here.
On a 2-core CPU it takes 1–2 minutes (76 s measured with --packed; up to ~5 minutes on a busy
machine); that run shows the integration trains and answers correctly, it says nothing about
speed (a GPU is used when there is one). The line that matters:

    model = apply_rlhf_ops(model)   # attention (padding / packing by unpadding) and the LM loss
                                    # (linear_cross_entropy, no [tokens, vocab] logits) on rlhf_ops

With labels the output's ``logits`` is None (the loss is fused); the Trainer passes
``num_items_in_batch`` so gradient accumulation averages over tokens, as without rlhf_ops.
"""
from __future__ import annotations

import argparse
import random
import tempfile

import torch
from datasets import Dataset
from transformers import (DataCollatorWithFlattening, LlamaConfig, LlamaForCausalLM,
                          PrinterCallback, Trainer, TrainingArguments)

from rlhf_ops.integrations.transformers import apply_rlhf_ops

VOCAB, PAD, SEP, EOS = 32, 0, 1, 2          # digits are ids 3..12


def make_model(seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, pad_token_id=PAD, eos_token_id=EOS, use_cache=False,
                      attn_implementation="eager")
    return LlamaForCausalLM(cfg)


def make_dataset(n: int, seed: int = 0) -> Dataset:
    """prompt = digits SEP, response = the digits sorted, EOS; labels only on the response."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        digits = [rng.randrange(3, 13) for _ in range(rng.randint(2, 6))]
        prompt, response = digits + [SEP], sorted(digits) + [EOS]
        rows.append({"input_ids": prompt + response,
                     "labels": [-100] * len(prompt) + response})
    return Dataset.from_list(rows)


def pad_collator(features):
    """Right padding; padded labels are −100."""
    L = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), L), PAD)
    labels = torch.full((len(features), L), -100)
    mask = torch.zeros(len(features), L, dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = (torch.tensor(f["input_ids"]),
                                                  torch.tensor(f["labels"]), 1)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def run(steps: int = 60, *, packed: bool = False, baseline: bool = False, backend: str | None = None,
        layers: int = 2, lr: float = 3e-3, optim: str = "adamw_torch", grad_accum: int = 1,
        batch_size: int = 16, eval_n: int = 50, log: bool = True) -> dict:
    """Train; return {"losses": per-step training losses, "exact": held-out exact-match rate}."""
    model = make_model(layers=layers)
    if not baseline:
        apply_rlhf_ops(model, backend=backend)
    args = TrainingArguments(output_dir=tempfile.mkdtemp(prefix="rlhf_ops_sft_"),
                             per_device_train_batch_size=batch_size,
                             gradient_accumulation_steps=grad_accum,
                             max_steps=steps, learning_rate=lr, optim=optim,
                             lr_scheduler_type="constant", logging_steps=1, report_to="none",
                             save_strategy="no", use_cpu=not torch.cuda.is_available(), seed=0,
                             disable_tqdm=True,
                             remove_unused_columns=False)
    collator = (DataCollatorWithFlattening(return_flash_attn_kwargs=True) if packed else pad_collator)
    trainer = Trainer(model=model, args=args, train_dataset=make_dataset(2048),
                      data_collator=collator)
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    exact = exact_match(model, make_dataset(eval_n, seed=1)) if eval_n else float("nan")
    if log:
        what = "baseline (eager, no rlhf_ops)" if baseline else f"rlhf_ops (backend={backend or 'auto'})"
        print(f"{what}{', packed' if packed else ''}: loss {losses[0]:.3f} → "
              f"{sum(losses[-5:]) / len(losses[-5:]):.3f} over {steps} steps; "
              f"held-out exact match {exact:.2f}")
    return {"losses": losses, "exact": exact, "model": model}


@torch.no_grad()
def exact_match(model, data: Dataset) -> float:
    """Greedy answers (KV-cache generation through the same patched model) vs the sorted digits."""
    model.eval()
    hits = 0
    for ex in data:
        n_prompt = ex["labels"].count(-100)
        prompt = torch.tensor([ex["input_ids"][:n_prompt]], device=model.device)
        want = ex["input_ids"][n_prompt:]
        out = model.generate(prompt, max_new_tokens=len(want), do_sample=False, pad_token_id=PAD,
                             eos_token_id=None, use_cache=True)
        hits += out[0, n_prompt:].tolist() == want
    model.train()
    return hits / len(data)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--packed", action="store_true", help="padding-free batches (position_ids)")
    p.add_argument("--backend", default=None, help="rlhf_ops backend (default: auto)")
    p.add_argument("--baseline", action="store_true", help="no rlhf_ops (eager attention)")
    a = p.parse_args(argv)
    return run(a.steps, packed=a.packed, baseline=a.baseline, backend=a.backend)


if __name__ == "__main__":
    main()
