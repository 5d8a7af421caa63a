"""Multi-process test runs on torch.distributed (gloo): one spawn runs every case of a test module.

Shared by tests/test_distributed.py and tests/test_context_parallel.py. A module lists its cases
with ``CASES, case = registry()`` (the decorator ``case`` adds to ``CASES``) and has a
``_worker(rank, world, init_file, out_dir, only)`` that joins the group (``init``), builds its
subgroups and context, and hands the cases to ``run_cases``; the pytest side calls ``spawn``,
which starts one process per rank and merges what each wrote. A case key is ``name[w]`` (w: the ranks of the group it runs on).

Every rank seeds its generators from the key (the same inputs on every rank), runs the case,
and the group agrees on the outcome before the next case starts, so a case that fails on one
rank does not leave the others waiting in a collective. The group has a timeout and the spawn a
deadline: a hang fails with each rank's last output instead of stalling the suite.
"""
from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
import traceback
import zlib
from pathlib import Path

import pytest
import torch

GROUP_TIMEOUT_S = 60


def registry():
    """A module's case list and its decorator: ``@case(3, 2)`` runs the function on a group of 3
    ranks and on one of 2 (each a separate case)."""
    cases: list = []   # (name, worlds, fn)

    def case(*worlds):
        def deco(fn):
            cases.append((fn.__name__, worlds, fn))
            return fn
        return deco
    return cases, case


def init(rank: int, world: int, init_file: str):
    """Join the gloo group of ``world`` processes (file rendezvous); torch.distributed."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))
    return dist


def run_cases(rank: int, cases: list, make_ctx, member, out_dir: str, only: str | None) -> None:
    """Run every case of ``cases`` whose group this rank is in (``member(w)``) and whose key holds
    ``only``; ``make_ctx(w)`` gives the case's context (``.group``: the group it runs on). Writes
    {key: {"result": "ok" or the traceback, "others_failed", "seconds"}} to ``rank<r>.json``
    after every case, the process's CPU seconds at the end, and leaves the group."""
    import resource

    import torch.distributed as dist
    results = {}
    path = Path(out_dir, f"rank{rank}.json")
    for name, worlds, fn in cases:
        for w in worlds:
            key = f"{name}[{w}]"
            if (only and only not in key) or not member(w):
                continue
            ctx = make_ctx(w)
            torch.manual_seed(zlib.crc32(key.encode()))   # the same inputs on every rank
            t0 = time.time()
            try:
                fn(ctx)
                res = "ok"
            except Exception:
                res = traceback.format_exc()
            # every rank of the group reaches this point before the next case starts
            flag = torch.tensor([0 if res == "ok" else 1], device="cpu")
            dist.all_reduce(flag, group=ctx.group)
            results[key] = {"result": res, "others_failed": int(flag) - (res != "ok"),
                            "seconds": round(time.time() - t0, 2)}
            print(f"rank {rank}: {key} {res.splitlines()[-1][:200]} in {time.time() - t0:.1f} s", flush=True)
            path.write_text(json.dumps(results))
    ru = resource.getrusage(resource.RUSAGE_SELF)
    results["_cpu_seconds"] = ru.ru_utime + ru.ru_stime
    path.write_text(json.dumps(results))
    dist.destroy_process_group()


def spawn(module: str, world: int, tmp: Path, only: str | None, deadline_s: float, what: str) -> dict:
    """Run ``tests/<module>.py``'s ``_worker`` on ``world`` processes; {case key: [per-rank result
    dicts]}. ``what`` names the cases in the failure messages."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    here = str(Path(__file__).parent)
    code = ("import sys; sys.path.insert(0, {here!r}); import {module} as m; "
            "m._worker({rank}, {world}, {init!r}, {out!r}, {only!r})")
    procs = [subprocess.Popen([sys.executable, "-c", code.format(here=here, module=module, rank=r, world=world,
                                                                  init=str(tmp / "store"), out=str(tmp),
                                                                  only=only)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    deadline = time.time() + deadline_s
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=max(1.0, deadline - time.time()))[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            tails = "\n".join(f"--- rank {r}:\n" + q.communicate()[0][-3000:] for r, q in enumerate(procs))
            pytest.fail(f"the {what} cases did not finish within {deadline_s} s\n{tails}")
    per_rank = []
    for r, (p, log) in enumerate(zip(procs, logs)):
        f = tmp / f"rank{r}.json"
        if p.returncode != 0 or not f.exists():
            pytest.fail(f"rank {r} exited with {p.returncode}:\n{log[-4000:]}")
        per_rank.append(json.loads(f.read_text()))
    merged: dict = {}
    for res in per_rank:
        for k, v in res.items():
            merged.setdefault(k, []).append(v)
    cpu = merged.pop("_cpu_seconds")
    print(f"\nworker CPU seconds: {[round(c, 1) for c in cpu]} (sum {sum(cpu):.1f})")
    slow = sorted(((max(r["seconds"] for r in v), k) for k, v in merged.items()), reverse=True)
    print("slowest cases (wall s): " + ", ".join(f"{k} {t:.1f}" for t, k in slow[:10]))
    return merged


def keys(cases: list) -> list[str]:
    """Every case key, for the module's parametrized test."""
    return [f"{name}[{w}]" for name, worlds, _ in cases for w in worlds]


def check(results: dict, key: str, only_env: str) -> None:
    """The test of one case: every rank of its group ran it and none failed (the failing ranks'
    tracebacks in the message); skipped when ``only_env`` (the module's RLHF_*_ONLY) left it out."""
    if key not in results:
        pytest.skip(f"{key} not run ({only_env}={os.environ.get(only_env)})")
    per_rank = results[key]
    world = int(key[-2])
    assert len(per_rank) == world, per_rank
    failed = [r["result"] for r in per_rank if r["result"] != "ok"]
    assert not failed, f"{len(failed)} of {world} ranks failed:\n" + "\n".join(failed)
