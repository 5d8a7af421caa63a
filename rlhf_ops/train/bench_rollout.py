"""Rollout speed of ``GPT.generate``: tokens per second with and without the KV cache.

    python -m rlhf_ops.train.bench_rollout [--preset cpu-demo] [--batch 256] [--device cpu]
                                           [--threads 1] [--reps 3]

A model of the preset's size (random weights) continues ``--batch`` held-out prompts of the
preset's task family by exactly ``max_new`` tokens each (EOS disabled, so both paths decode the
same number of tokens); the median of ``--reps`` timed calls, after one warm-up call.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from . import data as D
from .model import GPT, GPTConfig

from .config import PRESETS, make_config, section


def measure(cfg: dict, batch: int, device: str, reps: int, use_cache: bool, backend: str = "reference",
            padding_side: str = "right") -> float:
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=D.VOCAB_SIZE, backend=backend, **section(cfg, "model"))).to(device).eval()
    dc = D.DataConfig(**section(cfg, "data"))
    prompts = [D.encode(p) for p in D.eval_prompts(0, batch, dc)]
    lens = torch.tensor([len(p) for p in prompts], device=device)
    if padding_side == "left":
        x = torch.stack([torch.tensor([D.PAD] * (int(lens.max()) - len(p)) + p) for p in prompts]).to(device)
    else:
        x = D.pad_rows(prompts).to(device)
    new = cfg["ppo.max_new"]
    times = []
    for r in range(reps + 1):
        g = torch.Generator(device=device).manual_seed(r)
        t0 = time.perf_counter()
        m.generate(x, lens, new, eos=-1, generator=g, use_cache=use_cache, padding_side=padding_side)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if r:
            times.append(time.perf_counter() - t0)
    return len(prompts) * new / statistics.median(times)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m rlhf_ops.train.bench_rollout", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu-demo", choices=list(PRESETS), help="model and task sizes")
    ap.add_argument("--batch", type=int, default=256, help="prompts per generate call (ppo.batch of cpu-demo)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--backend", default="reference", help="rlhf_ops backend of the attention")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--reps", type=int, default=3, help="timed calls (median reported)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = make_config(a.preset)
    out = {"no_cache": measure(cfg, a.batch, a.device, a.reps, False, a.backend),
           "kv_cache": measure(cfg, a.batch, a.device, a.reps, True, a.backend)}
    print(f"rollout tokens/s ({a.preset}, batch {a.batch}, {cfg['ppo.max_new']} new tokens, {a.device}, "
          f"{a.threads} thread(s)): no cache {out['no_cache']:.0f}, KV cache {out['kv_cache']:.0f} "
          f"({out['kv_cache'] / out['no_cache']:.2f}×)")
    return out


if __name__ == "__main__":
    main()
