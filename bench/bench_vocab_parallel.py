"""Vocabulary-parallel cross_entropy / linear_cross_entropy / token_logprobs: time and bytes
communicated per row, against gathering the logits and running the unsharded op.

Each rank holds V/R of the vocabulary. Three implementations, fwd+bwd, timed on every rank (the
slowest rank's median is reported):
  vocab_parallel   ours: ``process_group=`` on this rank's [N, V/R] slice (k numbers per row
                   gathered; the linear op also all-reduces d hidden [N, d] in the backward)
  gather_logits    all_gather the [N, V/R] logits slices into [N, V] (V-sized traffic), run the
                   unsharded fused op on them, hand each rank its slice of the gradient
  local_slice      the unsharded op on this rank's [N, V/R] slice alone: no communication, the
                   time the goal compares against ("within 1.2× of the unsharded op on 1/TP of
                   the vocabulary")
Bytes are counted by wrapping torch.distributed's collectives: ``payload`` is what this rank
contributes per row (the tensor it hands to the collective); ``wire`` what a ring algorithm moves
per rank and row ((R−1)·payload for all_gather, 2(R−1)/R·payload for all_reduce).

Run (from the repository root):
  CPU smoke (gloo, spawns the ranks itself):
      python -m bench.bench_vocab_parallel --world 2 [--rows 256 --vocab 32000 --backend reference]
  GPUs (NCCL, one process per GPU):
      torchrun --nproc_per_node=2 -m bench.bench_vocab_parallel --backend triton --dtype bf16
Writes a JSON list of results with ``--out FILE`` (rank 0) and prints a table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist

import rlhf_ops as ro

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}

# ----------------------------------------------------------------- counting the traffic ---
_COUNT = {"payload": 0, "wire": 0.0}


def _count_collectives():
    """Wrap the collectives rlhf_ops and the baseline use so that each call adds its bytes."""
    def wrap(fn, kind):
        def counted(*args, **kw):
            group = kw.get("group")
            R = dist.get_world_size(group)
            t = args[1] if kind == "gather" else args[0]
            if isinstance(t, (list, tuple)):
                t = t[0]
            nbytes = t.numel() * t.element_size()
            _COUNT["payload"] += nbytes
            _COUNT["wire"] += nbytes * ((R - 1) if kind == "gather" else 2 * (R - 1) / R)
            return fn(*args, **kw)
        return counted
    for name, kind in (("all_gather_single", "gather"), ("all_gather_into_tensor", "gather"),
                       ("all_gather", "gather"), ("all_reduce", "reduce")):
        if hasattr(dist, name):
            setattr(dist, name, wrap(getattr(dist, name), kind))


# ---------------------------------------------------------------------- the baseline ---

class _GatherLogits(torch.autograd.Function):
    """[N, V/R] slices → [N, V] on every rank; backward: this rank's slice of the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        R, r = dist.get_world_size(group), dist.get_rank(group)
        parts = [torch.empty_like(x) for _ in range(R)]
        dist.all_gather(parts, x.contiguous(), group=group)
        ctx.r, ctx.v = r, x.shape[-1]
        return torch.cat(parts, -1)

    @staticmethod
    def backward(ctx, g):
        return g[..., ctx.r * ctx.v:(ctx.r + 1) * ctx.v], None


def _impls(op, group, backend):
    if op == "cross_entropy":
        def vp(x, t, h=None):
            return ro.cross_entropy(x, t, backend=backend, process_group=group)

        def gather(x, t, h=None):
            return ro.cross_entropy(_GatherLogits.apply(x, group), t, backend=backend)

        def local(x, t, h=None):
            return ro.cross_entropy(x, t.remainder(x.shape[-1]), backend=backend)
    elif op == "token_logprobs":   # log-probs and entropy (PPO), K = 1
        def vp(x, t, h=None):
            lp, ent = ro.token_logprobs(x, t, return_entropy=True, backend=backend, process_group=group)
            return lp.sum() + ent.sum()

        def gather(x, t, h=None):
            lp, ent = ro.token_logprobs(_GatherLogits.apply(x, group), t, return_entropy=True,
                                        backend=backend)
            return lp.sum() + ent.sum()

        def local(x, t, h=None):
            lp, ent = ro.token_logprobs(x, t.remainder(x.shape[-1]), return_entropy=True, backend=backend)
            return lp.sum() + ent.sum()
    else:
        def vp(w, t, h):
            return ro.linear_cross_entropy(h, w, t, backend=backend, process_group=group)

        def gather(w, t, h):
            logits = _GatherLogits.apply(h @ w.T, group)
            return ro.cross_entropy(logits, t, backend=backend)

        def local(w, t, h):
            return ro.linear_cross_entropy(h, w, t.remainder(w.shape[0]), backend=backend)
    return {"vocab_parallel": vp, "gather_logits": gather, "local_slice": local}


