"""Bytes each op keeps for backward at LLM sizes, eager reference vs each fused backend.

    python -m bench.memory [--out DIR] [--ops cross_entropy,attention,...] [--force]

Without ``--out`` the results go to the tracked ``bench/results/memory.{json,md}`` and the table in
``bench/README.md`` — but only when a number changed: a rerun that measures the same bytes leaves
those files (their commit and date included) untouched. ``--out DIR`` always writes there.

Measured on the ``meta`` device, so it runs anywhere in seconds: a meta tensor has a shape,
a dtype and a storage size but no data; the reference backend runs its eager code on meta
tensors, a fused backend runs its custom op's fake implementation, and autograd records what
the real op would keep. Two things are counted (``rlhf_ops._memory.saved_for_backward``, the one
count the tests and the training report use too):

* saved tensors: every tensor autograd packs for backward (``saved_tensors_hooks``), counted
  once per underlying storage (``untyped_storage()._cdata`` identifies a storage, meta ones
  included; the pack hook holds a reference, so no identity is reused while we count), at the
  storage's full ``nbytes``;
* tensors kept alive elsewhere: tensors that exist after the forward but did not before it
  (found with ``gc``), that are not outputs, inputs, or already-counted saved storages — e.g. a
  gradient precomputed in the forward and stored on the autograd context.

``saved_bytes`` excludes the storages of the op's inputs (the caller holds those anyway: the
logits, q/k/v); ``saved_bytes_incl_inputs`` includes them. Peak memory during the forward is a
GPU measurement (bench.report), not done here.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

import torch

import bench  # noqa: F401  (sets TRITON_INTERPRET on a CPU-only machine)
import rlhf_ops as ro
from rlhf_ops import _registry
from rlhf_ops._memory import saved_for_backward

from .harness import DTYPE_NAMES

META = torch.device("meta")
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _m(*shape, dtype=torch.bfloat16, grad=False):
    t = torch.empty(*shape, device=META, dtype=dtype)
    return t.requires_grad_(True) if grad else t


def _idx(*shape):
    return torch.empty(*shape, device=META, dtype=torch.int64)


# op -> (shape dict, dtype, inputs factory, call(inputs, backend) -> output)
def _specs():
    N, V, d = 8192, 128256, 4096
    B, T = 4, 2048  # 8k tokens for the per-token ops
    return {
        "cross_entropy": ({"N": N, "V": V}, torch.bfloat16,
                          lambda: [_m(N, V, grad=True), _idx(N)],
                          lambda a, b: ro.cross_entropy(*a, backend=b)),
        "linear_cross_entropy": ({"N": N, "d": d, "V": V}, torch.bfloat16,
                                 lambda: [_m(N, d, grad=True), _m(V, d, grad=True), _idx(N)],
                                 lambda a, b: ro.linear_cross_entropy(*a, backend=b)),
        "token_logprobs": ({"B": B, "T": T, "V": V}, torch.bfloat16,
                           lambda: [_m(B, T, V, grad=True), _idx(B, T)],
                           lambda a, b: ro.token_logprobs(*a, backend=b)),
        "kl_penalty": ({"B": B, "T": T, "V": V, "estimator": "k3"}, torch.bfloat16,
                       lambda: [_m(B, T, V, grad=True), _m(B, T, V), _idx(B, T)],
                       lambda a, b: ro.kl_penalty(*a, beta=0.05, estimator="k3", backend=b)),
        "attention": ({"B": 8, "H": 32, "T": 4096, "D": 128, "causal": 1}, torch.bfloat16,
                      lambda: [_m(8, 32, 4096, 128, grad=True) for _ in range(3)],
                      lambda a, b: ro.attention(*a, causal=True, backend=b)),
        "linear_token_logprobs": ({"N": N, "d": d, "V": V, "entropy": 1}, torch.bfloat16,
                                  lambda: [_m(N, d, grad=True), _m(V, d, grad=True), _idx(N)],
                                  lambda a, b: ro.linear_token_logprobs(*a, return_entropy=True,
                                                                        backend=b)),
        # 8 packed sequences of 4,096 tokens: the same real tokens as the dense attention case
        "attention_varlen": ({"n": 8, "H": 32, "T": 4096, "D": 128, "causal": 1}, torch.bfloat16,
                             lambda: [_m(8 * 4096, 32, 128, grad=True) for _ in range(3)]
                             + [torch.arange(0, 8 * 4096 + 1, 4096, dtype=torch.int32, device=META)] * 2,
                             lambda a, b: ro.attention_varlen(*a, 4096, 4096, causal=True, backend=b)),
        # a GRPO group as a tree: the prompt (P = 4,096) once, G = 8 completions of R = 1,024
        "attention_tree": ({"P": 4096, "G": 8, "R": 1024, "H": 32, "D": 128}, torch.bfloat16,
                           lambda: [_m(4096 + 8 * 1024, 32, 128, grad=True) for _ in range(3)]
                           + [torch.tensor([0] + [4096 + 1024 * g for g in range(9)], dtype=torch.int32,
                                           device=META),
                              torch.tensor([-1] + [0] * 8, dtype=torch.int32, device=META)],
                           lambda a, b: ro.attention_tree(*a, 4096 + 1024, backend=b)),
        "pairwise_reward_loss": ({"B": 16384, "K": 9}, torch.float32,
                                 lambda: [_m(16384, 9, dtype=torch.float32, grad=True), _idx(16384, 9)],
                                 lambda a, b: ro.pairwise_reward_loss(*a, backend=b)),
    }


def _registered_specs() -> dict:
    """The specs, one for every op the registry (rlhf_ops/_registry.py) marks ``memory=True``."""
    specs = _specs()
    want = {op.name for op in _registry.OPS if op.memory}
    if want != set(specs):
        raise RuntimeError(f"bench/memory.py _specs() and the op registry disagree: missing "
                           f"{sorted(want - set(specs))}, not registered with memory=True "
                           f"{sorted(set(specs) - want)}")
    return specs


def measure(ops=None) -> list[dict]:
    rows = []
    specs = _registered_specs()
    for op in ops or list(specs):
        shape, dtype, make, call = specs[op]
        eager = None
        for b in _registry.backends(_registry.BY_NAME[op]):
            row = {"op": op, "backend": b, "shape": shape, "dtype": DTYPE_NAMES[dtype]}
            try:
                row.update(status="ok", **saved_for_backward(lambda a: call(a, b), make))
            except NotImplementedError as e:
                row.update(status="missing", reason=f"not implemented: {e}")
            except Exception as e:  # noqa: BLE001 - reported with its reason
                row.update(status="failed", reason=f"{type(e).__name__}: {str(e)[:300]}")
            if b == "reference" and row["status"] == "ok":
                eager = row["saved_bytes"]
            if b != "reference" and row["status"] == "ok" and eager:
                row["vs_eager"] = row["saved_bytes"] / eager
            rows.append(row)
    return rows


def _gib(n) -> str:
    if n is None:
        return "—"
    for unit, s in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= s:
            return f"{n / s:.2f} {unit}"
    return f"{n} B"


def markdown(rows: list[dict]) -> str:
    lines = ["| op | shape | dtype | backend | saved for backward (new) | kept elsewhere | "
             "incl. inputs | vs eager |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        shape = "×".join(f"{k}={v}" for k, v in r["shape"].items())
        if r["status"] != "ok":
            lines.append(f"| {r['op']} | {shape} | {r['dtype']} | {r['backend']} | "
                         f"{r['status']}: {r['reason'][:80]} | | | |")
            continue
        ratio = f"{r['vs_eager']:.3g}×" if "vs_eager" in r else ""
        lines.append(f"| {r['op']} | {shape} | {r['dtype']} | {r['backend']} | "
                     f"{_gib(r['saved_bytes'])} | {_gib(r['kept_elsewhere_bytes'])} | "
                     f"{_gib(r['saved_bytes_incl_inputs'])} | {ratio} |")
    return "\n".join(lines) + "\n"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              check=True).stdout.strip()
    except Exception:  # noqa: BLE001
        return "unknown"


def unchanged(rows: list[dict], path: str) -> bool:
    """The memory.json at path holds exactly these rows (commit, date and torch version aside)."""
    try:
        with open(path) as f:
            return json.load(f).get("rows") == json.loads(json.dumps(rows))
    except (OSError, ValueError):
        return False


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(
        prog="python -m bench.memory", description=__doc__.split("\n")[0],
        epilog="Without --out, tracked files are rewritten only when a number changed.")
    p.add_argument("--out", default=None,
                   help="write memory.json and memory.md to this folder, always (default: "
                        "bench/results and bench/README.md's table, only when a number changed)")
    p.add_argument("--ops", default=None, help="comma-separated ops (default: all)")
    p.add_argument("--force", action="store_true",
                   help="rewrite the tracked files even when no number changed")
    args = p.parse_args(argv)
    rows = measure(args.ops.split(",") if args.ops else None)
    result = {"device": "meta", "commit": git_commit(),
              "date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "what": "bytes kept for backward (saved tensors + tensors kept alive elsewhere), "
                      "excluding the op's inputs; measured on the meta device",
              "rows": rows}
    out = args.out or DEFAULT_OUT
    tracked = os.path.abspath(out) == os.path.abspath(DEFAULT_OUT)
    sys.stdout.write(markdown(rows))
    if tracked and not args.force and (args.ops or unchanged(rows, os.path.join(out, "memory.json"))):
        why = ("--ops measures a subset" if args.ops else "every number equals bench/results/memory.json's")
        print(f"bench.memory: {why}; tracked files left as they are (--out DIR writes elsewhere)")
        return result
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "memory.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out, "memory.md"), "w") as f:
        f.write(f"Bytes kept for backward, measured on the meta device (commit "
                f"{result['commit'][:10]}, {result['date']}, torch {result['torch']}). "
                "'new' excludes the op's inputs; 'incl. inputs' counts them too. On meta, the "
                "triton and cuda rows both run the op's fake implementation (what autograd "
                "would keep), so they agree by construction.\n\n")
        f.write(markdown(rows))
    if tracked:
        _update_readme(result)
    print(f"bench.memory: wrote {out}/memory.json and memory.md")
    return result


def _update_readme(result: dict) -> None:
    """Put the latest table between the memory-table markers of bench/README.md."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")
    start, end = "<!-- memory-table:start -->", "<!-- memory-table:end -->"
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return
    if start not in text or end not in text:
        return
    table = (f"Commit `{result['commit'][:10]}`, {result['date']}, torch {result['torch']}.\n\n"
             + markdown(result["rows"]))
    head, rest = text.split(start, 1)
    text = head + start + "\n" + table + end + rest.split(end, 1)[1]
    with open(path, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
