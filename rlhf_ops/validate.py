"""python -m rlhf_ops.validate: every op × backend × dtype against the float64 eager reference.

    python -m rlhf_ops.validate [--device cpu|cuda|cuda:N] [--ops OP ...] [--backends B ...]
                                [--dtypes fp32 bf16 ...] [--quick] [--json PATH]

The check to run after installing rlhf_ops, or after changing the GPU, the driver, torch or Triton,
before trusting the kernels. For every op of the case table (``rlhf_ops._validate_cases.OPS``)
that this rlhf_ops has, every backend that can run on the device and every dtype asked for, it
runs a small fixed matrix of shapes and edge cases, forward and backward, and judges each case
with ``rlhf_ops.testing.compare_to_reference``: the rule of the test suite, under which the fused
error against float64 may not exceed eager PyTorch's own error in the same dtype × 1.05 + a
small atol.

It prints one line per case (the ratio fused error / eager error, the largest relative error),
then a table op × backend × dtype, with the device, the versions (torch, Triton, CUDA, driver) and
the commit; ``--json`` writes every case. Exit status: 0 all passed, 1 a case failed, 2 bad
arguments (or nothing this machine can run was selected).

Backends: ``triton`` and ``cuda`` where they can run (the reason is printed where they cannot);
``torch`` names the ops without a ``backend=`` argument (plain PyTorch), checked against their
definition in ``rlhf_ops.reference``. The ``reference`` backend is the oracle, not a backend
under test. On a CPU the Triton kernels run under the interpreter (``TRITON_INTERPRET=1``, set
here when unset), whose bf16 ``tl.dot`` is wrong: the cells of ops that use it (attention) are
skipped with that reason, to be validated on a GPU. A backend that declines a case it documents
it does not support (the cuda attention's window/softcap) shows the case as not supported.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import platform
import subprocess
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field

import torch

from ._validate_cases import OPS, Case, Op
from .testing import FACTOR, NOISE_ELEMENTS, TOLERANCE, compare_to_reference

F32 = torch.float32
DTYPES = {"fp64": torch.float64, "fp32": F32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_ALIASES = {"float64": "fp64", "double": "fp64", "float32": "fp32", "float": "fp32",
                 "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}
FUSED_BACKENDS = ("triton", "cuda")
TORCH = "torch"        # the pseudo-backend of ops without backend= (plain PyTorch)
DEFAULT_DTYPES = ("fp64", "fp32", "fp16", "bf16")
# --quick: on a GPU every dtype costs a round of Triton compilations, so bf16 (the training dtype)
QUICK_DTYPES = {"cpu": ("fp32", "bf16"), "cuda": ("bf16",)}

# ------------------------------------------------------------------------------- the run ---

@dataclass
class Result:
    op: str
    backend: str
    dtype: str
    case: str
    status: str                  # "pass" | "fail" | "skip"
    reason: str | None = None    # why skipped, or the failure (the rule's message or the exception)
    worst_ratio: float | None = None
    max_rel_err: float | None = None
    seconds: float = 0.0
    checks: list = field(default_factory=list)


def _seed(*parts) -> int:
    return zlib.crc32("/".join(parts).encode())


def reference_of(op: Op):
    """The eager definition ``op`` is compared with: its ``reference`` backend, or for an op
    without backend= its function in rlhf_ops.reference (None when there is none)."""
    from . import reference
    fn = op.function()
    if op.has_backend_arg():
        return lambda *a, **o: fn(*a, backend="reference", **o)
    return getattr(reference, op.name, None)


def run_case(op: Op, backend: str, dtype: str, case: Case, device: torch.device) -> Result:
    """One case: build its inputs, run the fused op, eager in ``dtype`` and the float64 reference,
    and apply the rule (``rlhf_ops.testing.compare_to_reference``)."""
    res = Result(op.name, backend, dtype, case.name, "fail")
    fn = op.function()
    inp = case.build(torch.Generator().manual_seed(_seed(op.name, case.name, dtype)), device.type == "cuda")
    move = lambda x: x.to(device) if isinstance(x, torch.Tensor) else x  # noqa: E731
    args = tuple(move(a) for a in inp.args)
    scales = {i: move(s) for i, s in inp.elementwise.items()}
    impl = fn if backend == TORCH else (lambda *a, **o: fn(*a, backend=backend, **o))
    ref = reference_of(op)
    dt = DTYPES[dtype]
    t0 = time.perf_counter()
    try:
        rep = compare_to_reference(
            lambda *a: op.call(impl, *a, **case.options), lambda *a: op.call(ref, *a, **case.options), *args,
            dtype=[None if i in inp.keep else dt for i in range(len(args))], grad=inp.grad,
            rounding_dtype=dt if op.rounds_in_dtype else None,
            elementwise=tuple(scales), scale=scales,
            input_names=tuple(inp.names) + (None,) * (len(args) - len(inp.names)), seed=_seed(op.name, case.name))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as e:  # noqa: BLE001 - an op raising on inputs its backend accepts fails the case
        res.seconds = time.perf_counter() - t0
        res.reason = f"raised {type(e).__name__}: {e}"
        return res
    res.seconds = time.perf_counter() - t0
    res.status = "pass" if rep.passed else "fail"
    res.reason = None if rep.passed else rep.message()
    res.worst_ratio, res.max_rel_err = rep.worst_ratio, rep.max_rel_err
    res.checks = [dict(tensor=c.tensor, kind=c.kind, fused_err=c.fused_err, eager_err=c.eager_err,
                       bound=c.bound, ratio=c.ratio, passed=c.passed,
                       index=None if c.index is None else list(c.index), problem=c.problem)
                  for c in rep.checks]
    return res


# ------------------------------------------------------------------------- the environment ---

def _git(*args) -> str | None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _commit() -> str:
    sha = _git("rev-parse", "HEAD")
    if not sha:
        return "unknown (not a git checkout)"
    return sha + (" with local changes" if _git("status", "--porcelain", "--untracked-files=no") else "")


def _driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.strip().splitlines() if out.returncode == 0 else []
    return lines[0] if lines else None


def environment(device: torch.device) -> dict:
    from . import __version__
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton_version,
           "cuda_runtime": torch.version.cuda, "driver": None, "rlhf_ops": __version__, "commit": _commit(),
           "platform": platform.platform(), "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1"}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env["device"] = f"{p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)"
        env["driver"] = _driver()
    else:
        env["device"] = f"cpu ({platform.machine()}, {os.cpu_count()} cores)"
    return env


def backend_problems(device: torch.device) -> dict:
    """backend -> None if it can run on ``device`` tensors, else why not (rlhf_ops' own reason)."""
    from . import _backend
    return {b: _backend.unavailable(b, device) for b in FUSED_BACKENDS}


# ------------------------------------------------------------------------------------ CLI ---

def _names(values):
    """Names given space- or comma-separated."""
    return [n for v in values for n in v.split(",") if n]


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m rlhf_ops.validate",
        description="Validate every rlhf_ops op and backend, forward and backward, against the "
                    "float64 eager reference: the fused error may not exceed eager PyTorch's own "
                    "error in the same dtype x 1.05 + a small atol. Exit 0: all passed; 1: a case "
                    "failed; 2: bad arguments.")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if a GPU is visible)")
    p.add_argument("--ops", nargs="+", default=None, metavar="OP",
                   help=f"ops to validate (default: all present): {', '.join(op.name for op in OPS)}")
    p.add_argument("--backends", nargs="+", default=None, metavar="BACKEND",
                   help=f"{', '.join(FUSED_BACKENDS)}, {TORCH} (ops without backend=); "
                        "default: every one available on the device")
    p.add_argument("--dtypes", nargs="+", default=None, metavar="DTYPE",
                   help="fp64 fp32 fp16 bf16 (default: all; with --quick fp32 bf16 on a CPU, bf16 on a GPU)")
    p.add_argument("--quick", action="store_true", help="a smaller matrix: under 2 min on a CPU, 1 min on a GPU")
    p.add_argument("--json", default=None, metavar="PATH", help="write every case to PATH as JSON")
    args = p.parse_args(argv)

    try:
        args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        p.error(f"--device: {e}")
    if args.device.type not in ("cpu", "cuda"):
        p.error(f"--device: expected cpu, cuda or cuda:N, got {args.device}")
    if args.device.type == "cuda":
        if not torch.cuda.is_available():
            p.error(f"--device {args.device}: torch sees no CUDA device (torch {torch.__version__}, "
                    f"CUDA runtime {torch.version.cuda})")
        if args.device.index is not None and args.device.index >= torch.cuda.device_count():
            p.error(f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s) are visible")

    known = {op.name: op for op in OPS}
    if args.ops is None:
        args.ops = [op.name for op in OPS if op.function() is not None]
    else:
        args.ops = _names(args.ops)
        for n in args.ops:
            if n not in known:
                p.error(f"--ops: unknown op {n!r}; expected some of {', '.join(known)}")
            if known[n].function() is None:
                p.error(f"--ops: this rlhf_ops has no op {n!r} (it is in the case table for a later version)")

    backends = list(FUSED_BACKENDS) + [TORCH]
    if args.backends is not None:
        args.backends = _names(args.backends)
        for n in args.backends:
            if n == "reference":
                p.error("--backends: 'reference' is the oracle every backend is compared with, not a "
                        f"backend under test; expected some of {', '.join(backends)}")
            if n not in backends:
                p.error(f"--backends: unknown backend {n!r}; expected some of {', '.join(backends)}")

    if args.dtypes is None:
        args.dtypes = list(QUICK_DTYPES[args.device.type] if args.quick else DEFAULT_DTYPES)
    else:
        args.dtypes = [DTYPE_ALIASES.get(n, n) for n in _names(args.dtypes)]
        for n in args.dtypes:
            if n not in DTYPES:
                p.error(f"--dtypes: unknown dtype {n!r}; expected some of {', '.join(DTYPES)}")
    args.parser = p
    return args


