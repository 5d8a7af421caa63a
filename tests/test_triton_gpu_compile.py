"""The Triton kernels compile for real GPUs (sm_90 Hopper, sm_80 Ampere), checked on a CPU machine.

The interpreter that runs the kernels in CI is more lenient than Triton's GPU front end (it accepts,
for example, a jit helper whose branches return different dtypes). So: run every op's Triton backend
under the interpreter with fp64, fp32, fp16 and bf16 inputs, record each kernel launch (the kernel,
its argument types and constexpr values), then compile each recorded specialisation to GPU machine
code with ``triton.compile`` for ``GPUTarget("cuda", 90 and 80)`` in a subprocess without
TRITON_INTERPRET. Needs no GPU (ptxas ships with triton). The attention kernels are recorded at
the interpreter's fixed block config; ``test_attention_configs_fit_gpu_resources`` compiles them
at every config the autotuner may select and checks registers, spills and shared memory.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

ON_GPU = os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.is_available()

TYPES = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
         torch.int64: "i64", torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}


def _arg_type(v):
    if isinstance(v, torch.Tensor):
        return "*" + TYPES[v.dtype]
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i64" if not -2**31 <= v < 2**31 else "i32"
    if isinstance(v, float):
        return "fp32"
    if v is None:
        return "none"
    raise TypeError(f"unexpected kernel argument {v!r}")


def _record_launches(run_ops):
    """Run ``run_ops`` under the interpreter and return the distinct kernel specialisations."""
    import inspect

    from triton.runtime import interpreter

    seen = {}
    original = interpreter.InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        names = list(inspect.signature(self.fn).parameters)
        bound = dict(zip(names, args))
        bound.update({k: v for k, v in kwargs.items() if k in names})  # not launch options
        consts = {k: v for k, v in bound.items() if self.fn.__annotations__.get(k) is not None
                  and "constexpr" in str(self.fn.__annotations__[k])}
        sig = {k: ("constexpr" if k in consts else _arg_type(v)) for k, v in bound.items()}
        consts = {k: (v if isinstance(v, (int, float, bool)) or v is None else str(v)) for k, v in consts.items()}
        key = (self.fn.__module__, self.fn.__name__, json.dumps(sig, sort_keys=True), json.dumps(consts, sort_keys=True))
        seen[key] = {"module": self.fn.__module__, "name": self.fn.__name__, "signature": sig, "constexprs": consts}
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    interpreter.InterpretedFunction.run = run
    try:
        run_ops()
    finally:
        interpreter.InterpretedFunction.run = original
    return list(seen.values())


def _all_ops():
    import rlhf_ops as ro

    for dt in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        x = (torch.randn(6, 300) * 3).to(dt).requires_grad_()
        t = torch.randint(0, 300, (6,))
        ro.cross_entropy(x, t, label_smoothing=0.1, backend="triton").backward()
        big = torch.randn(2, 70001).to(dt).requires_grad_()
        ro.cross_entropy(big, torch.tensor([1, 70000]), backend="triton").backward()
        lg = torch.randn(2, 3, 300).to(dt).requires_grad_()
        tk = torch.randint(0, 300, (2, 3))
        ro.token_logprobs(lg, tk, temperature=0.7, backend="triton").sum().backward()
        for est in ("k1", "k2", "k3"):
            res = ro.kl_penalty(lg, torch.randn(2, 3, 300).to(dt), tk, beta=0.1, estimator=est,
                                mask=torch.ones(2, 3), backend="triton")
            (res.logprobs.sum() + res.kl.sum()).backward()
        res = ro.kl_penalty(big[None], torch.randn(1, 2, 70001).to(dt), torch.tensor([[3, 4]]), beta=0.1,
                            backend="triton")
        res.kl.sum().backward()
        r = torch.randn(3, 9).to(dt).requires_grad_()
        ranks = torch.stack([torch.randperm(9) for _ in range(3)])
        ro.pairwise_reward_loss(r, ranks, backend="triton").backward()
        r70 = torch.randn(2, 70).to(dt).requires_grad_()
        ro.pairwise_reward_loss(r70, torch.stack([torch.randperm(70) for _ in range(2)]), backend="triton").backward()
        if dt != torch.bfloat16:  # the interpreter's bf16 tl.dot is broken; the kernel source is the same
            q = torch.randn(1, 2, 20, 64).to(dt).requires_grad_()
            k = torch.randn(1, 1, 20, 64).to(dt).requires_grad_()
            for causal in (True, False):
                ro.attention(q, k, k, causal=causal, backend="triton").sum().backward()
        if dt == torch.float64:  # fp64 window/softcap/varlen branches (bf16/fp32: the resource audit)
            ro.attention(q, k, k, causal=False, window=(3, 2), softcap=1.5, backend="triton").sum().backward()
            cu = torch.tensor([0, 7, 20], dtype=torch.int32)
            ro.attention_varlen(q[0].transpose(0, 1), k[0].transpose(0, 1), k[0].transpose(0, 1), cu, cu, 13, 13,
                                window=(4, 0), softcap=2.0, backend="triton").sum().backward()
        if dt in (torch.float64, torch.float16):  # the tree variant (IS_TREE): ancestors walked, descendants' range
            cu = torch.tensor([0, 7, 12, 12, 20], dtype=torch.int32)
            parent = torch.tensor([-1, 0, 0, 2], dtype=torch.int32)
            qt, kt = q[0].transpose(0, 1), k[0].transpose(0, 1)
            ro.attention_tree(qt, kt, kt, cu, parent, 15, softcap=2.0 if dt == torch.float64 else 0.0,
                              backend="triton").sum().backward()


def _compile(specs, cc):
    """Compile recorded specialisations for compute capability ``cc``; return the failures."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    failures = []
    for s in specs:
        fn = getattr(importlib.import_module(s["module"]), s["name"])
        fn = getattr(fn, "fn", fn) if not hasattr(fn, "arg_names") else fn
        while not hasattr(fn, "arg_names") and hasattr(fn, "fn"):  # autotuner / heuristics wrappers
            fn = fn.fn
        sig = {k: v for k, v in s["signature"].items()}
        consts = {}
        for k, v in s["constexprs"].items():
            consts[k] = getattr(triton.language, v.split(".")[-1]) if isinstance(v, str) and v.startswith("triton.language.") else v
        for k, v in sig.items():
            if v == "none":
                sig[k] = "constexpr"
                consts[k] = None
        try:
            triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", cc, 32))
        except Exception as e:  # noqa: BLE001 - report every failure, then fail the test
            failures.append(f"{s['name']} {s['signature']} {s['constexprs']}: {type(e).__name__}: {str(e)[:800]}")
    return failures


