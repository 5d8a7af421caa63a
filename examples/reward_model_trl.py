"""Reward modelling with TRL's RewardTrainer on rlhf_ops: attention and the pairwise loss fused.

    python examples/reward_model_trl.py                  # chosen/rejected pairs with a margin
    python examples/reward_model_trl.py --ranked 4       # InstructGPT-style K-wise rankings
    python examples/reward_model_trl.py --baseline       # plain TRL, for comparison

A tiny random-init Llama reward model (LlamaForSequenceClassification, num_labels = 1) learns a
preference made up in the script: responses with more "good" tokens (even ids) are better. Nothing
is downloaded: the tokenizer is a word-level one built here, the data are token ids. On a 2-core
CPU it takes about a minute (35–60 s measured); that run shows the integration trains and learns
the preference, it says nothing about speed (a GPU is used when there is one). TRL's own
RewardTrainer takes chosen/rejected pairs only, so --ranked and --baseline do not go together.
The two lines that matter:

    model = apply_rlhf_ops(model)                       # attention through rlhf_ops
    trainer = RewardTrainer(model=model, ...)           # rlhf_ops.integrations.trl: fused loss
"""
from __future__ import annotations

import argparse
import copy
import random
import tempfile

import torch
import trl
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast,
                          PrinterCallback)

from rlhf_ops.integrations.transformers import apply_rlhf_ops
from rlhf_ops.integrations.trl import RewardTrainer

VOCAB = 64
RANKED_BASELINE = ("--ranked needs rlhf_ops' RewardTrainer (K-wise rankings): TRL's RewardTrainer "
                   "takes chosen/rejected pairs only; drop --baseline or --ranked")


def make_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over "<pad>", "<eos>", "w2" … "w63" (ids are what matter here)."""
    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def make_model(seed: int = 0, layers: int = 2) -> LlamaForSequenceClassification:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, num_labels=1, pad_token_id=0, attn_implementation="eager")
    return LlamaForSequenceClassification(cfg)


def _response(rng: random.Random, n_good: int, length: int) -> list[int]:
    good = [rng.randrange(2, VOCAB, 2) for _ in range(n_good)]
    bad = [rng.randrange(3, VOCAB, 2) for _ in range(length - n_good)]
    r = good + bad
    rng.shuffle(r)
    return r + [1]                                        # <eos>


def make_dataset(n: int, ranked: int = 0, seed: int = 0) -> Dataset:
    """Pairs (chosen has more good tokens; margin = the difference / 4) or K-wise rankings."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = [rng.randrange(2, VOCAB) for _ in range(rng.randint(2, 5))]
        length = rng.randint(4, 9)
        if ranked:
            k = rng.randint(max(2, ranked - 1), ranked)          # some prompts have fewer responses
            goods = rng.sample(range(length + 1), k)
            resp = [prompt + _response(rng, g, length) for g in goods]
            order = sorted(range(k), key=lambda i: -goods[i])
            ranks = [0] * k
            for r, i in enumerate(order):
                ranks[i] = r
            rows.append({"responses_ids": resp, "ranks": ranks})
        else:
            g1, g2 = rng.sample(range(length + 1), 2)
            hi, lo = max(g1, g2), min(g1, g2)
            rows.append({"chosen_ids": prompt + _response(rng, hi, length),
                         "rejected_ids": prompt + _response(rng, lo, length),
                         "margin": (hi - lo) / 4})
    return Dataset.from_list(rows)


def run(steps: int = 40, *, ranked: int = 0, baseline: bool = False, backend: str | None = None,
        batch_size: int = 8,
        layers: int = 2, n_examples: int = 256, model=None, eval_pairs: int = 64,
        log: bool = True) -> dict:
    """Train for ``steps`` and return {"losses": per-step losses, "accuracy": held-out pair
    accuracy, "model": the trained model}. ``baseline``: TRL's RewardTrainer and eager attention."""
    if ranked and baseline:
        raise ValueError(RANKED_BASELINE)
    model = make_model(layers=layers) if model is None else model
    if not baseline:
        apply_rlhf_ops(model, backend=backend)
    out_dir = tempfile.mkdtemp(prefix="rlhf_ops_rm_")
    args = trl.RewardConfig(output_dir=out_dir, per_device_train_batch_size=batch_size,
                            max_steps=steps,
                            learning_rate=0.05, optim="sgd", lr_scheduler_type="constant",
                            logging_steps=1, report_to="none", save_strategy="no",
                            use_cpu=not torch.cuda.is_available(),
                            bf16=False, seed=0, disable_tqdm=True, dataloader_num_workers=0)
    cls = trl.RewardTrainer if baseline else RewardTrainer
    kw = {} if baseline else {"rlhf_ops_backend": backend}
    trainer = cls(model=model, args=args, train_dataset=make_dataset(n_examples, ranked),
                  processing_class=make_tokenizer(), **kw)
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    acc = accuracy(trainer.model, make_dataset(eval_pairs, seed=1)) if eval_pairs else float("nan")
    if log:
        what = "TRL baseline" if baseline else f"rlhf_ops (backend={backend or 'auto'})"
        print(f"{what}: loss {losses[0]:.4f} → {sum(losses[-5:]) / len(losses[-5:]):.4f} "
              f"over {steps} steps; held-out pair accuracy {acc:.2f}")
    return {"losses": losses, "accuracy": acc, "model": trainer.model}


@torch.no_grad()
def accuracy(model, pairs: Dataset) -> float:
    model.eval()
    right = 0
    for ex in pairs:
        r = [model(input_ids=torch.tensor([ids], device=model.device)).logits.item()
             for ids in (ex["chosen_ids"], ex["rejected_ids"])]
        right += r[0] > r[1]
    model.train()
    return right / len(pairs)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--ranked", type=int, default=0, help="K responses per prompt (0: pairs)")
    p.add_argument("--backend", default=None, help="rlhf_ops backend (default: auto)")
    p.add_argument("--baseline", action="store_true", help="plain TRL, eager attention")
    a = p.parse_args(argv)
    if a.ranked and a.baseline:
        p.exit(2, f"reward_model_trl.py: {RANKED_BASELINE}\n")
    return run(a.steps, ranked=a.ranked, baseline=a.baseline, backend=a.backend)


if __name__ == "__main__":
    main()