def plan(args, problems: dict):
    """(runs, skipped, plain, pending): the (op, backend, dtype, case) to run; the cases the
    backend does not support or would get wrong on this device, as skipped Results with the
    reason; the ops with neither a fused backend nor an eager definition apart from themselves
    (nothing to compare them with); the cases left out because they use an option this rlhf_ops'
    op does not have yet ("op: case (option)"). Backends that cannot run on the device are left
    out here and named once in the header."""
    from . import _backend
    runs, skipped, plain, pending = [], [], [], []
    for op in OPS:
        if op.name not in args.ops:
            continue
        if not op.has_backend_arg() and reference_of(op) is None:
            plain.append(op.name)
            continue
        params = inspect.signature(op.function()).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        chosen = []
        for case in op.cases:
            missing = [] if takes_any else [k for k in case.options if k not in params]
            if missing:
                pending.append(f"{op.name}: {case.name} ({', '.join(missing)})")
            elif case.quick or not args.quick:
                chosen.append(case)
        backends = list(FUSED_BACKENDS) if op.has_backend_arg() else [TORCH]
        for b in backends:
            if (args.backends is not None and b not in args.backends) or problems.get(b):
                continue
            for dt in args.dtypes:
                for case in chosen:
                    # what the backend does not support, or would get wrong here (bf16 tl.dot under
                    # the CPU interpreter): rlhf_ops' capability table decides, and says why
                    refusal = _backend.unsupported(op.name, b, args.device, exact=True, dtype=DTYPES[dt],
                                                   **case.options)
                    if refusal is not None:
                        skipped.append(Result(op.name, b, dt, case.name, "skip", refusal.reason))
                    else:
                        runs.append((op, b, dt, case))
    return runs, skipped, plain, pending


