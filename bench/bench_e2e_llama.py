"""End to end: one training step of a Llama-shaped transformers model, with and without rlhf_ops.

    python -m bench.bench_e2e_llama                        # GPU: ~1.2B Llama (3.2-1B shape), bf16
    python -m bench.bench_e2e_llama --size smoke           # CPU: a tiny model, checks that it runs
    python -m bench.bench_e2e_llama --variants sdpa,rlhf_ops --out bench/results/e2e.json

A step is forward + backward of the causal-LM loss (labels = input ids; an optimizer step costs
the same for every variant and is left out) on a random-init ``LlamaForCausalLM`` built from a
config (nothing downloaded). Variants, each on a freshly built model with the same weights:

  sdpa       transformers as shipped: attn_implementation="sdpa", logits + cross-entropy
  eager      attn_implementation="eager" (only with --variants eager: slow, O(T²) memory)
  rlhf_ops   apply_rlhf_ops(model): rlhf_ops attention and linear_cross_entropy (no logits);
             rlhf_ops:triton / rlhf_ops:cuda force a backend (default: auto)
  liger      Liger-Kernel's apply_liger_kernel_to_llama on the sdpa model, when installed

Reported per variant: median step time, tokens/s, peak memory added by the step (CUDA
``max_memory_allocated`` minus what was allocated before it: activations, logits, gradients),
and the ratios to sdpa. The goals of the end-to-end step: rlhf_ops ≥ 1.3× sdpa's tokens/s, ≤ 0.6× its peak
memory, and less memory than Liger. A variant that cannot run is reported as missing or failed
with its reason. Batches are full (no padding) unless --pad, which right-pads a quarter of each
row in half of the rows (the varlen route).
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import time

import torch

SIZES = {
    # Llama-3.2-1B's shape: 16 layers, d 2048, 32 heads of 64 (8 KV heads), d_ff 8192, V 128256,
    # tied embedding: 1.24 B parameters. 8 × 2048 tokens per step.
    "1b": dict(config=dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                           num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                           vocab_size=128256, tie_word_embeddings=True,
                           max_position_embeddings=4096),
               batch=8, seqlen=2048, dtype=torch.bfloat16, warmup=2, reps=5),
    "smoke": dict(config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                              vocab_size=97, tie_word_embeddings=True, max_position_embeddings=64),
                  batch=2, seqlen=16, dtype=torch.float32, warmup=1, reps=2),
}


class Missing(Exception):
    pass


def build(size: str, variant: str, device: str, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM
    spec = SIZES[size]
    attn = "eager" if variant == "eager" else "sdpa"
    cfg = LlamaConfig(**spec["config"], attn_implementation=attn, use_cache=False)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(spec["dtype"])
    if variant.startswith("rlhf_ops"):
        from rlhf_ops.integrations.transformers import apply_rlhf_ops
        backend = variant.split(":", 1)[1] if ":" in variant else None
        apply_rlhf_ops(model, backend=backend)
    elif variant == "liger":
        try:
            from liger_kernel.transformers import apply_liger_kernel_to_llama
        except ImportError as e:
            raise Missing(f"liger-kernel is not installed ({e})")
        apply_liger_kernel_to_llama(model=model)
    elif variant not in ("sdpa", "eager"):
        raise ValueError(f"unknown variant {variant!r}")
    return model.train()


def make_batch(size: str, device: str, pad: bool, seed: int = 1):
    spec = SIZES[size]
    B, T, V = spec["batch"], spec["seqlen"], spec["config"]["vocab_size"]
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if pad:
        mask[::2, T - T // 4:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {k: v.to(device) for k, v in dict(input_ids=ids, attention_mask=mask, labels=labels).items()}


def step(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach()


def measure(size: str, variant: str, device: str, pad: bool) -> dict:
    spec = SIZES[size]
    row = {"variant": variant, "size": size, "batch": spec["batch"], "seqlen": spec["seqlen"],
           "dtype": str(spec["dtype"]).replace("torch.", ""), "pad": pad}
    model = batch = None
    try:
        model = build(size, variant, device)
        batch = make_batch(size, device, pad)
        tokens = int(batch["attention_mask"].sum())
        row["params"] = sum(p.numel() for p in model.parameters())
        for _ in range(spec["warmup"]):
            step(model, batch)
        times, peaks, losses = [], [], []
        for _ in range(spec["reps"]):
            model.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            losses.append(float(step(model, batch)))
            if device == "cuda":
                torch.cuda.synchronize()
                peaks.append(torch.cuda.max_memory_allocated() - base)
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        row.update(status="ok", median_s=med, tokens_per_s=tokens / med, loss=losses[-1],
                   peak_mem_bytes=max(peaks) if peaks else None)
    except Missing as e:
        row.update(status="missing", reason=str(e))
    except Exception as e:                                   # report it, keep the other variants
        row.update(status="failed", reason=f"{type(e).__name__}: {e}"[:500])
    finally:
        del model, batch
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return row


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default=None,
                   help="1b on a GPU (default there), smoke on the CPU (default there)")
    p.add_argument("--variants", default="sdpa,rlhf_ops,liger")
    p.add_argument("--pad", action="store_true", help="right-pad half of the rows")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    a = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    size = a.size or ("1b" if device == "cuda" else "smoke")
    rows = [measure(size, v, device, a.pad) for v in a.variants.split(",")]
    base = next((r for r in rows if r["variant"] == "sdpa" and r["status"] == "ok"), None)
    print(f"one training step (fwd+bwd of the LM loss), {size}, {device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if device == 'cuda' else ''}")
    print(f"{'variant':16s} {'status':8s} {'ms':>9s} {'tokens/s':>11s} {'peak MiB':>10s} "
          f"{'speed×':>7s} {'mem×':>6s}")
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['variant']:16s} {r['status']:8s} {r.get('reason', '')}")
            continue
        mem = r["peak_mem_bytes"]
        if base is not None:
            r["speedup_vs_sdpa"] = r["tokens_per_s"] / base["tokens_per_s"]
            if mem is not None and base["peak_mem_bytes"]:
                r["mem_ratio_vs_sdpa"] = mem / base["peak_mem_bytes"]
        print(f"{r['variant']:16s} {'ok':8s} {r['median_s'] * 1e3:9.1f} {r['tokens_per_s']:11.0f} "
              f"{'-' if mem is None else f'{mem / 2**20:10.0f}':>10s} "
              f"{r.get('speedup_vs_sdpa', float('nan')):7.2f} {r.get('mem_ratio_vs_sdpa', float('nan')):6.2f}")
    ours = [r for r in rows if r["variant"].startswith("rlhf_ops") and r["status"] == "ok"]
    liger = next((r for r in rows if r["variant"] == "liger" and r["status"] == "ok"), None)
    if base is not None and ours and device == "cuda":
        o = ours[0]
        print(f"goals: tokens/s ≥ 1.3× sdpa: {'met' if o['speedup_vs_sdpa'] >= 1.3 else 'MISSED'} "
              f"({o['speedup_vs_sdpa']:.2f}×); peak memory ≤ 0.6× sdpa: "
              f"{'met' if o['mem_ratio_vs_sdpa'] <= 0.6 else 'MISSED'} ({o['mem_ratio_vs_sdpa']:.2f}×); "
              f"below Liger: " + ("not measured (Liger missing)" if liger is None else
                                  ("met" if o["peak_mem_bytes"] < liger["peak_mem_bytes"] else "MISSED")))
    if a.out:
        meta = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                "torch": torch.__version__, "rows": rows}
        with open(a.out, "w") as f:
            json.dump(meta, f, indent=1)
    return rows


if __name__ == "__main__":
    sys.exit(0 if all(r["status"] != "failed" for r in main()) else 1)