@pytest.mark.skipif(ON_GPU, reason="on a GPU the kernels are compiled and run by the other tests")
def test_triton_kernels_compile_for_gpu(tmp_path):
    specs = _record_launches(_all_ops)
    assert len(specs) >= 10, specs
    path = tmp_path / "specs.json"
    path.write_text(json.dumps(specs))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    proc = subprocess.run([sys.executable, __file__, str(path)], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    assert f"compiled {len(specs)} specialisations" in proc.stdout, proc.stdout


# ------------------------------------------------------------ attention: resources per config ---
# Every attention kernel at every config its pruner may select, compiled for sm_80 and sm_90 with
# the divisibility a real launch has (16-byte aligned pointers, strides that are multiples of 16),
# in the heaviest variant (varlen, two-sided window, softcap: it adds code and registers to the
# dense kernel, which is the same source with those branches off). Per (kernel, config, dtype
# class) only the widest head dim the pruner lets the config run at is compiled: registers, spills
# and shared memory only grow with the head dim. fp16 and bf16 share the tile shapes; bf16 is
# compiled (its conversions cost more registers). fp64 is a testing dtype that runs the fallback
# row only and is not audited.

ARCH_SMEM = {80: 163 * 1024, 90: 227 * 1024}     # opt-in shared memory per block
AUDIT_CLASSES = (("bf16", "ieee", 2), ("fp32", "ieee", 4), ("fp32", "tf32", 4))
_NOT_DIVISIBLE = {"G", "T", "S", "H", "WL", "WR", "slb", "slh", "n_seg"}     # lengths, window, lse strides
# The tree variant (IS_TREE: shared-prefix attention, causal with softcap, no window) is audited
# as well, at the widest head each config may run it (ka.select(tree=True)): the ancestor walk adds
# a copy of the inner loop to the forward and dQ kernels.
TREE_CLASSES = AUDIT_CLASSES


def attention_audit_tasks():
    from rlhf_ops.kernels import attention as ka

    tasks = []
    for cc, limit in ARCH_SMEM.items():
        for kernel in ka.TABLES:
            for dtype, prec, elem in AUDIT_CLASSES:
                for tree in ((False, True) if (dtype, prec, elem) in TREE_CLASSES else (False,)):
                    widest = {}
                    for block_d in (16, 32, 64, 128, 256):
                        for row in ka.select(kernel, block_d, elem, limit, tree=tree):
                            widest[row] = block_d
                    tasks += [dict(kernel=kernel, cfg=list(row[:4]), dtype=dtype, prec=prec, D=d, cc=cc,
                                   **({"tree": True} if tree else {})) for row, d in widest.items()]
        for dtype in ("bf16", "fp32"):
            tasks.append(dict(kernel="delta", cfg=[64, 0, 4, 1], dtype=dtype, prec="ieee", D=256, cc=cc))
    return tasks


def _attention_source(task):
    """(kernel fn, signature, constexprs, attrs) of an audit task."""
    from triton.compiler import ASTSource

    from rlhf_ops.kernels import attention as ka

    fn = {"fwd": ka._attn_fwd, "dkdv": ka._attn_bwd_dkdv, "dq": ka._attn_bwd_dq,
          "delta": ka._attn_bwd_delta}[task["kernel"]]
    bm, bn = task["cfg"][:2]
    block_d = max(16, 1 << (task["D"] - 1).bit_length())
    tree = task.get("tree", False)
    consts = dict(HEAD_DIM=task["D"], IS_VARLEN=True, IS_TREE=tree, HAS_LEFT=not tree, HAS_RIGHT=True,
                  SOFTCAP=True, PREC=task["prec"], FP64=False, FWD_ORIENT=False, BLOCK_M=bm, BLOCK_N=bn,
                  BLOCK_D=block_d)
    consts = {k: v for k, v in consts.items() if k in fn.arg_names}
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name in ("M2", "L2", "DELTA"):
            sig[name] = "*fp32"
        elif name in ("CU_Q", "CU_K", "PARENT"):
            sig[name] = "*i32"
        elif name in ("Q", "K", "V", "O", "DO", "DK", "DV", "DQ"):
            sig[name] = "*" + task["dtype"]
        elif name in ("scale_hi", "scale_lo", "cap_hi", "cap_lo"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
        if sig[name] != "constexpr" and sig[name] != "fp32" and name not in _NOT_DIVISIBLE and name != "L2":
            attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)


def _audit_one(task):
    """Compile one task (in a worker process without TRITON_INTERPRET); registers and spills from
    ptxas's report, shared memory from Triton's metadata."""
    import contextlib
    import io
    import re
    import time

    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    import triton
    from triton.backends.compiler import GPUTarget

    t0 = time.time()
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            k = triton.compile(_attention_source(task), target=GPUTarget("cuda", task["cc"], 32),
                               options=dict(num_warps=task["cfg"][2], num_stages=task["cfg"][3]))
        text = log.getvalue()
        regs = re.search(r"Used (\d+) registers", text)
        spill = re.search(r"(\d+) bytes spill stores", text)
        return {**task, "regs": int(regs.group(1)) if regs else -1, "spill": int(spill.group(1)) if spill else 0,
                "smem": int(k.metadata.shared), "seconds": round(time.time() - t0, 1)}
    except Exception as e:  # noqa: BLE001 - reported as a failure of this task
        return {**task, "error": f"{type(e).__name__}: {str(e)[:400]}", "seconds": round(time.time() - t0, 1)}


def run_attention_audit(jobs: int):
    from concurrent.futures import ProcessPoolExecutor

    tasks = attention_audit_tasks()
    with ProcessPoolExecutor(jobs) as ex:   # heaviest (widest) first so that the pool ends together
        return list(ex.map(_audit_one, sorted(tasks, key=lambda t: -t["D"] * max(t["cfg"][:2]))))


def format_audit(results):
    rows = ["| kernel | arch | BLOCK_M×BLOCK_N, warps, stages | dtype | D | regs | spill B | smem KB |",
            "|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r["kernel"], r.get("tree", False), r["cc"], r["dtype"] + r["prec"],
                                            r["cfg"], r["D"])):
        bm, bn, w, st = r["cfg"]
        dt = r["dtype"] if r["dtype"] == "bf16" else f"fp32 ({r['prec']})"
        kernel = r["kernel"] + (" (tree)" if r.get("tree") else "")
        rows.append(f"| {kernel} | sm_{r['cc']} | {bm}×{bn}, w{w}, s{st} | {dt} | {r['D']} | "
                    + (f"{r['regs']} | {r['spill']} | {r['smem'] / 1024:.1f} |" if "error" not in r
                       else f"error: {r['error'][:80]} | | |"))
    return "\n".join(rows)


