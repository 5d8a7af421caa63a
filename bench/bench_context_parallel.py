"""Context-parallel attention: ring vs gathered K/V vs Ulysses — bytes each rank sends per layer
(CPU), time and peak memory per rank (GPUs).

A "layer" is one causal self-attention forward + backward over a sequence of T tokens split over
W ranks (B = 1, H query heads, Hkv key/value heads, head dim D):
  ring      ro.attention(q, k, v, cp_group=g, cp_layout="zigzag"): K/V travel the ring (W − 1
            hops forward; backward W − 1 hops of K/V plus W hops of the dK/dV accumulators, fp32)
  gather    ro.attention_varlen(..., cp_group=g) on the one sequence: all_gather K/V forward,
            again in the backward, reduce_scatter of dK/dV (fp32)
  ulysses   rlhf_ops.distributed.ulysses_attention(q, k, v, g): all_to_all of q, k, v and out
            forward, of dout, dq, dk, dv backward ((W − 1)/W of each tensor leaves the rank)
Bytes are counted inside rlhf_ops.context_parallel (``comm_bytes``: what this rank sends on a
ring or pairwise algorithm) and checked against the closed forms below (``expected_bytes``).

Run (from the repository root):
  CPU (gloo; spawns the ranks itself; measures bytes at a small shape, checks the formulas,
  prints them at the GPU shapes):
      python -m bench.bench_context_parallel [--world 2,4]
  GPUs (NCCL, one process per GPU, >= 2 GPUs):
      torchrun --nproc_per_node=2 -m bench.bench_context_parallel --gpu \\
          [--tokens 32768,65536,131072 --heads 32 --kv-heads 32 --dim 128 --backend triton]
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
from rlhf_ops import context_parallel as cp
from rlhf_ops.distributed import ulysses_attention

IMPLS = ("ring", "gather", "ulysses")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def expected_bytes(impl: str, W: int, T: int, H: int, Hkv: int, D: int, elem: int) -> int:
    """Bytes one rank sends for one layer's forward + backward (dK/dV accumulate in fp32, fp64
    for fp64 inputs)."""
    Tl = T // W
    kv = 2 * Hkv * Tl * D                       # this rank's K and V, elements
    acc = 8 if elem == 8 else 4
    if W == 1:
        return 0
    if impl == "ring":                          # fwd W−1 hops of K/V; bwd W−1 of K/V, W of dK/dV
        return (W - 1) * kv * elem + (W - 1) * kv * elem + W * kv * acc
    if impl == "gather":                        # all_gather fwd and bwd, reduce_scatter of dK/dV
        return (W - 1) * kv * elem * 2 + (W - 1) * kv * acc
    # ulysses: q, k, v, out forward and dout, dq, dk, dv backward; K/V heads repeated up to W
    q = H * Tl * D
    kv_sent = 2 * max(Hkv, W) * Tl * D
    return 2 * (W - 1) * (2 * q + kv_sent) * elem // W


def _layer(impl, q, k, v, group, backend):
    """One layer's forward + backward; q/k/v in the layout the implementation takes."""
    if impl == "ring":
        out = ro.attention(q, k, v, causal=True, backend=backend, cp_group=group)
    elif impl == "gather":
        Tl = q.shape[0]
        cu = torch.tensor([0, Tl], dtype=torch.int32, device=q.device)
        out = ro.attention_varlen(q, k, v, cu, cu, Tl, Tl, causal=True, backend=backend,
                                  cp_group=group)
    else:
        out = ulysses_attention(q, k, v, group, causal=True, backend=backend)
    out.backward(torch.ones_like(out))