def _fmt(x, spec=".3g"):
    return "—" if x is None else format(x, spec)


def table(results: list) -> tuple[list, str]:
    """Cells op × backend × dtype (in the table's order): their worst ratio, largest relative error and
    result; and the text table."""
    cells = {}
    for r in results:
        cells.setdefault((r.op, r.backend, r.dtype), []).append(r)
    order = {op.name: i for i, op in enumerate(OPS)}
    backends = FUSED_BACKENDS + (TORCH,)
    key = lambda c: (order.get(c[0], len(order)), backends.index(c[1]), list(DTYPES).index(c[2]))  # noqa: E731
    rows = []
    for (op, b, dt), rs in sorted(cells.items(), key=lambda kv: key(kv[0])):
        ran = [r for r in rs if r.status != "skip"]
        ratios = [r.worst_ratio for r in ran if r.worst_ratio is not None]
        errs = [r.max_rel_err for r in ran if r.max_rel_err is not None]
        status = "skip" if not ran else "FAIL" if any(r.status == "fail" for r in ran) else "pass"
        n_skip = len(rs) - len(ran)
        why = "; ".join(dict.fromkeys(r.reason for r in rs if r.status == "skip"))
        note = why if not ran else f"{n_skip} case(s) skipped: {why}" if n_skip else ""
        rows.append(dict(op=op, backend=b, dtype=dt, cases=len(ran), not_supported=n_skip,
                         worst_ratio=max(ratios) if ratios else None,
                         max_rel_err=max(errs) if errs else None, status=status, note=note))
    head = f"{'op':<22} {'backend':<7} {'dtype':<5} {'cases':>5} {'worst ratio':>11} {'max rel err':>11}  result"
    lines = [head, "-" * len(head)]
    for c in rows:
        lines.append(f"{c['op']:<22} {c['backend']:<7} {c['dtype']:<5} {c['cases']:>5} "
                     f"{_fmt(c['worst_ratio']):>11} {_fmt(c['max_rel_err'], '.2e'):>11}  {c['status']}"
                     + (f"  {c['note']}" if c["note"] else ""))
    return rows, "\n".join(lines)


