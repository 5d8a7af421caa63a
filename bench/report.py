"""Run the roofline probe and every op benchmark; write results as JSON, Markdown and PNG plots.

    python -m bench.report [--quick] [--ops attention,kl_penalty,...] [--tests] [--out DIR]
                           [--budget-s 420] [--size smoke|quick|llm]

* Device: the GPU when one is visible, else the CPU. The results go to
  ``<out>/<slug>.json`` (slug: h100-sxm, h100-pcie, h200, a100-sxm, ..., cpu) in docs/design.md's
  "Results format", ``<out>/<slug>.md`` (a table) and ``<out>/<slug>-<op>.png`` (time and memory
  vs size, one line per backend/peer).
* Sizes: on a GPU the full LLM-scale sweep (``--quick``: only the goal shapes of the issues); on
  a CPU always the tiny smoke sizes with the reference backend (plus one tiny Triton case under
  the interpreter). CPU results are labelled smoke: they show that the code runs, not speed.
* ``--budget-s``: stop starting new measurements after this many seconds (goal shapes run first);
  what was not measured is recorded as ``skipped`` with that reason.
* ``--tests``: also run the test suite (pytest, junit XML) and record passed/failed/skipped per
  ``<op>/<backend>`` in the ``tests`` field (``--junit FILE``: take them from a run already made).

Every entry is one of our backends (reference, triton, cuda) for one (op, shape, mode), with
its baselines measured in the same run: ``eager`` (the reference backend), ``compile``
(torch.compile of it) and the peers (sdpa_flash, sdpa_efficient, sdpa_cudnn, sdpa_math and
``sdpa`` = the fastest of them, flex, torch_ce, torch_linear_ce, liger, cce). Entries and
baselines that could not run carry ``status`` (missing / failed / skipped) and ``reason``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

import torch

import bench  # noqa: F401  (sets TRITON_INTERPRET on a CPU-only machine)

from rlhf_ops import _registry

from . import harness, roofline
from .memory import git_commit

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SMOKE_NOTE = ("CPU smoke run: tiny sizes, reference backend (and one tiny Triton case under the "
              "interpreter). These numbers show that the benchmark code runs; they are NOT speed.")


def device_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100-sxm', 'NVIDIA H200' -> 'h200', CPU -> 'cpu'."""
    n = name.lower()
    if name == "CPU" or n == "cpu":
        return "cpu"
    m = re.search(r"\b([abhlv]\d{2,3}|gh200|gb200|b200|rtx ?\d{4})", n)
    base = m.group(1).replace(" ", "") if m else re.sub(r"[^a-z0-9]+", "-", n).strip("-")
    if base in ("a100", "h100"):
        if "pcie" in n:
            return f"{base}-pcie"
        if "nvl" in n:
            return f"{base}-nvl"
        return f"{base}-sxm"  # HBM3 / SXM parts
    return base


# op -> its bench family, and the shape key of its plots' x axis (the op registry's entries)
FAMILY_OF = {op.name: op.bench for op in _registry.OPS if op.bench}
_X = {op.name: op.bench_x for op in _registry.OPS if op.bench}


def _families(ops):
    """--ops names ops; return the bench families to load and the ops to keep (None: all)."""
    if not ops:
        return list(harness.FAMILIES), None
    bad = [o for o in ops if o not in FAMILY_OF]
    if bad:
        raise SystemExit(f"--ops: unknown {bad}; expected some of {sorted(FAMILY_OF)}")
    return sorted({FAMILY_OF[o] for o in ops}, key=harness.FAMILIES.index), set(ops)


def _result_view(res: dict, case: harness.Case, mode: str, roof: dict | None) -> dict:
    if res["status"] != "ok":
        return {k: res[k] for k in ("status", "reason")}
    out = {"median_ms": res["median_ms"], "peak_mem_bytes": res["peak_mem_bytes"]}
    out.update(harness.rates(case, mode, res["median_ms"], roof))
    return out


