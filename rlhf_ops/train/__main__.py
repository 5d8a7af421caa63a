"""python -m rlhf_ops.train {all,pretrain,sft,rm,ppo} --out DIR [options]

Under ``torchrun --nproc_per_node=N`` the same command trains with DistributedDataParallel
(gloo on CPU, NCCL on GPU); batch sizes are global.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from . import STAGES
from .common import Run
from .config import make_config
from .report import write_report, write_summary

ORDER = ("pretrain", "sft", "rm", "ppo")


def parse(argv=None):
    ap = argparse.ArgumentParser(prog="python -m rlhf_ops.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=("all",) + ORDER)
    ap.add_argument("--out", required=True, help="run folder: checkpoints, metrics.jsonl, summary.json, report.md")
    ap.add_argument("--backend", default="auto", choices=("auto", "reference", "triton", "cuda"))
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preset", default="cpu-demo", help="cpu-demo (default), gpu, tiny")
    ap.add_argument("--resume", action="store_true", help="continue interrupted stages, skip finished ones")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="override any hyper-parameter, e.g. --set ppo.beta=0.05 sft.steps=100")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    a = parse(argv)
    cfg = make_config(a.preset, a.set)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = a.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        if device == "cuda":
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    if device == "cpu" and cfg["run.threads"] > 0:
        torch.set_num_threads(cfg["run.threads"])
    torch.manual_seed(a.seed)
    run = Run(cfg, a.out, device=device, seed=a.seed, backend=a.backend, resume=a.resume)
    out = Path(a.out)
    stages = ORDER if a.stage == "all" else (a.stage,)
    t0 = time.time()
    for s in stages:
        if a.resume and run.path(s, "final").exists():
            continue                                           # finished earlier
        if run.is_main:
            print(f"[rlhf_ops.train] stage {s}", flush=True)
        res = STAGES[s](run)
        if run.is_main:
            print(f"[rlhf_ops.train] {s}: " + json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                                         for k, v in res.items()}), flush=True)
    summary = {}
    if run.is_main:
        args = {**vars(a), "device": device, "world_size": world, "command_seconds": time.time() - t0}
        summary = write_summary(out, cfg, args)
        write_report(out, summary)
        print(f"[rlhf_ops.train] wrote {out / 'summary.json'} and {out / 'report.md'}", flush=True)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