# ---------------------------------------------------------------------------- worker ---

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device, group, reps, warmup):
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        dist.barrier(group=group)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    med = torch.tensor([statistics.median(times)], dtype=torch.float64)
    dist.all_reduce(med, op=dist.ReduceOp.MAX, group=group)  # the slowest rank
    return float(med)


def run(args) -> list:
    group = dist.group.WORLD
    R, r = dist.get_world_size(), dist.get_rank()
    device = torch.device(f"cuda:{torch.cuda.current_device()}") if args.device == "cuda" else torch.device("cpu")
    dtype = DTYPES[args.dtype]
    V_r = args.V // R
    V = V_r * R
    g = torch.Generator(device="cpu").manual_seed(0)
    t = torch.randint(0, V, (args.N,), generator=g).to(device)
    out = []
    for op in args.ops.split(","):
        if op in ("cross_entropy", "token_logprobs"):
            x = (torch.randn(args.N, V, generator=g) * 2).to(device, dtype)[:, r * V_r:(r + 1) * V_r]
            x = x.contiguous().requires_grad_()
            h = None
        else:
            x = (torch.randn(V, args.d, generator=g) * 0.05).to(device, dtype)[r * V_r:(r + 1) * V_r]
            x = x.contiguous().requires_grad_()
            h = torch.randn(args.N, args.d, generator=g).to(device, dtype).requires_grad_()
        for backend, (name, fn) in [(be, item) for be in args.backend.split(",")
                                    for item in _impls(op, group, be).items()]:
            def step():
                loss = fn(x, t, h)
                loss.backward()
                x.grad = None
                if h is not None:
                    h.grad = None
            try:
                ms = _time(step, device, group, args.reps, args.warmup)
                _COUNT["payload"], _COUNT["wire"] = 0, 0.0
                step()
                payload, wire = _COUNT["payload"], _COUNT["wire"]
                res = {"op": op, "impl": name, "world": R, "backend": backend, "dtype": args.dtype,
                       "shape": {"N": args.N, "V": V, "V_per_rank": V_r, **({"d": args.d} if h is not None else {})},
                       "median_ms": round(ms, 4), "payload_bytes_per_row": round(payload / args.N, 2),
                       "wire_bytes_per_row": round(wire / args.N, 2), "status": "ok"}
            except Exception as e:  # recorded, not hidden
                res = {"op": op, "impl": name, "world": R, "backend": backend, "status": "failed",
                       "reason": repr(e)[:300]}
            out.append(res)
    return out


def _print(results):
    print(f"{'op':<22}{'backend':<10}{'impl':<16}{'R':>3}{'ms':>10}{'payload B/row':>15}{'wire B/row':>13}")
    for r in results:
        if r["status"] != "ok":
            print(f"{r['op']:<22}{r['backend']:<10}{r['impl']:<16}{r['world']:>3}  failed: {r['reason']}")
            continue
        print(f"{r['op']:<22}{r['backend']:<10}{r['impl']:<16}{r['world']:>3}{r['median_ms']:>10.3f}"
              f"{r['payload_bytes_per_row']:>15.1f}{r['wire_bytes_per_row']:>13.1f}")


def _worker(rank, world, init_file, args):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    _main_in_group(args)


def _main_in_group(args):
    _count_collectives()
    results = run(args)
    if dist.get_rank() == 0:
        _print(results)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                           "torch": torch.__version__, "results": results}, f, indent=1)
    dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", type=int, default=2, help="ranks to spawn (CPU/gloo; torchrun sets it)")
    p.add_argument("--rows", dest="N", type=int, default=256, help="N, rows (tokens)")
    p.add_argument("--vocab", dest="V", type=int, default=32000, help="V, the whole vocabulary")
    p.add_argument("--hidden", dest="d", type=int, default=256, help="d, for linear_cross_entropy")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--backend", default=None, help="one or several, comma-separated")
    p.add_argument("--ops", default="cross_entropy,linear_cross_entropy,token_logprobs")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if "RANK" in os.environ:  # under torchrun: NCCL on GPUs, gloo otherwise
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
        if args.device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
        args.backend = args.backend or ("triton" if args.device == "cuda" else "reference")
        _main_in_group(args)
        return
    args.device = "cpu"
    args.backend = args.backend or "reference"
    with tempfile.TemporaryDirectory() as tmp:
        torch.multiprocessing.spawn(_worker, args=(args.world, os.path.join(tmp, "store"), args),
                                    nprocs=args.world)


if __name__ == "__main__":
    main()