def run_benchmarks(device, size, ops=None, budget_s=None, roof=None, log=print,
                   progress=None, cases=None, modes=None) -> list[dict]:
    """Measure every (case, mode, impl); ``progress(entries)`` is called after each (case, mode)
    so that a run cut short still leaves its results behind. ``cases`` (a list of harness
    cases) replaces the ones of ``size``; ``modes`` restricts the modes (bench/headline.py)."""
    device = torch.device(device)
    fams, keep = _families(ops)
    all_cases = list(cases) if cases is not None else [
        c for f in fams for c in harness.cases(f, size) if keep is None or c.op in keep]
    all_cases.sort(key=lambda c: not c.priority)  # goal shapes first (stable otherwise)
    smoke = size == "smoke"
    jobs = [(c, False) for c in all_cases]
    if smoke and (keep is None or "cross_entropy" in keep):
        jobs.append((harness.triton_smoke_case(), True))
    t_start = time.time()
    entries = []
    for case, triton_smoke in jobs:
        for mode in ("fwd+bwd",) if triton_smoke else (modes or harness.MODES):
            results = {}
            # compile last: its first call compiles (tens of seconds), so a run short of time
            # still gets our backends, eager and the peers
            for name in sorted(case.impls, key=lambda n: n == "compile"):
                if budget_s is not None and time.time() - t_start > budget_s:
                    results[name] = {"status": "skipped",
                                     "reason": f"time budget of {budget_s:.0f} s used up"}
                elif smoke and name == "triton" and not triton_smoke:
                    results[name] = {"status": "skipped", "reason": "CPU smoke run: the Triton "
                                     "interpreter is timed only on the one tiny case"}
                else:
                    kw = {"warmup": 1, "reps": 1} if triton_smoke else (
                        {"warmup": 1, "reps": 3} if smoke else {})
                    results[name] = harness.measure(case, name, mode, device, **kw)
                r = results[name]
                log(f"  {case.id:<48} {mode:<8} {name:<15} "
                    + (f"{r['median_ms']:10.3f} ms" if r["status"] == "ok"
                       else f"{r['status']}: {r['reason'][:90]}"))
            entries += _entries(case, mode, results, roof, smoke, triton_smoke)
            if progress is not None:
                progress(entries)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return entries


def _entries(case, mode, results, roof, smoke, triton_smoke) -> list[dict]:
    views = {n: _result_view(r, case, mode, roof) for n, r in results.items()}
    baselines = {"eager": views.get("reference", {"status": "missing", "reason": "not run"})}
    for n, v in views.items():
        if n not in harness.OUR_BACKENDS:
            baselines[n] = v
    sdpa = [(v["median_ms"], n) for n, v in views.items() if n.startswith("sdpa_") and "median_ms" in v]
    if sdpa:
        ms, n = min(sdpa)
        baselines["sdpa"] = dict(views[n], backend=n)
    out = []
    for b in harness.OUR_BACKENDS:
        if b not in results:
            continue
        v = views[b]
        e = {"op": case.op, "backend": b, "mode": mode, "shape": case.shape,
             "dtype": harness.DTYPE_NAMES[case.dtype], "flop": case.flop[mode],
             "bytes": case.bytes[mode], "bound": case.bound, "smoke": smoke}
        if "median_ms" in v:
            e.update(status="ok", median_ms=v["median_ms"], tflops=v["tflops"], gbps=v["gbps"],
                     roofline_frac=v["roofline_frac"], peak_mem_bytes=v["peak_mem_bytes"])
            base = {}
            for n, bv in baselines.items():
                bv = dict(bv)
                if "median_ms" in bv and bv["median_ms"] > 0:
                    bv["speedup"] = bv["median_ms"] / v["median_ms"]  # > 1: ours is faster
                base[n] = bv
            e["baselines"] = base
        else:
            e.update(status=v["status"], reason=v["reason"], median_ms=None, tflops=None,
                     gbps=None, roofline_frac=None, peak_mem_bytes=None, baselines=baselines)
        out.append(e)
    return out


# ------------------------------------------------------------------------------ goals ---

# The performance goals of the issues, checked on the goal shapes: (issue, op, shape, mode,
# what, check(entry) -> value, threshold). A value ≥ threshold meets the goal.
def _speedup(name):
    return lambda e: e["baselines"].get(name, {}).get("speedup")