def _inputs(impl, W, T, H, Hkv, D, dtype, device):
    Tl = T // W
    shape_q, shape_kv = ((Tl, H, D), (Tl, Hkv, D)) if impl == "gather" else ((1, H, Tl, D), (1, Hkv, Tl, D))
    g = torch.Generator(device="cpu").manual_seed(dist.get_rank())
    return [torch.randn(s, generator=g).to(device, dtype).requires_grad_()
            for s in (shape_q, shape_kv, shape_kv)]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(args) -> list:
    group = dist.group.WORLD
    W = dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if args.gpu else torch.device("cpu")
    dtype = DTYPES[args.dtype]
    out = []
    for T in args.tokens:
        for impl in IMPLS:
            res = {"impl": impl, "world": W, "tokens": T, "heads": args.heads, "kv_heads": args.kv_heads,
                   "dim": args.dim, "dtype": args.dtype, "backend": args.backend,
                   "expected_bytes": expected_bytes(impl, W, T, args.heads, args.kv_heads, args.dim,
                                                    dtype.itemsize)}
            try:
                q, k, v = _inputs(impl, W, T, args.heads, args.kv_heads, args.dim, dtype, device)
                with cp.comm_bytes() as sent:
                    _layer(impl, q, k, v, group, args.backend)
                res["sent_bytes"] = sent[0]
                if args.gpu:
                    times = []
                    for i in range(args.warmup + args.reps):
                        torch.cuda.reset_peak_memory_stats()
                        dist.barrier()
                        _sync(device)
                        t0 = time.perf_counter()
                        _layer(impl, q, k, v, group, args.backend)
                        _sync(device)
                        if i >= args.warmup:
                            times.append((time.perf_counter() - t0) * 1e3)
                    stats = torch.tensor([statistics.median(times), torch.cuda.max_memory_allocated()],
                                         dtype=torch.float64, device=device)
                    dist.all_reduce(stats, op=dist.ReduceOp.MAX)     # the slowest / fullest rank
                    res["median_ms"] = round(float(stats[0]), 3)
                    res["peak_mem_bytes_per_rank"] = int(stats[1])
                res["status"] = "ok"
                del q, k, v
            except Exception as e:   # recorded, not hidden (e.g. out of memory at 128k)
                res["status"] = "failed"
                res["reason"] = repr(e)[:300]
            if args.gpu:
                torch.cuda.empty_cache()
            out.append(res)
    return out


def _print(results, gpu: bool):
    head = f"{'impl':<9}{'W':>3}{'T':>8}{'H':>4}{'Hkv':>4}{'D':>5}  {'sent MiB/rank':>14}{'formula MiB':>13}"
    print(head + (f"{'ms fwd+bwd':>12}{'peak GiB/rank':>15}" if gpu else ""))
    for r in results:
        line = (f"{r['impl']:<9}{r['world']:>3}{r['tokens']:>8}{r['heads']:>4}{r['kv_heads']:>4}"
                f"{r['dim']:>5}  ")
        if r["status"] != "ok":
            print(line + f"failed: {r['reason']}")
            continue
        line += f"{r['sent_bytes'] / 2**20:>14.3f}{r['expected_bytes'] / 2**20:>13.3f}"
        if gpu:
            line += f"{r['median_ms']:>12.2f}{r['peak_mem_bytes_per_rank'] / 2**30:>15.2f}"
        print(line)


def _formula_table(worlds):
    """The closed forms at the GPU shapes (bf16, H = 32, D = 128; Hkv = 32 and 8)."""
    print("\nbytes each rank sends per layer (fwd+bwd) at the GPU shapes, from the checked formulas:")
    print(f"{'impl':<9}{'W':>3}{'T':>8}{'Hkv':>5}{'MiB/rank':>11}")
    for W in worlds:
        for T in (32768, 65536, 131072):
            for Hkv in (32, 8):
                for impl in IMPLS:
                    b = expected_bytes(impl, W, T, 32, Hkv, 128, 2)
                    print(f"{impl:<9}{W:>3}{T:>8}{Hkv:>5}{b / 2**20:>11.1f}")


def _main_in_group(args):
    results = run(args)
    if dist.get_rank() == 0:
        _print(results, args.gpu)
        bad = [r for r in results if r["status"] == "ok" and r["sent_bytes"] != r["expected_bytes"]]
        for r in bad:
            print(f"MISMATCH {r['impl']} W={r['world']}: sent {r['sent_bytes']} B, formula "
                  f"{r['expected_bytes']} B")
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"device": torch.cuda.get_device_name() if args.gpu else "cpu",
                           "torch": torch.__version__, "results": results}, f, indent=1)
    dist.destroy_process_group()


def _worker(rank, world, init_file, args):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    _main_in_group(args)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpu", action="store_true", help="under torchrun with NCCL: time and memory too")
    p.add_argument("--world", default="2,4", help="CPU: rank counts to spawn, comma-separated")
    p.add_argument("--tokens", default=None, help="T per layer, comma-separated (CPU 512, GPU 32k-128k)")
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--kv-heads", dest="kv_heads", type=int, default=None)
    p.add_argument("--dim", type=int, default=None)
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES))
    p.add_argument("--backend", default=None)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    gpu = args.gpu
    args.tokens = [int(t) for t in (args.tokens or ("32768,65536,131072" if gpu else "512")).split(",")]
    args.heads = args.heads or (32 if gpu else 8)
    args.kv_heads = args.kv_heads or (32 if gpu else 4)
    args.dim = args.dim or (128 if gpu else 16)
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    args.backend = args.backend or ("triton" if gpu else "reference")
    if gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl")
        _main_in_group(args)
        return
    worlds = [int(w) for w in args.world.split(",")]
    for W in worlds:
        with tempfile.TemporaryDirectory() as tmp:
            torch.multiprocessing.spawn(_worker, args=(W, os.path.join(tmp, "store"), args), nprocs=W)
    _formula_table(worlds)


if __name__ == "__main__":
    main()