def _jsonable(x):
    """Non-finite floats as strings ("inf", "nan"): strict JSON has no Infinity."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def _progress(total: int):
    try:
        from tqdm import tqdm
    except ImportError:   # tqdm is a dependency; without it each case still prints as it ends
        return None
    return tqdm(total=total, file=sys.stderr, desc="validate", unit="case", dynamic_ncols=True, leave=False)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device
    set_here = device.type == "cpu" and os.environ.get("TRITON_INTERPRET") is None
    if set_here:
        # the Triton kernels run on CPU tensors only under the interpreter; the flag is read when
        # the kernel modules are first imported, which has not happened yet in this process
        os.environ["TRITON_INTERPRET"] = "1"
    problems = backend_problems(device)
    for b in args.backends or ():
        if problems.get(b):
            args.parser.error(f"--backends {b}: not available on {device}: {problems[b]}")
    runs, skipped, plain, pending = plan(args, problems)
    if not runs:
        why = "; ".join(sorted({r.reason for r in skipped})
                        + [f"{n} is plain PyTorch with no separate eager definition to compare" for n in plain]) \
            or "no selected op has a selected backend"
        args.parser.error(f"nothing to validate on {device} with these arguments: {why}")

    env = environment(device)
    interp = " (set by validate)" if set_here else ""
    print("rlhf_ops.validate: fused kernels vs the float64 eager reference, forward and backward")
    print(f"device    {env['device']}" + ("; Triton kernels under the interpreter, TRITON_INTERPRET=1"
                                          + interp if env["triton_interpret"] else ""))
    print(f"versions  python {env['python']}, torch {env['torch']}, triton {env['triton']}, "
          f"CUDA runtime {env['cuda_runtime']}, driver {env['driver'] or 'none'}")
    print(f"rlhf_ops  {env['rlhf_ops']}, commit {env['commit']}")
    for b in FUSED_BACKENDS:
        print(f"backend   {b}: " + ("available" if problems[b] is None else f"unavailable: {problems[b]}"))
    absent = [op.name for op in OPS if op.function() is None]
    if absent:
        print(f"absent    not in this rlhf_ops, left out: {', '.join(absent)}")
    if plain:
        print(f"plain     PyTorch ops without a fused backend or a separate eager definition, nothing to "
              f"compare: {', '.join(plain)}")
    if pending:
        print(f"pending   cases left out, their option is not in this rlhf_ops: {'; '.join(pending)}")
    atols = ", ".join(f"{n} {TOLERANCE[d]:.0e}" for n, d in DTYPES.items())
    print(f"rule      per output and input gradient: error(fused) <= {FACTOR} x error(eager, same dtype) + atol\n"
          f"          ({atols}; fp16/bf16 norm-wise x sqrt({NOISE_ELEMENTS}/n) over n > {NOISE_ELEMENTS} elements);\n"
          "          errors vs float64, norm-wise, and per element for per-row outputs; NaN/inf must match.\n"
          "          ratio = error(fused) / error(eager), worst over the case's tensors; — where eager is\n"
          "          exact (fp64: eager is the reference itself)")
    print(f"matrix    {'quick' if args.quick else 'full'}: {len(runs)} cases, dtypes {' '.join(args.dtypes)}\n")

    results = []
    bar = _progress(len(runs))
    t_start = time.perf_counter()
    for op, b, dt, case in runs:
        r = run_case(op, b, dt, case, device)
        results.append(r)
        line = (f"{r.status if r.status != 'fail' else 'FAIL':<4}  {op.name:<22} {b:<7} {dt:<5} "
                f"ratio {_fmt(r.worst_ratio):>6}  max rel err {_fmt(r.max_rel_err, '.2e'):>8}  "
                f"{r.seconds:5.2f}s  {case.name}")
        if r.status != "pass" and r.reason:
            line += "\n" + "\n".join("      " + s for s in r.reason.splitlines())
        if bar is not None:
            bar.write(line, file=sys.stdout)
            bar.update(1)
        else:
            print(line, flush=True)
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - t_start

    rows, text = table(results + skipped)
    count = lambda s: sum(r.status == s for r in results)  # noqa: E731
    ok = count("fail") == 0
    print("\n" + text)
    print(f"\n{'PASSED' if ok else 'FAILED'}: {count('pass')} cases passed, {count('fail')} failed, "
          f"{len(skipped)} skipped (not supported by the backend here); {elapsed:.1f} s on {device}")
    if args.json:
        doc = {"schema": 1, "passed": ok, "argv": list(sys.argv[1:] if argv is None else argv),
               "quick": args.quick, "device_type": device.type, "dtypes": args.dtypes, "environment": env,
               "backends": {b: {"available": problems[b] is None, "reason": problems[b]} for b in FUSED_BACKENDS},
               "rule": {"factor": FACTOR, "atol": {n: TOLERANCE[d] for n, d in DTYPES.items()}},
               "absent_ops": absent, "plain_ops": plain, "pending_cases": pending, "seconds": elapsed, "cells": rows,
               "cases": [asdict(r) for r in results + skipped]}
        with open(args.json, "w") as f:
            json.dump(_jsonable(doc), f, indent=1)
            f.write("\n")
        print(f"json      {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
