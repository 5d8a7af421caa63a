"""python -m rlhf_ops.train {all,pretrain,sft,rm,ppo,grpo} --out DIR [options]

Each stage reads the previous stage's checkpoint from DIR/ckpt and writes its own; every stage
writes metrics.jsonl, results.json, summary.json and report.md (with plots) in DIR. Under
``torchrun --nproc_per_node=N`` the same command trains with DistributedDataParallel (gloo on CPU,
NCCL on GPU); batch sizes are global. Configuration errors print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from . import STAGES
from .run import CheckpointError, Run
from .config import PRESETS, ConfigError, make_config
from .report import write_report, write_summary

ORDER = ("pretrain", "sft", "rm", "ppo", "grpo")
NEEDS = {"pretrain": (), "sft": ("pretrain",), "rm": ("sft",), "ppo": ("sft", "rm"), "grpo": ("sft", "rm")}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m rlhf_ops.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=("all",) + ORDER, help="one stage, or all of them in order")
    ap.add_argument("--out", required=True, help="run folder: checkpoints, metrics.jsonl, summary.json, report.md")
    ap.add_argument("--backend", default="auto", choices=("auto", "reference", "triton", "cuda"),
                    help="rlhf_ops backend of every op (auto: reference on CPU, the fastest on a GPU)")
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the data streams and the models")
    ap.add_argument("--preset", default="cpu-demo", help=f"hyper-parameter preset: {', '.join(PRESETS)}")
    ap.add_argument("--resume", action="store_true", help="continue interrupted stages, skip finished ones")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="override any hyper-parameter, e.g. --set ppo.beta=0.05 sft.steps=100")
    return ap


def parse(argv=None):
    return parser().parse_args(argv)


def resolve_device(arg: str, *, cuda_available: bool, local_rank: int = 0) -> str:
    """--device → a device string torch.cuda.set_device accepts: "cpu" or "cuda:N".

    "auto" is cuda when CUDA is available, else cpu; "cuda" without an index is this process's
    GPU, cuda:LOCAL_RANK (torch.cuda.set_device needs an index: torch.device("cuda") has none)."""
    if arg == "auto":
        arg = "cuda" if cuda_available else "cpu"
    try:
        d = torch.device(arg)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device: expected cpu, cuda, cuda:N or auto, got {arg!r}") from None
    if d.type == "cpu":
        return "cpu"
    if d.type != "cuda":
        raise ConfigError(f"--device: expected cpu, cuda, cuda:N or auto, got {arg!r}")
    if not cuda_available:
        raise ConfigError(f"--device {arg}: CUDA is not available on this machine")
    return f"cuda:{local_rank if d.index is None else d.index}"


def check_backend(backend: str, device: str) -> None:
    """Refuse, before any work, a backend that cannot run on the device (nothing falls back)."""
    if backend in ("auto", "reference"):
        return
    from rlhf_ops import _backend
    why = _backend.unavailable(backend, torch.device(device))
    if why is not None:
        raise ConfigError(f"--backend {backend} on {device}: {why}")


def check_inputs(stage: str, out: Path, resume: bool) -> None:
    """A single stage needs the checkpoints of the stages before it in --out."""
    if stage == "all":
        return
    for need in NEEDS[stage]:
        p = out / "ckpt" / f"{need}_final.pt"
        if not p.exists():
            raise ConfigError(f"stage {stage} needs the {need} stage's checkpoint {p}, which does not "
                              f"exist: run `python -m rlhf_ops.train {need} --out {out}` (or `all`) first")


def main(argv=None) -> dict:
    ap = parser()
    a = ap.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    out = Path(a.out)
    try:                                           # everything a user can get wrong, before any work
        cfg = make_config(a.preset, a.set)
        device = resolve_device(a.device, cuda_available=torch.cuda.is_available(), local_rank=local_rank)
        check_backend(a.backend, device)
        check_inputs(a.stage, out, a.resume)
    except ConfigError as e:                       # one line on stderr, exit status 2 (as argparse)
        print(f"{ap.prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    created = [p for p in [out / "ckpt", out, *out.parents] if not p.exists()]   # deepest first
    try:
        return _run(a, cfg, device, world, out)
    except CheckpointError as e:
        print(f"{ap.prog}: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:                                       # a failed command leaves no empty folders behind
        for p in created:
            if p.is_dir() and not any(p.iterdir()):
                p.rmdir()


def _run(a, cfg: dict, device: str, world: int, out: Path) -> dict:
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    if device == "cpu" and cfg["run.threads"] > 0:
        torch.set_num_threads(cfg["run.threads"])
    torch.manual_seed(a.seed)
    run = Run(cfg, out, device=device, seed=a.seed, backend=a.backend, resume=a.resume)
    stages = ORDER if a.stage == "all" else (a.stage,)
    args = {**vars(a), "device": device, "world_size": world}
    ran = []
    for s in stages:
        if a.resume and run.finished(s):
            if run.is_main:
                print(f"[rlhf_ops.train] {s}: already finished in {out} (ckpt/{s}_final.pt), skipped",
                      flush=True)
            continue
        if run.is_main:
            print(f"[rlhf_ops.train] stage {s}", flush=True)
        run.start_stage(s, {"config": cfg, "args": args})
        res = STAGES[s](run)
        ran.append(s)
        if run.is_main:
            print(f"[rlhf_ops.train] {s}: " + json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                                         for k, v in res.items()}), flush=True)
    if a.resume and not ran and run.is_main:
        print(f"[rlhf_ops.train] nothing to resume: {'every stage' if a.stage == 'all' else 'stage ' + a.stage}"
              f" has finished in {out}", flush=True)
    summary = {}
    if run.is_main:
        summary = write_summary(out)
        write_report(out, summary)
        print(f"[rlhf_ops.train] wrote {out / 'summary.json'} and {out / 'report.md'}", flush=True)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