GOALS = [
    ("#2", "cross_entropy", {"N": 8192, "V": 128256}, "fwd+bwd", "≥ 2× eager", _speedup("eager"), 2.0),
    ("#2", "cross_entropy", {"N": 8192, "V": 128256}, "fwd+bwd", "≥ torch.compile", _speedup("compile"), 1.0),
    ("#2", "cross_entropy", {"N": 8192, "V": 128256}, "fwd+bwd", "≥ Liger", _speedup("liger"), 1.0),
    ("#2", "cross_entropy", {"N": 8192, "V": 128256}, "fwd+bwd", "≥ 80% of copy GB/s",
     lambda e: e["roofline_frac"], 0.8),
    ("#3", "attention", {"B": 4, "H": 16, "T": 4096, "D": 128, "causal": 1}, "fwd",
     "≥ fastest SDPA", _speedup("sdpa"), 1.0),
    ("#3", "attention", {"B": 4, "H": 16, "T": 4096, "D": 128, "causal": 1}, "fwd+bwd",
     "≥ fastest SDPA", _speedup("sdpa"), 1.0),
    ("#5", "pairwise_reward_loss", {"B": 1024, "K": 9}, "fwd+bwd", "≥ 5× eager", _speedup("eager"), 5.0),
    ("#6", "kl_penalty", {"B": 4, "T": 2048, "V": 128256}, "fwd", "≥ 80% of copy GB/s",
     lambda e: e["roofline_frac"], 0.8),
    ("#6", "kl_penalty", {"B": 4, "T": 2048, "V": 128256}, "fwd", "≥ 3× eager", _speedup("eager"), 3.0),
    ("#6", "kl_penalty", {"B": 4, "T": 2048, "V": 128256}, "fwd+bwd", "≥ 3× eager", _speedup("eager"), 3.0),
]


def goals(entries: list[dict]) -> list[dict]:
    """Each goal per fused backend: the measured value and whether it is met (None: not measured)."""
    out = []
    for issue, op, shape, mode, what, fn, thr in GOALS:
        for b in ("triton", "cuda"):
            e = next((e for e in entries if e["op"] == op and e["backend"] == b and e["mode"] == mode
                      and all(e["shape"].get(k) == v for k, v in shape.items())), None)
            val = fn(e) if e is not None and e.get("status") == "ok" else None
            out.append({"issue": issue, "op": op, "shape": shape, "mode": mode, "backend": b,
                        "goal": what, "value": val, "threshold": thr,
                        "met": None if val is None else bool(val >= thr)})
    return out


# ------------------------------------------------------------------------------ tests ---

def run_tests(out_dir: str, timeout_s: int = 1800) -> dict:
    """Run the test suite; passed/failed/skipped per '<op>/<backend>' from the junit XML."""
    xml = os.path.join(out_dir, "junit.xml")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests",
           f"--junitxml={xml}", "-o", "addopts=-ra"]
    subprocess.run(cmd, cwd=ROOT, timeout=timeout_s)
    return parse_junit(xml)


def parse_junit(path: str) -> dict:
    counts: dict = {}
    for tc in ET.parse(path).getroot().iter("testcase"):
        if not tc.get("name"):
            continue  # the test a timeout interrupted leaves a nameless entry
        mod = tc.get("classname", "").split(".")
        op = next((m[5:] for m in mod if m.startswith("test_")), mod[-1] if mod else "?")
        params = re.search(r"\[(.*)\]", tc.get("name", ""))
        toks = re.split(r"[-_\[\]]", params.group(1)) if params else []
        be = next((t for t in toks if t in harness.OUR_BACKENDS), "all")
        if tc.find("skipped") is not None:
            kind = "skipped"
        elif tc.find("failure") is not None or tc.find("error") is not None:
            kind = "failed"
        else:
            kind = "passed"
        c = counts.setdefault(f"{op}/{be}", {"passed": 0, "failed": 0, "skipped": 0})
        c[kind] += 1
    return dict(sorted(counts.items()))


# ------------------------------------------------------------------------------ output ---

def _fmt(x, f="{:.3f}"):
    return "—" if x is None else f.format(x)