@pytest.mark.skipif(ON_GPU, reason="on a GPU the autotuner compiles and runs these configs")
def test_attention_configs_fit_gpu_resources(tmp_path):
    """Every attention config the pruner may select fits the arch's shared memory and spills at
    most SPILL_BUDGET bytes per thread (sm_80 and sm_90, compiled offline)."""
    from rlhf_ops.kernels import attention as ka

    out = tmp_path / "audit.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    proc = subprocess.run([sys.executable, __file__, "--attention-audit", str(out)], env=env,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads(out.read_text())
    print(format_audit(results))
    assert len(results) == len(attention_audit_tasks())
    bad = [r for r in results if "error" in r or r["smem"] > ARCH_SMEM[r["cc"]] or r["spill"] > ka.SPILL_BUDGET]
    assert not bad, "configs the pruner may select exceed the GPU's resources:\n" + format_audit(bad)


if __name__ == "__main__" and sys.argv[1] == "--attention-audit":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    res = run_attention_audit(int(os.environ.get("AUDIT_JOBS", min(2, os.cpu_count() or 1))))
    json.dump(res, open(sys.argv[2], "w"))
    print(format_audit(res))
elif __name__ == "__main__":
    specs = json.load(open(sys.argv[1]))
    fails = []
    for cc in (90, 80):
        fails += [f"sm_{cc}: {f}" for f in _compile(specs, cc)]
    if fails:
        print("\n".join(fails))
        sys.exit(1)
    print(f"compiled {len(specs)} specialisations for sm_90 and sm_80")