def markdown(res: dict) -> str:
    r = res["roofline"]
    lines = [f"# rlhf_ops benchmarks — {res['device']}", "",
             f"commit `{res['commit'][:10]}`, {res['date']}, torch {res['torch']}, "
             f"triton {res['triton']}. Roofline: copy {r['hbm_gbps']:.1f} GB/s, "
             f"bf16 matmul {r['bf16_tflops']:.2f} TFLOP/s ({res.get('roofline_label', '')}).", ""]
    if res.get("smoke"):
        lines += [f"**{SMOKE_NOTE}**", ""]
    lines += ["Speed-ups are baseline time / our time (> 1: ours is faster). `roofline` is GB/s "
              "over the copy bandwidth for memory-bound ops, TFLOP/s over the matmul rate for "
              "compute-bound ones.", "",
              "| op | shape | mode | backend | ms | TFLOP/s | GB/s | roofline | peak MiB | "
              "eager ms (×) | compile ms (×) | best peer |",
              "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for e in res["benchmarks"]:
        shape = ",".join(f"{k}={v}" for k, v in e["shape"].items())
        head = f"| {e['op']} | {shape} {e['dtype']} | {e['mode']} | {e['backend']} |"
        if e["status"] != "ok":
            lines.append(f"{head} {e['status']}: {e['reason'][:70]} | | | | | | | |")
            continue
        b = e["baselines"]

        def cell(v):
            if "median_ms" not in v:
                return v.get("status", "—")
            return f"{v['median_ms']:.3f} ({v.get('speedup', 0):.2f}×)"
        peers = [(v["median_ms"], n, v) for n, v in b.items()
                 if n not in ("eager", "compile", "sdpa") and "median_ms" in v]
        best = f"{min(peers)[1]} {cell(min(peers)[2])}" if peers else "—"
        mib = None if e["peak_mem_bytes"] is None else e["peak_mem_bytes"] / 2**20
        frac = None if e["roofline_frac"] is None else 100 * e["roofline_frac"]
        lines.append(f"{head} {e['median_ms']:.3f} | {_fmt(e['tflops'])} | {_fmt(e['gbps'], '{:.1f}')} | "
                     f"{_fmt(frac, '{:.1f}%')} | {_fmt(mib, '{:.0f}')} | {cell(b.get('eager', {}))} | "
                     f"{cell(b.get('compile', {}))} | {best} |")
    if res.get("goals") and not res.get("smoke"):
        lines += ["", "## Goals of the issues (goal shapes)", "",
                  "| issue | op | mode | backend | goal | measured | met |", "|---|---|---|---|---|---:|---|"]
        for g in res["goals"]:
            met = {True: "yes", False: "**no**", None: "not measured"}[g["met"]]
            lines.append(f"| {g['issue']} | {g['op']} | {g['mode']} | {g['backend']} | {g['goal']} | "
                         f"{_fmt(g['value'], '{:.2f}')} | {met} |")
    if res.get("tests"):
        lines += ["", "## Tests", "", "| op/backend | passed | failed | skipped |", "|---|---:|---:|---:|"]
        for k, c in res["tests"].items():
            lines.append(f"| {k} | {c['passed']} | {c['failed']} | {c['skipped']} |")
    return "\n".join(lines) + "\n"


def plots(res: dict, out_dir: str, slug: str) -> list[str]:
    """One PNG per op: time vs size per mode, and peak memory (fwd+bwd) vs size."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    ops = sorted({e["op"] for e in res["benchmarks"]})
    for op in ops:
        fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
        for ax, mode in zip(axes, harness.MODES + ("mem",)):
            lines: dict = {}
            for e in res["benchmarks"]:
                m = "fwd+bwd" if mode == "mem" else mode
                if e["op"] != op or e["mode"] != m or e["status"] != "ok":
                    continue
                x = _x_of(e)
                series = _series_of(e)
                key_ms = "peak_mem_bytes" if mode == "mem" else "median_ms"
                impls = {e["backend"]: e}
                for n, v in e["baselines"].items():
                    # "eager" is the reference backend's line; "sdpa" repeats its fastest backend
                    if n not in ("sdpa", "eager") and key_ms in v and v[key_ms] is not None:
                        impls[n] = v
                for n, v in impls.items():
                    if v.get(key_ms) is None:
                        continue
                    y = v[key_ms] / 2**20 if mode == "mem" else v[key_ms]
                    lines.setdefault(f"{n} {series}", {})[x] = y
            for label, pts in sorted(lines.items()):
                xs = sorted(pts)
                ax.plot(xs, [pts[x] for x in xs], marker="o", label=label)
            ax.set_xscale("log", base=2)
            if lines:
                ax.set_yscale("log")
                ax.legend(fontsize=6)
            elif mode == "mem":
                ax.text(0.5, 0.5, "peak memory is measured on a GPU only", ha="center",
                        transform=ax.transAxes)
            ax.set_xlabel(_x_label(op))
            ax.set_ylabel("peak MiB (fwd+bwd)" if mode == "mem" else "median ms")
            ax.set_title(f"{op} {'memory' if mode == 'mem' else mode}")
        title = f"{res['device']} — {res['date']} — commit {res['commit'][:10]}"
        if res.get("smoke"):
            title += "   [CPU SMOKE: not speed]"
        fig.suptitle(title)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{slug}-{op}.png")
        fig.savefig(path, dpi=80)
        plt.close(fig)
        files.append(path)
    return files


def _x_of(e):
    return e["shape"][_X[e["op"]]]


def _x_label(op):
    return _X[op]


def _series_of(e):
    # attention sweeps T at a fixed token count B·T, so B is not part of the series either
    skip = {_X[e["op"]]} | ({"B"} if e["op"] == "attention" else set())
    return ",".join(f"{k}={v}" for k, v in e["shape"].items() if k not in skip)


def validate(res: dict) -> None:
    """Check ``res`` against docs/design.md's results format (raises ValueError)."""
    def need(d, keys, where):
        missing = [k for k in keys if k not in d]
        if missing:
            raise ValueError(f"{where}: missing keys {missing}")
    need(res, ["device", "commit", "date", "torch", "triton", "roofline", "tests", "benchmarks"], "result")
    need(res["roofline"], ["hbm_gbps", "bf16_tflops"], "roofline")
    datetime.date.fromisoformat(res["date"])
    for k, c in res["tests"].items():
        if "/" not in k:
            raise ValueError(f"tests: key {k!r} is not '<op>/<backend>'")
        need(c, ["passed", "failed", "skipped"], f"tests[{k}]")
    for i, e in enumerate(res["benchmarks"]):
        need(e, ["op", "backend", "mode", "shape", "dtype", "median_ms", "tflops", "gbps",
                 "roofline_frac", "peak_mem_bytes", "baselines"], f"benchmarks[{i}]")
        if e["mode"] not in harness.MODES or e["backend"] not in harness.OUR_BACKENDS:
            raise ValueError(f"benchmarks[{i}]: bad mode/backend {e['mode']!r}/{e['backend']!r}")
        if e.get("status", "ok") == "ok":
            if not (isinstance(e["median_ms"], float) and e["median_ms"] > 0):
                raise ValueError(f"benchmarks[{i}]: median_ms must be a positive float")
            need(e["baselines"], ["eager"], f"benchmarks[{i}].baselines")
        elif not e.get("reason"):
            raise ValueError(f"benchmarks[{i}]: status {e['status']} without a reason")


# what a CPU smoke run measures but does not mean: timings (and when, where and with which torch
# and Triton they were taken)
_SMOKE_NOISE = {"median_ms", "speedup", "tflops", "gbps", "roofline_frac", "peak_mem_bytes", "commit",
                "date", "roofline", "roofline_label", "torch", "triton"}


def _without_noise(x):
    if isinstance(x, dict):
        return {k: _without_noise(v) for k, v in x.items() if k not in _SMOKE_NOISE}
    if isinstance(x, list):
        return [_without_noise(v) for v in x]
    return x


def smoke_unchanged(res: dict, path: str) -> bool:
    """A smoke run's results equal the file's, timings aside (which cases ran, their status,
    reasons, goals and tests)."""
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return False
    return _without_noise(old) == _without_noise(json.loads(json.dumps(res)))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.report",
        description="Run the roofline probe and every op benchmark on this machine's GPU (or, "
                    "without one, tiny smoke sizes on the CPU); write <slug>.json in the results "
                    "format of docs/design.md, <slug>.md (a table) and <slug>-<op>.png plots.",
        epilog="A CPU smoke run does not rewrite the tracked bench/results files when only its "
               "timings changed (they are not speed); --out DIR always writes.")
    p.add_argument("--quick", action="store_true",
                   help="GPU only: measure just the goal shapes of the issues (size 'quick')")
    p.add_argument("--size", choices=harness.SIZES, default=None,
                   help="case sizes: smoke (tiny, CPU default), quick (goal shapes), llm (full "
                        "sweep, GPU default)")
    p.add_argument("--ops", default=None,
                   help=f"comma-separated ops to measure (default: all of {', '.join(sorted(FAMILY_OF))})")
    p.add_argument("--tests", action="store_true",
                   help="also run the test suite and record passed/failed/skipped per <op>/<backend>")
    p.add_argument("--junit", default=None, metavar="FILE",
                   help="fill the tests field from this pytest junit XML instead of running them")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="results folder (default: bench/results, the tracked one)")
    p.add_argument("--budget-s", type=float, default=None, metavar="S",
                   help="stop starting new measurements after S seconds (goal shapes run first; "
                        "the rest is recorded as skipped)")
    p.add_argument("--no-plots", action="store_true", help="write the JSON and the table, no PNGs")
    return p


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    tracked = args.out is None or os.path.abspath(args.out) == os.path.abspath(os.path.join(HERE, "results"))
    args.out = args.out or os.path.join(HERE, "results")

    gpu = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
    device = torch.device("cuda" if gpu else "cpu")
    size = args.size or ("smoke" if not gpu else ("quick" if args.quick else "llm"))
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    roof = roofline.measure(device)
    print(f"roofline ({roof['label']}): copy {roof['hbm_gbps']:.1f} GB/s, "
          f"bf16 matmul {roof['bf16_tflops']:.3f} TFLOP/s")
    import triton
    name = torch.cuda.get_device_name(device) if gpu else "CPU"
    slug = device_slug(name)
    res = {"device": name, "commit": git_commit(), "date": datetime.date.today().isoformat(),
           "torch": torch.__version__, "triton": triton.__version__,
           "roofline": {"hbm_gbps": roof["hbm_gbps"], "bf16_tflops": roof["bf16_tflops"]},
           "roofline_label": roof["label"], "smoke": size == "smoke", "size": size,
           "tests": {}, "benchmarks": []}
    if size == "smoke":
        res["note"] = SMOKE_NOTE
    budget = None if args.budget_s is None else max(0.0, args.budget_s - (time.time() - t0))
    json_path = os.path.join(args.out, f"{slug}.json")
    keep_if_same = tracked and size == "smoke"     # a smoke run's timings are not results
    partial_path = json_path + ".partial" if keep_if_same else json_path

    def progress(entries):  # partial results on disk in case the run is cut short
        with open(partial_path, "w") as f:
            json.dump(dict(res, benchmarks=entries, partial=True), f, indent=1)
    res["benchmarks"] = run_benchmarks(device, size, args.ops.split(",") if args.ops else None,
                                       budget, res["roofline"], progress=progress)
    res["goals"] = goals(res["benchmarks"])
    if args.junit:
        res["tests"] = parse_junit(args.junit)
    elif args.tests:
        with tempfile.TemporaryDirectory() as tmp:
            res["tests"] = run_tests(tmp)
    validate(res)
    if keep_if_same:
        if os.path.exists(partial_path):
            os.remove(partial_path)
        if smoke_unchanged(res, json_path):
            print(f"smoke run: the same cases, statuses and tests as {json_path}; only timings differ "
                  f"(not speed), so the tracked results are left as they are (--out DIR writes elsewhere)")
            return res
    with open(json_path, "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(args.out, f"{slug}.md"), "w") as f:
        f.write(markdown(res))
    if not args.no_plots:
        try:
            plots(res, args.out, slug)
        except ImportError as e:  # matplotlib is optional on a bare GPU machine
            print(f"no plots: {e}")
    print(f"wrote {args.out}/{slug}.json, .md and plots in {time.time() - t0:.0f} s")
    return res


if __name__ == "__main__":
    main()
